"""Fixtures and constants shared by the search tests."""

from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile.models import DemoNet, train_float


@pytest.fixture(scope="session")
def digits() -> qcompile.Dataset:
    return qcompile.load_data("digits")


@pytest.fixture(scope="module")
def trained(digits: qcompile.Dataset) -> tuple[torch.nn.Module, qcompile.Dataset]:
    """A DemoNet of width 8 trained 6 epochs on digits (seed 0), with its data."""
    torch.manual_seed(0)
    assert digits.y_train is not None
    return train_float(DemoNet(width=8), digits.x_train, digits.y_train, epochs=6), digits
