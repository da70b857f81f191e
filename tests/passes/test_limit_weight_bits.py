"""limit-weight-bits and ``ort_cpu="avx2"``: 7-bit weights, int8 kernels everywhere, exact, recorded."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import compile_model, make_model, random_inputs
from onnx import numpy_helper

from qcompile.api import ModelError
from qcompile.backends.ort import run_onnx
from qcompile.ir import intops as ops
from qcompile.passes.base import PassError
from qcompile.quant import graph


def _layers(cm: object) -> list[ops.IntConv2d | ops.IntLinear]:
    gm = cm.integer_graph  # type: ignore[attr-defined]
    return [m for m in gm.modules() if isinstance(m, (ops.IntConv2d, ops.IntLinear))]


def _weight_types(model: onnx.ModelProto) -> set[int]:
    inits = {i.name: i for i in model.graph.initializer}
    index = {"QLinearConv": 3, "MatMulInteger": 1, "ConvInteger": 1}
    return {inits[n.input[index[n.op_type]]].data_type for n in model.graph.node
            if n.op_type in index and n.input[index[n.op_type]] in inits}


@pytest.mark.parametrize("name", ["residual", "depthwise", "mlp"])
def test_avx2_quantizes_eight_bit_weights_to_seven_and_stays_exact(name: str) -> None:
    cm = compile_model(make_model(name), "w8a8", target="ort", ort_cpu="avx2")
    assert "share-scales,limit-weight-bits,lower-integer" in cm.pipeline  # bits=7 is its default
    assert cm.records["limit-weight-bits"]["layers"]
    assert all(m.w_type.bits == 7 and int(m.weight.abs().max()) <= 63 for m in _layers(cm))
    assert all(layer.weight_quant.bits == 7 for _, layer in graph.layers(cm.quant_graph))  # simulation too
    model = cm.to_onnx()
    assert _weight_types(model) == {onnx.TensorProto.INT8}  # u8 x s8 kernels, never u8 x u8
    assert {p.key: p.value for p in model.metadata_props}["qcompile.ort_cpu"] == "avx2"
    x = random_inputs(64) * 2
    (got,) = run_onnx(model, x.numpy())
    assert np.array_equal(got.view(np.uint32), cm.reference(x).numpy().view(np.uint32))
    assert torch.equal(cm(x), cm.reference(x))
    with torch.no_grad():
        sim = cm.quant_graph.eval()(x)
    scale = float(next(m for m in cm.integer_graph.modules() if isinstance(m, ops.Dequantize)).scale)
    assert float(((sim - cm(x)).abs() / scale).max()) == 0.0


def test_any_keeps_eight_bit_weights_on_the_u8_kernels() -> None:
    cm = compile_model(make_model("mlp"), "w8a8", target="ort", ort_cpu="any")
    assert "limit-weight-bits" not in cm.pipeline
    assert max(int(m.weight.abs().max()) for m in _layers(cm)) > 63
    assert onnx.TensorProto.UINT8 in _weight_types(cm.to_onnx())


def test_narrower_weights_are_left_alone() -> None:
    cm = compile_model(make_model("mlp"), "w4a8", target="ort", ort_cpu="avx2")
    assert cm.records["limit-weight-bits"]["layers"] == []
    assert all(m.w_type.bits == 4 for m in _layers(cm))


def test_avx2_is_refused_for_the_integer_target_and_unknown_cpus() -> None:
    with pytest.raises(ModelError, match="avx2.*drop it for target integer"):
        compile_model(make_model("mlp"), "w8a8", target="integer", ort_cpu="avx2")
    with pytest.raises(ModelError, match=r"unknown ort_cpu 'avx512' \(valid: any, avx2, vnni\)"):
        compile_model(make_model("mlp"), "w8a8", ort_cpu="avx512")


def test_the_pass_refuses_a_width_outside_2_to_8() -> None:
    with pytest.raises(PassError, match="bits must be between 2 and 8"):
        compile_model(make_model("mlp"), pipeline="canonicalize,insert-quantizers,calibrate,assign-bitwidths,"
                      "limit-weight-bits{bits=9},lower-integer")


def test_a_seven_bit_weight_is_stored_as_its_code() -> None:
    cm = compile_model(make_model("mlp"), "w8a8", ort_cpu="avx2")
    inits = {i.name: i for i in cm.to_onnx().graph.initializer}
    node = next(n for n in cm.to_onnx().graph.node if n.op_type == "MatMulInteger")
    stored = numpy_helper.to_array(inits[node.input[1]]).astype(np.int64)
    assert np.array_equal(stored.T, _layers(cm)[0].weight.to(torch.int64).numpy())
