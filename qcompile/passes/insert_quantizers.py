"""insert-quantizers: turn a float graph into a quant graph (fake quantization).

* Every Conv2d/Linear becomes a QConv2d/QLinear whose weight goes through a per-output-channel
  symmetric quantizer (``weights`` bits).
* An ActQuant (``acts`` bits, per tensor) is placed on every value that gets a new scale: graph inputs,
  layer outputs, residual-add outputs and average-pool outputs, each *after* the ReLU/clamps that
  directly follow it (they fold into the requantization; the quantizer is unsigned when its calibrated
  minimum is >= 0, as after a ReLU). Max pooling, reshapes and concatenations keep their input's scale.
Not handled: schemes other than ``uniform`` (Bayesian Bits, BSQ and APoT plug in here later).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from qcompile.ir import rewrite
from qcompile.ir.meta import Stage
from qcompile.passes.base import Pass, PassContext, PassResult, PreconditionError, option, register_pass
from qcompile.quant import graph
from qcompile.quant.modules import ActQuant, QConv2d, QLinear

SCHEMES = ("uniform",)


def _quantize_layers(gm: fx.GraphModule, bits: int) -> None:
    for node in gm.graph.nodes:
        mod = rewrite.module_of(gm, node)
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            raise PreconditionError(f"BatchNorm '{node.name}' is still in the graph; run fold-batchnorm first")
        if type(mod) is nn.Conv2d:
            rewrite.set_module(gm, str(node.target), QConv2d.from_float(mod, bits))
        elif type(mod) is nn.Linear:
            rewrite.set_module(gm, str(node.target), QLinear.from_float(mod, bits))


@register_pass
@dataclass(frozen=True)
class InsertQuantizers(Pass):
    name = "insert-quantizers"
    summary = "quantize weights per channel and activations per tensor (fake quantization)"
    requires = (Stage.FLOAT,)
    produces = Stage.QUANT

    scheme: str = option("uniform", "quantizer family: uniform")
    weights: int = option(8, "initial weight bit-width (assign-bitwidths may change it)")
    acts: int = option(8, "initial activation bit-width")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if self.scheme not in SCHEMES:
            raise PreconditionError(f"unknown scheme '{self.scheme}' (known: {', '.join(SCHEMES)})")
        _quantize_layers(gm, self.weights)
        for node in list(gm.graph.nodes):
            if graph.is_quant_point(gm, node):
                end = graph.chain_end(node)
                rewrite.insert_module_after(gm, end, f"{end.name}_act", ActQuant(self.acts))
        return PassResult(rewrite.finish(gm), True)
