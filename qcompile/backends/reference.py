"""Reference executor: the integer contract run literally, in int64 numpy.

Simple on purpose: it is the executable spec that the fast executor and onnxruntime are compared with.
Integers travel as int64 numpy arrays between ops. Convolutions and matmuls are computed as float64 GEMMs
of the integer operands and converted back to int64: every product and partial sum is an integer of
magnitude at most the verified accumulator bound (< 2^31, ``ir/verify.py``), far below 2^53, so float64
represents each one exactly and the result is the exact integer sum (``exact_gemm`` asserts the bound).
APoT (shift-add) layers are computed as stored: one sum per ternary plane T_p of the power-of-two terms,
shifted left by p and added (conv(x, K) = sum_p conv(x, T_p) << p). It refuses to run an accumulator that
leaves int32. Every requantization goes through ``requantize_op``, which
applies the op's target: the dyadic form (``contract.requantize``) or the float32 form
(``contract.requantize_f32``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view

from qcompile.ir import contract, movement
from qcompile.ir import intops as ops
from qcompile.ir.contract import IntArray

Kernel = Callable[..., Any]
_KERNELS: dict[type, Kernel] = {}


def kernel(op_type: type) -> Callable[[Kernel], Kernel]:
    def register(fn: Kernel) -> Kernel:
        _KERNELS[op_type] = fn
        return fn

    return register


def _np(t: torch.Tensor) -> IntArray:
    return t.detach().cpu().numpy().astype(np.int64)


def windows(
    x: IntArray, kernel_hw: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
    dilation: tuple[int, int] = (1, 1), pad_value: int = 0, extra: tuple[int, int] = (0, 0),
) -> IntArray:
    """Sliding windows of an NCHW array: returns [N, C, H_out, W_out, kh, kw]."""
    (ph, pw), (eh, ew) = padding, extra
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph + eh), (pw, pw + ew)), constant_values=pad_value)
    span = tuple((k - 1) * d + 1 for k, d in zip(kernel_hw, dilation, strict=True))
    win = sliding_window_view(xp, span, axis=(2, 3))
    win = win[:, :, :: stride[0], :: stride[1], :: dilation[0], :: dilation[1]]
    return np.asarray(win)


@kernel(ops.Quantize)
def _quantize(op: ops.Quantize, x: torch.Tensor) -> IntArray:
    return contract.quantize_input(x.detach().cpu().numpy(), op.scale, op.out.lo, op.out.hi)


@kernel(ops.Dequantize)
def _dequantize(op: ops.Dequantize, q: IntArray) -> torch.Tensor:
    return torch.from_numpy(contract.dequantize(q, op.scale))


_F64_EXACT = 2**53


def exact_gemm(x: IntArray, w: IntArray, gemm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> IntArray:
    """An integer GEMM-shaped sum (conv or matmul) of int64 operands, exactly, via float64.

    sum |x| * |w| over any reduction is at most max|x| * sum|w| per output; below 2^53 every partial sum
    is an exactly representable integer, so the float64 result is the exact sum.
    """
    fan = np.abs(w).reshape(w.shape[0], -1).sum(axis=1).max(initial=0)
    assert int(fan) * int(np.abs(x).max(initial=0)) < _F64_EXACT, "reduction beyond float64's exact integers"
    out = gemm(torch.from_numpy(x.astype(np.float64)), torch.from_numpy(w.astype(np.float64)))
    return out.numpy().astype(np.int64)


def _conv_sum(op: ops.IntConv2d, x: IntArray, w: IntArray) -> IntArray:
    """sum q_x * w over every window (no bias), int64, [N, C_out, H_out, W_out]."""
    return exact_gemm(x, w, lambda xf, wf: F.conv2d(xf, wf, None, op.stride, op.padding, op.dilation, op.groups))


def _matmul(x: IntArray, w: IntArray) -> IntArray:
    """x @ w.T, exactly (w: [out, in])."""
    return exact_gemm(x, w, lambda xf, wf: xf @ wf.T)


def requantize_op(op: Any, acc: IntArray, shape: tuple[int, ...] = (-1,)) -> IntArray:
    """The op's requantization of ``acc`` under its target; per-channel parameters reshaped to ``shape``."""
    if op.target is contract.Target.ORT:
        fmult = op.fmult.detach().cpu().numpy().astype(np.float32).reshape(shape)
        return contract.requantize_f32(acc, fmult, op.lo, op.hi)
    return contract.requantize(acc, _np(op.mult).reshape(shape), _np(op.shift).reshape(shape), op.lo, op.hi)


def _requant_conv(op: ops.IntConv2d, acc: IntArray) -> IntArray:
    acc = acc + _np(op.bias)[None, :, None, None]
    return requantize_op(op, acc, (1, -1, 1, 1))


def shift_add(op: ops.IntShiftConv2d | ops.IntShiftLinear, dot: Callable[[IntArray], IntArray]) -> IntArray:
    """sum_p dot(T_p) << p over the ternary planes T_p of an APoT op: additions of shifted sums only."""
    planes = op.planes() or [(0, torch.zeros_like(op.weight))]  # all-zero weights: one empty plane
    acc = [np.left_shift(dot(_np(plane)), p) for p, plane in planes]
    return np.sum(acc, axis=0)


@kernel(ops.IntConv2d)
def _conv(op: ops.IntConv2d, x: IntArray) -> IntArray:
    return _requant_conv(op, _conv_sum(op, x, _np(op.weight)))


@kernel(ops.IntShiftConv2d)
def _shift_conv(op: ops.IntShiftConv2d, x: IntArray) -> IntArray:
    return _requant_conv(op, shift_add(op, lambda t: _conv_sum(op, x, t)))


@kernel(ops.IntLinear)
def _linear(op: ops.IntLinear, x: IntArray) -> IntArray:
    acc = _matmul(x, _np(op.weight)) + _np(op.bias)
    return requantize_op(op, acc)


@kernel(ops.IntShiftLinear)
def _shift_linear(op: ops.IntShiftLinear, x: IntArray) -> IntArray:
    acc = shift_add(op, lambda t: _matmul(x, t)) + _np(op.bias)
    return requantize_op(op, acc)


@kernel(ops.IntAdd)
def _add(op: ops.IntAdd, a: IntArray, b: IntArray) -> IntArray:
    return requantize_op(op, a + b)


@kernel(ops.IntAvgPool2d)
def _avgpool(op: ops.IntAvgPool2d, x: IntArray) -> IntArray:
    acc = windows(x, op.kernel, op.stride, op.padding).sum(axis=(-2, -1))
    return requantize_op(op, acc)


def pool_extra(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """Right padding that PyTorch's ceil_mode adds beyond ``p`` (0 without ceil_mode)."""
    span = d * (k - 1) + 1
    num = size + 2 * p - span
    out = (-(-num // s) if ceil_mode else num // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return max(0, (out - 1) * s + span - (size + 2 * p))


@kernel(ops.IntMaxPool2d)
def _maxpool(op: ops.IntMaxPool2d, x: IntArray) -> IntArray:
    extra_h, extra_w = (
        pool_extra(x.shape[2 + i], op.kernel[i], op.stride[i], op.padding[i], op.dilation[i], op.ceil_mode)
        for i in range(2)
    )
    low = np.iinfo(np.int64).min
    win = windows(x, op.kernel, op.stride, op.padding, op.dilation, pad_value=low, extra=(extra_h, extra_w))
    return win.max(axis=(-2, -1))


@kernel(ops.IntClamp)
def _clamp(op: ops.IntClamp, x: IntArray) -> IntArray:
    return np.clip(x, op.lo, op.hi)


class ReferenceExecutor(fx.Interpreter):
    """Runs an integer-stage GraphModule with the reference kernels (numpy int64 between ops)."""

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        op = self.fetch_attr(target)
        fn = _KERNELS.get(type(op))
        if fn is None:
            raise TypeError(f"no reference kernel for {type(op).__name__} at {target!r}")
        return fn(op, *args, **kwargs)

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if target is torch.flatten:
            x, *rest = args
            start = rest[0] if rest else kwargs.get("start_dim", 0)
            return x.reshape(*x.shape[:start], -1)
        if target is torch.reshape:
            return args[0].reshape(args[1])
        if target is torch.cat:
            return np.concatenate(args[0], axis=kwargs.get("dim", args[1] if len(args) > 1 else 0))
        if target in movement.REFERENCE:
            return movement.REFERENCE[target](*args)
        raise TypeError(f"function {target} is not part of the integer dialect")


def run_reference(gm: fx.GraphModule, *inputs: torch.Tensor) -> Any:
    """Execute ``gm`` exactly; float tensors in, float tensors (dequantized outputs) out."""
    with torch.no_grad():
        return ReferenceExecutor(gm).run(*inputs)


@kernel(ops.IntLookup)
def _lookup(op: ops.IntLookup, x: IntArray) -> IntArray:
    if x.size and (x.min() < op.inp.lo or x.max() > op.inp.hi):
        raise ValueError(f"lookup input outside its type {op.inp}")
    table = _np(op.table)
    if table.ndim == 1:
        return table[x - op.inp.lo]
    channel = np.arange(table.shape[0]).reshape(1, -1, *[1] * (x.ndim - 2))
    return table[channel, x - op.inp.lo]


@kernel(ops.IntMul)
def _mul(op: ops.IntMul, a: IntArray, b: IntArray) -> IntArray:
    return requantize_op(op, np.multiply(a, b), (1,))


def _per_axis(values: IntArray, ndim: int, axis: int) -> IntArray:
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


@kernel(ops.IntLayerNorm)
def _layernorm(op: ops.IntLayerNorm, x: IntArray) -> IntArray:
    q = np.asarray(x, dtype=np.int64)
    d = op.size * q - q.sum(axis=op.axis, keepdims=True)
    big = np.maximum(((d * d).sum(axis=op.axis, keepdims=True) + op.eps_q) << (2 * op.p), 1)
    s = np.full_like(big, op.y0)
    for _ in range(op.steps):  # integer Newton from above: s stays >= isqrt(big) >= 1
        s = np.minimum(s, (s + big // s) >> 1)
    n = np.sign(d) * (((np.abs(d) << (op.p + op.k + 1)) + s) // (2 * s))
    acc = n * _per_axis(_np(op.gamma), q.ndim, op.axis) + _per_axis(_np(op.beta), q.ndim, op.axis)
    return requantize_op(op, acc)


def run_kernel(op: ops.IntOp, *args: IntArray) -> IntArray:
    """One op's reference kernel on int64 arrays (tests compare it with independent math)."""
    return _KERNELS[type(op)](op, *args)


@kernel(ops.IntSoftmax)
def _softmax(op: ops.IntSoftmax, x: IntArray) -> IntArray:
    q = np.asarray(x, dtype=np.int64)
    e = _np(op.etab)[q.max(axis=op.axis, keepdims=True) - q]
    s = e.sum(axis=op.axis, keepdims=True)
    return np.clip((2 * e * op.c + (s << op.frac)) // (s << (op.frac + 1)), op.lo, op.hi)


@kernel(ops.IntMatMul)
def _matmul_act(op: ops.IntMatMul, a: IntArray, b: IntArray) -> IntArray:
    """int64 matmul (exact: the verifier bounds every partial sum by 2^31 - 1), scalar requantization."""
    return requantize_op(op, np.matmul(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)), (1,))


@kernel(ops.IntConstCat)
def _const_cat(op: ops.IntConstCat, x: IntArray) -> IntArray:
    c = np.broadcast_to(_np(op.value)[None], (x.shape[0], *op.value.shape))
    return np.concatenate((c, x) if op.first else (x, c), axis=op.dim)
