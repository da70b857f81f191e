"""APoT weight quantizers (ALGORITHMS.md §3): additive powers-of-two levels, multiplier-free products.

Level set of B magnitude bits. It has n = ceil(B/2) additive terms: B // 2 terms of 2 bits (zero or one of
three powers of two) and, when B is odd, one term of 1 bit (zero or one power). The powers are handed out
in three rounds of decreasing exponents 2^-1, 2^-2, ...: every 2-bit term takes the next one in each
round, in order; the 1-bit term takes part only in the last round, first. The magnitude codes are all
sums of one choice per term, scaled to integers (x 2^depth, depth = exponents handed out) and deduplicated
(the exponents are all distinct, so the 2^B sums are too); k_max is the largest. This gives
  B=1: {0,1}/1 (ternary)           B=2: {0,1,2,4}/4           B=3: {0,1,2,3,4,6,8,10}/10
  B=4: {0,1,2,3,4,6,8,9,12,16,18,24,32,33,36,48}/48           B=5: 32 codes, at most 3 terms, k_max = 100
  B=6: 64 codes, 3 terms, k_max = 448.
A b-bit weight is sign + a (b-1)-bit magnitude: codes k in {-K} u K (2 bits: ternary), b = 2..7. Every
code is a sum of at most n signed powers of two (term i: sign s_i in {-1, 0, 1}, exponent e_i), the bits
of |k|, so w * x is n shifts and adds.

Quantizer of one layer, every forward (training and serving alike), statistics per output channel c:
  W'_c = (W_c - mean(W_c)) / std(W_c)           (weight normalization)
  W_hat_c = std(W_c) * alpha * Proj(clip(W'_c / alpha, -1, 1))
with Proj the nearest level (straight-through estimator) and one alpha per layer, learned (a range
parameter). The gradient of alpha of alpha * Proj(clip(v / alpha)) is sign(v / alpha) outside the clip and
Proj(v / alpha) - v / alpha inside (autograd of the STE form gives exactly this).
Deployed weight: W_hat_c = s_c * k with s_c = std(W_c) * alpha / k_max, the per-channel scale of the
dyadic requantization. Two choices, both because qcompile folds BatchNorm into the weights before
quantizing (the method normalizes per layer with a BatchNorm after the conv, which renormalizes each
channel): statistics are per output channel (``per_channel=False``: per layer, one s), and std is
folded into the scale, so the float model keeps its function at the start of training. For the same
reason the mean is kept by default (``center=False``: W'_c = W_c / std(W_c)). ``center=True`` subtracts it
as the method does and does not add it back, so the deployed weight quantizes W_c - mean(W_c). After BN
folding a channel's mean carries part of its function: on Fashion-MNIST SmallResNet with 3-bit weights,
before any training, centering gives 21.5 % and keeping the mean 88.8 % (uniform 3-bit: 86.3 %).
Simulation and integer graph use the same k and s.
Not handled: APoT activations (activations stay uniform), per-channel alpha.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch import nn

from qcompile.ir.intops import codes_of_terms
from qcompile.ir.meta import IntType
from qcompile.passes.base import PreconditionError
from qcompile.quant.modules import QConv2d, QLinear, WeightQuant

APOT_BITS = range(2, 8)  # weight bits: sign + 1..6 magnitude bits (2 bits: ternary)
ROUNDS = 3  # a 2-bit term chooses among zero and three powers of two
ALPHA_GRID = torch.linspace(0.5, 5.0, 46)


@dataclass(frozen=True)
class LevelSet:
    """The magnitude codes of B bits: ``codes`` (sorted ints), ``k_max``, and each term's integer powers."""

    magnitude_bits: int
    codes: tuple[int, ...]
    term_powers: tuple[tuple[int, ...], ...]  # exponents (of 2) each additive term may contribute

    @property
    def k_max(self) -> int:
        return self.codes[-1]

    @property
    def terms(self) -> int:
        return len(self.term_powers)

    def levels(self) -> torch.Tensor:
        """The magnitudes k / k_max in [0, 1], sorted."""
        return torch.tensor(self.codes, dtype=torch.float64) / self.k_max


def _exponents(magnitude_bits: int) -> list[list[int]]:
    """Per term, the (negative) exponents it may contribute: three rounds, the 1-bit term last and first."""
    full, half = magnitude_bits // 2, magnitude_bits % 2
    terms: list[list[int]] = [[] for _ in range(full + half)]
    depth = 0
    for r in range(ROUNDS):
        order = ([full] if half and r == ROUNDS - 1 else []) + list(range(full))
        for t in order:
            depth += 1
            terms[t].append(-depth)
    return terms


@cache
def level_set(magnitude_bits: int) -> LevelSet:
    """The APoT level set of ``magnitude_bits`` (1..6) magnitude bits, as integer codes."""
    if not 1 <= magnitude_bits <= 6:
        raise PreconditionError(f"APoT magnitude bits must be 1..6, got {magnitude_bits}")
    exps = _exponents(magnitude_bits)
    depth = -min(e for t in exps for e in t)
    powers = tuple(tuple(depth + e for e in t) for t in exps)
    sums = {0}
    for term in powers:
        sums = {s + c for s in sums for c in (0, *(1 << p for p in term))}
    return LevelSet(magnitude_bits, tuple(sorted(sums)), powers)


def weight_level_set(bits: int) -> LevelSet:
    """The magnitude set of a ``bits``-bit signed APoT weight (sign + bits-1 magnitude bits)."""
    if bits not in APOT_BITS:
        raise PreconditionError(f"APoT weights have {APOT_BITS.start}..{APOT_BITS.stop - 1} bits (2: ternary), "
                                f"got {bits}; choose a bit-width in that range")
    return level_set(bits - 1)


def nearest_code(v: torch.Tensor, ls: LevelSet) -> torch.Tensor:
    """Signed integer code of the level nearest to each v in [-1, 1] (ties toward the smaller magnitude)."""
    levels = ls.levels().to(v.dtype)
    mids = (levels[1:] + levels[:-1]) / 2
    idx = torch.bucketize(v.detach().abs(), mids, right=False)
    codes = torch.tensor(ls.codes, dtype=torch.int64)[idx]
    return torch.where(v < 0, -codes, codes)


def apot_quantize(w: torch.Tensor, alpha: torch.Tensor, ls: LevelSet) -> torch.Tensor:
    """alpha * Proj(clip(w / alpha, -1, 1)) with a straight-through Proj (the reparameterized clipping)."""
    c = (w / alpha).clamp(-1.0, 1.0)
    p = nearest_code(c, ls).to(w.dtype) / ls.k_max
    return alpha * (c + (p - c).detach())


def best_alpha(w: torch.Tensor, ls: LevelSet) -> float:
    """The alpha of ALPHA_GRID with the least squared quantization error of ``w`` (normalized weights)."""
    w = w.detach().flatten().float()
    errors = [float(((apot_quantize(w, a, ls) - w) ** 2).sum()) for a in ALPHA_GRID]
    return float(ALPHA_GRID[min(range(len(errors)), key=errors.__getitem__)])


def terms_of_codes(codes: torch.Tensor, ls: LevelSet) -> tuple[torch.Tensor, torch.Tensor]:
    """Per additive term: (sign in {-1, 0, 1}, exponent) tensors of shape [terms, *codes.shape], int8.

    Term i holds the power of two of its own exponent set that is a bit of |k| (at most one is).
    """
    mag, sign = codes.abs(), codes.sign()
    signs, exps = [], []
    for powers in ls.term_powers:
        e = torch.zeros_like(mag)
        on = torch.zeros_like(mag, dtype=torch.bool)
        for p in powers:
            hit = (mag >> p) & 1 == 1
            e, on = torch.where(hit, p, e), on | hit
        signs.append(torch.where(on, sign, 0))
        exps.append(e)
    s, x = torch.stack(signs).to(torch.int8), torch.stack(exps).to(torch.int8)
    if not torch.equal(codes_of_terms(s, x), codes.to(torch.int64)):
        raise PreconditionError(f"weight codes outside the {ls.magnitude_bits}-bit APoT set")
    return s, x


def code_type(ls: LevelSet) -> IntType:
    """The narrow signed integer type that holds every code +-k (k <= k_max)."""
    return IntType(max(2, ls.k_max.bit_length() + 1), True)


class APoTWeightQuant(nn.Module):
    """Per-layer APoT weight quantizer with weight normalization and a learned clip alpha."""

    def __init__(self, bits: int, w: torch.Tensor | None = None, per_channel: bool = True,
                 center: bool = False) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(1.0))
        self.bits, self.per_channel, self.center = bits, per_channel, center
        if w is not None:
            with torch.no_grad():
                self.alpha.fill_(best_alpha(self.normalize(w)[0], self.level_set))

    @property
    def bits(self) -> int:
        return self._bits

    @bits.setter
    def bits(self, bits: int) -> None:
        self.level_set = weight_level_set(bits)
        self._bits = bits

    @property
    def itype(self) -> IntType:
        """The type of the stored codes (wider than ``bits``: APoT codes are sparse)."""
        return code_type(self.level_set)

    @property
    def terms(self) -> int:
        return self.level_set.terms

    def range_parameters(self) -> list[nn.Parameter]:
        return [self.alpha]

    def normalize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """((W - mean) / std, std) over each output channel (or the whole layer); std 1 where it is 0."""
        per_channel = self.per_channel and w.dim() > 1 and w[0].numel() > 1
        dims = tuple(range(1, w.dim())) if per_channel else tuple(range(w.dim()))
        if w.numel() == 1:
            return torch.zeros_like(w), w.abs().clamp_min(1e-12)
        mean, std = w.mean(dim=dims, keepdim=True), w.std(dim=dims, keepdim=True)
        std = torch.where(std > 0, std, torch.ones_like(std))
        if not self.center:
            mean = torch.zeros_like(mean)
        return (w - mean) / std, std

    def _alpha(self) -> torch.Tensor:
        return self.alpha.abs().clamp_min(1e-6)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        wn, std = self.normalize(w)
        return std * apot_quantize(wn, self._alpha(), self.level_set)

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """The integer codes k of W_hat = scale * k (int64)."""
        wn, _ = self.normalize(w.detach())
        return nearest_code((wn / self._alpha().detach()).clamp(-1.0, 1.0), self.level_set)

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        """s[c] = std(W_c) * alpha / k_max (one std per layer without per-channel normalization)."""
        _, std = self.normalize(w.detach())
        s = std.flatten() * self._alpha().detach() / self.level_set.k_max
        return s.expand(w.shape[0]).clone() if s.numel() == 1 else s

    def quant_bias(self, b: torch.Tensor | None) -> torch.Tensor | None:
        return b

    def extra_repr(self) -> str:
        ls = self.level_set
        norm = "per-channel" if self.per_channel else "per-layer"
        return f"bits={self.bits}, apot terms={ls.terms}, k_max={ls.k_max}, {norm} normalization, " \
               f"alpha={float(self.alpha.detach()):.4g}"


def multiplier_free_terms(quantizer: object) -> int:
    """Additive terms per weight of an APoT quantizer (0 for any other quantizer: it multiplies)."""
    return quantizer.terms if isinstance(quantizer, APoTWeightQuant) else 0



def set_weight_quantizer(layer: QConv2d | QLinear, bits: int, per_channel: bool = True, center: bool = False) -> None:
    """An APoT quantizer of ``bits`` for a layer when the width has a level set, else a uniform one."""
    if bits not in APOT_BITS:
        layer.weight_quant = WeightQuant(bits)
        return
    q = layer.weight_quant
    if not (isinstance(q, APoTWeightQuant) and (q.bits, q.per_channel, q.center) == (bits, per_channel, center)):
        layer.weight_quant = APoTWeightQuant(bits, layer.weight.detach(), per_channel, center)
