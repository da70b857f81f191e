"""Fast executor: the integer contract at float speed.

Between ops, integers travel as float32 tensors holding exact integer values (every supported type
fits in 17 bits). Convolutions and matmuls run as float GEMMs: the accumulator bound proven by the
integer verifier, B = max_c (sum |w_c| * max|q_x| + |b_c|), keeps every partial sum an exact integer
when B < 2^24 (float32) or B < 2^53 (float64), so the choice of precision is made per op from B.
Requantization and clamps run in int64 exactly as ``contract.requantize``. Results are bit-identical
to the reference executor; the tests check this on random graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from qcompile.ir import intops as ops

_F32_EXACT = 2**24
_KERNELS: dict[type, Callable[..., torch.Tensor]] = {}


def _kernel(op_type: type) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    def register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        _KERNELS[op_type] = fn
        return fn

    return register


def run_op(op: ops.IntOp, *args: torch.Tensor) -> torch.Tensor:
    return _KERNELS[type(op)](op, *args)


def accumulator_bound(op: ops.IntConv2d | ops.IntLinear) -> int:
    """max over output channels of sum|w| * max|q_x| + |bias|: no partial sum can exceed it."""
    w = op.weight.to(torch.int64).abs().reshape(op.weight.shape[0], -1).sum(dim=1)
    xmax = max(abs(op.inp.lo), abs(op.inp.hi))
    return int((w * xmax + op.bias.abs()).max())


def _requant(acc: torch.Tensor, op: Any, channel_dim: int) -> torch.Tensor:
    shape = [1] * acc.dim()
    if op.mult.numel() > 1:
        shape[channel_dim] = -1
    m, n = op.mult.view(shape), op.shift.view(shape)
    out = (acc.to(torch.int64) * m + (1 << (n - 1))) >> n
    return out.clamp_(op.lo, op.hi).to(torch.float32)


def _compute_dtype(op: ops.IntConv2d | ops.IntLinear) -> torch.dtype:
    cached = getattr(op, "_fast_dtype", None)
    if cached is None:
        cached = torch.float32 if accumulator_bound(op) < _F32_EXACT else torch.float64
        op._fast_dtype = cached  # derived once from immutable integer weights
    return cached


def _float_weight(op: Any, dtype: torch.dtype) -> torch.Tensor:
    key = f"_fast_w_{dtype}"
    w = getattr(op, key, None)
    if w is None:
        w = op.weight.to(dtype)
        setattr(op, key, w)
    return w


@_kernel(ops.Quantize)
def _quantize(op: ops.Quantize, x: torch.Tensor) -> torch.Tensor:
    q = torch.round(x.to(torch.float32) / torch.tensor(op.scale, dtype=torch.float32))
    return q.clamp_(op.out.lo, op.out.hi)


@_kernel(ops.Dequantize)
def _dequantize(op: ops.Dequantize, q: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) * torch.tensor(op.scale, dtype=torch.float32)


@_kernel(ops.IntConv2d)
def _conv(op: ops.IntConv2d, x: torch.Tensor) -> torch.Tensor:
    dtype = _compute_dtype(op)
    acc = F.conv2d(x.to(dtype), _float_weight(op, dtype), None, op.stride, op.padding, op.dilation, op.groups)
    acc = acc.to(torch.int64) + op.bias.view(1, -1, 1, 1)
    return _requant(acc, op, 1)


@_kernel(ops.IntLinear)
def _linear(op: ops.IntLinear, x: torch.Tensor) -> torch.Tensor:
    dtype = _compute_dtype(op)
    acc = F.linear(x.to(dtype), _float_weight(op, dtype)).to(torch.int64) + op.bias
    return _requant(acc, op, acc.dim() - 1)


@_kernel(ops.IntAdd)
def _add(op: ops.IntAdd, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return _requant(a + b, op, 1)


@_kernel(ops.IntAvgPool2d)
def _avgpool(op: ops.IntAvgPool2d, x: torch.Tensor) -> torch.Tensor:
    k = op.kernel[0] * op.kernel[1]
    dtype = torch.float32 if k * max(abs(op.inp.lo), op.inp.hi) < _F32_EXACT else torch.float64
    total = F.avg_pool2d(x.to(dtype), op.kernel, op.stride, op.padding, divisor_override=1)
    return _requant(total, op, 1)


@_kernel(ops.IntMaxPool2d)
def _maxpool(op: ops.IntMaxPool2d, x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, op.kernel, op.stride, op.padding, op.dilation, ceil_mode=op.ceil_mode)


@_kernel(ops.IntClamp)
def _clamp(op: ops.IntClamp, x: torch.Tensor) -> torch.Tensor:
    return x.clamp(op.lo, op.hi)
