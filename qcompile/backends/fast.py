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
from qcompile.ir.rewrite import input_node

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
    """``clamp((acc * m + 2^(n-1)) >> n)`` in int64, in place, with scalar m/n/rounding where they allow."""
    out = acc.to(torch.int64)
    shape = [1] * acc.dim()
    if op.mult.numel() > 1:
        shape[channel_dim] = -1
    out.mul_(op.mult.view(shape))
    shift = op.shift.view(shape)
    if bool((op.shift == op.shift.flatten()[0]).all()):
        n = int(op.shift.flatten()[0])
        out.add_(1 << (n - 1)).bitwise_right_shift_(n)
    else:
        out.add_(torch.bitwise_left_shift(torch.ones_like(shift), shift - 1)).bitwise_right_shift_(shift)
    return out.clamp_(op.lo, op.hi).to(torch.float32)


def _compute_dtype(op: ops.IntConv2d | ops.IntLinear) -> torch.dtype:
    cached = getattr(op, "_fast_dtype", None)
    if cached is None:
        cached = torch.float32 if accumulator_bound(op) < _F32_EXACT else torch.float64
        # derived once from immutable integer weights; torch types Module.__setattr__ values as Tensor | Module
        op._fast_dtype = cached  # type: ignore[assignment]
    return cached


def _float_params(op: Any, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias as float tensors (exact: both are integers within the accumulator bound)."""
    key = f"_fast_params_{dtype}"
    params = getattr(op, key, None)
    if params is None:
        params = (op.weight.to(dtype), op.bias.to(dtype))
        setattr(op, key, params)
    return params


@_kernel(ops.Quantize)
def _quantize(op: ops.Quantize, x: torch.Tensor) -> torch.Tensor:
    q = torch.round(x.to(torch.float32) / torch.tensor(op.scale, dtype=torch.float32))
    return q.clamp_(op.out.lo, op.out.hi)


@_kernel(ops.Dequantize)
def _dequantize(op: ops.Dequantize, q: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) * torch.tensor(op.scale, dtype=torch.float32)


def conv_accumulator(op: ops.IntConv2d, x: torch.Tensor) -> torch.Tensor:
    """The exact int32 accumulators (bias included) of an integer convolution, as a float tensor."""
    dtype = _compute_dtype(op)
    w, b = _float_params(op, dtype)
    return F.conv2d(x.to(dtype), w, b, op.stride, op.padding, op.dilation, op.groups)


@_kernel(ops.IntConv2d)
def _conv(op: ops.IntConv2d, x: torch.Tensor) -> torch.Tensor:
    return _requant(conv_accumulator(op, x), op, 1)


@_kernel(ops.IntLinear)
def _linear(op: ops.IntLinear, x: torch.Tensor) -> torch.Tensor:
    dtype = _compute_dtype(op)
    w, b = _float_params(op, dtype)
    acc = F.linear(x.to(dtype), w, b)
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


class ConvMaxPool(torch.nn.Module):
    """IntConv2d then IntMaxPool2d, pooling the accumulators before requantizing.

    Requantization is monotone non-decreasing per channel (m > 0, floor and clamp are monotone), so
    max(rq(acc)) = rq(max(acc)) over every window: the same integers with a quarter of the requantization
    work for a 2x2 pool.
    """

    def __init__(self, conv: ops.IntConv2d, pool: ops.IntMaxPool2d) -> None:
        super().__init__()
        self.conv, self.pool = conv, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _requant(_maxpool(self.pool, conv_accumulator(self.conv, x)), self.conv, 1)


def plan(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of an integer graph with the fast executor's fusions (same results, less work)."""
    import copy

    fast = copy.deepcopy(gm)
    for node in list(fast.graph.nodes):
        pool = fast.get_submodule(str(node.target)) if node.op == "call_module" else None
        if not isinstance(pool, ops.IntMaxPool2d):
            continue
        src = input_node(node)
        conv = fast.get_submodule(str(src.target)) if src.op == "call_module" else None
        if not isinstance(conv, ops.IntConv2d) or len(src.users) != 1:
            continue
        name = f"{src.target}_pooled"
        fast.add_submodule(name, ConvMaxPool(conv, pool))
        with fast.graph.inserting_before(node):
            fused = fast.graph.call_module(name, src.args)
        fused.meta.update(node.meta)
        node.replace_all_uses_with(fused)
        fast.graph.erase_node(node)
        fast.graph.erase_node(src)
    fast.delete_all_unused_submodules()
    fast.recompile()
    return fast


@_kernel(ops.IntClamp)
def _clamp(op: ops.IntClamp, x: torch.Tensor) -> torch.Tensor:
    return x.clamp(op.lo, op.hi)
