"""prune-channels: zero channels leave the graph, the integer results stay bit-for-bit the same."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import calibration_data, context, make_model, random_inputs, run_pipeline
from torch import nn

import qcompile
from qcompile.backends.ort import run_onnx
from qcompile.passes.base import PreconditionError
from qcompile.passes.prune_channels import PruneChannels

BASE = "canonicalize,fold-batchnorm,insert-quantizers,calibrate,assign-bitwidths{{policy={policy}}},{prune}" \
       "share-scales,lower-integer"
SHAPE = (1, 12, 12)


class TinyLeNet(nn.Module):
    """conv-relu-maxpool twice, flatten, linear-relu, linear: every pruning path of LeNet-5."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 3 * 3, 10)
        self.fc2 = nn.Linear(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def zero_channels(layer: nn.Conv2d | nn.Linear, channels: list[int]) -> None:
    with torch.no_grad():
        layer.weight[channels] = 0
        if layer.bias is not None:
            layer.bias[channels] = 0


def compiled(model: nn.Module, prune: bool, policy: str = "w8a8", shape: tuple[int, ...] = SHAPE,
             ) -> qcompile.CompiledModel:
    pipeline = BASE.format(policy=policy, prune="prune-channels," if prune else "")
    return qcompile.compile(model, random_inputs(2, shape=shape), data=calibration_data(shape=shape),
                            pipeline=pipeline)


@pytest.fixture(scope="module")
def lenet() -> nn.Module:
    torch.manual_seed(0)
    model = TinyLeNet()
    zero_channels(model.conv1, [1])
    zero_channels(model.conv2, [0, 3, 7])
    zero_channels(model.fc1, [2, 5])
    zero_channels(model.fc2, [3])  # an output: kept
    return model


@pytest.mark.parametrize("policy", ["w8a8", "w4a4"])
def test_removed_channels_leave_the_integer_results_bit_identical(lenet: nn.Module, policy: str) -> None:
    plain, pruned = compiled(lenet, False, policy), compiled(lenet, True, policy)
    x = random_inputs(64, shape=SHAPE, seed=3) * 2
    assert torch.equal(pruned.reference(x), plain.reference(x))
    (got,) = run_onnx(pruned.to_onnx(), x.numpy())
    assert np.array_equal(got, pruned.reference(x).numpy())
    assert pruned.verify(x).mismatches == 0
    assert len(pruned.to_onnx().SerializeToString()) < len(plain.to_onnx().SerializeToString())


def test_shapes_shrink_through_pooling_and_flatten(lenet: nn.Module) -> None:
    cm = compiled(lenet, True)
    shapes = {c.name: c.params for c in cm.layer_costs()}
    assert shapes == {"conv1": 5 * 1 * 9, "conv2": 5 * 5 * 9, "fc1": 8 * (5 * 9), "fc2": 4 * 8}
    record = cm.records["prune-channels"]
    assert record["conv2"] == {"zero_channels": 3, "removed": 3, "channels_left": 5}
    assert record["fc2"]["removed"] == 0 and "output" in record["fc2"]["kept_because"]
    plain_macs = sum(c.macs for c in compiled(lenet, False).layer_costs())
    assert sum(c.macs for c in cm.layer_costs()) < plain_macs


def test_channels_feeding_an_add_or_a_depthwise_conv_are_kept_and_explained() -> None:
    residual = make_model("residual")
    zero_channels(residual.conv1, [0])  # feeds conv2 only: removed
    zero_channels(residual.conv2, [1])  # feeds the residual add: kept
    cm = compiled(residual, True, shape=(1, 8, 8))
    record = cm.records["prune-channels"]
    assert record["conv1"]["removed"] == 1
    assert record["conv2"]["removed"] == 0 and "add" in record["conv2"]["kept_because"]
    x = random_inputs(32, shape=(1, 8, 8))
    assert torch.equal(cm.reference(x), compiled(residual, False, shape=(1, 8, 8)).reference(x))
    depthwise = make_model("depthwise")
    zero_channels(depthwise.stem, [2])
    record = compiled(depthwise, True, shape=(1, 8, 8)).records["prune-channels"]
    assert record["stem"]["removed"] == 0 and "grouped" in record["stem"]["kept_because"]


def test_a_layer_with_no_channel_left_is_refused() -> None:
    ctx = context(shape=SHAPE)
    gm = run_pipeline(TinyLeNet(), "canonicalize,fold-batchnorm,insert-quantizers,calibrate", ctx, shape=SHAPE)
    zero_channels(gm.get_submodule("conv2"), list(range(8)))  # as a search that pruned everything would
    with pytest.raises(PreconditionError, match="every output channel of layer 'conv2' is zero"):
        PruneChannels().run(gm, ctx)


def test_nothing_to_prune_leaves_the_graph_unmodified() -> None:
    torch.manual_seed(0)
    cm = compiled(TinyLeNet(), True)
    assert cm.records["prune-channels"] == {}
    assert [t.modified for t in cm.timings if t.name == "prune-channels"] == [False]


class Decoder(nn.Module):
    """conv, then a transposed conv (dilate_pad + conv after canonicalize) and a nearest upsample."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(1, 6, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1)
        self.head = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.up(F.relu(self.enc(x))))
        return self.head(F.interpolate(x, scale_factor=2, mode="nearest"))


def test_channels_prune_through_a_transposed_conv_and_an_upsample() -> None:
    torch.manual_seed(0)
    model = Decoder()
    zero_channels(model.enc, [1, 4])  # read by the transposed conv through its zero insertion
    with torch.no_grad():
        model.up.weight[:, 2] = 0  # ConvTranspose2d weights are [in, out, kh, kw]: output channel 2
        model.up.bias[2] = 0  # type: ignore[index]
    plain, pruned = compiled(model, False), compiled(model, True)
    record = pruned.records["prune-channels"]
    assert record["enc"] == {"zero_channels": 2, "removed": 2, "channels_left": 4}
    assert record["up"] == {"zero_channels": 1, "removed": 1, "channels_left": 3}
    x = random_inputs(16, shape=SHAPE, seed=5) * 2
    assert torch.equal(pruned.reference(x), plain.reference(x))
    assert pruned.verify(x).mismatches == 0
