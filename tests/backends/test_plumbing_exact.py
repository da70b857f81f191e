"""Blocks written the way torchvision writes them, compiled from PyTorch and from their ONNX export (dynamic
and static batch) under both targets: reference == fast executor == onnxruntime, bit for bit; and the
integer graph stays close to the float model (an independent check of the new ops' math)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import calibration_data, channel_shuffle, random_inputs, stochastic_depth
from torch import nn

import qcompile
from qcompile.backends.ort import run_onnx
from qcompile.ir import intops as ops

SHAPE = (3, 8, 8)


def _bn_relu(conv: nn.Conv2d) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU(inplace=True))


class ShuffleUnit(nn.Module):
    """torchvision's ShuffleNetV2 InvertedResidual, stride 2 then stride 1 (chunk, cat, channel shuffle)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        h = c // 2
        self.stem = _bn_relu(nn.Conv2d(3, c, 3, padding=1))
        self.branch1 = nn.Sequential(nn.Conv2d(c, c, 3, 2, 1, groups=c), nn.BatchNorm2d(c),
                                     _bn_relu(nn.Conv2d(c, h, 1)))
        self.down = nn.Sequential(_bn_relu(nn.Conv2d(c, h, 1)), nn.Conv2d(h, h, 3, 2, 1, groups=h),
                                  nn.BatchNorm2d(h), _bn_relu(nn.Conv2d(h, h, 1)))
        self.branch2 = nn.Sequential(_bn_relu(nn.Conv2d(h, h, 1)), nn.Conv2d(h, h, 3, 1, 1, groups=h),
                                     nn.BatchNorm2d(h), _bn_relu(nn.Conv2d(h, h, 1)))
        self.fc = nn.Linear(c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = channel_shuffle(torch.cat((self.branch1(x), self.down(x)), dim=1), 2)
        x1, x2 = x.chunk(2, dim=1)
        x = channel_shuffle(torch.cat((x1, self.branch2(x2)), dim=1), 2)
        return self.fc(x.mean([2, 3]))


class VGGHead(nn.Module):
    """VGG's classifier end: features, AdaptiveAvgPool2d(7), flatten, Linear-ReLU-Dropout-Linear.

    At stride 1 the features are 7 x 7 (the pool is an identity, as in VGG at 224); at stride 2 they are 3 x 3
    and a pool to 2 x 2 has overlapping bins of varying size (as VGG's 7 x 7 at 64 x 64 input)."""

    def __init__(self, pool_to: int = 7, stride: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(_bn_relu(nn.Conv2d(3, 4, 3, stride, 1)), nn.MaxPool2d(2, 1))
        self.avgpool = nn.AdaptiveAvgPool2d(pool_to)
        self.classifier = nn.Sequential(nn.Linear(4 * pool_to * pool_to, 16), nn.ReLU(True), nn.Dropout(),
                                        nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class PoolsAndConstants(nn.Module):
    """ceil_mode / count_include_pad=False pools, hardsigmoid written out, layer scale, sub, chained means."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.pool = nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False)
        self.pool2 = nn.AvgPool2d(2, 2, ceil_mode=True)
        self.conv = nn.Conv2d(6, 6, 1)
        self.layer_scale = nn.Parameter(torch.rand(6, 1, 1) + 0.5)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        y = self.pool2(self.pool(x))  # 8 -> 5 -> 3 (both with partial windows)
        gate = F.relu6(y + 3.0) / 6.0
        z = stochastic_depth(self.layer_scale * self.conv(gate), 0.1, "row", False) - y * 0.5
        return self.fc(z.mean(3).mean(2) * 2.0 - 0.125)


class Upsampling(nn.Module):
    """An FPN-style top-down path: nn.Upsample and F.interpolate (nearest and bilinear, integer factors)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, 2, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.lateral = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = F.relu(self.stem(x))
        merged = self.up(top) + self.lateral(x)
        wide = torch.cat([F.interpolate(top, size=(8, 8)), merged], 1)
        smooth = F.interpolate(wide, scale_factor=2, mode="bilinear") + F.interpolate(
            wide, scale_factor=2, mode="bilinear", align_corners=True)
        return self.fc(F.interpolate(smooth, scale_factor=(1, 2)).mean((2, 3)))


class ChannelsLast(nn.Module):
    """ConvNeXt's block layout without its LayerNorm/GELU: permute to NHWC, Linear-ReLU-Linear over channels,
    a per-channel layer scale, permute back, residual add; then tokens [N, L, C] through the same MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.up, self.down = nn.Linear(6, 12), nn.Linear(12, 6)
        self.layer_scale = nn.Parameter(torch.rand(6) * 0.5 + 0.2)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.down(F.relu(self.up(x.permute(0, 2, 3, 1))))
        x = x + (self.layer_scale * y).permute(0, 3, 1, 2)
        tokens = self.down(F.relu(self.up(x.flatten(2).transpose(1, 2))))
        return self.fc(tokens[:, 0])


BLOCKS = {"upsample": Upsampling, "channels-last": ChannelsLast, "shuffle": ShuffleUnit, "vgg7": VGGHead,
          "vgg-irregular": lambda: VGGHead(2, 2), "pools-constants": PoolsAndConstants}
# all but vgg-irregular: TorchScript's exporter refuses an adaptive pool from 3 x 3 to 2 x 2
ONNX_BLOCKS = ["shuffle", "vgg7", "pools-constants", "upsample", "channels-last"]


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = BLOCKS[name]().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    return model


def _export(model: nn.Module, path: Path, dynamic: bool) -> str:
    axes = {"x": {0: "N"}, "y": {0: "N"}} if dynamic else None
    torch.onnx.export(model, (random_inputs(1, shape=SHAPE),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes=axes)
    return str(path)


def _centred_cosine(y: torch.Tensor, ref: torch.Tensor, centre_of: torch.Tensor) -> float:
    """Cosine of the logits with the reference's per-class mean taken off (random logits share an offset)."""
    c = centre_of.mean(0, keepdim=True)
    return float(F.cosine_similarity((y - c).flatten(), (ref - c).flatten(), 0))


def _check(source: nn.Module | str, model: nn.Module, target: str) -> qcompile.CompiledModel:
    pipeline = ("canonicalize,fold-batchnorm,insert-quantizers,calibrate,assign-bitwidths{policy=w8a8},"
                f"share-scales,lower-integer{{target={target}}}")
    cm = qcompile.compile(source, random_inputs(2, shape=SHAPE, seed=7), data=calibration_data(shape=SHAPE),
                          pipeline=pipeline)
    x = random_inputs(24, shape=SHAPE, seed=3) * 1.5
    ref = cm.reference(x)
    assert torch.equal(cm(x), ref), "fast executor != reference"
    (got,) = run_onnx(cm.to_onnx(), x.numpy())
    differ = int(np.sum(got.view(np.uint32) != ref.numpy().view(np.uint32)))
    assert differ == 0, f"{differ} of {got.size} outputs differ between onnxruntime and the reference executor"
    x = random_inputs(24, shape=SHAPE, seed=4)  # within the calibrated range
    with torch.no_grad():
        want = model(x)
    got_int, sim = cm.reference(x), cm.simulate(x)
    assert _centred_cosine(got_int, sim, sim) > 0.995, "integer graph differs from its simulation"
    assert _centred_cosine(got_int, want, want) > 0.9, "integer graph far from the float model"
    return cm


@pytest.mark.parametrize("target", ["ort", "integer"])
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_blocks_from_pytorch_are_bit_exact(name: str, target: str) -> None:
    model = _model(name)
    cm = _check(model, model, target)
    kinds = {type(m) for m in cm.integer_graph.modules()}
    if name in ("vgg-irregular", "pools-constants"):
        assert ops.IntAvgPoolTable in kinds
    if name == "pools-constants":
        assert {ops.IntRescale, ops.IntSub} <= kinds


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic-batch", "static-batch"])
@pytest.mark.parametrize("name", ONNX_BLOCKS)
def test_blocks_from_onnx_are_bit_exact(name: str, dynamic: bool, tmp_path: Path) -> None:
    model = _model(name)
    _check(_export(model, tmp_path / f"{name}.onnx", dynamic), model, "ort")
