"""BSQ bit-plane weights: exact float <-> planes <-> integer round trips, re-quantization, regularizer."""

from __future__ import annotations

import pytest
import torch

from qcompile.quant.bsq import BitPlaneWeight, bsq_regularizer, compression


def _codes_with_full_range(shape: tuple[int, ...], n: int, seed: int) -> torch.Tensor:
    """Random signed codes in [-(2^N-1), 2^N-1] where one entry is the full-range magnitude."""
    g = torch.Generator().manual_seed(seed)
    d = 2**n - 1
    q = torch.randint(-d, d + 1, shape, generator=g)
    q.view(-1)[0] = d
    return q


def _assert_exact_planes(layer: BitPlaneWeight) -> None:
    for planes in (layer.pos, layer.neg):
        assert bool(((planes == 0) | (planes == 1)).all())
    assert not bool((layer.pos * layer.neg).any())


def _values(layer: BitPlaneWeight) -> torch.Tensor:
    with torch.no_grad():
        return layer()


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("n", [1, 3, 8])
def test_on_grid_weight_is_reproduced_exactly(n: int) -> None:
    q = _codes_with_full_range((4, 3, 3, 3), n, seed=n)
    w = q.float() * 2.0**-7  # a power-of-two step keeps s = max|W| and s / (2^N - 1) exact in float32
    layer = BitPlaneWeight(w, bits=n)
    assert layer.precision == n and layer.pos.shape == (n, 4, 3, 3, 3)
    _assert_exact_planes(layer)
    assert torch.equal(_values(layer), w)


def test_arbitrary_weight_is_rounded_to_the_grid() -> None:
    w = torch.randn(8, 5)
    layer = BitPlaneWeight(w, bits=6)
    s, d = float(w.abs().max()), 2**6 - 1
    codes = torch.round(w / s * d)
    assert layer.s.item() == s
    assert torch.equal(layer.integer_weights()[0], codes.long())
    torch.testing.assert_close(_values(layer), s * codes / d, rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("n", [2, 5, 8])
def test_integer_weights_reproduce_forward_and_fit_the_type(n: int) -> None:
    w = torch.randn(6, 7) * 0.3
    layer = BitPlaneWeight(w, bits=n)
    q, scale, bits = layer.integer_weights()
    assert q.dtype == torch.int64 and bits == n + 1 and layer.itype.bits == bits
    t = layer.itype
    assert t.lo <= int(q.min()) and int(q.max()) <= t.hi
    assert int(q.abs().max()) == t.hi  # s = max|W|: the type is used to its full range
    assert torch.equal(scale * q.float(), _values(layer))


def test_from_integer_weights_inverts_integer_weights() -> None:
    q = _codes_with_full_range((3, 4), 5, seed=1)
    layer = BitPlaneWeight.from_integer_weights(q, 0.125, bits=6)
    assert layer.precision == 5
    q2, scale, bits = layer.integer_weights()
    assert torch.equal(q2, q) and scale == 0.125 and bits == 6
    with pytest.raises(ValueError):
        BitPlaneWeight.from_integer_weights(q * 3, 0.125, bits=6)


def test_zero_weight_is_all_zero_planes() -> None:
    layer = BitPlaneWeight(torch.zeros(3, 3), bits=4)
    assert layer.s.item() == 1.0 and not bool(layer.pos.any()) and not bool(layer.neg.any())
    assert layer.requantize_() and layer.precision == 1
    assert torch.equal(_values(layer), torch.zeros(3, 3))


# ------------------------------------------------------------------------------------------ re-quantization


def _requantize_and_check(layer: BitPlaneWeight) -> tuple[bool, int]:
    """Requantize; the represented values and the integer codes must be unchanged (codes up to 2^k)."""
    before = _values(layer)
    q0, scale0, _ = layer.integer_weights()
    changed = layer.requantize_()
    _assert_exact_planes(layer)
    q1, scale1, _ = layer.integer_weights()
    ratio = round(scale1 / scale0)
    assert ratio >= 1 and ratio & (ratio - 1) == 0
    assert scale1 / scale0 == pytest.approx(ratio, rel=1e-6)
    assert torch.equal(q1 * ratio, q0)
    torch.testing.assert_close(_values(layer), before, rtol=1e-6, atol=0.0)
    return changed, ratio


def test_requantize_keeps_full_range_random_weights() -> None:
    layer = BitPlaneWeight(torch.randn(16, 8, 3, 3), bits=8)
    s0 = layer.s.item()
    changed, ratio = _requantize_and_check(layer)
    assert not changed and ratio == 1 and layer.precision == 8 and layer.s.item() == s0


def test_requantize_drops_two_msb_planes() -> None:
    q = _codes_with_full_range((5, 6), 6, seed=2)  # all |q| < 2^6 = 2^(N-2) at N = 8
    layer = BitPlaneWeight.from_integer_weights(q, 0.01, bits=9)
    s0 = layer.s.item()
    changed, ratio = _requantize_and_check(layer)
    assert changed and ratio == 1 and layer.precision == 6
    assert layer.s.item() == pytest.approx(s0 * (2**6 - 1) / (2**8 - 1), rel=1e-6)


def test_requantize_drops_an_lsb_plane() -> None:
    q = _codes_with_full_range((5, 6), 7, seed=3) * 2  # all even, max 254 at N = 8
    layer = BitPlaneWeight.from_integer_weights(q, 0.01, bits=9)
    s0 = layer.s.item()
    changed, ratio = _requantize_and_check(layer)
    assert changed and ratio == 2 and layer.precision == 7
    assert layer.s.item() == pytest.approx(s0 * (2**8 - 2) / (2**8 - 1), rel=1e-6)


def test_requantize_drops_msb_and_lsb_planes() -> None:
    q = _codes_with_full_range((4, 4, 3), 4, seed=4) * 4  # |q| <= 60 < 2^6, multiples of 4, at N = 8
    layer = BitPlaneWeight.from_integer_weights(q, 0.02, bits=9)
    s0 = layer.s.item()
    changed, ratio = _requantize_and_check(layer)
    assert changed and ratio == 4 and layer.precision == 4
    assert layer.s.item() == pytest.approx(s0 * 4 * (2**4 - 1) / (2**8 - 1), rel=1e-6)


def test_requantize_snaps_drifted_planes_to_the_forward_values() -> None:
    layer = BitPlaneWeight(torch.randn(8, 8), bits=8)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # drift of the LSB planes only: codes move by less than 0.4 * 7 < 3
        layer.pos[5:] += torch.rand(layer.pos[5:].shape, generator=g) * 0.4
        layer.neg[5:] += torch.rand(layer.neg[5:].shape, generator=g) * 0.4
    layer.clamp_()
    changed, _ = _requantize_and_check(layer)
    assert not changed and layer.precision == 8


def test_overflow_carries_into_a_new_msb_below_max_bits() -> None:
    q = torch.tensor([[15, -3], [7, -15]])
    layer = BitPlaneWeight.from_integer_weights(q, 0.5, bits=5)  # N = 4, step 0.5
    with torch.no_grad():
        layer.pos[0, 0, 0] = 2.0  # MSB of the value 15 overflows: 15 + 8 = 23
        layer.neg[0, 1, 1] = 1.75  # -15 - 0.75 * 8 = -21
    assert torch.equal(_values(layer), 0.5 * torch.tensor([[15.0, -3.0], [7.0, -15.0]]))  # forward clips
    assert layer.requantize_()
    _assert_exact_planes(layer)
    q1, scale, bits = layer.integer_weights()
    assert layer.precision == 5 and bits == 6 and scale == 0.5  # the step is unchanged by a carry
    assert torch.equal(q1, torch.tensor([[23, -3], [7, -21]]))  # overflowed values kept, unclipped
    assert layer.s.item() == 0.5 * 31


def test_overflow_saturates_at_max_bits() -> None:
    w = torch.randn(4, 4)
    w[0, 0] = w.abs().max() * 1.5  # code 255 at N = 8
    layer = BitPlaneWeight(w, bits=8)
    with torch.no_grad():
        layer.pos[0, 0, 0] = 2.0
    before = _values(layer)
    s0 = layer.s.item()
    assert not layer.requantize_()
    _assert_exact_planes(layer)
    assert layer.precision == 8 and layer.s.item() == s0
    assert layer.integer_weights()[0][0, 0] == 255
    assert torch.equal(_values(layer), before)


def test_requantize_clears_gradients_and_keeps_parameter_identity() -> None:
    q = _codes_with_full_range((3, 3), 3, seed=6)
    layer = BitPlaneWeight.from_integer_weights(q, 0.1, bits=9)
    pos, neg, s = layer.pos, layer.neg, layer.s
    layer().sum().backward()
    assert layer.requantize_()
    assert layer.pos is pos and layer.neg is neg and layer.s is s
    assert layer.pos.grad is None and layer.neg.grad is None and layer.s.grad is None
    assert pos.shape == (3, 3, 3)
    layer().sum().backward()  # the new shapes train
    assert layer.pos.grad is not None and layer.pos.grad.shape == (3, 3, 3)


# ------------------------------------------------------------------------------------------ training pieces


def test_clamp_bounds_bit_variables_only() -> None:
    layer = BitPlaneWeight(torch.randn(4, 4), bits=4)
    with torch.no_grad():
        layer.pos.uniform_(-1.0, 3.0)
        layer.neg.uniform_(-1.0, 3.0)
        layer.s.fill_(5.0)
    layer.clamp_()
    for planes in (layer.pos, layer.neg):
        assert planes.min().item() >= 0.0 and planes.max().item() <= 2.0
        assert bool((planes == 0).any()) and bool((planes == 2).any())
    assert layer.s.item() == 5.0


def test_gradient_flows_through_the_straight_through_estimator() -> None:
    n, d = 4, 15
    layer = BitPlaneWeight(torch.randn(3, 5), bits=n)
    with torch.no_grad():  # a fractional value: the STE must still pass the gradient
        layer.pos[n - 1] += 0.3
    g = torch.randn(3, 5)
    (layer() * g).sum().backward()
    assert layer.pos.grad is not None and layer.neg.grad is not None and layer.s.grad is not None
    q, _, _ = layer.integer_weights()
    s = layer.s.item()
    inside = (layer._wtilde().abs() <= 1).float().detach()
    place = torch.tensor([2.0**b for b in range(n - 1, -1, -1)]).view(-1, 1, 1)
    expected = s * place / d * (g * inside)
    torch.testing.assert_close(layer.pos.grad, expected)
    torch.testing.assert_close(layer.neg.grad, -expected)
    torch.testing.assert_close(layer.s.grad, (g * q / d).sum())


def test_bit_norms() -> None:
    q = torch.tensor([[3, -1], [0, 2]])  # N = 2: MSB plane pos (1,0,0,1) / neg 0; LSB pos (1,0,0,0) / neg (0,1,0,0)
    layer = BitPlaneWeight.from_integer_weights(q, 1.0, bits=3)
    torch.testing.assert_close(layer.bit_norms(), torch.tensor([2.0**0.5, 2.0**0.5]))


def test_regularizer_matches_a_hand_computation() -> None:
    a = BitPlaneWeight.from_integer_weights(torch.tensor([3, -2]), 1.0, bits=3)  # N = 2, P = 2
    b = BitPlaneWeight.from_integer_weights(torch.tensor([4, 0, -1]), 1.0, bits=4)  # N = 3, P = 3
    # a: MSB [1,0 ; 0,1] -> sqrt 2, LSB [1,0 ; 0,0] -> 1.  b: MSB [1,0,0 ; 0,0,0] -> 1, mid 0, LSB [0,0,0 ; 0,0,1] -> 1
    hand = (2 * 2 * (2**0.5 + 1) + 3 * 3 * (1 + 0 + 1)) / 5
    assert bsq_regularizer([a, b], [2, 3]).item() == pytest.approx(hand, rel=1e-6)
    assert bsq_regularizer([a, b]).item() == pytest.approx(hand, rel=1e-6)
    with pytest.raises(ValueError):
        bsq_regularizer([a, b], [2])


def test_regularizer_weighs_larger_and_more_precise_layers_more() -> None:
    small = BitPlaneWeight.from_integer_weights(torch.tensor([1, 1]), 1.0, bits=3)  # P = 2, N = 2
    big = BitPlaneWeight.from_integer_weights(torch.tensor([1, 1, 1, 1]), 1.0, bits=5)  # P = 4, N = 4
    bsq_regularizer([small, big]).backward()
    assert small.pos.grad is not None and big.pos.grad is not None
    # the LSB planes have equal norms per element count; the gradient scales with P_l * N_l / sqrt(P_l)
    g_small = float(small.pos.grad[-1, 0])
    g_big = float(big.pos.grad[-1, 0])
    assert g_small == pytest.approx(2 * 2 / 6 / 2**0.5) and g_big == pytest.approx(4 * 4 / 6 / 2.0)
    assert g_big > g_small
    assert torch.isfinite(big.pos.grad).all() and float(big.pos.grad[0].abs().sum()) == 0.0  # zero planes


def test_compression() -> None:
    a = BitPlaneWeight(torch.randn(10), bits=8)
    b = BitPlaneWeight(torch.randn(30), bits=4)
    assert compression([a, b]) == pytest.approx(32 * 40 / (10 * 8 + 30 * 4))
    assert compression([a]) == pytest.approx(4.0)
