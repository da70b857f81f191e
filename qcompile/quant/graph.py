"""Read-only analyses of quant-stage graphs: layers, quantization points, scale roots and groups.

A *scale root* is the activation quantizer that defines a tensor's scale; max pooling, reshapes, unfused
clamps and concatenation pass scales through unchanged. Residual adds and concatenations need their
inputs on one scale: ``scale_groups`` returns the groups of roots that must share one (connected
components of a networkx graph with an edge between the roots of every add/cat's inputs).
``bind_input_scales`` is the one writer here: it points each layer at the root that defines its input
scale, so that the layer can put its bias on the integer accumulator grid (quant/modules.py).
"""

from __future__ import annotations

import operator
from collections.abc import Iterator

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from qcompile.ir.attention import ConstCat, MatMul
from qcompile.ir.elementwise import CONSTANT_MODULES
from qcompile.ir.meta import IntType
from qcompile.ir.movement import MOVEMENT_FUNCTIONS
from qcompile.ir.rewrite import input_node, input_nodes
from qcompile.quant.modules import ActQuant, QConv2d, QLinear
from qcompile.quant.tables import TableFunction

CLAMPS = (torch.relu, torch.clamp)
PASS_THROUGH_FUNCTIONS = (torch.flatten, torch.reshape, torch.relu, torch.clamp, *MOVEMENT_FUNCTIONS)
# pointwise ops whose output gets its own quantizer (nn.LayerNorm covers its subclass ChannelLayerNorm)
NEW_SCALE_MODULES: tuple[type, ...] = (TableFunction, nn.LayerNorm, nn.Softmax, MatMul)


def module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def is_act_quant(gm: fx.GraphModule, node: fx.Node) -> bool:
    return isinstance(module(gm, node), ActQuant)


def layers(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, QConv2d | QLinear]]:
    """Every quantized conv/linear layer, in graph order."""
    for node in gm.graph.nodes:
        mod = module(gm, node)
        if isinstance(mod, (QConv2d, QLinear)):
            yield node, mod


def act_quant(gm: fx.GraphModule, node: fx.Node) -> ActQuant:
    """The activation quantizer ``node`` calls (a scale root, say)."""
    mod = module(gm, node)
    assert isinstance(mod, ActQuant), f"'{node.name}' is not an activation quantizer"
    return mod


def act_quants(gm: fx.GraphModule) -> Iterator[tuple[fx.Node, ActQuant]]:
    for node in gm.graph.nodes:
        mod = module(gm, node)
        if isinstance(mod, ActQuant):
            yield node, mod


def is_quant_point(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Nodes whose output gets a new scale: inputs, layers, adds, products, average pools, tables."""
    if node.op == "placeholder":
        return True
    if node.op == "call_function":
        return node.target in (operator.add, operator.mul, operator.sub)
    return isinstance(module(gm, node), (nn.Conv2d, nn.Linear, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Upsample,
                                         *NEW_SCALE_MODULES, *CONSTANT_MODULES))


def chain_end(node: fx.Node) -> fx.Node:
    """Follow single-user ReLU/clamp nodes after ``node``: they fold into its requantization."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not (user.op == "call_function" and user.target in CLAMPS):
            break
        node = user
    return node


def chain_start(gm: fx.GraphModule, quant_node: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """From an activation quantizer back over folded clamps to its quantization point: (point, clamps)."""
    node = input_node(quant_node)
    clamps: list[fx.Node] = []
    while not is_quant_point(gm, node) and node.op == "call_function" and node.target in CLAMPS:
        clamps.append(node)
        node = input_node(node)
    return node, clamps[::-1]


Limits = list[tuple[float | None, float | None]]


def clamp_limits(clamps: list[fx.Node]) -> Limits:
    """(min, max) of each canonical ReLU / ``torch.clamp`` (numbers or None; canonicalize rejects node bounds)."""
    limits: Limits = []
    for c in clamps:
        if c.target is torch.relu:
            limits.append((0.0, None))
            continue
        low, high = c.kwargs.get("min"), c.kwargs.get("max")
        assert all(v is None or isinstance(v, (int, float)) for v in (low, high)), f"clamp '{c.name}' bounds"
        limits.append((low, high))  # type: ignore[arg-type]
    return limits


def clamp_bounds(limits: Limits, itype: IntType, scale: float) -> tuple[int, int]:
    """The integer clamp [lo, hi] the limits fold into on a grid of ``scale``; lo > hi when none is left:
    lo = max(type.lo, round(min / scale)), hi = min(type.hi, round(max / scale))."""
    lo, hi = itype.lo, itype.hi
    for low, high in limits:
        if low is not None:
            lo = max(lo, round(low / scale))
        if high is not None:
            hi = min(hi, round(high / scale))
    return lo, hi


def roots(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The activation quantizers that define the scale of ``node``'s output."""
    if is_act_quant(gm, node):
        return [node]
    if node.op == "call_function" and node.target is torch.cat:
        return [r for src in input_nodes(node) for r in roots(gm, src)]
    passes = isinstance(module(gm, node), (nn.MaxPool2d, ConstCat)) or (
        node.op == "call_function" and node.target in PASS_THROUGH_FUNCTIONS
    )
    if passes and isinstance(node.args[0], fx.Node):
        return roots(gm, node.args[0])
    return []


def bind_input_scales(gm: fx.GraphModule) -> int:
    """Give every layer its input's scale (``fixed_scale`` of the first root); returns how many were bound.

    Call it again after replacing activation quantizers: a layer keeps the method of the module it saw.
    """
    bound = 0
    for node, layer in layers(gm):
        found = roots(gm, input_node(node))
        layer.input_scale = act_quant(gm, found[0]).fixed_scale if found else None
        bound += bool(found)
    return bound


def scale_groups(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Groups (size >= 2) of activation quantizers that must share one scale, in graph order."""
    g: nx.Graph = nx.Graph()
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (operator.add, operator.sub, torch.cat):
            inputs = input_nodes(node) if node.target is torch.cat else [input_node(node, 0), input_node(node, 1)]
            found = [r for src in inputs for r in roots(gm, src)]
            nx.add_path(g, found)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    groups = [sorted(c, key=order.__getitem__) for c in nx.connected_components(g) if len(c) > 1]
    return sorted(groups, key=lambda c: order[c[0]])


def output_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    out = next(iter(gm.graph.find_nodes(op="output")))
    flat, _ = torch.utils._pytree.tree_flatten(out.args[0])
    return [n for n in flat if isinstance(n, fx.Node)]
