"""The search interface: every bit-width search maps (quant graph, data, cost model) to an Assignment.

A search is a pass (it registers with ``register_pass``, takes options and runs in pipelines like any
pass) whose ``search`` returns an ``Assignment``; ``run`` then writes it into the quantizers with
``apply_assignment``. Policies are searches that need no data; learned searches read the labelled data
set and the cost model from the PassContext. ``searches()`` lists every registered search.

``apply_assignment``: a layer's ``w`` bits go to its weight quantizer, its ``a`` bits to the quantizer(s)
that define its input's scale (the largest request wins when several layers read one tensor). Other
activations get the assignment's default; graph inputs and outputs stay 8-bit (the network input counts as
8-bit, and the logits keep their resolution). The input of a lookup table is capped at 8 bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch.fx as fx

from qcompile.ir.meta import IntType, Stage
from qcompile.ir.rewrite import input_node
from qcompile.passes.base import PASSES, Pass, PassContext, PassResult, PreconditionError, option
from qcompile.quant import graph
from qcompile.quant.modules import QConv2d
from qcompile.quant.tables import cap_table_inputs
from qcompile.search.policies import Assignment

IO_BITS = 8


def check_choice(search: str, option_name: str, value: str, choices: Sequence[str]) -> None:
    """Refuse an option value outside ``choices`` when the search is built (not after the model loaded)."""
    if value not in choices:
        raise PreconditionError(f"{search} {option_name} must be one of {', '.join(choices)}, got '{value}'")


def check_schedule(search: str, schedule: str) -> None:
    """Refuse an unknown learning-rate schedule."""
    from qcompile.train.trainer import SCHEDULES

    check_choice(search, "schedule", schedule, SCHEDULES)


def layer_kinds(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """(layer name, "conv" | "linear") for every quantized layer, in graph order."""
    return [(str(n.target), "conv" if isinstance(m, QConv2d) else "linear") for n, m in graph.layers(gm)]


def first_conv_last_linear(kinds: list[tuple[str, str]]) -> tuple[str, str]:
    convs = [n for n, kind in kinds if kind == "conv"]
    linears = [n for n, kind in kinds if kind == "linear"]
    return (convs[0] if convs else kinds[0][0]), (linears[-1] if linears else kinds[-1][0])


def apply_assignment(gm: fx.GraphModule, assignment: Assignment) -> None:
    """Write an assignment's bits into the weight and activation quantizers of a quant graph."""
    requested: dict[fx.Node, int] = {}
    for node, layer in graph.layers(gm):
        bits = assignment.layers[str(node.target)]
        IntType(bits.w, True), IntType(bits.a, False)  # validates the range
        layer.weight_quant.bits = bits.w
        for root in graph.roots(gm, input_node(node)):
            requested[root] = max(requested.get(root, 0), bits.a)
    outputs = {root for out in graph.output_nodes(gm) for root in graph.roots(gm, out)}
    for node, q in graph.act_quants(gm):
        src = node.args[0]
        if node in outputs or (isinstance(src, fx.Node) and src.op == "placeholder"):
            q.bits = IO_BITS
        else:
            q.bits = requested.get(node, assignment.default_act)
    cap_table_inputs(gm)


@dataclass(frozen=True)
class Search(Pass):
    """Base of every search; subclasses set ``name`` and implement ``search``."""

    requires = (Stage.QUANT,)
    needs_labels = False
    scheme: ClassVar[str] = "uniform"  # the insert-quantizers scheme the search trains
    followed_by: ClassVar[tuple[str, ...]] = ()  # passes the default pipeline runs right after it

    def search(self, gm: fx.GraphModule, ctx: PassContext) -> Assignment:
        raise NotImplementedError

    def apply(self, gm: fx.GraphModule, assignment: Assignment) -> None:
        """Write the assignment into the quantizers (a search that set them itself overrides this)."""
        apply_assignment(gm, assignment)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if not layer_kinds(gm):
            return PassResult(gm, False)
        if self.needs_labels and (ctx.dataset is None or not ctx.dataset.labelled):
            raise PreconditionError(f"search '{self.name}' learns from labelled data; pass --data with labels")
        self.apply(gm, self.search(gm, ctx))
        return PassResult(gm, True)


@dataclass(frozen=True)
class TrainedSearch(Search):
    """A search that trains the quant graph with QuantTrainer; distillation from the float model is shared.

    Subclasses that define ``__post_init__`` call ``super().__post_init__()``.
    """

    needs_labels = True

    distill: float = option(0.0, "weight of the float model's soft targets in the loss, in [0, 1] (0: labels only)")
    temperature: float = option(1.0, "softmax temperature of the distillation (> 0)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.distill <= 1.0:
            raise PreconditionError(f"{self.name} distill must lie in [0, 1], got {self.distill}")
        if not self.temperature > 0.0:
            raise PreconditionError(f"{self.name} temperature must be positive, got {self.temperature}")

    def distillation(self) -> dict[str, Any]:
        """The TrainConfig keyword arguments ``distill`` and ``temperature``; ``teacher`` gives the model."""
        return {"distill": self.distill, "temperature": self.temperature}

    def teacher(self, ctx: PassContext) -> fx.GraphModule | None:
        return ctx.teacher if self.distill > 0.0 else None


def gate_parameters(gm: fx.GraphModule) -> list[Any]:
    """Every learned gate / bit variable of the graph's quantizers (``gate_parameters()``)."""
    found = [getattr(m, "gate_parameters", None) for m in gm.modules()]
    return [p for fn in found if callable(fn) for p in fn()]


def movement(name: str, steps: int, before: list[Any], after: list[Any], changed: list[str], needed: float,
             knobs: str) -> dict[str, Any]:
    """One diagnostics line after a learned search (steps, how far its variables moved, layers changed) on
    stderr, and a warning naming ``knobs`` when no layer changed; the same facts for the report."""
    import sys

    from qcompile import distributed

    moved = max((float((a.detach() - b).abs().max()) for a, b in zip(after, before, strict=True) if a.numel()),
                default=0.0)
    facts = {"steps": steps, "max_move": moved, "move_needed": needed, "changed_layers": changed}
    if distributed.is_main():
        print(f"{name}: {steps} training steps; gates moved by at most {moved:.2f} (a switch needs {needed:.2f}); "
              f"{len(changed)} layer(s) changed" + (f": {', '.join(changed[:6])}" if changed else ""),
              file=sys.stderr)
        if not changed:
            print(f"warning: {name} changed no layer within its budget ({steps} steps); raise {knobs}",
                  file=sys.stderr)
    return facts


def searches() -> dict[str, type[Search]]:
    """Every registered search (built-in or from a plugin), by name."""
    return {name: cls for name, cls in sorted(PASSES.items()) if issubclass(cls, Search)}
