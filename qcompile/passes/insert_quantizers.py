"""insert-quantizers: turn a float graph into a quant graph (fake quantization).

* Every Conv2d/Linear becomes a QConv2d/QLinear whose weight goes through a per-output-channel
  symmetric quantizer (``weights`` bits).
* An ActQuant (``acts`` bits, per tensor) is placed on every value that gets a new scale: graph inputs,
  layer outputs, residual-add outputs and average-pool outputs, each *after* the ReLU/clamps that
  directly follow it (they fold into the requantization; the quantizer is unsigned when its calibrated
  minimum is >= 0, as after a ReLU). Max pooling, reshapes and concatenations keep their input's scale.
* With ``skew=tables`` (the default) the quantizers after a pointwise table bounded below (SiLU,
  hardswish, GELU, ELU: ``tables.BOUNDED_BELOW``) or a product of two activations (the squeeze-excitation
  gate) are ``skewed``: once calibrated, a signed
  one whose negative side is short (SiLU >= -0.28, hardswish >= -0.375) takes the range [-n, 2^b-1-n]
  (``ActQuant.negative_codes``) instead of the symmetric one, which would leave half of its codes
  almost unused. ``skew=all`` does it for every activation, ``skew=none`` for none.
With ``scheme=bayesian-bits`` the same places get Bayesian Bits quantizers (``quant/bayesian_bits.py``):
every weight a gated quantizer (x_max from max|W|, a pruning gate per output channel except on layers
that produce a graph output), every activation except the graph's inputs and outputs (which stay plain
8-bit) a gated quantizer that starts from its calibrated range; the ``bayesian-bits`` search trains them.
With ``scheme=apot`` every layer but the first conv and the last linear gets an APoT weight quantizer
(``quant/apot.py``) of ``weights`` bits when that width has an APoT level set (2..7; otherwise, as with
the default 8, they stay uniform and the ``apot`` search picks each layer's quantizer from its bits;
assign-bitwidths moves an APoT quantizer within 2..7 and refuses other widths for it); alpha starts at
the least-squares clip of the normalized weights. The first conv and the last linear stay 8-bit
uniform unless ``apot_first_last=true``. Activations stay uniform. The ``apot`` search trains them.
Not handled: BSQ here (its search swaps the weight quantizers itself), APoT activations.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from qcompile.ir import rewrite
from qcompile.ir.meta import Stage
from qcompile.ir.rewrite import input_node
from qcompile.passes.base import Pass, PassContext, PassResult, PreconditionError, option, register_pass
from qcompile.quant import graph
from qcompile.quant.apot import set_weight_quantizer
from qcompile.quant.bayesian_bits import BayesianBitsActQuant, BayesianBitsWeightQuant
from qcompile.quant.modules import ActQuant, QConv2d, QLinear
from qcompile.quant.tables import BOUNDED_BELOW, TableFunction

SCHEMES = ("uniform", "bayesian-bits", "apot")
SKEWS = ("tables", "all", "none")


def _skewed(gm: fx.GraphModule, point: fx.Node, skew: str) -> bool:
    """Whether the quantizer after quantization point ``point`` may take a skewed signed range."""
    if skew != "tables":
        return skew == "all"
    product = point.op == "call_function" and point.target is operator.mul and all(
        isinstance(a, fx.Node) for a in point.args[:2])
    table = graph.module(gm, point)
    return product or (isinstance(table, TableFunction) and table.key in BOUNDED_BELOW)


def _quantize_layers(gm: fx.GraphModule, bits: int) -> None:
    for node in gm.graph.nodes:
        mod = rewrite.module_of(gm, node)
        if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
            raise PreconditionError(f"BatchNorm '{node.name}' is still in the graph; run fold-batchnorm first")
        if type(mod) is nn.Conv2d:
            rewrite.set_module(gm, str(node.target), QConv2d.from_float(mod, bits))
        elif type(mod) is nn.Linear:
            rewrite.set_module(gm, str(node.target), QLinear.from_float(mod, bits))


def _use_bayesian_bits(gm: fx.GraphModule) -> None:
    outputs = {root for out in graph.output_nodes(gm) for root in graph.roots(gm, out)}
    output_points = {graph.chain_start(gm, q)[0] for q in outputs}
    for node, layer in graph.layers(gm):
        layer.weight_quant = BayesianBitsWeightQuant(layer.weight, prune=node not in output_points)
    for node, q in list(graph.act_quants(gm)):
        if node not in outputs and input_node(node).op != "placeholder":
            rewrite.set_module(gm, str(node.target), BayesianBitsActQuant(q.bits))


def _use_apot(gm: fx.GraphModule, bits: int, first_last: bool) -> None:
    from qcompile.search.base import first_conv_last_linear, layer_kinds

    kinds = layer_kinds(gm)
    ends = set(first_conv_last_linear(kinds)) if kinds and not first_last else set()
    for node, layer in graph.layers(gm):
        set_weight_quantizer(layer, 8 if str(node.target) in ends else bits)


@register_pass
@dataclass(frozen=True)
class InsertQuantizers(Pass):
    name = "insert-quantizers"
    summary = "quantize weights per channel and activations per tensor (fake quantization)"
    requires = (Stage.FLOAT,)
    produces = Stage.QUANT

    scheme: str = option("uniform", "quantizer family: uniform | bayesian-bits | apot")
    weights: int = option(8, "initial weight bit-width (assign-bitwidths may change it)")
    acts: int = option(8, "initial activation bit-width")
    apot_first_last: bool = option(False, "scheme=apot: APoT on the first conv and last linear too (else 8-bit "
                                          "uniform)")
    skew: str = option("tables", "skewed signed ranges for a short negative side: tables (after pointwise tables "
                                 "and products) | all | none")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if self.scheme not in SCHEMES:
            raise PreconditionError(f"unknown scheme '{self.scheme}' (known: {', '.join(SCHEMES)})")
        if self.skew not in SKEWS:
            raise PreconditionError(f"unknown skew '{self.skew}' (known: {', '.join(SKEWS)})")
        ctx.teacher = rewrite.shallow_copy(gm).eval()  # the float function, for searches that distill from it
        _quantize_layers(gm, self.weights)
        for node in list(gm.graph.nodes):
            if graph.is_quant_point(gm, node):
                end = graph.chain_end(node)
                q = ActQuant(self.acts)
                q.skewed = _skewed(gm, node, self.skew)
                rewrite.insert_module_after(gm, end, f"{end.name}_act", q)
        if self.scheme == "bayesian-bits":
            _use_bayesian_bits(gm)
        elif self.scheme == "apot":
            _use_apot(gm, self.weights, self.apot_first_last)
        return PassResult(rewrite.finish(gm), True)
