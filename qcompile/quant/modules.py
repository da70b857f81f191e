"""Uniform fake quantizers for the quant stage.

* Activations, per tensor: ``x_q = s * clamp(round(x / s), lo, hi)`` with ``s = amax / hi`` where
  ``hi = 2^b - 1`` (unsigned, the observed minimum is >= 0, e.g. after ReLU) or ``2^(b-1) - 1``
  (signed, narrow symmetric), or ``hi = 2^b - 1 - n`` for a ``skewed`` quantizer whose negative side is
  short (the range [-n, 2^b - 1 - n], n the least that covers the calibrated minimum: ``negative_codes``;
  zero stays at q = 0, so the integer ops are unchanged and only the export's zero point, n, differs).
  ``amax`` is calibrated as an exponential moving average of the batch
  statistic (``amax <- (1 - c) * amax + c * stat``, the first batch initialises it), where the statistic is
  max|x| (the AQT rule) or the p-th percentile of |x| (the ceil(n p / 100)-th smallest; the max when that
  is 0, as for a mostly-zero tensor after ReLU). Rounding uses a straight-through estimator. Under
  torchrun the statistic is reduced over the ranks first (max, or the mean of the percentiles). Or, with
  ``start_observing("mse")``, the batches fill a histogram (``quant/histogram.py``) and ``stop_observing``
  sets amax to the range of least expected squared error (clip + rounding) at the quantizer's bits and
  signedness. The histogram is kept: setting ``bits`` later (a policy after calibrate, the table-input cap)
  re-derives amax for the new width; share-scales then sets the group's common amax as for any range.
* Weights, per output channel: ``s_c = max|W_c| / (2^(b-1) - 1)``, recomputed every forward (unless
  pinned: prune-channels pins max|W_c| before it removes input columns).
* Biases, as the integer contract stores them: once ``quant.graph.bind_input_scales`` has told a layer
  which quantizer defines its input scale s_x, and that quantizer has a fixed grid (calibrated, not
  observing, not gated), the layer adds ``b_q = S * round(b / S)`` with ``S = s_x * s_w[c]`` (the int32
  accumulator's step; rounded in float64 like the lowering, straight-through for b). Without it a layer
  at 2-4 bits is off the integer graph by up to S / 2 per channel, a sizeable part of an output step.
* A bias too large for its accumulator grid: with the uniform weight quantizer and a fixed s_x, the weight
  scale of channel c is at least ``|b_c| / (s_x * 2^30)`` (``bias_scale_floor``), so that
  ``|q_b| = |round(b_c / (s_x s_w[c]))| <= 2^30`` (up to the float32 rounding of s_w) keeps int32 with room
  for the products (onnxruntime's quantizer raises its weight scales the same way). It binds only when b_c
  is out of proportion to s_x * max|W_c| (activations collapsed to ~1e-11, as in a randomly initialised
  GoogLeNet): the channel's weights then round to few codes or to 0, which is what their contribution to
  the output is worth. Simulation, lowering and the bias grid all take s_w from ``layer_weight_scale``.

Not handled: a real zero off the integer grid (a general zero point, where x = s (q - z) would add
z-terms to every integer op; the skewed range keeps z = 0 and gets most of the benefit for activations
with a short negative side) and per-channel activation scales; the integer contract has neither.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from qcompile import distributed
from qcompile.ir.meta import IntType
from qcompile.ir.shapes import pair
from qcompile.quant.histogram import Histogram, Weigh


def fake_quant(x: torch.Tensor, scale: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``scale * clamp(round(x / scale), lo, hi)`` with a straight-through estimator for round."""
    q = (x / scale).clamp(lo, hi)
    q = q + (torch.round(q) - q).detach()
    return q * scale


class ActQuant(nn.Module):
    """Per-tensor activation quantizer with EMA calibration (``observing``) and fake quantization."""

    amax: torch.Tensor
    amin: torch.Tensor
    batches: torch.Tensor

    def __init__(self, bits: int = 8, momentum: float = 0.1, percentile: float | None = None) -> None:
        super().__init__()
        self.histogram: Histogram | None = None  # kept after an mse calibration (see ``bits``)
        self.observing = False
        self.bits, self.momentum, self.percentile = bits, momentum, percentile
        self.register_buffer("amax", torch.zeros(()))
        self.register_buffer("amin", torch.zeros(()))
        self.register_buffer("batches", torch.zeros((), dtype=torch.int64))
        self.signed_override: bool | None = None
        self.skewed = False  # a signed range may give its short negative side fewer codes (IntType.neg)

    @property
    def bits(self) -> int:
        return self._bits

    @bits.setter
    def bits(self, value: int) -> None:
        """A new width re-derives an mse range from the kept histogram (policies assign bits after calibrate)."""
        changed = getattr(self, "_bits", value) != value
        self._bits = value
        if changed and self.histogram is not None and not self.observing and self.calibrated:
            self.fit_range()

    @property
    def calibrated(self) -> bool:
        return bool(self.batches > 0)

    @property
    def signed(self) -> bool:
        if self.signed_override is not None:
            return self.signed_override
        return bool(self.amin < 0)

    @property
    def itype(self) -> IntType:
        return IntType(self.bits, self.signed, self.negative_codes())

    def negative_codes(self) -> int | None:
        """n for a skewed signed range [-n, 2^b - 1 - n] covering [amin, amax]; None for the symmetric one.

        The least n with n * s >= -amin for s = amax / (2^b - 1 - n): n = ceil((2^b - 1) (-amin) / (amax - amin)),
        at least 1; symmetric when that reaches 2^(b-1) - 1 (the negative side is not short), when the
        quantizer is not ``skewed``, is unsigned or uncalibrated, or has more than 8 bits.
        """
        if not (self.skewed and self.signed and self.bits <= 8 and self.calibrated):
            return None
        low, high = -float(self.amin), float(self.amax)
        if not (math.isfinite(low) and math.isfinite(high) and high > 0):
            return None
        n = max(1, math.ceil((2**self.bits - 1) * max(low, 0.0) / (high + max(low, 0.0))))
        return n if n < 2 ** (self.bits - 1) - 1 else None

    @property
    def scale(self) -> torch.Tensor:
        return self.amax / self.itype.hi

    def fixed_scale(self) -> torch.Tensor | None:
        """The scale of the grid this quantizer rounds to now; None while it passes float values through."""
        return None if self.observing or not self.calibrated else self.scale.detach()

    def start_observing(self, method: str = "max", momentum: float = 0.1, percentile: float | None = None,
                        weigh: Weigh | None = None) -> None:
        """Forget the range and observe afresh: ``method`` is max, percentile (of |x|) or mse (a histogram whose
        values count with the weights ``weigh`` gives, 1 without it)."""
        self.momentum, self.percentile = momentum, percentile if method == "percentile" else None
        self.histogram = Histogram(weigh) if method == "mse" else None
        self.amax.zero_()
        self.batches.zero_()
        self.observing = True

    def stop_observing(self) -> None:
        """Fix the grid: with a histogram, amax becomes its least-error range at the current bits."""
        self.observing = False
        if self.histogram is not None:
            self.histogram.weigh = None  # the counts are final (and the module stays picklable)
            if self.calibrated:
                self.fit_range()

    def fit_range(self) -> None:
        """amax <- the histogram's mse range on this quantizer's grid (bits, signedness)."""
        assert self.histogram is not None
        self.amax.fill_(self.histogram.mse_range(self.itype))

    def _statistic(self, x: torch.Tensor) -> torch.Tensor:
        a = x.detach().abs().flatten().float()
        if self.percentile is None or a.numel() == 0:
            return a.max()
        k = max(1, min(a.numel(), math.ceil(a.numel() * self.percentile / 100.0)))
        stat = a.kthvalue(k).values
        return stat if stat > 0 else a.max()  # a sparse tensor (mostly zeros after ReLU) keeps its max

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        """One calibration step; under torchrun the batch statistic is that of all ranks' batches together."""
        if self.histogram is not None:
            self.histogram.add(x)
            stat = torch.tensor(self.histogram.peak)  # amax is the max seen until stop_observing fits it
        else:
            stat = self._statistic(x)
            stat = distributed.reduce_max(stat) if self.percentile is None else distributed.reduce_mean(stat)
        low = distributed.reduce_min(x.detach().min())
        first = bool(self.batches == 0)
        if first or self.histogram is not None:
            self.amax.copy_(stat)
        else:
            self.amax.mul_(1.0 - self.momentum).add_(self.momentum * stat)
        self.amin.copy_(low if first else torch.minimum(self.amin, low))
        self.batches += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observe(x)
            return x
        if not self.calibrated:
            return x
        t = self.itype
        return fake_quant(x, self.scale.clamp_min(1e-12), t.lo, t.hi)

    def extra_repr(self) -> str:
        state = f"amax={float(self.amax):.4g}" if self.calibrated else "uncalibrated"
        skew = f", range={self.itype}" if self.negative_codes() is not None else ""
        return f"bits={self.bits}, signed={self.signed}, {state}{skew}"


class WeightQuant(nn.Module):
    """Per-output-channel symmetric weight quantizer, scale from max|W| at every call."""

    pinned_amax: torch.Tensor | None

    def __init__(self, bits: int = 8) -> None:
        super().__init__()
        self.bits = bits
        self.register_buffer("pinned_amax", None)

    @property
    def itype(self) -> IntType:
        return IntType(self.bits, True)

    def pin_scale(self, w: torch.Tensor) -> None:
        """Keep the current per-channel max|W| from now on (prune-channels drops dead inputs exactly)."""
        if self.pinned_amax is None:
            self.pinned_amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1).clone()

    def scale(self, w: torch.Tensor, floor: torch.Tensor | None = None) -> torch.Tensor:
        """max|W_c| / hi per channel (1 for an all-zero channel), raised to ``floor`` where that is larger."""
        amax = self.pinned_amax
        if amax is None:
            amax = w.detach().abs().reshape(w.shape[0], -1).amax(dim=1)
        scale = amax / self.itype.hi
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale if floor is None else torch.maximum(scale, floor.to(scale.dtype))

    def forward(self, w: torch.Tensor, floor: torch.Tensor | None = None) -> torch.Tensor:
        shape = (-1,) + (1,) * (w.dim() - 1)
        t = self.itype
        return fake_quant(w, self.scale(w, floor).view(shape), t.lo, t.hi)

    def quant_bias(self, b: torch.Tensor | None) -> torch.Tensor | None:
        """The bias the layer uses (a weight quantizer that prunes channels zeroes theirs)."""
        return b

    def select_channels(self, keep: torch.Tensor) -> None:
        """Follow the removal of output channels (prune-channels)."""
        if self.pinned_amax is not None:
            self.pinned_amax = self.pinned_amax[keep].clone()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per-channel"


class WeightQuantizer(Protocol):
    """What a layer's weight quantizer offers (WeightQuant and the quantizers of the learned searches)."""

    bits: int

    @property
    def itype(self) -> IntType: ...

    def scale(self, w: torch.Tensor) -> torch.Tensor: ...

    def quant_bias(self, b: torch.Tensor | None) -> torch.Tensor | None: ...

    def __call__(self, w: torch.Tensor) -> torch.Tensor: ...


BIAS_CODE_LIMIT = 2**30  # |q_b| at most this: the products keep at least half of the int32 range


def _fixed_input_scale(layer: QConv2d | QLinear) -> torch.Tensor | None:
    return layer.input_scale() if layer.input_scale is not None else None


def bias_scale_floor(layer: QConv2d | QLinear) -> torch.Tensor | None:
    """|b_c| / (s_x * 2^30): the least weight scale keeping |q_b| <= 2^30 (None without bias or fixed s_x)."""
    b = layer.weight_quant.quant_bias(layer.bias)
    s_x = _fixed_input_scale(layer) if b is not None else None
    if b is None or s_x is None or not float(s_x) > 0:
        return None
    floor = b.detach().double().abs() / (s_x.double() * BIAS_CODE_LIMIT)
    return torch.where(torch.isfinite(floor), floor, 0.0)  # a NaN/Inf bias is refused by the lowering


def layer_weight(layer: QConv2d | QLinear) -> torch.Tensor:
    """W_q, the weight the layer multiplies by (the uniform quantizer's grid floored for the bias)."""
    q = layer.weight_quant
    return q(layer.weight, bias_scale_floor(layer)) if isinstance(q, WeightQuant) else q(layer.weight)


def layer_weight_scale(layer: QConv2d | QLinear) -> torch.Tensor | None:
    """s_w per output channel, as ``layer_weight`` uses it; None for a quantizer without a plain scale."""
    q, w = layer.weight_quant, layer.weight.detach()
    if isinstance(q, WeightQuant):
        return q.scale(w, bias_scale_floor(layer))
    weight_scale = getattr(q, "scale", None)
    return weight_scale(w) if weight_scale is not None else None


def grid_bias(layer: QConv2d | QLinear) -> torch.Tensor | None:
    """The bias the layer adds: on the accumulator grid s_x * s_w once its input scale is bound and fixed."""
    b = layer.weight_quant.quant_bias(layer.bias)
    s_x = _fixed_input_scale(layer) if b is not None else None
    s_w = layer_weight_scale(layer) if s_x is not None else None
    if b is None or s_x is None or s_w is None:
        return b
    step = s_x.double() * s_w.detach().double()
    exact = b.detach().double()
    snapped = torch.where(step > 0, torch.round(exact / step) * step, exact).to(b.dtype)
    return b + (snapped - b).detach()


class QConv2d(nn.Conv2d):
    """Conv2d whose weight passes through a WeightQuant and whose bias is snapped to the int32 grid."""

    weight_quant: WeightQuantizer
    input_scale: Callable[[], torch.Tensor | None] | None = None  # set by quant.graph.bind_input_scales

    @classmethod
    def from_float(cls, conv: nn.Conv2d, bits: int = 8) -> QConv2d:
        q = cls(
            conv.in_channels, conv.out_channels, pair(conv.kernel_size), pair(conv.stride),
            conv.padding if isinstance(conv.padding, str) else pair(conv.padding), pair(conv.dilation),
            conv.groups, conv.bias is not None, conv.padding_mode,
        )
        q.load_state_dict(conv.state_dict())
        q.weight_quant = WeightQuant(bits)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, layer_weight(self), grid_bias(self))


class QLinear(nn.Linear):
    weight_quant: WeightQuantizer
    input_scale: Callable[[], torch.Tensor | None] | None = None

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int = 8) -> QLinear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None)
        q.load_state_dict(linear.state_dict())
        q.weight_quant = WeightQuant(bits)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer_weight(self), grid_bias(self))
