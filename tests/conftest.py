"""Shared fixtures: tiny models, fixed seeds, compile helpers and IR verification around every pass.

Every pass a test runs, directly or through a PassManager, is wrapped by ``verify_around_passes``: the
graph must satisfy its stage's verifier before the pass and after it (STYLE.md). Tests that feed a
deliberately broken graph to a pass opt out with ``@pytest.mark.no_verify_around``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import settings
from torch import nn

import qcompile
from qcompile.frontends import trace_module
from qcompile.ir.verify import verify
from qcompile.passes import PassContext, PassManager, parse_pipeline
from qcompile.passes.base import Pass, PassResult

# The models are tiny: one intra-op thread per xdist worker avoids oversubscribing the cores (with two
# OpenMP threads, a 4-channel 8x8 convolution spends ~25 ms waking threads instead of ~50 us computing).
torch.set_num_threads(1)

# The suite's property tests draw the same examples on every run (a CI result does not depend on luck);
# QCOMPILE_HYPOTHESIS=explore draws new ones each run, to hunt for failures (print_blob: how to replay one).
settings.register_profile("qcompile", deadline=None, database=None, print_blob=True, derandomize=True)
settings.register_profile("explore", deadline=None, database=None, print_blob=True)
settings.load_profile(os.environ.get("QCOMPILE_HYPOTHESIS", "qcompile"))

INPUT_SHAPE = (1, 8, 8)
SEED = 0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "no_verify_around: do not verify the IR around each pass in this test")


# ---------------------------------------------------------------------------------------------- seeds


@pytest.fixture(autouse=True)
def fixed_seeds() -> None:
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    random.seed(SEED)


# ------------------------------------------------------------------------------- verification of passes


Verifier = Callable[[fx.GraphModule], fx.GraphModule]


def check_ir(gm: fx.GraphModule) -> fx.GraphModule:
    """Run the stage verifier of ``gm`` (raises VerificationError) and hand the graph back."""
    verify(gm)
    return gm


@pytest.fixture
def verified() -> Verifier:
    """The IR verifier as a fixture: ``verified(gm)`` raises if ``gm`` breaks its stage's rules."""
    return check_ir


@pytest.fixture(autouse=True)
def verify_around_passes(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Verify the graph before and after every pass that any test runs."""
    if request.node.get_closest_marker("no_verify_around"):
        return
    original = Pass.__call__

    def checked(self: Pass, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        verify(gm)
        result = original(self, gm, ctx)
        verify(result.gm)
        return result

    monkeypatch.setattr(Pass, "__call__", checked)


# --------------------------------------------------------------------------------------------- models


class ResidualNet(nn.Module):
    """conv-relu, a residual block (x + conv(relu(conv(x)))), max pool, global average pool, linear."""

    def __init__(self, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(x + self.conv2(F.relu(self.conv1(x))))
        x = self.pool(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DepthwiseNet(nn.Module):
    """A depthwise-separable block: depthwise 3x3 + ReLU6, pointwise 1x1 + ReLU, avg pool, mean, linear."""

    def __init__(self, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.pw = nn.Conv2d(width, 2 * width, 1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu6(self.dw(x))
        x = F.relu(self.pw(x))
        x = self.pool(x)
        return self.fc(x.mean((2, 3)))


class ConcatNet(nn.Module):
    """Two conv branches concatenated on the channel axis."""

    def __init__(self, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.left = nn.Conv2d(width, 3, 1)
        self.right = nn.Conv2d(width, 5, 3, padding=1, stride=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = torch.cat([F.relu(self.left(x)), F.relu(self.right(x))], dim=1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class MLP(nn.Module):
    """Linear-ReLU-Linear on the flattened input."""

    def __init__(self, features: int = 64, hidden: int = 24, classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.size(0), -1)
        return self.fc2(F.relu(self.fc1(x)))


class BNNet(nn.Module):
    """conv-BN-ReLU, conv-BN, a standalone BN after a ReLU, and Linear-BN1d-ReLU before the classifier."""

    def __init__(self, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width)
        self.bn3 = nn.BatchNorm2d(width)
        self.fc1 = nn.Linear(width, 6)
        self.bn4 = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, classes)
        for bn in (self.bn1, self.bn2, self.bn3, self.bn4):
            randomize_bn(bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.bn3(F.relu(self.bn2(self.conv2(x))))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.fc2(F.relu(self.bn4(self.fc1(x))))


def randomize_bn(bn: nn.BatchNorm1d | nn.BatchNorm2d) -> None:
    """Non-trivial running statistics and affine parameters, so that folding changes the weights."""
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.3, 0.3)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "residual": ResidualNet,
    "depthwise": DepthwiseNet,
    "concat": ConcatNet,
    "mlp": MLP,
    "bn": BNNet,
}


def make_model(name: str, seed: int = SEED) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]().eval()


@pytest.fixture(params=sorted(MODELS))
def any_model(request: pytest.FixtureRequest) -> nn.Module:
    return make_model(request.param)


@pytest.fixture
def residual_model() -> nn.Module:
    return make_model("residual")


@pytest.fixture
def depthwise_model() -> nn.Module:
    return make_model("depthwise")


@pytest.fixture
def concat_model() -> nn.Module:
    return make_model("concat")


@pytest.fixture
def mlp_model() -> nn.Module:
    return make_model("mlp")


@pytest.fixture
def bn_model() -> nn.Module:
    return make_model("bn")


# ------------------------------------------------------------------------------------------- inputs


@pytest.fixture(scope="session")
def digits() -> qcompile.Dataset:
    """sklearn's 8x8 digits (the demo data set)."""
    return qcompile.load_data("digits")


@pytest.fixture(scope="module")
def trained_demonet(digits: qcompile.Dataset) -> tuple[nn.Module, qcompile.Dataset]:
    """A DemoNet of width 8 trained 6 epochs on digits (seed 0), with its data: the searches' test model."""
    from qcompile.models import DemoNet, train_float

    torch.manual_seed(0)
    assert digits.y_train is not None
    return train_float(DemoNet(width=8), digits.x_train, digits.y_train, epochs=6), digits


def random_inputs(n: int, signed: bool = True, seed: int = 1, shape: tuple[int, ...] = INPUT_SHAPE) -> torch.Tensor:
    """``n`` inputs: standard normal (signed) or uniform in [0, 2) (positive only)."""
    g = torch.Generator().manual_seed(seed)
    if signed:
        return torch.randn(n, *shape, generator=g)
    return 2.0 * torch.rand(n, *shape, generator=g)


def calibration_data(signed: bool = True, batches: int = 4, batch_size: int = 16, seed: int = 100,
                     shape: tuple[int, ...] = INPUT_SHAPE) -> Callable[[], Iterator[torch.Tensor]]:
    """A callable giving the same fixed random batches every time (what PassContext.calibration wants)."""
    data = [random_inputs(batch_size, signed, seed + i, shape) for i in range(batches)]

    def batches_() -> Iterator[torch.Tensor]:
        yield from data

    return batches_


def compile_model(model: nn.Module, policy: str = "w8a8", signed: bool = True, batches: int = 4,
                  shape: tuple[int, ...] = INPUT_SHAPE, **kwargs: Any) -> qcompile.CompiledModel:
    """Compile ``model`` with random calibration data (signed or positive-only inputs)."""
    example = random_inputs(2, signed, seed=7, shape=shape)
    data = calibration_data(signed, batches, shape=shape)
    return qcompile.compile(model, example, data=data, policy=policy, **kwargs)


def context(signed: bool = True, shape: tuple[int, ...] = INPUT_SHAPE, batches: int = 4) -> PassContext:
    return PassContext((random_inputs(2, signed, seed=7, shape=shape),), calibration_data(signed, batches, shape=shape))


def run_pipeline(model: nn.Module | fx.GraphModule, pipeline: str, ctx: PassContext | None = None,
                 shape: tuple[int, ...] = INPUT_SHAPE) -> fx.GraphModule:
    """Trace ``model`` (unless it is already a graph) and run the pipeline text on it."""
    ctx = ctx or context(shape=shape)
    gm = model if isinstance(model, fx.GraphModule) else trace_module(model, ctx.example_inputs)
    return PassManager(parse_pipeline(pipeline).build()).run(gm, ctx)


# ------------------------------------------------------------------------------ structural comparison


def _arg_signature(arg: Any, index: dict[fx.Node, int]) -> Any:
    if isinstance(arg, fx.Node):
        return ("%", index[arg])
    if isinstance(arg, (list, tuple)):
        return (type(arg).__name__, tuple(_arg_signature(a, index) for a in arg))
    if isinstance(arg, dict):
        return tuple(sorted((k, _arg_signature(v, index)) for k, v in arg.items()))
    return arg


def graph_signature(gm: fx.GraphModule) -> list[tuple[Any, ...]]:
    """The graph as a list of (op, what, args, kwargs), independent of node and module names.

    ``what`` is the module's repr for call_module (type and hyper-parameters) and the function itself
    for call_function; arguments refer to earlier nodes by position.
    """
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    sig = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            what: Any = repr(gm.get_submodule(str(node.target)))
        elif node.op in ("placeholder", "output"):
            what = node.op
        else:
            what = node.target
        sig.append((node.op, what, _arg_signature(node.args, index), _arg_signature(node.kwargs, index)))
    return sig


def call_targets(gm: fx.GraphModule) -> list[Any]:
    """Module types and functions called by the graph, in order."""
    out: list[Any] = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            out.append(type(gm.get_submodule(str(node.target))))
        elif node.op in ("call_function", "call_method"):
            out.append(node.target)
    return out



# ------------------------------------------------------------------ torchvision-style building blocks


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's ShuffleNetV2 channel shuffle, verbatim in structure."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, -1, height, width)


def stochastic_depth(x: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:
    """Stands in for torchvision.ops.stochastic_depth (wrapped as an fx leaf there too)."""
    return x


torch.fx.wrap("stochastic_depth")
