"""Cost models over an integer graph; every report prints all of them.

Per layer l (conv or linear), with MACs_l multiply-accumulates per input sample:
  BOPs          = MACs_l * b_w * b_a                (quadratic, energy-like)
  linear bits   = MACs_l * max(b_w, b_a)
  weight memory = ceil(params_l * b_w / 8) bytes   (biases excluded, they are int32 everywhere)
and per activation tensor, activation memory = numel per sample * b / 8 bytes.
Relative BOPs = sum BOPs / sum (MACs * 32 * 32), in percent. b_a is the bit-width of the layer's input.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch.fx as fx

from qcompile.ir import intops as ops
from qcompile.ir.meta import get_info


@dataclass(frozen=True)
class LayerCost:
    name: str
    op: str
    w_bits: int
    a_bits: int
    macs: int
    params: int

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
        return {**asdict(self), "bops": self.bops, "linear_bits": self.linear_bits, "weight_bytes": self.weight_bytes}


def _macs(node: fx.Node, op: ops.IntConv2d | ops.IntLinear) -> int:
    shape = get_info(node).shape
    assert shape is not None, f"{node.name} has no recorded shape"
    per_position = math.prod(shape[2:]) if isinstance(op, ops.IntConv2d) else math.prod(shape[1:-1])
    return int(op.weight.numel()) * per_position


def layer_costs(gm: fx.GraphModule) -> list[LayerCost]:
    """One LayerCost per integer conv/linear layer, in graph order."""
    costs = []
    for node in gm.graph.nodes:
        mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if isinstance(mod, (ops.IntConv2d, ops.IntLinear)):
            kind = "Conv2d" if isinstance(mod, ops.IntConv2d) else "Linear"
            name = get_info(node).layer or node.name
            macs, params = _macs(node, mod), int(mod.weight.numel())
            costs.append(LayerCost(name, kind, mod.w_type.bits, mod.inp.bits, macs, params))
    return costs


def activation_bytes(gm: fx.GraphModule) -> int:
    """Bytes of every integer activation tensor for one sample (inputs of layers and graph values)."""
    total = 0.0
    for node in gm.graph.nodes:
        info = get_info(node)
        if node.op == "call_module" and info.itype is not None and info.shape is not None:
            total += math.prod(info.shape[1:]) * info.itype.bits / 8
    return math.ceil(total)


def totals(costs: list[LayerCost]) -> dict[str, float]:
    macs = sum(c.macs for c in costs)
    bops = sum(c.bops for c in costs)
    params = sum(c.params for c in costs)
    return {
        "macs": macs,
        "bops": bops,
        "rel_bops_percent": 100.0 * bops / (macs * 32 * 32) if macs else 0.0,
        "linear_bits": sum(c.linear_bits for c in costs),
        "weight_bytes": sum(c.weight_bytes for c in costs),
        "float_weight_bytes": params * 4,
    }
