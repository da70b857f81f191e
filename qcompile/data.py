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

from qcompile.passes.base import QCompileError

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


def random_data(input_shape: tuple[int, ...], train: int = 256, test: int = 64) -> Dataset:
    g = torch.Generator().manual_seed(SEED)
    return Dataset("random", torch.randn(train, *input_shape, generator=g), None,
                   torch.randn(test, *input_shape, generator=g), None)


def npz(path: Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if "x" not in arrays:
        raise DataError(f"{path} has no array 'x' (found {sorted(arrays)}); save inputs as x and labels as y")
    x, y = arrays["x"].astype(np.float32), arrays.get("y")
    if "x_test" in arrays:
        parts: tuple[np.ndarray | None, ...] = (x, y, arrays["x_test"].astype(np.float32), arrays.get("y_test"))
    else:
        parts = _split(x, y, 0.2)
    return _tensors(path.stem, parts)


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
