"""Fast executor: the integer contract at float speed.

Between ops, integers travel as float32 tensors holding exact integer values (every supported type
fits in 17 bits). Convolutions and matmuls run as float GEMMs: the accumulator bound proven by the
integer verifier, B = max_c (sum |w_c| * max|q_x| + |b_c|), keeps every partial sum an exact integer
when B < 2^24, so such ops run as one float32 GEMM. Larger bounds split the reduction over input
channels into chunks that each stay below 2^24 (float32 GEMMs, summed exactly in float64); float64
GEMMs remain only where no split exists (grouped convs, a single channel above the bound).
Requantization and clamps run in int64 exactly as ``contract.requantize`` (``integer`` target), or as one
float32 multiply and round-half-even exactly as ``contract.requantize_f32`` (``ort`` target). Results are bit-identical
to the reference executor; the tests check this on random graphs. APoT (shift-add) layers run the same
GEMMs on their combined codes q_w = sum_i s_i 2^(e_i): the same integers as the reference's shift-adds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from qcompile.ir import intops as ops
from qcompile.ir.contract import Target
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
    """max over output channels of sum|w| * max|q_x| + |bias|: no partial sum can exceed it.

    Exact: the row sums of |w| (int32 values, fan-in < 2^32) fit int64; the products and the bias are
    Python ints, so a saturated or huge bias can only make the bound larger, never wrap it.
    """
    w = op.weight.to(torch.int64).abs().reshape(op.weight.shape[0], -1)
    if w.shape[1] >= 2**32:
        raise OverflowError(f"fan-in {w.shape[1]} too large for an exact bound")
    xmax = max(abs(op.inp.lo), abs(op.inp.hi))
    rows = [int(s) * xmax for s in w.sum(dim=1).tolist()]
    bias = [abs(int(b)) for b in op.bias.reshape(-1).tolist()]
    if len(bias) != len(rows):  # a malformed op (the verifier names it): a looser bound, still sound
        return max(rows, default=0) + max(bias, default=0)
    return max((r + b for r, b in zip(rows, bias, strict=True)), default=0)


def _requant(acc: torch.Tensor, op: Any, channel_dim: int) -> torch.Tensor:
    """The op's requantization under its target (``contract``), on exact integer values held as floats."""
    shape = [1] * acc.dim()
    if op.mult.numel() > 1:
        shape[channel_dim] = -1
    if op.target is Target.ORT:  # float32(acc): IEEE round to nearest even, as int32 -> float32
        v = acc.to(torch.float32).mul_(op.fmult.view(shape))
        return v.round_().clamp_(op.lo, op.hi)
    out = acc.to(torch.int64)
    out.mul_(op.mult.view(shape))
    shift = op.shift.view(shape)
    if bool((op.shift == op.shift.flatten()[0]).all()):
        n = int(op.shift.flatten()[0])
        out.add_(1 << (n - 1)).bitwise_right_shift_(n)
    else:
        out.add_(torch.bitwise_left_shift(torch.ones_like(shift), shift - 1)).bitwise_right_shift_(shift)
    return out.clamp_(op.lo, op.hi).to(torch.float32)


@dataclass(frozen=True)
class GemmPlan:
    """How one conv/linear computes its accumulators exactly with float GEMMs.

    ``chunks`` split the input channels so that every chunk's partial sums stay below 2^24 and run in
    float32; with several chunks the exact float32 results are added in float64 (exact below 2^53).
    ``dtype`` is float64 only when no such split exists (grouped convs, or one channel alone too large).
    """

    dtype: torch.dtype
    chunks: tuple[slice, ...]
    weights: tuple[torch.Tensor, ...]
    bias: torch.Tensor
    bias_inside: bool  # the single float32 GEMM adds the bias itself (its bound includes the bias)


def _channel_chunks(op: ops.IntConv2d | ops.IntLinear) -> list[slice] | None:
    """Greedy input-channel chunks whose per-output-channel bound sum|w| * max|q_x| stays below 2^24.

    With c[o, j] = max|q_x| * sum|w[o, j]| >= 0 and the exclusive prefix sums P[o, k] = sum_{j<k} c[o, j]
    (non-decreasing in k), a chunk starting at column s may take columns s..e-1 iff P[o, e] - P[o, s] < 2^24
    for every o; the greedy end e is the smallest index where some row reaches 2^24, found per row by a
    binary search (``searchsorted``) and minimised over rows: one vectorised step per chunk, not per column.
    None when a single column alone reaches 2^24 (no float32 split exists), or for grouped convs.
    """
    if isinstance(op, ops.IntConv2d) and op.groups != 1:
        return None
    w = op.weight.to(torch.int64).abs()
    columns = (w.sum(dim=(2, 3)) if w.dim() == 4 else w) * max(abs(op.inp.lo), abs(op.inp.hi))
    prefix = F.pad(columns.cumsum_(dim=1), (1, 0))  # P[o, k], k = 0..n
    n, chunks, start = columns.shape[1], [], 0
    while start < n:
        target = (prefix[:, start] + _F32_EXACT).unsqueeze(1).contiguous()
        stop = int(torch.searchsorted(prefix, target).min()) - 1  # first k with P[o, k] >= target, less one
        if stop <= start:
            return None
        chunks.append(slice(start, stop))
        start = stop
    return chunks


def _make_plan(op: ops.IntConv2d | ops.IntLinear) -> GemmPlan:
    if accumulator_bound(op) < _F32_EXACT:
        return GemmPlan(torch.float32, (slice(None),), (op.weight.float(),), op.bias.float(), True)
    chunks = _channel_chunks(op)
    if chunks is None:
        return GemmPlan(torch.float64, (slice(None),), (op.weight.double(),), op.bias.double(), True)
    weights = tuple(op.weight[:, c].float().contiguous() for c in chunks)
    return GemmPlan(torch.float32, tuple(chunks), weights, op.bias.double(), False)


def gemm_plan(op: ops.IntConv2d | ops.IntLinear) -> GemmPlan:
    plan = getattr(op, "_fast_plan", None)
    if plan is None:
        plan = _make_plan(op)
        # derived once from immutable integer weights; torch types Module.__setattr__ values as Tensor | Module
        op._fast_plan = plan  # type: ignore[assignment]
    return plan


def _accumulate(plan: GemmPlan, x: torch.Tensor, gemm: Callable[..., torch.Tensor], channel_dim: int) -> torch.Tensor:
    if plan.bias_inside:
        return gemm(x.to(plan.dtype), plan.weights[0], plan.bias)
    acc: torch.Tensor | None = None
    for chunk, w in zip(plan.chunks, plan.weights, strict=True):
        part = gemm(x.narrow(channel_dim, chunk.start, chunk.stop - chunk.start), w, None).double()
        acc = part if acc is None else acc.add_(part)
    assert acc is not None
    shape = [1] * acc.dim()
    shape[channel_dim] = -1
    return acc.add_(plan.bias.view(shape))


@_kernel(ops.Quantize)
def _quantize(op: ops.Quantize, x: torch.Tensor) -> torch.Tensor:
    q = torch.round(x.to(torch.float32) / torch.tensor(op.scale, dtype=torch.float32))
    return q.clamp_(op.out.lo, op.out.hi)


@_kernel(ops.Dequantize)
def _dequantize(op: ops.Dequantize, q: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) * torch.tensor(op.scale, dtype=torch.float32)


def conv_accumulator(op: ops.IntConv2d, x: torch.Tensor) -> torch.Tensor:
    """The exact int32 accumulators (bias included) of an integer convolution, as a float tensor."""

    def conv(xc: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(xc, w, b, op.stride, op.padding, op.dilation, op.groups)

    return _accumulate(gemm_plan(op), x, conv, 1)


@_kernel(ops.IntShiftConv2d)
@_kernel(ops.IntConv2d)
def _conv(op: ops.IntConv2d, x: torch.Tensor) -> torch.Tensor:
    return _requant(conv_accumulator(op, x), op, 1)


@_kernel(ops.IntShiftLinear)
@_kernel(ops.IntLinear)
def _linear(op: ops.IntLinear, x: torch.Tensor) -> torch.Tensor:
    acc = _accumulate(gemm_plan(op), x, F.linear, x.dim() - 1)
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

    Requantization is monotone non-decreasing per channel on both targets (m > 0 with floor, or float32
    conversion, a positive float32 multiply and round-half-even; clamps are monotone too), so
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
    from qcompile.ir.rewrite import shallow_copy

    fast = shallow_copy(gm)
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


@_kernel(ops.IntLookup)
def _lookup(op: ops.IntLookup, x: torch.Tensor) -> torch.Tensor:
    table = getattr(op, "_fast_table", None)
    if table is None:
        table = op.table.to(torch.float32)
        op._fast_table = table  # type: ignore[assignment]  # derived once from the immutable table
    if table.dim() == 1:
        return table[(x - op.inp.lo).long()]
    channels, width = table.shape
    offsets = (torch.arange(channels) * width).view(1, -1, *[1] * (x.dim() - 2))
    return table.reshape(-1)[(x - op.inp.lo).long() + offsets]


@_kernel(ops.IntMul)
def _mul(op: ops.IntMul, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dtype = torch.float32 if op.bound < _F32_EXACT else torch.float64  # exact products
    return _requant(a.to(dtype) * b.to(dtype), op, 1)


@_kernel(ops.IntLayerNorm)
def _layernorm(op: ops.IntLayerNorm, x: torch.Tensor) -> torch.Tensor:
    q = x.to(torch.int64)
    d = op.size * q - q.sum(dim=op.axis, keepdim=True)
    big = ((d * d).sum(dim=op.axis, keepdim=True) + op.eps_q).bitwise_left_shift_(2 * op.p).clamp_(min=1)
    s = torch.full_like(big, op.y0)
    for _ in range(op.steps):
        s = torch.minimum(s, (s + big // s).bitwise_right_shift_(1))
    n = d.sign() * ((d.abs().bitwise_left_shift_(op.p + op.k + 1) + s) // (2 * s))
    shape = [1] * q.dim()
    shape[op.axis] = -1
    acc = n * op.gamma.view(shape) + op.beta.view(shape)
    return _requant(acc, op, 1)


@_kernel(ops.IntSoftmax)
def _softmax(op: ops.IntSoftmax, x: torch.Tensor) -> torch.Tensor:
    q = x.to(torch.int64)
    e = op.etab[q.amax(dim=op.axis, keepdim=True) - q]
    s = e.sum(dim=op.axis, keepdim=True)
    return ((2 * op.c * e + (s << op.frac)) // (s << (op.frac + 1))).clamp_(op.lo, op.hi).to(torch.float32)


@_kernel(ops.IntMatMul)
def _matmul_act(op: ops.IntMatMul, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A float32 batched GEMM when K max|q_a| max|q_b| < 2^24 (every partial sum exact), float64 otherwise
    (exact too: the verifier keeps every partial sum below 2^31)."""
    dtype = torch.float32 if op.bound < _F32_EXACT else torch.float64
    return _requant(torch.matmul(a.to(dtype), b.to(dtype)), op, 1)


@_kernel(ops.IntConstCat)
def _const_cat(op: ops.IntConstCat, x: torch.Tensor) -> torch.Tensor:
    c = op.value.to(x.dtype).unsqueeze(0).expand(x.shape[0], *op.value.shape)
    return torch.cat((c, x) if op.first else (x, c), dim=op.dim)
