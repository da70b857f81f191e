"""Integer softmax over one axis: how the lowering chooses ``IntSoftmax``'s integers.

softmax(x)_i = exp(x_i - max x) / sum_j exp(x_j - max x). On a quantized input x = s_x q, d_i = max q - q_i
is an integer in [0, hi - lo], so E[d] = round(2^16 exp(-s_x d)) is an exact table (E[0] = 2^16, hence the
sum S >= 2^16 > 0), and q_y = round(E_i / (S s_y)) is computed as (2 E_i C + S 2^t) // (2 S 2^t) with
C = round(2^t / s_y), t = 16: non-negative int64 operands, so onnxruntime's truncating Div is the floor.

Error before the final rounding: E carries 2^-17 absolute (against 1 for the largest term), C a relative
2^-17 s_y: together far below 0.01 of an output step for 8-bit outputs over a small axis (the tests bound
it). The simulation computes the same integers (``quant/integer_sim.py``; gradients through float softmax). Not
handled: softmax over several axes; very long axes (S grows with the axis length; below 2^28 elements
every operand stays under 2^62).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from qcompile.ir.meta import IntType

EXP_BITS = 16
FRAC_BITS = 16


def plan(inp: IntType, s_x: float, s_y: float) -> dict[str, Any]:
    """IntSoftmax's exp table, C and t for input scale s_x and output scale s_y."""
    d = torch.arange(0, inp.hi - inp.lo + 1, dtype=torch.float64)
    etab = torch.round(2.0**EXP_BITS * torch.exp(-s_x * d)).to(torch.int64)
    c = round(2.0**FRAC_BITS / s_y)
    if not 0 < c < 2**44 or not math.isfinite(s_y):
        raise ValueError(f"output scale {s_y:g} out of range for an integer softmax")
    return {"etab": etab, "c": c, "frac": FRAC_BITS}
