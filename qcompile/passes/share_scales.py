"""share-scales: give the inputs of every residual add and concatenation one common scale.

Integer addition q_a + q_b and concatenation are only meaningful on one scale, so each group of
activation quantizers that meet at an add/cat (``quant.graph.scale_groups``) is unified: bits = the
group's max, signed if any member is signed, amax = the group's max, amin = the group's min, skewed
(``ActQuant.negative_codes``) only if every member is. Then the type and s = amax / hi are the same for
all members. Not handled: per-input rescaling (the alternative design, one extra requantization per
input), which would let members keep different ranges.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from qcompile.ir.meta import Stage
from qcompile.passes.base import Pass, PassContext, PassResult, register_pass
from qcompile.quant import graph
from qcompile.quant.modules import ActQuant


def unify(members: list[ActQuant]) -> None:
    bits = max(q.bits for q in members)
    signed = any(q.signed for q in members)
    amax = torch.stack([q.amax for q in members]).max()
    amin = torch.stack([q.amin for q in members]).min()
    skewed = all(q.skewed for q in members)
    for q in members:
        q.bits, q.signed_override, q.skewed = bits, signed, skewed
        q.amax.copy_(amax)
        q.amin.copy_(amin)


@register_pass
@dataclass(frozen=True)
class ShareScales(Pass):
    name = "share-scales"
    summary = "one scale for the inputs of each residual add / concatenation"
    requires = (Stage.QUANT,)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        groups = graph.scale_groups(gm)
        for group in groups:
            unify([graph.act_quant(gm, n) for n in group])
        return PassResult(gm, bool(groups))
