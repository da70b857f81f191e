"""The integer contract (qcompile/ir/contract.py) against independent arbitrary-precision arithmetic.

Expected values come from Python ints and ``fractions.Fraction`` (exact), never from the code under test.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qcompile.ir import contract
from qcompile.ir.contract import INT32_MAX, MAX_SHIFT, MIN_SHIFT, MultiplierError

M_LO, M_HI = 2**30, 2**31


def exact_requantize(acc: int, m: int, n: int, lo: int, hi: int) -> int:
    """floor((acc * m + 2^(n-1)) / 2^n), clamped: round half up (toward +inf), in Python ints."""
    return max(lo, min(hi, (acc * m + 2 ** (n - 1)) // 2**n))


def exact_round_half_up(x: Fraction) -> int:
    return math.floor(x + Fraction(1, 2))


# ------------------------------------------------------------------------------ quantize_multiplier


@pytest.mark.parametrize("real", [2.0**-24, 1e-6, 0.0123, 0.3, 0.5, 0.75, 1.0, 3.0, 1234.5, 2.0**29, 2.0**30 - 1.0])
def test_quantize_multiplier_normal_range(real: float) -> None:
    m, n = contract.quantize_multiplier(real)
    assert isinstance(m, int) and isinstance(n, int)
    assert M_LO <= m < M_HI
    assert MIN_SHIFT <= n <= MAX_SHIFT
    # m is the integer nearest real * 2^n, so the relative error is at most 1 / (2 m) <= 2^-31
    assert abs(Fraction(real) * 2**n - m) <= Fraction(1, 2)
    assert abs(Fraction(m, 2**n) - Fraction(real)) / Fraction(real) <= Fraction(1, 2**31)


# above 2^30 - 1/2, real * 2 rounds to 2^31 with the smallest shift: refused (see below)
@given(st.floats(min_value=2.0**-24, max_value=2.0**30 - 0.5, allow_subnormal=False))
def test_quantize_multiplier_property(real: float) -> None:
    m, n = contract.quantize_multiplier(real)
    assert M_LO <= m < M_HI
    assert MIN_SHIFT <= n <= MAX_SHIFT
    assert abs(Fraction(m, 2**n) - Fraction(real)) <= Fraction(real) / 2**31


@given(st.floats(min_value=1e-300, max_value=2.0**-24, exclude_max=True, allow_subnormal=False))
def test_small_multipliers_keep_max_shift(real: float) -> None:
    m, n = contract.quantize_multiplier(real)
    assert n == MAX_SHIFT
    assert 0 <= m <= M_LO
    assert abs(Fraction(m, 2**n) - Fraction(real)) <= Fraction(1, 2 ** (MAX_SHIFT + 1))


def test_tiny_multiplier_rounds_to_zero_mantissa() -> None:
    # 1e-20 * 2^54 ~ 1.8e-4: the nearest dyadic number with the largest allowed shift is 0
    assert contract.quantize_multiplier(1e-20) == (0, MAX_SHIFT)


def test_multipliers_near_one() -> None:
    assert contract.quantize_multiplier(1.0) == (2**30, 30)
    # 1 - 2^-53 * 2^31 rounds to 2^31: the carry moves to the next power of two, still exactly 1.0
    assert contract.quantize_multiplier(1.0 - 2.0**-53) == (2**30, 30)
    assert contract.quantize_multiplier(1.0 + 2.0**-52) == (2**30, 30)
    m, n = contract.quantize_multiplier(1.0 - 2.0**-31)
    assert Fraction(m, 2**n) == Fraction(2**31 - 1, 2**31)


def test_largest_accepted_multiplier() -> None:
    # 2^30 - 1/2 = (2^31 - 1) * 2^-1 is representable with the smallest shift
    assert contract.quantize_multiplier(2.0**30 - 0.5) == (2**31 - 1, 1)


@pytest.mark.parametrize("real", [2.0**30, 2.0**30 * (1 - 2.0**-40), 2.0**31, 1e12, math.inf])
def test_multipliers_of_2_30_or_more_are_refused(real: float) -> None:
    # 2^30 * (1 - 2^-40) is below 2^30 but its nearest dyadic form with m < 2^31 is 2^30 itself
    with pytest.raises(MultiplierError, match="too large|finite"):
        contract.quantize_multiplier(real)


@pytest.mark.parametrize("real", [0.0, -0.0, -1.0, -1e-30, math.nan, -math.inf])
def test_non_positive_or_nan_multipliers_are_refused(real: float) -> None:
    with pytest.raises(MultiplierError, match="positive and finite"):
        contract.quantize_multiplier(real)


def test_multiplier_error_is_a_value_error() -> None:
    assert issubclass(MultiplierError, ValueError)


def test_quantize_multipliers_vector_matches_scalar() -> None:
    reals = np.array([[0.001, 0.5], [1.5, 1e-9]])
    m, n = contract.quantize_multipliers(reals)
    assert m.dtype == np.int64 and n.dtype == np.int64
    assert m.shape == n.shape == (4,)
    for r, mi, ni in zip(reals.ravel(), m, n, strict=True):
        assert (int(mi), int(ni)) == contract.quantize_multiplier(float(r))


# ------------------------------------------------------------------------------------- requantize


def test_requantize_random_accumulators_match_python_ints() -> None:
    rng = np.random.default_rng(0)
    acc = rng.integers(-INT32_MAX, INT32_MAX, size=2000, endpoint=True)
    acc[:4] = [INT32_MAX, -INT32_MAX, 0, -1]
    reals = np.exp(rng.uniform(np.log(1e-9), np.log(4.0), size=acc.size))
    pairs = [contract.quantize_multiplier(float(r)) for r in reals]
    m = np.array([p[0] for p in pairs], dtype=np.int64)
    n = np.array([p[1] for p in pairs], dtype=np.int64)
    lo, hi = -(2**40), 2**40
    got = contract.requantize(acc, m, n, lo, hi)
    expected = [exact_requantize(int(a), int(mi), int(ni), lo, hi) for a, mi, ni in zip(acc, m, n, strict=True)]
    assert got.dtype == np.int64
    assert got.tolist() == expected


def test_requantize_broadcasts_per_channel() -> None:
    rng = np.random.default_rng(1)
    acc = rng.integers(-(2**20), 2**20, size=(3, 4, 5, 5))
    m = rng.integers(M_LO, M_HI, size=4)
    n = rng.integers(30, 45, size=4)
    got = contract.requantize(acc, m.reshape(1, -1, 1, 1), n.reshape(1, -1, 1, 1), -127, 127)
    for idx in np.ndindex(acc.shape):
        c = idx[1]
        assert got[idx] == exact_requantize(int(acc[idx]), int(m[c]), int(n[c]), -127, 127)


@pytest.mark.parametrize(
    ("acc", "expected"),
    # m = 2^30, n = 31 halves the accumulator: odd values are exact ties, which round toward +inf
    [(1, 1), (3, 2), (5, 3), (-1, 0), (-3, -1), (-5, -2), (2, 1), (-2, -1), (0, 0)],
)
def test_requantize_ties_round_half_up(acc: int, expected: int) -> None:
    got = contract.requantize(np.array([acc]), np.array(2**30), np.array(31), -100, 100)
    assert int(got[0]) == expected


def test_requantize_ties_with_large_shift() -> None:
    # m = 3 * 2^29, n = 50: acc * m / 2^n = 3 acc / 2^21, a tie k + 1/2 when acc = (2k + 1) / 3 * 2^20
    m, n = 3 * 2**29, 50
    for k in (1, -2, 4, -5):
        acc = (2 * k + 1) // 3 * 2**20
        assert Fraction(acc * m, 2**n) == k + Fraction(1, 2)
        got = contract.requantize(np.array([acc]), np.array(m), np.array(n), -(2**20), 2**20)
        assert int(got[0]) == k + 1


def test_requantize_saturates() -> None:
    acc = np.array([10**9, -(10**9), 1000, -1000, 0])
    got = contract.requantize(acc, np.array(2**30), np.array(30), -7, 7)  # M = 1
    assert got.tolist() == [7, -7, 7, -7, 0]
    got = contract.requantize(acc, np.array(2**30), np.array(30), 0, 15)  # unsigned 4 bit (folded ReLU)
    assert got.tolist() == [15, 0, 15, 0, 0]


def test_requantize_refuses_accumulators_outside_int32() -> None:
    with pytest.raises(OverflowError):
        contract.requantize(np.array([INT32_MAX + 1]), np.array(2**30), np.array(31), -127, 127)
    with pytest.raises(OverflowError):
        contract.requantize(np.array([-(2**31)]), np.array(2**30), np.array(31), -127, 127)


@given(
    acc=st.integers(-INT32_MAX, INT32_MAX),
    m=st.integers(0, M_HI - 1),
    n=st.integers(MIN_SHIFT, MAX_SHIFT),
    lo=st.integers(-(2**15), 0),
    hi=st.integers(0, 2**16),
)
def test_requantize_property(acc: int, m: int, n: int, lo: int, hi: int) -> None:
    got = contract.requantize(np.array([acc]), np.array([m]), np.array([n]), lo, hi)
    assert int(got[0]) == exact_requantize(acc, m, n, lo, hi)
    assert int(got[0]) == max(lo, min(hi, exact_round_half_up(Fraction(acc * m, 2**n))))


@given(
    acc=st.integers(-INT32_MAX, INT32_MAX - 1),
    real=st.floats(min_value=1e-8, max_value=16.0, allow_subnormal=False),
)
def test_requantize_is_monotonic_and_close_to_real_product(acc: int, real: float) -> None:
    m, n = contract.quantize_multiplier(real)
    q0, q1 = contract.requantize(np.array([acc, acc + 1]), np.array(m), np.array(n), -(2**40), 2**40).tolist()
    assert q0 <= q1
    # |q - acc * real| <= 1/2 (rounding) + |acc| * |real - m 2^-n| (dyadic approximation)
    bound = Fraction(1, 2) + abs(acc) * abs(Fraction(real) - Fraction(m, 2**n))
    assert abs(q0 - acc * Fraction(real)) <= bound


# ----------------------------------------------------------------------------------- quantize_input


def test_quantize_input_rounds_half_to_even() -> None:
    x = np.array([0.25, 0.75, 1.25, 1.75, -0.25, -0.75, -1.25, 0.0, 0.24, 0.26], dtype=np.float32)
    # x / 0.5 = 0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 0, 0.48, 0.52
    got = contract.quantize_input(x, 0.5, -127, 127)
    assert got.dtype == np.int64
    assert got.tolist() == [0, 2, 2, 4, 0, -2, -2, 0, 0, 1]


def test_quantize_input_clamps() -> None:
    x = np.array([1000.0, -1000.0, 3.0, -3.0], dtype=np.float32)
    assert contract.quantize_input(x, 1.0, -7, 7).tolist() == [7, -7, 3, -3]
    assert contract.quantize_input(x, 1.0, 0, 255).tolist() == [255, 0, 3, 0]


@pytest.mark.parametrize(
    ("x", "scale", "expected"),
    [
        # float32(0.35) / float32(0.1) is 3.4999998882... exactly, but the float32 division rounds it to
        # 3.5, which rounds half to even: 4 (the real quotient would round to 3)
        (0.35, 0.1, 4),
        # float32(0.75000006) / float32(0.3) is 2.50000009934... exactly; in float32 it is 2.5 -> 2
        (0.7500000596046448, 0.3, 2),
    ],
)
def test_quantize_input_divides_in_float32(x: float, scale: float, expected: int) -> None:
    x32, s32 = np.float32(x), np.float32(scale)
    exact = Fraction(float(x32)) / Fraction(float(s32))
    q32 = torch.tensor(float(x32), dtype=torch.float32) / torch.tensor(float(s32), dtype=torch.float32)
    assert float(q32) % 1 == 0.5 and exact != Fraction(float(q32))  # the example is what it claims
    assert round(exact) != expected  # rounding the exact quotient would give the other neighbour
    assert contract.quantize_input(np.array([x32]), scale, -127, 127).tolist() == [expected]


@given(st.lists(st.floats(-1e4, 1e4, width=32), min_size=1, max_size=20), st.floats(2.0**-10, 10.0, width=32))
def test_quantize_input_property(xs: list[float], scale: float) -> None:
    x = np.array(xs, dtype=np.float32)
    got = contract.quantize_input(x, scale, -127, 127)
    q = torch.round(torch.tensor(x) / torch.tensor(scale, dtype=torch.float32)).clamp(-127, 127)
    assert got.tolist() == q.to(torch.int64).tolist()


def test_dequantize_is_float32_product() -> None:
    q = np.array([-127, -1, 0, 1, 255])
    got = contract.dequantize(q, 0.1)
    assert got.dtype == np.float32
    assert got.tolist() == [float(np.float32(v) * np.float32(0.1)) for v in q]


# ------------------------------------------------------------------------------ round_half_up_div


@pytest.mark.parametrize(("num", "den", "expected"), [(5, 2, 3), (-5, 2, -2), (7, 2, 4), (-7, 2, -3),
                                                      (1, 3, 0), (2, 3, 1), (-2, 3, -1), (9, 9, 1), (0, 5, 0)])
def test_round_half_up_div(num: int, den: int, expected: int) -> None:
    assert int(contract.round_half_up_div(np.array(num), den)) == expected


@given(st.integers(-(2**40), 2**40), st.integers(1, 2**20))
def test_round_half_up_div_property(num: int, den: int) -> None:
    assert int(contract.round_half_up_div(np.array(num), den)) == exact_round_half_up(Fraction(num, den))
