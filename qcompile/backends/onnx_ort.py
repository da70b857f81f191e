"""Fast and exact ONNX export for the ``ort`` target: onnxruntime's fused integer kernels, bit for bit.

Under the ``ort`` contract every requantization is ``q = clamp(rint(float32(acc) * f), lo, hi)`` with
``f = float32(M)`` (``ir/contract.py``). That is exactly what onnxruntime's fused ``QLinearConv`` computes
when ``x_scale = y_scale = 1`` and ``w_scale[c] = f[c]``: its per-channel scale ``1 * f[c] / 1`` is
``f[c]`` itself, it converts the exact int32 accumulator (bias included) to float32, multiplies once,
clamps to the uint8 container and rounds half to even (ONNX_NOTES, "Fast AND exact"). Integers travel as
uint8 holding q + zp (zp = 0 unsigned, 128 signed), the zero points being QLinearConv's own. Per op:

* Conv: one ``QLinearConv`` with the int32 bias. Linear: ``MatMulInteger`` + ``Add`` (int32 bias) and the
  requantization below (measured 1.7-1.9x faster than a 1x1 ``QLinearConv`` on [64, 1024] x [1024, 512],
  both exact; ``QLinearMatMul`` has no bias input). Weights are int8 (u8 x s8) when every |q_w| <= 63:
  then no two products of a pair exceed 2 * 255 * 63 < 2^15 and the AVX2 kernels' saturating 16-bit pair
  sums are exact on every x86 CPU. Wider (8-bit) weights are stored as uint8 q_w + 128 with zero point 128
  (u8 x u8, exact everywhere, ~1.4x the time on AVX2) unless ``ort_cpu=vnni`` asks for int8 (exact on
  VNNI CPUs only). ``ort_cpu=avx2`` compiles with 7-bit weights (``passes/limit_weight_bits.py``), so
  every 8-bit layer arrives here with |q_w| <= 63 and takes the int8 path, exact on every x86 CPU.
  Weights of <= 4 bits stay packed (INT4, INT2 for ternary) and are ``Cast`` to int8;
  onnxruntime folds the Cast before it packs the weights, so the speed is the same. APoT layers run on
  their combined codes; codes beyond int8 (7-bit APoT, |k| <= 448) use the integer target's two
  ConvInteger (lo/hi) and the requantization below.
* Average / global pool: a depthwise ``QLinearConv`` with a ones kernel and ``f`` as its weight scale:
  the window sum is its accumulator (the padding holds the zero point, so it adds 0, as
  count_include_pad does), one fused kernel instead of a pool and a chain.
* Add: ``DequantizeLinear(a, 1, zp_a) + DequantizeLinear(b, 1, zp_b)`` in float32 (integers below 2^9,
  exact), ``Mul(f)`` (the one rounding), ``QuantizeLinear(y, 1, zp_y)`` (round half to even, saturate):
  five cheap elementwise ops, the contract's formula literally.
* A requantization without a fused kernel (the APoT lo/hi split): ``DequantizeLinear(acc_int32, f, axis=1)``
  (float32(acc) * f) then ``QuantizeLinear(., 1, zp)``: the same formula in two ops.
* Output clamps narrower than the container (ReLU6, sub-8-bit activations, the signed narrow range) are a
  ``Clip`` on the uint8 values; max pool, reshapes, concatenation and the boundary ops are the integer
  target's (``SHARED_EMITTERS``). Tables, products, LayerNorm and softmax: ``backends/onnx_pointwise.py``.

Not handled: activations or weights wider than 8 bits (refused by the export), per-channel weight zero
points (onnxruntime rejects them for u8 x u8).
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch.fx as fx

from qcompile.backends import onnx_export as ox
from qcompile.ir import intops as ops
from qcompile.ir.meta import IntType

S8_SAFE = 63  # |q_w| <= 63: u8 x s8 pair sums stay below 2^15 on AVX2 (2 * 255 * 63 = 32130)
INT2_OPSET = 25


def _f32(t: Any) -> np.ndarray:
    return np.ascontiguousarray(ox._np(t), dtype=np.float32).reshape(-1)


def _weight(e: ox._Emitter, name: str, w: np.ndarray) -> tuple[gs.Tensor, gs.Constant]:
    """The weight input of QLinearConv/MatMulInteger and its zero point: packed int4/int2 + Cast, int8, or
    uint8 + 128 (scalar zero points: onnxruntime rejects per-channel ones for u8 x u8)."""
    wmax = int(np.abs(w).max(initial=0))
    if wmax > 127:
        raise ox.ExportError(f"layer '{name}' has weight codes up to {wmax}; QLinearConv holds at most 127")
    if wmax > S8_SAFE and e.ort_cpu != "vnni":
        return e.const(f"{name}_w", (w + 128).astype(np.uint8)), e.const(f"{name}_wzp", ox._u8(128))
    zp = e.const(f"{name}_wzp", np.array(0, dtype=np.int8))
    if wmax > 7:
        return e.const(f"{name}_w", w.astype(np.int8)), zp
    packed_type = ml_dtypes.int2 if wmax <= 1 else ml_dtypes.int4
    if wmax <= 1:
        e.opset = max(e.opset, INT2_OPSET)
    proto = onnx.numpy_helper.from_array(w.astype(packed_type), e._unique(f"{name}_w_packed"))
    packed = gs.Constant(proto.name, gs.ir.tensor.LazyValues(proto))
    return e.op("Cast", f"{name}_w", [packed], np.int8, to=onnx.TensorProto.INT8), zp


def qlinear_conv(e: ox._Emitter, name: str, x: gs.Variable, w: np.ndarray, bias: np.ndarray | None,
                 fmult: np.ndarray, inp: IntType, out: IntType, **attrs: Any) -> gs.Variable:
    """One QLinearConv computing clamp(rint(f32(conv(q_x, w) + b) * f), container) as q + zp_out."""
    weight, wzp = _weight(e, name, w)
    one = e.const(f"{name}_one", np.array(1.0, dtype=np.float32))
    channels = w.shape[0]
    scale = np.broadcast_to(fmult, (channels,)).astype(np.float32)
    inputs = [x, one, e.const(f"{name}_xzp", ox._u8(inp.zero_point)), weight, e.const(f"{name}_f", scale), wzp,
              one, e.const(f"{name}_yzp", ox._u8(out.zero_point))]
    if bias is not None and np.any(bias != 0):
        inputs.append(e.const(f"{name}_b", bias.astype(np.int32)))
    return e.op("QLinearConv", name, inputs, np.uint8, kernel_shape=list(w.shape[2:]), **attrs)


def requantize(e: ox._Emitter, name: str, acc: gs.Variable, fmult: np.ndarray, out: IntType, lo: int,
               hi: int) -> gs.Variable:
    """int32 acc -> q + zp: DequantizeLinear(acc, f) = f32(acc) * f, QuantizeLinear(., 1, zp), Clip."""
    axis = {"axis": 1} if fmult.size > 1 else {}
    scale = fmult if fmult.size > 1 else fmult.reshape(())
    v = e.op("DequantizeLinear", name, [acc, e.const(f"{name}_f", scale.astype(np.float32))], np.float32, **axis)
    q = e.op("QuantizeLinear", name, [v, e.const(f"{name}_one", np.array(1.0, dtype=np.float32)),
                                      e.const(f"{name}_zp", ox._u8(out.zero_point))], np.uint8)
    return ox._clip(e, name, q, out, lo, hi)


def _conv_attrs(op: ops.IntConv2d) -> dict[str, Any]:
    (ph, pw) = op.padding
    return {"strides": list(op.stride), "pads": [ph, pw, ph, pw], "dilations": list(op.dilation), "group": op.groups}


def _affine(e: ox._Emitter, name: str, op: ops.IntConv2d, x: gs.Variable, w: np.ndarray,
            attrs: dict[str, Any]) -> gs.Variable:
    """Conv: fused QLinearConv, or (codes beyond int8) ConvInteger + requantize."""
    fmult, bias = _f32(op.fmult), ox._np(op.bias).astype(np.int64)
    if int(np.abs(w).max(initial=0)) <= 127:
        q = qlinear_conv(e, name, x, w, bias, fmult, op.inp, op.out, **attrs)
        return ox._clip(e, name, q, op.out, op.lo, op.hi)
    acc = ox._conv_weights(e, name, x, op, w, **attrs)
    acc = e.op("Add", name, [acc, e.const(f"{name}_b", bias.astype(np.int32).reshape(1, -1, 1, 1))], np.int32)
    return requantize(e, name, acc, fmult, op.out, op.lo, op.hi)


def _export_conv(e: ox._Emitter, node: fx.Node, op: ops.IntConv2d, args: list[Any]) -> gs.Variable:
    return _affine(e, node.name, op, args[0], ox._np(op.weight), _conv_attrs(op))


def _export_linear(e: ox._Emitter, node: fx.Node, op: ops.IntLinear, args: list[Any]) -> gs.Variable:
    """MatMulInteger (+ int32 bias) and the requantization; codes beyond int8 take the integer target's split."""
    name, w = node.name, ox._np(op.weight)
    if int(np.abs(w).max(initial=0)) <= 127:
        weight, wzp = _weight(e, name, np.ascontiguousarray(w.T))
        inputs = [args[0], weight, e.const(f"{name}_xzp", ox._u8(op.inp.zero_point)), wzp]
        acc = e.op("MatMulInteger", name, inputs, np.int32)
    else:
        acc = ox._conv_weights(e, name, args[0], op, w)
    bias = ox._np(op.bias).astype(np.int64)
    if np.any(bias != 0):
        acc = e.op("Add", name, [acc, e.const(f"{name}_b", bias.astype(np.int32))], np.int32)
    return requantize(e, name, acc, _f32(op.fmult), op.out, op.lo, op.hi)


def _export_avgpool(e: ox._Emitter, node: fx.Node, op: ops.IntAvgPool2d, args: list[Any]) -> gs.Variable:
    channels = ox._channels(node)
    ones = np.ones((channels, 1, *op.kernel), dtype=np.int64)
    (ph, pw) = op.padding
    attrs = {"strides": list(op.stride), "pads": [ph, pw, ph, pw], "group": channels}
    q = qlinear_conv(e, node.name, args[0], ones, None, _f32(op.fmult), op.inp, op.out, **attrs)
    return ox._clip(e, node.name, q, op.out, op.lo, op.hi)


def _export_add(e: ox._Emitter, node: fx.Node, op: ops.IntAdd, args: list[Any]) -> gs.Variable:
    name = node.name
    one = e.const(f"{name}_one", np.array(1.0, dtype=np.float32))
    a, b = (e.op("DequantizeLinear", name, [v, one, e.const(f"{name}_zp{i}", ox._u8(t.zero_point))], np.float32)
            for i, (v, t) in enumerate(zip(args, op.inp, strict=True)))
    total = e.op("Add", name, [a, b], np.float32)
    v = e.op("Mul", name, [total, e.const(f"{name}_f", _f32(op.fmult).reshape(()))], np.float32)
    q = e.op("QuantizeLinear", name, [v, one, e.const(f"{name}_yzp", ox._u8(op.out.zero_point))], np.uint8)
    return ox._clip(e, name, q, op.out, op.lo, op.hi)


ORT_EMITTERS: dict[type, ox.Emitter] = {
    **ox.SHARED_EMITTERS,
    ops.IntConv2d: _export_conv,
    ops.IntShiftConv2d: _export_conv,
    ops.IntLinear: _export_linear,
    ops.IntShiftLinear: _export_linear,
    ops.IntAdd: _export_add,
    ops.IntAvgPool2d: _export_avgpool,
}
