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
* ``IntLayerNorm`` (both targets): its int64 math literally (``Cast``, ``ReduceSum``, ``Mul``, ``Sub``,
  ``Add``, ``Max``/``Min``, ``Abs``, ``Sign`` and ``Div``; every ``Div`` has non-negative operands, so
  onnxruntime's truncating integer division is the floor of the spec), unrolled over the fixed Newton
  steps, ``Cast`` of the int32-bounded acc, then the target's requantization: the exact uint64 chain
  (``integer``) or ``DequantizeLinear(acc, f)`` + ``QuantizeLinear(., 1, zp)`` + ``Clip`` (``ort``).
* ``IntSoftmax`` (both targets): ``ReduceMax``, ``Sub``, ``Gather`` of the exp table, ``ReduceSum``, ``Mul``,
  ``Add``, ``Div`` (non-negative operands), ``Max``/``Min``, + zp, ``Cast``: its integer math literally.
* ``IntConstCat`` (both targets): ``Concat`` with the constant's container ``Expand``-ed to the batch.
* ``IntMatMul``: ``MatMulInteger(a, b, zp_a, zp_b)`` on the uint8 containers (exact int32 accumulation with
  broadcasting over the leading dims), then the target's requantization of the int32 acc: the exact uint64
  chain (``integer``) or ``DequantizeLinear(acc, f)`` + ``QuantizeLinear(., 1, zp)`` + ``Clip`` (``ort``).
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
    """G[u] = T[clip(u - zp_in, lo, hi) - lo] + zp_out for every uint8 container value u (per row)."""
    q = np.clip(np.arange(256) - op.inp.zero_point, op.inp.lo, op.inp.hi)
    return (ox._np(op.table)[..., q - op.inp.lo] + op.out.zero_point).astype(np.uint8)


def _export_lookup(e: ox._Emitter, node: fx.Node, op: ops.IntLookup, args: list[Any]) -> gs.Variable:
    """Gather(G, u); a per-channel table is flattened and gathered at c * 256 + u."""
    idx = e.op("Cast", node.name, [args[0]], np.int64, to=onnx.TensorProto.INT64)
    table = container_table(op)
    if table.ndim == 2:
        offsets = (np.arange(table.shape[0], dtype=np.int64) * 256).reshape(1, -1, *[1] * (_rank(node) - 2))
        idx = e.op("Add", node.name, [idx, e.const(f"{node.name}_rows", offsets)], np.int64)
    return e.op("Gather", node.name, [e.const(f"{node.name}_table", table.reshape(-1)), idx], np.uint8, axis=0)


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


def _i64(e: ox._Emitter, name: str, v: Any) -> gs.Constant:
    return e.const(name, np.asarray(v, dtype=np.int64))


def _isqrt(e: ox._Emitter, name: str, op: ops.IntLayerNorm, big: gs.Variable) -> gs.Variable:
    s: Any = _i64(e, f"{name}_y0", op.y0)
    two = _i64(e, f"{name}_two", 2)
    for _ in range(op.steps):
        half = e.op("Div", name, [e.op("Add", name, [s, e.op("Div", name, [big, s], np.int64)], np.int64), two],
                    np.int64)
        s = e.op("Min", name, [s, half], np.int64)
    return s


def _layernorm_acc(e: ox._Emitter, name: str, op: ops.IntLayerNorm, x: gs.Variable, rank: int) -> gs.Variable:
    """The int32 accumulator of IntLayerNorm from the uint8 container, in int64 ops."""
    axes = _i64(e, f"{name}_axes", [op.axis])
    q = e.op("Sub", name, [e.op("Cast", name, [x], np.int64, to=onnx.TensorProto.INT64),
                           _i64(e, f"{name}_zp", op.inp.zero_point)], np.int64)
    total = e.op("ReduceSum", name, [q, axes], np.int64, keepdims=1)
    d = e.op("Sub", name, [e.op("Mul", name, [q, _i64(e, f"{name}_d", op.size)], np.int64), total], np.int64)
    v = e.op("ReduceSum", name, [e.op("Mul", name, [d, d], np.int64), axes], np.int64, keepdims=1)
    scaled = e.op("Mul", name, [e.op("Add", name, [v, _i64(e, f"{name}_e", op.eps_q)], np.int64),
                                _i64(e, f"{name}_4p", 4**op.p)], np.int64)
    s = _isqrt(e, name, op, e.op("Max", name, [scaled, _i64(e, f"{name}_one", 1)], np.int64))
    num = e.op("Add", name, [e.op("Mul", name, [e.op("Abs", name, [d], np.int64),
                                                 _i64(e, f"{name}_pk", 2 ** (op.p + op.k + 1))], np.int64), s],
               np.int64)
    den = e.op("Mul", name, [s, _i64(e, f"{name}_two2", 2)], np.int64)
    n = e.op("Mul", name, [e.op("Sign", name, [d], np.int64), e.op("Div", name, [num, den], np.int64)], np.int64)
    shape = [1] * rank
    shape[op.axis] = -1
    g, b = (_i64(e, f"{name}_{k}", ox._np(t).reshape(shape)) for k, t in (("g", op.gamma), ("b", op.beta)))
    acc = e.op("Add", name, [e.op("Mul", name, [n, g], np.int64), b], np.int64)
    return e.op("Cast", name, [acc], np.int32, to=onnx.TensorProto.INT32)


def _rank(node: fx.Node) -> int:
    from qcompile.ir.meta import get_info

    shape = get_info(node).shape
    assert shape is not None, f"'{node.name}' has no recorded shape"
    return len(shape)


def _layernorm_integer(e: ox._Emitter, node: fx.Node, op: ops.IntLayerNorm, args: list[Any]) -> gs.Variable:
    acc = _layernorm_acc(e, node.name, op, args[0], _rank(node))
    return ox.requant_chain(e, node.name, acc, ox._np(op.mult), ox._np(op.shift), np.array(0), op.out, op.lo,
                            op.hi, 4)


def _layernorm_ort(e: ox._Emitter, node: fx.Node, op: ops.IntLayerNorm, args: list[Any]) -> gs.Variable:
    acc = _layernorm_acc(e, node.name, op, args[0], _rank(node))
    return onnx_ort.requantize(e, node.name, acc, onnx_ort._f32(op.fmult), op.out, op.lo, op.hi)


def _export_softmax(e: ox._Emitter, node: fx.Node, op: ops.IntSoftmax, args: list[Any]) -> gs.Variable:
    """IntSoftmax's integer math on the uint8 container (the zero point cancels in max - x)."""
    name = node.name
    axes = _i64(e, f"{name}_axes", [op.axis])
    u = e.op("Cast", name, [args[0]], np.int64, to=onnx.TensorProto.INT64)
    d = e.op("Sub", name, [e.op("ReduceMax", name, [u, axes], np.int64, keepdims=1), u], np.int64)
    ex = e.op("Gather", name, [_i64(e, f"{name}_exp", ox._np(op.etab)), d], np.int64, axis=0)
    s = e.op("ReduceSum", name, [ex, axes], np.int64, keepdims=1)
    num = e.op("Add", name, [e.op("Mul", name, [ex, _i64(e, f"{name}_2c", 2 * op.c)], np.int64),
                             e.op("Mul", name, [s, _i64(e, f"{name}_t", 1 << op.frac)], np.int64)], np.int64)
    q = e.op("Div", name, [num, e.op("Mul", name, [s, _i64(e, f"{name}_2t", 1 << (op.frac + 1))], np.int64)],
             np.int64)
    zp = op.out.zero_point
    q = e.op("Min", name, [e.op("Max", name, [q, _i64(e, f"{name}_lo", op.lo)], np.int64),
                           _i64(e, f"{name}_hi", op.hi)], np.int64)
    q = e.op("Add", name, [q, _i64(e, f"{name}_zp", zp)], np.int64)
    return e.op("Cast", name, [q], np.uint8, to=onnx.TensorProto.UINT8)


def _matmul_acc(e: ox._Emitter, node: fx.Node, op: ops.IntMatMul, args: list[Any]) -> gs.Variable:
    zps = [e.const(f"{node.name}_zp{i}", ox._u8(t.zero_point)) for i, t in enumerate(op.inp)]
    return e.op("MatMulInteger", node.name, [args[0], args[1], *zps], np.int32)


def _matmul_integer(e: ox._Emitter, node: fx.Node, op: ops.IntMatMul, args: list[Any]) -> gs.Variable:
    acc = _matmul_acc(e, node, op, args)
    return ox.requant_chain(e, node.name, acc, ox._np(op.mult), ox._np(op.shift), np.array(0), op.out, op.lo,
                            op.hi, 4)


def _matmul_ort(e: ox._Emitter, node: fx.Node, op: ops.IntMatMul, args: list[Any]) -> gs.Variable:
    acc = _matmul_acc(e, node, op, args)
    return onnx_ort.requantize(e, node.name, acc, onnx_ort._f32(op.fmult), op.out, op.lo, op.hi)


def _export_const_cat(e: ox._Emitter, node: fx.Node, op: ops.IntConstCat, args: list[Any]) -> gs.Variable:
    """Concat with the constant's container (q + zp) expanded to the input's batch."""
    name, x = node.name, args[0]
    value = (ox._np(op.value) + op.inp.zero_point).astype(np.uint8)[None]
    batch = e.op("Gather", name, [e.op("Shape", name, [x], np.int64), _i64(e, f"{name}_b", [0])], np.int64, axis=0)
    shape = e.op("Concat", name, [batch, _i64(e, f"{name}_rest", list(value.shape[1:]))], np.int64, axis=0)
    c = e.op("Expand", name, [e.const(f"{name}_value", value), shape], np.uint8)
    return e.op("Concat", name, [c, x] if op.first else [x, c], np.uint8, axis=op.dim)


ox.SHARED_EMITTERS[ops.IntConstCat] = _export_const_cat
ox.INTEGER_EMITTERS[ops.IntConstCat] = _export_const_cat
onnx_ort.ORT_EMITTERS[ops.IntConstCat] = _export_const_cat
ox.SHARED_EMITTERS[ops.IntLookup] = _export_lookup
ox.SHARED_EMITTERS[ops.IntSoftmax] = _export_softmax
ox.INTEGER_EMITTERS.update({ops.IntLookup: _export_lookup, ops.IntMul: _mul_integer,
                            ops.IntLayerNorm: _layernorm_integer, ops.IntSoftmax: _export_softmax})
onnx_ort.ORT_EMITTERS.update({ops.IntLookup: _export_lookup, ops.IntMul: _mul_ort, ops.IntLayerNorm: _layernorm_ort,
                              ops.IntSoftmax: _export_softmax})
ox.INTEGER_EMITTERS[ops.IntMatMul] = _matmul_integer
onnx_ort.ORT_EMITTERS[ops.IntMatMul] = _matmul_ort
