"""Data movement on integer tensors: the canonical forms and their exact meaning.

These ops move integers without arithmetic, so a tensor keeps its scale and type through them (the quant
stage passes scales through, the integer stage runs them on the integers, the export emits the same ONNX
op for every target). Canonical forms (canonicalize produces them, every stage accepts them):

* ``torch.permute(x, dims)``: dims a tuple of ints with ``dims[0] == 0`` (the batch stays first).
  ONNX: ``Transpose(perm=dims)``.
* ``torch.narrow(x, dim, start, length)``: ``x[..., start:start + length, ...]`` along ``dim >= 1``,
  all ints. ONNX: ``Slice(starts=[start], ends=[start + length], axes=[dim])``.
* ``torch.reshape(x, (-1, ...))`` and ``torch.flatten(x, 1)`` (kept from before: the batch stays first and
  the other entries are per sample).

Not handled: anything that moves the batch axis or mixes samples (a reshape whose first entry is not the
batch, a permute with ``dims[0] != 0``), strided slices (``step != 1``), gathers with index tensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

MOVEMENT_FUNCTIONS: tuple[Any, ...] = (torch.permute, torch.narrow)


def permute(x: np.ndarray, dims: Any) -> np.ndarray:
    """The reference form of ``torch.permute``."""
    return np.transpose(x, tuple(int(d) for d in dims))


def narrow(x: np.ndarray, dim: int, start: int, length: int) -> np.ndarray:
    """The reference form of ``torch.narrow``: ``length`` entries of ``dim`` from ``start``."""
    index = [slice(None)] * x.ndim
    index[dim] = slice(start, start + length)
    return x[tuple(index)]


REFERENCE: dict[Any, Any] = {torch.permute: permute, torch.narrow: narrow}
