"""Bayesian Bits quantizers (ALGORITHMS.md §1): gated residual bit decomposition with hard-concrete gates.

A tensor x is clipped to a learned range (signed: [-x_max, x_max], R = 2 x_max; unsigned: [0, x_max],
R = x_max) and quantized on nested grids s_b = R / (2^b - 1) for b = 2, 4, 8, 16, 32; the grids nest
because 2^(2b) - 1 = (2^b - 1)(2^b + 1), so s4 = s2/5, s8 = s4/17, s16 = s8/257, s32 = s16/65537.
With q_b = clamp(round(x / s_b)) (straight-through rounding) the residuals are e_b = s_b q_b - s_{b/2} q_{b/2}
and x2 = s2 q2; then x2 + e4 + ... + e_b = s_b q_b exactly. On inputs away from the grid's edge this equals
the recursive definition e_b = s_b round((x - x2 - ... - e_{b/2}) / s_b); the explicit clamp keeps a
clipped signed value on the narrow range [-(2^(b-1)-1), 2^(b-1)-1] instead of rounding a tie at the edge
up to 2^(b-1), which the integer contract has no room for. So a signed b-bit grid is the project's
narrow signed b-bit type with scale 2 x_max / (2^b - 1) (2 bits: ternary), an unsigned one the unsigned
b-bit type with scale x_max / (2^b - 1).

Gated output: x_q = z2 (x2 + z4 (e4 + z8 (e8 + z16 (e16 + z32 e32)))). z4..z32 are one gate per tensor;
z2 is one gate per output channel for weights that may be pruned (the last layer's outputs are never
pruned) and 1 for activations. Gates are hard-concrete: u ~ U(0, 1),
s = sigmoid((log u - log(1 - u) + log a) / beta), z = clip(s (zeta - gamma) + gamma, 0, 1), with
beta = 2/3, gamma = -0.1, zeta = 1.1; P(z != 0) = sigmoid(log a - beta log(-gamma / zeta)). In eval mode,
or once frozen, a gate is ON iff log a > -0.935 (P(z = 0) < 0.34). A residual whose sampled gate is
exactly 0 is not computed (same result, less work).

Expected cost (the regularizer's per-quantizer term, weighted by mu and MACs_l / max MACs by the search):
sum_b b prod_{k <= b} P(z_k != 0), the z2 factor averaged over channels.

Not handled: asymmetric (zero-point) ranges, per-channel clip ranges, more than 8 bits after lowering
(16/32-bit choices are reported and lowered at 8 bits by the search).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from qcompile.ir.meta import IntType
from qcompile.quant.modules import ActQuant

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1
THRESHOLD = -0.935
BIT_WIDTHS = (2, 4, 8, 16, 32)
GATED_BITS = BIT_WIDTHS[1:]  # one per-tensor gate each
ON_INIT, OFF_INIT = 6.0, -6.0
LOG_RATIO = BETA * math.log(-GAMMA / ZETA)  # P(z != 0) = sigmoid(log a - LOG_RATIO)


def gate_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z != 0) of a hard-concrete gate."""
    return torch.sigmoid(log_alpha - LOG_RATIO)


def sample_gate(log_alpha: torch.Tensor) -> torch.Tensor:
    """One hard-concrete draw per gate (differentiable in log a)."""
    u = torch.rand_like(log_alpha).clamp(1e-6, 1.0 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / BETA)
    return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def deterministic_gate(log_alpha: torch.Tensor) -> torch.Tensor:
    return (log_alpha > THRESHOLD).to(log_alpha.dtype)


def grid_bounds(bits: int, signed: bool) -> tuple[int, int]:
    """The integer range of a b-bit grid: narrow signed or unsigned (as IntType, for b up to 32)."""
    return (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def grid_scale(x_max: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """s_b = R / (2^b - 1), R = 2 x_max (signed) or x_max (unsigned)."""
    return (2.0 * x_max if signed else x_max) / float(2**bits - 1)


def _ste_round(v: torch.Tensor) -> torch.Tensor:
    return v + (torch.round(v) - v).detach()


def quantize_on_grid(x: torch.Tensor, x_max: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """s_b * clamp(round(x / s_b)) on the b-bit grid of the range (x already clipped).

    Straight-through where round(x / s_b) lies in [lo, hi] (the edges included: a value that rounds onto
    the edge is not clipped), no gradient through the rounding where the clamp clips it; written out
    with ``where`` because torch's own clamp changed its gradient at the bounds (2.14 passes none there,
    2.13 all of it), and GatedGrid's fused gradients follow this definition.
    """
    s = grid_scale(x_max, bits, signed)
    lo, hi = grid_bounds(bits, signed)
    v = x / s
    r = torch.round(v).detach()
    passed = (r >= lo) & (r <= hi)
    return torch.where(passed, _ste_round(v), r.clamp(lo, hi)) * s


def residual_decomposition(x: torch.Tensor, x_max: torch.Tensor, signed: bool) -> list[torch.Tensor]:
    """[x2, e4, e8, e16, e32] for an already clipped x (computed in x's dtype)."""
    levels = [quantize_on_grid(x, x_max, b, signed) for b in BIT_WIDTHS]
    return [levels[0]] + [hi - lo for lo, hi in zip(levels, levels[1:], strict=False)]


CHUNK = 1 << 16  # elements per block: the block's temporaries stay in the CPU's cache


class GatedGrid(torch.autograd.Function):
    """The gated residual quantizer as one autograd node: the values and straight-through gradients of
    composing quantize_on_grid levels, computed blockwise with float arithmetic only (boolean masks are
    slow on the CPU, and one pass per term over a large activation is bound by memory bandwidth).

    Inputs: x, x_max (> 0), the active gates g_1..g_a (z4, z8, ...; all non-zero), the channel gates z2
    (empty: none), signedness. With xc = clip(x), v_k = xc / s_k, q_k = clamp(round(v_k)), L_k = s_k q_k,
    the nested output z2 (L_0 + g_1 (D_1 + g_2 (D_2 + ...))), D_k = L_k - L_{k-1}, is z2 sum_k w_k L_k with
    w_k = P_k - P_{k+1} (P_0 = 1, P_k = g_1 ... g_k, P_{a+1} = 0). Gradients, m_k = 1 where the clamp
    passes round(v_k) and 0 where it clips (only possible on a signed grid), c = sum_k w_k m_k:
    dy/dx = z2 c inside the clip range (0 outside); dy/dz2 = core; dy/dg_j = z2 sum_k (dw_k/dg_j) L_k;
    dy/dx_max = z2 [sum_k w_k (q_k - m_k v_k) s_k / x_max + c o] = z2 [core / x_max + c (o - xc / x_max)],
    with o = dxc/dx_max = sign(x - xc) on a signed range, max(sign(x - xc), 0) on an unsigned one.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, x_max: torch.Tensor, gates: torch.Tensor, z2: torch.Tensor,
                signed: bool) -> torch.Tensor:
        g = gates.tolist()
        need = any(ctx.needs_input_grad[:4])
        core, d_x, d_max, levels = _gated_blocks(x.reshape(-1), float(x_max), g, signed, need)
        core = core.view_as(x)
        if need:
            ctx.save_for_backward(d_x, d_max, z2, core if z2.numel() else z2, *levels)
            ctx.gates = g
        return core * _per_channel(z2, x) if z2.numel() else core

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        d_x, d_max, z2, core, *levels = ctx.saved_tensors
        gz = grad * _per_channel(z2, grad) if z2.numel() else grad
        flat = gz.reshape(-1)
        dots = [torch.dot(flat, level) for level in levels]
        g = ctx.gates
        grad_gates = torch.stack([sum((dw * dot for dw, dot in zip(_chain_weight_grads(g, j), dots, strict=True)),
                                      torch.zeros((), dtype=grad.dtype)) for j in range(len(g))]) if g else None
        grad_z2 = (grad * core).reshape(len(z2), -1).sum(1) if z2.numel() else None
        return (flat * d_x).view_as(grad), torch.dot(flat, d_max), grad_gates, grad_z2, None


def _gated_blocks(flat: torch.Tensor, xm: float, g: list[float], signed: bool, need: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """core = sum_k w_k L_k and, when ``need``, dy/dx, dy/dx_max (without z2) and the levels L_k."""
    weights = _chain_weights(g)
    span = 2.0 * xm if signed else xm
    grids = [(span / float(2**b - 1), *grid_bounds(b, signed)) for b in BIT_WIDTHS[: len(g) + 1]]
    core = torch.empty_like(flat)
    d_x, d_max = (torch.empty_like(flat), torch.empty_like(flat)) if need else (core, core)
    levels = [torch.empty_like(flat) for _ in grids] if need else []
    for i in range(0, flat.numel(), CHUNK):
        xs = flat[i : i + CHUNK]
        xc = xs.clamp(-xm if signed else 0.0, xm)
        acc, c = core[i : i + CHUNK].zero_(), torch.zeros_like(xs) if signed else None
        for k, ((step, lo, hi), w) in enumerate(zip(grids, weights, strict=True)):
            r = torch.div(xc, step).round_()
            q = r.clamp(lo, hi) if signed else r
            if c is not None:  # 1 where the clamp passed round(v), 0 where it clipped
                c.add_((r - q).abs_().clamp_(max=1.0).neg_().add_(1.0), alpha=w)
            q.mul_(step)
            acc.add_(q, alpha=w)
            if need:
                levels[k][i : i + CHUNK] = q
        if need:
            _clip_grads(xs, xc, acc, c, xm, d_x[i : i + CHUNK], d_max[i : i + CHUNK])
    return core, d_x, d_max, levels


def _clip_grads(xs: torch.Tensor, xc: torch.Tensor, core: torch.Tensor, c: torch.Tensor | None, xm: float,
                d_x: torch.Tensor, d_max: torch.Tensor) -> None:
    """dy/dx = c inside the range; dy/dx_max = core / xm + c (o - xc / xm) (c = 1 on an unsigned grid)."""
    o = torch.sub(xs, xc).sign_()
    torch.sub(1.0, o.abs(), out=d_x)
    if c is None:
        o.clamp_(min=0.0)
        torch.sub(core, xc, out=d_max).div_(xm).add_(o)
        return
    d_x.mul_(c)
    torch.div(core, xm, out=d_max).add_(o.sub_(xc, alpha=1.0 / xm).mul_(c))


def _chain_weight_grads(gates: list[float], j: int) -> list[float]:
    """dw_k/dg_j for k = 0..a (w_k = P_k - P_{k+1}; dP_k/dg_j = prod_{i <= k, i != j} g_i for k >= j)."""
    others = gates[:j] + [1.0] + gates[j + 1 :]
    d_prefix = [0.0 if k <= j else math.prod(others[:k]) for k in range(len(gates) + 1)] + [0.0]
    return [d_prefix[k] - d_prefix[k + 1] for k in range(len(gates) + 1)]


def _chain_weights(gates: list[float]) -> list[float]:
    """w_k = P_k - P_{k+1} for k = 0..a (P_0 = 1, P_k = g_1 ... g_k, P_{a+1} = 0): the share of level k."""
    prefix = [math.prod(gates[:k]) for k in range(len(gates) + 1)] + [0.0]
    return [prefix[k] - prefix[k + 1] for k in range(len(gates) + 1)]


def _per_channel(z2: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return z2.view(-1, *[1] * (x.dim() - 1))


class GatedQuantizer(nn.Module):
    """The Bayesian Bits quantizer of one tensor: learned x_max, per-tensor bit gates, optional channel gates."""

    def __init__(self, x_max: float, signed: bool, channels: int = 0, max_init_bits: int = 8) -> None:
        super().__init__()
        self.signed = signed
        self.x_max = nn.Parameter(torch.tensor(float(max(x_max, 1e-8))))
        init = [ON_INIT if b <= max_init_bits else OFF_INIT for b in GATED_BITS]
        self.log_alpha = nn.Parameter(torch.tensor(init))
        self.prune_log_alpha = nn.Parameter(torch.full((channels,), ON_INIT)) if channels else None
        self.frozen = False

    # ------------------------------------------------------------------------------------------ gates

    def _gates(self, log_alpha: torch.Tensor) -> torch.Tensor:
        if self.training and not self.frozen:
            return sample_gate(log_alpha)
        return deterministic_gate(log_alpha.detach())

    def channel_gates(self) -> torch.Tensor | None:
        return None if self.prune_log_alpha is None else self._gates(self.prune_log_alpha)

    @property
    def bits(self) -> int:
        """The deterministic bit-width: the highest b whose gate chain is ON."""
        bits = BIT_WIDTHS[0]
        for b, on in zip(GATED_BITS, (self.log_alpha.detach() > THRESHOLD).tolist(), strict=True):
            if not on:
                break
            bits = b
        return bits

    def force_bits(self, bits: int) -> None:
        """Set the bit gates deterministically to ``bits`` (a no-op when already there)."""
        if bits not in BIT_WIDTHS:
            raise ValueError(f"Bayesian Bits widths are {BIT_WIDTHS}, got {bits}")
        if bits != self.bits:
            with torch.no_grad():
                self.log_alpha.copy_(torch.tensor([ON_INIT if b <= bits else OFF_INIT for b in GATED_BITS]))

    def init_gates(self, on: float, max_bits: int = 8) -> None:
        """log a = ``on`` for the gates up to ``max_bits`` (and the channel gates), -``on`` above."""
        with torch.no_grad():
            self.log_alpha.copy_(torch.tensor([on if b <= max_bits else -on for b in GATED_BITS]))
            if self.prune_log_alpha is not None:
                self.prune_log_alpha.fill_(on)

    def kept_channels(self) -> torch.Tensor | None:
        """Boolean mask of the output channels whose pruning gate is ON (None: no pruning gates)."""
        return None if self.prune_log_alpha is None else self.prune_log_alpha.detach() > THRESHOLD

    def probabilities(self) -> dict[str, float]:
        p = {f"z{b}": float(gate_probability(a)) for b, a in zip(GATED_BITS, self.log_alpha.detach(), strict=True)}
        if self.prune_log_alpha is not None:
            p["z2_mean"] = float(gate_probability(self.prune_log_alpha.detach()).mean())
        return p

    def expected_cost(self) -> torch.Tensor:
        """sum_b b prod_{k <= b} P(z_k != 0), the channel gate averaged (a constant 1 without one)."""
        chain = gate_probability(self.prune_log_alpha).mean() if self.prune_log_alpha is not None else None
        total = BIT_WIDTHS[0] * (chain if chain is not None else torch.ones(()))
        prob = chain if chain is not None else torch.ones(())
        for b, p in zip(GATED_BITS, gate_probability(self.log_alpha), strict=True):
            prob = prob * p
            total = total + b * prob
        return total

    # -------------------------------------------------------------------------------------- forward

    def clip(self, x: torch.Tensor) -> torch.Tensor:
        x_max = self.x_max.abs() + 1e-12
        return torch.minimum(torch.maximum(x, -x_max if self.signed else torch.zeros_like(x_max)), x_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x_q = z2 (x2 + z4 (e4 + z8 (...))), z2 broadcast over dim 0 (channels) when present."""
        gates = self._gates(self.log_alpha)
        active = 0
        for z in gates.detach().tolist():  # residuals behind a gate that is exactly 0 are not computed
            if z == 0.0:
                break
            active += 1
        z2 = self.channel_gates()
        channel = z2 if z2 is not None else x.new_ones(0)
        return GatedGrid.apply(x, self.x_max.abs() + 1e-12, gates[:active], channel, self.signed)

    def extra_repr(self) -> str:
        return f"signed={self.signed}, x_max={float(self.x_max.detach().abs()):.4g}, bits={self.bits}"


class BayesianBitsWeightQuant(nn.Module):
    """Weight quantizer of a QConv2d/QLinear under Bayesian Bits (x_max from max|W| when created)."""

    def __init__(self, weight: torch.Tensor, prune: bool) -> None:
        super().__init__()
        self.gated = GatedQuantizer(float(weight.detach().abs().max()), True, weight.shape[0] if prune else 0)

    @property
    def bits(self) -> int:
        return min(self.gated.bits, 8)

    @bits.setter
    def bits(self, value: int) -> None:
        self.gated.force_bits(value)

    @property
    def itype(self) -> IntType:
        return IntType(self.bits, True)

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        s = grid_scale(self.gated.x_max.detach().abs() + 1e-12, self.bits, True)
        return s.expand(w.shape[0]).clone()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.gated(w)

    def quant_bias(self, b: torch.Tensor | None) -> torch.Tensor | None:
        """A pruned channel loses its bias too (its output becomes exactly zero)."""
        z2 = self.gated.channel_gates()
        return b if b is None or z2 is None else b * z2

    def range_parameters(self) -> list[nn.Parameter]:
        return [self.gated.x_max]

    def gate_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.gated.log_alpha, self.gated.prune_log_alpha) if p is not None]


class BayesianBitsActQuant(ActQuant):
    """An ActQuant that, once ``start``ed from its calibrated range, quantizes with Bayesian Bits gates."""

    def __init__(self, bits: int = 8) -> None:
        self.gated: GatedQuantizer | None = None
        super().__init__(bits)

    @property  # type: ignore[override]
    def bits(self) -> int:
        gated = getattr(self, "gated", None)
        return self._bits if gated is None else min(gated.bits, 8)

    @bits.setter
    def bits(self, value: int) -> None:
        gated = getattr(self, "gated", None)
        if gated is None:
            self._bits = value
        elif value != min(gated.bits, 8):
            gated.force_bits(value)

    def start(self) -> None:
        """Create the gated quantizer from the calibrated range (x_max = amax, signed iff amin < 0)."""
        self.gated = GatedQuantizer(float(self.amax), self.signed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated is None or self.observing:
            return super().forward(x)
        return self.gated(x)

    def fixed_scale(self) -> torch.Tensor | None:
        return super().fixed_scale() if self.gated is None else None  # gated: the grid is sampled

    def finalize(self) -> ActQuant:
        """A plain ActQuant on the chosen grid: bits, signedness, amax = s_b * hi (capped at 8 bits)."""
        assert self.gated is not None
        bits, signed = min(self.gated.bits, 8), self.gated.signed
        q = ActQuant(bits)
        s = grid_scale(self.gated.x_max.detach().abs() + 1e-12, bits, signed)
        q.amax.copy_(s * IntType(bits, signed).hi)
        q.amin.copy_(-q.amax if signed else torch.zeros(()))
        q.batches.fill_(1)
        q.signed_override = signed
        return q

    def range_parameters(self) -> list[nn.Parameter]:
        return [] if self.gated is None else [self.gated.x_max]

    def gate_parameters(self) -> list[nn.Parameter]:
        return [] if self.gated is None else [self.gated.log_alpha]


class RangeWeightQuant(nn.Module):
    """Uniform signed weight quantizer with a learned clip x_max (per tensor or per output channel) and a
    fixed channel mask.

    W_q = mask_c * s_c * clamp(round(W / s_c), -(2^(b-1)-1), 2^(b-1)-1), s_c = 2 x_max_c / (2^b - 1): the grid
    Bayesian Bits chose (one x_max), kept for the fine-tune with frozen gates, or BSQ's grid refined per
    channel (``x_max`` of shape ``[C]``). ``select_channels`` follows channel pruning.
    """

    mask: torch.Tensor

    def __init__(self, bits: int, x_max: float | torch.Tensor, mask: torch.Tensor) -> None:
        super().__init__()
        self.bits = bits
        x = torch.as_tensor(x_max, dtype=torch.float32).detach().clone()
        if x.dim() > 1 or (x.dim() == 1 and x.numel() != mask.numel()):
            raise ValueError(f"x_max must be a scalar or one value per channel ({mask.numel()}), got {tuple(x.shape)}")
        self.x_max = nn.Parameter(x)
        self.register_buffer("mask", mask.to(torch.float32).clone())

    @property
    def itype(self) -> IntType:
        return IntType(self.bits, True)

    def _per_channel(self, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return v.view(-1, *[1] * (w.dim() - 1)) if v.dim() else v

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        return grid_scale(self.x_max.detach().abs() + 1e-12, self.bits, True).expand(w.shape[0]).clone()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        x_max = self._per_channel(self.x_max.abs() + 1e-12, w)
        wc = torch.minimum(torch.maximum(w, -x_max), x_max)
        return quantize_on_grid(wc, x_max, self.bits, True) * self._per_channel(self.mask, w)

    def quant_bias(self, b: torch.Tensor | None) -> torch.Tensor | None:
        return None if b is None else b * self.mask

    def select_channels(self, keep: torch.Tensor) -> None:
        self.mask = self.mask[keep].clone()
        if self.x_max.dim():
            self.x_max = nn.Parameter(self.x_max.detach()[keep].clone())

    def range_parameters(self) -> list[nn.Parameter]:
        return [self.x_max]

    def extra_repr(self) -> str:
        x = self.x_max.detach().abs()
        shown = (f"{float(x):.4g}" if x.dim() == 0
                 else f"[{x.numel()} channels, {float(x.min()):.4g}..{float(x.max()):.4g}]")
        return f"bits={self.bits}, x_max={shown}, kept={int(self.mask.sum())}"
