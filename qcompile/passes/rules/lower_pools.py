"""lower-integer rule for average pools whose divisor varies per window: ``IntAvgPoolTable``.

PyTorch's average pool (``aten::avg_pool2d``) along one axis of size L, with kernel k, stride s, padding p,
for output i: start = i s - p, end = min(start + k, L + p); the window covers [max(start, 0), min(end, L))
of the input, and divides by (end - start) per axis with count_include_pad (by the covered length without
it; by ``divisor_override`` when given). ceil_mode only adds outputs (the output size comes from the shape
run). Adaptive pooling to n bins: bin i covers [floor(i L / n), ceil((i + 1) L / n)) and divides by its
length. The divisor of output (i, j) is the product of the two axes' divisors, and
M[i, j] = s_x / (d[i, j] s_y).

Bilinear upsampling (nn.Upsample(mode="bilinear")) is the same op with integer weights: per axis, output i
weighs two neighbours by 1 - frac and frac of PyTorch's source coordinate, scaled to integers by their
common denominator D (2 s for a factor s without align_corners), and d[i, j] = D_h D_w; the result is the
exactly rounded weighted average, requantized like a pool.

A pool whose every window is a full k x k one (no ceil_mode overhang, count_include_pad or no padding, no
override) keeps the plain ``IntAvgPool2d`` (one multiplier, onnxruntime's fused kernel); canonicalize has
already turned adaptive pools to 1 x 1 or to a divisor of the input into those, and identities away.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np
from torch import nn

from qcompile.ir import intops as ops
from qcompile.ir.meta import IntType, get_info
from qcompile.ir.rewrite import input_node
from qcompile.ir.shapes import pair

if TYPE_CHECKING:
    import torch.fx as fx

    from qcompile.passes.lower_integer import Value, _Lowering

Axis = tuple[np.ndarray, np.ndarray]  # (membership [n_out, L], divisor [n_out])


def pool_axis(size: int, n_out: int, k: int, s: int, p: int, include_pad: bool) -> Axis:
    """Window membership and divisors of an average pool along one axis (see the module docstring)."""
    member = np.zeros((n_out, size), dtype=np.int64)
    divisor = np.zeros(n_out, dtype=np.int64)
    for i in range(n_out):
        start, end = i * s - p, min(i * s - p + k, size + p)
        lo, hi = max(start, 0), min(end, size)
        member[i, lo:hi] = 1
        divisor[i] = end - start if include_pad else hi - lo
    return member, divisor


def adaptive_axis(size: int, n_out: int) -> Axis:
    member = np.zeros((n_out, size), dtype=np.int64)
    for i in range(n_out):
        member[i, (i * size) // n_out: -(-((i + 1) * size) // n_out)] = 1
    return member, member.sum(axis=1)


def bilinear_axis(size: int, n_out: int, align_corners: bool) -> Axis:
    """Integer weights of linear interpolation along one axis (PyTorch's source coordinates, exact rationals):
    output i reads src = i (L - 1) / (n - 1) with align_corners, else max(0, (i + 1/2) L / n - 1/2), and
    weighs floor(src) by 1 - frac, the next index (clamped) by frac; all weights over one common denominator."""
    srcs = []
    for i in range(n_out):
        if align_corners:
            src = Fraction(i * (size - 1), max(n_out - 1, 1))
        else:
            src = max(Fraction(0), Fraction(2 * i + 1, 2) * Fraction(size, n_out) - Fraction(1, 2))
        srcs.append(src)
    denominator = math.lcm(*(s.denominator for s in srcs))
    member = np.zeros((n_out, size), dtype=np.int64)
    for i, src in enumerate(srcs):
        i0 = min(math.floor(src), size - 1)
        frac = src - i0
        member[i, i0] += int((1 - frac) * denominator)
        member[i, min(i0 + 1, size - 1)] += int(frac * denominator)
    return member, np.full(n_out, denominator, dtype=np.int64)


def _axes(pool: nn.Module, in_hw: tuple[int, int],
          out_hw: tuple[int, int]) -> tuple[Axis, Axis, int | None]:
    if isinstance(pool, nn.AdaptiveAvgPool2d):
        return adaptive_axis(in_hw[0], out_hw[0]), adaptive_axis(in_hw[1], out_hw[1]), None
    if isinstance(pool, nn.Upsample):
        corners = bool(pool.align_corners)
        return bilinear_axis(in_hw[0], out_hw[0], corners), bilinear_axis(in_hw[1], out_hw[1], corners), None
    assert isinstance(pool, nn.AvgPool2d)
    k, s, p = pair(pool.kernel_size), pair(pool.stride), pair(pool.padding)
    axes = [pool_axis(in_hw[a], out_hw[a], k[a], s[a], p[a], bool(pool.count_include_pad)) for a in range(2)]
    return axes[0], axes[1], pool.divisor_override


def is_regular(pool: nn.Module, in_hw: tuple[int, int], out_hw: tuple[int, int]) -> bool:
    """Whether the plain IntAvgPool2d computes this pool (every window full, one divisor)."""
    if isinstance(pool, nn.Upsample):
        return False
    if isinstance(pool, nn.AdaptiveAvgPool2d):
        return out_hw == (1, 1)
    assert isinstance(pool, nn.AvgPool2d)
    k, s, p = pair(pool.kernel_size), pair(pool.stride), pair(pool.padding)
    floor_out = tuple((in_hw[a] + 2 * p[a] - k[a]) // s[a] + 1 for a in range(2))
    return floor_out == out_hw and pool.divisor_override is None and (bool(pool.count_include_pad) or p == (0, 0))


def lower_pool_table(lw: _Lowering, point: fx.Node, pool: nn.Module, out: IntType,
                     s_y: float, bounds: tuple[int, int]) -> Value | None:
    """IntAvgPoolTable for an irregular pool; None when the plain IntAvgPool2d applies."""
    src = input_node(point)
    in_shape, out_shape = get_info(src).shape, get_info(point).shape
    assert in_shape is not None and out_shape is not None, f"'{point.name}' has no recorded shapes"
    in_hw, out_hw = (in_shape[2], in_shape[3]), (out_shape[2], out_shape[3])
    if is_regular(pool, in_hw, out_hw):
        return None
    x = lw.value(src)
    (rows, d_h), (cols, d_w), override = _axes(pool, in_hw, out_hw)
    divisor = np.full(out_hw, override, dtype=np.float64) if override else np.outer(d_h, d_w).astype(np.float64)
    op = ops.IntAvgPoolTable(rows, cols, **lw.requant(x.scale / (divisor * s_y)), inp=x.itype, out=out,
                             lo=bounds[0], hi=bounds[1])
    return lw.emit(point.name, op, (x.node,), out, s_y, point)
