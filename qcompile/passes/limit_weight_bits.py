"""limit-weight-bits: narrow every uniform weight quantizer wider than ``bits`` to ``bits``.

``compile(..., ort_cpu="avx2")`` (CLI ``--ort-cpu avx2``) runs it with ``bits=7`` right before
``lower-integer``: a 7-bit signed narrow-range weight has |q_w| <= 63, so onnxruntime's u8 x s8 kernels
(QLinearConv, MatMulInteger with int8 weights) cannot saturate their 16-bit pair sums on AVX2 CPUs without
VNNI (2 * 255 * 63 = 32130 < 2^15): every layer takes the fast int8 path and stays exact on every x86 CPU
(the idea of onnxruntime's own ``reduce_range``). The quantizer itself changes (its grid is
s_c = max|W_c| / 63), so the simulation, the executors and the file all compute the 7-bit layer: the
assignment's 8 becomes 7 in the report too, nothing is hidden.

Handled: ``WeightQuant`` (uniform, per channel) and ``RangeWeightQuant`` (the learned-range quantizer
Bayesian Bits and BSQ leave behind). Not handled: APoT codes (their width is a code set, not a range;
the export keeps codes above 63 on the exact u8 x u8 path) and weights already at ``bits`` or fewer.
The layers changed are recorded in ``PassContext.records["limit-weight-bits"]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from qcompile.ir.meta import Stage
from qcompile.passes.base import Pass, PassContext, PassResult, PreconditionError, option, register_pass
from qcompile.quant import graph
from qcompile.quant.bayesian_bits import RangeWeightQuant
from qcompile.quant.modules import WeightQuant

RANGE_QUANTIZERS = (WeightQuant, RangeWeightQuant)


@register_pass
@dataclass(frozen=True)
class LimitWeightBits(Pass):
    name = "limit-weight-bits"
    summary = "narrow uniform weight quantizers to at most `bits` (7: exact int8 kernels on AVX2)"
    requires = (Stage.QUANT,)

    bits: int = option(7, "the widest weight quantizer kept (2-8)")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if not 2 <= self.bits <= 8:
            raise PreconditionError(f"limit-weight-bits{{bits={self.bits}}}: bits must be between 2 and 8")
        changed = []
        for node, layer in graph.layers(gm):
            q = layer.weight_quant
            if type(q) in RANGE_QUANTIZERS and q.bits > self.bits:
                q.bits = self.bits
                changed.append(str(node.target))
        ctx.records[self.name] = {"bits": self.bits, "layers": changed}
        return PassResult(gm, bool(changed))
