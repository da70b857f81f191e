"""assign-bitwidths: the policy search: per-layer bits from a named policy, no data needed.

Policies (``search/policies.py``): ``w{N}a{M}`` uniform, ``aqt`` (4-bit with the first conv and the last
linear layer at 8 bits), or a JSON table. The bits are written by ``search.base.apply_assignment``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from qcompile.passes.base import PassContext, option, register_pass
from qcompile.search.base import Search, first_conv_last_linear, layer_kinds
from qcompile.search.policies import POLICY_HELP, Assignment, policy_assignment


@register_pass
@dataclass(frozen=True)
class AssignBitwidths(Search):
    name = "assign-bitwidths"
    summary = "set per-layer bit-widths from a policy"

    policy: str = option("w8a8", POLICY_HELP)
    table: str = option("", "JSON file of per-layer bits, for policy=table")

    def search(self, gm: fx.GraphModule, ctx: PassContext) -> Assignment:
        kinds = layer_kinds(gm)
        first, last = first_conv_last_linear(kinds)
        return policy_assignment(self.policy, [n for n, _ in kinds], first, last, self.table)
