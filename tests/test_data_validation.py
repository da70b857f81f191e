"""--data FILE.npz is validated: each bad file is one DataError naming the real cause; labels fit the model."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import qcompile
from qcompile.data import DataError, load_data, random_data
from qcompile.models import DemoNet

RNG = np.random.default_rng(0)
X, Y = RNG.random((20, 1, 8, 8), dtype=np.float32), RNG.integers(0, 10, 20)


def save(tmp_path: Path, **arrays: Any) -> str:
    np.savez(tmp_path / "d.npz", **arrays)
    return str(tmp_path / "d.npz")


@pytest.mark.parametrize(("arrays", "why"), [
    ({"x": X, "y": Y[:5]}, "'y' has shape (5,) but there are 20 samples"),
    ({"x": X[:0]}, "'x' has shape (0, 1, 8, 8)"),
    ({"x": np.where(X > 0.9, np.nan, X), "y": Y}, "NaN or Inf in"),
    ({"x": X.astype(np.float64) * 1e300, "y": Y}, "NaN or Inf in 20 of 20 samples (or values beyond float32)"),
    ({"x": X, "y": Y - 5}, "must hold class indices (integers >= 0)"),
    ({"x": X, "y": Y + 0.5}, "must hold class indices"),
    ({"x": X, "x_test": X[:, :, :4]}, "samples of x_test are (1, 4, 8)"),
    ({"x": X, "x_test": X, "y_test": Y}, "labels for only one split"),
    ({"x": X[:1]}, "needs at least 2"),
    ({"y": Y}, "has no array 'x'"),
])
def test_bad_npz_is_one_error_naming_the_cause(tmp_path: Path, arrays: dict[str, Any], why: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy warning on the way either
        with pytest.raises(DataError) as info:
            load_data(save(tmp_path, **arrays))
    assert why in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04broken", None])
def test_truncated_empty_and_object_npz(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "d.npz"
    if content is None:
        np.savez(path, x=np.array([object()] * 3, dtype=object))
    else:
        path.write_bytes(content)
    with pytest.raises(DataError, match="cannot read"):
        load_data(str(path))


def test_labels_beyond_the_models_outputs_are_refused(tmp_path: Path) -> None:
    data = load_data(save(tmp_path, x=X, y=Y + 20))
    with pytest.raises(DataError, match="but the model has 10 outputs"):
        qcompile.compile(DemoNet(), torch.from_numpy(X[:1]), data=data)


def test_random_data_stays_within_its_memory_budget() -> None:
    data = random_data((3, 2000, 2000))
    assert 4 * (data.x_train.numel() + data.x_test.numel()) <= 2**28 and len(data.x_test) >= 1
