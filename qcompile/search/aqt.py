"""aqt: the recipe of "Pareto-optimal quantization is mostly 4-bit" as a search.

The bits come from a policy (by default ``aqt``: 4-bit, first conv and last linear 8-bit); the weights
then train with the shared QuantTrainer: weights per output channel from max|W| at every step, activation
bounds from an EMA (c = 0.1) of the batch max|x| during the first ``fraction`` of the steps with
activations in float, frozen once afterwards. Training and serving use the same quantizers, so the
trained graph lowers like any other. Not done here: AQT's width multiplier (change the model instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from qcompile.passes.base import PassContext, PreconditionError, option, register_pass
from qcompile.search.base import TrainedSearch, apply_assignment, check_schedule, first_conv_last_linear, layer_kinds
from qcompile.search.policies import Assignment, policy_assignment
from qcompile.train.trainer import QuantTrainer, TrainConfig


@register_pass
@dataclass(frozen=True)
class AqtRecipe(TrainedSearch):
    name = "aqt"
    summary = "AQT recipe: a policy (default 4-bit, first/last 8-bit) trained with frozen EMA activation bounds"

    epochs: int = option(3, "training epochs")
    lr: float = option(1e-3, "Adam learning rate of the weights")
    fraction: float = option(0.2, "share of the steps that calibrate activation bounds (in (0, 1))")
    batch_size: int = option(64, "training batch size")
    policy: str = option("aqt", "the bit-width policy trained for (see assign-bitwidths)")
    schedule: str = option("constant", "learning-rate schedule of the weights and ranges: constant | cosine")
    checkpoint: str = option("", "checkpoint file written after every epoch")
    resume: bool = option(False, "continue from the checkpoint")
    overwrite: bool = option(False, "replace an existing checkpoint (the command line's --force)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.fraction < 1.0:
            raise PreconditionError(f"aqt fraction must lie in (0, 1), got {self.fraction}")
        if self.epochs <= 0:
            raise PreconditionError(f"aqt epochs must be positive, got {self.epochs}")
        check_schedule("aqt", self.schedule)

    def search(self, gm: fx.GraphModule, ctx: PassContext) -> Assignment:
        assert ctx.dataset is not None
        kinds = layer_kinds(gm)
        first, last = first_conv_last_linear(kinds)
        assignment = policy_assignment(self.policy, [n for n, _ in kinds], first, last)
        apply_assignment(gm, assignment)
        config = TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                             calibration_fraction=self.fraction, seed=ctx.seed, checkpoint=self.checkpoint,
                             resume=self.resume, overwrite=self.overwrite, progress=ctx.progress,
                             schedule=self.schedule, **self.distillation())
        QuantTrainer(gm, ctx.dataset, config, teacher=self.teacher(ctx)).fit()
        return assignment
