"""Cost models over an integer graph; every report prints all of them.

Per layer l (conv or linear), with MACs_l multiply-accumulates per input sample:
  BOPs          = MACs_l * b_w * b_a                (quadratic, energy-like)
  linear bits   = MACs_l * max(b_w, b_a)
  weight memory = ceil(params_l * b_w / 8) bytes   (biases excluded, they are int32 everywhere)
and activation memory = bytes of the layer's input for one sample (in_elems * b_a / 8); the graph-wide
``activation_bytes`` counts every integer tensor once. Per sample counts a folded batch axis whole: where a
reshape put N k rows on axis 0 (``passes/rules/batch_fold.py``), each sample owns k of them.
Relative BOPs = sum BOPs / sum (MACs * 32 * 32), in percent, where the denominator's MACs are those of the
model as given (``dense_totals`` of the float graph): a pruned channel lowers BOPs, not the reference.
Compression against float32 likewise counts the given model's parameters. b_a is the bit-width of the
layer's input.
A transposed convolution (a conv fed by ``dilate_pad``, passes/rules/canonical_transposed.py) counts its
own MACs: the products of a kernel tap with a real input pixel that land inside the output, C_out C_in/g
times the (output, tap) pairs per axis that read an input pixel, not those with the inserted zeros or the
padding (the exported ConvInteger/QLinearConv does compute those, about s_h s_w times more; the report
labels such a layer ``ConvTranspose2d``).
Multiplier use: a layer multiplies (``multiplies`` = MACs_l) unless its weights are APoT power-of-two
terms; then every product is ``terms`` shifts and adds (``shift_adds`` = terms * MACs_l, terms = the
level set's additive terms per weight, an upper bound on the non-zero ones) and b_w is the APoT
bit-width. ``multiplier_free_percent`` = MACs of shift-add layers / all MACs.
``COST_MODELS`` names the per-layer models a search can be given (bops, linear-bits, weight-memory,
activation-memory).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.fx as fx

from qcompile.ir import intops as ops
from qcompile.ir.meta import get_info
from qcompile.ir.movement import dilate_pad, dilate_settings
from qcompile.ir.rewrite import input_node
from qcompile.ir.shapes import pair


@dataclass(frozen=True)
class LayerCost:
    name: str
    op: str
    w_bits: int
    a_bits: int
    macs: int
    params: int
    in_elems: int = 0  # elements of the layer's input for one sample
    terms: int = 0  # additive power-of-two terms per weight of a shift-add (APoT) layer; 0: it multiplies

    @property
    def multiplies(self) -> int:
        return 0 if self.terms else self.macs

    @property
    def shift_adds(self) -> int:
        return self.terms * self.macs

    @property
    def input_bytes(self) -> int:
        """Activation memory of the layer's input: in_elems * b_a / 8 bytes."""
        return math.ceil(self.in_elems * self.a_bits / 8)

    @property
    def bops(self) -> int:
        return self.macs * self.w_bits * self.a_bits

    @property
    def linear_bits(self) -> int:
        return self.macs * max(self.w_bits, self.a_bits)

    @property
    def weight_bytes(self) -> int:
        return math.ceil(self.params * self.w_bits / 8)

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "bops": self.bops, "linear_bits": self.linear_bits, "weight_bytes": self.weight_bytes,
                "input_bytes": self.input_bytes, "multiplies": self.multiplies, "shift_adds": self.shift_adds}


CostModel = Callable[[LayerCost], float]
COST_MODELS: dict[str, CostModel] = {
    "bops": lambda c: float(c.bops),
    "linear-bits": lambda c: float(c.linear_bits),
    "weight-memory": lambda c: float(c.weight_bytes),
    "activation-memory": lambda c: float(c.input_bytes),
}


def cost_model(name: str) -> CostModel:
    if name not in COST_MODELS:
        raise KeyError(f"unknown cost model '{name}' (known: {', '.join(COST_MODELS)})")
    return COST_MODELS[name]


def _rows_per_sample(node: fx.Node, shape: tuple[int, ...]) -> int:
    """How many per-sample rows axis 0 of ``shape`` holds: 1, or k where the graph folded a factor k into the
    batch (``passes/rules/batch_fold.py``: [N, ...] -> [N k, ...]); shapes are recorded at the example input's
    batch, the first placeholder's axis 0."""
    for p in node.graph.nodes:
        if p.op == "placeholder":
            first = get_info(p).shape
            return max(shape[0] // first[0], 1) if first and first[0] > 0 and shape else 1
    return 1


def _per_sample(node: fx.Node, shape: tuple[int, ...], start: int = 1, stop: int | None = None) -> int:
    """prod(shape[start:stop]) for one input sample, the rows of a folded axis 0 included."""
    return _rows_per_sample(node, shape) * math.prod(shape[start:stop])


def _input_elems(node: fx.Node) -> int:
    src = node.args[0]
    shape = get_info(src).shape if isinstance(src, fx.Node) else None
    return _per_sample(node, shape) if shape else 0


def _dilated_input(node: fx.Node) -> fx.Node | None:
    """The ``dilate_pad`` call feeding a conv that computes a transposed convolution, else None."""
    src = node.args[0]
    return src if isinstance(src, fx.Node) and src.op == "call_function" and src.target is dilate_pad else None


def _real_taps(out: int, k: int, d: int, s: int, begin: int, size: int) -> int:
    """Pairs (output position, tap) of one axis whose tap reads a real input pixel, not an inserted zero."""
    count = 0
    for o in range(out):
        for t in range(k):
            i = o + t * d - begin  # position in the zero-inserted input before padding
            count += i >= 0 and i % s == 0 and i // s < size
    return count


def _macs(node: fx.Node, mod: torch.nn.Module, is_conv: bool) -> int:
    shape = get_info(node).shape
    assert shape is not None, f"{node.name} has no recorded shape"
    weight: torch.Tensor = mod.weight  # type: ignore[assignment]
    dilated = _dilated_input(node) if is_conv else None
    if dilated is not None:  # a transposed convolution: count its own products, not those with inserted zeros
        in_shape = get_info(input_node(dilated)).shape
        assert in_shape is not None, f"{dilated.name} has no recorded input shape"
        (sh, sw), (top, left, _, _) = dilate_settings(dilated.args)
        dh, dw = pair(mod.dilation)  # type: ignore[arg-type]
        rows = _real_taps(shape[2], weight.shape[2], dh, sh, top, in_shape[2])
        cols = _real_taps(shape[3], weight.shape[3], dw, sw, left, in_shape[3])
        return int(weight.shape[0] * weight.shape[1]) * rows * cols
    per_position = _per_sample(node, shape, 2) if is_conv else _per_sample(node, shape, 1, -1)
    return int(weight.numel()) * per_position


def _conv_kind(node: fx.Node) -> str:
    return "ConvTranspose2d" if _dilated_input(node) is not None else "Conv2d"


def layer_costs(gm: fx.GraphModule) -> list[LayerCost]:
    """One LayerCost per integer conv/linear layer, in graph order."""
    costs = []
    for node in gm.graph.nodes:
        mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if isinstance(mod, (ops.IntConv2d, ops.IntLinear)):
            is_conv = isinstance(mod, ops.IntConv2d)
            kind = _conv_kind(node) if is_conv else "Linear"
            name = get_info(node).layer or node.name
            macs, params = _macs(node, mod, is_conv), int(mod.weight.numel())
            w_bits, terms = (mod.bits, mod.terms) if isinstance(mod, ops.SHIFT_ADD_OPS) else (mod.w_type.bits, 0)
            costs.append(LayerCost(name, kind, w_bits, mod.inp.bits, macs, params, _input_elems(node), terms))
    return costs


def quant_layer_costs(gm: fx.GraphModule) -> list[LayerCost]:
    """LayerCosts of a quant-stage graph (shapes annotated) from its quantizers' current bits."""
    from qcompile.quant import graph
    from qcompile.quant.apot import multiplier_free_terms
    from qcompile.quant.modules import QConv2d

    costs = []
    for node, layer in graph.layers(gm):
        roots = graph.roots(gm, input_node(node))
        a_bits = max((graph.act_quant(gm, r).bits for r in roots), default=8)
        is_conv = isinstance(layer, QConv2d)
        macs = _macs(node, layer, is_conv)
        costs.append(LayerCost(str(node.target), _conv_kind(node) if is_conv else "Linear", layer.weight_quant.bits,
                               a_bits, macs, int(layer.weight.numel()), _input_elems(node),
                               multiplier_free_terms(layer.weight_quant)))
    return costs


def dense_totals(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> tuple[int, int]:
    """(MACs, parameters) of every Conv2d/Linear of a float-stage graph: the reference before pruning."""
    from qcompile.ir.shapes import annotate_shapes

    annotate_shapes(gm, example_inputs)
    macs = params = 0
    for node in gm.graph.nodes:
        mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            macs += _macs(node, mod, isinstance(mod, torch.nn.Conv2d))
            params += int(mod.weight.numel())
    return macs, params


def activation_bytes(gm: fx.GraphModule) -> int:
    """Bytes of every integer activation tensor for one sample (inputs of layers and graph values)."""
    total = 0.0
    for node in gm.graph.nodes:
        info = get_info(node)
        if node.op == "call_module" and info.itype is not None and info.shape is not None:
            total += _per_sample(node, info.shape) * info.itype.bits / 8
    return math.ceil(total)


def totals(costs: list[LayerCost], dense: tuple[int, int] | None = None) -> dict[str, float]:
    """Network totals; ``dense`` = (MACs, parameters) of the unpruned model (default: these layers')."""
    macs = sum(c.macs for c in costs)
    bops = sum(c.bops for c in costs)
    ref_macs, params = dense if dense is not None else (macs, sum(c.params for c in costs))
    return {
        "macs": macs,
        "dense_macs": ref_macs,
        "bops": bops,
        "rel_bops_percent": 100.0 * bops / (ref_macs * 32 * 32) if ref_macs else 0.0,
        "linear_bits": sum(c.linear_bits for c in costs),
        "weight_bytes": sum(c.weight_bytes for c in costs),
        "input_bytes": sum(c.input_bytes for c in costs),
        "float_weight_bytes": params * 4,
        "multiplies": sum(c.multiplies for c in costs),
        "shift_adds": sum(c.shift_adds for c in costs),
        "multiplier_free_percent": 100.0 * sum(c.macs for c in costs if c.terms) / macs if macs else 0.0,
    }


@dataclass(frozen=True)
class PointwiseCost:
    """An integer op that is not a MAC layer, per input sample (the report lists them after the layers).

    ``lookups``: table reads (IntLookup and IntSoftmax's exp table, one per element); ``products``: integer
    multiplies outside any MAC (IntMul, IntSoftmax: one per element; IntLayerNorm: D q, d^2 and N G per
    element); ``divisions``: integer divisions (IntSoftmax: one per element; IntLayerNorm: one per element
    and ``steps`` per normalized row for the square root).
    """

    name: str
    op: str
    a_bits: int
    elements: int
    lookups: int = 0
    products: int = 0
    divisions: int = 0
    attention_macs: int = 0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _pointwise_cost(name: str, mod: ops.IntOp, elements: int) -> PointwiseCost | None:
    if isinstance(mod, ops.IntLookup):
        return PointwiseCost(name, "Lookup", mod.inp.bits, elements, lookups=elements)
    if isinstance(mod, ops.IntMul):
        return PointwiseCost(name, "Mul", max(t.bits for t in mod.inp), elements, products=elements)
    if isinstance(mod, ops.IntMatMul):
        return PointwiseCost(name, "MatMul", max(t.bits for t in mod.inp), elements,
                             attention_macs=elements * mod.inner)
    if isinstance(mod, ops.IntSoftmax):
        return PointwiseCost(name, "Softmax", mod.inp.bits, elements, lookups=elements, products=elements,
                             divisions=elements)
    if isinstance(mod, ops.IntLayerNorm):
        rows = elements // mod.size
        return PointwiseCost(name, "LayerNorm", mod.inp.bits, elements, products=3 * elements,
                             divisions=elements + rows * mod.steps)
    return None


def pointwise_costs(gm: fx.GraphModule) -> list[PointwiseCost]:
    """One PointwiseCost per table lookup, product of activations and LayerNorm, in graph order."""
    found = []
    for node in gm.graph.nodes:
        mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        shape = get_info(node).shape
        if isinstance(mod, ops.IntOp) and shape is not None:
            c = _pointwise_cost(get_info(node).layer or node.name, mod, _per_sample(node, shape))
            if c is not None:
                found.append(c)
    return found
