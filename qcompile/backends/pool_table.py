"""Kernels and ONNX emitters of ``IntAvgPoolTable`` (average pooling with a per-position divisor).

Math (``ir/intops.py``): acc = rows @ q_x @ cols^T per (n, c) plane, exact int32 (the verifier bounds it by
the largest window times max|q_x|), then q_y = clamp(rq(acc, M[i, j])) with one multiplier per output
position. Every backend computes the same integers:

* reference: ``np.einsum`` in int64, ``reference.requantize_op`` with the table shaped [1, 1, H_out, W_out];
* fast: the same two matrix products in float64 (exact integers below 2^53), then the op's requantization
  broadcast over [1, 1, H_out, W_out];
* ONNX, both targets: ``Cast`` the uint8 container to int32, ``Sub`` its zero point, two int32 ``MatMul``
  with the 0/1 matrices (integers: exact in any order); then the ``integer`` target's uint64 chain with
  per-position constants, or for ``ort`` ``Cast`` to float32 (exact: |acc| < 2^24 is checked), ``Mul`` by the
  float32 table (one IEEE multiply, as the contract's f32(acc) * f32(M)), ``QuantizeLinear`` with scale 1
  (round half to even, + zp, saturate) and ``Clip``.

Not handled: accumulators of 2^24 or more under the ``ort`` export (refused; they need windows of over
65,000 8-bit values).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
import torch.fx as fx

from qcompile.backends import fast, onnx_export, onnx_ort, reference
from qcompile.ir import intops as ops
from qcompile.ir.contract import IntArray, Target

F32_EXACT = 2**24


def _table_shape(op: ops.IntAvgPoolTable) -> tuple[int, int, int, int]:
    return (1, 1, int(op.rows.shape[0]), int(op.cols.shape[0]))


@reference.kernel(ops.IntAvgPoolTable)
def _reference(op: ops.IntAvgPoolTable, x: IntArray) -> IntArray:
    acc = np.einsum("ih,nchw,jw->ncij", reference._np(op.rows), x, reference._np(op.cols))
    return reference.requantize_op(op, acc, _table_shape(op))


def requant_shaped(acc: torch.Tensor, op: Any, shape: tuple[int, ...]) -> torch.Tensor:
    """The op's requantization (its target's), its parameters broadcast with ``shape`` (fast executor)."""
    if op.target is Target.ORT:
        v = acc.to(torch.float32).mul_(op.fmult.view(shape))
        return v.round_().clamp_(op.lo, op.hi)
    out = acc.to(torch.int64).mul_(op.mult.view(shape))
    shift = op.shift.view(shape)
    out.add_(torch.bitwise_left_shift(torch.ones_like(shift), shift - 1)).bitwise_right_shift_(shift)
    return out.clamp_(op.lo, op.hi).to(torch.float32)


@fast._kernel(ops.IntAvgPoolTable)
def _fast(op: ops.IntAvgPoolTable, x: torch.Tensor) -> torch.Tensor:
    acc = torch.matmul(torch.matmul(op.rows.double(), x.double()), op.cols.double().T)
    return requant_shaped(acc, op, _table_shape(op))


def _accumulator(e: onnx_export._Emitter, name: str, op: ops.IntAvgPoolTable, x: gs.Variable) -> gs.Variable:
    v = e.op("Cast", name, [x], np.int32, to=onnx.TensorProto.INT32)
    if op.inp.zero_point:
        v = e.op("Sub", name, [v, e.const(f"{name}_xzp", np.array(op.inp.zero_point, dtype=np.int32))], np.int32)
    rows = e.const(f"{name}_rows", reference._np(op.rows).astype(np.int32))
    cols_t = e.const(f"{name}_cols", np.ascontiguousarray(reference._np(op.cols).T.astype(np.int32)))
    v = e.op("MatMul", name, [rows, v], np.int32)
    return e.op("MatMul", name, [v, cols_t], np.int32)


def _export_integer(e: onnx_export._Emitter, node: fx.Node, op: ops.IntAvgPoolTable, args: list[Any]) -> gs.Variable:
    acc = _accumulator(e, node.name, op, args[0])
    shape = _table_shape(op)
    return onnx_export.requant_chain(e, node.name, acc, onnx_export._np(op.mult), onnx_export._np(op.shift),
                                     np.array(0), op.out, op.lo, op.hi, 4, param_shape=shape)


def _export_ort(e: onnx_export._Emitter, node: fx.Node, op: ops.IntAvgPoolTable, args: list[Any]) -> gs.Variable:
    if op.accumulator_bound() >= F32_EXACT:
        raise onnx_export.ExportError(f"pool '{node.name}' sums up to {op.accumulator_bound()} (>= 2^24), which "
                                      "float32 does not hold exactly; export with --target integer")
    name = node.name
    acc = e.op("Cast", name, [_accumulator(e, name, op, args[0])], np.float32, to=onnx.TensorProto.FLOAT)
    table = onnx_export._np(op.fmult).astype(np.float32).reshape(_table_shape(op))
    v = e.op("Mul", name, [acc, e.const(f"{name}_f", table)], np.float32)
    q = e.op("QuantizeLinear", name, [v, e.const(f"{name}_one", np.array(1.0, dtype=np.float32)),
                                      e.const(f"{name}_zp", onnx_export._u8(op.out.zero_point))], np.uint8)
    return onnx_export._clip(e, name, q, op.out, op.lo, op.hi)


onnx_export.INTEGER_EMITTERS[ops.IntAvgPoolTable] = _export_integer
onnx_ort.ORT_EMITTERS[ops.IntAvgPoolTable] = _export_ort
