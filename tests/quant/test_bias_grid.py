"""The simulated bias sits on the int32 accumulator grid, so the quant graph computes the integer graph."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import MODELS, compile_model, make_model
from torch import nn

from qcompile.ir import intops as ops
from qcompile.ir.meta import get_info
from qcompile.quant import graph
from qcompile.quant.bayesian_bits import BayesianBitsActQuant
from qcompile.quant.modules import ActQuant, QLinear, grid_bias


def _output_steps(cm: object, x: torch.Tensor) -> torch.Tensor:
    """|simulation - integer graph| in output quantization steps."""
    gm = cm.integer_graph  # type: ignore[attr-defined]
    scale = get_info(next(n for n in gm.graph.nodes if n.op == "output").args[0]).scale
    with torch.no_grad():
        return (cm.quant_graph.eval()(x) - cm(x)).abs() / scale  # type: ignore[attr-defined]


@pytest.mark.parametrize("target", ["ort", "integer"])
@pytest.mark.parametrize("policy", ["w2a2", "w3a3", "w4a4", "w8a8"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_simulation_equals_the_integer_graph_at_every_width(name: str, policy: str, target: str) -> None:
    cm = compile_model(make_model(name), policy, target=target)
    assert cm.target.value == target
    x = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    assert float(_output_steps(cm, x).max()) == 0.0


def test_a_float_bias_would_miss_the_integer_graph_by_whole_steps() -> None:
    """The check above can fail: without the bound input scale the biases are off the int32 grid."""
    cm = compile_model(make_model("residual"), "w2a2")
    for _, layer in graph.layers(cm.quant_graph):
        layer.input_scale = None
    x = torch.randn(256, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    assert float(_output_steps(cm, x).max()) >= 2.0


def test_simulated_bias_is_the_lowered_int32_bias() -> None:
    cm = compile_model(make_model("mlp"), "w3a3")
    lowered = {get_info(n).layer: cm.integer_graph.get_submodule(str(n.target))
               for n in cm.integer_graph.graph.nodes if n.op == "call_module"
               and isinstance(cm.integer_graph.get_submodule(str(n.target)), (ops.IntLinear, ops.IntConv2d))}
    for node, layer in graph.layers(cm.quant_graph):
        s_x = layer.input_scale() if layer.input_scale is not None else None
        assert s_x is not None
        step = s_x.double() * layer.weight_quant.scale(layer.weight).double()
        b = grid_bias(layer)
        assert b is not None
        q_b = b.detach().double() / step
        assert torch.equal(q_b.round(), lowered[str(node.target)].bias.double())
        assert torch.allclose(q_b, q_b.round(), rtol=1e-6, atol=1e-6)  # on the grid up to float32 storage


def test_bias_rounding_passes_the_gradient_straight_through() -> None:
    layer = QLinear.from_float(nn.Linear(4, 3), bits=2)
    aq = ActQuant(2)
    aq.amax.fill_(3.0)
    aq.batches.fill_(1)
    layer.input_scale = aq.fixed_scale
    x = torch.rand(5, 4)
    layer(x).sum().backward()
    assert layer.bias.grad is not None
    assert torch.equal(layer.bias.grad, torch.full((3,), 5.0))
    with torch.no_grad():
        assert not torch.equal(grid_bias(layer), layer.bias)  # type: ignore[arg-type]


def test_bias_stays_float_while_the_input_grid_is_not_fixed() -> None:
    aq = ActQuant(4)
    assert aq.fixed_scale() is None  # uncalibrated: activations pass through as floats
    aq.amax.fill_(2.0)
    aq.batches.fill_(1)
    aq.observing = True
    assert aq.fixed_scale() is None
    aq.observing = False
    assert float(aq.fixed_scale()) == pytest.approx(2.0 / 15)  # type: ignore[arg-type]
    bb = BayesianBitsActQuant(8)
    bb.amax.fill_(2.0)
    bb.batches.fill_(1)
    bb.start()
    assert bb.fixed_scale() is None  # gated: the grid is sampled per step
    assert bb.finalize().fixed_scale() is not None


def test_binding_follows_a_deep_copy() -> None:
    cm = compile_model(make_model("mlp"), "w4a4")
    twin = copy.deepcopy(cm.quant_graph)
    for (_, layer), (_, copied) in zip(graph.layers(cm.quant_graph), graph.layers(twin), strict=True):
        assert layer.input_scale is not None and copied.input_scale is not None
        owner = copied.input_scale.__self__  # type: ignore[attr-defined]
        assert owner is not layer.input_scale.__self__  # type: ignore[attr-defined]
        assert any(owner is q for _, q in graph.act_quants(twin))
