"""Float-stage modules for elementwise arithmetic with a constant (canonicalize produces them).

* ``AddConst(value)``: y = x + value, ``value`` broadcast against one sample (a scalar, a per-channel
  [C, 1, 1] or a last-axis [C] vector: any shape that broadcasts without touching the batch).
* ``MulConst(value)``: y = x * value with every entry of ``value`` > 0 (division by c is MulConst(1 / c)).

Both are quantization points: an activation quantizer follows them and lower-integer makes them an
``IntRescale`` (``ir/intops.py``). A negative or zero factor has no such form (the requantization multiplier
must be positive); canonicalize folds factors into a preceding conv/linear/BatchNorm when it can and
refuses them otherwise.
"""

from __future__ import annotations

import torch
from torch import nn


class _Constant(nn.Module):
    value: torch.Tensor

    def __init__(self, value: torch.Tensor | float) -> None:
        super().__init__()
        self.register_buffer("value", torch.as_tensor(value, dtype=torch.float32).detach().clone())

    def extra_repr(self) -> str:
        v = self.value
        return f"{float(v):g}" if v.numel() == 1 else f"shape={tuple(v.shape)}"


class AddConst(_Constant):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.value


class MulConst(_Constant):
    def __init__(self, value: torch.Tensor | float) -> None:
        super().__init__(value)
        if not bool((self.value > 0).all()):
            raise ValueError("MulConst needs factors > 0")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.value


CONSTANT_MODULES = (AddConst, MulConst)
