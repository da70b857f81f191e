"""insert-quantizers: Q layers with per-channel weight quantizers, ActQuant after every new-scale value."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from conftest import call_targets, context, make_model, run_pipeline
from torch import nn

from qcompile.ir.meta import Stage, get_stage
from qcompile.passes import PassError
from qcompile.passes.base import PreconditionError
from qcompile.passes.insert_quantizers import InsertQuantizers
from qcompile.quant import graph
from qcompile.quant.apot import APoTWeightQuant
from qcompile.quant.modules import ActQuant, QConv2d, QLinear, WeightQuant

FLOAT = "canonicalize,fold-batchnorm"


def quantize(model: nn.Module, options: str = "") -> fx.GraphModule:
    gm = run_pipeline(model, f"{FLOAT},insert-quantizers{options}")
    assert get_stage(gm) is Stage.QUANT
    return gm


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(F.relu(self.conv(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def test_quantizers_follow_relu_chains() -> None:
    gm = quantize(Chain().eval())
    # Expected: input quantizer; QConv2d -> relu -> clamp -> ActQuant; max pool and flatten keep the scale
    assert call_targets(gm) == [ActQuant, QConv2d, torch.relu, torch.clamp, ActQuant, nn.MaxPool2d, torch.flatten,
                                QLinear, ActQuant]
    first = next(iter(gm.graph.nodes))
    assert [type(gm.get_submodule(u.target)) for u in first.users] == [ActQuant]


def test_residual_add_and_pool_outputs_get_quantizers(residual_model: nn.Module) -> None:
    gm = quantize(residual_model)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is operator.add:
            (relu,) = node.users
            assert relu.target is torch.relu
            assert [type(gm.get_submodule(u.target)) for u in relu.users] == [ActQuant]
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.AdaptiveAvgPool2d):
            assert [type(gm.get_submodule(u.target)) for u in node.users if u.op == "call_module"] == [ActQuant]
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.MaxPool2d):
            assert not any(u.op == "call_module" and isinstance(gm.get_submodule(u.target), ActQuant)
                           for u in node.users)


def test_concatenation_gets_no_quantizer_of_its_own(concat_model: nn.Module) -> None:
    gm = quantize(concat_model)
    (cat,) = [n for n in gm.graph.nodes if n.target is torch.cat]
    assert all(a.op == "call_module" and isinstance(gm.get_submodule(a.target), ActQuant) for a in cat.args[0])
    assert not any(u.op == "call_module" and isinstance(gm.get_submodule(u.target), ActQuant) for u in cat.users)


def test_every_layer_is_quantized_and_keeps_its_weights(any_model: nn.Module) -> None:
    gm = quantize(copy.deepcopy(any_model))
    layer_types = {type(m) for m in gm.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert layer_types <= {QConv2d, QLinear}
    if not any(isinstance(m, nn.BatchNorm2d) for m in any_model.modules()):
        for name, original in any_model.named_modules():
            if isinstance(original, (nn.Conv2d, nn.Linear)):
                q = gm.get_submodule(name)
                assert torch.equal(q.weight, original.weight) and torch.equal(q.bias, original.bias)


@pytest.mark.parametrize(("weights", "acts"), [(8, 8), (4, 6), (2, 3)])
def test_bit_options(weights: int, acts: int) -> None:
    gm = quantize(make_model("residual"), f"{{weights={weights},acts={acts}}}")
    assert {m.weight_quant.bits for m in gm.modules() if isinstance(m, (QConv2d, QLinear))} == {weights}
    assert {m.bits for m in gm.modules() if isinstance(m, ActQuant)} == {acts}


def fake_quant_weights(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Independent per-output-channel symmetric fake quantization: s = max|W_c| / (2^(b-1) - 1)."""
    hi = 2 ** (bits - 1) - 1
    s = w.abs().reshape(w.shape[0], -1).amax(1) / hi
    s = s.view(-1, *[1] * (w.dim() - 1))
    return torch.clamp(torch.round(w / s), -hi, hi) * s


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_uncalibrated_graph_computes_with_fake_quantized_weights(bits: int) -> None:
    model = Chain().eval()
    gm = quantize(copy.deepcopy(model), f"{{weights={bits}}}")
    expected_model = copy.deepcopy(model)
    with torch.no_grad():
        for m in (expected_model.conv, expected_model.fc):
            m.weight.copy_(fake_quant_weights(m.weight, bits))
        x = torch.randn(8, 1, 8, 8)
        # activation quantizers are transparent until calibrated
        torch.testing.assert_close(gm(x), expected_model(x), rtol=1e-5, atol=1e-6)
        n_levels = {len(torch.unique(m.weight_quant(m.weight)[0])) for m in gm.modules() if isinstance(m, QConv2d)}
        assert max(n_levels) <= 2**bits - 1


def test_sixteen_bit_weights_are_close_to_float(any_model: nn.Module) -> None:
    gm = quantize(copy.deepcopy(any_model), "{weights=16}")
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), any_model(x), rtol=1e-3, atol=1e-3)


def test_unknown_scheme_is_refused() -> None:
    with pytest.raises(PassError, match="unknown scheme 'bsq'") as info:
        quantize(make_model("mlp"), "{scheme=bsq}")
    assert isinstance(info.value.__cause__, PreconditionError)


def test_batchnorm_must_be_folded_first(bn_model: nn.Module) -> None:
    ctx = context()
    gm = run_pipeline(bn_model, "canonicalize", ctx)
    with pytest.raises(PreconditionError, match="fold-batchnorm"):
        InsertQuantizers()(gm, ctx)


def test_apot_scheme_keeps_first_and_last_layers_uniform(residual_model: nn.Module) -> None:
    gm = quantize(residual_model, "{scheme=apot,weights=4}")
    quantizers = [layer.weight_quant for _, layer in graph.layers(gm)]
    assert isinstance(quantizers[0], WeightQuant) and isinstance(quantizers[-1], WeightQuant)
    assert quantizers[0].bits == quantizers[-1].bits == 8
    assert all(isinstance(q, APoTWeightQuant) and q.bits == 4 for q in quantizers[1:-1])
    everywhere = quantize(make_model("residual"), "{scheme=apot,weights=2,apot_first_last=true}")
    assert all(isinstance(layer.weight_quant, APoTWeightQuant) for _, layer in graph.layers(everywhere))
    uniform = quantize(make_model("residual"), "{scheme=apot}")  # 8 bits has no APoT set: uniform until a search
    assert all(type(layer.weight_quant) is WeightQuant for _, layer in graph.layers(uniform))
