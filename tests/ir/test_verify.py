"""Per-stage verifiers: each refuses the ops its stage does not allow; the integer one proves no int32 overflow."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from conftest import compile_model, make_model, run_pipeline
from torch import nn

from qcompile.ir import intops as ops
from qcompile.ir.contract import INT32_MAX
from qcompile.ir.meta import META_KEY, IntType, NodeInfo, Stage, set_stage
from qcompile.ir.verify import VerificationError, verify
from qcompile.quant.modules import QConv2d

U16, S16, U8 = IntType(16, False), IntType(16, True), IntType(8, False)


def integer_graph(op: nn.Module, inp: IntType) -> fx.GraphModule:
    """x -> Quantize -> op -> Dequantize, with the meta the integer stage requires."""
    root, graph = nn.Module(), fx.Graph()
    x = graph.placeholder("x")
    root.add_module("q", ops.Quantize(0.1, inp))
    q = graph.call_module("q", (x,))
    q.meta[META_KEY] = NodeInfo(itype=inp, scale=0.1)
    root.add_module("layer", op)
    y = graph.call_module("layer", (q,))
    y.meta[META_KEY] = NodeInfo(itype=op.out, scale=0.2)
    root.add_module("dq", ops.Dequantize(0.2, op.out))
    out = graph.call_module("dq", (y,))
    out.meta[META_KEY] = NodeInfo(itype=op.out, scale=0.2)
    graph.output(out)
    gm = fx.GraphModule(root, graph)
    set_stage(gm, Stage.INTEGER)
    return gm


def conv(weight: torch.Tensor, bias: list[int], inp: IntType, w_type: IntType) -> ops.IntConv2d:
    c = weight.shape[0]
    return ops.IntConv2d(weight, bias, [2**30] * c, [40] * c, inp=inp, w_type=w_type, out=U8, lo=0, hi=255,
                         padding=(1, 1))


def test_overflowing_conv_is_refused() -> None:
    weight = torch.full((2, 8, 3, 3), 32767)  # 72 * 32767 * 65535 ~ 1.5e11 > 2^31
    gm = integer_graph(conv(weight, [0, 0], U16, S16), U16)
    with pytest.raises(VerificationError, match="int32 accumulator may overflow") as info:
        verify(gm)
    assert info.value.stage is Stage.INTEGER
    (problem,) = info.value.problems
    assert problem.startswith("layer:") and "u16" in problem and "i16" in problem


def test_same_conv_with_8_bit_input_passes() -> None:
    weight = torch.full((2, 8, 3, 3), 127)
    verify(integer_graph(conv(weight, [0, 0], U8, IntType(8, True)), U8))


@pytest.mark.parametrize(("extra", "ok"), [(0, True), (1, False)])
def test_overflow_bound_is_tight(extra: int, ok: bool) -> None:
    # sum|w| * max|x| + |b| with sum|w| = 32767 and x up to 65535: the bias brings it to exactly 2^31 - 1
    weight = torch.zeros(1, 4, dtype=torch.int64)
    weight[0, :2] = torch.tensor([32767 - 100, -100])
    bias = INT32_MAX - 32767 * 65535 + extra
    op = ops.IntLinear(weight, [-bias], [2**30], [40], inp=U16, w_type=S16, out=U8, lo=0, hi=255)
    gm = integer_graph(op, U16)
    if ok:
        verify(gm)
    else:
        with pytest.raises(VerificationError, match="overflow"):
            verify(gm)


def test_compiled_graphs_verify(any_model: nn.Module) -> None:
    verify(compile_model(any_model, "w4a8").integer_graph)


# ------------------------------------------------------------------------------ disallowed ops per stage


def add_before_output(gm: fx.GraphModule, op: str, target: object) -> fx.Node:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        node = gm.graph.create_node(op, target, (out.args[0],))
    out.args = (node,)
    gm.recompile()
    return node


def float_graph() -> fx.GraphModule:
    return run_pipeline(make_model("mlp"), "canonicalize,fold-batchnorm")


def quant_graph() -> fx.GraphModule:
    return run_pipeline(make_model("residual"), "canonicalize,fold-batchnorm,insert-quantizers")


def test_float_stage_refuses_other_functions_methods_and_modules() -> None:
    gm = float_graph()
    verify(gm)
    add_before_output(gm, "call_function", torch.sigmoid)
    add_before_output(gm, "call_method", "tanh")
    gm.add_submodule("act", nn.GELU())
    add_before_output(gm, "call_module", "act")
    with pytest.raises(VerificationError) as info:
        verify(gm)
    problems = " | ".join(info.value.problems)
    assert len(info.value.problems) == 3
    assert "function sigmoid not allowed" in problems
    assert "call_method tanh not allowed" in problems
    assert "module GELU not allowed" in problems


def test_float_stage_refuses_quantizers() -> None:
    gm = quant_graph()
    set_stage(gm, Stage.FLOAT)
    with pytest.raises(VerificationError, match="module ActQuant not allowed"):
        verify(gm)


def test_quant_stage_refuses_unquantized_layers() -> None:
    gm = quant_graph()
    verify(gm)
    q = gm.get_submodule("conv1")
    assert isinstance(q, QConv2d)
    plain = nn.Conv2d(q.in_channels, q.out_channels, q.kernel_size, padding=q.padding)
    gm.conv1 = plain
    with pytest.raises(VerificationError, match="conv1: module Conv2d not allowed"):
        verify(gm)


def test_quant_stage_needs_an_input_quantizer() -> None:
    gm = quant_graph()
    ph = next(n for n in gm.graph.nodes if n.op == "placeholder")
    (quant,) = ph.users
    quant.replace_all_uses_with(ph)
    gm.graph.erase_node(quant)
    gm.recompile()
    with pytest.raises(VerificationError, match="graph input without an input quantizer"):
        verify(gm)


def test_integer_stage_refuses_float_ops() -> None:
    gm = compile_model(make_model("mlp")).integer_graph
    add_before_output(gm, "call_function", torch.relu)
    with pytest.raises(VerificationError, match="function relu not allowed"):
        verify(gm)
    gm = compile_model(make_model("mlp")).integer_graph
    gm.add_submodule("fl", nn.Linear(3, 3))
    node = add_before_output(gm, "call_module", "fl")
    node.meta[META_KEY] = NodeInfo(itype=U8, scale=1.0)
    with pytest.raises(VerificationError, match="module Linear not allowed"):
        verify(gm)


def test_integer_stage_needs_types_and_scales() -> None:
    gm = compile_model(make_model("mlp")).integer_graph
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target),
                                                                                  ops.IntLinear))
    del node.meta[META_KEY]
    with pytest.raises(VerificationError, match=f"{node.name}: integer value without itype/scale"):
        verify(gm)


def test_traced_stage_accepts_anything() -> None:
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sigmoid()))
    add_before_output(gm, "call_method", "tanh")
    verify(gm)  # stage TRACED: the frontend's output, checked by canonicalize instead


def test_many_problems_are_summarised() -> None:
    gm = float_graph()
    for _ in range(7):
        add_before_output(gm, "call_function", torch.sigmoid)
    with pytest.raises(VerificationError, match=r"\(and 2 more\)") as info:
        verify(gm)
    assert len(info.value.problems) == 7


# ------------------------------------------------------------------ adversarial constants (a sound proof)


INT64_MIN = -(2**63)
S8 = IntType(8, True)


def small_linear(bias: list[int], mult: int = 2**30, shift: int = 40, weight: int = 1) -> ops.IntLinear:
    return ops.IntLinear(torch.full((1, 4), weight), bias, [mult], [shift], inp=U8, w_type=S8, out=U8,
                         lo=0, hi=255)


@pytest.mark.parametrize(("bias", "why"), [
    (INT64_MIN, "bias value"),  # round(1e30) saturated: abs() of it stays negative in int64
    (INT64_MIN + 1, "bias value"),
    (2**31, "bias value"),
    (-(2**31), "bias value"),
])
def test_saturated_or_oversized_bias_is_refused(bias: int, why: str) -> None:
    with pytest.raises(VerificationError, match=why):
        verify(integer_graph(small_linear([bias]), U8))


def test_bound_is_exact_for_a_saturated_bias() -> None:
    from qcompile.backends.fast import accumulator_bound

    assert accumulator_bound(small_linear([INT64_MIN])) == 4 * 255 + 2**63


@pytest.mark.parametrize(("mult", "shift", "why"), [
    (0, 40, "multiplier"), (-5, 40, "multiplier"), (2**31, 40, "multiplier"), (2**40, 40, "multiplier"),
    (2**30, 0, "shift"), (2**30, 63, "shift"), (2**30, -1, "shift"),
])
def test_extreme_multipliers_are_refused(mult: int, shift: int, why: str) -> None:
    with pytest.raises(VerificationError, match=why):
        verify(integer_graph(small_linear([0], mult, shift), U8))


def test_weights_outside_their_type_are_refused() -> None:
    with pytest.raises(VerificationError, match=r"weight\(s\) \[300"):
        verify(integer_graph(small_linear([0], weight=300), U8))


def test_non_finite_boundary_scale_is_refused() -> None:
    gm = integer_graph(small_linear([0]), U8)
    gm.get_submodule("q").scale = float("nan")
    with pytest.raises(VerificationError, match="scale nan"):
        verify(gm)
