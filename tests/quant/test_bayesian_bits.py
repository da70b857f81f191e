"""Bayesian Bits quantizer math: nested scales, residual decomposition, gates, regularizer, pruning."""

from __future__ import annotations

import math

import pytest
import torch

from qcompile.quant.bayesian_bits import (
    BIT_WIDTHS,
    THRESHOLD,
    BayesianBitsActQuant,
    BayesianBitsWeightQuant,
    GatedQuantizer,
    RangeWeightQuant,
    deterministic_gate,
    gate_probability,
    grid_scale,
    quantize_on_grid,
    residual_decomposition,
    sample_gate,
)


def test_scales_nest() -> None:
    r = torch.tensor(1.7, dtype=torch.float64)
    s = {b: grid_scale(r, b, signed=False) for b in BIT_WIDTHS}
    assert float(s[2]) == pytest.approx(1.7 / 3, rel=1e-15)
    for lo, hi, ratio in [(2, 4, 5), (4, 8, 17), (8, 16, 257), (16, 32, 65537)]:
        assert float(s[hi] / s[lo]) == pytest.approx(1 / ratio, rel=1e-12)
    assert float(grid_scale(r, 4, signed=True)) == pytest.approx(2 * 1.7 / 15, rel=1e-15)


@pytest.mark.parametrize("signed", [False, True])
def test_residuals_match_the_recursive_definition_and_land_on_each_grid(signed: bool) -> None:
    x_max = torch.tensor(1.3, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(20_000, generator=g, dtype=torch.float64) * 2 - 1 if signed else
         torch.rand(20_000, generator=g, dtype=torch.float64)) * 0.999 * x_max
    parts = residual_decomposition(x, x_max, signed)
    # the recursive definition of ALGORITHMS.md: e_b = s_b round((x - x2 - ... - e_{b/2}) / s_b)
    acc = grid_scale(x_max, 2, signed) * torch.round(x / grid_scale(x_max, 2, signed))
    assert torch.equal(parts[0], acc) or torch.allclose(parts[0], acc, rtol=0, atol=1e-15)
    for b, e in zip(BIT_WIDTHS[1:4], parts[1:4], strict=True):
        s = grid_scale(x_max, b, signed)
        recursive = s * torch.round((x - acc) / s)
        assert torch.allclose(e, recursive, rtol=0, atol=1e-12)
        acc = acc + recursive
        direct = s * torch.round(x / s)
        assert torch.allclose(acc, direct, rtol=0, atol=1e-12), f"x2 + ... + e{b} is not the direct {b}-bit rounding"


def test_four_bit_sum_equals_direct_rounding_exactly_in_float32() -> None:
    x_max = torch.tensor(0.8)
    x = torch.linspace(-0.8, 0.8, 4001)
    x2, e4 = residual_decomposition(x, x_max, True)[:2]
    assert torch.equal(x2 + e4, quantize_on_grid(x, x_max, 4, True))
    q = torch.round((x2 + e4) / grid_scale(x_max, 4, True))
    assert q.min() == -7 and q.max() == 7  # clipped values stay on the narrow signed range


def test_gate_probability_formula_and_sampling_agree() -> None:
    log_alpha = torch.tensor([-3.0, -0.935, 0.0, 2.0])
    expected = torch.sigmoid(log_alpha + 1.5986)
    assert torch.allclose(gate_probability(log_alpha), expected, atol=1e-4)
    torch.manual_seed(0)
    draws = torch.stack([sample_gate(log_alpha) for _ in range(40_000)])
    assert ((draws >= 0) & (draws <= 1)).all()
    assert torch.allclose((draws != 0).float().mean(0), expected, atol=0.01)
    assert float(1 - gate_probability(torch.tensor(THRESHOLD))) == pytest.approx(0.34, abs=0.005)


def test_threshold_decides_the_deterministic_gates() -> None:
    assert deterministic_gate(torch.tensor([-0.936, -0.934, 6.0])).tolist() == [0.0, 1.0, 1.0]
    q = GatedQuantizer(1.0, signed=True)
    with torch.no_grad():
        q.log_alpha.copy_(torch.tensor([6.0, -0.94, 6.0, 6.0]))  # z8 OFF stops the chain at 4 bits
    assert q.bits == 4


def test_regularizer_gradient_pushes_every_gate_towards_off() -> None:
    q = GatedQuantizer(1.0, signed=True, channels=5)
    q.expected_cost().backward()
    assert q.log_alpha.grad is not None and q.prune_log_alpha is not None and q.prune_log_alpha.grad is not None
    assert (q.log_alpha.grad > 0).all() and (q.prune_log_alpha.grad > 0).all()
    before = q.log_alpha.detach().clone()
    torch.optim.SGD([q.log_alpha, q.prune_log_alpha], lr=10.0).step()
    assert (q.log_alpha < before).all()


def test_expected_cost_counts_bits_times_chain_probabilities() -> None:
    q = GatedQuantizer(1.0, signed=False)
    with torch.no_grad():
        q.log_alpha.copy_(torch.tensor([50.0, 50.0, -50.0, -50.0]))  # 4 and 8 surely on, 16 and 32 off
    assert float(q.expected_cost().detach()) == pytest.approx(2 + 4 + 8, abs=1e-6)


def test_eval_mode_quantizes_on_the_chosen_grid_and_prunes_channels() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3)
    q = BayesianBitsWeightQuant(w, prune=True)
    q.bits = 4
    assert q.gated.prune_log_alpha is not None
    with torch.no_grad():
        q.gated.prune_log_alpha[[1, 4]] = -3.0
    q.eval()
    out = q(w)
    x_max = w.abs().max()
    expected = quantize_on_grid(w, x_max + 1e-12, 4, True)
    keep = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    assert torch.allclose(out[keep], expected[keep], atol=1e-6)
    assert (out[~keep] == 0).all()
    bias = torch.ones(6)
    assert torch.equal(q.quant_bias(bias), keep.float())
    levels = torch.round(out[keep] / q.scale(w)[0])
    assert levels.abs().max() <= 7 and torch.allclose(out[keep], levels * q.scale(w)[0], atol=1e-6)


def test_training_mode_samples_gates_and_skips_closed_residuals() -> None:
    torch.manual_seed(0)
    q = GatedQuantizer(1.0, signed=False)
    q.init_gates(6.0)
    x = torch.rand(1000)
    q.train()
    out = q(x)
    assert torch.allclose(out, quantize_on_grid(x, torch.tensor(1.0), 8, False), atol=1e-6)  # z4 = z8 = 1, z16 = 0
    with torch.no_grad():
        q.log_alpha[0] = -20.0  # z4 always 0: the 2-bit grid only
    assert torch.allclose(q(x), quantize_on_grid(x, torch.tensor(1.0), 2, False), atol=1e-6)


def test_forcing_bits_is_a_no_op_when_already_there() -> None:
    q = GatedQuantizer(1.0, signed=True)
    with torch.no_grad():
        q.log_alpha.copy_(torch.tensor([3.0, 1.0, -2.0, -2.0]))
    before = q.log_alpha.detach().clone()
    q.force_bits(8)
    assert torch.equal(q.log_alpha.detach(), before)
    q.force_bits(2)
    assert q.bits == 2
    with pytest.raises(ValueError, match="widths"):
        q.force_bits(3)


def test_activation_quantizer_starts_from_its_calibration_and_finalizes_to_the_same_grid() -> None:
    aq = BayesianBitsActQuant(8)
    aq.observing = True
    aq(torch.rand(64) * 3.0)
    aq.observing = False
    aq.start()
    assert aq.gated is not None and not aq.gated.signed
    assert float(aq.gated.x_max) == pytest.approx(float(aq.amax))
    aq.bits = 4
    aq.eval()
    x = torch.rand(500) * 3.5
    plain = aq.finalize()
    assert plain.bits == 4 and not plain.signed
    assert torch.allclose(plain(x), aq(x), atol=1e-6)


def test_range_weight_quant_follows_channel_selection() -> None:
    q = RangeWeightQuant(2, 0.5, torch.tensor([1.0, 0.0, 1.0]))
    w = torch.tensor([[0.3, -0.1], [0.9, 0.9], [-0.6, 0.0]])
    out = q(w)
    assert torch.allclose(out, torch.tensor([[1 / 3, 0.0], [0.0, 0.0], [-1 / 3, 0.0]]), atol=1e-6)  # ternary, s = 1/3
    q.select_channels(torch.tensor([True, False, True]))
    assert q.mask.tolist() == [1.0, 1.0]
    assert math.isclose(float(q.scale(w[:2])[0]), 1 / 3, rel_tol=1e-6)


def test_range_weight_quant_per_channel_clip_learns_each_channel() -> None:
    q = RangeWeightQuant(2, torch.tensor([0.5, 1.5]), torch.ones(2))
    w = torch.tensor([[0.3, -0.1], [0.9, -2.0]])
    assert torch.allclose(q(w), torch.tensor([[1 / 3, 0.0], [1.0, -1.0]]), atol=1e-6)  # steps 1/3 and 1
    assert torch.allclose(q.scale(w), torch.tensor([1 / 3, 1.0]), atol=1e-6)
    q(w * 1.0).sum().backward()
    assert q.x_max.grad is not None and q.x_max.grad.shape == (2,) and bool((q.x_max.grad != 0).all())
    q.select_channels(torch.tensor([False, True]))
    assert q.x_max.shape == (1,) and math.isclose(float(q.x_max), 1.5)
    with pytest.raises(ValueError, match="one value per channel"):
        RangeWeightQuant(2, torch.ones(3), torch.ones(2))


def _composed(q: GatedQuantizer, x: torch.Tensor) -> torch.Tensor:
    """The definition, composed from the residual decomposition with autograd (the spec GatedGrid follows)."""
    x_max = q.x_max.abs() + 1e-12
    parts = residual_decomposition(q.clip(x), x_max, q.signed)
    gates = q._gates(q.log_alpha)
    out = torch.zeros_like(x)
    for i in range(len(gates) - 1, -1, -1):
        out = gates[i] * (parts[i + 1] + out)
    out = parts[0] + out
    z2 = q.channel_gates()
    return out if z2 is None else out * z2.view(-1, *[1] * (x.dim() - 1))


@pytest.mark.parametrize("signed,channels,log_alpha", [(False, 0, [0.5, 0.3, 0.2, -0.1]), (True, 0, [2.0, 0.1, 6, 6]),
                                                       (True, 6, [0.4, 0.2, -6, -6]), (True, 6, [-6, 6, 6, 6])])
def test_the_fused_quantizer_has_the_values_and_gradients_of_the_composed_definition(
        signed: bool, channels: int, log_alpha: list[float]) -> None:
    g = torch.Generator().manual_seed(3)
    shape = (6, 5, 3, 3) if channels else (8, 4, 7, 7)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * (1.0 if signed else 0.0) + \
        (0.0 if signed else torch.rand(shape, generator=g, dtype=torch.float64) * 1.5)
    results = []
    for forward in (lambda q, v: q(v), _composed):
        q = GatedQuantizer(1.1, signed, channels).double().train()
        with torch.no_grad():
            q.log_alpha.copy_(torch.tensor(log_alpha))
            if q.prune_log_alpha is not None:
                q.prune_log_alpha.copy_(torch.linspace(-1, 1, channels))
        xin = x.clone().requires_grad_()
        torch.manual_seed(11)  # the same gate samples for both
        y = forward(q, xin)
        (y * torch.linspace(-1, 2, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        grads = [xin.grad, q.x_max.grad, q.log_alpha.grad]
        results.append((y.detach(), [gr if gr is not None else torch.zeros(1, dtype=torch.float64) for gr in grads],
                        q.prune_log_alpha.grad if q.prune_log_alpha is not None else None))
    (y_fused, g_fused, p_fused), (y_ref, g_ref, p_ref) = results
    assert torch.allclose(y_fused, y_ref, atol=1e-12)
    for a, b in zip(g_fused, g_ref, strict=True):
        assert torch.allclose(a, b.expand_as(a) if b.numel() == 1 else b, atol=1e-9), (a, b)
    assert (p_fused is None) == (p_ref is None)
    if p_fused is not None and p_ref is not None:
        assert torch.allclose(p_fused, p_ref, atol=1e-9)
