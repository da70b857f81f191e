"""BSQ bit-plane weight re-parameterization (ALGORITHMS.md §2), as a standalone building block.

Math. A layer with weight ``W`` and magnitude precision ``N`` keeps a trainable scalar ``s`` (initially
``max|W|``) and two non-negative tensors ``pos``, ``neg`` of shape ``[N, *W.shape]``; plane ``b = 0`` is the
MSB. With ``d_N = 2^N - 1``::

    init:     m = round(|W| / s * d_N)                 integer magnitude in [0, d_N]
              pos_b = bit_(N-1-b)(m) * [W > 0],   neg_b = bit_(N-1-b)(m) * [W < 0]
    forward:  w~  = sum_b (pos_b - neg_b) * 2^(N-1-b) / d_N
              W_q = s * round_N(clip(w~, -1, 1)),  round_N(x) = round(x * d_N) / d_N   (straight-through)

``forward`` computes ``W_q`` as ``(s / d_N) * q`` with the integer code ``q = round(clip(w~, -1, 1) * d_N)``,
so that ``integer_weights()`` reproduces it bit for bit.

Integer type. BSQ's grid is sign + magnitude: ``q in [-(2^N - 1), 2^N - 1]``. The project's signed
narrow-range ``b``-bit integer (``IntType(b, signed=True)``, ``[-(2^(b-1) - 1), 2^(b-1) - 1]``) holds exactly
that range for ``b = N + 1``: N magnitude bits need a signed (N+1)-bit type, and the type is full (its lo/hi
are the extreme codes). So BSQ's starting ``N = 8`` is ``int9`` here; a layer that must fit ``int8`` needs
``N <= 7`` (construct with ``bits=7, max_bits=7``). ``integer_weights()`` returns ``(q, scale, N + 1)`` with
``W_q == scale * q`` and ``scale = s / d_N`` (the grid step ``delta``); it is the per-layer (per-tensor)
analogue of ``WeightQuant(N + 1)``. ``precision`` and ``compression`` count magnitude bits ``N``, as BSQ does.

Training step. ``clamp_()`` after every optimizer step keeps every bit variable in ``[0, 2]`` (2 lets a bit
overflow into the next plane). The regularizer is
``R = (1 / P_total) * sum_l P_l * N_l * sum_b ||[pos_b ; neg_b]||_2`` (group Lasso, one group per bit plane
of one layer) and the compression ``32 * P_total / sum_l P_l * N_l``.

Re-quantization (``requantize_()``). The invariant is the grid step ``delta = s / d_N``: a represented value
is ``delta * q``. Steps:

1. Snap: ``q = round(w~ * d_N)`` from the drifted planes (``|q| <= 2 d_N``). If some ``|q| > d_N`` and
   ``N < max_bits``, carry into a new MSB: ``N <- N + 1`` with ``delta`` unchanged, i.e.
   ``s <- s * (2^(N+1) - 1) / (2^N - 1)``; the overflowed weights keep their unclipped value ``delta * q``
   (larger than before, when forward clipped them). Otherwise saturate: ``q <- clip(q, -d_N, d_N)``, which is
   exactly what forward represented already.
2. Drop ``k`` all-zero MSB planes (all ``|q| < 2^(N-k)``): the codes stay, ``delta`` stays, so
   ``s <- s * (2^(N-k) - 1) / (2^N - 1)``.
3. Drop ``k`` all-zero LSB planes (all ``q`` divisible by ``2^k``): ``q <- q / 2^k``, ``delta <- 2^k delta``,
   so ``s <- s * 2^k * (2^(N-k) - 1) / (2^N - 1)``; for ``k = 1`` that is ``s * (2^N - 2) / (2^N - 1)``.
   (ALGORITHMS.md's "dropping an LSB doubles s" is exact for the step ``delta``, not for ``s``.)

Apart from the overflow carry, ``W_q`` is unchanged up to float rounding of ``s`` and the codes change
exactly by ``2^k``. At least one plane always stays (``N >= 1``). The plane tensors are replaced in place
(``param.data``, so the ``Parameter`` objects and an optimizer's param groups stay valid) and their gradients
are cleared; the caller must reset its optimizer state after every call (BSQ does; it is mandatory when
the precision changed since per-parameter buffers then have the old shape).

Not handled here: per-output-channel scales (BSQ has one ``s`` per layer); activation quantization (the
original's dynamic per-batch activation scale is replaced by the project's calibrated ``ActQuant``); the
search / training loop, the regularizer strength ``alpha``, freezing the precision for fine-tuning and the
wiring into ``QConv2d`` / ``QLinear`` and the lowering; loading a ``state_dict`` saved at another precision
(the plane shapes differ); an all-zero weight gets ``s = 1`` and all-zero planes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qcompile.ir.meta import IntType

MAX_BITS = 8
"""BSQ's starting and largest magnitude precision (a carry never goes above it)."""


def _grid(n: int) -> int:
    """Largest magnitude on the N-bit grid, ``2^N - 1``."""
    return 2**n - 1


def _place_values(n: int, like: torch.Tensor) -> torch.Tensor:
    """``[2^(N-1), ..., 2, 1]``: the weight of plane b (b = 0 is the MSB)."""
    return 2.0 ** torch.arange(n - 1, -1, -1, device=like.device, dtype=like.dtype)


def _planes_from_codes(codes: torch.Tensor, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact 0/1 ``(pos, neg)`` planes ``[N, *codes.shape]`` of signed integer codes with ``|codes| <= 2^N - 1``."""
    shifts = torch.arange(n - 1, -1, -1, device=codes.device).view(-1, *([1] * codes.dim()))
    bits = (codes.abs().unsqueeze(0) >> shifts) & 1
    pos = bits * (codes > 0).unsqueeze(0)
    neg = bits * (codes < 0).unsqueeze(0)
    return pos.to(dtype), neg.to(dtype)


def _needed_msb_bits(codes: torch.Tensor, n: int) -> int:
    """Smallest precision (>= 1) that still holds every magnitude: drops the all-zero MSB planes."""
    top = int(codes.abs().max()) if codes.numel() else 0
    return max(1, min(n, top.bit_length()))


def _empty_lsb_planes(codes: torch.Tensor, n: int) -> int:
    """Number k <= N - 1 of all-zero LSB planes: every code is divisible by 2^k."""
    k = 0
    while k < n - 1 and bool((codes % 2 ** (k + 1) == 0).all()):
        k += 1
    return k


class BitPlaneWeight(nn.Module):
    """One layer's weight as BSQ bit planes; ``forward()`` returns the fake-quantized weight ``W_q``.

    Parameters: ``s`` (scalar scale, the value of the largest magnitude), ``pos`` and ``neg``
    (``[N, *W.shape]``, b = 0 is the MSB). ``bits`` is the starting magnitude precision N and ``max_bits``
    the largest precision an overflow carry may reach. See the module docstring for the math.
    """

    def __init__(self, weight: torch.Tensor, bits: int = MAX_BITS, max_bits: int = MAX_BITS) -> None:
        super().__init__()
        if not weight.is_floating_point():
            raise TypeError(f"BitPlaneWeight needs a floating-point weight, got {weight.dtype}")
        if not 1 <= bits <= max_bits <= 15:
            raise ValueError(f"need 1 <= bits ({bits}) <= max_bits ({max_bits}) <= 15")
        self.max_bits = max_bits
        w = weight.detach()
        amax = float(w.abs().max()) if w.numel() else 0.0
        s = amax if amax > 0 else 1.0
        d = _grid(bits)
        codes = torch.round(w / s * d).clamp(-d, d).long()
        pos, neg = _planes_from_codes(codes, bits, w.dtype)
        self.s = nn.Parameter(torch.tensor(s, dtype=w.dtype, device=w.device))
        self.pos = nn.Parameter(pos)
        self.neg = nn.Parameter(neg)

    @classmethod
    def from_integer_weights(cls, q: torch.Tensor, scale: float, bits: int, max_bits: int = MAX_BITS) -> BitPlaneWeight:
        """Inverse of ``integer_weights()``: codes ``q`` of a signed ``bits``-bit type (N = bits - 1), step ``scale``.

        The planes are float32 on ``q``'s device.
        """
        n = bits - 1
        if q.numel() and int(q.abs().max()) > _grid(n):
            raise ValueError(f"codes do not fit a signed narrow-range {bits}-bit integer")
        layer = cls(torch.zeros(q.shape, dtype=torch.float32, device=q.device), n, max(n, max_bits))
        layer._set_codes(q.long(), n, scale * _grid(n))
        return layer

    @property
    def precision(self) -> int:
        """Current magnitude precision N (number of bit planes)."""
        return int(self.pos.shape[0])

    @property
    def itype(self) -> IntType:
        """The project integer type holding the codes: signed narrow-range, N + 1 bits."""
        return IntType(self.precision + 1, True)

    @property
    def numel(self) -> int:
        """Number of weights P of this layer."""
        return int(self.pos[0].numel())

    def _wtilde(self) -> torch.Tensor:
        """``w~ = sum_b (pos_b - neg_b) 2^(N-1-b) / (2^N - 1)``, shape of the weight."""
        n = self.precision
        diff = self.pos - self.neg
        return torch.tensordot(_place_values(n, diff), diff, dims=1) / _grid(n)

    def forward(self) -> torch.Tensor:
        d = _grid(self.precision)
        y = self._wtilde().clamp(-1.0, 1.0) * d
        q = y + (torch.round(y) - y).detach()
        return (self.s / d) * q

    @torch.no_grad()
    def integer_weights(self) -> tuple[torch.Tensor, float, int]:
        """``(q, scale, bits)``: exact int64 codes with ``forward() == scale * q``, and the signed width N + 1."""
        n = self.precision
        d = _grid(n)
        q = torch.round(self._wtilde().clamp(-1.0, 1.0) * d).long()
        scale = float(self.s / d)
        if scale < 0:  # a trained s may in principle cross zero; keep the step positive for a lowering
            q, scale = -q, -scale
        return q, scale, n + 1

    def bit_norms(self) -> torch.Tensor:
        """``[N]``: the L2 norm of each bit-plane group ``[pos_b ; neg_b]`` (zero gradient at zero)."""
        groups = torch.cat([self.pos.flatten(1), self.neg.flatten(1)], dim=1)
        return torch.linalg.vector_norm(groups, dim=1)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp every bit variable to [0, 2]; call after each optimizer step."""
        self.pos.clamp_(0.0, 2.0)
        self.neg.clamp_(0.0, 2.0)

    @torch.no_grad()
    def requantize_(self) -> bool:
        """Snap to exact 0/1 planes (carry or saturate), drop empty MSB/LSB planes; True if N changed.

        Reset the optimizer state afterwards (always; mandatory when this returns True).
        """
        n0 = self.precision
        step = float(self.s) / _grid(n0)
        codes, n = self._snapped_codes()
        n = _needed_msb_bits(codes, n)
        k = _empty_lsb_planes(codes, n)
        codes, n, step = codes // 2**k, n - k, step * 2**k
        self._set_codes(codes, n, step * _grid(n))
        return n != n0

    def _snapped_codes(self) -> tuple[torch.Tensor, int]:
        """Nearest grid integers of the drifted planes, with a carry into a new MSB or saturation."""
        n = self.precision
        d = _grid(n)
        codes = torch.round(self._wtilde() * d).long()  # same float ops as forward, without the clip
        if bool((codes.abs() > d).any()) and n < self.max_bits:
            n += 1
        return codes.clamp(-_grid(n), _grid(n)), n

    def _set_codes(self, codes: torch.Tensor, n: int, s: float) -> None:
        pos, neg = _planes_from_codes(codes, n, self.pos.dtype)
        with torch.no_grad():
            self.pos.data = pos
            self.neg.data = neg
            self.s.fill_(s)
        self.pos.grad = self.neg.grad = self.s.grad = None

    def extra_repr(self) -> str:
        return f"bits={self.precision}, shape={tuple(self.pos.shape[1:])}, max_bits={self.max_bits}"


def bsq_regularizer(layers: Sequence[BitPlaneWeight], sizes: Sequence[int] | None = None) -> torch.Tensor:
    """``R = (1 / P_total) sum_l P_l N_l sum_b ||[pos_b ; neg_b]||_2``; ``sizes`` defaults to each layer's P_l."""
    if not layers:
        raise ValueError("bsq_regularizer needs at least one layer")
    p = [layer.numel for layer in layers] if sizes is None else list(sizes)
    if len(p) != len(layers):
        raise ValueError(f"{len(layers)} layers but {len(p)} sizes")
    terms = [p_l * layer.precision * layer.bit_norms().sum() for layer, p_l in zip(layers, p, strict=True)]
    return torch.stack(terms).sum() / sum(p)


def compression(layers: Sequence[BitPlaneWeight]) -> float:
    """``32 P_total / sum_l P_l N_l`` (magnitude bits, as BSQ reports it)."""
    total = sum(layer.numel for layer in layers)
    bits = sum(layer.numel * layer.precision for layer in layers)
    if bits == 0:
        raise ValueError("compression of no weights")
    return 32.0 * total / bits
