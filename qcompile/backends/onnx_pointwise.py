"""ONNX emitters of the pointwise integer ops (tables, products), for both targets.

* ``IntLookup`` (both targets, the same nodes): the table is re-indexed by the uint8 container,
  G[u] = T[u - zp_in] + zp_out for u in [0, 255] (containers no input value can take repeat the nearest
  entry), and the op is ``Gather(G, Cast(x, int64))``: the integers are the table's by construction.
* ``IntMul``, target ``integer``: ``Cast`` both inputs to int32, ``Sub`` their zero points, ``Mul``
  (|q_a * q_b| <= 2^31 - 1, proved by the verifier), then the exact uint64 requantization chain.
* ``IntMul``, target ``ort``: ``DequantizeLinear(a, 1, zp_a) * DequantizeLinear(b, 1, zp_b)`` in float32,
  exact because the integer product is below 2^24 (two <= 8-bit values: |q_a * q_b| < 2^16; the export
  refuses a bound of 2^24 or more), so it equals ``float32(acc)``; then ``Mul(float32(M))``, one rounding,
  ``QuantizeLinear(., 1, zp_y)`` (round half to even, + zp, saturate) and a ``Clip``: together
  ``clamp(rint(float32(acc) * float32(M)), lo, hi) + zp_y``, the ``ort`` contract literally.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch.fx as fx

from qcompile.backends import onnx_export as ox
from qcompile.backends import onnx_ort
from qcompile.ir import intops as ops

F32_EXACT = 2**24


def container_table(op: ops.IntLookup) -> np.ndarray:
    """G[u] = T[clip(u - zp_in, lo, hi) - lo] + zp_out for every uint8 container value u."""
    q = np.clip(np.arange(256) - op.inp.zero_point, op.inp.lo, op.inp.hi)
    return (ox._np(op.table)[q - op.inp.lo] + op.out.zero_point).astype(np.uint8)


def _export_lookup(e: ox._Emitter, node: fx.Node, op: ops.IntLookup, args: list[Any]) -> gs.Variable:
    idx = e.op("Cast", node.name, [args[0]], np.int64, to=onnx.TensorProto.INT64)
    return e.op("Gather", node.name, [e.const(f"{node.name}_table", container_table(op)), idx], np.uint8, axis=0)


def _mul_integer(e: ox._Emitter, node: fx.Node, op: ops.IntMul, args: list[Any]) -> gs.Variable:
    name, parts = node.name, []
    for i, (v, t) in enumerate(zip(args, op.inp, strict=True)):
        v32 = e.op("Cast", name, [v], np.int32, to=onnx.TensorProto.INT32)
        parts.append(e.op("Sub", name, [v32, e.const(f"{name}_zp{i}", np.array(t.zero_point, np.int32))], np.int32))
    acc = e.op("Mul", name, parts, np.int32)
    return ox.requant_chain(e, name, acc, ox._np(op.mult), ox._np(op.shift), np.array(0), op.out, op.lo, op.hi, 4)


def _mul_ort(e: ox._Emitter, node: fx.Node, op: ops.IntMul, args: list[Any]) -> gs.Variable:
    if op.bound >= F32_EXACT:
        raise ox.ExportError(f"multiply '{node.name}': products up to {op.bound} are not exact in float32 (< 2^24)")
    name = node.name
    one = e.const(f"{name}_one", np.array(1.0, dtype=np.float32))
    a, b = (e.op("DequantizeLinear", name, [v, one, e.const(f"{name}_zp{i}", ox._u8(t.zero_point))], np.float32)
            for i, (v, t) in enumerate(zip(args, op.inp, strict=True)))
    acc = e.op("Mul", name, [a, b], np.float32)
    v = e.op("Mul", name, [acc, e.const(f"{name}_f", onnx_ort._f32(op.fmult).reshape(()))], np.float32)
    q = e.op("QuantizeLinear", name, [v, one, e.const(f"{name}_yzp", ox._u8(op.out.zero_point))], np.uint8)
    return ox._clip(e, name, q, op.out, op.lo, op.hi)


ox.SHARED_EMITTERS[ops.IntLookup] = _export_lookup
ox.INTEGER_EMITTERS.update({ops.IntLookup: _export_lookup, ops.IntMul: _mul_integer})
onnx_ort.ORT_EMITTERS.update({ops.IntLookup: _export_lookup, ops.IntMul: _mul_ort})
