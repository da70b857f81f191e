"""ONNX frontend: ``load_onnx(path)`` imports a float ONNX model as a torch-level GraphModule (stage TRACED).

Steps: load the model with its external data (from the model's folder) and validate it (``onnx.checker``);
require an ai.onnx opset in 11..21 and no control flow; infer shapes (with data propagation) and fold
constants with onnx-graphsurgeon, so weights computed by constant subgraphs and shapes of static tensors
become constants; compute every shape input that is still computed at run time (Reshape targets of
``x.view(x.size(0), -1)`` with a symbolic batch, Slice ends of ``x.chunk``; ``frontends/onnx_shapes.py``:
at batches 2 and 3 only a Reshape's first entry may differ, and it must equal the batch, which makes it 0,
"copy the input's batch"; a static batch stays as it is; a target with the batch in another entry marks a
sequence-first graph, whose tensors' batch axes ``frontends/onnx_layout.py`` measures); then convert node by node
(``frontends/onnx_ops.py`` holds the converters and the math of each). Every node's ``NodeInfo.source``
is ``"<onnx node name> (<op_type>)"`` (unnamed nodes are called ``OpType_index``; a layer that absorbed
the bias Add after it lists both, joined by " + ").

Errors, each one line with a fix: an unreadable, corrupt or truncated file or missing external data
(ModelFileError), an opset outside 11..21 (OpsetError), If/Loop/Scan nodes (ControlFlowError, naming them),
shapes that cannot be resolved (DynamicShapeError), and ONE UnsupportedOnnxOpsError listing every node
that has no torch-level form with its name, op type and reason. Settings that import faithfully but that
the compiler does not support (e.g. average pooling with ceil_mode) are left to canonicalize, which names
the ONNX node through its source. Not handled: models over 2 GB (the protobuf limit of in-memory shape
inference), calls of local ONNX functions (not inlined; reported as unsupported ops of their domain).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import onnx
import onnx_graphsurgeon as gs
import torch
import torch.fx as fx

from qcompile.frontends import (  # noqa: F401 - register their converters
    onnx_arith,
    onnx_attention,  # noqa: I001 - after the converters it wraps
    onnx_layout,
    onnx_movement,
    onnx_transposed,
)
from qcompile.frontends.onnx_check import (
    OnnxValidationError,
    check_declared_shape,
    check_types,
    densify,
    onnxruntime_problem,
)
from qcompile.frontends.onnx_ops import Builder, DynamicShapeError, OnnxImportError, attr_name
from qcompile.frontends.onnx_pointwise import fuse_patterns
from qcompile.frontends.onnx_regions import fuse_adaptive_pools
from qcompile.frontends.onnx_shapes import resolve_runtime_inputs
from qcompile.frontends.torch_fx import ModelFileError, quiet_torch
from qcompile.ir.meta import Stage, set_info, set_stage
from qcompile.passes.canonicalize import UnsupportedOpsError

__all__ = [
    "ControlFlowError", "DynamicShapeError", "ModelFileError", "OnnxImportError", "OpsetError",
    "UnsupportedOnnxOpsError", "load_onnx",
]

OPSETS = range(11, 22)
CONTROL_FLOW = ("If", "Loop", "Scan")


class OpsetError(OnnxImportError):
    """The model's ai.onnx opset is outside the supported range."""


class ControlFlowError(OnnxImportError):
    """The model holds If/Loop/Scan nodes."""


class UnsupportedOnnxOpsError(UnsupportedOpsError):
    """Every ONNX node that has no torch-level form: ``items`` as ``name (OpType: why)``, the message grouped
    by op type (the README lists the supported ops)."""

    what = "ONNX node(s)"
    fix = "re-export the model with the ops the README lists"

    def __init__(self, problems: list[tuple[str, str, str]]) -> None:
        items = [f"{name} ({op}{': ' + why if why else ''})" for name, op, why in problems]
        examples = [f"{name}{': ' + why if why else ''}"[:70] for name, _, why in problems]
        super().__init__(items, [op for _, op, _ in problems], examples)


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    text = text.replace("[ShapeInferenceError] ", "").replace("Inference error(s): ", "")
    return f"{type(exc).__name__}: {text[:150]}"


def _read(path: Path) -> onnx.ModelProto:
    """The model with its external data (read from the model's folder), checked by ``onnx.checker``."""
    if not path.is_file():
        raise ModelFileError(f"no such file: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf decoding errors have no common base
        raise ModelFileError(f"{path} is not a readable ONNX model ({_first_line(exc)}); the file is truncated "
                             "or corrupt: copy or export it again") from exc
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except (OSError, onnx.checker.ValidationError) as exc:
        raise ModelFileError(f"cannot read the external data of {path} ({_first_line(exc)}); keep the data files "
                             "next to the model, where they were saved") from exc
    try:
        densify(model)
        check_types(model, path)  # before the checker: its shape inference would blame a later node
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path} is not a valid ONNX model ({_first_line(exc)}); fix the model or export it "
                             "again") from exc
    return model


def _check_opset(model: onnx.ModelProto, path: Path) -> None:
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise OpsetError(f"{path} declares no ai.onnx opset; re-export it with an opset in 11..21")
    if versions[0] not in OPSETS:
        raise OpsetError(
            f"{path} uses ONNX opset {versions[0]}, qcompile supports opsets {OPSETS.start}..{OPSETS.stop - 1}; "
            "convert it with onnx.version_converter.convert_version(model, 17) or re-export with opset_version=17"
        )


def _check_control_flow(model: onnx.ModelProto, path: Path) -> None:
    found = [f"{n.name or '(unnamed)'} ({n.op_type})" for n in model.graph.node if n.op_type in CONTROL_FLOW]
    if found:
        raise ControlFlowError(
            f"{path} has control flow, which qcompile cannot compile: {', '.join(found)}; export the model "
            "without data-dependent branches or loops (e.g. torch.onnx.export traces the path taken)"
        )


def _folded(model: onnx.ModelProto) -> gs.Graph:
    """Shape-inferred, constant-folded, topologically sorted graph; unnamed nodes get ``OpType_index``."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except onnx.shape_inference.InferenceError as exc:
        raise OnnxImportError(f"shape inference failed ({_first_line(exc)}); fix the model's declared shapes") from exc
    with quiet_torch():  # graphsurgeon and onnxruntime log while folding
        graph = gs.import_onnx(inferred)
        graph.fold_constants().cleanup().toposort()
    for i, node in enumerate(graph.nodes):
        node.name = node.name or f"{node.op}_{i}"
    return graph


def _refolded(graph: gs.Graph) -> gs.Graph:
    """``graph`` with its shapes inferred again from scratch (after run-time shape inputs became constants)."""
    model = gs.export_onnx(graph)
    del model.graph.value_info[:]
    return _folded(model)


def _placeholders(builder: Builder) -> None:
    for t in builder.graph.inputs:
        node = builder.fx_graph.placeholder(attr_name(t.name))
        set_info(node, source=f"{t.name} (graph input)")
        builder.env[t.name] = node


def _outputs(builder: Builder, path: Path) -> None:
    constant = [t.name for t in builder.graph.outputs if isinstance(t, gs.Constant)]
    if constant:
        raise OnnxImportError(f"{path}: outputs {constant} do not depend on the input; there is nothing to compile")
    values = [builder.env[t.name] for t in builder.graph.outputs]
    builder.fx_graph.output(values[0] if len(values) == 1 else tuple(values))


def load_onnx(path: str | Path, example: torch.Tensor | None = None) -> fx.GraphModule:
    """Import the float ONNX model at ``path`` (with its external data) as a TRACED GraphModule.

    With ``example`` (an input batch), the model must also declare a fitting input shape and run in
    onnxruntime on it (frontends/onnx_check.py); nodes qcompile cannot import are named before
    onnxruntime's complaint, which is reported for everything else. Its shape (without the batch) also
    fixes symbolic input dimensions where run-time shapes must be computed (``frontends/onnx_shapes.py``).
    """
    path = Path(path)
    model = _read(path)
    _check_opset(model, path)
    _check_control_flow(model, path)
    if example is None:
        return _import(model, path, None)
    check_declared_shape(model, path, tuple(example.shape[1:]))
    problem = onnxruntime_problem(path, model, example)
    try:
        gm = _import(model, path, tuple(example.shape[1:]))
    except UnsupportedOnnxOpsError:
        raise
    except Exception:
        if problem is None:
            raise
        gm = None
    if problem is not None:
        raise OnnxValidationError(f"onnxruntime refuses {path}: {problem}; fix the model or export it again")
    assert gm is not None
    return gm


def _import(model: onnx.ModelProto, path: Path, sample_shape: Sequence[int] | None) -> fx.GraphModule:
    graph = _folded(model)
    seq_first = resolve_runtime_inputs(graph, model, sample_shape)
    graph = _refolded(graph)  # shapes again, after folding: a Slice with folded ends gets its output shape
    layouts = None
    if seq_first:  # the batch leaves axis 0: where it is, measured at two batches
        layouts = onnx_layout.analyse(graph, onnx_layout.probe_shapes(graph, sample_shape), sample_shape)
    fuse_patterns(graph)  # erf-form GELU -> Gelu (frontends/onnx_pointwise.py, which adds its converters)
    fuse_adaptive_pools(graph)  # dynamo's index-arithmetic adaptive pools -> one node (frontends/onnx_regions.py)
    onnx_attention.detach_class_token_shapes(graph)
    builder = Builder(graph, route=None if layouts is None else onnx_layout.router(layouts))
    _placeholders(builder)
    for node in graph.nodes:
        builder.convert(node)
    if builder.problems:
        raise UnsupportedOnnxOpsError(builder.problems)
    _outputs(builder, path)
    gm = fx.GraphModule(builder.root, builder.fx_graph, class_name="OnnxModel")
    set_stage(gm, Stage.TRACED)
    return gm
