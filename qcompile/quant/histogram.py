"""Activation histograms and the clipping range that minimises the expected quantization error.

Histogram: the calibration batches' values, counted by magnitude in ``BINS`` equal bins of width
w = R / BINS over [0, R], separately for x > 0 and x < 0; exact zeros are counted apart (every grid holds 0,
so they cost nothing). R starts as the first batch's max|x| and doubles whenever a batch goes beyond it, the
old bins merging pairwise (``2^k`` into one for a k-fold doubling), so the counts stay exact and no value is
ever clipped by the histogram itself. Of a batch with n > 2^18 values, every k-th (k = ceil(n / 2^18), in
the flattened order) is counted, so that large feature maps cost about what the forward pass does; the max
is over all values (a NaN or Inf max is kept as the range, for the calibrate pass to refuse). A sequence
of batches gives one histogram (deterministic: bincount of integer bin indices, summed in order). A value
may count with a weight instead of 1 (``weigh``: the calibrate pass weighs a LayerNorm's input by 1 / var
of its normalized group, so that E is the error after the normalization).

Expected error of the range c on a grid of step s = c / hi (``x_q = s * clamp(round(x / s), lo, hi)``),
with the density uniform inside each bin [a_i, b_i] holding n_i values::

    E(c) = sum_i (n_i / w) * integral_{a_i}^{b_i} (x - x_q)^2 dx

* below c it is the rounding error e(x) = x - s round(x / s), periodic in s, with
  ``integral_{-s/2}^{x} e^2 = s^3 (k / 12 + ((r - 1/2)^3 + 1/8) / 3)``, u = x / s + 1/2, k = floor(u),
  r = u - k (1/12 per whole period, the cubic for the part period);
* beyond c every value clips to c: ``integral (x - c)^2 = (x - c)^3 / 3``;
* a signed (narrow, lo = -hi) grid treats both signs' magnitudes alike; an unsigned grid (lo = 0) sends
  every negative value to 0 whatever c, a constant that does not move the minimiser, so only x > 0 count.

``mse_range`` minimises E over c in (0, m], m the largest |x| seen: first over the geometric ladder
c = m 2^(-j / 8), j = 0..96 (down to m / 4096), then linearly between the best rung's neighbours
(32 more points); argmin takes the first minimum, so the result is a function of the histogram alone.
c = m (the max calibration) is a candidate, so E(mse) <= E(max) under this model. Cost: one min/max pass
and O(min(n, 2^18)) (one bincount) per batch, O(130 BINS) per quantizer once at the end.

Not handled: asymmetric ranges (the integer contract has no zero points); a density finer than a bin (the
model's rounding error is then that of spread values, s^2 / 12 per value, not the exact error of data that
sits on a few points).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from qcompile import distributed
from qcompile.ir.meta import IntType

BINS = 4096
SAMPLE = 2**18  # values of one batch counted, at most (the max is over all of them)
_RUNGS, _PER_OCTAVE, _FINE = 97, 8, 32


Weigh = Callable[[torch.Tensor], torch.Tensor]  # x -> a weight per element of x (broadcastable to x)


class Histogram:
    """Counts of x > 0 and x < 0 by magnitude over [0, ``top``], plus the exact zeros and the max |x|.

    With ``weigh``, each value counts with its weight instead of 1 (E(c) becomes a weighted error)."""

    def __init__(self, weigh: Weigh | None = None) -> None:
        self.weigh = weigh
        self.top = 0.0  # R, the histogram's upper edge
        self.peak = 0.0  # m, the largest |x| seen
        self.zeros = 0.0
        self.counts = torch.zeros(2, BINS, dtype=torch.float64)  # row 0: x > 0, row 1: x < 0

    def add(self, x: torch.Tensor) -> None:
        """Count one batch (under torchrun: all ranks' batches, the same histogram on every rank)."""
        x = x.detach().float()
        weights = None if self.weigh is None else torch.broadcast_to(self.weigh(x), x.shape).flatten().double()
        x = x.flatten()
        if x.numel() == 0:
            return
        low, high = torch.aminmax(x)
        peak = float(distributed.reduce_max(torch.maximum(-low, high)))
        if not math.isfinite(peak):  # NaN or Inf: kept as the peak (and the range), for the caller to refuse
            self.peak = peak
            return
        step = -(-x.numel() // SAMPLE)  # every step-th value, at most SAMPLE of them
        if step > 1:
            x = x[::step]
            weights = None if weights is None else weights[::step]
        zeros = torch.tensor(float(x.numel() - torch.count_nonzero(x)) if weights is None else
                             float(weights[x == 0].sum()))
        self.zeros += float(distributed.reduce_sum(zeros))
        if peak == 0.0:
            return
        self._cover(peak)
        # one pass over x: bin floor(x / w) + BINS of [0, 2 BINS) (truncation is floor once shifted >= 0),
        # the lower half holding x < 0 by decreasing magnitude; exact zeros fall in bin BINS and are taken out
        idx = (x * (BINS / self.top)).add_(BINS).clamp_(0.0, 2 * BINS - 1).long()
        both = torch.bincount(idx, weights, minlength=2 * BINS).double()
        both[BINS] -= float(zeros)
        counts = torch.stack([both[BINS:], both[:BINS].flip(0)])
        self.counts += distributed.reduce_sum(counts.cpu())
        self.peak = max(self.peak, peak) if math.isfinite(self.peak) else self.peak

    def _cover(self, peak: float) -> None:
        if self.top == 0.0:
            self.top = peak
            return
        factor = 1
        while self.top * factor < peak:
            factor *= 2
        if factor == 1:
            return
        self.top *= factor
        merged = torch.zeros_like(self.counts)
        if factor >= BINS:
            merged[:, 0] = self.counts.sum(dim=1)
        else:
            merged[:, : BINS // factor] = self.counts.view(2, BINS // factor, factor).sum(dim=2)
        self.counts = merged

    def expected_error(self, clips: torch.Tensor, itype: IntType) -> torch.Tensor:
        """E(c) for every c in ``clips`` (float64, shape [C]) on the grid of ``itype``."""
        n = self.counts[0] + self.counts[1] if itype.signed else self.counts[0]
        used = torch.nonzero(n).flatten()  # empty bins add nothing
        w = self.top / BINS
        a, b = (used.double() * w)[None, :], ((used + 1).double() * w)[None, :]
        c = clips.double()[:, None]
        s = c / itype.hi

        def rounding(edge: torch.Tensor) -> torch.Tensor:  # integral of e^2 from -s/2 to min(edge, c)
            u = torch.minimum(edge, c) / s + 0.5
            k = torch.floor(u)
            return s**3 * (k / 12.0 + ((u - k - 0.5) ** 3 + 0.125) / 3.0)

        def clipping(edge: torch.Tensor) -> torch.Tensor:  # integral of (x - c)^2 from c to max(edge, c)
            return torch.clamp(edge - c, min=0.0) ** 3 / 3.0

        per_bin = rounding(b) - rounding(a) + clipping(b) - clipping(a)
        return (per_bin * (n[used] / w)[None, :]).sum(dim=1)

    def mse_range(self, itype: IntType) -> float:
        """The c in (0, m] with the least expected error (0 when every value was zero)."""
        if self.peak == 0.0 or not math.isfinite(self.peak):
            return self.peak
        rungs = self.peak * torch.pow(2.0, -torch.arange(_RUNGS, dtype=torch.float64) / _PER_OCTAVE)
        best = int(torch.argmin(self.expected_error(rungs, itype)))
        lo, hi = float(rungs[min(best + 1, _RUNGS - 1)]), float(rungs[max(best - 1, 0)])
        fine = torch.cat([torch.linspace(lo, hi, _FINE, dtype=torch.float64), rungs[best : best + 1]])
        errors = self.expected_error(fine, itype)
        return float(fine[int(torch.argmin(errors))])
