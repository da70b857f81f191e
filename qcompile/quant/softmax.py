"""Integer softmax over one axis (a small channel axis, or attention's long last axis): how the lowering
chooses ``IntSoftmax``'s integers.

softmax(x)_i = exp(x_i - max x) / sum_j exp(x_j - max x). On a quantized input x = s_x q, d_i = max q - q_i
is an integer in [0, hi - lo], so E[d] = round(2^20 exp(-s_x d)) is an exact table (E[0] = 2^20, hence the
sum S >= 2^20 > 0), and q_y = round(E_i / (S s_y)) is computed as (2 E_i C + S 2^t) // (2 S 2^t) with
C = round(2^t / s_y), t = 16: non-negative int64 operands, so onnxruntime's truncating Div is the floor.
Operand bounds: E C < 2^20 2^40 (plan refuses C >= 2^40, i.e. s_y < 2^-24) and S 2^(t+1) <= L 2^37, so an
axis of L < 2^24 elements keeps every operand below 2^62 (the lowering refuses longer axes).

Error before the final rounding: each E carries 2^-21 absolute against 1 for the largest term, and C a
relative 2^-17 s_y. Measured against float softmax of the same quantized input (8-bit signed input,
s_x in {0.02, 0.1}, unsigned 8-bit output with s_y in {1/255, 1/2040}, random inputs): the largest error
is 0.5 + 3e-5 output steps over axes of 5, 197, 1024 and 4096 elements (16 bits of exp table gave up to
0.534 steps at 4096, hence 20). The tests assert <= 0.5 + 0.01 steps. The simulation computes the same
integers (``quant/integer_sim.py``; gradients through float softmax). Not handled: softmax over several axes; the
output's own resolution (a long axis spreads probability thin: with s_y = 1/255 an attention row over
197 tokens has most entries at 0 or 1 step; calibration picks s_y from the largest probability seen).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from qcompile.ir.meta import IntType

EXP_BITS = 20
FRAC_BITS = 16
MAX_AXIS = 2**24  # S 2^(t+1) < 2^62


def plan(inp: IntType, s_x: float, s_y: float) -> dict[str, Any]:
    """IntSoftmax's exp table, C and t for input scale s_x and output scale s_y."""
    d = torch.arange(0, inp.hi - inp.lo + 1, dtype=torch.float64)
    etab = torch.round(2.0**EXP_BITS * torch.exp(-s_x * d)).to(torch.int64)
    c = round(2.0**FRAC_BITS / s_y)
    if not 0 < c < 2**40 or not math.isfinite(s_y):
        raise ValueError(f"output scale {s_y:g} out of range for an integer softmax")
    return {"etab": etab, "c": c, "frac": FRAC_BITS}
