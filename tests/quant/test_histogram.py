"""The mse range: the histogram's expected error against the true error of the data, and its minimiser."""

from __future__ import annotations

import pytest
import torch

from qcompile.ir.meta import IntType
from qcompile.quant.histogram import BINS, SAMPLE, Histogram


def true_error(x: torch.Tensor, c: float, itype: IntType) -> float:
    """sum (x - s clamp(round(x / s), lo, hi))^2, s = c / hi: the error the grid really makes on x."""
    x = x.double()
    s = c / itype.hi
    return float(((x - s * torch.clamp(torch.round(x / s), itype.lo, itype.hi)) ** 2).sum())


def histogram(*batches: torch.Tensor) -> Histogram:
    h = Histogram()
    for b in batches:
        h.add(b)
    return h


@pytest.mark.parametrize("bits", [4, 8])
def test_laplace_range_is_the_brute_force_optimum(bits: int) -> None:
    x = torch.distributions.Laplace(0.0, 1.0).sample((100_000,))
    itype = IntType(bits, True)
    h = histogram(x[:50_000], x[50_000:])
    c = h.mse_range(itype)
    grid = torch.linspace(0.05, h.peak, 1500).tolist()
    errors = [true_error(x, g, itype) for g in grid]
    best = min(errors)
    assert c == pytest.approx(grid[errors.index(best)], rel=0.02)
    assert true_error(x, c, itype) <= best * 1.001
    assert true_error(x, c, itype) < true_error(x, h.peak, itype)  # clipping the tail beats the max
    model = float(h.expected_error(torch.tensor([c]), itype)[0])
    assert model == pytest.approx(true_error(x, c, itype), rel=0.01)  # the histogram's error is the data's


@pytest.mark.parametrize(("bits", "signed"), [(2, False), (3, False), (3, True)])
def test_uniform_range_is_the_analytic_optimum(bits: int, signed: bool) -> None:
    # a uniform density on [0, 1] (or [-1, 1]): E(c) ~ c^3 / (12 hi^2) + (1 - c)^3 / 3, least at c = 2 hi / (2 hi + 1)
    x = torch.linspace(-1.0 if signed else 0.0, 1.0, 400_001)
    itype = IntType(bits, signed)
    c = histogram(x).mse_range(itype)
    assert c == pytest.approx(2 * itype.hi / (2 * itype.hi + 1), abs=2e-3)
    assert true_error(x, c, itype) < true_error(x, 1.0, itype)


def test_unsigned_grid_ignores_negatives_and_signed_grid_counts_them() -> None:
    x = torch.cat([torch.linspace(0.0, 1.0, 10_001), -10.0 * torch.linspace(0.0, 1.0, 10_001)])
    h = histogram(x)
    assert h.mse_range(IntType(8, False)) < 1.0 + 1e-9  # negatives go to 0 on any unsigned grid
    assert h.mse_range(IntType(8, True)) > 5.0  # a signed grid must cover the large negative side


def test_counts_are_exact_when_the_range_grows() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20_000, generator=g)
    x[:5000] = 0.0
    peak = int(x.abs().argmax())
    first, rest = x[peak : peak + 1], torch.cat([x[:peak], x[peak + 1 :]])
    one = histogram(first, rest)  # the first batch holds the max: one top throughout
    small = rest[rest.abs() < 0.5]
    grown = histogram(small, rest[rest.abs() >= 0.5], first)  # top doubles (bins merge) as batches grow
    assert int(one.counts.sum()) + one.zeros == x.numel() and one.zeros == 5000
    assert int(grown.counts.sum()) + grown.zeros == x.numel()  # every value counted once
    assert grown.top >= grown.peak == one.peak
    assert grown.counts.shape == (2, BINS)


def test_same_batches_give_the_same_range() -> None:
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(4096, generator=g) ** 3 for _ in range(3)]
    ranges = {histogram(*batches).mse_range(IntType(8, True)) for _ in range(3)}
    assert len(ranges) == 1


def test_all_zero_has_no_range() -> None:
    assert histogram(torch.zeros(100)).mse_range(IntType(8, True)) == 0.0


def test_weights_scale_free_and_zero_weight_values_do_not_count() -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(64, 32, generator=g)
    itype = IntType(6, True)
    plain = Histogram()
    plain.add(x)
    doubled = Histogram(lambda v: torch.full_like(v, 2.0))
    doubled.add(x)
    assert doubled.mse_range(itype) == pytest.approx(plain.mse_range(itype), rel=1e-9)
    y = x.clone()
    y[0] *= 50.0  # one row of outliers, weighed 0: the range is that of the other rows
    ignored = Histogram(lambda v: (torch.arange(v.shape[0]) > 0).double()[:, None])
    ignored.add(y)
    rest = Histogram()
    rest.add(torch.cat([x[1:], torch.zeros(1, 32)]))
    assert ignored.mse_range(itype) == pytest.approx(rest.mse_range(itype), rel=0.02)


def test_a_large_batch_is_sampled_but_its_max_is_exact() -> None:
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3 * SAMPLE + 5, generator=g)
    x[1] = 40.0  # not on the sampled grid (every 4th value): still the histogram's max
    h = histogram(x)
    assert h.peak == 40.0 and h.top == 40.0
    assert float(h.counts.sum()) + h.zeros == len(x[::4])
