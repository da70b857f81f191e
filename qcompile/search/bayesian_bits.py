"""bayesian-bits: learned mixed precision and channel pruning with Bayesian Bits gates (ALGORITHMS.md §1).

Needs the quantizers of ``insert-quantizers{scheme=bayesian-bits}`` (``quant/bayesian_bits.py``) and a
calibrated graph. Steps:
1. every gated activation quantizer starts from its calibrated range (x_max = amax);
2. training with the shared QuantTrainer (weights, ranges and gates on their own Adam optimizers) on
   task loss + mu * sum_q (MACs_q / max_l MACs_l) * sum_b b prod_{k <= b} P(z_k != 0), where MACs_q is
   the layer's MACs for a weight quantizer and the MACs of the layers reading it for an activation
   quantizer (so lambda_b = b MACs_l / max MACs). ``post_training``: the weights are frozen (biases too
   unless ``train_bias``) and only gates and ranges learn, on the first ``samples`` training images;
3. the gates become deterministic (ON iff log a > -0.935): per layer the weight bits (16/32-bit choices
   are capped at 8, the integer contract's widest, and recorded), the activation bits, and the kept
   output channels; a layer whose every channel is pruned is refused;
4. the gated quantizers become plain uniform ones on the chosen grids (weights: learned clip, pruned
   channels' weights and biases zeroed and masked; activations: ActQuant with amax = s_b * hi); groups
   that meet at an add/cat are unified; ``finetune_epochs`` of training then adapt weights and clips;
5. ``ctx.records["bayesian-bits"]`` keeps, per layer, the bits, kept channels and final gate
   probabilities (the JSON report prints them). ``prune-channels`` then removes the zeroed channels.
Gates start at log a = ``gate_init`` (default 2, P(z != 0) = 0.97). The paper's +6 sits where the
hard-concrete sample saturates at 1, so only the regularizer moves a gate (Adam: about gate_lr per step)
until it nears 0; with budgets of a few epochs nothing would be decided.
Not handled: per-channel bit-widths, gates on the graph's input and output activations (8-bit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from qcompile import cost
from qcompile.data import Dataset
from qcompile.ir import rewrite
from qcompile.ir.rewrite import input_node
from qcompile.ir.shapes import annotate_shapes
from qcompile.passes.base import PassContext, PreconditionError, option, register_pass
from qcompile.passes.share_scales import unify
from qcompile.quant import graph
from qcompile.quant.bayesian_bits import (
    THRESHOLD,
    BayesianBitsActQuant,
    BayesianBitsWeightQuant,
    GatedQuantizer,
    RangeWeightQuant,
)
from qcompile.quant.tables import cap_table_inputs
from qcompile.search.base import TrainedSearch, check_schedule, gate_parameters, movement
from qcompile.search.policies import Assignment, LayerBits
from qcompile.train.trainer import QuantTrainer, TrainConfig


def _layer_quantizers(gm: fx.GraphModule) -> list[tuple[str, BayesianBitsWeightQuant]]:
    found = []
    for node, layer in graph.layers(gm):
        if not isinstance(layer.weight_quant, BayesianBitsWeightQuant):
            raise PreconditionError(
                f"layer '{node.target}' has no Bayesian Bits quantizer; use insert-quantizers{{scheme=bayesian-bits}}"
            )
        found.append((str(node.target), layer.weight_quant))
    return found


def cost_weights(gm: fx.GraphModule, example: torch.Tensor) -> list[tuple[GatedQuantizer, float]]:
    """(gated quantizer, MACs_q / max MACs) for every weight and gated activation quantizer."""
    annotate_shapes(gm, (example,))
    costs = {c.name: c.macs for c in cost.quant_layer_costs(gm)}
    top = max(costs.values(), default=1) or 1
    reads: dict[fx.Node, int] = {}
    pairs: list[tuple[GatedQuantizer, float]] = []
    for node, layer in graph.layers(gm):
        assert isinstance(layer.weight_quant, BayesianBitsWeightQuant)
        pairs.append((layer.weight_quant.gated, costs[str(node.target)] / top))
        for root in graph.roots(gm, input_node(node)):
            reads[root] = reads.get(root, 0) + costs[str(node.target)]
    for node, q in graph.act_quants(gm):
        if isinstance(q, BayesianBitsActQuant) and q.gated is not None:
            pairs.append((q.gated, reads.get(node, 0) / top))
    return pairs


def _subset(data: Dataset, samples: int) -> Dataset:
    if samples <= 0 or samples >= len(data.x_train):
        return data
    y = data.y_train[:samples] if data.y_train is not None else None
    return Dataset(data.name, data.x_train[:samples], y, data.x_test, data.y_test)


@register_pass
@dataclass(frozen=True)
class BayesianBitsSearch(TrainedSearch):
    name = "bayesian-bits"
    summary = "Bayesian Bits: gated residual bits and channel pruning learned against a BOPs regularizer"
    scheme = "bayesian-bits"
    followed_by = ("prune-channels",)

    mu: float = option(0.01, "strength of the BOPs regularizer (> 0); larger gives fewer bits")
    epochs: int = option(3, "training epochs with learned gates")
    finetune_epochs: int = option(1, "epochs with the gates frozen (0: none)")
    lr: float = option(1e-4, "Adam learning rate of the weights")
    gate_lr: float = option(1e-2, "Adam learning rate of the gates' log a")
    gate_init: float = option(2.0, "initial log a of the gates up to 8 bits and of the pruning gates (16/32: "
                                   "-gate_init); the paper's 6 suits ~100-epoch runs")
    range_lr: float = option(1e-3, "Adam learning rate of the clip ranges")
    post_training: bool = option(False, "freeze the weights; learn only gates and ranges on a small set")
    samples: int = option(0, "training images used (0: all; post-training: 2048 when 0)")
    train_bias: bool = option(False, "post-training: learn the biases too")
    batch_size: int = option(64, "training batch size")
    schedule: str = option("constant", "learning-rate schedule of the weights and ranges: constant | cosine")
    checkpoint: str = option("", "checkpoint file of the gated training, written after every epoch")
    resume: bool = option(False, "continue the gated training from the checkpoint")
    overwrite: bool = option(False, "replace an existing checkpoint (the command line's --force)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.mu > 0.0:
            raise PreconditionError(f"bayesian-bits mu must be a number > 0, got {self.mu}")
        if self.epochs <= 0 or self.finetune_epochs < 0:
            raise PreconditionError("bayesian-bits epochs must be positive and finetune_epochs >= 0")
        if not self.gate_init > -THRESHOLD:
            raise PreconditionError(f"bayesian-bits gate_init must exceed {-THRESHOLD} (gates start ON)")
        if self.samples < 0:
            raise PreconditionError(f"bayesian-bits samples must be >= 0, got {self.samples}")
        check_schedule("bayesian-bits", self.schedule)

    def _config(self, ctx: PassContext, epochs: int, checkpoint: str = "", resume: bool = False) -> TrainConfig:
        return TrainConfig(epochs=epochs, batch_size=self.batch_size, lr=self.lr, range_lr=self.range_lr,
                           gate_lr=self.gate_lr, calibration_fraction=0.0, seed=ctx.seed, checkpoint=checkpoint,
                           resume=resume, overwrite=self.overwrite, progress=ctx.progress, schedule=self.schedule,
                           **self.distillation())

    def _freeze_weights(self, gm: fx.GraphModule) -> None:
        for _, layer in graph.layers(gm):
            layer.weight.requires_grad_(False)
            if layer.bias is not None:
                layer.bias.requires_grad_(self.train_bias)

    def search(self, gm: fx.GraphModule, ctx: PassContext) -> Assignment:
        assert ctx.dataset is not None
        weights = _layer_quantizers(gm)
        for _, q in graph.act_quants(gm):
            if isinstance(q, BayesianBitsActQuant):
                q.start()
        pairs = cost_weights(gm, ctx.example_inputs[0])
        for gated, _ in pairs:
            gated.init_gates(self.gate_init)
        samples = self.samples or (2048 if self.post_training else 0)
        data = _subset(ctx.dataset, samples)
        if self.post_training:
            self._freeze_weights(gm)

        def regularizer() -> torch.Tensor:
            return self.mu * sum((w * q.expected_cost() for q, w in pairs), torch.zeros(()))

        gates = gate_parameters(gm)
        before = [p.detach().clone() for p in gates]
        trainer = QuantTrainer(gm, data, self._config(ctx, self.epochs, self.checkpoint, self.resume),
                               regularizer=regularizer, teacher=self.teacher(ctx))
        trainer.fit()
        record = _decide(gm, weights)
        changed = [n for n, v in record["layers"].items()
                   if v["w_bits"] != 8 or v["a_bits"] != 8 or v["kept_channels"] < v["channels"]]
        record["diagnostics"] = movement(self.name, trainer.steps_per_epoch * self.epochs, before, gates, changed,
                                         self.gate_init - THRESHOLD, "--epochs or the gates' learning rate "
                                         f"(--option gate_lr=..., now {self.gate_lr}), or lower gate_init")
        ctx.records[self.name] = record
        _finalize(gm)
        if self.finetune_epochs:
            for _, layer in graph.layers(gm):
                layer.weight.requires_grad_(not self.post_training)
            QuantTrainer(gm, data, self._config(ctx, self.finetune_epochs), teacher=self.teacher(ctx)).fit()
        return Assignment({name: LayerBits(v["w_bits"], v["a_bits"]) for name, v in record["layers"].items()},
                          8)

    def apply(self, gm: fx.GraphModule, assignment: Assignment) -> None:
        """Nothing to write: the search left every quantizer on its learned grid."""


def _input_bits(gm: fx.GraphModule, node: fx.Node) -> int:
    return max((graph.act_quant(gm, r).bits for r in graph.roots(gm, input_node(node))), default=8)


def _decide(gm: fx.GraphModule, weights: list[tuple[str, BayesianBitsWeightQuant]]) -> dict[str, Any]:
    """The deterministic choice per layer; refuses a layer that lost every output channel."""
    layers: dict[str, Any] = {}
    capped = []
    for (name, q), (node, layer) in zip(weights, graph.layers(gm), strict=True):
        kept = q.gated.kept_channels()
        channels = int(layer.weight.shape[0])
        n_kept = channels if kept is None else int(kept.sum())
        if n_kept == 0:
            raise PreconditionError(f"bayesian-bits pruned every output channel of layer '{name}'; lower mu "
                                    "(or train longer) so that the layer keeps at least one channel")
        if q.gated.bits > 8:
            capped.append(name)
        layers[name] = {"w_bits": q.bits, "a_bits": _input_bits(gm, node), "channels": channels,
                        "kept_channels": n_kept, "gate_probabilities": q.gated.probabilities()}
    acts = {n.name: {"bits": q.bits, "gate_probabilities": q.gated.probabilities()}
            for n, q in graph.act_quants(gm) if isinstance(q, BayesianBitsActQuant) and q.gated is not None}
    return {"layers": layers, "activations": acts, "capped_at_8_bits": capped}


def _finalize(gm: fx.GraphModule) -> None:
    """Gated quantizers -> plain ones on the chosen grids; pruned channels zeroed; scale groups unified."""
    for _, layer in graph.layers(gm):
        q = layer.weight_quant
        assert isinstance(q, BayesianBitsWeightQuant)
        kept = q.gated.kept_channels()
        mask = torch.ones(layer.weight.shape[0]) if kept is None else kept.float()
        with torch.no_grad():
            layer.weight.mul_(mask.view(-1, *[1] * (layer.weight.dim() - 1)))
            if layer.bias is not None:
                layer.bias.mul_(mask)
        layer.weight_quant = RangeWeightQuant(q.bits, float(q.gated.x_max.detach().abs()), mask)
    for node, aq in list(graph.act_quants(gm)):
        if isinstance(aq, BayesianBitsActQuant) and aq.gated is not None:
            rewrite.set_module(gm, str(node.target), aq.finalize())
    for group in graph.scale_groups(gm):
        unify([graph.act_quant(gm, n) for n in group])
    cap_table_inputs(gm)  # a lookup table takes at most 8 input bits
