"""APoT quantizers: the exact level sets, nearest-level projection, alpha's gradient, weight normalization."""

from __future__ import annotations

import pytest
import torch

from qcompile.ir.intops import codes_of_terms
from qcompile.passes.base import PreconditionError
from qcompile.quant.apot import (
    APoTWeightQuant,
    apot_quantize,
    code_type,
    level_set,
    nearest_code,
    terms_of_codes,
    weight_level_set,
)
from qcompile.train.trainer import parameter_groups

EXPECTED = {
    1: (0, 1),
    2: (0, 1, 2, 4),
    3: (0, 1, 2, 3, 4, 6, 8, 10),
    4: (0, 1, 2, 3, 4, 6, 8, 9, 12, 16, 18, 24, 32, 33, 36, 48),
}


@pytest.mark.parametrize("bits", sorted(EXPECTED))
def test_code_sets_are_exactly_those_of_the_method(bits: int) -> None:
    assert level_set(bits).codes == EXPECTED[bits]
    assert level_set(bits).k_max == EXPECTED[bits][-1]


def test_five_and_six_magnitude_bits() -> None:
    five, six = level_set(5), level_set(6)
    assert (len(five.codes), five.k_max, five.terms) == (32, 100, 3)
    assert (len(six.codes), six.k_max, six.terms) == (64, 448, 3)
    assert all(bin(k).count("1") <= 3 for k in five.codes + six.codes)


@pytest.mark.parametrize("bits", range(1, 7))
def test_every_code_is_a_sum_of_its_terms(bits: int) -> None:
    ls = level_set(bits)
    assert len(set(ls.codes)) == 2**bits  # the 2^B sums are distinct
    codes = torch.tensor([-k for k in ls.codes] + list(ls.codes))
    signs, exps = terms_of_codes(codes, ls)
    assert signs.shape == (ls.terms, len(codes))
    assert torch.equal(codes_of_terms(signs, exps), codes)
    assert bool((signs.abs() <= 1).all()) and bool((signs * codes.sign() >= 0).all())  # terms share the sign


def test_codes_outside_the_set_are_refused() -> None:
    with pytest.raises(PreconditionError, match="outside the 3-bit APoT set"):
        terms_of_codes(torch.tensor([5]), level_set(3))  # 5 = 4 + 1 takes two powers of one term


def test_weights_are_sign_and_magnitude_and_two_bits_is_ternary() -> None:
    assert weight_level_set(2).codes == (0, 1)
    assert weight_level_set(3).codes == EXPECTED[2]
    assert code_type(weight_level_set(2)).bits == 2 and code_type(weight_level_set(4)).bits == 5
    for bad in (1, 8):
        with pytest.raises(PreconditionError, match="2..7 bits"):
            weight_level_set(bad)


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_projection_picks_the_nearest_level(bits: int) -> None:
    ls = level_set(bits)
    v = torch.linspace(-1, 1, 2001, dtype=torch.float64)
    got = nearest_code(v, ls).double() / ls.k_max
    levels = torch.tensor(sorted({-k for k in ls.codes} | set(ls.codes)), dtype=torch.float64) / ls.k_max
    distance = (v[:, None] - levels[None, :]).abs()
    assert torch.allclose((v - got).abs(), distance.min(dim=1).values)


def test_alpha_gradient_is_the_stated_formula() -> None:
    ls = level_set(3)
    w = torch.tensor([-2.5, -1.1, -0.7, -0.31, 0.0, 0.05, 0.42, 0.9, 1.3, 3.0], dtype=torch.float64)
    alpha = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
    upstream = torch.linspace(0.5, 1.5, len(w), dtype=torch.float64)
    (apot_quantize(w, alpha, ls) * upstream).sum().backward()
    v = w / 1.2
    proj = nearest_code(v.clamp(-1, 1), ls).double() / ls.k_max
    expected = torch.where(v.abs() > 1, torch.sign(v), proj - v)
    assert alpha.grad is not None
    assert torch.allclose(alpha.grad, (expected * upstream).sum())


def test_weight_gradient_is_straight_through_inside_the_clip() -> None:
    w = torch.tensor([-2.0, -0.5, 0.3, 0.99, 1.5], requires_grad=True)
    apot_quantize(w, torch.tensor(1.0), level_set(2)).sum().backward()
    assert w.grad is not None and w.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_quantizer_normalizes_weights_and_deploys_scale_times_code() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3) * 0.2 + 0.05
    q = APoTWeightQuant(4, w, center=True)
    out = q(w)
    k, s = q.codes(w), q.scale(w)
    assert s.shape == (6,) and torch.allclose(s, w.std(dim=(1, 2, 3)) * q.alpha.detach() / 10)
    assert torch.allclose(out, s.view(-1, 1, 1, 1) * k.float(), atol=1e-6)  # what the integer graph uses
    assert set(k.abs().unique().tolist()) <= set(level_set(3).codes)
    shift = torch.arange(6.0).view(-1, 1, 1, 1)
    assert torch.allclose(q(w + shift), out, atol=1e-5)  # centered: each channel's mean is removed
    assert torch.allclose(q(2.0 * w), 2.0 * out, atol=1e-5)  # std folds into the scale
    centered = w - w.mean(dim=(1, 2, 3), keepdim=True)
    assert float((out.detach() - centered).pow(2).mean()) < 0.1 * float(w.var())  # the init alpha fits


def test_per_layer_normalization_and_the_default_keeps_the_mean() -> None:
    torch.manual_seed(1)
    w = torch.randn(4, 8) + 0.5
    per_layer = APoTWeightQuant(5, w, per_channel=False)
    s = per_layer.scale(w)
    assert torch.allclose(s, s[0].expand(4)) and torch.allclose(s[0], w.std() * per_layer.alpha.detach() / 48)
    uncentered = APoTWeightQuant(5, w)
    assert not uncentered.center
    assert torch.allclose(uncentered(w), uncentered.scale(w)[:, None] * uncentered.codes(w).float(), atol=1e-6)
    with torch.no_grad():
        centered = APoTWeightQuant(5, w, center=True)
        assert float((uncentered(w) - w).abs().mean()) < float((centered(w) - w).abs().mean())
    zero = torch.zeros(3, 5)
    assert torch.equal(APoTWeightQuant(3, zero)(zero), zero) and bool((APoTWeightQuant(3, zero).scale(zero) > 0).all())


def test_alpha_is_a_range_parameter_and_bits_are_checked() -> None:
    layer = torch.nn.Conv2d(2, 2, 3)
    q = APoTWeightQuant(3, layer.weight.detach())
    holder = torch.nn.ModuleDict({"conv": layer, "q": q})
    groups = parameter_groups(holder)
    assert any(p is q.alpha for p in groups["ranges"]) and not any(p is q.alpha for p in groups["weights"])
    q.bits = 5
    assert q.level_set.k_max == 48 and q.itype.bits == 7
    with pytest.raises(PreconditionError, match="2..7 bits"):
        q.bits = 8
