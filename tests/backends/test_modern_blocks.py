"""Blocks written the way torchvision writes them, compiled from PyTorch and from their ONNX export:
MobileNetV3's inverted residual (hardswish, squeeze-excitation with a hardsigmoid gate), EfficientNet's
MBConv (SiLU, squeeze-excitation with SiLU and a sigmoid gate) and ConvNeXt's CNBlock (channels-last
LayerNorm between permutes, Linear, GELU, layer scale) with LayerNorm2d stem and head. Both targets,
bit-exact between the reference executor, the fast executor and onnxruntime."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import compile_model, random_inputs, randomize_bn
from modern import SqueezeExcitation, assert_exact, lookups, pipeline
from torch import nn

import qcompile
from qcompile.ir import intops as ops

Act = Callable[..., nn.Module]


def make_divisible(v: float, divisor: int = 8) -> int:
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


class ConvBNAct(nn.Sequential):
    """torchvision's Conv2dNormActivation: conv (no bias), BatchNorm, optional in-place activation."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
                 act: Act | None = nn.ReLU) -> None:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                                   nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV3's block: expand, depthwise, SE (hardsigmoid gate), project, residual."""

    def __init__(self, cin: int, exp: int, cout: int, k: int, stride: int, use_se: bool, act: Act) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(ConvBNAct(cin, exp, 1, act=act))
        layers.append(ConvBNAct(exp, exp, k, stride, groups=exp, act=act))
        if use_se:
            layers.append(SqueezeExcitation(exp, make_divisible(exp // 4, 8), nn.Hardsigmoid))
        layers.append(ConvBNAct(exp, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        if self.use_res_connect:
            result += x
        return result


class SiLUSqueezeExcitation(SqueezeExcitation):
    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__(channels, squeeze, nn.Sigmoid)
        self.activation = nn.SiLU(inplace=True)


class MBConv(nn.Module):
    """EfficientNet's block (stochastic depth left out: an identity in eval mode)."""

    def __init__(self, cin: int, expand_ratio: int, cout: int, k: int, stride: int) -> None:
        super().__init__()
        exp = cin * expand_ratio
        self.block = nn.Sequential(ConvBNAct(cin, exp, 1, act=nn.SiLU),
                                   ConvBNAct(exp, exp, k, stride, groups=exp, act=nn.SiLU),
                                   SiLUSqueezeExcitation(exp, max(1, cin // 4)),
                                   ConvBNAct(exp, cout, 1, act=None))
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        return result + x if self.use_res_connect else result


class Net(nn.Module):
    def __init__(self, body: nn.Module, act: Act, width: int = 8) -> None:
        super().__init__()
        self.stem, self.body = ConvBNAct(1, width, 3, act=act), body
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.body(self.stem(x))), 1))


class Permute(nn.Module):
    """torchvision.ops.Permute."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.permute(x, self.dims)


class LayerNorm2d(nn.LayerNorm):
    """torchvision's ConvNeXt LayerNorm2d: LayerNorm over channels through two permutes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    """torchvision's ConvNeXt block (stochastic depth left out: an identity in eval mode)."""

    def __init__(self, dim: int, layer_scale: float = 0.1) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(dim, dim, 7, padding=3, groups=dim), Permute([0, 2, 3, 1]),
                                   nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim), nn.GELU(),
                                   nn.Linear(4 * dim, dim), Permute([0, 3, 1, 2]))
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        result = self.layer_scale * self.block(input)
        result += input
        return result


class ConvNeXt(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, dim, 2, 2), LayerNorm2d(dim, eps=1e-6))
        self.stage = nn.Sequential(CNBlock(dim), CNBlock(dim))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(dim, eps=1e-6), nn.Flatten(1), nn.Linear(dim, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.stage(self.stem(x))))


def convnext() -> nn.Module:
    model = ConvNeXt()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    return model


def mobilenet_v3() -> nn.Module:
    return Net(nn.Sequential(InvertedResidual(8, 16, 8, 3, 1, True, nn.Hardswish),
                             InvertedResidual(8, 24, 8, 5, 1, True, nn.Hardswish)), nn.Hardswish)


def efficientnet() -> nn.Module:
    return Net(nn.Sequential(MBConv(8, 4, 8, 3, 1), MBConv(8, 6, 8, 5, 1)), nn.SiLU)


BLOCKS = {"mobilenet_v3": mobilenet_v3, "efficientnet": efficientnet, "convnext": convnext}


def built(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = BLOCKS[name]()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize_bn(m)
    return model.eval()


def export(model: nn.Module, path: Path, opset: int) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (random_inputs(1),), str(path), dynamo=False, opset_version=opset,
                          input_names=["x"], dynamic_axes={"x": {0: "N"}})
    return path


def counts(cm: qcompile.CompiledModel) -> tuple[int, int, int]:
    mods = list(cm.integer_graph.modules())
    return (len(lookups(cm)), sum(isinstance(m, ops.IntMul) for m in mods),
            sum(isinstance(m, ops.IntLayerNorm) for m in mods))


@pytest.mark.parametrize("target", ["ort", "integer"])
@pytest.mark.parametrize("frontend", ["pytorch", "onnx"])
@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_compiles_bit_exactly(name: str, frontend: str, target: str, tmp_path: Path) -> None:
    model = built(name)
    source: nn.Module | str = model if frontend == "pytorch" else str(export(model, tmp_path / "m.onnx", 17))
    cm = compile_model(source, pipeline=pipeline(target))
    # MobileNetV3: 5 hardswish + 2 hardsigmoid tables, 2 SE products; EfficientNet: 5 + 2 SiLU + 2 sigmoid;
    # ConvNeXt: 2 GELU, 4 LayerNorms (stem, 2 blocks, head), no permutes or products left
    expected = {"mobilenet_v3": (7, 2, 0), "efficientnet": (9, 2, 0), "convnext": (2, 0, 4)}[name]
    assert counts(cm) == expected
    if name == "convnext":
        assert {m.axis for m in cm.integer_graph.modules() if isinstance(m, ops.IntLayerNorm)} == {1}
        assert not any(n.op == "call_function" and n.target is torch.permute for n in cm.integer_graph.graph.nodes)
    x = random_inputs(32, seed=8)
    assert_exact(cm, x)
    with torch.no_grad():
        float_out = model(x)
    cos = torch.nn.functional.cosine_similarity(cm.reference(x).flatten(), float_out.flatten(), dim=0)
    assert float(cos) > 0.95


class ShapeChecked(nn.Module):
    """A shape check torch.fx cannot trace: the model goes through torch.export (aten ops raised)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != 1:
            raise ValueError("one input channel expected")
        return self.body(x)


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_block_compiles_through_torch_export(name: str) -> None:
    model = built(name)
    cm = compile_model(ShapeChecked(model).eval(), pipeline=pipeline("ort"))
    expected = {"mobilenet_v3": (7, 2, 0), "efficientnet": (9, 2, 0), "convnext": (2, 0, 4)}[name]
    assert counts(cm) == expected
    assert_exact(cm, random_inputs(16, seed=8))


def test_same_block_compiles_to_the_same_onnx_bytes() -> None:
    for name in ("convnext", "efficientnet"):
        first, second = (compile_model(built(name), pipeline=pipeline("integer")).to_onnx() for _ in range(2))
        assert first.SerializeToString() == second.SerializeToString()
