"""Pointwise tables (IntLookup) and products (IntMul): canonical forms, tables vs independent math, both targets.

Every function compiles from its functional and module spelling; the table agrees with float64 math to
half an output step, with the quant graph's own simulation entry by entry, and the reference executor,
the fast executor and onnxruntime (both targets) agree bit for bit.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from conftest import call_targets, compile_model, random_inputs, run_pipeline
from modern import TARGETS, SqueezeExcitation, assert_exact, lookups, pipeline
from torch import nn

import qcompile
from qcompile.backends.reference import run_reference
from qcompile.ir import contract
from qcompile.ir import intops as ops
from qcompile.ir.meta import IntType, NodeInfo, Stage, set_stage
from qcompile.ir.verify import VerificationError, verify
from qcompile.quant import graph, tables
from qcompile.quant.modules import ActQuant
from qcompile.search.base import apply_assignment
from qcompile.search.policies import uniform

_erf = np.vectorize(math.erf)


def _np_sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# name -> (torch form used in the model, independent float64 numpy form)
FUNCTIONS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[np.ndarray], np.ndarray]]] = {
    "silu": (F.silu, lambda x: x * _np_sigmoid(x)),
    "sigmoid": (torch.sigmoid, _np_sigmoid),
    "hardswish": (F.hardswish, lambda x: x * np.clip(x + 3, 0, 6) / 6),
    "hardsigmoid": (F.hardsigmoid, lambda x: np.clip(x / 6 + 0.5, 0, 1)),
    "gelu": (F.gelu, lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2)))),
    "gelu_tanh": (partial(F.gelu, approximate="tanh"),
                  lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))),
    "tanh": (torch.tanh, np.tanh),
    "leaky_relu": (partial(F.leaky_relu, negative_slope=0.1), lambda x: np.where(x > 0, x, 0.1 * x)),
    "elu": (F.elu, lambda x: np.where(x > 0, x, np.expm1(x))),
    "method_sigmoid": (lambda x: x.sigmoid(), _np_sigmoid),
}
MODULES: dict[str, Callable[[], nn.Module]] = {
    "silu": nn.SiLU, "sigmoid": nn.Sigmoid, "hardswish": nn.Hardswish, "hardsigmoid": nn.Hardsigmoid,
    "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "tanh": nn.Tanh,
    "leaky_relu": lambda: nn.LeakyReLU(0.1), "elu": nn.ELU,
}


class Pointwise(nn.Module):
    """conv -> f -> conv: the table's input and output both get their own quantizer."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor] | nn.Module) -> None:
        super().__init__()
        self.conv, self.fn, self.out = nn.Conv2d(1, 4, 3, padding=1), fn, nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fn(self.conv(x)))


@cache
def compiled(name: str, target: str, module: bool = False) -> qcompile.CompiledModel:
    torch.manual_seed(0)
    fn = MODULES[name]() if module else FUNCTIONS[name][0]
    return compile_model(Pointwise(fn).eval(), pipeline=pipeline(target))


def quant_table(cm: qcompile.CompiledModel) -> tuple[tables.TableFunction, ActQuant, ActQuant]:
    """The quant graph's table function with its input and output quantizers."""
    assert cm.quant_graph is not None
    gm = cm.quant_graph
    node = next(n for n in gm.graph.nodes if isinstance(graph.module(gm, n), tables.TableFunction))
    fn = graph.module(gm, node)
    assert isinstance(fn, tables.TableFunction)
    (root,) = graph.roots(gm, node.args[0])  # type: ignore[arg-type]
    out = next(iter(node.users))
    return fn, graph.act_quant(gm, root), graph.act_quant(gm, out)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_table_is_exact_on_every_backend(name: str, target: str) -> None:
    cm = compiled(name, target)
    (op,) = lookups(cm)
    assert op.table.numel() == 2**op.inp.bits - (1 if op.inp.signed else 0)
    assert_exact(cm, random_inputs(32, seed=5) * 2.0)


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_table_matches_independent_math_and_the_simulation(name: str) -> None:
    cm = compiled(name, "ort")
    (op,) = lookups(cm)
    fn, in_q, out_q = quant_table(cm)
    q = np.arange(op.inp.lo, op.inp.hi + 1)
    s_x, s_y = float(in_q.scale), float(out_q.scale)
    ideal = FUNCTIONS[name][1](q * s_x) / s_y
    table = op.table.numpy()
    inside = (ideal > op.lo + 0.5) & (ideal < op.hi - 0.5)
    assert np.abs(table[inside] - ideal[inside]).max() <= 0.5 + 1e-3  # nearest integer, up to float32 inputs
    assert np.array_equal(table[~inside], np.clip(np.rint(ideal[~inside]), op.lo, op.hi))
    with torch.no_grad():  # the simulation on every grid value: f, then the output quantizer
        sim = out_q(fn(in_q(torch.from_numpy(q * s_x).float()))) / out_q.scale
    assert torch.equal(torch.round(sim).to(torch.int64), op.table)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_forms_compile_to_the_same_table(name: str) -> None:
    a, b = compiled(name, "integer"), compiled(name, "integer", module=True)
    assert torch.equal(lookups(a)[0].table, lookups(b)[0].table)
    assert_exact(b, random_inputs(16, seed=6))


def test_canonicalize_makes_every_spelling_a_table_function() -> None:
    class Spellings(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.Hardswish()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(F.silu(x.sigmoid()) + torch.tanh(x)) + F.gelu(x, approximate="tanh")

    gm = run_pipeline(Spellings(), "canonicalize")
    kinds = [t for t in call_targets(gm)]
    assert kinds.count(tables.TableFunction) == 5
    labels = [m.label for m in gm.modules() if isinstance(m, tables.TableFunction)]
    assert "gelu(approximate=tanh)" in labels and "Hardswish()" in labels


def test_x_times_sigmoid_x_is_one_silu_table() -> None:
    class Swish(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return y * torch.sigmoid(y)

    model = Swish()
    gm = run_pipeline(model, "canonicalize")
    assert call_targets(gm) == [nn.Conv2d, tables.TableFunction]
    x = random_inputs(4)
    torch.testing.assert_close(gm(x), F.silu(model.conv(x)))
    fn = next(m for m in gm.modules() if isinstance(m, tables.TableFunction))
    assert fn.key is F.silu


def test_registered_functions_and_modules_become_tables() -> None:
    class Mish(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.tanh(F.softplus(x))

    qcompile.register_table_function(Mish)
    qcompile.register_table_function(torch.atan)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), Mish(), nn.Conv2d(4, 4, 1))

    class WithAtan(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.atan(self.body(x))

    for target in TARGETS:
        cm = compile_model(WithAtan().eval(), pipeline=pipeline(target))
        assert len(lookups(cm)) == 2
        assert_exact(cm, random_inputs(16, seed=2))
    with pytest.raises(TypeError, match="neither a function"):
        qcompile.register_table_function(5)


def test_a_function_not_finite_on_the_input_range_is_refused_naming_the_node() -> None:
    qcompile.register_table_function(torch.log)

    class Log(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.log(x)  # calibrated on x > 0, but q = 0 is on the input grid

    message = r"table function 'log.*' \(log at .*test_pointwise.py:\d+\): f is not finite at x = 0 "
    with pytest.raises(qcompile.QCompileError, match=message):
        compile_model(Log(), signed=False)


def test_a_table_input_wider_than_8_bits_is_refused_and_searches_cap_it() -> None:
    model = Pointwise(F.silu).eval()
    text = "canonicalize,fold-batchnorm,insert-quantizers{acts=12},calibrate{steps=2},lower-integer"
    with pytest.raises(qcompile.QCompileError, match="input has 12 bits; a table takes at most 8"):
        compile_model(model, pipeline=text)
    gm = run_pipeline(model, "canonicalize,insert-quantizers")
    apply_assignment(gm, uniform(["conv", "out"], 8, 12))  # what a search or policy hands back
    bits = {str(n.args[0]): q.bits for n, q in graph.act_quants(gm)}
    assert bits == {"x": 8, "conv": 8, "silu_1": 12, "out": 8}  # only the table's input is capped


# ---------------------------------------------------------------------------------------------- IntMul


class SENet(nn.Module):
    def __init__(self, gate: type[nn.Module]) -> None:
        super().__init__()
        self.stem, self.se, self.head = nn.Conv2d(1, 8, 3, padding=1), SqueezeExcitation(8, 4, gate), nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.se(F.relu(self.stem(x))))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("gate", [nn.Hardsigmoid, nn.Sigmoid])
def test_squeeze_excitation_is_exact_end_to_end(gate: type[nn.Module], target: str) -> None:
    torch.manual_seed(1)
    cm = compile_model(SENet(gate).eval(), pipeline=pipeline(target))
    (mul,) = [m for m in cm.integer_graph.modules() if isinstance(m, ops.IntMul)]
    assert mul.target.value == target and mul.inp[0].signed is False  # the gate, after a sigmoid
    x = random_inputs(32, seed=4)
    assert_exact(cm, x)
    assert cm.quant_graph is not None
    with torch.no_grad():
        sim = cm.quant_graph.eval()(x)
    step = float(next(m for m in cm.integer_graph.modules() if isinstance(m, ops.Dequantize)).scale)
    assert float((sim - cm.reference(x)).abs().max()) <= 2 * step + 1e-6


def _mul_graph(a: IntType, b: IntType, out: IntType, real_m: float, target: str) -> fx.GraphModule:
    g, root = fx.Graph(), nn.Module()
    m, n = contract.quantize_multiplier(real_m)
    root.add_module("mul", ops.IntMul(m, n, inp=(a, b), out=out, lo=out.lo, hi=out.hi,
                                      fmult=contract.float_multipliers([real_m])[0], target=target))
    pa, pb = g.placeholder("a"), g.placeholder("b")
    node = g.call_module("mul", (pa, pb))
    node.meta["qc"] = NodeInfo(itype=out, scale=1.0)
    g.output(node)
    gm = fx.GraphModule(root, g)
    set_stage(gm, Stage.INTEGER)
    return gm


@pytest.mark.parametrize("target", TARGETS)
def test_intmul_follows_the_contract_with_broadcasting(target: str) -> None:
    a_t, b_t, out = IntType(8, True), IntType(8, False), IntType(8, True)
    real_m = 0.0123
    gm = _mul_graph(a_t, b_t, out, real_m, target)
    verify(gm)
    rng = np.random.default_rng(0)
    a = rng.integers(a_t.lo, a_t.hi + 1, size=(3, 4, 5, 6))
    b = rng.integers(b_t.lo, b_t.hi + 1, size=(3, 4, 1, 1))  # a per-channel gate
    got = run_reference(gm, a, b)
    acc = a * b
    if target == "ort":
        want = np.clip(np.rint(acc.astype(np.float32) * np.float32(real_m)), out.lo, out.hi)
    else:
        m, n = contract.quantize_multiplier(real_m)
        want = np.clip((acc * m + (1 << (n - 1))) >> n, out.lo, out.hi)
    assert np.array_equal(got, want)
    fast = gm(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    assert np.array_equal(fast.numpy(), want)


def test_verifier_refuses_a_product_that_can_overflow_int32() -> None:
    wide = IntType(16, False)
    with pytest.raises(VerificationError, match=r"mul: int32 accumulator may overflow \(\|acc\| <= 4294836225"):
        verify(_mul_graph(wide, wide, IntType(8, True), 1e-6, "integer"))


class PReLUNet(nn.Module):
    def __init__(self, slopes: int) -> None:
        super().__init__()
        self.conv, self.act, self.out = nn.Conv2d(1, 4, 3, padding=1), nn.PReLU(slopes), nn.Conv2d(4, 2, 1)
        with torch.no_grad():
            self.act.weight.copy_(torch.linspace(-0.5, 0.75, slopes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.conv(x)))


@pytest.mark.parametrize("frontend", ["pytorch", "onnx"])
@pytest.mark.parametrize("slopes", [1, 4])
def test_prelu_is_a_per_channel_table(slopes: int, frontend: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = PReLUNet(slopes).eval()
    source: nn.Module | str = model
    if frontend == "onnx":
        source = str(tmp_path / "prelu.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (random_inputs(1),), source, dynamo=False, input_names=["x"],
                              dynamic_axes={"x": {0: "N"}})
    for target in TARGETS:
        cm = compile_model(source, pipeline=pipeline(target))
        (op,) = lookups(cm)
        assert tuple(op.table.shape) == ((4, 255) if slopes == 4 else (255,))
        fn, in_q, out_q = quant_table(cm)
        q = torch.arange(op.inp.lo, op.inp.hi + 1, dtype=torch.float64)
        slope = model.act.weight.detach().double().reshape(-1, 1)
        ideal = torch.where(q >= 0, q, slope * q) * float(in_q.scale) / float(out_q.scale)  # independent math
        assert float((op.table - ideal).abs().max()) <= 0.5 + 1e-3
        assert_exact(cm, random_inputs(16, seed=3))


def test_a_function_infinite_on_the_calibration_data_is_named() -> None:
    class Reciprocal(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.reciprocal(torch.relu(self.conv(x)))  # exact zeros after relu: 1/0 = inf

    qcompile.register_table_function(torch.reciprocal)
    with pytest.raises(qcompile.QCompileError, match=r"activation 'reciprocal.*' is not finite"):
        compile_model(Reciprocal())
