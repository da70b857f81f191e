"""Transposed convolutions: zero insertion + an ordinary conv, exact from both frontends on both targets.

A decoder block (ConvTranspose2d + BatchNorm + ReLU, stride 2, output_padding 1, groups 2) and a functional
F.conv_transpose2d whose padding crops; a transposed conv right on the signed input (its inserted zeros are
the container's zero point 128 in the export); the rewrite against torch in float for many settings; the
real MACs; bits from a mixed-precision policy; one-line refusals.
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import compile_model, random_inputs, randomize_bn, run_pipeline
from modern import assert_exact, pipeline
from onnx import TensorProto, helper
from torch import nn

import qcompile
from qcompile.errors import QCompileError
from qcompile.ir import intops as ops
from qcompile.ir.movement import dilate_pad
from qcompile.passes.base import PassError


class Decoder(nn.Module):
    """Encoder conv, then the decoder block: ConvTranspose2d + BN + ReLU, then a cropping F.conv_transpose2d."""

    def __init__(self, first_transposed: bool = False) -> None:
        super().__init__()
        self.first_transposed = first_transposed
        self.stem = nn.ConvTranspose2d(1, 8, 2, 1) if first_transposed else nn.Conv2d(1, 8, 3, 2, 1)
        self.up = nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, output_padding=1, groups=2, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.w = nn.Parameter(torch.randn(6, 2, 3, 3) * 0.3)
        self.b = nn.Parameter(torch.randn(2) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.up(torch.relu(self.stem(x)))))
        return F.conv_transpose2d(y, self.w, self.b, stride=2, padding=3, dilation=1)  # p > d (k - 1): crops


def decoder(first_transposed: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = Decoder(first_transposed)
    randomize_bn(model.bn)
    return model.eval()


def export(model: nn.Module, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (random_inputs(1),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], dynamic_axes={"x": {0: "N"}})
    return path


@pytest.mark.parametrize("target", ["ort", "integer"])
@pytest.mark.parametrize("frontend", ["pytorch", "onnx"])
def test_decoder_block_compiles_bit_exactly(frontend: str, target: str, tmp_path: Path) -> None:
    model = decoder()
    if frontend == "onnx":
        path = export(model, tmp_path / "m.onnx")
        assert [n.op_type for n in onnx.load(str(path)).graph.node].count("ConvTranspose") == 2
    cm = compile_model(model if frontend == "pytorch" else str(path), pipeline=pipeline(target))
    gm = cm.integer_graph
    assert [n.args[1:] for n in gm.graph.nodes if n.target is dilate_pad] == [((2, 2), (1, 1, 2, 2)),
                                                                             ((2, 2), (-1, -1, -1, -1))]
    assert sum(isinstance(m, ops.IntConv2d) for m in gm.modules()) == 3  # BatchNorm folded
    x = random_inputs(64, seed=5)
    assert_exact(cm, x)
    with torch.no_grad():
        ref = model(x)
    out = cm(x)
    assert out.shape == ref.shape == (64, 2, 11, 11)
    assert float(F.cosine_similarity(out.flatten(), ref.flatten(), dim=0)) > 0.99
    exported = {n.op_type for n in cm.to_onnx().graph.node}
    assert "Pad" in exported and "ConvTranspose" not in exported


@pytest.mark.parametrize("target", ["ort", "integer"])
def test_inserted_zeros_of_a_signed_input_are_the_zero_point(target: str) -> None:
    """The first layer is transposed: the inserted value in the uint8 container is 128, not 0."""
    cm = compile_model(decoder(first_transposed=True), pipeline=pipeline(target))
    first = next(n for n in cm.integer_graph.graph.nodes if n.target is dilate_pad)
    assert first.args[0].meta["qc"].itype.signed
    assert_exact(cm, random_inputs(32, seed=6))


SETTINGS = [  # (stride, padding, output_padding, dilation, groups, bias, kernel)
    (1, 0, 0, 1, 1, True, 3), (2, 1, 1, 1, 2, False, 3), (3, 0, 2, 1, 1, True, 2), (2, 2, 1, 2, 4, True, 3),
    ((2, 1), (1, 0), (1, 0), (1, 2), 1, True, (3, 2)), (2, 3, 0, 1, 2, True, 3),
]


@pytest.mark.parametrize(("stride", "padding", "output_padding", "dilation", "groups", "bias", "kernel"), SETTINGS)
def test_rewrite_computes_the_transposed_convolution(stride: object, padding: object, output_padding: object,
                                                     dilation: object, groups: int, bias: bool,
                                                     kernel: object) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 8, 1), nn.ConvTranspose2d(8, 4, kernel, stride, padding, output_padding,  # type: ignore[arg-type]
                                                                 groups, bias, dilation)).eval()  # type: ignore[arg-type]
    gm = run_pipeline(model, "canonicalize")
    assert not any(isinstance(m, nn.ConvTranspose2d) for m in gm.modules())
    x = random_inputs(4, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_macs_are_those_of_the_transposed_convolution() -> None:
    """Products with real input pixels landing in the output: conv_transpose2d of ones with a ones kernel."""
    cm = compile_model(decoder())
    costs = {c.name: c for c in cm.layer_costs()}
    model = decoder()
    for name, (layer_in, h, out) in {"up": (model.up, 4, 8), "conv_transpose2d": (None, 8, 11)}.items():
        if layer_in is not None:
            w, kw = torch.ones_like(layer_in.weight), {"stride": 2, "padding": 1, "output_padding": 1, "groups": 2}
            c_in = 8
        else:
            w, kw, c_in = torch.ones_like(model.w), {"stride": 2, "padding": 3}, 6
        real = int(F.conv_transpose2d(torch.ones(1, c_in, h, h), w, **kw).sum())  # type: ignore[arg-type]
        assert costs[name].op == "ConvTranspose2d"
        assert costs[name].macs == real
        assert costs[name].macs < costs[name].params * out * out / 3  # the zero-inserted conv computes > 3x more


def test_a_mixed_precision_policy_assigns_bits_to_the_transposed_convs() -> None:
    cm = compile_model(decoder(), "aqt")
    bits = {c.name: (c.op, c.w_bits) for c in cm.layer_costs()}
    assert bits == {"stem": ("Conv2d", 8), "up": ("ConvTranspose2d", 4), "conv_transpose2d": ("ConvTranspose2d", 8)}
    assert_exact(cm, random_inputs(16, seed=8))
    report = cm.report()
    assert [layer["op"] for layer in report["layers"]][1:] == ["ConvTranspose2d", "ConvTranspose2d"]


class RuntimeWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(1, 2, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(x, torch.relu(self.w), stride=2)  # the weight is computed in the graph


class ThreeD(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(1, 2, (1, 2, 2), (1, 2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.up(x.unsqueeze(2)), 1)


@pytest.mark.parametrize(("model", "expected"), [
    (ThreeD(), "ConvTranspose3d"),
    (RuntimeWeight(), "conv_transpose2d with a weight, bias or setting computed at run time"),
])
def test_unsupported_transposed_forms_get_one_line(model: nn.Module, expected: str) -> None:
    with pytest.raises(PassError) as exc:
        compile_model(model.eval())
    text = str(exc.value)
    assert expected in text and "\n" not in text and len(text) <= 300


def _onnx_transposed(tmp_path: Path, **attrs: object) -> Path:
    w = helper.make_tensor("w", TensorProto.FLOAT, [1, 2, 3, 3], np.ones(18, dtype=np.float32).tolist())
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 16, 16])], [w])
    path = tmp_path / "t.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_onnx_asymmetric_pads_compile_and_output_shape_is_refused(tmp_path: Path) -> None:
    path = _onnx_transposed(tmp_path, strides=[2, 2], pads=[0, 1, 1, 0])
    x = random_inputs(8, seed=3, shape=(1, 8, 8))
    cm = qcompile.compile(str(path), x[:2], data=lambda: [x])
    import onnxruntime as ort

    want = ort.InferenceSession(str(path)).run(None, {"x": x[:1].numpy()})[0]
    assert cm(x[:1]).shape == want.shape == (1, 2, 16, 16)
    assert_exact(cm, x)
    bad = _onnx_transposed(tmp_path, strides=[2, 2], output_shape=[16, 16])
    with pytest.raises(QCompileError) as exc:
        qcompile.compile(str(bad), x[:2])
    assert "ConvTranspose (up: output_shape is given" in str(exc.value) and "\n" not in str(exc.value)


def test_every_setting_combination_is_exact_in_float_for_onnx_pads() -> None:
    """input_pads: dilate_pad + conv equals F.conv_transpose2d for a grid of asymmetric settings."""
    from qcompile.passes.rules.canonical_transposed import equivalent_conv, input_pads

    torch.manual_seed(4)
    x, w = torch.randn(2, 4, 5, 6), torch.randn(4, 3, 3, 2)
    for s, d, p, o in itertools.product([1, 2, 3], [1, 2], [0, 1, 3], [0, 1]):
        if o >= max(s, d):
            continue
        want = F.conv_transpose2d(x, w, None, s, p, o, 1, d)
        conv = equivalent_conv(w, None, (d, d), 1)
        got = conv(dilate_pad(x, (s, s), input_pads((3, 2), (d, d), (p, p), (p, p), (o, o))))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class DecoderClassifier(nn.Module):
    """Down, up (ConvTranspose2d + BN + ReLU), pool, linear: a classifier for the digits search."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(1, 8, 3, 2, 1)
        self.up, self.bn = nn.ConvTranspose2d(8, 8, 3, 2, 1, 1, groups=2), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.up(torch.relu(self.down(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def test_bsq_search_assigns_bits_to_the_transposed_conv() -> None:
    """The transposed conv is an ordinary searched layer (one epoch of BSQ does not lower its bits further)."""
    from qcompile.api import search_pipeline

    torch.manual_seed(0)
    data = qcompile.load_data("digits")
    model = DecoderClassifier()
    randomize_bn(model.bn)
    cm = qcompile.compile(model.eval(), data.x_train[:1], data=data,
                          pipeline=search_pipeline("bsq{alpha=0.1,start_bits=4,epochs=1,finetune_epochs=1}"))
    layers = {layer["name"]: layer for layer in cm.report()["layers"]}
    assert layers["up"]["op"] == "ConvTranspose2d"
    assert 2 <= layers["up"]["w_bits"] <= 5  # BSQ's bit planes (start_bits=4: int5 at most), not the default 8
    assert_exact(cm, data.x_test[:64])


def test_a_saved_torch_export_program_compiles_like_the_module(tmp_path: Path) -> None:
    """The torch.export frontend: aten.conv_transpose2d becomes the same dilate_pad + conv."""
    model = decoder()
    path = tmp_path / "decoder.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(model, (random_inputs(2),)), str(path))
    x = random_inputs(16, seed=9)
    from_file, from_module = compile_model(str(path)), compile_model(model)
    assert torch.equal(from_file.reference(x), from_module.reference(x))
    assert [c.op for c in from_file.layer_costs()] == ["Conv2d", "ConvTranspose2d", "ConvTranspose2d"]
    assert_exact(from_file, x)
