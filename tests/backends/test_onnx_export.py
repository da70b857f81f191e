"""Integer ONNX export: checker-valid, standard ops, packed sub-8-bit weights, bit-exact in onnxruntime."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import compile_model, make_model, random_inputs
from onnx import numpy_helper

import qcompile
from qcompile.backends.onnx_export import ExportError
from qcompile.backends.ort import run_onnx
from qcompile.ir import intops as ops

MODELS = ["residual", "depthwise", "concat", "mlp"]
POLICIES = ["w8a8", "w4a4", "w4a8", "aqt", "w2a8", "w3a5"]
TARGETS = ["ort", "integer"]


@cache
def compiled(name: str, policy: str, signed: bool, target: str = "ort") -> qcompile.CompiledModel:
    """One compile per (model, policy, input sign, target) and worker process; tests must not mutate it."""
    return compile_model(make_model(name), policy, signed=signed, target=target)


def wide_inputs(signed: bool) -> torch.Tensor:
    x = random_inputs(48, signed, seed=11)
    return x * 3.0 if signed else x * 1.5  # beyond the calibrated range too: saturation is exercised



def assert_bit_exact(cm: qcompile.CompiledModel, x: torch.Tensor) -> None:
    ref = cm.reference(x)
    (got,) = run_onnx(cm.to_onnx(), x.numpy())
    assert got.dtype == np.float32 and got.shape == tuple(ref.shape)
    differ = int(np.sum(ref.numpy().view(np.uint32) != got.view(np.uint32)))
    assert differ == 0, f"{differ} of {got.size} outputs differ between onnxruntime and the reference executor"
    assert torch.equal(cm(x), ref), "fast executor != reference"
    result = cm.verify(x)
    assert (result.mismatches, result.compared) == (0, ref.numel())


def layer_ops(cm: qcompile.CompiledModel) -> list[ops.IntConv2d | ops.IntLinear]:
    return [m for m in cm.integer_graph.modules() if isinstance(m, (ops.IntConv2d, ops.IntLinear))]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("signed", [True, False], ids=["signed-input", "positive-input"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", MODELS)
def test_onnxruntime_is_bit_exact(name: str, policy: str, signed: bool, target: str) -> None:
    cm = compiled(name, policy, signed, target)
    assert cm.target.value == target
    quantize = next(m for m in cm.integer_graph.modules() if isinstance(m, ops.Quantize))
    assert quantize.out.signed is signed  # the input quantizer follows the calibration data's sign
    model = cm.to_onnx()
    onnx.checker.check_model(model, full_check=True)
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}, "custom domains in the default export"
    assert_bit_exact(cm, wide_inputs(signed))


@pytest.mark.parametrize("name", MODELS)
def test_boundary_quantize_ties_match_onnxruntime(name: str) -> None:
    """Inputs on and next to the rounding ties of the input quantizer (x / s = k + 1/2 in float32)."""
    cm = compiled(name, "w8a8", True)
    quantize = next(m for m in cm.integer_graph.modules() if isinstance(m, ops.Quantize))
    s = np.float32(quantize.scale)
    ties = (np.arange(-130, 130, dtype=np.float32) + np.float32(0.5)) * s
    below, above = np.nextafter(ties, np.float32(-np.inf)), np.nextafter(ties, np.float32(np.inf))
    values = np.concatenate([ties, below, above]).astype(np.float32)
    per_sample = int(np.prod(cm.example_inputs[0].shape[1:]))
    values = np.resize(values, (len(values) // per_sample + 1) * per_sample)
    x = torch.from_numpy(values.reshape(-1, *cm.example_inputs[0].shape[1:]).copy())
    assert_bit_exact(cm, x)


WEIGHT_INPUT = {"ConvInteger": 1, "QLinearConv": 3, "MatMulInteger": 1}  # where each layer op takes its weight


def stored_weights(model: onnx.ModelProto) -> list[tuple[onnx.TensorProto, bool]]:
    """(weight initializer, stored transposed) of every conv/linear, through its Cast when packed; pools skipped."""
    inits = {init.name: init for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    weights = []
    for node in model.graph.node:
        if node.op_type not in WEIGHT_INPUT or "pool" in node.name:
            continue
        src = node.input[WEIGHT_INPUT[node.op_type]]
        init = inits[src] if src in inits else inits[producers[src].input[0]]
        weights.append((init, node.op_type == "MatMulInteger"))  # MatMulInteger holds W^T: [in, out]
    return weights


def stored_values(init: onnx.TensorProto, transposed: bool, zero_point: int) -> np.ndarray:
    values = numpy_helper.to_array(init).astype(np.int64) - zero_point
    return values.T if transposed else values


PACKED = {  # target -> policy -> (storage type, zero point)
    "integer": {"w4a8": (onnx.TensorProto.UINT4, 8), "w3a5": (onnx.TensorProto.UINT4, 8),
                "w2a8": (onnx.TensorProto.UINT2, 1)},
    "ort": {"w4a8": (onnx.TensorProto.INT4, 0), "w3a5": (onnx.TensorProto.INT4, 0),
            "w2a8": (onnx.TensorProto.INT2, 0)},
}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("policy", ["w4a8", "w3a5", "w2a8"])
@pytest.mark.parametrize("name", ["residual", "mlp"])
def test_sub_8_bit_weights_are_stored_packed(name: str, policy: str, target: str) -> None:
    storage, zero_point = PACKED[target][policy]
    cm = compiled(name, policy, True, target)
    model = cm.to_onnx()
    weights, layers = stored_weights(model), layer_ops(cm)
    assert len(weights) == len(layers)
    for (init, transposed), layer in zip(weights, layers, strict=True):
        assert init.data_type == storage
        stored = stored_values(init, transposed, zero_point)
        expected = layer.weight.to(torch.int64).numpy()
        assert np.array_equal(stored.reshape(expected.shape[0], -1), expected.reshape(expected.shape[0], -1))
    if policy == "w2a8":
        assert model.opset_import[0].version >= 25  # 2-bit types need opset 25
        assert {int(v) for layer in layers for v in layer.weight.unique()} <= {-1, 0, 1}  # ternary


@pytest.mark.parametrize(("target", "ort_cpu", "op_type", "dtype", "zero_point"), [
    ("integer", "any", "MatMulInteger", onnx.TensorProto.UINT8, 128),
    ("ort", "any", "MatMulInteger", onnx.TensorProto.UINT8, 128),  # u8 x u8: exact on AVX2 without VNNI
    ("ort", "vnni", "MatMulInteger", onnx.TensorProto.INT8, 0),
])
def test_eight_bit_weights_storage(target: str, ort_cpu: str, op_type: str, dtype: int, zero_point: int) -> None:
    cm = compile_model(make_model("mlp"), "w8a8", target=target, ort_cpu=ort_cpu)
    model = cm.to_onnx()
    inits = {init.name: init for init in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == op_type]
    assert len(convs) == 2  # the weights below are initializers: no Cast in front of them
    for conv, layer in zip(convs, layer_ops(cm), strict=True):
        w, wzp = inits[conv.input[WEIGHT_INPUT[op_type]]], inits[conv.input[WEIGHT_INPUT[op_type] + 2]]
        assert w.data_type == wzp.data_type == dtype
        assert set(numpy_helper.to_array(wzp).reshape(-1).tolist()) == {zero_point}
        stored = stored_values(w, op_type == "MatMulInteger", zero_point)
        assert np.array_equal(stored.reshape(layer.weight.shape), layer.weight.to(torch.int64).numpy())
    assert model.opset_import[0].version == 21


@pytest.mark.parametrize("target", TARGETS)
def test_packed_files_are_smaller(target: str) -> None:
    sizes = {p: len(compiled("mlp", p, True, target).to_onnx().SerializeToString()) for p in ("w8a8", "w4a8", "w2a8")}
    weights = sum(layer.weight.numel() for layer in layer_ops(compiled("mlp", "w8a8", True, target)))
    # 4-bit storage saves half a byte per weight, 2-bit storage three quarters (minus a Cast node per layer)
    assert sizes["w4a8"] < sizes["w8a8"] - weights // 2 + 200
    assert sizes["w2a8"] < sizes["w4a8"] - weights // 4 + 200


@pytest.mark.parametrize("name", MODELS)
def test_compiling_twice_gives_identical_onnx_bytes(name: str) -> None:
    first = compile_model(make_model(name), "aqt").to_onnx().SerializeToString()
    second = compile_model(make_model(name), "aqt").to_onnx().SerializeToString()
    assert first == second


def test_compiling_a_deep_copy_gives_identical_onnx_bytes() -> None:
    model = make_model("residual")
    first = compile_model(model, "w4a8").to_onnx().SerializeToString()
    assert compile_model(copy.deepcopy(model), "w4a8").to_onnx().SerializeToString() == first


def test_sixteen_bit_activations_refuse_export() -> None:
    cm = compile_model(make_model("residual"), "w8a16")
    assert any(getattr(m, "out", None) is not None and m.out.bits == 16 for m in cm.integer_graph.modules())
    x = random_inputs(4, seed=3)
    assert torch.equal(cm(x), cm.reference(x))  # the executors run it...
    with pytest.raises(ExportError, match="16-bit"):  # ...the export refuses it
        cm.to_onnx()


def test_save_onnx_round_trip(tmp_path: Path) -> None:
    cm = compiled("concat", "w4a8", True)
    path = cm.save_onnx(tmp_path / "model.onnx")
    loaded = onnx.load(str(path))
    onnx.checker.check_model(loaded, full_check=True)
    x = wide_inputs(True)
    (got,) = run_onnx(loaded, x.numpy())
    assert np.array_equal(got, cm.reference(x).numpy())
    with pytest.raises(qcompile.QCompileError, match="already exists"):
        cm.save_onnx(path)


class _CeilPoolNet(torch.nn.Module):
    """3x3 maps max-pooled k2 s2 p1 with ceil_mode: PyTorch keeps 2x2 windows (a third would start in the end
    padding), ONNX's ceil_mode formula says 3x3. One pool is a conv's only user (fused), one pools a sum."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(1, 2, 1, stride=2)
        self.b = torch.nn.Conv2d(2, 2, 1)
        self.c = torch.nn.Conv2d(2, 2, 1)
        self.fc = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.a(x))
        fused = torch.nn.functional.max_pool2d(torch.relu(self.b(x)), 2, 2, padding=1, ceil_mode=True)
        alone = torch.nn.functional.max_pool2d(x + torch.relu(self.c(x)), 2, 2, padding=1, ceil_mode=True)
        return self.fc(torch.cat([fused, alone], 1).flatten(1))


@pytest.mark.parametrize("target", ["ort", "integer"])
def test_ceil_mode_max_pool_keeps_pytorch_output_size(target: str) -> None:
    torch.manual_seed(0)
    cm = compile_model(_CeilPoolNet().eval(), shape=(1, 5, 5), target=target)
    model = cm.to_onnx()
    onnx.checker.check_model(model, full_check=True)
    x = random_inputs(8, shape=(1, 5, 5))
    (got,) = run_onnx(model, x.numpy())
    np.testing.assert_array_equal(got, cm.reference(x).numpy())
