"""PyTorch frontend: torch.fx symbolic tracing, torch.export as a fallback, and saved ``.pt2`` programs.

A torch.export graph is raised back to module/torch-level ops (``frontends/aten_raise.py``) so that
every later pass sees one vocabulary whichever tracer succeeded.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import re
import sys
import types
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from qcompile.errors import QCompileError
from qcompile.frontends.aten_raise import raise_aten
from qcompile.frontends.pickles import PickleRefusedError, guarded_unpickling
from qcompile.frontends.source import exception_source, node_source
from qcompile.ir.meta import Stage, set_info, set_stage


class TraceError(QCompileError):
    """Neither torch.fx nor torch.export could capture the model."""


class ModelFileError(QCompileError):
    """A saved program or weights file that cannot be read."""


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Silence torch's logging, warnings and direct prints while we try tracers; we report failures ourselves."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
        os.dup2(devnull.fileno(), 2)
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        logging.disable(previous)


class _Tracer(fx.Tracer):
    """torch.fx's tracer; registered table modules stay leaves and registered Python functions calls
    (``quant/tables.py``), so that canonicalize sees them whole."""

    def __init__(self) -> None:
        from qcompile.quant import tables

        plain = tuple(f for f in tables.FUNCTIONS if isinstance(f, types.FunctionType) and f.__module__ != "torch"
                      and not f.__module__.startswith("torch."))
        super().__init__(autowrap_functions=plain)
        self.table_modules = tuple(tables.MODULES)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return type(m) in self.table_modules or super().is_leaf_module(m, module_qualified_name)


def _defaults_beyond(model: nn.Module, given: int) -> dict[str, object]:
    """forward's parameters after the ``given`` inputs that have defaults (timm's ``attn_mask=None``,
    ``is_causal=False``): traced at their defaults, not as extra graph inputs."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params[given:] if p.default is not inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _drop_concrete_inputs(graph: fx.Graph, names: set[str]) -> None:
    """Remove the placeholders torch.fx keeps for concrete arguments, with the guards that check them."""
    for ph in [n for n in graph.find_nodes(op="placeholder") if re.sub(r"_\d+$", "", str(n.target)) in names]:
        for user in list(ph.users):
            for guard in list(user.users):
                graph.erase_node(guard)
            graph.erase_node(user)
        graph.erase_node(ph)


def _symbolic_trace(model: nn.Module, given: int = 1) -> fx.GraphModule:
    tracer = _Tracer()
    tracer.record_stack_traces = True
    concrete = _defaults_beyond(model, given)
    graph = tracer.trace(model, concrete_args=concrete or None)
    _drop_concrete_inputs(graph, set(concrete))
    return fx.GraphModule(model, graph, type(model).__name__)


def _export(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    batch = torch.export.Dim.AUTO
    doubled = tuple(torch.cat([x, x]) for x in example_inputs)  # batch 2: keeps the batch dimension symbolic
    with quiet_torch():
        program = torch.export.export(model, doubled, dynamic_shapes=[{0: batch} for _ in doubled], strict=False)
    return raise_aten(program.module())


def _finish(gm: fx.GraphModule) -> fx.GraphModule:
    for node in gm.graph.nodes:
        source = node_source(node)
        if source is not None:
            set_info(node, source=source)
    set_stage(gm, Stage.TRACED)
    return gm


def trace_module(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """Capture ``model`` (put in eval mode) as a GraphModule; raise TraceError naming where both tracers broke."""
    model = model.eval()
    try:
        return _finish(_symbolic_trace(model, len(example_inputs)))
    except Exception as fx_exc:  # noqa: BLE001 - any tracing failure moves on to torch.export
        fx_error = fx_exc
    try:
        return _finish(_export(model, example_inputs))
    except Exception as export_exc:  # noqa: BLE001
        where = exception_source(export_exc.__traceback__) or exception_source(fx_error.__traceback__)
        at = f" at {where[0]} in {where[1]}" if where else ""
        first = str(fx_error).strip().splitlines()[0] if str(fx_error).strip() else type(fx_error).__name__
        raise TraceError(
            f"cannot trace {type(model).__name__}{at}: {first}; make control flow independent of tensor "
            "values (use torch.where, or move the branch out of forward)"
        ) from export_exc


def load_pt2(path: str | Path) -> fx.GraphModule:
    """Load a program saved with ``torch.export.save``; nothing pickled in it may run code (frontends/pickles.py)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"no such file: {path}")
    try:
        with quiet_torch(), guarded_unpickling(str(path)):
            program = torch.export.load(str(path))
    except PickleRefusedError:
        raise
    except Exception as exc:  # noqa: BLE001 - zip, JSON, schema and torch errors of a damaged archive
        detail = " ".join(str(exc).split())[:100]
        raise ModelFileError(
            f"{path} is not a readable torch.export program ({type(exc).__name__}: {detail}); re-save it with "
            "torch.export.save"
        ) from exc
    return _finish(raise_aten(program.module()))
