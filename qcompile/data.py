"""Data sets for calibration and accuracy: scikit-learn digits, Fashion-MNIST, random, or an .npz file.

``load_data(spec)`` understands ``digits`` (8x8, a fixed-seed stratified 75/25 split), ``fashion-mnist``
or ``fashion-mnist:DIR`` (the idx files; default folder: Debian's dataset-fashion-mnist package),
``random`` (Gaussian inputs of a given shape, no labels) and ``FILE.npz`` with arrays ``x`` and
optionally ``y`` (and ``x_test``/``y_test``; otherwise a fixed-seed 80/20 split).
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qcompile.errors import QCompileError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SEED = 0


class DataError(QCompileError):
    pass


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor | None
    x_test: torch.Tensor
    y_test: torch.Tensor | None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def labelled(self) -> bool:
        return self.y_train is not None and self.y_test is not None

    def calibration(self, batch_size: int = 64, seed: int = SEED) -> Callable[[], Iterable[torch.Tensor]]:
        """A callable giving the training inputs in a fixed shuffled order, batch by batch."""

        def batches() -> Iterable[torch.Tensor]:
            order = torch.randperm(len(self.x_train), generator=torch.Generator().manual_seed(seed))
            for start in range(0, len(order), batch_size):
                yield self.x_train[order[start : start + batch_size]]

        return batches


def _split(
    x: np.ndarray, y: np.ndarray | None, test_fraction: float
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None]:
    """(x_train, y_train, x_test, y_test); the labels are None when ``y`` is."""
    order = np.random.default_rng(SEED).permutation(len(x))
    n_test = max(1, int(round(len(x) * test_fraction)))
    test, train = order[:n_test], order[n_test:]
    return x[train], None if y is None else y[train], x[test], None if y is None else y[test]


def _tensors(name: str, parts: tuple[np.ndarray | None, ...]) -> Dataset:
    xt, yt, xs, ys = (None if p is None else torch.from_numpy(np.ascontiguousarray(p)) for p in parts)
    assert xt is not None and xs is not None
    return Dataset(name, xt.float(), None if yt is None else yt.long(), xs.float(), None if ys is None else ys.long())


def digits() -> Dataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    parts = train_test_split(x, d.target, test_size=0.25, random_state=SEED, stratify=d.target)
    return _tensors("digits", (parts[0], parts[2], parts[1], parts[3]))


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def fashion_mnist(folder: Path = FASHION_MNIST_DIR) -> Dataset:
    files = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz"]
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"no Fashion-MNIST files in {folder} (missing {missing[0]}); install them with "
            "`apt-get install dataset-fashion-mnist` or pass fashion-mnist:DIR"
        )
    try:
        xt, yt, xs, ys = (_read_idx(folder / f) for f in files)
    except (OSError, EOFError, ValueError) as exc:
        raise DataError(f"cannot read Fashion-MNIST in {folder}: {exc}") from exc
    scale = np.float32(1 / 255)
    parts = (xt[:, None] * scale, yt.astype(np.int64), xs[:, None] * scale, ys.astype(np.int64))
    return _tensors("fashion-mnist", parts)


RANDOM_BYTES = 2**28  # --data random never holds more than 256 MiB of samples


def random_data(input_shape: tuple[int, ...], train: int = 256, test: int = 64) -> Dataset:
    """Gaussian samples; fewer than ``train + test`` when they would exceed RANDOM_BYTES (4 : 1, at least 1 + 1)."""
    per_sample = 4 * int(np.prod(input_shape))
    fits = RANDOM_BYTES // max(per_sample, 1)
    if fits < train + test:
        train, test = max(1, fits * 4 // 5), max(1, fits // 5)
    g = torch.Generator().manual_seed(SEED)
    return Dataset("random", torch.randn(train, *input_shape, generator=g), None,
                   torch.randn(test, *input_shape, generator=g), None)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            if not hasattr(f, "files"):
                raise DataError(f"{path} holds one array, not named arrays; save it with np.savez(path, x=..., y=...)")
            return {k: f[k] for k in f.files}
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated zips, pickled object arrays, garbage
        detail = " ".join(str(exc).split())[:80]
        raise DataError(f"cannot read {path} ({type(exc).__name__}: {detail}); save it again with "
                        "np.savez(path, x=..., y=...) (no object arrays)") from None


def _inputs(path: Path, name: str, a: np.ndarray) -> np.ndarray:
    """Array ``name`` as float32 samples: numeric, at least one sample of at least one value, all finite."""
    if a.dtype.kind not in "biuf" or a.ndim < 2 or a.shape[0] == 0 or a[0].size == 0:
        raise DataError(f"{path}: '{name}' has shape {a.shape} and dtype {a.dtype}; it must hold at least one "
                        "numeric sample, shaped (N, C, H, W) or (N, features)")
    with np.errstate(over="ignore", invalid="ignore"):  # values beyond float32 become inf: refused below
        x = a.astype(np.float32)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())
        raise DataError(f"{path}: '{name}' has NaN or Inf in {bad} of {len(x)} samples (or values beyond float32); "
                        "clean or drop those samples")
    return x


def _labels(path: Path, name: str, y: np.ndarray | None, n: int) -> np.ndarray | None:
    """Labels ``name``: one non-negative integer class per sample."""
    if y is None:
        return None
    if y.shape != (n,):
        raise DataError(f"{path}: '{name}' has shape {y.shape} but there are {n} samples; give one class "
                        f"index per sample, shape ({n},)")
    if y.dtype.kind not in "biuf":
        raise DataError(f"{path}: '{name}' is {y.dtype}; it must hold class indices (integers >= 0)")
    bad = ~np.isfinite(y) | (y != np.round(y)) | (y < 0)
    if bad.any():
        raise DataError(f"{path}: '{name}' must hold class indices (integers >= 0); found {y.dtype} values such as "
                        f"{y[bad][:3].tolist()}")
    return y.astype(np.int64)


def npz(path: Path) -> Dataset:
    arrays = _read_npz(path)
    if "x" not in arrays:
        raise DataError(f"{path} has no array 'x' (found {sorted(arrays)}); save inputs as x and labels as y")
    x = _inputs(path, "x", arrays["x"])
    y = _labels(path, "y", arrays.get("y"), len(x))
    if "x_test" in arrays:
        x_test = _inputs(path, "x_test", arrays["x_test"])
        if x_test.shape[1:] != x.shape[1:]:
            raise DataError(f"{path}: samples of x_test are {x_test.shape[1:]}, of x {x.shape[1:]}; make them equal")
        parts: tuple[np.ndarray | None, ...] = (x, y, x_test, _labels(path, "y_test", arrays.get("y_test"),
                                                                      len(x_test)))
    elif len(x) < 2:
        raise DataError(f"{path}: 'x' has {len(x)} sample; the 80/20 split needs at least 2 (or give x_test)")
    else:
        parts = _split(x, y, 0.2)
    if (parts[1] is None) != (parts[3] is None):
        raise DataError(f"{path}: labels for only one split; give both y and y_test, or neither")
    return _tensors(path.stem, parts)


def check_labels(data: Dataset, classes: int) -> None:
    """Refuse labels that are not class indices of a model with ``classes`` outputs."""
    for name, y in (("y", data.y_train), ("y_test", data.y_test)):
        if y is not None and len(y) and int(y.max()) >= classes:
            raise DataError(f"data '{data.name}': label {int(y.max())} in {name} but the model has {classes} "
                            f"outputs (classes 0..{classes - 1}); fix the labels or the model's last layer")


def load_data(spec: str, input_shape: tuple[int, ...] | None = None) -> Dataset:
    """Resolve a --data spec; raise DataError with a fix when it cannot."""
    if spec == "digits":
        return digits()
    if spec == "fashion-mnist" or spec.startswith("fashion-mnist:"):
        folder = Path(spec.split(":", 1)[1]) if ":" in spec else FASHION_MNIST_DIR
        return fashion_mnist(folder)
    if spec == "random":
        if input_shape is None:
            raise DataError("--data random needs --input-shape C,H,W")
        return random_data(input_shape)
    if spec.endswith(".npz"):
        path = Path(spec)
        if not path.is_file():
            raise DataError(f"no such data file: {path}")
        return npz(path)
    raise DataError(f"unknown data '{spec}'; use digits, fashion-mnist[:DIR], random or a FILE.npz")
