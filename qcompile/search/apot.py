"""apot: APoT weights (ALGORITHMS.md §3) trained with quantization-aware training.

Bits per layer: ``bits`` for every layer and ``acts`` for the activations, the first conv and the last
linear 8-bit (weights and their inputs) unless ``first_last=apot``; or a ``policy`` (``w{N}a{M}``, ``aqt``,
a JSON table, see assign-bitwidths) that gives every layer its own. A layer whose weight bits have an
APoT level set (2..7; 2 is ternary) gets an APoT quantizer (``quant/apot.py``: weight normalization per
output channel or per layer (``normalize``, ``center``), reparameterized clipping with a learned
per-layer alpha), any other (8) a uniform one. Then the shared
QuantTrainer trains weights (``lr``) and the alphas (its "ranges" optimizer, ``range_lr``) with AQT's
activation schedule (EMA of batch max|x| during the first ``fraction`` of the steps, then frozen), the
budget of the ``aqt`` search. ``insert-quantizers{scheme=apot}`` runs before it in the default pipeline.
Not handled: APoT activations (uniform), per-channel alpha.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from qcompile.passes.base import PassContext, PreconditionError, option, register_pass
from qcompile.quant import graph
from qcompile.quant.apot import APOT_BITS, set_weight_quantizer, weight_level_set
from qcompile.search.base import (
    TrainedSearch,
    apply_assignment,
    check_choice,
    check_schedule,
    first_conv_last_linear,
    layer_kinds,
)
from qcompile.search.policies import Assignment, LayerBits, policy_assignment
from qcompile.train.trainer import QuantTrainer, TrainConfig

FIRST_LAST = ("uniform8", "apot")
NORMALIZE = ("channel", "layer")


@register_pass
@dataclass(frozen=True)
class APoTSearch(TrainedSearch):
    name = "apot"
    summary = "APoT: additive powers-of-two weights (shift-add layers) trained with a learned clip per layer"
    scheme = "apot"

    bits: int = option(3, f"APoT weight bits, {APOT_BITS.start}..{APOT_BITS.stop - 1} (2: ternary)")
    acts: int = option(8, "activation bits")
    policy: str = option("", "per-layer bits instead of bits/acts: w{N}a{M}, aqt, or FILE.json (8-bit layers "
                             "stay uniform)")
    first_last: str = option("uniform8", "first conv and last linear: uniform8 (8-bit uniform) | apot (bits)")
    normalize: str = option("channel", "weight normalization statistics: channel (per output channel) | layer")
    center: bool = option(False, "subtract each channel's mean in the weight normalization (and lose it, as the "
                                 "method does)")
    epochs: int = option(3, "training epochs")
    lr: float = option(1e-3, "Adam learning rate of the weights")
    range_lr: float = option(1e-3, "Adam learning rate of the clip alphas")
    fraction: float = option(0.2, "share of the steps that calibrate activation bounds (in (0, 1))")
    batch_size: int = option(64, "training batch size")
    schedule: str = option("constant", "learning-rate schedule of the weights and ranges: constant | cosine")
    checkpoint: str = option("", "checkpoint file written after every epoch")
    resume: bool = option(False, "continue from the checkpoint")
    overwrite: bool = option(False, "replace an existing checkpoint (the command line's --force)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_schedule("apot", self.schedule)
        weight_level_set(self.bits)  # refuses widths without an APoT level set
        check_choice("apot", "first_last", self.first_last, FIRST_LAST)
        check_choice("apot", "normalize", self.normalize, NORMALIZE)
        if not 0.0 < self.fraction < 1.0:
            raise PreconditionError(f"apot fraction must lie in (0, 1), got {self.fraction}")
        if self.epochs <= 0:
            raise PreconditionError(f"apot epochs must be positive, got {self.epochs}")

    def assignment(self, gm: fx.GraphModule) -> Assignment:
        kinds = layer_kinds(gm)
        names = [n for n, _ in kinds]
        first, last = first_conv_last_linear(kinds)
        if self.policy:
            return policy_assignment(self.policy, names, first, last)
        layers = {n: LayerBits(self.bits, self.acts) for n in names}
        if self.first_last == "uniform8":
            layers[first] = layers[last] = LayerBits(8, 8)
        return Assignment(layers, self.acts)

    def search(self, gm: fx.GraphModule, ctx: PassContext) -> Assignment:
        assert ctx.dataset is not None
        assignment = self.assignment(gm)
        for node, layer in graph.layers(gm):
            set_weight_quantizer(layer, assignment.layers[str(node.target)].w, self.normalize == "channel",
                                 self.center)
        apply_assignment(gm, assignment)
        config = TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, range_lr=self.range_lr,
                             calibration_fraction=self.fraction, seed=ctx.seed, checkpoint=self.checkpoint,
                             resume=self.resume, overwrite=self.overwrite, progress=ctx.progress,
                             schedule=self.schedule, **self.distillation())
        QuantTrainer(gm, ctx.dataset, config, teacher=self.teacher(ctx)).fit()
        return assignment

    def apply(self, gm: fx.GraphModule, assignment: Assignment) -> None:
        """Nothing to write: ``search`` set the quantizers and trained them."""
