"""Integer ONNX export: standard operators only, bit-exact in onnxruntime on x86.

Under the ``integer`` target the file computes the dyadic contract's integers exactly, but not with integer
ops alone: where the export proves them exact, depthwise convolutions and requantizations run on float32 /
float64 kernels (``backends/onnx_exact_float.py``); everything else is integer ops.

Every integer tensor travels as uint8 holding q + zp (zp = 0 unsigned, 128 signed), which keeps
``ConvInteger`` on its exact u8 x u8 fast path (see ONNX_NOTES.md). Per op:

* Quantize: ``QuantizeLinear`` (x / s, round half even, + zp) then a ``Clip`` to the type's bounds.
* Conv / Linear: ``ConvInteger`` / ``MatMulInteger`` (on W^T, u8 x u8 like the convs) with weights stored as
  w + zw (zw = 8 for <= 4-bit weights, packed UINT4, or zw = 1 with packed UINT2 for ternary; zw = 128
  in uint8 otherwise) and a ``Cast`` to uint8, then the requantization chain below.
* APoT (shift-add) Conv / Linear: one ``ConvInteger`` on the combined codes q_w = sum_i s_i 2^(e_i),
  stored in the narrowest container that holds them (UINT2 ternary, UINT4 up to |k| <= 7, uint8 up to
  127); 7-bit APoT codes (k_max = 448) are split into lo/hi parts, two ``ConvInteger`` and
  ``Mul(2^7)`` + ``Add`` in int32 (ONNX_NOTES: one conv on combined codes is fastest on CPUs, and
  onnxruntime has no shift-add kernel; the integers are the same).
* Grouped (depthwise) convolutions: a float32 ``Conv`` on the exact integers where every partial sum is
  proved below 2^24 (``backends/onnx_exact_float.py``: float ops, exactly the integers), else ConvInteger.
* Add: ``Cast`` both inputs to int32 and add; the zero points go into the chain's constant.
* Average pool: a depthwise float32 ``Conv`` (as above) or ``ConvInteger`` with a ones kernel (padding carries
  the zero point, so it contributes 0, as in PyTorch's count_include_pad), then the chain.
* Max pool, Flatten, Reshape, Concat, Clip act on the uint8 values directly (zp preserves order).
* Conv then max pool (the pool the conv's only user): the pool runs on the accumulator BEFORE the
  requantization when the float64 form below applies and every multiplier m >= 0. That requantization,
  floor((acc + b) m 2^-n + c) then a clamp, is monotone non-decreasing in acc, so max_window(rq(acc)) =
  rq(max_window(acc)); ONNX MaxPool takes the max over the window's elements inside the input (padding never
  wins), as the reference does (it pads with the smallest integer). The accumulator is then a float32 Conv's
  (dense convs too, when its bound is below 2^24) or ConvInteger's int32 cast to float64 (exact: onnxruntime
  has no int32 MaxPool), and the chain runs on a quarter of the elements for a 2x2 pool. Measured, LeNet-5
  (batch 64, one thread, quiet machine): 15.1 ms -> 11.3 ms (fp32 ONNX 5.9 ms); the uint8 MaxPool alone was
  3.7 ms of the 15.1 (onnxruntime's uint8 pool is not vectorised; its float one is).
* Dequantize: ``DequantizeLinear`` ((q - zp) * s in float32).
* Tables, products, LayerNorm, softmax: ``backends/onnx_pointwise.py`` (registered at the end of this module).

Requantization of conv, linear, add and average pool: the float64 form of ``onnx_exact_float`` (Cast,
BatchNormalization as an exact scale-and-shift, Floor, Clip, Cast) where its bound proves every value exact
(|acc| m < 2^53: 2-3x faster than the uint64 chain on AVX2, which has no 64-bit vector multiply), else the
uint64 chain below; the other requantizing ops always take the uint64 chain.

uint64 requantization chain (exact, per channel c), from int32 acc with |acc + b| < 2^31 (proved by the integer
verifier): Cast to uint64; Mul by m[c]; Add C[c] = 2^(n-1) + 2^62 + zp_out * 2^n + b[c] * m[c] (mod 2^64);
BitShift right by n[c]; Max/Min to [2^(62-n) + zp_out + lo, 2^(62-n) + zp_out + hi]; Cast to uint8.
|(acc + b) m| < 2^62 keeps the sum in [0, 2^64); 2^62 / 2^n = 2^(62-n) is a multiple of 256 for
n <= 54 (contract.MAX_SHIFT), so the final wrapping Cast leaves exactly q + zp_out.

Not handled: activations or weights wider than 8 bits (the executors run them, the export refuses),
Linear on inputs of rank other than 2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
import torch.fx as fx

from qcompile.backends import onnx_exact_float as exact_float
from qcompile.backends.reference import pool_extra
from qcompile.errors import QCompileError
from qcompile.ir import intops as ops
from qcompile.ir.contract import Target
from qcompile.ir.meta import IntType, get_info, get_target
from qcompile.ir.movement import dilate_pad, dilate_settings, upsample_nearest
from qcompile.ir.rewrite import input_node

BASE_OPSET = 21
UINT2_OPSET = 25
IR_VERSION = {21: 10, 25: 11}
OFFSET_BITS = 62
SPLIT_BITS = 7  # APoT codes wider than the uint8 container: k = hi * 2^7 + lo


class ExportError(QCompileError):
    pass


@dataclass(frozen=True)
class WeightStorage:
    """How a b-bit signed weight is stored: zero point, ONNX element type, numpy dtype."""

    zero_point: int
    onnx_type: int
    np_dtype: Any


def weight_storage(bits: int) -> WeightStorage:
    if bits <= 2:
        return WeightStorage(1, onnx.TensorProto.UINT2, ml_dtypes.uint2)
    if bits <= 4:
        return WeightStorage(8, onnx.TensorProto.UINT4, ml_dtypes.uint4)
    if bits <= 8:
        return WeightStorage(128, onnx.TensorProto.UINT8, np.uint8)
    raise ExportError(f"{bits}-bit weights cannot be exported (at most 8); lower the layer's bit-width")


class _Emitter:
    """Builds the onnx-graphsurgeon graph for one target; every constant gets a unique name."""

    def __init__(self, target: Target = Target.INTEGER, ort_cpu: str = "any") -> None:
        self.nodes: list[gs.Node] = []
        self.names: set[str] = set()
        self.opset = BASE_OPSET
        self.target, self.ort_cpu = target, ort_cpu
        self.fused: dict[fx.Node, gs.Variable] = {}  # nodes an earlier emitter already computed (conv + pool)

    def _unique(self, name: str) -> str:
        base, i = name, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def const(self, name: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self._unique(name), np.ascontiguousarray(values))

    def packed(self, name: str, values: np.ndarray, storage: WeightStorage) -> gs.Constant:
        proto = onnx.numpy_helper.from_array(values.astype(storage.np_dtype), self._unique(name))
        return gs.Constant(proto.name, gs.ir.tensor.LazyValues(proto))

    def op(self, op_type: str, name: str, inputs: list[Any], dtype: Any, **attrs: Any) -> gs.Variable:
        out = gs.Variable(self._unique(f"{name}_{op_type.lower()}"), dtype=dtype)
        self.nodes.append(gs.Node(op_type, self._unique(f"{name}/{op_type}"), attrs, inputs, [out]))
        return out


def _u8(v: int) -> np.ndarray:
    return np.array(v, dtype=np.uint8)


def requant_chain(e: _Emitter, name: str, acc: gs.Variable, mult: np.ndarray, shift: np.ndarray,
                  bias: np.ndarray, out: IntType, lo: int, hi: int, channel_axis_rank: int,
                  param_shape: tuple[int, ...] | None = None, acc_bound: list[int] | int | None = None,
                  channels: int | None = None) -> gs.Variable:
    """int32 (or exact float32) acc -> uint8 (q + zp); mult/shift/bias are per channel or scalar (or shaped
    ``param_shape``, e.g. one per output position). With ``acc_bound`` (|acc| before the bias, per channel or
    one value) the float64 chain of ``onnx_exact_float`` where it is proved exact (``channels``: the size of
    acc's axis 1, for its one-op scale and shift), else the uint64 chain."""
    shape = param_shape or ((1, -1) + (1,) * (channel_axis_rank - 2) if mult.size > 1 else ())
    m = mult.astype(object).reshape(-1)
    n = shift.astype(object).reshape(-1)
    b = np.broadcast_to(bias, m.shape).astype(object)
    zp = out.zero_point
    if acc_bound is not None:
        bounds = [int(v) for v in np.atleast_1d(np.asarray(acc_bound, dtype=object))]
        bounds = bounds if len(bounds) == len(m) else [max(bounds)] * len(m)
        fast = exact_float.f64_requant(e, name, acc, [int(v) for v in m], [int(v) for v in n], [int(v) for v in b],
                                       bounds, zp, lo, hi, shape if param_shape is None else param_shape, channels)
        if fast is not None:
            return fast
    offset = [(1 << int(k)) // 2 + (1 << OFFSET_BITS) + zp * (1 << int(k)) + int(bb) * int(mm)
              for k, bb, mm in zip(n, b, m, strict=True)]
    k_base = [(1 << OFFSET_BITS) >> int(k) for k in n]

    def u64(name_: str, vals: list[int]) -> gs.Constant:
        arr = np.array([v % (1 << 64) for v in vals], dtype=np.uint64)
        return e.const(name_, arr.reshape(shape) if shape else arr.reshape(()))

    x = e.op("Cast", name, [acc], np.uint64, to=onnx.TensorProto.UINT64)
    x = e.op("Mul", name, [x, u64(f"{name}_m", list(m))], np.uint64)
    x = e.op("Add", name, [x, u64(f"{name}_c", offset)], np.uint64)
    x = e.op("BitShift", name, [x, u64(f"{name}_n", list(n))], np.uint64, direction="RIGHT")
    x = e.op("Max", name, [x, u64(f"{name}_lo", [kb + zp + lo for kb in k_base])], np.uint64)
    x = e.op("Min", name, [x, u64(f"{name}_hi", [kb + zp + hi for kb in k_base])], np.uint64)
    return e.op("Cast", name, [x], np.uint8, to=onnx.TensorProto.UINT8)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _conv_integer(e: _Emitter, name: str, x: gs.Variable, inp: IntType, w: np.ndarray, w_bits: int,
                  **attrs: Any) -> gs.Variable:
    """ConvInteger for a conv weight [out, in, kh, kw]; MatMulInteger (on W^T) for a linear weight [out, in]."""
    storage = weight_storage(w_bits)
    if storage.onnx_type == onnx.TensorProto.UINT2:
        e.opset = max(e.opset, UINT2_OPSET)
    linear = w.ndim == 2
    stored = np.ascontiguousarray((w.T if linear else w) + storage.zero_point).astype(np.uint8)
    if storage.onnx_type == onnx.TensorProto.UINT8:
        weight: gs.Tensor = e.const(f"{name}_w", stored)
    else:
        weight = e.op("Cast", f"{name}_w", [e.packed(f"{name}_w_packed", stored, storage)], np.uint8,
                      to=onnx.TensorProto.UINT8)
    inputs = [x, weight, e.const(f"{name}_xzp", _u8(inp.zero_point)), e.const(f"{name}_wzp", _u8(storage.zero_point))]
    if linear:
        return e.op("MatMulInteger", name, inputs, np.int32)
    return e.op("ConvInteger", name, inputs, np.int32, kernel_shape=list(w.shape[2:]), **attrs)


def _storage_bits(w: np.ndarray) -> int:
    """The narrowest signed weight width that holds every value of ``w``."""
    return max(2, int(np.abs(w).max(initial=0)).bit_length() + 1)


def _conv_weights(e: _Emitter, name: str, x: gs.Variable, op: ops.IntConv2d | ops.IntLinear, w: np.ndarray,
                  **attrs: Any) -> gs.Variable:
    """ConvInteger on the weight codes; APoT codes beyond the uint8 container are split into lo/hi parts.

    For |k| > 127: k = hi * 2^7 + lo with hi = sign(k) (|k| >> 7), lo = sign(k) (|k| & 127), and
    acc = ConvInteger(x, hi) * 2^7 + ConvInteger(x, lo); |each part| <= sum |k| |q_x|, the verified bound.
    """
    if not isinstance(op, ops.SHIFT_ADD_OPS):
        return _conv_integer(e, name, x, op.inp, w, op.w_type.bits, **attrs)
    if _storage_bits(w) <= 8:
        return _conv_integer(e, name, x, op.inp, w, _storage_bits(w), **attrs)
    mag, sign = np.abs(w), np.sign(w)
    lo, hi = sign * (mag & (2**SPLIT_BITS - 1)), sign * (mag >> SPLIT_BITS)
    acc_lo = _conv_integer(e, f"{name}_lo", x, op.inp, lo, _storage_bits(lo), **attrs)
    acc_hi = _conv_integer(e, f"{name}_hi", x, op.inp, hi, _storage_bits(hi), **attrs)
    scaled = e.op("Mul", f"{name}_hi", [acc_hi, e.const(f"{name}_hi_scale", np.array(2**SPLIT_BITS, np.int32))],
                  np.int32)
    return e.op("Add", name, [scaled, acc_lo], np.int32)


def _xmax(t: IntType) -> int:
    return max(abs(t.lo), abs(t.hi))


def _export_conv(e: _Emitter, name: str, op: ops.IntConv2d, x: gs.Variable,
                 pool: ops.IntMaxPool2d | None = None, out_hw: tuple[int, int] = (0, 0)) -> gs.Variable:
    """Grouped convs as an exact float32 Conv where proved (``onnx_exact_float``), else ConvInteger.

    With ``pool`` (the conv's only user, a max pool): a dense conv too is a float32 Conv when proved exact,
    and the float32 accumulator is max-pooled BEFORE the float64 requantization (``_pooled_first``);
    otherwise the conv is exported alone and the pool acts on its uint8 output.
    """
    (ph, pw) = op.padding
    attrs = {"strides": list(op.stride), "pads": [ph, pw, ph, pw], "dilations": list(op.dilation), "group": op.groups}
    w, bias = _np(op.weight), _np(op.bias)
    bounds = exact_float.channel_bounds(w, _xmax(op.inp))
    pooled = pool is not None and _pooled_first(op, w, bias, bounds)
    acc = exact_float.float_conv(e, name, x, op.inp.zero_point, _xmax(op.inp), w, bias, **attrs) \
        if op.groups > 1 or pooled else None
    if acc is not None:  # the bias is inside the float32 accumulator
        bounds, bias = _with_bias(bounds, bias), np.zeros_like(bias)
    else:
        acc = _conv_weights(e, name, x, op, w, **attrs)
    if pooled and pool is not None:
        if acc.dtype != np.float32:  # int32: exact in float64, the chain's own type (MaxPool has no int32)
            acc = e.op("Cast", name, [acc], np.float64, to=onnx.TensorProto.DOUBLE)
        acc = _maxpool(e, f"{name}_pool", pool, acc, acc.dtype, out_hw)
    y = requant_chain(e, name, acc, _np(op.mult), _np(op.shift), bias, op.out, op.lo, op.hi, 4, acc_bound=bounds,
                      channels=w.shape[0])
    return y if pooled or pool is None else _maxpool(e, f"{name}_pool", pool, y, np.uint8, out_hw)


def _pooled_first(op: ops.IntConv2d, w: np.ndarray, bias: np.ndarray, bounds: list[int]) -> bool:
    """Whether conv + max pool may pool the accumulator first (module docstring): the float64
    requantization applies (bias included in the bound) and every multiplier is >= 0."""
    if isinstance(op, ops.SHIFT_ADD_OPS) or _np(op.mult).size not in (1, w.shape[0]) or np.any(_np(op.mult) < 0):
        return False
    def per_channel(v: np.ndarray) -> list[int]:
        return [int(x) for x in np.broadcast_to(v, (w.shape[0],)).tolist()]

    return exact_float.f64_fits(per_channel(_np(op.mult)), per_channel(_np(op.shift)), [0] * w.shape[0],
                                _with_bias(bounds, bias), op.out.zero_point)


def _with_bias(bounds: list[int], bias: np.ndarray) -> list[int]:
    """Per-channel accumulator bounds with |bias| added (bias per channel or one value)."""
    return [a + abs(int(v)) for a, v in zip(bounds, np.broadcast_to(bias, (len(bounds),)).tolist(), strict=True)]


def _export_conv_and_pool(e: _Emitter, node: fx.Node, op: ops.IntConv2d, x: gs.Variable) -> gs.Variable:
    """A conv (integer target), together with the max pool that is its only user, if any (``_export_conv``):
    the pool's output is recorded in ``e.fused`` for ``build_graph``."""
    gm, user = node.graph.owning_module, next(iter(node.users)) if len(node.users) == 1 else None
    assert gm is not None
    pool = gm.get_submodule(str(user.target)) if user is not None and user.op == "call_module" \
        and input_node(user) is node else None
    if user is None or not isinstance(pool, ops.IntMaxPool2d):
        return _export_conv(e, node.name, op, x)
    e.fused[user] = _export_conv(e, node.name, op, x, pool, _spatial(node))
    return e.fused[user]


def _export_linear(e: _Emitter, name: str, op: ops.IntLinear, x: gs.Variable) -> gs.Variable:
    w = _np(op.weight)
    acc = _conv_weights(e, name, x, op, w)  # MatMulInteger on [N, in] x W^T
    return requant_chain(e, name, acc, _np(op.mult), _np(op.shift), _np(op.bias), op.out, op.lo, op.hi, 2,
                         acc_bound=exact_float.channel_bounds(w, _xmax(op.inp)), channels=w.shape[0])


def _export_add(e: _Emitter, name: str, op: ops.IntAdd, a: gs.Variable, b: gs.Variable,
                channels: int | None) -> gs.Variable:
    a32 = e.op("Cast", name, [a], np.int32, to=onnx.TensorProto.INT32)
    b32 = e.op("Cast", name, [b], np.int32, to=onnx.TensorProto.INT32)
    acc = e.op("Add", name, [a32, b32], np.int32)
    zp_sum = -(op.inp[0].zero_point + op.inp[1].zero_point)
    return requant_chain(e, name, acc, _np(op.mult), _np(op.shift), np.array(zp_sum), op.out, op.lo, op.hi, 4,
                         acc_bound=2 * 255, channels=channels)


def _export_avgpool(e: _Emitter, name: str, op: ops.IntAvgPool2d, x: gs.Variable, channels: int) -> gs.Variable:
    ones = np.ones((channels, 1, *op.kernel), dtype=np.int64)
    (ph, pw) = op.padding
    attrs = {"strides": list(op.stride), "pads": [ph, pw, ph, pw], "group": channels}
    bound = int(np.prod(op.kernel)) * _xmax(op.inp)
    acc = exact_float.float_conv(e, name, x, op.inp.zero_point, _xmax(op.inp), ones, np.zeros(channels), **attrs)
    if acc is None:
        inputs = [x, e.const(f"{name}_ones", ones.astype(np.uint8)), e.const(f"{name}_xzp", _u8(op.inp.zero_point)),
                  e.const(f"{name}_wzp", _u8(0))]
        acc = e.op("ConvInteger", name, inputs, np.int32, kernel_shape=list(op.kernel), **attrs)
    return requant_chain(e, name, acc, _np(op.mult), _np(op.shift), np.array(0), op.out, op.lo, op.hi, 4,
                         acc_bound=bound, channels=channels)


def _export_quantize(e: _Emitter, name: str, op: ops.Quantize, x: gs.Variable) -> gs.Variable:
    scale = e.const(f"{name}_scale", np.array(op.scale, dtype=np.float32))
    q = e.op("QuantizeLinear", name, [x, scale, e.const(f"{name}_zp", _u8(op.out.zero_point))], np.uint8)
    return _clip(e, name, q, op.out, op.out.lo, op.out.hi)


def _clip(e: _Emitter, name: str, q: gs.Variable, t: IntType, lo: int, hi: int) -> gs.Variable:
    if (t.zero_point + lo, t.zero_point + hi) == (0, 255):
        return q
    bounds = [e.const(f"{name}_{k}", _u8(t.zero_point + v)) for k, v in (("min", lo), ("max", hi))]
    return e.op("Clip", name, [q, *bounds], np.uint8)


def _maxpool(e: _Emitter, name: str, op: ops.IntMaxPool2d, x: gs.Variable, dtype: Any,
             in_hw: tuple[int, int]) -> gs.Variable:
    """ONNX MaxPool with PyTorch's output size: ceil_mode becomes explicit end padding (``pool_extra``), since
    PyTorch drops a last window that would start in the end padding and ONNX's shape inference does not."""
    (ph, pw) = op.padding
    extra = [pool_extra(in_hw[i], op.kernel[i], op.stride[i], op.padding[i], op.dilation[i], op.ceil_mode)
             for i in range(2)]
    return e.op("MaxPool", name, [x], dtype, kernel_shape=list(op.kernel), strides=list(op.stride),
                pads=[ph, pw, ph + extra[0], pw + extra[1]], dilations=list(op.dilation))


def _spatial(node: fx.Node) -> tuple[int, int]:
    shape = get_info(node).shape
    assert shape is not None and len(shape) == 4, f"'{node.name}' has no recorded NCHW shape"
    return int(shape[2]), int(shape[3])


def _export_maxpool(e: _Emitter, node: fx.Node, op: ops.IntMaxPool2d, x: gs.Variable) -> gs.Variable:
    return _maxpool(e, node.name, op, x, np.uint8, _spatial(input_node(node)))


def _export_dequantize(e: _Emitter, name: str, op: ops.Dequantize, q: gs.Variable) -> gs.Variable:
    scale = e.const(f"{name}_scale", np.array(op.scale, dtype=np.float32))
    return e.op("DequantizeLinear", name, [q, scale, e.const(f"{name}_zp", _u8(op.inp.zero_point))], np.float32)


def _check_bits(op: ops.IntOp) -> None:
    inp = getattr(op, "inp", None)
    types = [getattr(op, "out", None), inp, *(inp if isinstance(inp, tuple) else ())]
    for t in types:
        if isinstance(t, IntType) and t.bits > 8:
            raise ExportError(f"{type(op).__name__} uses {t.bits}-bit values; the ONNX export supports at most 8")


Emitter = Callable[["_Emitter", fx.Node, Any, list[Any]], gs.Variable]


def _channels(node: fx.Node) -> int:
    shape = get_info(input_node(node)).shape
    assert shape is not None, f"'{node.name}' has no recorded input shape"
    return int(shape[1])


def _out_channels(node: fx.Node) -> int | None:
    shape = get_info(node).shape
    return int(shape[1]) if shape is not None and len(shape) > 1 else None


# target-independent ops: the integers move or clamp, nothing is requantized
SHARED_EMITTERS: dict[type, Emitter] = {
    ops.Quantize: lambda e, n, op, a: _export_quantize(e, n.name, op, *a),
    ops.Dequantize: lambda e, n, op, a: _export_dequantize(e, n.name, op, *a),
    ops.IntMaxPool2d: lambda e, n, op, a: _export_maxpool(e, n, op, *a),
    ops.IntClamp: lambda e, n, op, a: _clip(e, n.name, a[0], op.inp, op.lo, op.hi),
}
# the ``integer`` target: ConvInteger and the exact uint64 requantization chain
INTEGER_EMITTERS: dict[type, Emitter] = {
    **SHARED_EMITTERS,
    ops.IntConv2d: lambda e, n, op, a: _export_conv_and_pool(e, n, op, a[0]),
    ops.IntShiftConv2d: lambda e, n, op, a: _export_conv_and_pool(e, n, op, a[0]),
    ops.IntLinear: lambda e, n, op, a: _export_linear(e, n.name, op, *a),
    ops.IntShiftLinear: lambda e, n, op, a: _export_linear(e, n.name, op, *a),
    ops.IntAdd: lambda e, n, op, a: _export_add(e, n.name, op, a[0], a[1], _out_channels(n)),
    ops.IntAvgPool2d: lambda e, n, op, a: _export_avgpool(e, n.name, op, a[0], _channels(n)),
}


def emitters(target: Target) -> dict[type, Emitter]:
    """The ONNX emitter of every integer op for ``target`` (a test checks every op has one per target)."""
    if target is Target.INTEGER:
        return INTEGER_EMITTERS
    from qcompile.backends.onnx_ort import ORT_EMITTERS

    return ORT_EMITTERS


def _export_module(e: _Emitter, node: fx.Node, op: torch.nn.Module, args: list[Any]) -> gs.Variable:
    if not isinstance(op, ops.IntOp):
        raise ExportError(f"no ONNX lowering for {type(op).__name__}")
    _check_bits(op)
    emit = emitters(e.target).get(type(op))
    if emit is None:
        raise ExportError(f"no ONNX lowering for {type(op).__name__} under target '{e.target.value}'")
    return emit(e, node, op, args)


def _int_const(node: fx.Node, v: fx.node.Argument) -> int:
    """An int constant argument of ``node`` (a dim)."""
    assert isinstance(v, int), f"'{node.name}' has a non-constant argument {v!r}"
    return v


def _export_function(e: _Emitter, node: fx.Node, args: list[Any]) -> gs.Variable:
    if node.target is torch.flatten:
        return e.op("Flatten", node.name, [args[0]], np.uint8, axis=_int_const(node, node.args[1]))
    if node.target is torch.reshape:
        shape = e.const(f"{node.name}_shape", np.array(node.args[1], dtype=np.int64))
        return e.op("Reshape", node.name, [args[0], shape], np.uint8)
    if node.target is torch.cat:
        return e.op("Concat", node.name, list(args[0]), np.uint8, axis=_int_const(node, node.kwargs.get("dim", 1)))
    if node.target is torch.permute:
        perm: Any = node.args[1]
        return e.op("Transpose", node.name, [args[0]], np.uint8, perm=[int(d) for d in perm])
    if node.target is torch.narrow:
        return _export_narrow(e, node, args[0])
    if node.target is upsample_nearest:
        factors: Any = node.args[1]
        scales = e.const(f"{node.name}_scales", np.array([1, 1, *factors], dtype=np.float32))
        return e.op("Resize", node.name, [args[0], gs.Variable.empty(), scales], np.uint8, mode="nearest",
                    coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    if node.target is dilate_pad:
        return _export_dilate(e, node, args[0])
    raise ExportError(f"no ONNX lowering for {node.target}")


def _export_dilate(e: _Emitter, node: fx.Node, x: gs.Variable) -> gs.Variable:
    """``dilate_pad`` on the uint8 container: the inserted and padded value is the zero point (ir/movement.py)."""
    src = input_node(node)
    shape, itype = get_info(src).shape, get_info(src).itype
    assert shape is not None and itype is not None, f"'{src.name}' has no recorded shape or type"
    (sh, sw), pads = dilate_settings(node.args)
    _, c, h, w = shape
    zp = e.const(f"{node.name}_zero", _u8(itype.zero_point))
    if (sh, sw) != (1, 1):
        split = e.const(f"{node.name}_split", np.array([0, c, h, 1, w, 1], dtype=np.int64))
        x = e.op("Reshape", node.name, [x, split], np.uint8)
        gaps = e.const(f"{node.name}_gaps", np.array([0] * 9 + [sh - 1, 0, sw - 1], dtype=np.int64))
        x = e.op("Pad", node.name, [x, gaps, zp], np.uint8)
        joined = e.const(f"{node.name}_joined", np.array([0, c, h * sh, w * sw], dtype=np.int64))
        x = e.op("Reshape", node.name, [x, joined], np.uint8)
        bounds = [e.const(f"{node.name}_{k}", np.array(v, dtype=np.int64))
                  for k, v in (("starts", [0, 0]), ("ends", [sh * (h - 1) + 1, sw * (w - 1) + 1]), ("axes", [2, 3]))]
        x = e.op("Slice", node.name, [x, *bounds], np.uint8)
    if any(pads):  # ONNX Pad crops where a pad is negative
        top, left, bottom, right = pads
        edges = e.const(f"{node.name}_pads", np.array([0, 0, top, left, 0, 0, bottom, right], dtype=np.int64))
        x = e.op("Pad", node.name, [x, edges, zp], np.uint8)
    return x


def _export_narrow(e: _Emitter, node: fx.Node, x: gs.Variable) -> gs.Variable:
    dim, start, length = (_int_const(node, v) for v in node.args[1:4])
    bounds = [e.const(f"{node.name}_{k}", np.array([v], dtype=np.int64))
              for k, v in (("starts", start), ("ends", start + length), ("axes", dim))]
    return e.op("Slice", node.name, [x, *bounds], np.uint8)


def _batch_shape(node: fx.Node) -> list[Any]:
    shape = get_info(node).shape
    if shape is None:
        raise ExportError(f"node {node.name} has no recorded shape; compile with example inputs")
    return ["batch", *shape[1:]]


def build_graph(gm: fx.GraphModule, ort_cpu: str = "any") -> gs.Graph:
    e = _Emitter(get_target(gm), ort_cpu)
    values: dict[fx.Node, Any] = {}
    inputs, outputs = [], []
    for node in gm.graph.nodes:
        args = fx.node.map_arg(list(node.args), values.__getitem__)
        if node.op == "placeholder":
            var = gs.Variable(e._unique(node.name), dtype=np.float32, shape=_batch_shape(node))
            values[node] = var
            inputs.append(var)
        elif node in e.fused:  # a max pool exported with its conv
            values[node] = e.fused[node]
        elif node.op == "call_module":
            values[node] = _export_module(e, node, gm.get_submodule(str(node.target)), args)
        elif node.op == "call_function":
            values[node] = _export_function(e, node, args)
        elif node.op == "output":
            for src in torch.utils._pytree.tree_leaves(node.args[0]):
                var = values[src]
                var.shape = _batch_shape(src)
                outputs.append(var)
    return gs.Graph(nodes=e.nodes, inputs=inputs, outputs=outputs, name="qcompile", opset=e.opset,
                    producer_name="qcompile", ir_version=IR_VERSION[e.opset])


ORT_CPUS = ("any", "avx2", "vnni")


def export_onnx(gm: fx.GraphModule, ort_cpu: str = "any") -> onnx.ModelProto:
    """The integer graph as an ONNX model that passes onnx.checker's full check.

    ``ort_cpu`` (``ort`` target only): ``any`` keeps every layer exact on every x86 CPU (8-bit weights
    take onnxruntime's u8 x u8 path); ``avx2`` is the same export for graphs compiled with
    ``ort_cpu="avx2"``, whose weights are at most 7 bits (|q| <= 63: int8 everywhere, exact on every x86
    CPU); ``vnni`` stores every weight as int8 (u8 x s8, faster), exact on CPUs with VNNI but not on
    AVX2-only CPUs, whose u8 x s8 kernels saturate 16-bit pair sums (ONNX_NOTES).
    The metadata records the target and this choice.
    """
    if ort_cpu not in ORT_CPUS:
        raise ExportError(f"unknown --ort-cpu '{ort_cpu}' (valid: {', '.join(ORT_CPUS)})")
    graph = build_graph(gm, ort_cpu)
    for i, out in enumerate(graph.outputs):
        out.name = "output" if len(graph.outputs) == 1 else f"output_{i}"
    for i, inp in enumerate(graph.inputs):
        inp.name = "input" if len(graph.inputs) == 1 else f"input_{i}"
    model = gs.export_onnx(graph, do_type_check=True)
    model.ir_version = IR_VERSION[graph.opset]
    model.opset_import[0].version = graph.opset
    target = get_target(gm)
    onnx.helper.set_model_props(model, {"qcompile.target": target.value,
                                        **({"qcompile.ort_cpu": ort_cpu} if target is Target.ORT else {})})
    onnx.checker.check_model(model, full_check=True)
    return model


from qcompile.backends import onnx_pointwise as _pointwise  # noqa: E402,F401 - registers the pointwise emitters
