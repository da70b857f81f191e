"""bsq: bit-level sparsity quantization (ALGORITHMS.md §2) as a search.

Every conv/linear weight is re-parameterized as BSQ bit planes (``quant/bsq.py``): W_q = s * round_N(w~),
w~ = sum_b (pos_b - neg_b) 2^(N-1-b) / (2^N - 1), starting at N = ``start_bits`` magnitude bits. Training
minimizes task loss + alpha * R with the bit-plane group Lasso R = (1/P) sum_l P_l N_l sum_b ||plane_l,b||_2,
clamps the bit variables to [0, 2] after every step, and every ``requantize_every`` epochs rounds the planes
back to exact 0/1 codes, drops empty MSB/LSB planes (values kept) and resets the optimizer state. Then the
precision is frozen and the layers fine-tune for ``finetune_epochs`` at signed (N+1)-bit weights, from one
of two starts:

* ``finetune_from=float`` (default): BSQ's result is its precision only. Each layer gets back its float
  weight and the project's per-channel max|W| weight quantizer at the found width, and the activation bounds
  are re-calibrated (AQT rule, first 20 % of the fine-tune's steps). Measured reason: the group Lasso
  reaches a low precision by zeroing weights (99.8 % of LeNet-5's fc1 on Fashion-MNIST at alpha = 0.03). With
  the same 3 + 7 epochs, a fine-tune from there reached 90.06 %, re-training the float weights at the same
  bits 91.95 % (float 92.14 %).
* ``finetune_from=bsq`` (the paper's continuation): the weights BSQ found, starting exactly on its grid
  (its per-layer step), with one learned clip per layer (``finetune_grid=layer``) or per output channel
  (``channel``; no better in the measurements: 90.86 vs 91.01 % at alpha = 0.015); the bounds stay.

With ``finetune_epochs=0`` the result is BSQ's own weights on its grid. Activations use the project's static
calibrated quantizers at ``acts`` bits (AQT rule: EMA of max|x| in the first 20 % of the regularized
steps, then frozen), not BSQ's per-batch dynamic scale, which cannot be lowered.

Not handled: starting above 7 magnitude bits (an int9 weight does not fit the export's uint8 container),
per-channel bit-widths, checkpoints (the plane shapes change while training).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from qcompile.passes.base import PassContext, PreconditionError, option, register_pass
from qcompile.quant import graph
from qcompile.quant.bayesian_bits import RangeWeightQuant
from qcompile.quant.bsq import BitPlaneWeight, bsq_regularizer
from qcompile.quant.modules import QConv2d, QLinear, WeightQuantizer
from qcompile.search.base import TrainedSearch, apply_assignment, check_choice, check_schedule, layer_kinds
from qcompile.search.policies import Assignment, LayerBits, uniform
from qcompile.train.trainer import QuantTrainer, TrainConfig

MAX_START_BITS = 7


class BitPlaneQuant(nn.Module):
    """A weight quantizer that ignores the float weight and returns the BSQ planes' W_q."""

    def __init__(self, planes: BitPlaneWeight) -> None:
        super().__init__()
        self.planes = planes

    @property
    def bits(self) -> int:
        """The signed bit-width the planes currently need (N + 1), as WeightQuant.bits."""
        return self.planes.itype.bits

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.planes()

    def bit_parameters(self) -> list[nn.Parameter]:
        return [self.planes.pos, self.planes.neg]

    def range_parameters(self) -> list[nn.Parameter]:
        return [self.planes.s]

    def quant_bias(self, b: torch.Tensor | None) -> torch.Tensor | None:
        return b

    def after_step(self) -> None:
        self.planes.clamp_()


def _attach_planes(layers: list[QConv2d | QLinear], start_bits: int) -> list[BitPlaneWeight]:
    planes = []
    for layer in layers:
        p = BitPlaneWeight(layer.weight.detach(), bits=start_bits, max_bits=MAX_START_BITS)
        layer.weight.requires_grad_(False)
        layer.weight_quant = BitPlaneQuant(p)  # type: ignore[assignment]
        planes.append(p)
    return planes


FINETUNE_GRIDS = ("layer", "channel")
FINETUNE_STARTS = ("float", "bsq")


def _freeze_precision(layers: list[QConv2d | QLinear], planes: list[BitPlaneWeight],
                      grid: str = "layer") -> list[int]:
    """Write each layer's (re-quantized) BSQ weights back as float weights on the grid BSQ found (N + 1 bits, its step).

    The quantizer starts at BSQ's per-layer step delta with a learned clip (x_max = delta (2^(N+1) - 1) / 2,
    so the codes stay in [-(2^N - 1), 2^N - 1]): the fine-tune starts from exactly the weights BSQ found.
    ``grid="channel"`` gives every output channel its own learned clip (all starting at delta), which the
    integer contract's per-channel weight scales lower as they are; ``"layer"`` keeps one. A per-channel
    max|W| grid would not keep BSQ's weights, and at 2 bits it puts every weight under max|W_c| / 2 at 0.
    """
    bits = []
    for layer, p in zip(layers, planes, strict=True):
        _, step, width = p.integer_weights()
        with torch.no_grad():
            layer.weight.copy_(p().detach())
        layer.weight.requires_grad_(True)
        keep = torch.ones(layer.weight.shape[0])
        x_max = torch.full_like(keep, step * (2**width - 1) / 2)
        layer.weight_quant = RangeWeightQuant(width, x_max if grid == "channel" else x_max[0], keep)  # type: ignore[assignment]
        bits.append(width)
    return bits


def _restart_from_float(layers: list[QConv2d | QLinear], planes: list[BitPlaneWeight],
                        start: list[tuple[torch.Tensor, WeightQuantizer]]) -> list[int]:
    """Keep only BSQ's (re-quantized) precision: put back each layer's float weight and max|W| quantizer.

    The caller writes the found widths into those quantizers (``apply_assignment``) and re-trains.
    """
    bits = []
    for layer, p, (weight, quant) in zip(layers, planes, start, strict=True):
        bits.append(p.itype.bits)
        with torch.no_grad():
            layer.weight.copy_(weight)
        layer.weight.requires_grad_(True)
        layer.weight_quant = quant
    return bits


@register_pass
@dataclass(frozen=True)
class BsqSearch(TrainedSearch):
    name = "bsq"
    summary = "BSQ: bit-plane group-Lasso training finds per-layer weight bits (activations calibrated)"

    alpha: float = option(0.005, "regularizer strength (>= 0); larger gives fewer bits")
    epochs: int = option(3, "regularized training epochs")
    requantize_every: int = option(1, "epochs between re-quantizations of the bit planes")
    finetune_epochs: int = option(1, "epochs of fine-tuning with the precision frozen (0: none)")
    start_bits: int = option(MAX_START_BITS, "starting magnitude bits N (weights start as int{N+1})")
    acts: int = option(8, "activation bits")
    lr: float = option(1e-3, "Adam learning rate of the weights and scales")
    bit_lr: float = option(1e-2, "Adam learning rate of the bit variables")
    batch_size: int = option(64, "training batch size")
    schedule: str = option("constant", "learning-rate schedule of the weights and ranges: constant | cosine")
    finetune_from: str = option("float", "fine-tune start: float (the float weights at the found precision, "
                                "per-channel max|W| grid, bounds re-calibrated) | bsq (BSQ's weights, on its grid)")
    finetune_grid: str = option("layer", "with finetune_from=bsq, the weight step, starting at BSQ's: layer "
                                "(BSQ's one per layer) | channel (one learned per output channel)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.alpha >= 0.0:
            raise PreconditionError(f"bsq alpha must be >= 0, got {self.alpha}")
        if self.epochs <= 0 or self.finetune_epochs < 0 or self.requantize_every <= 0:
            raise PreconditionError("bsq epochs and requantize_every must be positive, finetune_epochs >= 0")
        if not 1 <= self.start_bits <= MAX_START_BITS:
            raise PreconditionError(f"bsq start_bits must lie in 1..{MAX_START_BITS}, got {self.start_bits}")
        check_schedule("bsq", self.schedule)
        check_choice("bsq", "finetune_from", self.finetune_from, FINETUNE_STARTS)
        check_choice("bsq", "finetune_grid", self.finetune_grid, FINETUNE_GRIDS)

    def _config(self, ctx: PassContext, epochs: int, fraction: float) -> TrainConfig:
        return TrainConfig(epochs=epochs, batch_size=self.batch_size, lr=self.lr, range_lr=self.lr,
                           bit_lr=self.bit_lr, calibration_fraction=fraction,
                           seed=ctx.seed, progress=ctx.progress, schedule=self.schedule, **self.distillation())

    def search(self, gm: fx.GraphModule, ctx: PassContext) -> Assignment:
        assert ctx.dataset is not None
        names = [n for n, _ in layer_kinds(gm)]
        apply_assignment(gm, uniform(names, 8, self.acts))
        layers = [layer for _, layer in graph.layers(gm)]
        start = [(layer.weight.detach().clone(), layer.weight_quant) for layer in layers]
        planes = _attach_planes(layers, self.start_bits)

        def requantize(epoch: int, g: fx.GraphModule) -> bool:
            if (epoch + 1) % self.requantize_every:
                return False
            for p in planes:
                p.requantize_()
            return True

        regularizer = lambda: self.alpha * bsq_regularizer(planes)  # noqa: E731
        QuantTrainer(gm, ctx.dataset, self._config(ctx, self.epochs, 0.2), regularizer=regularizer,
                     on_epoch_end=requantize, teacher=self.teacher(ctx)).fit()
        for p in planes:
            p.requantize_()  # exact 0/1 planes, empty MSB/LSB planes dropped: the precision BSQ found
        if self.finetune_epochs and self.finetune_from == "float":
            bits = _restart_from_float(layers, planes, start)
            fraction = 0.2
        else:
            bits = _freeze_precision(layers, planes, self.finetune_grid)
            fraction = 0.0
        assignment = Assignment({n: LayerBits(b, self.acts) for n, b in zip(names, bits, strict=True)}, self.acts)
        if self.finetune_epochs:
            apply_assignment(gm, assignment)
            QuantTrainer(gm, ctx.dataset, self._config(ctx, self.finetune_epochs, fraction),
                         teacher=self.teacher(ctx)).fit()
        return assignment
