"""Float-stage modules of transformers: the product of two activations and the class token.

``MatMul(alpha)``: y = alpha * (a @ b).

``a`` [..., M, K] and ``b`` [..., K, N] are both computed tensors (queries and keys, attention weights and
values); the leading dims broadcast as ``torch.matmul``'s do. ``alpha`` > 0 is a constant folded in by
canonicalize (attention's 1/sqrt(d), a ``q * scale`` before the product), so that it costs nothing: the
lowering puts it into the requantization multiplier, M = alpha s_a s_b / s_y, of ``IntMatMul``
(``ir/intops.py``). A matmul is a quantization point: an activation quantizer follows it.

``ConstCat(value, dim, first)``: y = cat([value expanded over the batch, x], dim) (or x first): timm's
``torch.cat((cls_token.expand(B, -1, -1), x), dim=1)``. No new scale: the constant is quantized on x's
scale and type when lowered (``IntConstCat``), so a class token far outside x's calibrated range clips.

Not handled: a matmul with a constant operand (that is a Linear layer; the frontends make one), negative
or zero alpha (the multiplier must be positive).
"""

from __future__ import annotations

import torch
from torch import nn


class MatMul(nn.Module):
    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        if not alpha > 0:
            raise ValueError(f"MatMul needs alpha > 0, got {alpha!r}")
        self.alpha = float(alpha)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(a, b)
        return y * self.alpha if self.alpha != 1.0 else y

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:.6g}"


class ConstCat(nn.Module):
    value: torch.Tensor

    def __init__(self, value: torch.Tensor, dim: int, first: bool = True) -> None:
        super().__init__()
        self.register_buffer("value", value.detach().float().clone())  # one sample: no batch axis
        if not 1 <= dim <= self.value.dim():
            raise ValueError(f"ConstCat along dim {dim} of a rank-{self.value.dim() + 1} tensor")
        self.dim, self.first = int(dim), bool(first)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.value.unsqueeze(0).expand(x.shape[0], *self.value.shape)
        return torch.cat((c, x) if self.first else (x, c), dim=self.dim)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.value.shape)}, dim={self.dim}, first={self.first}"
