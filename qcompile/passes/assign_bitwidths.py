"""assign-bitwidths: apply a policy's per-layer bits to the quantizers of a quant graph.

A layer's ``w`` bits go to its weight quantizer, its ``a`` bits to the quantizer(s) that define its
input's scale (the largest request wins when several layers read one tensor). Other activations get
the policy's default; graph inputs and outputs stay 8-bit (the network input counts as 8-bit, and the
logits keep their resolution). Validated against the integer types (2..16 bits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from qcompile.ir import rewrite
from qcompile.ir.meta import IntType, Stage
from qcompile.passes.base import Pass, PassContext, PassResult, option, register_pass
from qcompile.quant import graph
from qcompile.quant.modules import QConv2d
from qcompile.search.policies import POLICY_HELP, Assignment, policy_assignment

IO_BITS = 8


def layer_name(node: fx.Node) -> str:
    return str(node.target)


def first_conv_last_linear(names: list[tuple[str, str]]) -> tuple[str, str]:
    convs = [n for n, kind in names if kind == "conv"]
    linears = [n for n, kind in names if kind == "linear"]
    first = convs[0] if convs else names[0][0]
    last = linears[-1] if linears else names[-1][0]
    return first, last


def apply_assignment(gm: fx.GraphModule, assignment: Assignment) -> None:
    """Write bits into the weight and activation quantizers."""
    requested: dict[fx.Node, int] = {}
    for node, layer in graph.layers(gm):
        bits = assignment.layers[layer_name(node)]
        IntType(bits.w, True), IntType(bits.a, False)  # validates the range
        layer.weight_quant.bits = bits.w
        for root in graph.roots(gm, rewrite.input_node(node)):
            requested[root] = max(requested.get(root, 0), bits.a)
    outputs = {root for out in graph.output_nodes(gm) for root in graph.roots(gm, out)}
    for node, q in graph.act_quants(gm):
        src = node.args[0]
        if node in outputs or (isinstance(src, fx.Node) and src.op == "placeholder"):
            q.bits = IO_BITS
        else:
            q.bits = requested.get(node, assignment.default_act)


@register_pass
@dataclass(frozen=True)
class AssignBitwidths(Pass):
    name = "assign-bitwidths"
    summary = "set per-layer bit-widths from a policy"
    requires = (Stage.QUANT,)

    policy: str = option("w8a8", POLICY_HELP)
    table: str = option("", "JSON file of per-layer bits, for policy=table")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        kinds = [(layer_name(n), "conv" if isinstance(m, QConv2d) else "linear") for n, m in graph.layers(gm)]
        names = [n for n, _ in kinds]
        if not names:
            return PassResult(gm, False)
        first, last = first_conv_last_linear(kinds)
        apply_assignment(gm, policy_assignment(self.policy, names, first, last, self.table))
        return PassResult(gm, True)
