"""The integer contract: the arithmetic every backend must reproduce bit for bit.

Written once here; the reference executor calls these functions, the fast executor and the ONNX export
are tested against them.

* Boundary quantize (the only float op going in): ``q = clamp(rint(float32(x) / float32(s)), lo, hi)``,
  rint rounding half to even, as onnxruntime's ``QuantizeLinear`` does.
* Dequantize (the only float op going out): ``x = float32(q) * float32(s)``.
* Requantize an int32 accumulator to the next scale with the real multiplier ``M = s_in / s_out`` (per
  channel or scalar). Two targets (``Target``), chosen at lowering and recorded on every op:

  - ``integer`` (dyadic, for integer-only hardware): ``M ~= m * 2^-n``,
    ``q = clamp((acc * m + 2^(n-1)) >> n, lo, hi)`` in int64 with an arithmetic shift (round half up).
    ``m`` lies in [2^30, 2^31) whenever ``M >= 2^(30-MAX_SHIFT)``; smaller multipliers keep
    ``n = MAX_SHIFT`` and a smaller ``m`` (still exact on every backend, only less precise).
  - ``ort`` (float32, what onnxruntime's fused QLinear kernels compute): ``f = float32(M)``,
    ``q = clamp(rint(float32(acc) * f), lo, hi)``: the int32 accumulator converted to float32 (IEEE
    round-to-nearest-even, exact below 2^24), one float32 multiply (IEEE, round to nearest even), then
    rounding half to even. Clamping before or after the rounding is the same for integer bounds.

  ``M >= 2^30`` (and a non-finite or non-positive ``M``) is refused on both targets.
* Accumulators are int32: the integer verifier proves ``|acc| <= 2^31 - 1`` before any backend runs.

Deliberately not handled: zero points other than 0 in the real-valued domain (activations are
symmetric or unsigned), and multipliers of 2^30 or more.
"""

from __future__ import annotations

import enum
import math

import numpy as np
import numpy.typing as npt

INT32_MAX = 2**31 - 1
MIN_SHIFT = 1
MAX_SHIFT = 54  # keeps the uint64 requantization chain of the ONNX export exact (see backends/onnx_export)

IntArray = npt.NDArray[np.int64]


class Target(enum.Enum):
    """The requantization contract an integer graph follows (see the module docstring)."""

    INTEGER = "integer"  # dyadic m * 2^-n, int64, round half up: integer-only hardware
    ORT = "ort"  # float32 multiply, round half to even: onnxruntime's fused QLinear kernels

    @classmethod
    def parse(cls, text: str | Target) -> Target:
        if isinstance(text, Target):
            return text
        try:
            return cls(text)
        except ValueError:
            valid = ", ".join(t.value for t in cls)
            raise ValueError(f"unknown target {text!r} (valid: {valid})") from None


class MultiplierError(ValueError):
    """A real multiplier that the dyadic form cannot hold."""


def quantize_multiplier(real: float) -> tuple[int, int]:
    """Return ``(m, n)`` with ``m * 2^-n`` the dyadic number closest to ``real`` (> 0)."""
    if not math.isfinite(real) or real <= 0.0:
        raise MultiplierError(f"requantization multiplier must be positive and finite, got {real!r}")
    mantissa, exponent = math.frexp(real)  # real = mantissa * 2^exponent, mantissa in [0.5, 1)
    shift = 31 - exponent
    if shift < MIN_SHIFT:
        raise MultiplierError(f"requantization multiplier {real:g} is too large (must be < 2^30)")
    shift = min(shift, MAX_SHIFT)
    m = round(real * 2.0**shift)
    if m == 2**31:  # rounding carried into the next power of two
        m, shift = 2**30, shift - 1
        if shift < MIN_SHIFT:  # real rounds to 2^30 itself
            raise MultiplierError(f"requantization multiplier {real:g} is too large (must be < 2^30)")
    return int(m), int(shift)


def quantize_multipliers(reals: npt.ArrayLike) -> tuple[IntArray, IntArray]:
    """Vector form of :func:`quantize_multiplier`."""
    pairs = [quantize_multiplier(float(r)) for r in np.asarray(reals, dtype=np.float64).ravel()]
    m = np.array([p[0] for p in pairs], dtype=np.int64)
    n = np.array([p[1] for p in pairs], dtype=np.int64)
    return m, n


def requantize(acc: IntArray, m: IntArray, n: IntArray, lo: int, hi: int) -> IntArray:
    """``clamp((acc * m + 2^(n-1)) >> n, lo, hi)`` in int64; ``m``/``n`` broadcast against ``acc``."""
    acc = np.asarray(acc, dtype=np.int64)
    if np.any(np.abs(acc) > INT32_MAX):
        raise OverflowError("accumulator outside int32: the integer verifier should have refused this graph")
    m = np.asarray(m, dtype=np.int64)
    n = np.asarray(n, dtype=np.int64)
    rounding = np.left_shift(np.int64(1), n - 1)
    out = np.right_shift(acc * m + rounding, n)
    return np.clip(out, lo, hi)


def float_multipliers(reals: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """``float32(M)`` for the ``ort`` target, refusing what the dyadic form refuses too (same domain)."""
    values = np.asarray(reals, dtype=np.float64)
    for r in values.ravel():
        quantize_multiplier(float(r))  # raises MultiplierError for non-finite, <= 0 or >= 2^30
    f = values.astype(np.float32)
    if np.any(f <= 0):
        raise MultiplierError(f"requantization multiplier {float(values.min()):g} underflows float32")
    return f


def requantize_f32(acc: IntArray, fmult: npt.ArrayLike, lo: int, hi: int) -> IntArray:
    """``clamp(rint(float32(acc) * float32(M)), lo, hi)``: the ``ort`` target's requantization."""
    acc = np.asarray(acc, dtype=np.int64)
    if np.any(np.abs(acc) > INT32_MAX):
        raise OverflowError("accumulator outside int32: the integer verifier should have refused this graph")
    v = acc.astype(np.float32) * np.asarray(fmult, dtype=np.float32)
    return np.clip(np.rint(v), lo, hi).astype(np.int64)


def quantize_input(x: npt.ArrayLike, scale: float, lo: int, hi: int) -> IntArray:
    """Boundary quantization, float32 division and round-half-even, as QuantizeLinear computes it."""
    xf = np.asarray(x, dtype=np.float32)
    q = np.rint(xf / np.float32(scale))
    return np.clip(q, lo, hi).astype(np.int64)


def dequantize(q: npt.ArrayLike, scale: float) -> npt.NDArray[np.float32]:
    """Boundary dequantization, ``float32(q) * float32(scale)`` as DequantizeLinear computes it."""
    return np.asarray(q, dtype=np.float32) * np.float32(scale)


def round_half_up_div(num: IntArray, den: int) -> IntArray:
    """Exact integer ``round(num / den)`` with ties toward +inf (used for bias and pooling constants)."""
    return np.floor_divide(2 * np.asarray(num, dtype=np.int64) + den, 2 * den)
