"""The integer contract: the arithmetic every backend must reproduce bit for bit.

Written once here; the reference executor calls these functions, the fast executor and the ONNX export
are tested against them.

* Boundary quantize (the only float op going in): ``q = clamp(rint(float32(x) / float32(s)), lo, hi)``,
  rint rounding half to even, as onnxruntime's ``QuantizeLinear`` does.
* Dequantize (the only float op going out): ``x = float32(q) * float32(s)``.
* Requantize an int32 accumulator to the next scale with a dyadic multiplier ``M ~= m * 2^-n``:
  ``q = clamp((acc * m + 2^(n-1)) >> n, lo, hi)`` in int64 with an arithmetic shift (round half up).
  ``m`` lies in [2^30, 2^31) whenever ``M >= 2^(30-MAX_SHIFT)``; smaller multipliers keep ``n = MAX_SHIFT``
  and a smaller ``m`` (still exact on every backend, only less precise). ``M >= 2^30`` is refused.
* Accumulators are int32: the integer verifier proves ``|acc| <= 2^31 - 1`` before any backend runs.

Deliberately not handled: zero points other than 0 in the real-valued domain (activations are
symmetric or unsigned), and multipliers of 2^30 or more.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

INT32_MAX = 2**31 - 1
MIN_SHIFT = 1
MAX_SHIFT = 54  # keeps the uint64 requantization chain of the ONNX export exact (see backends/onnx_export)

IntArray = npt.NDArray[np.int64]


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
