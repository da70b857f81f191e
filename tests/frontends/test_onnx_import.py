"""ONNX frontend: every supported op imports faithfully and compiles bit-exactly; every failure is one clear error.

Small models are built with onnx.helper at the opset edges (11 and 21) with a symbolic batch; the float import
is compared with onnxruntime on the original file, the compiled integer graph with onnxruntime on its export.
Round trip: a PyTorch model compiled directly and the same model exported with the legacy (TorchScript)
exporter and compiled from ONNX give the same layers and integer outputs up to rare one-step differences.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from conftest import random_inputs, randomize_bn
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import qcompile
from qcompile.cli import main
from qcompile.frontends.onnx_check import OnnxValidationError
from qcompile.frontends.onnx_import import (
    ControlFlowError,
    DynamicShapeError,
    ModelFileError,
    OpsetError,
    UnsupportedOnnxOpsError,
    load_onnx,
)
from qcompile.ir import intops as ops
from qcompile.ir.meta import Stage, get_info, get_stage
from qcompile.passes import PassError
from qcompile.passes.canonicalize import UnsupportedOpsError

OPSETS = [11, 21]


# ------------------------------------------------------------------------------------------ building


class Net:
    """An ONNX graph under construction from input ``x`` [N, 1, 8, 8]; every node gets a readable name."""

    def __init__(self, opset: int, seed: int = 0) -> None:
        self.opset, self.nodes, self.inits, self.rng = opset, [], [], np.random.default_rng(seed)

    def const(self, name: str, values: Any, dtype: Any = np.float32) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int = 1, **attrs: Any) -> str:
        outs = [f"{name}_out{i or ''}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, **attrs))
        return outs[0]

    def weights(self, *shape: int) -> np.ndarray:
        fan_in = int(np.prod(shape[1:]))
        return self.rng.uniform(-1, 1, shape) / np.sqrt(fan_in)

    def conv(self, x: str, cin: int, cout: int, name: str, k: int = 3, group: int = 1, bias: bool = True,
             **attrs: Any) -> str:
        inputs = [x, self.const(f"{name}.w", self.weights(cout, cin // group, k, k))]
        if bias:
            inputs.append(self.const(f"{name}.b", self.rng.uniform(-0.2, 0.2, cout)))
        return self.op("Conv", inputs, name, group=group, kernel_shape=[k, k], **attrs)

    def head(self, x: str, channels: int, classes: int = 3) -> str:
        pooled = self.op("GlobalAveragePool", [x], "gap")
        flat = self.op("Flatten", [pooled], "flatten", axis=1)
        w = self.const("fc.w", self.weights(classes, channels))
        return self.op("Gemm", [flat, w, self.const("fc.b", self.rng.uniform(-0.1, 0.1, classes))], "fc", transB=1)

    def model(self, out: str, in_shape: tuple[Any, ...] = ("N", 1, 8, 8), out_rank: int = 2) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "test", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, [None] * out_rank)], self.inits,
        )
        opset = helper.make_opsetid("", self.opset)
        return helper.make_model(graph, opset_imports=[opset], ir_version=helper.find_min_ir_version_for([opset]))


def stem(net: Net, width: int = 4) -> str:
    return net.op("Relu", [net.conv("x", 1, width, "stem", pads=[1, 1, 1, 1])], "stem_relu")


def case_conv(net: Net) -> str:
    x = stem(net)
    x = net.op("Relu", [net.conv(x, 4, 4, "dw", group=4, strides=[2, 2], pads=[1, 1, 1, 1])], "dw_relu")
    x = net.conv(x, 4, 6, "dilated", dilations=[2, 2], pads=[2, 2, 2, 2], bias=False)
    return net.head(net.op("Relu", [x], "dilated_relu"), 6)


def case_auto_pad(net: Net) -> str:
    x = net.conv("x", 1, 4, "same_upper", auto_pad="SAME_UPPER")
    x = net.conv(net.op("Relu", [x], "r1"), 4, 4, "same_lower", k=4, auto_pad="SAME_LOWER", strides=[2, 2])
    x = net.conv(net.op("Relu", [x], "r2"), 4, 4, "valid", auto_pad="VALID")
    return net.head(net.op("Relu", [x], "r3"), 4)


def case_gemm(net: Net) -> str:
    flat = net.op("Flatten", [stem(net)], "flat", axis=1)
    b = net.const("g1.B", net.weights(8, 256).T)  # [K, M] for transB=0
    c = net.const("g1.C", net.rng.uniform(-0.2, 0.2, (1, 8)))
    x = net.op("Relu", [net.op("Gemm", [flat, b, c], "g1", alpha=0.5, beta=2.0)], "g1_relu")
    return net.op("Gemm", [x, net.const("g2.B", net.weights(3, 8))], "g2", transB=1)


def case_matmul(net: Net) -> str:
    flat = net.op("Flatten", [stem(net)], "flat", axis=1)
    x = net.op("MatMul", [flat, net.const("mm1.w", net.weights(8, 256).T)], "mm1")
    x = net.op("Relu", [net.op("Add", [x, net.const("mm1.b", net.rng.uniform(-0.2, 0.2, 8))], "mm1_bias")], "r")
    return net.op("MatMul", [x, net.const("mm2.w", net.weights(3, 8).T)], "mm2")


def bn(net: Net, x: str, channels: int, name: str) -> str:
    stats = [net.rng.uniform(0.5, 1.5, channels), net.rng.uniform(-0.3, 0.3, channels),
             net.rng.uniform(-0.5, 0.5, channels), net.rng.uniform(0.5, 2.0, channels)]
    names = [net.const(f"{name}.{p}", v) for p, v in zip(("scale", "B", "mean", "var"), stats, strict=True)]
    return net.op("BatchNormalization", [x, *names], name, epsilon=1e-3)


def case_batchnorm(net: Net) -> str:
    x = net.op("Relu", [bn(net, net.conv("x", 1, 4, "conv1", bias=False, pads=[1, 1, 1, 1]), 4, "bn1")], "r1")
    x = bn(net, x, 4, "bn2")  # no producer to fold into: becomes a depthwise 1x1 convolution
    return net.head(net.op("Relu", [x], "r2"), 4)


def case_clip(net: Net) -> str:
    x = net.conv("x", 1, 4, "conv1", pads=[1, 1, 1, 1])
    x = net.op("Clip", [x, net.const("zero", 0.0), net.const("six", 6.0)], "relu6")
    x = net.conv(x, 4, 4, "conv2", pads=[1, 1, 1, 1])
    x = net.op("Clip", [x, net.const("lo", 0.0), ""], "min_only")
    x = net.op("Clip", [x], "no_bounds")
    return net.head(x, 4)


def case_pools(net: Net) -> str:
    x = net.op("MaxPool", [stem(net)], "max3", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[1, 1])
    x = net.op("MaxPool", [x], "max2", kernel_shape=[2, 2], strides=[2, 2])
    x = net.op("AveragePool", [x], "avg3", kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1)
    x = net.op("AveragePool", [x], "avg2", kernel_shape=[2, 2], strides=[2, 2])
    return net.head(x, 4)


def case_reshape(net: Net) -> str:
    x = net.op("MaxPool", [stem(net)], "pool", kernel_shape=[2, 2], strides=[2, 2])  # [N, 4, 4, 4]
    x = net.op("Reshape", [x, net.const("to_nchw", [-1, 16, 2, 2], np.int64)], "regroup")
    x = net.op("Reshape", [x, net.const("to_rows", [0, 8, -1], np.int64)], "rows")
    x = net.op("Reshape", [x, net.const("to_flat", [0, -1], np.int64)], "flat")
    return net.op("Gemm", [x, net.const("fc.w", net.weights(3, 64))], "fc", transB=1)


def case_add_concat(net: Net) -> str:
    x = stem(net)
    left = net.conv(x, 4, 4, "left", pads=[1, 1, 1, 1])
    x = net.op("Relu", [net.op("Add", [x, left], "residual")], "residual_relu")
    right = net.op("Relu", [net.conv(x, 4, 2, "right", k=1)], "right_relu")
    return net.head(net.op("Concat", [x, right], "cat", axis=-3), 6)


def case_passthrough(net: Net) -> str:
    x = net.op("Identity", [stem(net)], "identity")
    if net.opset >= 12:
        ratio, mode = net.const("ratio", 0.5), net.const("training", False, np.bool_)
        x = net.op("Dropout", [x, ratio, mode], "dropout", outputs=2)
    else:
        x = net.op("Dropout", [x], "dropout", ratio=0.5)
    return net.head(x, 4)


def case_reduce_mean(net: Net) -> str:
    x = stem(net)
    if net.opset >= 18:
        x = net.op("ReduceMean", [x, net.const("hw", [2, 3], np.int64)], "mean", keepdims=0)
    else:
        x = net.op("ReduceMean", [x], "mean", axes=[-2, -1], keepdims=0)
    return net.op("Gemm", [x, net.const("fc.w", net.weights(3, 4))], "fc", transB=1)


CASES: dict[str, Callable[[Net], str]] = {
    name.removeprefix("case_"): fn for name, fn in globals().items() if name.startswith("case_")
}


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def build(case: str, opset: int, folder: Path) -> Path:
    net = Net(opset)
    return save(net.model(CASES[case](net)), folder / f"{case}_{opset}.onnx")


def run_ort(path: Path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


# ------------------------------------------------------------------------------------------ supported ops


def assert_sources_name_onnx_nodes(gm: fx.GraphModule, path: Path) -> None:
    """Every call node's source is '<name> (<op>)' of an ONNX node (or two, for MatMul + Add)."""
    known = {f"{n.name} ({n.op_type})" for n in onnx.load(str(path)).graph.node}
    for node in gm.graph.nodes:
        if node.op in ("call_module", "call_function"):
            source = get_info(node).source or ""
            assert source and set(source.split(" + ")) <= known, f"{node.name}: source {source!r}"


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_op_imports_faithfully_and_compiles_bit_exactly(case: str, opset: int, tmp_path: Path) -> None:
    path = build(case, opset, tmp_path)
    gm = load_onnx(path)
    assert get_stage(gm) is Stage.TRACED
    assert_sources_name_onnx_nodes(gm, path)
    x = random_inputs(48, seed=3)
    with torch.no_grad():
        np.testing.assert_allclose(gm(x).numpy(), run_ort(path, x), rtol=1e-4, atol=1e-5)
    cm = qcompile.compile(path, x[:2], data=lambda: [x])
    result = cm.verify(x * 2)
    assert result.compared == 48 * 3 and result.mismatches == 0


def test_modules_carry_the_onnx_settings(tmp_path: Path) -> None:
    gm = load_onnx(build("conv", 21, tmp_path))
    convs = [m for m in gm.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.groups, c.stride, c.padding, c.dilation, c.bias is None) for c in convs] == [
        (1, (1, 1), (1, 1), (1, 1), False), (4, (2, 2), (1, 1), (1, 1), False), (1, (1, 1), (2, 2), (2, 2), True)
    ]
    gm = load_onnx(build("auto_pad", 11, tmp_path))
    assert [m.padding for m in gm.modules() if isinstance(m, nn.Conv2d)] == [(1, 1), (1, 1), (0, 0)]


def test_gemm_folds_alpha_and_beta_and_matmul_absorbs_its_bias(tmp_path: Path) -> None:
    path = build("gemm", 21, tmp_path)
    g1 = next(m for m in load_onnx(path).modules() if isinstance(m, nn.Linear))
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    np.testing.assert_allclose(g1.weight.detach().numpy(), 0.5 * inits["g1.B"].T, rtol=1e-6)
    np.testing.assert_allclose(g1.bias.detach().numpy(), 2.0 * inits["g1.C"][0], rtol=1e-6)
    gm = load_onnx(build("matmul", 11, tmp_path))
    linears = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Linear)]
    assert [get_info(n).source for n in linears] == ["mm1 (MatMul) + mm1_bias (Add)", "mm2 (MatMul)"]
    assert not any(n.target is torch.add or getattr(n.target, "__name__", "") == "add" for n in gm.graph.nodes)


def test_external_data_is_read_from_the_models_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net = Net(17)
    model = net.model(case_conv(net))
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save_model(model, str(folder / "m.onnx"), save_as_external_data=True, location="weights.bin",
                    size_threshold=0)
    assert (folder / "weights.bin").stat().st_size > 0
    monkeypatch.chdir(tmp_path)
    x = random_inputs(8)
    with torch.no_grad():
        np.testing.assert_allclose(load_onnx(folder / "m.onnx")(x).numpy(), run_ort(folder / "m.onnx", x),
                                   rtol=1e-4, atol=1e-5)
    (folder / "weights.bin").unlink()
    with pytest.raises(ModelFileError, match="cannot read the external data of .*m.onnx"):
        load_onnx(folder / "m.onnx")


# ------------------------------------------------------------------------------------------ errors


def one_line(exc: pytest.ExceptionInfo[Exception]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_every_unsupported_node_is_listed_in_one_error(tmp_path: Path) -> None:
    net = Net(17)
    x = net.conv("x", 1, 4, "asym", pads=[0, 0, 1, 1])
    x = net.op("Sin", [x], "gate")
    x = net.op("Neg", [x], "negate")
    x = net.op("Concat", [x, x], "batch_cat", axis=0)
    x = net.op("Sub", [net.const("offset", np.ones((1, 4, 1, 1))), x], "offset_sub")
    x = net.op("Gemm", [net.op("Flatten", [x], "flat"), net.const("w", net.weights(256, 3))], "gemm_t", transA=1)
    with pytest.raises(UnsupportedOpsError) as exc:
        load_onnx(save(net.model(net.op("Hardmax", [x], "probs")), tmp_path / "m.onnx"))
    assert isinstance(exc.value, UnsupportedOnnxOpsError)
    text = one_line(exc)
    assert text.startswith("7 unsupported ONNX node(s): Conv (asym: asymmetric pads [0, 0, 1, 1]"), text
    assert "Sin (gate), Neg (negate)" in text and len(text) <= 300
    for kind in ["Concat", "Sub", "Gemm", "Hardmax"]:
        assert kind in text
    full = "; ".join(exc.value.details)  # every node, for --debug
    for item in ["gate (Sin)", "negate (Neg)", "batch_cat (Concat: axis 0", "offset_sub (Sub: - with the constant",
                 "gemm_t (Gemm: transA=1", "probs (Hardmax)"]:
        assert item in full
    assert len(exc.value.items) == 7


def test_corrupt_and_truncated_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07this is not a protobuf" * 10)
    good = build("conv", 17, tmp_path).read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good[: len(good) // 2])
    for path in (garbage, truncated):
        with pytest.raises(ModelFileError) as exc:
            load_onnx(path)
        assert re.search(r"is not a (readable|valid) ONNX model .*truncated or corrupt", one_line(exc))
    with pytest.raises(ModelFileError, match="no such file"):
        load_onnx(tmp_path / "missing.onnx")


@pytest.mark.parametrize("opset", [9, 22])
def test_opset_outside_the_range(opset: int, tmp_path: Path) -> None:
    net = Net(opset)
    path = save(net.model(net.op("Relu", ["x"], "relu"), out_rank=4), tmp_path / "m.onnx")
    with pytest.raises(OpsetError) as exc:
        load_onnx(path)
    assert f"uses ONNX opset {opset}, qcompile supports opsets 11..21" in one_line(exc)


def test_control_flow_is_refused_naming_the_node(tmp_path: Path) -> None:
    net = Net(17)
    cond = net.op("ReduceSum", ["x"], "total", keepdims=0)
    positive = net.op("Greater", [cond, net.const("zero", 0.0)], "is_positive")
    branch = helper.make_graph([helper.make_node("Neg", ["x"], ["y"], name="neg")], "then", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    same = helper.make_graph([helper.make_node("Identity", ["x"], ["z"], name="same")], "else", [],
                             [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    out = net.op("If", [positive], "branch_on_sign", then_branch=branch, else_branch=same)
    with pytest.raises(ControlFlowError) as exc:
        load_onnx(save(net.model(out, out_rank=4), tmp_path / "m.onnx"))
    assert "branch_on_sign (If)" in one_line(exc)


def test_unresolvable_shapes(tmp_path: Path) -> None:
    net = Net(17)
    out = net.conv("x", 1, 4, "strided_same", auto_pad="SAME_UPPER", strides=[2, 2])
    path = save(net.model(out, in_shape=("N", 1, "H", "W"), out_rank=4), tmp_path / "same.onnx")
    with pytest.raises(DynamicShapeError, match=r"strided_same \(Conv\): auto_pad=SAME_UPPER with stride 2"):
        load_onnx(path)
    net = Net(17)
    largest = net.op("ReduceMax", ["x"], "largest", axes=[0], keepdims=0)
    out = net.op("Reshape", ["x", net.op("Cast", [largest], "as_shape", to=TensorProto.INT64)], "data_shaped")
    with pytest.raises(DynamicShapeError) as exc:
        load_onnx(save(net.model(out, in_shape=("N", 4), out_rank=4), tmp_path / "reshape.onnx"))
    assert "data_shaped (Reshape): the target shape is computed at run time" in one_line(exc)


def test_settings_the_compiler_lacks_are_reported_by_canonicalize_with_the_onnx_node(tmp_path: Path) -> None:
    net = Net(17)
    x = net.op("ReduceMean", [stem(net)], "mean_channels", axes=[1], keepdims=1)
    path = save(net.model(net.head(x, 1)), tmp_path / "m.onnx")
    load_onnx(path)  # imports faithfully: torch.mean(x, 1, keepdim=True)
    with pytest.raises(PassError) as exc:
        qcompile.compile(path, random_inputs(2))
    assert isinstance(exc.value.__cause__, UnsupportedOpsError)
    assert "mean" in one_line(exc) and "at mean_channels (ReduceMean)" in one_line(exc)


def test_an_example_of_the_wrong_shape_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OnnxValidationError, match=r"1,6,6 does not fit .* declared \['N', 1, 8, 8\]; pass "
                       r"--input-shape 1,8,8"):
        qcompile.compile(build("gemm", 17, tmp_path), torch.zeros(2, 1, 6, 6))


# ------------------------------------------------------------------------------------------ round trip


class ResidualBN(nn.Module):
    """conv-BN-ReLU stem, a residual block with BatchNorm, global average pool, linear."""

    def __init__(self, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DepthwiseSeparable(nn.Module):
    """Stem, depthwise 3x3 + BN + ReLU6, pointwise 1x1 + ReLU, global average pool, linear."""

    def __init__(self, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.dw, self.bn = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False), nn.BatchNorm2d(width)
        self.pw = nn.Conv2d(width, 2 * width, 1)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn(self.dw(F.relu(self.stem(x)))))
        x = F.relu(self.pw(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TwoBranchCat(nn.Module):
    """Stem, two conv branches concatenated on channels, global average pool, linear."""

    def __init__(self, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.left, self.right = nn.Conv2d(width, 3, 1), nn.Conv2d(width, 5, 3, padding=1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = torch.cat([F.relu(self.left(x)), F.relu(self.right(x))], dim=1)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


ROUND_TRIP: dict[str, type[nn.Module]] = {
    "residual": ResidualBN, "depthwise": DepthwiseSeparable, "concat": TwoBranchCat,
}


def make(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = ROUND_TRIP[name]()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            randomize_bn(m)
    return model.eval()


def export_legacy(model: nn.Module, path: Path, dynamic: bool = True, keep_bn: bool = False) -> Path:
    """torch.onnx.export(dynamo=False); it folds BatchNorm into convolutions unless ``keep_bn`` (PRESERVE)."""
    mode = torch.onnx.TrainingMode.PRESERVE if keep_bn else torch.onnx.TrainingMode.EVAL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (random_inputs(1),), str(path), dynamo=False, input_names=["x"], training=mode,
                          output_names=["logits"], dynamic_axes={"x": {0: "N"}} if dynamic else None)
    return path


def layers(cm: qcompile.CompiledModel) -> list[tuple[Any, ...]]:
    """The integer graph's ops in order: kind, weight shape, weight and output types (no names)."""
    out: list[tuple[Any, ...]] = []
    for node in cm.integer_graph.graph.nodes:
        if node.op == "call_module":
            op = cm.integer_graph.get_submodule(str(node.target))
            weight = tuple(op.weight.shape) if isinstance(op, (ops.IntConv2d, ops.IntLinear)) else None
            out.append((type(op).__name__, weight, str(getattr(op, "w_type", "")), str(op.out)))
        elif node.op == "call_function":
            out.append((node.target.__name__,))
    return out


def layer_names(cm: qcompile.CompiledModel) -> list[str]:
    gm = cm.integer_graph
    return [str(n.target) for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), (ops.IntConv2d, ops.IntLinear))]


def integer_outputs(cm: qcompile.CompiledModel, x: torch.Tensor) -> torch.Tensor:
    """The integer logits: the reference output divided by the final Dequantize's scale."""
    last = cm.integer_graph.graph.find_nodes(op="output")[0].args[0]
    dequantize = cm.integer_graph.get_submodule(str(last.target))
    assert isinstance(dequantize, ops.Dequantize)
    return torch.round(cm.reference(x).double() / dequantize.scale).long()


@pytest.mark.parametrize("keep_bn", [False, True], ids=["bn-folded-by-exporter", "bn-kept"])
@pytest.mark.parametrize("policy", ["w8a8", "w4a8"])
@pytest.mark.parametrize("name", sorted(ROUND_TRIP))
def test_round_trip_through_the_legacy_exporter(name: str, policy: str, keep_bn: bool, tmp_path: Path) -> None:
    model, calibration, x = make(name), random_inputs(64, seed=5), random_inputs(2048, seed=6)
    direct = qcompile.compile(model, calibration[:2], data=lambda: [calibration], policy=policy)
    path = export_legacy(model, tmp_path / f"{name}.onnx", keep_bn=keep_bn)
    ops_in_file = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ("BatchNormalization" in ops_in_file) is (keep_bn and name != "concat")
    imported = qcompile.compile(path, calibration[:2], data=lambda: [calibration], policy=policy)
    assert layers(imported) == layers(direct)
    assert layer_names(imported) == layer_names(direct)  # the exporter names nodes '/<module path>/<Op>'
    a, b = integer_outputs(direct, x), integer_outputs(imported, x)
    rate = float((a != b).double().mean())
    bn = "BN kept" if keep_bn else "BN folded by the exporter"
    print(f"\n{name} {policy} ({bn}): {int((a != b).sum())} of {a.numel()} integer outputs differ ({100 * rate:.3f} %)")
    assert rate <= 1e-3 and int((a - b).abs().max()) <= 1
    assert imported.verify(x[:256]).mismatches == 0


def test_view_with_symbolic_and_static_batch(tmp_path: Path) -> None:
    """x.view(x.size(0), -1): a Shape->Gather->Concat chain (symbolic batch) or [1, -1] (static batch 1)."""

    class ViewNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 2, 3, padding=1), nn.Linear(2 * 4 * 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.max_pool2d(F.relu(self.conv(x)), 2)
            return self.fc(x.view(x.size(0), -1))

    model, x = ViewNet().eval(), random_inputs(16)
    for dynamic in (True, False):
        path = export_legacy(model, tmp_path / f"view_{dynamic}.onnx", dynamic)
        gm = load_onnx(path)
        assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [torch.relu, torch.flatten]
        with torch.no_grad():
            np.testing.assert_allclose(gm(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-5)


def test_cli_compiles_an_onnx_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = export_legacy(make("residual"), tmp_path / "residual.onnx")
    out = tmp_path / "out.onnx"
    args = ["compile", str(path), "--data", "random", "--input-shape", "1,8,8", "-o", str(out), "--no-progress"]
    assert main(args) == 0, capsys.readouterr()
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
