"""The pass registry, the Pass contract, user-written passes and the PassManager."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from conftest import compile_model, context, make_model, run_pipeline
from torch import nn

import qcompile
from qcompile.frontends import trace_module
from qcompile.ir.meta import Stage, get_stage
from qcompile.ir.verify import VerificationError
from qcompile.passes import (
    DEFAULT_PIPELINE,
    PASSES,
    Pass,
    PassContext,
    PassError,
    PassManager,
    PassResult,
    parse_pipeline,
    register_pass,
)
from qcompile.passes.base import PreconditionError, option

BUILT_IN = ["canonicalize", "fold-batchnorm", "insert-quantizers", "calibrate", "assign-bitwidths", "share-scales",
            "lower-integer"]  # the default pipeline
OPTIONAL = ["prune-channels", "limit-weight-bits"]  # built-in passes outside the default pipeline
PASSES_DIR = Path(importlib.import_module("qcompile.passes").__file__).parent  # type: ignore[arg-type]


def test_registry_keys_equal_pass_names() -> None:
    assert PASSES is qcompile.PASSES
    for key, cls in PASSES.items():
        assert key == cls.name


@pytest.mark.parametrize("name", BUILT_IN + OPTIONAL)
def test_each_built_in_pass_lives_in_its_own_module(name: str) -> None:
    cls = PASSES[name]
    module = name.replace("-", "_")
    assert cls.__module__ == f"qcompile.passes.{module}"
    assert (PASSES_DIR / f"{module}.py").is_file()
    assert cls.summary, "every pass has a one-line summary"


def test_one_pass_per_module() -> None:
    infrastructure = {"__init__", "base", "manager", "pipeline"}
    modules = sorted(p.stem for p in PASSES_DIR.glob("*.py") if p.stem not in infrastructure)
    registered = sorted(cls.__module__.rsplit(".", 1)[1] for cls in PASSES.values()
                        if cls.__module__.startswith("qcompile.passes."))
    assert registered == modules  # every pass module registers exactly one pass, and every built-in has one
    assert sorted(m.replace("_", "-") for m in modules) == sorted(BUILT_IN + OPTIONAL)


@pytest.mark.parametrize("name", BUILT_IN + OPTIONAL)
def test_passes_are_frozen_dataclasses_whose_fields_are_options(name: str) -> None:
    cls = PASSES[name]
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
    p = cls()
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"option {name}.{f.name} has no help text"
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(p, f.name, f.default)


def test_default_pipeline_uses_only_built_in_passes() -> None:
    assert [s.name for s in parse_pipeline(DEFAULT_PIPELINE).specs] == BUILT_IN


# ------------------------------------------------------------------------------------ a user's pass


@pytest.fixture
def scale_bias() -> Iterator[type[Pass]]:
    """A user-written pass: multiply every conv/linear bias of a float graph by ``factor``."""

    @register_pass
    @dataclass(frozen=True)
    class ScaleBias(Pass):
        name = "scale-bias"
        summary = "multiply conv/linear biases by a factor"
        requires = (Stage.FLOAT,)
        produces = Stage.FLOAT

        factor: float = option(1.0, "the factor")
        enabled: bool = option(True, "off switch")

        def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
            if not self.enabled:
                return PassResult(gm, False)
            with torch.no_grad():
                for m in gm.modules():
                    if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                        m.bias.mul_(self.factor)
            ctx.notes.append(f"scaled biases by {self.factor}")
            return PassResult(gm, True)

    yield ScaleBias
    del PASSES["scale-bias"]


def test_user_pass_runs_inside_a_pipeline_string(scale_bias: type[Pass]) -> None:
    bias = make_model("residual").stem.bias.detach().clone()
    ctx = context()
    gm = run_pipeline(make_model("residual"), "canonicalize,scale-bias{factor=2.5}", ctx)
    assert torch.equal(gm.get_submodule("stem").bias, bias * 2.5)
    assert ctx.notes == ["scaled biases by 2.5"]
    gm = run_pipeline(make_model("residual"), "canonicalize,scale-bias{factor=2.5,enabled=false}")
    assert torch.equal(gm.get_submodule("stem").bias, bias)


def test_user_pass_in_a_full_compile(scale_bias: type[Pass]) -> None:
    text = DEFAULT_PIPELINE.replace("canonicalize", "canonicalize,scale-bias{factor=0.5}")
    cm = compile_model(make_model("mlp"), pipeline=text)
    assert cm.pipeline == text
    assert [t.name for t in cm.timings] == [s.name for s in parse_pipeline(text).specs]
    assert parse_pipeline(text).build()[1] == scale_bias(factor=0.5)  # type: ignore[call-arg]


def test_pass_objects_print_as_pipeline_text() -> None:
    passes = parse_pipeline("insert-quantizers{acts=6},calibrate{steps=4,percentile=99.9},lower-integer").build()
    assert [p.spec() for p in passes] == ["insert-quantizers{acts=6}", "calibrate{steps=4,percentile=99.9}",
                                          "lower-integer"]
    assert parse_pipeline(",".join(p.spec() for p in passes)).build() == passes


def test_registration_checks_names() -> None:
    @dataclass(frozen=True)
    class BadName(Pass):
        name = "Bad_Name"

    with pytest.raises(ValueError, match="kebab-case"):
        register_pass(BadName)

    @dataclass(frozen=True)
    class Impostor(Pass):
        name = "calibrate"

    with pytest.raises(ValueError, match="already registered"):
        register_pass(Impostor)
    assert PASSES["calibrate"].__module__ == "qcompile.passes.calibrate"


# -------------------------------------------------------------------------------------- the manager


@dataclass(frozen=True)
class Explode(Pass):
    name = "explode"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise ValueError("boom")


@dataclass(frozen=True)
class AddSigmoid(Pass):
    """Breaks the float stage's rules: torch.sigmoid is not a float-stage op."""

    name = "add-sigmoid"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            new = gm.graph.call_function(torch.sigmoid, (out.args[0],))
        out.args = (new,)
        gm.recompile()
        return PassResult(gm, True)


def float_graph() -> tuple[fx.GraphModule, PassContext]:
    ctx = context()
    return run_pipeline(make_model("mlp"), "canonicalize", ctx), ctx


def test_failures_become_pass_errors_naming_the_pass() -> None:
    gm, ctx = float_graph()
    passes = parse_pipeline("fold-batchnorm").build() + [Explode()]
    with pytest.raises(PassError, match="pass 'explode' failed: boom") as info:
        PassManager(passes).run(gm, ctx)
    assert info.value.pass_name == "explode"
    assert isinstance(info.value.__cause__, ValueError) and str(info.value.__cause__) == "boom"


def test_precondition_failures_name_the_pass() -> None:
    ctx = context()
    gm = trace_module(make_model("mlp"), ctx.example_inputs)  # TRACED: lower-integer needs QUANT
    with pytest.raises(PassError, match="pass 'lower-integer' failed") as info:
        PassManager(parse_pipeline("lower-integer").build()).run(gm, ctx)
    assert isinstance(info.value.__cause__, PreconditionError)


@pytest.mark.no_verify_around  # this test checks the manager's own verification
def test_manager_verifies_after_each_pass() -> None:
    gm, ctx = float_graph()
    with pytest.raises(PassError, match="pass 'add-sigmoid' failed") as info:
        PassManager([AddSigmoid(), *parse_pipeline("fold-batchnorm").build()]).run(gm, ctx)
    cause = info.value.__cause__
    assert isinstance(cause, VerificationError)
    assert cause.stage is Stage.FLOAT and any("sigmoid" in p for p in cause.problems)


@pytest.mark.no_verify_around
def test_verification_can_be_turned_off() -> None:
    gm, ctx = float_graph()
    out = PassManager([AddSigmoid()], verify_each=False).run(gm, ctx)
    assert any(n.target is torch.sigmoid for n in out.graph.nodes)


@pytest.mark.no_verify_around
def test_manager_verifies_its_input() -> None:
    gm, ctx = float_graph()
    AddSigmoid()(gm, ctx)  # now an invalid FLOAT graph
    with pytest.raises(PassError, match="pass 'input' failed"):
        PassManager(parse_pipeline("fold-batchnorm").build()).run(gm, ctx)


def test_dump_is_called_after_each_pass_and_timings_are_kept() -> None:
    ctx = context()
    gm = trace_module(make_model("residual"), ctx.example_inputs)
    seen: list[tuple[int, str, Stage]] = []
    manager = PassManager(parse_pipeline(DEFAULT_PIPELINE).build(),
                          dump=lambda i, p, g: seen.append((i, p.name, get_stage(g))))
    manager.run(gm, ctx)
    stages = [Stage.FLOAT, Stage.FLOAT, Stage.QUANT, Stage.QUANT, Stage.QUANT, Stage.QUANT, Stage.INTEGER]
    assert seen == list(zip(range(len(BUILT_IN)), BUILT_IN, stages, strict=True))
    assert [t.name for t in manager.timings] == BUILT_IN
    assert all(t.seconds >= 0 for t in manager.timings)


def test_compile_passes_the_dump_through() -> None:
    seen: list[str] = []
    compile_model(make_model("mlp"), dump=lambda i, p, g: seen.append(p.name))
    assert seen == BUILT_IN


def test_pipeline_that_does_not_reach_integer_is_refused() -> None:
    with pytest.raises(qcompile.QCompileError, match="did not end in an integer graph"):
        compile_model(make_model("mlp"), pipeline="canonicalize,fold-batchnorm")
