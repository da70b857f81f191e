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
* ``dilate_pad(x, (sh, sw), (top, left, bottom, right))``: zero insertion then zero padding of NCHW, the
  input side of a transposed convolution (``passes/rules/canonical_transposed.py``): y[n, c, top + sh i,
  left + sw j] = x[n, c, i, j], every other entry 0, y of size (sh (H - 1) + 1 + top + bottom) x (sw (W - 1)
  + 1 + left + right); a negative pad crops that side instead. The inserted value is the integer 0, which
  is the real 0 on every scale (the contract's zero point is 0). ONNX: the uint8 container holds q + zp
  (zp = 128 for signed types), so the export inserts and pads the value zp: ``Reshape`` to [N, C, H, 1,
  W, 1], ``Pad`` with zp to [N, C, H, sh, W, sw], ``Reshape`` to [N, C, H sh, W sw], ``Slice`` off the
  last sh - 1 rows and sw - 1 columns, ``Pad`` (negative pads crop) with zp.
* ``torch.reshape(x, (-1, ...))`` and ``torch.flatten(x, 1)`` (kept from before: the batch stays first and
  the other entries are per sample). Axis 0 may hold the batch times a per-sample factor, the batch
  outermost (MobileViT's [N P, L, C] tokens): a row-major reshape between two such layouts moves no
  element across samples, so ``(-1, ...)`` is exact at every batch (``passes/rules/batch_fold.py``).

Not handled: anything that moves the batch axis or mixes samples (a reshape that puts the batch anywhere
but outermost in axis 0, as a seq-first [L, N, E] layout does, a permute with ``dims[0] != 0``), strided
slices (``step != 1``), gathers with index tensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def upsample_nearest(x: torch.Tensor, factors: tuple[int, int]) -> torch.Tensor:
    """Every pixel of an NCHW tensor repeated ``factors[0]`` x ``factors[1]`` times (any integer values)."""
    return x.repeat_interleave(int(factors[0]), dim=2).repeat_interleave(int(factors[1]), dim=3)


def _crop_pad(x: torch.Tensor | np.ndarray, pads: Any) -> Any:
    """Zero-pad (or, for negative pads, crop) the last two axes by (top, left, bottom, right)."""
    top, left, bottom, right = (int(p) for p in pads)
    h, w = x.shape[-2], x.shape[-1]
    x = x[..., max(0, -top):h - max(0, -bottom), max(0, -left):w - max(0, -right)]
    widths = (max(0, top), max(0, bottom), max(0, left), max(0, right))
    if isinstance(x, torch.Tensor):
        return torch.nn.functional.pad(x, (widths[2], widths[3], widths[0], widths[1]))
    return np.pad(x, [(0, 0)] * (x.ndim - 2) + [widths[:2], widths[2:]])


def dilate_pad(x: torch.Tensor, stride: tuple[int, int], pads: tuple[int, int, int, int]) -> torch.Tensor:
    """Zeros inserted between the pixels of NCHW (``stride - 1`` per gap), then zero padding (see above)."""
    n, c, h, w = x.shape
    sh, sw = int(stride[0]), int(stride[1])
    y = x.new_zeros((n, c, sh * (h - 1) + 1, sw * (w - 1) + 1))
    y[:, :, ::sh, ::sw] = x
    return _crop_pad(y, pads)  # type: ignore[no-any-return]


def dilate_settings(args: Any) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """(stride, pads) of a ``dilate_pad`` call's arguments, as ints."""
    (sh, sw), (top, left, bottom, right) = args[1], args[2]
    return (int(sh), int(sw)), (int(top), int(left), int(bottom), int(right))


MOVEMENT_FUNCTIONS: tuple[Any, ...] = (torch.permute, torch.narrow, upsample_nearest, dilate_pad)


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


def dilate(x: np.ndarray, stride: Any, pads: Any) -> np.ndarray:
    """The reference form of ``dilate_pad``."""
    n, c, h, w = x.shape
    sh, sw = int(stride[0]), int(stride[1])
    y = np.zeros((n, c, sh * (h - 1) + 1, sw * (w - 1) + 1), dtype=x.dtype)
    y[:, :, ::sh, ::sw] = x
    return _crop_pad(y, pads)  # type: ignore[no-any-return]


REFERENCE: dict[Any, Any] = {torch.permute: permute, torch.narrow: narrow, upsample_nearest: upsample,
                             dilate_pad: dilate}
