"""Kernels and ONNX emitters of ``IntRescale`` (constant affine map) and ``IntSub`` (difference).

Math (``ir/intops.py``): IntRescale acc = gain * q_x + offset, IntSub acc = q_a - q_b; then the op's
requantization. Every backend computes the same integers:

* reference: int64 numpy, ``reference.requantize_op`` with the parameters shaped (1, *param_shape);
* fast: the same on exact integer floats, ``pool_table.requant_shaped``;
* ONNX ``integer`` target: int32 ``Cast``/``Sub`` (zero point)/``Mul`` (gain)/``Add`` (offset), then the exact
  uint64 chain; IntSub: two int32 ``Cast`` and ``Sub``, the zero points in the chain's constant;
* ONNX ``ort`` target: the same int32 accumulator, ``Cast`` to float32 (IEEE round to nearest even, as the
  contract's float32(acc)), ``Mul`` by float32 M (one IEEE multiply), ``QuantizeLinear(., 1, zp)`` (round half
  to even, saturate), ``Clip``; IntSub as the ort Add: ``DequantizeLinear`` both, ``Sub``, ``Mul``, ``QuantizeLinear``.

Not handled: accumulators beyond int32 (the verifier refuses them through ``accumulator_bound``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
import torch.fx as fx

from qcompile.backends import fast, onnx_export, onnx_ort, reference
from qcompile.backends.pool_table import requant_shaped
from qcompile.ir import intops as ops
from qcompile.ir.contract import IntArray


def _shape(op: ops.IntRescale, params: torch.Tensor) -> tuple[int, ...]:
    return (1, *op.param_shape) if params.numel() > 1 else (1,)


@reference.kernel(ops.IntRescale)
def _rescale_reference(op: ops.IntRescale, x: IntArray) -> IntArray:
    acc = op.gain * x + reference._np(op.offset).reshape(_shape(op, op.offset))
    return reference.requantize_op(op, acc, _shape(op, op.mult))


@reference.kernel(ops.IntSub)
def _sub_reference(op: ops.IntSub, a: IntArray, b: IntArray) -> IntArray:
    return reference.requantize_op(op, a - b)


@fast._kernel(ops.IntRescale)
def _rescale_fast(op: ops.IntRescale, x: torch.Tensor) -> torch.Tensor:
    acc = x.double() * op.gain + op.offset.double().view(_shape(op, op.offset))
    return requant_shaped(acc, op, _shape(op, op.mult))


@fast._kernel(ops.IntSub)
def _sub_fast(op: ops.IntSub, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return requant_shaped(a - b, op, (1,))


def _int32(e: onnx_export._Emitter, name: str, values: Any, shape: tuple[int, ...]) -> gs.Constant:
    return e.const(name, np.asarray(values, dtype=np.int32).reshape(shape))


def _rescale_acc(e: onnx_export._Emitter, name: str, op: ops.IntRescale, x: gs.Variable) -> gs.Variable:
    v = e.op("Cast", name, [x], np.int32, to=onnx.TensorProto.INT32)
    if op.inp.zero_point:
        v = e.op("Sub", name, [v, _int32(e, f"{name}_xzp", op.inp.zero_point, ())], np.int32)
    if op.gain != 1:
        v = e.op("Mul", name, [v, _int32(e, f"{name}_gain", op.gain, ())], np.int32)
    offset = onnx_export._np(op.offset)
    if np.any(offset != 0):
        v = e.op("Add", name, [v, _int32(e, f"{name}_offset", offset, _shape(op, op.offset))], np.int32)
    return v


def _rescale_integer(e: onnx_export._Emitter, node: fx.Node, op: ops.IntRescale, args: list[Any]) -> gs.Variable:
    acc = _rescale_acc(e, node.name, op, args[0])
    shape = _shape(op, op.mult)
    return onnx_export.requant_chain(e, node.name, acc, onnx_export._np(op.mult), onnx_export._np(op.shift),
                                     np.array(0), op.out, op.lo, op.hi, 4,
                                     param_shape=shape if op.mult.numel() > 1 else None)


def float_requantize(e: onnx_export._Emitter, name: str, acc: gs.Variable, fmult: np.ndarray,
                     op: Any) -> gs.Variable:
    """int32 acc -> q + zp under the ort contract: Cast float32, Mul f (shaped), QuantizeLinear(1, zp), Clip."""
    v = e.op("Cast", name, [acc], np.float32, to=onnx.TensorProto.FLOAT)
    v = e.op("Mul", name, [v, e.const(f"{name}_f", fmult.astype(np.float32))], np.float32)
    q = e.op("QuantizeLinear", name, [v, e.const(f"{name}_one", np.array(1.0, dtype=np.float32)),
                                      e.const(f"{name}_zp", onnx_export._u8(op.out.zero_point))], np.uint8)
    return onnx_export._clip(e, name, q, op.out, op.lo, op.hi)


def _rescale_ort(e: onnx_export._Emitter, node: fx.Node, op: ops.IntRescale, args: list[Any]) -> gs.Variable:
    acc = _rescale_acc(e, node.name, op, args[0])
    fmult = onnx_export._np(op.fmult).reshape(_shape(op, op.fmult) if op.fmult.numel() > 1 else ())
    return float_requantize(e, node.name, acc, fmult, op)


def _sub_integer(e: onnx_export._Emitter, node: fx.Node, op: ops.IntSub, args: list[Any]) -> gs.Variable:
    name = node.name
    a32, b32 = (e.op("Cast", name, [v], np.int32, to=onnx.TensorProto.INT32) for v in args)
    acc = e.op("Sub", name, [a32, b32], np.int32)
    zp = op.inp[1].zero_point - op.inp[0].zero_point  # (q_a + zp_a) - (q_b + zp_b) + zp = q_a - q_b
    return onnx_export.requant_chain(e, name, acc, onnx_export._np(op.mult), onnx_export._np(op.shift),
                                     np.array(zp), op.out, op.lo, op.hi, 4)


def _sub_ort(e: onnx_export._Emitter, node: fx.Node, op: ops.IntSub, args: list[Any]) -> gs.Variable:
    name = node.name
    one = e.const(f"{name}_one", np.array(1.0, dtype=np.float32))
    a, b = (e.op("DequantizeLinear", name, [v, one, e.const(f"{name}_zp{i}", onnx_export._u8(t.zero_point))],
                 np.float32) for i, (v, t) in enumerate(zip(args, op.inp, strict=True)))
    diff = e.op("Sub", name, [a, b], np.float32)
    v = e.op("Mul", name, [diff, e.const(f"{name}_f", onnx_ort._f32(op.fmult).reshape(()))], np.float32)
    q = e.op("QuantizeLinear", name, [v, one, e.const(f"{name}_yzp", onnx_export._u8(op.out.zero_point))], np.uint8)
    return onnx_export._clip(e, name, q, op.out, op.lo, op.hi)


onnx_export.INTEGER_EMITTERS.update({ops.IntRescale: _rescale_integer, ops.IntSub: _sub_integer})
onnx_ort.ORT_EMITTERS.update({ops.IntRescale: _rescale_ort, ops.IntSub: _sub_ort})
