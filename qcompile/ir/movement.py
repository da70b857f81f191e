"""Data movement on integer tensors: the canonical forms and their exact meaning.

These ops move integers without arithmetic, so a tensor keeps its scale and type through them (the quant
stage passes scales through, the integer stage runs them on the integers, the export emits the same ONNX
op for every target). Canonical forms (canonicalize produces them, every stage accepts them):

* ``torch.permute(x, dims)``: dims a tuple of ints with ``dims[0] == 0`` (the batch stays first).
  ONNX: ``Transpose(perm=dims)``.
* ``torch.narrow(x, dim, start, length)``: ``x[..., start:start + length, ...]`` along ``dim >= 1``,
  all ints. ONNX: ``Slice(starts=[start], ends=[start + length], axes=[dim])``.
* ``upsample_nearest(x, (a, b))``: nearest-neighbour upsampling of NCHW by integer factors, every pixel
  repeated a x b times (what F.interpolate(mode="nearest") computes for integer factors). ONNX: ``Resize``
  (nearest, asymmetric coordinates, floor) on the uint8 container.
* ``torch.reshape(x, (-1, ...))`` and ``torch.flatten(x, 1)`` (kept from before: the batch stays first and
  the other entries are per sample).

Not handled: anything that moves the batch axis or mixes samples (a reshape whose first entry is not the
batch, a permute with ``dims[0] != 0``), strided slices (``step != 1``), gathers with index tensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def upsample_nearest(x: torch.Tensor, factors: tuple[int, int]) -> torch.Tensor:
    """Every pixel of an NCHW tensor repeated ``factors[0]`` x ``factors[1]`` times (any integer values)."""
    return x.repeat_interleave(int(factors[0]), dim=2).repeat_interleave(int(factors[1]), dim=3)


MOVEMENT_FUNCTIONS: tuple[Any, ...] = (torch.permute, torch.narrow, upsample_nearest)


def permute(x: np.ndarray, dims: Any) -> np.ndarray:
    """The reference form of ``torch.permute``."""
    return np.transpose(x, tuple(int(d) for d in dims))


def narrow(x: np.ndarray, dim: int, start: int, length: int) -> np.ndarray:
    """The reference form of ``torch.narrow``: ``length`` entries of ``dim`` from ``start``."""
    index = [slice(None)] * x.ndim
    index[dim] = slice(start, start + length)
    return x[tuple(index)]


def upsample(x: np.ndarray, factors: Any) -> np.ndarray:
    """The reference form of ``upsample_nearest``."""
    return np.repeat(np.repeat(x, int(factors[0]), axis=2), int(factors[1]), axis=3)


REFERENCE: dict[Any, Any] = {torch.permute: permute, torch.narrow: narrow, upsample_nearest: upsample}
