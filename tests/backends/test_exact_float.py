"""The integer target's float forms (backends/onnx_exact_float.py): bit-exact where used, refused elsewhere."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
import torch
from conftest import compile_model, make_model, random_inputs

from qcompile.backends import onnx_exact_float as exact_float
from qcompile.backends import onnx_export as ox
from qcompile.backends.ort import run_onnx
from qcompile.ir import contract
from qcompile.ir import intops as ops
from qcompile.ir.meta import IntType


def _chain_model(mult: np.ndarray, shift: np.ndarray, bias: np.ndarray, out: IntType, lo: int, hi: int,
                 bound: int | None, channels: int, width: int) -> onnx.ModelProto:
    e = ox._Emitter()
    acc = gs.Variable("acc", dtype=np.int32, shape=[1, channels, 1, width])
    y = ox.requant_chain(e, "rq", acc, mult, shift, bias, out, lo, hi, 4, acc_bound=bound, channels=channels)
    y.shape = [1, channels, 1, width]
    graph = gs.Graph(nodes=e.nodes, inputs=[acc], outputs=[y], opset=ox.BASE_OPSET, ir_version=10)
    model = gs.export_onnx(graph, do_type_check=True)
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def _hard_accumulators(m: np.ndarray, n: np.ndarray, bias: np.ndarray, bound: int, width: int) -> np.ndarray:
    """Per channel: +-bound, 0, exact ties of the rounding ((acc + b) m = 2^(n-1) mod 2^n, when in range),
    their neighbours and random values, all with |acc| <= bound."""
    rng = np.random.default_rng(0)
    rows = []
    for mm, nn, bb in zip(m.tolist(), n.tolist(), bias.tolist(), strict=True):
        unit = (1 << nn) // np.gcd(mm, 1 << nn)  # (acc + b) steps between exact multiples of 2^-n
        ties = [k * unit // 2 - bb for k in range(-7, 8, 2)] if unit % 2 == 0 else []
        special = [v + d for v in [-bound, 0, bound, *ties] for d in (-1, 0, 1)]
        row = [v for v in special if abs(v) <= bound]
        row += rng.integers(-bound, bound + 1, size=width - len(row)).tolist()
        rows.append(row[:width])
    return np.array(rows, dtype=np.int64)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("form", ["float64", "uint64"])
def test_requantization_chain_is_the_contract_at_its_edges(form: str, signed: bool) -> None:
    channels, width, bound = 6, 64, 2**21
    out = IntType(8, signed)
    reals = np.array([2.0**-12, 3.1e-5, 0.37, 1.9e-3, 2.0**-7 * 1.5, 7.7e-4])
    m, n = contract.quantize_multipliers(reals)
    bias = np.array([0, 1234, -98765, 7, -1, 2**20])
    model = _chain_model(m, n, bias, out, out.lo + 3, out.hi - 5, bound if form == "float64" else None,
                         channels, width)
    ops_used = {node.op_type for node in model.graph.node}
    assert ("BatchNormalization" in ops_used) == (form == "float64")
    assert ("BitShift" in ops_used) == (form == "uint64")
    acc = _hard_accumulators(m, n, bias, bound, width)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"acc": acc.astype(np.int32).reshape(1, channels, 1, width)})
    want = contract.requantize(acc + bias[:, None], m[:, None], n[:, None], out.lo + 3, out.hi - 5) + out.zero_point
    assert np.array_equal(got.reshape(channels, width).astype(np.int64), want)


def test_float64_form_is_refused_beyond_its_exact_range() -> None:
    m, n = contract.quantize_multipliers([2.0**-12])
    args = ([int(m[0])], [int(n[0])], [0])
    fits = 2**53 // (int(m[0]) + 1) - 2**20  # (bound + |b|) m + 2^(n-1) + zp 2^n below 2^53 ...
    e = ox._Emitter()
    acc = gs.Variable("acc", dtype=np.int32)
    assert exact_float.f64_requant(e, "ok", acc, *args, [fits], 0, 0, 255, (), 1) is not None
    assert exact_float.f64_requant(e, "no", acc, *args, [2**53 // int(m[0])], 0, 0, 255, (), 1) is None  # ... not


def test_float_conv_is_refused_when_a_partial_sum_could_reach_2_24() -> None:
    e = ox._Emitter()
    x = gs.Variable("x", dtype=np.uint8)
    w = np.full((2, 64, 3, 3), 127)  # 576 taps * 127 * 255 >= 2^24
    assert 576 * 127 * 255 >= exact_float.F32_EXACT
    assert exact_float.float_conv(e, "big", x, 0, 255, w, np.zeros(2), group=2) is None
    assert exact_float.float_conv(e, "small", x, 0, 255, w[:, :8], np.zeros(2), group=2) is not None


@pytest.mark.parametrize("policy", ["w8a8", "w4a4"])
@pytest.mark.parametrize("signed", [True, False])
def test_depthwise_layers_export_as_exact_float_convs(policy: str, signed: bool) -> None:
    cm = compile_model(make_model("depthwise"), policy, signed=signed, target="integer")
    grouped = [m for m in cm.integer_graph.modules() if isinstance(m, ops.IntConv2d) and m.groups > 1]
    assert grouped
    pools = [m for m in cm.integer_graph.modules() if isinstance(m, ops.IntAvgPool2d)]
    model = cm.to_onnx()
    kinds = [n.op_type for n in model.graph.node]
    assert kinds.count("Conv") == len(grouped) + len(pools)  # every grouped conv and pool in float32
    assert not [n for n in model.graph.node if n.op_type == "ConvInteger"
                and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert "BatchNormalization" in kinds
    x = random_inputs(64, signed, seed=5) * 2.0
    ref = cm.reference(x).numpy()
    (got,) = run_onnx(model, x.numpy())
    assert np.array_equal(ref.view(np.uint32), got.view(np.uint32))
    assert torch.equal(cm(x), cm.reference(x))


def test_dense_float_conv_is_exact_up_to_2_24() -> None:
    """A dense 1x1 conv whose accumulator bound is 2^24 - 1 (518 taps * 127 * 255 + bias) is a float32 Conv
    giving every accumulator bit for bit; one more tap could reach 2^24 and is refused."""
    w = np.full((2, 518, 1, 1), 127)
    w[1, ::2] = -127
    bias = np.array([2**24 - 1 - 518 * 127 * 255, -5])
    e = ox._Emitter()
    x = gs.Variable("x", dtype=np.uint8, shape=[2, 518, 1, 3])
    assert exact_float.float_conv(e, "wide", x, 0, 255, np.full((2, 519, 1, 1), 127), np.zeros(2)) is None
    acc = exact_float.float_conv(e, "dense", x, 0, 255, w, bias)
    assert acc is not None
    acc.shape = [2, 2, 1, 3]
    graph = gs.Graph(nodes=e.nodes, inputs=[x], outputs=[acc], opset=ox.BASE_OPSET, ir_version=10)
    model = gs.export_onnx(graph, do_type_check=True)
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    rng = np.random.default_rng(3)
    q = rng.integers(0, 256, size=(2, 518, 1, 3))
    q[0] = 255  # the first sample reaches the bound: channel 0 accumulates exactly 2^24 - 1
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": q.astype(np.uint8)})
    want = np.einsum("nkhw,ck->nchw", q, w[:, :, 0, 0]) + bias[None, :, None, None]
    assert want[0, 0].max() == 2**24 - 1
    assert np.array_equal(got.astype(np.int64), want)


class _ConvPoolNet(torch.nn.Module):
    """conv -> ReLU -> padded 3x3/2 ceil-mode max pool, conv -> 2x2 max pool, linear: pools after convs."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Conv2d(8, 16, 3)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.max_pool2d(torch.relu(self.a(x)), 3, 2, padding=1, ceil_mode=True)
        x = torch.nn.functional.max_pool2d(self.b(x), 2)
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("form", ["float32", "float64", "after"])
def test_max_pool_runs_on_the_accumulator_before_requantization(form: str, signed: bool,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Integer target: a conv's max pool takes the exact float32 accumulator of a float Conv, or (bound not
    below 2^24, here forced by a smaller limit) ConvInteger's int32 one cast to float64, and the float64
    requantization follows the pool; where the float64 form is not proved exact (forced likewise) the old
    form stays: requantize, then max-pool the uint8 values. Bit-exact every way, padding and ceil mode included."""
    if form == "float64":
        monkeypatch.setattr(exact_float, "F32_EXACT", 2**10)
    if form == "after":
        monkeypatch.setattr(exact_float, "F64_EXACT", 2**20)
    cm = compile_model(_ConvPoolNet().eval(), "w8a8", signed=signed, target="integer", shape=(1, 9, 9))
    model = cm.to_onnx()
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    pools = [n for n in model.graph.node if n.op_type == "MaxPool"]
    assert len(pools) == 2
    before = {"float32": {"Conv"}, "float64": {"Cast"}, "after": {"Cast"}}[form]
    assert {producer[n.input[0]] for n in pools} == before
    types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    pooled_type = {"float32": onnx.TensorProto.FLOAT, "float64": onnx.TensorProto.DOUBLE,
                   "after": onnx.TensorProto.UINT8}[form]
    assert {types[n.output[0]] for n in pools} == {pooled_type}
    assert ("ConvInteger" in producer.values()) == (form != "float32")
    x = random_inputs(64, signed, seed=11, shape=(1, 9, 9)) * 1.5
    (got,) = run_onnx(model, x.numpy())
    ref = cm.reference(x).numpy()
    assert np.array_equal(ref.view(np.uint32), got.view(np.uint32))


@pytest.mark.parametrize("to", [onnx.TensorProto.UINT8, onnx.TensorProto.INT32])
def test_float64_cast_to_an_integer_truncates_in_onnxruntime(to: int) -> None:
    """The float64 chain has no Floor: it relies on Cast truncating non-negative values (not rounding), for
    every fraction class (just above an integer, a half, just below the next) and at every vector tail."""
    from onnx import helper

    graph = helper.make_graph([helper.make_node("Cast", ["x"], ["y"], to=to)], "cast",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.DOUBLE, [None])],
                              [helper.make_tensor_value_info("y", to, [None])])
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
                                .SerializeToString(), providers=["CPUExecutionProvider"])
    k = np.arange(256, dtype=np.float64)
    fractions = [0.0, 2.0**-40, 0.25, 0.5, 0.75, 1.0 - 2.0**-40]
    x = np.concatenate([k + f for f in fractions] + [np.random.default_rng(0).uniform(0, 255.99, 4099)])
    for n in (1, 3, 8, 17, len(x)):
        (y,) = sess.run(None, {"x": x[:n]})
        np.testing.assert_array_equal(y.astype(np.int64), np.floor(x[:n]).astype(np.int64))
