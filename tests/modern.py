"""Helpers shared by the tests of tables, products and LayerNorm (and torchvision-style blocks)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import qcompile
from qcompile.api import default_pipeline
from qcompile.backends.ort import run_onnx
from qcompile.ir import intops as ops

TARGETS = ["ort", "integer"]
# every search at its cheapest settings that still exercise gates, regularizers and fine-tuning
SEARCHES = ["bayesian-bits{epochs=1,finetune_epochs=0,samples=256}", "bsq{epochs=1,finetune_epochs=1}", "aqt{epochs=1}",
            "apot{epochs=1}"]


def pipeline(target: str) -> str:
    """The default pipeline lowering to ``target``."""
    return default_pipeline().replace("lower-integer", f"lower-integer{{target={target}}}")


def assert_exact(cm: qcompile.CompiledModel, x: torch.Tensor) -> None:
    """onnxruntime, the fast executor and the reference executor agree bit for bit."""
    ref = cm.reference(x)
    (got,) = run_onnx(cm.to_onnx(), x.numpy())
    assert int(np.sum(ref.numpy().view(np.uint32) != got.view(np.uint32))) == 0, "onnxruntime != reference"
    assert torch.equal(cm(x), ref), "fast executor != reference"


def lookups(cm: qcompile.CompiledModel) -> list[ops.IntLookup]:
    return [m for m in cm.integer_graph.modules() if isinstance(m, ops.IntLookup)]


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation as torchvision writes it (avgpool, fc1, ReLU, fc2, scale act)."""

    def __init__(self, channels: int, squeeze: int, scale_activation: type[nn.Module] = nn.Hardsigmoid) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.activation, self.scale_activation = nn.ReLU(), scale_activation()

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self._scale(x)
        return scale * x
