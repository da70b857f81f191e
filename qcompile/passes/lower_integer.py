"""lower-integer: replace the quant graph by integer ops that follow the integer contract.

For a layer with input scale s_x, per-channel weight scales s_w[c] and output quantizer scale s_y:
  q_w = clamp(round(W / s_w[c]), -(2^(b-1)-1), 2^(b-1)-1),  q_b = round(b / (s_x * s_w[c])),
  M[c] = s_x * s_w[c] / s_y ~ m[c] * 2^-n[c]  (contract.quantize_multiplier),
and the ReLU/clamps folded into the quantizer become the clamp bounds
  lo = max(type.lo, round(min / s_y)),  hi = min(type.hi, round(max / s_y)).
APoT layers (quant/apot.py) store their codes k (W_hat = s k, s = std(W) alpha / k_max for the whole
layer) as power-of-two terms in IntShiftConv2d/IntShiftLinear, with q_b = round(b / (s_x s)) and
M[c] = s_x s / s_y.
Residual adds use M = s_in / s_y on q_a + q_b (share-scales made the inputs' scales equal);
average pools use M = s_x / (k * s_y) on the window sum. Max pooling, reshapes and concatenation act on
integers; a concatenated constant (class token) is put on its neighbour's grid, round(c / s_x), clamped.
Tables, products of two activations and LayerNorms: passes/rules/lower_pointwise.py.
A ReLU/clamp that could not fold becomes an IntClamp. Refused before anything becomes an
integer, naming the layer: NaN/Inf weights, biases or scales, a q_b outside int32 (a bias out of proportion
to s_x * s_w), and a multiplier M >= 2^30 or < 2^-46 (m * 2^-54 would keep fewer than 8 of its bits).
Inputs get a Quantize, outputs a Dequantize: the only float ops. Not handled: adds/cats whose inputs
have different scales (run share-scales first), and clamps whose bounds are not on the grid of an
unfused tensor (rounded to it).
"""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from qcompile.ir import contract
from qcompile.ir import intops as ops
from qcompile.ir.attention import ConstCat
from qcompile.ir.meta import IntType, NodeInfo, Stage, get_info, set_info, set_target
from qcompile.ir.rewrite import input_node, input_nodes
from qcompile.ir.shapes import annotate_shapes, pair
from qcompile.passes.base import Pass, PassContext, PassResult, PreconditionError, option, register_pass
from qcompile.passes.rules.lower_elementwise import lower_elementwise
from qcompile.passes.rules.lower_pointwise import lower_point
from qcompile.passes.rules.lower_pools import lower_pool_table
from qcompile.quant import graph, integer_sim
from qcompile.quant.apot import APoTWeightQuant, terms_of_codes
from qcompile.quant.modules import ActQuant, QConv2d, QLinear, layer_weight, layer_weight_scale


@dataclass(frozen=True)
class Value:
    """An integer tensor in the new graph: its node, type and scale."""

    node: fx.Node
    itype: IntType
    scale: float


def _clamp_bounds(clamps: list[fx.Node], itype: IntType, scale: float) -> tuple[int, int]:
    lo, hi = graph.clamp_bounds(graph.clamp_limits(clamps), itype, scale)
    if lo > hi:
        raise PreconditionError(f"clamp {clamps[-1].name} leaves no representable value")
    return lo, hi


class _Lowering:
    """State of one lowering: the new graph, its root module, the map old node -> Value, and the target."""

    def __init__(self, gm: fx.GraphModule, target: contract.Target) -> None:
        self.old, self.graph, self.root = gm, fx.Graph(), nn.Module()
        self.values: dict[fx.Node, Value | fx.Node] = {}
        self.target = target

    def requant(self, real: Any) -> dict[str, Any]:
        """Both forms of the real multiplier(s) M and the target: the requantizing ops' keyword arguments."""
        reals = np.asarray(real, dtype=np.float64)
        mult, shift = multipliers(reals)  # refuses what neither target can hold (same domain for both)
        return {"mult": mult, "shift": shift, "fmult": contract.float_multipliers(reals), "target": self.target}

    def emit(self, name: str, op: nn.Module, args: tuple[Any, ...], out: IntType, scale: float,
             origin: fx.Node | None = None) -> Value:
        target = name.replace(".", "_")
        while hasattr(self.root, target):
            target += "_"
        self.root.add_module(target, op)
        node = self.graph.call_module(target, args)
        layer = str(origin.target) if origin is not None and origin.op == "call_module" else None
        node.meta["qc"] = NodeInfo(itype=out, scale=scale, layer=layer,
                                   source=get_info(origin).source if origin is not None else None)
        return Value(node, out, scale)

    def value(self, node: fx.Node) -> Value:
        v = self.values[node]
        if not isinstance(v, Value):
            raise PreconditionError(f"'{node}' is used as an integer tensor but was never quantized")
        return v


def _weights(layer: QConv2d | QLinear, s_x: float, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q_w from the quantizer's own output W_q (already on its grid), q_b from the bias the layer uses."""
    with torch.no_grad():
        w = layer_weight(layer).detach().double()
        s_w = _weight_scale(layer, name)
        b = layer.weight_quant.quant_bias(layer.bias)
    t = layer.weight_quant.itype
    _require_finite("weights", w)
    _require_finite("weight scales", s_w)
    q_w = torch.round(w / s_w.view(-1, *[1] * (w.dim() - 1))).clamp(t.lo, t.hi).to(torch.int64)
    bias = b.detach().double() if b is not None else torch.zeros_like(s_w)
    return q_w, bias_codes(bias, s_x * s_w), s_w


def _weight_scale(layer: QConv2d | QLinear, name: str) -> torch.Tensor:
    """s_w as the layer's forward uses it; says so when the bias floor (quant.modules) raised it."""
    s_w = layer_weight_scale(layer)
    assert s_w is not None, "a weight quantizer without a scale"
    raised = int((s_w > layer.weight_quant.scale(layer.weight.detach())).sum())
    if raised:
        warnings.warn(f"layer '{name}', {raised} of {s_w.numel()} channels: weight scale raised so the bias fits "
                      "int32 (the bias is out of proportion to s_x * max|W|; their weights round to few levels)",
                      stacklevel=2)
    return s_w.double()


def _require_finite(what: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise PreconditionError(f"{what} contain NaN or Inf; fix the model's parameters")


def bias_codes(bias: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """q_b = round(b / step) on the accumulator grid, refused before the integer cast unless it fits int32."""
    _require_finite("bias values", bias)
    q = torch.round(bias / step)
    bad = ~torch.isfinite(q) | (q.abs() > contract.INT32_MAX)
    if bool(bad.any()):
        c = int(bad.nonzero()[0, 0]) if bias.dim() else 0
        b, st = float(bias.reshape(-1)[c]), float(step.reshape(-1)[c] if step.dim() else step)
        raise PreconditionError(
            f"bias {b:.3g} of channel {c} is {b / st if st else math.inf:.3g} accumulator steps (s_x*s_w = {st:.3g}), "
            "beyond int32; the bias is out of proportion to the weights and input range: check the model"
        )
    return q.to(torch.int64)


MIN_MANTISSA = 2**8  # fewer significant bits than this and the dyadic multiplier is not the real one


def multipliers(reals: Any) -> tuple[Any, Any]:
    """contract.quantize_multipliers, refused when a multiplier is not finite, >= 2^30, or so small
    (< 2^-46) that m * 2^-MAX_SHIFT keeps fewer than 8 of its bits."""
    try:
        m, n = contract.quantize_multipliers(reals)
    except contract.MultiplierError as exc:
        raise PreconditionError(f"{exc}; the input, weight and output scales are out of proportion") from None
    if (m < MIN_MANTISSA).any():
        tiny = float(np.asarray(reals, dtype=np.float64).reshape(-1)[int(np.argmin(m))])
        raise PreconditionError(f"requantization multiplier {tiny:.3g} is too small for the dyadic form "
                                "(< 2^-46); the weights are negligible against the output range: check the model")
    return m, n


def _apot_weights(layer: QConv2d | QLinear, q: APoTWeightQuant,
                  s_x: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """APoT codes k (W_hat = s k), q_b = round(b / (s_x s)), s per channel (one value per layer)."""
    with torch.no_grad():
        k, s_w = q.codes(layer.weight), q.scale(layer.weight).double()
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(s_w)
    return k, bias_codes(bias, s_x * s_w), s_w


def _make_op(layer: QConv2d | QLinear, q_w: torch.Tensor, requant: dict[str, Any]) -> nn.Module:
    """IntConv2d/IntLinear, or their shift-add forms with the codes as power-of-two terms (APoT)."""
    q = layer.weight_quant
    kwargs = {**requant, **(_conv_attrs(layer) if isinstance(layer, QConv2d) else {})}
    if isinstance(q, APoTWeightQuant):
        signs, exps = terms_of_codes(q_w, q.level_set)
        shift_op = ops.IntShiftConv2d if isinstance(layer, QConv2d) else ops.IntShiftLinear
        return shift_op(signs, exps, bits=q.bits, **kwargs)
    plain = ops.IntConv2d if isinstance(layer, QConv2d) else ops.IntLinear
    return plain(q_w, **kwargs)


def _conv_attrs(layer: QConv2d) -> dict[str, Any]:
    if isinstance(layer.padding, str):
        raise PreconditionError(f"conv has padding='{layer.padding}'; give it as numbers")
    return {"stride": pair(layer.stride), "padding": pair(layer.padding), "dilation": pair(layer.dilation),
            "groups": layer.groups}


def _lower_layer(lw: _Lowering, point: fx.Node, layer: QConv2d | QLinear, out: IntType, s_y: float,
                 bounds: tuple[int, int]) -> Value:
    x = lw.value(input_node(point))
    q, name = layer.weight_quant, str(point.target)
    try:
        if isinstance(q, APoTWeightQuant):
            q_w, q_b, s_w = _apot_weights(layer, q, x.scale)
        else:
            q_w, q_b, s_w = _weights(layer, x.scale, name)
        requant: dict[str, Any] = {"bias": q_b, **lw.requant((x.scale * s_w / s_y).numpy()), "inp": x.itype,
                                   "w_type": q.itype, "out": out, "lo": bounds[0], "hi": bounds[1]}
        op = _make_op(layer, q_w, requant)
    except PreconditionError as exc:
        raise PreconditionError(f"layer '{point.target}': {exc}") from None
    return lw.emit(str(point.target), op, (x.node,), out, s_y, point)


def _lower_add(lw: _Lowering, point: fx.Node, out: IntType, s_y: float, bounds: tuple[int, int]) -> Value:
    a, b = lw.value(input_node(point, 0)), lw.value(input_node(point, 1))
    if not math.isclose(a.scale, b.scale, rel_tol=1e-9):
        raise PreconditionError(f"inputs of add '{point.name}' have different scales; run share-scales first")
    try:
        op = ops.IntAdd(**lw.requant(a.scale / s_y), inp=(a.itype, b.itype), out=out, lo=bounds[0], hi=bounds[1])
    except PreconditionError as exc:
        raise PreconditionError(f"add '{point.name}': {exc}") from None
    return lw.emit(point.name, op, (a.node, b.node), out, s_y, point)


def _lower_avgpool(lw: _Lowering, point: fx.Node, pool: nn.Module, out: IntType, s_y: float,
                   bounds: tuple[int, int]) -> Value:
    table = lower_pool_table(lw, point, pool, out, s_y, bounds)
    if table is not None:  # the divisor varies per window (or bilinear weights)
        return table
    assert isinstance(pool, (nn.AvgPool2d, nn.AdaptiveAvgPool2d))
    src = input_node(point)
    x = lw.value(src)
    if isinstance(pool, nn.AdaptiveAvgPool2d):
        shape = get_info(src).shape
        assert shape is not None
        kernel, stride, padding = (shape[2], shape[3]), (1, 1), (0, 0)
    else:
        kernel, stride, padding = pair(pool.kernel_size), pair(pool.stride), pair(pool.padding)
    try:
        op = ops.IntAvgPool2d(**lw.requant(x.scale / (kernel[0] * kernel[1] * s_y)), kernel=kernel, stride=stride,
                              padding=padding, inp=x.itype, out=out, lo=bounds[0], hi=bounds[1])
    except PreconditionError as exc:
        raise PreconditionError(f"pool '{point.name}': {exc}") from None
    return lw.emit(point.name, op, (x.node,), out, s_y, point)


def _lower_quant(lw: _Lowering, qnode: fx.Node, q: ActQuant) -> Value:
    point, clamps = graph.chain_start(lw.old, qnode)
    s_y, out = float(q.scale), q.itype
    bounds = _clamp_bounds(clamps, out, s_y)
    mod = graph.module(lw.old, point)
    if point.op == "placeholder":
        v = lw.emit(f"{point.name}_quantize", ops.Quantize(s_y, out), (lw.values[point],), out, s_y)
        if bounds != (out.lo, out.hi):
            v = lw.emit(f"{point.name}_clamp", ops.IntClamp(*bounds, inp=out), (v.node,), out, s_y)
        return v
    if isinstance(mod, (QConv2d, QLinear)):
        return _lower_layer(lw, point, mod, out, s_y, bounds)
    if point.op == "call_function" and point.target is operator.add:
        return _lower_add(lw, point, out, s_y, bounds)
    if (pointwise := lower_point(lw, point, mod, out, s_y, bounds)) is not None:  # tables, products
        return pointwise
    if (lowered := lower_elementwise(lw, point, mod, out, s_y, bounds)) is not None:  # constants, a - b
        return lowered
    assert isinstance(mod, (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Upsample)), f"unexpected point '{point.name}'"
    return _lower_avgpool(lw, point, mod, out, s_y, bounds)


def _lower_pass_through(lw: _Lowering, node: fx.Node) -> Value:
    mod = graph.module(lw.old, node)
    if isinstance(mod, nn.MaxPool2d):
        x = lw.value(input_node(node))
        op = ops.IntMaxPool2d(kernel=pair(mod.kernel_size), stride=pair(mod.stride), padding=pair(mod.padding),
                              dilation=pair(mod.dilation), ceil_mode=mod.ceil_mode, inp=x.itype)
        return lw.emit(node.name, op, (x.node,), x.itype, x.scale, node)
    if isinstance(mod, ConstCat):
        return _lower_const_cat(lw, node, mod)
    if node.target in graph.CLAMPS:
        x = lw.value(input_node(node))
        lo, hi = _clamp_bounds([node], x.itype, x.scale)
        return lw.emit(node.name, ops.IntClamp(lo, hi, inp=x.itype), (x.node,), x.itype, x.scale, node)
    if node.target is torch.cat:
        parts = [lw.value(a) for a in input_nodes(node)]
        if len({(p.scale, p.itype) for p in parts}) != 1:
            raise PreconditionError(f"inputs of cat '{node.name}' have different scales; run share-scales first")
        new = lw.graph.call_function(torch.cat, ([p.node for p in parts],), {"dim": 1})
        return _typed(new, parts[0])
    x = lw.value(input_node(node))
    assert callable(node.target), f"'{node.name}' is not a function call"
    new = lw.graph.call_function(node.target, (x.node, *node.args[1:]))
    return _typed(new, x)


def _lower_const_cat(lw: _Lowering, node: fx.Node, mod: ConstCat) -> Value:
    """The constant on the input's grid: q_c = clamp(round(c / s_x), lo, hi) of the input type."""
    x = lw.value(input_node(node))
    _require_finite("constants", mod.value)
    q = torch.round(mod.value.double() / x.scale).clamp(x.itype.lo, x.itype.hi).to(torch.int64)
    op = ops.IntConstCat(q, dim=mod.dim, first=mod.first, inp=x.itype)
    return lw.emit(node.name, op, (x.node,), x.itype, x.scale, node)


def _typed(node: fx.Node, like: Value) -> Value:
    set_info(node, itype=like.itype, scale=like.scale)
    return Value(node, like.itype, like.scale)


def _lower_output(lw: _Lowering, node: fx.Node) -> None:
    def dequantize(arg: fx.Node) -> fx.Node:
        v = lw.value(arg)
        return lw.emit(f"{arg.name}_dequantize", ops.Dequantize(v.scale, v.itype), (v.node,), v.itype,
                       v.scale).node

    lw.graph.output(fx.node.map_arg(node.args[0], dequantize))


def lower(gm: fx.GraphModule, target: contract.Target = contract.Target.INTEGER) -> fx.GraphModule:
    gm.eval()  # learned quantizers lower their deterministic (eval) behaviour
    lw = _Lowering(gm, target)
    consumed = set()
    for qnode, _ in graph.act_quants(gm):
        point, clamps = graph.chain_start(gm, qnode)
        consumed.update([point, *clamps] if point.op != "placeholder" else clamps)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            lw.values[node] = lw.graph.placeholder(node.name)
        elif node.op == "output":
            _lower_output(lw, node)
        elif node in consumed:
            continue
        elif isinstance(q := graph.module(gm, node), ActQuant):
            lw.values[node] = _lower_quant(lw, node, q)
        else:
            lw.values[node] = _lower_pass_through(lw, node)
    lw.graph.set_codegen(gm.graph._codegen)  # same inputs and outputs: keep the model's calling convention
    new = fx.GraphModule(lw.root, lw.graph, "IntegerGraph")
    set_target(new, target)
    return new


@register_pass
@dataclass(frozen=True)
class LowerInteger(Pass):
    name = "lower-integer"
    summary = "lower the quant graph to integer ops (int32 bias, folded ReLU; ort or dyadic requantization)"
    requires = (Stage.QUANT,)
    produces = Stage.INTEGER
    target: str = option("ort", "requantization contract: ort (float32, onnxruntime's fused kernels) or "
                                "integer (dyadic, integer-only hardware)")

    def __post_init__(self) -> None:
        try:
            contract.Target.parse(self.target)
        except ValueError as exc:
            raise PreconditionError(f"lower-integer: {exc}") from None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        uncalibrated = [n.name for n, q in graph.act_quants(gm) if not q.calibrated]
        if uncalibrated:
            raise PreconditionError(f"activation quantizers {uncalibrated} are not calibrated; run calibrate first")
        annotate_shapes(gm, ctx.example_inputs)
        target = contract.Target.parse(self.target)
        graph.bind_input_scales(gm)  # the quant graph left behind simulates the biases the lowering stores
        integer_sim.bind_simulation(gm, target)  # ... and the integer LayerNorm, softmax and constants
        new = lower(gm, target)
        annotate_shapes(new, ctx.example_inputs)
        return PassResult(new, True)
