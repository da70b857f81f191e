"""A bias out of proportion to its accumulator grid (activations collapsed to ~1e-8, as in a randomly
initialised torchvision GoogLeNet, whose fc input is ~2e-11): the uniform weight quantizer raises that layer's
weight scale to |b| / (s_x * 2^30), so q_b fits int32; simulation, integer graph and onnxruntime agree."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import compile_model
from test_bias_grid import _output_steps
from torch import nn

from qcompile.ir import intops as ops
from qcompile.ir.meta import get_info
from qcompile.quant import graph
from qcompile.quant.modules import BIAS_CODE_LIMIT, QLinear, bias_scale_floor


class Collapsing(nn.Module):
    """Two convs with weights 1e-4 of their default init: the classifier sees ~1e-8 and adds a bias ~0.03."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)
        with torch.no_grad():
            for conv in (self.conv1, self.conv2):
                conv.weight.mul_(1e-4)
                conv.bias.zero_()
            self.fc.bias.uniform_(-0.03, 0.03)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("target", ["ort", "integer"])
def test_a_collapsed_input_compiles_exactly_with_a_raised_weight_scale(target: str) -> None:
    model = Collapsing().eval()
    with pytest.warns(UserWarning, match="layer 'fc', 10 of 10 channels: weight scale raised so the bias fits"):
        cm = compile_model(model, "w8a8", target=target)
    fc = next(m for m in cm.integer_graph.modules() if isinstance(m, ops.IntLinear))
    assert int(fc.bias.abs().max()) <= BIAS_CODE_LIMIT * (1 + 2**-20)  # up to s_w stored in float32
    layer = next(m for _, m in graph.layers(cm.quant_graph) if isinstance(m, QLinear))
    s_x = float(layer.input_scale())  # type: ignore[misc]
    s_w = float(layer.weight_quant.scale(layer.weight.detach()).max())  # max|W| / 127, before the floor
    assert float(layer.bias.detach().abs().max()) / (s_x * s_w) > 2**31
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    assert cm.verify(x).mismatches == 0  # onnxruntime == reference executor, bit for bit
    assert float(_output_steps(cm, x).max()) == 0.0  # simulation == integer graph
    out_scale = get_info(next(n for n in cm.integer_graph.graph.nodes if n.op == "output").args[0]).scale
    with torch.no_grad():
        assert float((cm(x) - model(x)).abs().max()) <= out_scale  # the output is the bias, within a step


def test_the_floor_does_not_bind_on_an_ordinary_layer() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10)).eval()
    cm = compile_model(model, "w8a8")
    for _, layer in graph.layers(cm.quant_graph):
        floor = bias_scale_floor(layer)
        assert floor is not None
        assert bool((floor < layer.weight_quant.scale(layer.weight)).all())
