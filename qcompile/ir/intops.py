"""The integer dialect: the only compute ops an integer-stage graph may hold.

Each op is an ``nn.Module`` that only carries integer data (weights, int32 biases, dyadic multipliers,
clamp bounds) and its types; the kernels live in the backends (``backends/reference.py`` is the
executable spec, ``backends/fast.py`` runs ``forward``). Shapes and layouts follow PyTorch (NCHW).

Math, per op (``rq`` is the contract's requantization, see ``ir/contract.py``):

* ``Quantize``: q = clamp(rint(x / s), lo, hi) (float in, the only float op going in).
* ``Dequantize``: x = q * s (the only float op going out).
* ``IntConv2d`` / ``IntLinear``: q_y = clamp(rq(sum q_x * q_w + q_b, m[c], n[c]), lo, hi).
* ``IntShiftConv2d`` / ``IntShiftLinear`` (APoT): the same math with weights stored as power-of-two terms,
  q_w = sum_i s_i * 2^(e_i) (sign s_i in {-1, 0, 1}, exponent e_i, per weight and term i), so
  sum q_x * q_w = sum_p (sum q_x * T_p) << p with ternary planes T_p = sum_i s_i [e_i = p]: shifts and
  adds only. ``weight`` holds the combined codes (derived, not saved) for the bound, costs and GEMMs.
* ``IntAdd``: both inputs share one scale; q_y = clamp(rq(q_a + q_b, m, n), lo, hi).
* ``IntAvgPool2d``: q_y = clamp(rq(window sum of q_x, m, n), lo, hi), m/2^n ~ s_x / (k * s_y);
  zero padding counts toward k (PyTorch's count_include_pad=True).
* ``IntMaxPool2d``, ``IntClamp``: act on integers directly, scale unchanged.
* ``IntLookup``: q_y = T[q_x - lo_x], a table of 2^b entries for a b <= 8-bit input (pointwise functions;
  ``quant/tables.py`` builds T). Nothing is requantized.
* ``IntMul``: q_y = clamp(rq(q_a * q_b, m, n), lo, hi) with broadcasting, M = s_a s_b / s_y.
* ``IntLayerNorm``: integer mean, variance, Newton square root and division, integer gamma/beta, then
  rq with a scalar M (its docstring has the steps; ``quant/layernorm.py`` the choices and error bound).
* ``IntSoftmax``: an exp table on max - q, an integer sum and one integer division per element.
* ``IntConstCat``: q_y = cat([constant, q_x], dim) (a class token on x's scale); no arithmetic.
* ``IntMatMul``: q_y = clamp(rq(sum_k q_a[..., i, k] q_b[..., k, j], m, n), lo, hi), M = alpha s_a s_b / s_y
  (the product of two activations: attention's Q K^T and P V).

Every requantizing op carries both forms of its multiplier M: the dyadic ``mult``/``shift`` and
``fmult = float32(M)``, and its ``target`` says which one ``rq`` uses (``contract.Target``: ``integer`` =
dyadic, ``ort`` = float32 multiply with round half to even). ``requant_target(op)`` reads it.

* ``IntAvgPoolTable``: average pooling whose divisor varies per window (ceil_mode, count_include_pad=False,
  adaptive pools to any size): separable 0/1 window sums and one multiplier per output position.

* ``IntRescale``: acc = gain * q_x + offset, requantized (multiplication by / addition of a constant).
* ``IntSub``: q_y = clamp(rq(q_a - q_b, m, n), lo, hi) on one shared input scale.

Not handled here: non-zero real-domain zero points.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qcompile.ir.contract import Target
from qcompile.ir.meta import IntType
from qcompile.ir.movement import MOVEMENT_FUNCTIONS


def _int_buffer(values: Any, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.as_tensor(values, dtype=dtype).clone()


class IntOp(nn.Module):
    """Base of every integer op; ``forward`` runs the fast backend's kernel for the op."""

    out: IntType

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        from qcompile.backends.fast import run_op

        return run_op(self, *args)


class Quantize(IntOp):
    def __init__(self, scale: float, out: IntType) -> None:
        super().__init__()
        self.scale, self.out = float(scale), out

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}, out={self.out}"


class Dequantize(IntOp):
    def __init__(self, scale: float, inp: IntType) -> None:
        super().__init__()
        self.scale, self.inp = float(scale), inp
        self.out = inp

    def extra_repr(self) -> str:
        return f"scale={self.scale:.6g}, in={self.inp}"


class _Requantizing(IntOp):
    """An op whose int32 accumulator is requantized with per-channel (or scalar) dyadic multipliers."""

    mult: torch.Tensor
    shift: torch.Tensor
    fmult: torch.Tensor
    target: Target

    def _set_requant(self, mult: Any, shift: Any, out: IntType, lo: int, hi: int, fmult: Any = None,
                     target: Target | str = Target.INTEGER) -> None:
        """Dyadic ``mult``/``shift``; ``fmult`` (float32 M) defaults to the dyadic value in float32."""
        self.register_buffer("mult", _int_buffer(mult))
        self.register_buffer("shift", _int_buffer(shift))
        if fmult is None:
            fmult = self.mult.double() * torch.pow(2.0, -self.shift.double())
        self.register_buffer("fmult", torch.as_tensor(fmult, dtype=torch.float32).clone().reshape(self.mult.shape))
        if not out.lo <= lo <= hi <= out.hi:
            raise ValueError(f"clamp [{lo}, {hi}] outside the output type {out} [{out.lo}, {out.hi}]")
        self.out, self.lo, self.hi = out, int(lo), int(hi)
        self.target = Target.parse(target)


class _Affine(_Requantizing):
    """Conv/linear: integer weights (int32 storage), int32-range bias, input and weight types."""

    weight: torch.Tensor
    bias: torch.Tensor

    def _set_affine(self, weight: Any, bias: Any, inp: IntType, w_type: IntType) -> None:
        self.register_buffer("weight", _int_buffer(weight, torch.int32))
        self.register_buffer("bias", _int_buffer(bias, torch.int64))
        self.inp, self.w_type = inp, w_type


class IntConv2d(_Affine):

    def __init__(  # noqa: PLR0913 - the op's attributes, all required
        self,
        weight: Any,
        bias: Any,
        mult: Any,
        shift: Any,
        *,
        inp: IntType,
        w_type: IntType,
        out: IntType,
        lo: int,
        hi: int,
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        groups: int = 1,
        fmult: Any = None,
        target: Target | str = Target.INTEGER,
    ) -> None:
        super().__init__()
        self._set_affine(weight, bias, inp, w_type)
        self._set_requant(mult, shift, out, lo, hi, fmult, target)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    def extra_repr(self) -> str:
        return (
            f"{self.inp}x{self.w_type}->{self.out} [{self.lo},{self.hi}], weight={tuple(self.weight.shape)}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}"
        )


class IntLinear(_Affine):
    def __init__(
        self, weight: Any, bias: Any, mult: Any, shift: Any, *, inp: IntType, w_type: IntType, out: IntType,
        lo: int, hi: int, fmult: Any = None, target: Target | str = Target.INTEGER,
    ) -> None:
        super().__init__()
        self._set_affine(weight, bias, inp, w_type)
        self._set_requant(mult, shift, out, lo, hi, fmult, target)

    def extra_repr(self) -> str:
        return f"{self.inp}x{self.w_type}->{self.out} [{self.lo},{self.hi}], weight={tuple(self.weight.shape)}"


def codes_of_terms(signs: torch.Tensor, exps: torch.Tensor) -> torch.Tensor:
    """q_w = sum over the leading (term) axis of s_i * 2^(e_i), int64."""
    ones = torch.ones_like(exps, dtype=torch.int64)
    return (signs.to(torch.int64) * torch.bitwise_left_shift(ones, exps.to(torch.int64))).sum(dim=0)


class _ShiftAdd(nn.Module):
    """Power-of-two term storage of an APoT layer: ``term_sign``/``term_exp`` int8 [terms, *weight shape]."""

    term_sign: torch.Tensor
    term_exp: torch.Tensor
    bits: int

    def __init__(self, signs: Any, exps: Any, bias: Any, mult: Any, shift: Any, *, bits: int,
                 **kwargs: Any) -> None:
        """The layer (next in the MRO: IntConv2d or IntLinear) on the combined codes, then the terms."""
        super().__init__(codes_of_terms(torch.as_tensor(signs), torch.as_tensor(exps)), bias, mult, shift,  # type: ignore[call-arg]
                         **kwargs)
        self._set_terms(signs, exps, bits)

    def extra_repr(self) -> str:
        return f"apot{self.bits} {self.terms} terms, " + super().extra_repr()

    def _set_terms(self, signs: Any, exps: Any, bits: int) -> None:
        self.register_buffer("term_sign", _int_buffer(signs, torch.int8))
        self.register_buffer("term_exp", _int_buffer(exps, torch.int8))
        if not bool((self.term_sign.abs() <= 1).all()) or not bool((self.term_exp >= 0).all()):
            raise ValueError("term signs must lie in {-1, 0, 1} and exponents be >= 0")
        # the combined codes, derived from the terms (not part of the state dict)
        self.register_buffer("weight", codes_of_terms(self.term_sign, self.term_exp).to(torch.int32),
                               persistent=False)
        self.bits = bits

    @property
    def terms(self) -> int:
        return int(self.term_sign.shape[0])

    def planes(self) -> list[tuple[int, torch.Tensor]]:
        """(p, T_p) for every exponent in use: ternary planes with q_w = sum_p T_p * 2^p."""
        out = []
        for p in sorted(set(self.term_exp[self.term_sign != 0].tolist())):
            out.append((int(p), ((self.term_exp == p).to(torch.int64) * self.term_sign).sum(dim=0)))
        return out


class IntShiftConv2d(_ShiftAdd, IntConv2d):
    """IntConv2d whose weights are APoT power-of-two terms (``bits``: the APoT weight bit-width)."""


class IntShiftLinear(_ShiftAdd, IntLinear):
    """IntLinear whose weights are APoT power-of-two terms."""


class IntAdd(_Requantizing):
    def __init__(self, mult: int, shift: int, *, inp: tuple[IntType, IntType], out: IntType, lo: int, hi: int,
                 fmult: Any = None, target: Target | str = Target.INTEGER) -> None:
        super().__init__()
        self._set_requant(mult, shift, out, lo, hi, fmult, target)
        self.inp = inp

    def extra_repr(self) -> str:
        return f"{self.inp[0]}+{self.inp[1]}->{self.out} [{self.lo},{self.hi}]"


class IntAvgPool2d(_Requantizing):
    def __init__(
        self, mult: int, shift: int, *, kernel: tuple[int, int], stride: tuple[int, int],
        padding: tuple[int, int], inp: IntType, out: IntType, lo: int, hi: int, fmult: Any = None,
        target: Target | str = Target.INTEGER,
    ) -> None:
        super().__init__()
        self._set_requant(mult, shift, out, lo, hi, fmult, target)
        self.kernel, self.stride, self.padding, self.inp = kernel, stride, padding, inp

    def extra_repr(self) -> str:
        return f"{self.inp}->{self.out} [{self.lo},{self.hi}], kernel={self.kernel}, stride={self.stride}"


class IntMaxPool2d(IntOp):
    def __init__(
        self, *, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
        dilation: tuple[int, int], ceil_mode: bool, inp: IntType,
    ) -> None:
        super().__init__()
        self.kernel, self.stride, self.padding, self.dilation = kernel, stride, padding, dilation
        self.ceil_mode, self.inp, self.out = ceil_mode, inp, inp

    def extra_repr(self) -> str:
        return f"{self.inp}, kernel={self.kernel}, stride={self.stride}, padding={self.padding}"


class IntClamp(IntOp):
    def __init__(self, lo: int, hi: int, *, inp: IntType) -> None:
        super().__init__()
        self.lo, self.hi, self.inp, self.out = int(lo), int(hi), inp, inp

    def extra_repr(self) -> str:
        return f"{self.inp} [{self.lo},{self.hi}]"


class IntAvgPoolTable(_Requantizing):
    """Average pooling whose divisor varies per output position, as a separable window sum.

    ``rows`` [H_out, H] and ``cols`` [W_out, W] are non-negative integer weights: 0/1 window membership for
    pools (a window's part inside the input; padding adds 0), interpolation weights for bilinear
    upsampling, so acc[n, c, i, j] = sum_h sum_w rows[i, h] q_x[n, c, h, w] cols[j, w], and
    q_y = clamp(rq(acc, M[i, j]), lo, hi) with one multiplier per output position, M[i, j] = s_x / (d[i, j]
    s_y) for the pool's divisor d (the window's size inside the input with count_include_pad=False, its
    size inside the padded input otherwise, the override if given; an adaptive pool's bin size).
    ``mult``/``shift``/``fmult`` have shape [H_out, W_out]. Covers AvgPool2d with ceil_mode,
    count_include_pad=False or divisor_override, and AdaptiveAvgPool2d to any size.
    """

    rows: torch.Tensor
    cols: torch.Tensor

    def __init__(self, rows: Any, cols: Any, mult: Any, shift: Any, *, inp: IntType, out: IntType, lo: int,
                 hi: int, fmult: Any = None, target: Target | str = Target.INTEGER) -> None:
        super().__init__()
        self.register_buffer("rows", _int_buffer(rows))
        self.register_buffer("cols", _int_buffer(cols))
        self._set_requant(mult, shift, out, lo, hi, fmult, target)
        self.inp = inp

    def accumulator_bound(self) -> int:
        """max |acc|: the largest window times the largest |q_x|."""
        window = int(self.rows.sum(dim=1).max()) * int(self.cols.sum(dim=1).max())
        return window * max(abs(self.inp.lo), abs(self.inp.hi))

    def extra_repr(self) -> str:
        (h_out, h), (w_out, w) = self.rows.shape, self.cols.shape
        return f"{self.inp}->{self.out} [{self.lo},{self.hi}], ({h}, {w}) -> ({h_out}, {w_out})"


class IntRescale(_Requantizing):
    """A constant affine map of one tensor: acc = gain * q_x + offset, q_y = clamp(rq(acc, M), lo, hi).

    ``offset`` (int64) and the multipliers broadcast against one sample with ``param_shape`` (e.g. (C, 1, 1)
    per channel, (1, 1, 1) scalar). Multiplication by a constant c > 0: gain 1, offset 0, M = s_x c / s_y.
    Addition of a constant c: gain 2^k, offset round(c 2^k / s_x) (the constant on a grid 2^k finer than
    the input's), M = s_x / (2^k s_y).
    """

    offset: torch.Tensor

    def __init__(self, mult: Any, shift: Any, *, gain: int, offset: Any, param_shape: tuple[int, ...],
                 inp: IntType, out: IntType, lo: int, hi: int, fmult: Any = None,
                 target: Target | str = Target.INTEGER) -> None:
        super().__init__()
        self._set_requant(mult, shift, out, lo, hi, fmult, target)
        self.register_buffer("offset", _int_buffer(offset).reshape(-1))
        self.gain, self.param_shape, self.inp = int(gain), tuple(int(d) for d in param_shape), inp

    def accumulator_bound(self) -> int:
        return self.gain * max(abs(self.inp.lo), abs(self.inp.hi)) + int(self.offset.abs().max())

    def extra_repr(self) -> str:
        return f"{self.inp}->{self.out} [{self.lo},{self.hi}], gain={self.gain}, params={self.param_shape}"


class IntSub(_Requantizing):
    """Difference of two tensors on one scale: q_y = clamp(rq(q_a - q_b, m, n), lo, hi)."""

    def __init__(self, mult: int, shift: int, *, inp: tuple[IntType, IntType], out: IntType, lo: int, hi: int,
                 fmult: Any = None, target: Target | str = Target.INTEGER) -> None:
        super().__init__()
        self._set_requant(mult, shift, out, lo, hi, fmult, target)
        self.inp = inp

    def extra_repr(self) -> str:
        return f"{self.inp[0]}-{self.inp[1]}->{self.out} [{self.lo},{self.hi}]"


REQUANTIZING_OPS: tuple[type[_Requantizing], ...] = (IntConv2d, IntLinear, IntShiftConv2d, IntShiftLinear, IntAdd,
                                                      IntAvgPool2d, IntAvgPoolTable, IntRescale, IntSub)
SHIFT_ADD_OPS = (IntShiftConv2d, IntShiftLinear)
INTEGER_MODULES: tuple[type[IntOp], ...] = (Quantize, Dequantize, *REQUANTIZING_OPS, IntMaxPool2d, IntClamp)
# call_function targets allowed on integer tensors: they move integers around without arithmetic
INTEGER_FUNCTIONS = (torch.flatten, torch.reshape, torch.cat, *MOVEMENT_FUNCTIONS)


# ---------------------------------------------------------------- pointwise ops (tables, products)


class IntLookup(IntOp):
    """A pointwise function as a table: q_y = table[q_x - inp.lo] (``quant/tables.py`` builds it).

    ``table`` holds 2^b int64 entries for a b-bit input (b <= 8), already clamped to [lo, hi] of the
    output type; nothing is requantized, so every backend and target computes the same integers. A
    per-channel function (PReLU) has one row per channel, [C, 2^b], indexed by the channel (dim 1) too:
    q_y[n, c, ...] = table[c, q_x[n, c, ...] - inp.lo].
    """

    table: torch.Tensor

    def __init__(self, table: Any, *, inp: IntType, out: IntType, lo: int, hi: int, label: str = "f") -> None:
        super().__init__()
        self.register_buffer("table", _int_buffer(table))
        if self.table.dim() not in (1, 2) or self.table.shape[-1] != inp.hi - inp.lo + 1:
            raise ValueError(f"table of shape {tuple(self.table.shape)} for a {inp} input "
                             f"({inp.hi - inp.lo + 1} values)")
        if not out.lo <= lo <= hi <= out.hi or bool((self.table < lo).any() | (self.table > hi).any()):
            raise ValueError(f"table entries outside [{lo}, {hi}] or the output type {out}")
        self.inp, self.out, self.lo, self.hi, self.label = inp, out, int(lo), int(hi), label

    def extra_repr(self) -> str:
        rows = f"{self.table.shape[0]} channels x " if self.table.dim() == 2 else ""
        return f"{self.label}: {self.inp}->{self.out} [{self.lo},{self.hi}], {rows}{self.table.shape[-1]} entries"


class IntMul(_Requantizing):
    """Elementwise product of two integer tensors (NumPy broadcasting, e.g. a [N, C, 1, 1] gate):
    acc = q_a * q_b (int32; the verifier proves max|q_a| * max|q_b| <= 2^31 - 1), then
    q_y = clamp(rq(acc, M), lo, hi) with M = s_a * s_b / s_y.
    """

    def __init__(self, mult: int, shift: int, *, inp: tuple[IntType, IntType], out: IntType, lo: int, hi: int,
                 fmult: Any = None, target: Target | str = Target.INTEGER) -> None:
        super().__init__()
        self._set_requant(mult, shift, out, lo, hi, fmult, target)
        self.inp = inp

    @property
    def bound(self) -> int:
        a, b = self.inp
        return max(abs(a.lo), a.hi) * max(abs(b.lo), b.hi)

    def extra_repr(self) -> str:
        return f"{self.inp[0]}*{self.inp[1]}->{self.out} [{self.lo},{self.hi}]"


POINTWISE_OPS = (IntLookup, IntMul)
REQUANTIZING_OPS = (*REQUANTIZING_OPS, IntMul)
INTEGER_MODULES = (*INTEGER_MODULES, *POINTWISE_OPS)


class IntLayerNorm(_Requantizing):
    """Integer LayerNorm over ``axis`` (the last dim, or 1 for channels of NCHW), D = its size.

    All in int64 on the integer input q (planned by ``quant/layernorm.py``, which states the error bound):
      s = sum_j q_j,  d_i = D q_i - s,  V = sum_j d_j^2,  X = max(1, (V + E) * 4^P),
      S = isqrt(X) by ``steps`` Newton steps from y0: y <- min(y, (y + X // y) >> 1) (all >= 0),
      N_i = sign(d_i) * ((|d_i| * 2^(P+K+1) + S) // (2 S))    (round(d_i 2^(P+K) / S), ties away from 0),
      acc_i = N_i * G[c] + B[c] (int32: |acc| <= ``bound``),  q_y = clamp(rq(acc, M), lo, hi),
    with E = round(eps D^3 / s_x^2), gamma ~ s_g G, B = round(beta / (sqrt(D) s_g 2^-K)) and
    M = sqrt(D) s_g 2^-K / s_y (d_i sqrt(D) / sqrt(V + E) is the normalized value).
    """

    gamma: torch.Tensor
    beta: torch.Tensor

    def __init__(self, gamma: Any, beta: Any, mult: Any, shift: Any, *, axis: int, size: int, eps_q: int,
                 p: int, k: int, steps: int, y0: int, inp: IntType, out: IntType, lo: int, hi: int,
                 fmult: Any = None, target: Target | str = Target.INTEGER) -> None:
        super().__init__()
        self._set_requant(mult, shift, out, lo, hi, fmult, target)
        self.register_buffer("gamma", _int_buffer(gamma))
        self.register_buffer("beta", _int_buffer(beta))
        self.axis, self.size, self.eps_q, self.p, self.k, self.steps, self.y0 = axis, size, eps_q, p, k, steps, y0
        self.inp = inp

    @property
    def bound(self) -> int:
        """max |acc| = 2^K max|G| + max|B|: V >= d_i^2 gives S >= isqrt(X) >= |d_i| 2^P, so |N_i| <= 2^K
        (Newton steps from y0 >= isqrt(X) never go below isqrt(X))."""
        return int(((1 << self.k) * self.gamma.abs() + self.beta.abs()).max())

    def extra_repr(self) -> str:
        return (f"{self.inp}->{self.out} [{self.lo},{self.hi}], axis={self.axis}, D={self.size}, P={self.p}, "
                f"K={self.k}, steps={self.steps}")


REQUANTIZING_OPS = (*REQUANTIZING_OPS, IntLayerNorm)
INTEGER_MODULES = (*INTEGER_MODULES, IntLayerNorm)


class IntSoftmax(IntOp):
    """Integer softmax over ``axis`` (a channel axis or attention's last axis), no float inside:
      d_i = max_j q_j - q_i (>= 0),  E_i = etab[d_i] = round(2^20 exp(-s_x d_i))  (a table),
      S = sum_j E_j,  q_y = clamp((2 E_i C + S 2^t) // (2 S 2^t), lo, hi)   (round half up of E_i C / (S 2^t)),
    with C = round(2^t / s_y), t = ``frac``; every operand is non-negative and below 2^62.
    """

    etab: torch.Tensor

    def __init__(self, etab: Any, *, axis: int, c: int, frac: int, inp: IntType, out: IntType, lo: int,
                 hi: int) -> None:
        super().__init__()
        self.register_buffer("etab", _int_buffer(etab))
        if self.etab.numel() != inp.hi - inp.lo + 1 or bool((self.etab < 0).any()) or int(self.etab[0]) < 1:
            raise ValueError(f"exp table of {self.etab.numel()} non-negative entries, the first >= 1, for a {inp} "
                             "input")
        self.axis, self.c, self.frac, self.inp, self.out, self.lo, self.hi = axis, int(c), int(frac), inp, out, lo, hi

    def extra_repr(self) -> str:
        return f"{self.inp}->{self.out} [{self.lo},{self.hi}], axis={self.axis}, C={self.c}, t={self.frac}"


INTEGER_MODULES = (*INTEGER_MODULES, IntSoftmax)


class IntMatMul(_Requantizing):
    """Matrix product of two integer tensors (``torch.matmul`` broadcasting over the leading batch/head dims):
    acc = sum_k q_a[..., i, k] * q_b[..., k, j] (int32; the verifier proves K * max|q_a| * max|q_b| <= 2^31 - 1,
    ``inner`` = K), then q_y = clamp(rq(acc, M), lo, hi) with M = alpha * s_a * s_b / s_y (one scalar).
    """

    def __init__(self, mult: int, shift: int, *, inner: int, inp: tuple[IntType, IntType], out: IntType, lo: int,
                 hi: int, fmult: Any = None, target: Target | str = Target.INTEGER) -> None:
        super().__init__()
        self._set_requant(mult, shift, out, lo, hi, fmult, target)
        self.inner, self.inp = int(inner), inp

    @property
    def bound(self) -> int:
        a, b = self.inp
        return self.inner * max(abs(a.lo), a.hi) * max(abs(b.lo), b.hi)

    def extra_repr(self) -> str:
        return f"{self.inp[0]}@{self.inp[1]}->{self.out} [{self.lo},{self.hi}], K={self.inner}"


REQUANTIZING_OPS = (*REQUANTIZING_OPS, IntMatMul)
INTEGER_MODULES = (*INTEGER_MODULES, IntMatMul)


class IntConstCat(IntOp):
    """Concatenation with a constant integer tensor (a class token): q_y = cat([value, q_x], dim) (or q_x
    first), ``value`` one sample [*shape] (int64, inside the input type) repeated over the batch; scale
    and type unchanged."""

    value: torch.Tensor

    def __init__(self, value: Any, *, dim: int, first: bool, inp: IntType) -> None:
        super().__init__()
        self.register_buffer("value", _int_buffer(value))
        if bool((self.value < inp.lo).any() | (self.value > inp.hi).any()):
            raise ValueError(f"constant outside the input type {inp}")
        self.dim, self.first, self.inp, self.out = int(dim), bool(first), inp, inp

    def extra_repr(self) -> str:
        return f"{self.inp}, constant {tuple(self.value.shape)}, dim={self.dim}, first={self.first}"


INTEGER_MODULES = (*INTEGER_MODULES, IntConstCat)
