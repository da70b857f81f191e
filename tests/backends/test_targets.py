"""The two requantization targets: the contract's formulas, every op in every backend, exactness at the edges."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
import torch
from conftest import compile_model, make_model, random_inputs

from qcompile.backends import fast, onnx_export, reference
from qcompile.backends.ort import TargetMismatchError, run_onnx, session, verify
from qcompile.ir import contract
from qcompile.ir import intops as ops
from qcompile.ir.contract import Target
from qcompile.ir.meta import IntType, NodeInfo
from qcompile.passes.base import PreconditionError
from qcompile.passes.lower_integer import LowerInteger

U8, S8 = IntType(8, False), IntType(8, True)


@pytest.mark.parametrize("target", list(Target))
def test_every_integer_op_has_a_kernel_in_every_backend_and_an_emitter_per_target(target: Target) -> None:
    missing = [op.__name__ for op in ops.INTEGER_MODULES
               if op not in reference._KERNELS or op not in fast._KERNELS or op not in onnx_export.emitters(target)]
    assert missing == []


def test_f32_requantization_rounds_half_to_even_after_one_float32_multiply() -> None:
    acc = np.array([1, 3, 5, -1, -3, 7, 2**24 + 1, -(2**24) - 3], dtype=np.int64)
    got = contract.requantize_f32(acc, np.float32(0.5), -(2**31), 2**31)
    # 0.5, 1.5, 2.5, -0.5, -1.5 round to even; 2^24 + 1 is rounded to 2^24 by the conversion to float32
    assert got.tolist() == [0, 2, 2, 0, -2, 4, 2**23, -(2**23) - 2]
    dyadic = contract.requantize(acc[:6], *contract.quantize_multipliers([0.5]), -(2**31), 2**31)
    assert dyadic.tolist() == [1, 2, 3, 0, -1, 4]  # the integer target rounds half up: the targets differ


def test_float_multipliers_refuse_what_the_dyadic_form_refuses() -> None:
    assert contract.float_multipliers([0.1, 3.0]).dtype == np.float32
    for bad in (0.0, -1.0, float("nan"), float("inf"), 2.0**30):
        with pytest.raises(contract.MultiplierError):
            contract.float_multipliers([bad])


def test_unknown_target_is_refused_with_the_valid_ones() -> None:
    with pytest.raises(PreconditionError, match="valid: integer, ort"):
        LowerInteger(target="fpga")


def _wide_linear(target: Target, inputs: int = 2048) -> tuple[torch.nn.Module, torch.Tensor]:
    """One u8 x i8 linear whose accumulators reach 255 * 127 * 2048 ~ 2^26, beyond float32's exact integers."""
    weight = torch.full((3, inputs), 127, dtype=torch.int64)
    weight[1, ::2] = -127
    weight[2, ::3] = 5
    m, n = contract.quantize_multipliers([3.1e-6, 2.9e-6, 1.7e-5])
    fm = contract.float_multipliers([3.1e-6, 2.9e-6, 1.7e-5])
    op = ops.IntLinear(weight, [1001, -77, 3], m, n, inp=U8, w_type=S8, out=U8, lo=0, hi=255, fmult=fm,
                       target=target)
    return op, torch.randint(200, 256, (16, inputs)).to(torch.int64)


def _single_op_model(op: ops.IntOp, target: Target, inputs: int, outputs: int) -> onnx.ModelProto:
    """The target's ONNX emitter for one op on a uint8 input (no boundary ops), checked."""
    e = onnx_export._Emitter(target)
    x = gs.Variable("x", dtype=np.uint8, shape=["batch", inputs])
    g = torch.fx.Graph()
    placeholder = g.placeholder("x")
    placeholder.meta["qc"] = NodeInfo(shape=(1, inputs))
    y = onnx_export.emitters(target)[type(op)](e, g.call_module("layer", (placeholder,)), op, [x])
    y.shape = ["batch", outputs]
    graph = gs.Graph(nodes=e.nodes, inputs=[x], outputs=[y], opset=e.opset, ir_version=onnx_export.IR_VERSION[e.opset])
    model = gs.export_onnx(graph)
    model.ir_version = onnx_export.IR_VERSION[e.opset]
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("target", list(Target))
def test_accumulators_beyond_two_to_the_24_stay_exact_in_onnxruntime(target: Target) -> None:
    """u8 x i8 sums over 2048 inputs reach 255 * 127 * 2048 ~ 2^26: float32(acc) rounds, as the contract says."""
    weight = torch.full((3, 2048), 127, dtype=torch.int64)
    weight[1, ::2], weight[2, ::3] = -127, 5
    reals = [3.1e-6, 2.9e-6, 1.7e-5]
    op = ops.IntLinear(weight, [1001, -77, 3], *contract.quantize_multipliers(reals), inp=U8, w_type=S8, out=U8,
                       lo=0, hi=255, fmult=contract.float_multipliers(reals), target=target)
    q = torch.randint(200, 256, (16, 2048), generator=torch.Generator().manual_seed(5)).to(torch.int64)
    assert int(np.abs(q.numpy() @ weight.numpy().T).max()) > 2**24
    ref = reference._KERNELS[ops.IntLinear](op, q.numpy())
    assert torch.equal(fast.run_op(op, q.float()), torch.from_numpy(ref).float())
    (got,) = run_onnx_u8(_single_op_model(op, target, 2048, 3), q.numpy().astype(np.uint8))
    assert np.array_equal(got.astype(np.int64), ref)


def run_onnx_u8(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return list(session(model).run(None, {"x": x}))


@pytest.mark.parametrize("name", ["residual", "mlp"])
def test_a_file_of_the_other_target_is_refused_by_verify(name: str) -> None:
    ort_cm = compile_model(make_model(name), "w4a8", target="ort")
    int_cm = compile_model(make_model(name), "w4a8", target="integer")
    x = random_inputs(8)
    with pytest.raises(TargetMismatchError, match="follows target 'integer'.*--target integer"):
        verify(ort_cm.integer_graph, int_cm.to_onnx(), x)
    meta = {p.key: p.value for p in ort_cm.to_onnx().metadata_props}
    assert meta == {"qcompile.target": "ort", "qcompile.ort_cpu": "any"}
    assert {p.key: p.value for p in int_cm.to_onnx().metadata_props} == {"qcompile.target": "integer"}


def test_ort_target_uses_the_fused_kernel_and_fewer_nodes() -> None:
    ort_cm = compile_model(make_model("residual"), "w8a8", target="ort")
    int_cm = compile_model(make_model("residual"), "w8a8", target="integer")
    ort_types = [n.op_type for n in ort_cm.to_onnx().graph.node]
    int_types = [n.op_type for n in int_cm.to_onnx().graph.node]
    assert "QLinearConv" in ort_types and "ConvInteger" not in ort_types and "BitShift" not in ort_types
    assert 3 * len(ort_types) < 2 * len(int_types)  # one QLinearConv for ConvInteger + a four-op chain


def test_the_targets_agree_except_at_rounding_ties() -> None:
    """Both contracts compute the same integers but for near-ties of the requantization (rare)."""
    x = random_inputs(64) * 2
    a = compile_model(make_model("residual"), "w8a8", target="ort")(x)
    b = compile_model(make_model("residual"), "w8a8", target="integer")(x)
    assert float((a != b).float().mean()) < 0.02


@pytest.mark.parametrize("cpu", ["any", "vnni"])
def test_ort_cpu_choice_is_recorded_and_bit_exact_where_it_promises(cpu: str) -> None:
    cm = compile_model(make_model("depthwise"), "w8a8", target="ort", ort_cpu=cpu)
    x = random_inputs(16) * 2
    (got,) = run_onnx(cm.to_onnx(), x.numpy())
    meta = {p.key: p.value for p in cm.to_onnx().metadata_props}
    assert meta["qcompile.ort_cpu"] == cpu
    if cpu == "any":
        assert np.array_equal(got, cm.reference(x).numpy())
