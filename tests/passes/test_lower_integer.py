"""lower-integer: only integer ops remain, the integer numbers follow the contract, predictions survive."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from conftest import Verifier, compile_model, context, make_model, run_pipeline
from torch import nn

import qcompile
from qcompile.backends.reference import run_reference
from qcompile.ir import intops as ops
from qcompile.ir.meta import Stage, get_info, get_stage
from qcompile.models import train_float
from qcompile.passes import PassError
from qcompile.passes.base import PreconditionError
from qcompile.passes.lower_integer import LowerInteger
from qcompile.quant.modules import ActQuant, QConv2d, QLinear

PREPARED = "canonicalize,fold-batchnorm,insert-quantizers,calibrate,assign-bitwidths{policy=%s},share-scales"


def lowered(model: nn.Module, policy: str = "w8a8") -> tuple[fx.GraphModule, fx.GraphModule]:
    """(quant graph, integer graph) of ``model``."""
    ctx = context()
    quant = run_pipeline(model, PREPARED % policy, ctx)
    result = LowerInteger()(quant, ctx)
    assert result.modified
    return quant, result.gm


def test_only_integer_ops_remain(any_model: nn.Module, verified: Verifier) -> None:
    _, gm = lowered(any_model)
    assert get_stage(verified(gm)) is Stage.INTEGER
    for node in gm.graph.nodes:
        if node.op == "call_module":
            assert type(gm.get_submodule(node.target)) in ops.INTEGER_MODULES
        elif node.op == "call_function":
            assert node.target in ops.INTEGER_FUNCTIONS
        else:
            assert node.op in ("placeholder", "output")
        if node.op not in ("placeholder", "output"):
            info = get_info(node)
            assert info.itype is not None and info.scale is not None and info.scale > 0
    # float only at the boundary: one Quantize per input, one Dequantize per output
    (ph,) = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert [type(gm.get_submodule(u.target)) for u in ph.users] == [ops.Quantize]
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    assert isinstance(gm.get_submodule(out.args[0].target), ops.Dequantize)


class ConvReluLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.conv(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_structure_with_folded_relu6() -> None:
    quant, gm = lowered(ConvReluLinear().eval())
    targets = [type(gm.get_submodule(n.target)) if n.op == "call_module" else n.target
               for n in gm.graph.nodes if n.op in ("call_module", "call_function")]
    assert targets == [ops.Quantize, ops.IntConv2d, ops.IntAvgPool2d, torch.flatten, ops.IntLinear, ops.Dequantize]
    conv = next(m for m in gm.modules() if isinstance(m, ops.IntConv2d))
    conv_quant = next(quant.get_submodule(n.target) for n in quant.graph.nodes
                      if n.op == "call_module" and n.args[0].target is torch.clamp)
    # ReLU6 folds into the clamp bounds: [0, min(hi, round(6 / s_y))]
    assert conv.lo == 0
    assert conv.hi == min(conv.out.hi, round(6.0 / float(conv_quant.scale)))
    assert not conv.out.signed


def test_unfoldable_relu_becomes_int_clamp() -> None:
    class PoolThenRelu(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3, padding=1)
            self.fc = nn.Linear(48, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(F.relu(F.max_pool2d(self.conv(x), 2)), 1))

    _, gm = lowered(PoolThenRelu().eval())
    clamps = [m for m in gm.modules() if isinstance(m, ops.IntClamp)]
    assert len(clamps) == 1 and clamps[0].lo == 0 and clamps[0].inp.signed
    assert any(isinstance(m, ops.IntMaxPool2d) for m in gm.modules())


def test_linear_integers_follow_the_contract() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 5)).eval()
    quant, gm = lowered(model, "w4a8")
    q_in, q_out = [quant.get_submodule(n.target) for n in quant.graph.nodes
                   if n.op == "call_module" and isinstance(quant.get_submodule(n.target), ActQuant)]
    layer = next(m for m in quant.modules() if isinstance(m, QLinear))
    op = next(m for m in gm.modules() if isinstance(m, ops.IntLinear))
    s_x, s_y = float(q_in.scale), float(q_out.scale)
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    s_w = (layer.weight.detach().abs().amax(1) / 7).double()  # 4-bit narrow range, float32 as simulated
    assert torch.equal(op.weight.long(), torch.round(w / s_w[:, None]).long())
    assert torch.equal(op.bias, torch.round(b / (s_x * s_w)).long())
    assert (op.w_type.bits, op.inp.bits, op.out.bits) == (4, 8, 8)
    for c in range(5):
        m, n = int(op.mult[c]), int(op.shift[c])
        real = s_x * float(s_w[c]) / s_y
        assert 2**30 <= m < 2**31
        assert abs(m / 2**n - real) <= real * 2**-31


def test_integer_graph_tracks_the_simulation(any_model: nn.Module) -> None:
    quant, gm = lowered(any_model)
    x = torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        sim = quant.eval()(x)
        integer = gm(x)
    out_scale = get_info(next(n for n in gm.graph.nodes if n.op == "output").args[0]).scale
    assert out_scale is not None
    err = (sim - integer).abs() / out_scale  # in output quantization steps
    assert float(err.mean()) < 0.1 and float(err.max()) <= 2
    assert torch.equal(run_reference(gm, x), integer)


def test_uncalibrated_graph_is_refused() -> None:
    with pytest.raises(PassError, match="not calibrated; run calibrate first") as info:
        run_pipeline(make_model("mlp"), "canonicalize,fold-batchnorm,insert-quantizers,lower-integer")
    assert isinstance(info.value.__cause__, PreconditionError)


def test_int32_bias_and_accumulator_bounds(any_model: nn.Module) -> None:
    _, gm = lowered(any_model, "w8a8")
    for m in gm.modules():
        if isinstance(m, (ops.IntConv2d, ops.IntLinear)):
            assert int(m.bias.abs().max()) < 2**31
            fan = m.weight.to(torch.int64).abs().reshape(m.weight.shape[0], -1).sum(1)
            xmax = max(-m.inp.lo, m.inp.hi)
            assert int((fan * xmax + m.bias.abs()).max()) <= 2**31 - 1


# ------------------------------------------------------------------------------------- trained model


class TinyDigits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.c1(x)))
        x = F.relu(self.c2(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.fixture(scope="module")
def digits() -> qcompile.Dataset:
    return qcompile.load_data("digits")


@pytest.fixture(scope="module")
def trained(digits: qcompile.Dataset) -> nn.Module:
    torch.manual_seed(0)
    return train_float(TinyDigits(), digits.x_train, digits.y_train, epochs=15, lr=0.01, seed=0)


@pytest.mark.parametrize("policy", ["w8a8", "w4a8", "aqt"])
def test_trained_model_predictions_match_the_simulation(trained: nn.Module, digits: qcompile.Dataset,
                                                        policy: str) -> None:
    cm = qcompile.compile(trained, digits.x_train[:2], data=digits, policy=policy)
    x, y = digits.x_test, digits.y_test
    with torch.no_grad():
        sim = cm.simulate(x).argmax(1)
        integer = cm(x).argmax(1)
        fl = trained(x).argmax(1)
    agreement = float((sim == integer).double().mean())
    assert agreement >= 0.98, f"integer and simulated predictions agree on only {100 * agreement:.1f} %"
    float_acc = float((fl == y).double().mean())
    assert float_acc > 0.85  # the model did learn something, so agreement is meaningful
    if policy == "w8a8":
        assert float((integer == y).double().mean()) >= float_acc - 0.03
    assert math.isclose(float((run_reference(cm.integer_graph, x[:64]) - cm(x[:64])).abs().max()), 0.0)


def test_compiled_model_reports_integer_layers() -> None:
    cm = compile_model(make_model("residual"), "w4a8")
    costs = cm.layer_costs()
    assert [c.name for c in costs] == ["stem", "conv1", "conv2", "fc"]
    assert [(c.w_bits, c.a_bits) for c in costs] == [(4, 8)] * 4
    # MACs per sample: 8x8 outputs for the convs, 1 row for the linear layer
    assert [c.macs for c in costs] == [4 * 9 * 64, 4 * 4 * 9 * 64, 4 * 4 * 9 * 64, 4 * 3]
    assert np.isclose(sum(c.bops for c in costs), sum(c.macs for c in costs) * 32)


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_apot_layers_lower_to_power_of_two_terms_of_their_codes(bits: int) -> None:
    from qcompile.quant import graph
    from qcompile.quant.apot import APoTWeightQuant

    pipeline = (f"canonicalize,fold-batchnorm,insert-quantizers{{scheme=apot,weights={bits}}},calibrate,share-scales,"
                "lower-integer")
    cm = compile_model(make_model("residual"), pipeline=pipeline)
    assert cm.quant_graph is not None
    layers = {str(n.target): layer for n, layer in graph.layers(cm.quant_graph)}
    shift = {name: m for name, m in cm.integer_graph.named_modules() if isinstance(m, ops.SHIFT_ADD_OPS)}
    assert shift and len(shift) == len(layers) - 2  # first conv and last linear stay uniform
    for name, op in shift.items():
        layer = layers[name]
        q = layer.weight_quant
        assert isinstance(q, APoTWeightQuant) and op.bits == bits
        with torch.no_grad():
            codes, simulated = q.codes(layer.weight), q(layer.weight)
        assert torch.equal(op.weight.to(torch.int64), codes)  # the terms add up to the quantizer's codes
        scale = q.scale(layer.weight).view(-1, *[1] * (codes.dim() - 1))
        torch.testing.assert_close(scale * codes.float(), simulated, rtol=1e-5, atol=1e-7)
        assert int(op.term_sign.ne(0).sum(dim=0).max()) <= q.terms
    x = torch.randn(16, 1, 8, 8)
    assert torch.equal(cm(x), cm.reference(x)) and cm.verify(x).mismatches == 0


# ------------------------------------------------ constants the integer form cannot hold are refused


def prepared(model: nn.Module) -> tuple[fx.GraphModule, Any]:
    ctx = context()
    return run_pipeline(model, PREPARED % "w8a8", ctx), ctx


def quant_layer(gm: fx.GraphModule, cls: type) -> Any:
    return next(m for m in gm.modules() if isinstance(m, cls))


def out_quant(gm: fx.GraphModule) -> ActQuant:
    (out,) = [n for n in gm.graph.nodes if n.op == "output"]
    return gm.get_submodule(out.args[0].target)


@pytest.mark.parametrize(("mutate", "why"), [
    # a bias far beyond the output range: the weight scale that would hold it in int32 (quant.modules'
    # bias floor) makes the multiplier unrepresentable (negligible weights with a sane bias now compile:
    # tests/quant/test_bias_floor.py)
    (lambda gm: quant_layer(gm, QConv2d).bias.data.fill_(1e30), "layer 'conv': requantization multiplier .* too large"),
    (lambda gm: quant_layer(gm, QLinear).bias.data.fill_(float("nan")), "layer 'fc': bias values contain"),
    (lambda gm: quant_layer(gm, QLinear).weight.data.fill_(float("inf")), "layer 'fc': weights contain NaN"),
    (lambda gm: out_quant(gm).amax.fill_(1e-30), "layer 'fc': requantization multiplier .* too large"),
    (lambda gm: out_quant(gm).amax.fill_(1e30), "layer 'fc': requantization multiplier .* too small"),
])
def test_unrepresentable_constants_are_refused_naming_the_layer(mutate: Any, why: str) -> None:
    quant, ctx = prepared(ConvReluLinear().eval())
    with torch.no_grad():
        mutate(quant)
    with pytest.raises(PreconditionError, match=why):
        LowerInteger()(quant, ctx)


def test_tiny_weights_without_bias_are_refused_by_their_multiplier() -> None:
    model = ConvReluLinear().eval()
    model.fc.bias = None
    quant, ctx = prepared(model)
    with torch.no_grad():
        quant_layer(quant, QLinear).weight.data.mul_(1e-30)
    with pytest.raises(PreconditionError, match="layer 'fc': requantization multiplier .* too small"):
        LowerInteger()(quant, ctx)
