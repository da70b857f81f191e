"""fold-batchnorm: BN folds into the preceding conv/linear (as torch's fusion does); lone BN2d -> depthwise conv."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from conftest import Verifier, call_targets, context, make_model, randomize_bn, run_pipeline
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from qcompile.frontends import trace_module
from qcompile.passes import PassError
from qcompile.passes.base import PreconditionError
from qcompile.passes.fold_batchnorm import FoldBatchnorm

SHAPE = (2, 6, 6)


def fold(model: nn.Module, shape: tuple[int, ...] = SHAPE) -> fx.GraphModule:
    return run_pipeline(model, "canonicalize,fold-batchnorm", context(shape=shape))


def bn_modules(gm: fx.GraphModule) -> list[nn.Module]:
    return [m for m in gm.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class ConvBNReLU(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(3)
        randomize_bn(self.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


@pytest.mark.parametrize("bias", [True, False])
def test_conv_bn_folds_like_torch_fusion(bias: bool) -> None:
    model = ConvBNReLU(bias).eval()
    gm = fold(copy.deepcopy(model))
    assert call_targets(gm) == [nn.Conv2d, torch.relu]  # Expected: conv -> relu, no BatchNorm
    assert not bn_modules(gm)
    fused = fuse_conv_bn_eval(copy.deepcopy(model.conv), copy.deepcopy(model.bn))
    folded = next(m for m in gm.modules() if isinstance(m, nn.Conv2d))
    assert torch.equal(folded.weight, fused.weight) and torch.equal(folded.bias, fused.bias)
    x = torch.randn(8, *SHAPE)
    with torch.no_grad():
        assert torch.equal(gm(x), F.relu(fused(x)))
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_folded_weights_follow_the_formula() -> None:
    model = ConvBNReLU(True).eval()
    gm = fold(copy.deepcopy(model))
    folded = next(m for m in gm.modules() if isinstance(m, nn.Conv2d))
    bn, conv = model.bn, model.conv
    inv_std = 1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
    w = conv.weight.double() * (bn.weight.double() * inv_std).view(-1, 1, 1, 1)
    b = (conv.bias.double() - bn.running_mean.double()) * bn.weight.double() * inv_std + bn.bias.double()
    torch.testing.assert_close(folded.weight.double(), w, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(folded.bias.double(), b, rtol=1e-6, atol=1e-7)


def test_linear_bn1d_folds_like_torch_fusion() -> None:
    class LinearBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(72, 5)
            self.bn = nn.BatchNorm1d(5)
            randomize_bn(self.bn)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.fc(torch.flatten(x, 1)))

    model = LinearBN().eval()
    gm = fold(copy.deepcopy(model))
    assert call_targets(gm) == [torch.flatten, nn.Linear]
    fused = fuse_linear_bn_eval(copy.deepcopy(model.fc), copy.deepcopy(model.bn))
    x = torch.randn(8, *SHAPE)
    with torch.no_grad():
        assert torch.equal(gm(x), fused(torch.flatten(x, 1)))


def test_standalone_bn2d_becomes_depthwise_conv() -> None:
    class LoneBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1)
            self.bn_in = nn.BatchNorm2d(2)  # on the graph input
            self.bn_relu = nn.BatchNorm2d(3)  # after a ReLU
            for bn in (self.bn_in, self.bn_relu):
                randomize_bn(bn)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn_relu(F.relu(self.conv(self.bn_in(x))))

    model = LoneBN().eval()
    gm = fold(copy.deepcopy(model))
    assert not bn_modules(gm)
    assert call_targets(gm) == [nn.Conv2d, nn.Conv2d, torch.relu, nn.Conv2d]
    convs = [m for m in gm.modules() if isinstance(m, nn.Conv2d)]
    for dw, channels in ((convs[0], 2), (convs[2], 3)):
        assert (dw.in_channels, dw.out_channels, dw.groups, dw.kernel_size) == (channels, channels, channels, (1, 1))
    x = torch.randn(8, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
        # the depthwise conv alone computes the BN's affine map
        y = torch.randn(8, 2, 5, 5)
        torch.testing.assert_close(convs[0](y), model.bn_in(y), rtol=1e-6, atol=1e-6)


def test_bn_after_a_shared_conv_output_is_not_folded_into_it() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)
            randomize_bn(self.bn)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return y + self.bn(y)  # folding into conv would change the first addend

    model = Shared().eval()
    gm = fold(copy.deepcopy(model))
    assert not bn_modules(gm)
    conv = gm.get_submodule("conv")
    assert torch.equal(conv.weight, model.conv.weight)
    x = torch.randn(8, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_bn_after_a_conv_module_called_twice_keeps_the_other_call_exact() -> None:
    class Reused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.bn = nn.BatchNorm2d(2)
            randomize_bn(self.bn)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) + self.bn(self.conv(F.relu(x)))  # one module, two call sites

    model = Reused().eval()
    gm = fold(copy.deepcopy(model))
    assert not bn_modules(gm)
    assert torch.equal(gm.get_submodule("conv").weight, model.conv.weight)
    x = torch.randn(8, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_every_bn_of_a_model_is_folded(bn_model: nn.Module, verified: Verifier) -> None:
    gm = verified(run_pipeline(copy.deepcopy(bn_model), "canonicalize,fold-batchnorm"))
    assert not bn_modules(gm)
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), bn_model(x), rtol=1e-5, atol=1e-5)


def test_standalone_bn1d_is_refused_naming_it() -> None:
    class LoneBN1d(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(72)
            self.fc = nn.Linear(72, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.bn(torch.flatten(x, 1)))

    with pytest.raises(PassError, match="fold-batchnorm") as info:
        fold(LoneBN1d().eval())
    assert isinstance(info.value.__cause__, PreconditionError)
    assert "'bn'" in str(info.value)


def test_bn_without_running_statistics_is_refused() -> None:
    class NoStats(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 1)
            self.bn = nn.BatchNorm2d(3, track_running_stats=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x))

    with pytest.raises(PassError, match="no running statistics"):
        fold(NoStats().eval())


def test_fold_needs_a_canonical_float_graph() -> None:
    ctx = context()
    gm = trace_module(make_model("bn"), ctx.example_inputs)  # still TRACED
    with pytest.raises(PreconditionError, match="float"):
        FoldBatchnorm()(gm, ctx)


def test_no_batchnorm_means_not_modified() -> None:
    ctx = context()
    gm = run_pipeline(make_model("residual"), "canonicalize", ctx)
    result = FoldBatchnorm()(gm, ctx)
    assert not result.modified
