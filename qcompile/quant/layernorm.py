"""Integer LayerNorm: how the lowering chooses the integers of ``IntLayerNorm`` and why they are exact.

For a b-bit input q (range R = hi - lo) normalized over D values, ``IntLayerNorm`` (ir/intops.py)
computes d_i = D q_i - sum q, V = sum d^2 and the normalized value n_i = d_i sqrt(D) / sqrt(V + E) as
N_i = round(d_i 2^(P+K) / S) ~ n_i 2^K / sqrt(D), where S = isqrt((V + E) 4^P) by integer Newton steps and
divisions of non-negative int64 values only (so floor = truncation, as onnxruntime's integer Div
computes it); the affine part is integer: acc = N G[c] + B[c], requantized with M = sqrt(D) s_g 2^-K / s_y.

Choices, each checked here:
* E = round(eps D^3 / s_x^2) puts eps in the units of V (var_q = V / D^3).
* V <= D^3 R^2 / 4 (a variance is at most R^2 / 4); P is the largest of 1..20 with (V_max + E) 4^P < 2^62
  and D R 2^(P+K+1) < 2^62: every int64 intermediate stays below 2^62.
* G = round(gamma / s_g) with s_g = max|gamma| / (2^15 - 1) (16-bit gamma); K is the largest of 0..16 with
  2^K max|G| + max|B| <= 2^31 - 1 (|N| <= 2^K, see IntLayerNorm.bound), so acc is an int32.
* y0 = isqrt(X_max) + 1 and ``steps`` = the Newton steps that reach isqrt(X) from y0 for the smallest X of
  a non-constant input, X_min = (D (D - 1) + E) 4^P (V >= D (D - 1) unless all q are equal; then every
  d_i = 0 and N = 0 whatever S is); larger X need no more steps. S >= isqrt(X) >= 1 at every step.

Error: N carries the rounding of d_i 2^(P+K) / S (half a unit: sqrt(D) 2^-(K+1) in n) and S's relative
error (< 2^-P / D); gamma and beta carry 16-bit and 2^-K sqrt(D) s_g rounding. Before the final rounding
the approximation error is sqrt(D) 2^-(K+1) |gamma| / s_y plus smaller terms: 0.03 output steps at D = 768
(K = 15, |gamma| ~ 2, s_y = 4/127). Measured on random 8-bit inputs of every spread (tests/passes/
test_layernorm.py, D = 16..768, 8-bit out, both targets): the integer output is within 0.51 (D = 16) to
0.53 (D = 768) output steps of the exact LayerNorm(s_x q) / s_y, hence at most one step from
round(LayerNorm_float64 / s_y), and equal to that on all but 0.1 % (D = 16) to 0.7 % (D = 768) of the
values. The simulation (quant graph) computes these same integers once its grids are fixed
(``quant/integer_sim.py``: the lowered op runs on the simulated integers, gradients straight through the
float LayerNorm). Not handled: normalization over several dims at once, D = 1.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from qcompile.ir.contract import INT32_MAX
from qcompile.ir.meta import IntType

GAMMA_MAX = 2**15 - 1
K_MAX = 16
P_MAX = 20
INT64_HEADROOM = 2**62


class LayerNormPlanError(ValueError):
    """No choice of P/K keeps the integers in range."""


def _isqrt_steps(x: int, y0: int) -> int:
    y, steps = y0, 0
    while True:
        nxt = min(y, (y + x // y) >> 1)
        if nxt == y:
            return steps
        y, steps = nxt, steps + 1


def _choose_p(size: int, r: int, eps_q: int) -> int:
    v_max = size**3 * r**2 // 4 + 1
    for p in range(P_MAX, 0, -1):
        if (v_max + eps_q) * 4**p < INT64_HEADROOM and size * r * 2 ** (p + K_MAX + 1) < INT64_HEADROOM:
            return p
    raise LayerNormPlanError(f"D = {size} with a {r}-wide input range leaves no int64 headroom; lower its bits")


def _affine(ln: nn.LayerNorm, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = ln.weight.detach().double() if ln.weight is not None else torch.ones(size, dtype=torch.float64)
    b = ln.bias.detach().double() if ln.bias is not None else torch.zeros(size, dtype=torch.float64)
    return w, b


def plan(ln: nn.LayerNorm, inp: IntType, s_x: float, s_y: float) -> dict[str, Any]:
    """IntLayerNorm's integer attributes and the real multiplier ``real_m`` for ``ln`` (over its last dim)."""
    size = int(ln.normalized_shape[-1])
    if len(ln.normalized_shape) != 1 or size < 2:
        raise LayerNormPlanError(f"normalized_shape {tuple(ln.normalized_shape)} (only one dim of size >= 2)")
    eps_q = round(ln.eps * size**3 / s_x**2)
    p = _choose_p(size, inp.hi - inp.lo, eps_q)
    w, b = _affine(ln, size)
    s_g = float(w.abs().max()) / GAMMA_MAX or 1.0
    gamma = torch.round(w / s_g).to(torch.int64)
    for k in range(K_MAX, -1, -1):
        unit = math.sqrt(size) * s_g * 2.0**-k
        beta_real = torch.round(b / unit)  # float64 first: a huge beta must not wrap in int64
        if (1 << k) * int(gamma.abs().max()) + float(beta_real.abs().max()) <= INT32_MAX:
            beta = beta_real.to(torch.int64)
            break
    else:
        raise LayerNormPlanError("its bias is too large against its weight for an int32 accumulator")
    x_max = ((size**3 * (inp.hi - inp.lo) ** 2 // 4 + 1) + eps_q) * 4**p
    y0 = math.isqrt(x_max) + 1
    steps = _isqrt_steps(max(1, (size * (size - 1) + eps_q) * 4**p), y0) + 1
    return {"gamma": gamma, "beta": beta, "size": size, "eps_q": eps_q, "p": p, "k": k, "steps": steps, "y0": y0,
            "real_m": unit / s_y}


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over dim 1 (the channels of NCHW): ``permute(0, 2, 3, 1)``, LayerNorm, ``permute(0, 3, 1, 2)``
    in one module (canonicalize makes it from that sandwich); lowered to IntLayerNorm with axis 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)
