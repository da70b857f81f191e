"""The pass contract: a frozen dataclass whose fields are its options, registered under a kebab name.

``Pass.__call__(gm, ctx)`` checks the stage precondition, runs ``run`` and stamps the stage the pass
produces; ``PassManager`` (passes/manager.py) adds verification, timing, dumps and error wrapping.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
import torch.fx as fx

from qcompile.errors import QCompileError
from qcompile.ir.meta import Stage, get_stage, set_stage

if TYPE_CHECKING:
    from qcompile.data import Dataset


class PreconditionError(QCompileError):
    """A pass was given a graph in the wrong stage or shape."""


class PassError(QCompileError):
    """A pass failed; ``pass_name`` names it and the cause is chained."""

    def __init__(self, pass_name: str, cause: BaseException) -> None:
        self.pass_name = pass_name
        super().__init__(f"pass '{pass_name}' failed: {cause}")


@dataclass
class PassContext:
    """What passes may need beyond the graph: example inputs, calibration batches, data, a cost model, a seed.

    ``calibration`` returns a fresh iterable of input batches each time it is called.
    """

    example_inputs: tuple[torch.Tensor, ...]
    calibration: Callable[[], Iterable[torch.Tensor]] | None = None
    dataset: Dataset | None = None  # labelled data for learned searches
    cost_model: str = "bops"  # a key of cost.COST_MODELS
    seed: int = 0
    progress: bool = False
    notes: list[str] = field(default_factory=list)
    records: dict[str, Any] = field(default_factory=dict)  # what searches/passes learned, for the report
    teacher: fx.GraphModule | None = None  # the float graph insert-quantizers received (for distillation)

    def calibration_batches(self) -> Iterator[torch.Tensor]:
        if self.calibration is None:
            raise PreconditionError("this pass needs calibration data; pass --data (or data= in the API)")
        yield from self.calibration()


@dataclass(frozen=True)
class PassResult:
    gm: fx.GraphModule
    modified: bool


@dataclass(frozen=True)
class Pass:
    """Base of every pass. Subclasses set ``name`` and implement ``run``."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    requires: ClassVar[tuple[Stage, ...]] = ()
    produces: ClassVar[Stage | None] = None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        stage = get_stage(gm)
        if self.requires and stage not in self.requires:
            wanted = " or ".join(s.value for s in self.requires)
            raise PreconditionError(f"'{self.name}' needs a {wanted} graph, got a {stage.value} graph")
        result = self.run(gm, ctx)
        if self.produces is not None:
            set_stage(result.gm, self.produces)
        return result

    def spec(self) -> str:
        """This pass as pipeline text, with the options that differ from their defaults."""
        opts = [
            f"{f.name}={format_value(getattr(self, f.name))}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default
        ]
        return self.name + ("{" + ",".join(opts) + "}" if opts else "")


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


PASSES: dict[str, type[Pass]] = {}
P = TypeVar("P", bound=type[Pass])


def register_pass(cls: P) -> P:
    """Class decorator: make a pass available to pipelines by its ``name``."""
    if not cls.name or cls.name != cls.name.lower() or " " in cls.name or "_" in cls.name:
        raise ValueError(f"pass name {cls.name!r} must be kebab-case")
    if cls.name in PASSES and PASSES[cls.name] is not cls:
        raise ValueError(f"a pass named {cls.name!r} is already registered ({PASSES[cls.name].__module__})")
    PASSES[cls.name] = cls
    return cls


def option_help(cls: type[Pass]) -> list[tuple[str, str, str]]:
    """(name, default, help) for every option of a pass."""
    return [
        (f.name, format_value(f.default), str(f.metadata.get("help", "")))
        for f in dataclasses.fields(cls)
    ]


def option(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse
    return field(default=default, metadata={"help": help})
