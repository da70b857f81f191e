"""Shape inputs computed at run time (``Shape -> Gather -> Div -> Unsqueeze -> Concat`` chains), resolved.

PyTorch's exporter writes ``x.view(b, g, c // g, h, w)`` or ``x.chunk(2, 1)`` as arithmetic on ``Shape``
outputs; ONNX shape inference cannot always fold it (a Slice whose ends are computed leaves its output
shape unknown, and everything after it). Here every such input (a Reshape target, Slice
starts/ends/axes/steps, Split sizes, Squeeze/Unsqueeze/ReduceMean axes) is *computed* instead: the model
runs once in onnxruntime on zeros at the compiled input shape with these tensors as extra outputs.

* A model whose input has a symbolic batch runs at batches 2 and 3. A Reshape target may differ in one
  entry only, and that entry must be the batch times a constant k. The first entry becomes -1 (what is
  left per sample; k > 1 folds the batch into axis 0, MobileViT's patches, ``passes/rules/batch_fold.py``),
  or 0 ("copy the input's batch") where k = 1 and another entry is already -1. Another entry (the batch
  off axis 0, a sequence-first layout: [L, N, 3, E], [L, N h, d]) becomes -1, its other entries static,
  and ``resolve_runtime_inputs`` says so: the importer then holds every tensor batch-first
  (``frontends/onnx_layout.py``). Every other computed input must be the same at
  both batches (it is a per-sample constant then).
* A model with a static batch runs at that batch, once: its batch stays what it is (a target such as
  [1, 2, 58, 8, 8] of a batch-1 export keeps the batch first and is generalized by the Reshape converter).
* A Resize to computed sizes ([N, C, 2H, 2W] from Shape) becomes the same Resize by scales (1, 1, 2, 2)
  when the input's per-sample shape is static.
* Other symbolic input dimensions take the compiled input shape (``sample_shape``, without the batch).

The resolved constants replace the inputs, and shapes are inferred again, so the converters see static
shapes everywhere. Not handled: values that depend on the input's data (not only its shape), and models
onnxruntime cannot run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from qcompile.frontends.onnx_ops import DynamicShapeError

SHAPE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Slice": (1, 2, 3, 4), "Split": (1,), "Squeeze": (1,), "Unsqueeze": (1,),
    "ReduceMean": (1,), "Resize": (1, 2, 3),
}
PROBE_BATCHES = (2, 3)


def pending_inputs(graph: gs.Graph) -> list[tuple[gs.Node, int]]:
    """(node, input index) of every shape-like input that is not a constant."""
    found = []
    for node in graph.nodes:
        for i in SHAPE_INPUTS.get(node.op, ()):
            t = node.inputs[i] if i < len(node.inputs) else None
            if t is not None and t.name and not isinstance(t, gs.Constant):
                found.append((node, i))
    return found


def _reads_data(t: gs.Tensor, seen: set[str] | None = None) -> bool:
    """Whether ``t`` depends on the values of a graph input (not only on shapes, through Shape/Size)."""
    seen = set() if seen is None else seen
    if isinstance(t, gs.Constant) or t.name in seen:
        return False
    seen.add(t.name)
    if not t.inputs:
        return True  # a graph input
    producer = t.inputs[0]
    return producer.op not in ("Shape", "Size") and any(_reads_data(i, seen) for i in producer.inputs)


def _refuse_data_dependent(pending: list[tuple[gs.Node, int]]) -> None:
    for node, i in pending:
        if _reads_data(node.inputs[i]):
            raise DynamicShapeError(
                f"{node.name} ({node.op}): the target shape is computed at run time from the input's values, "
                "not only its shape; export with a constant shape (torch.flatten(x, 1) or x.reshape(-1, C, H, W))")


def _fixed_dims(value: onnx.ValueInfoProto, batch: int | None, sample_shape: Sequence[int] | None) -> list[int]:
    dims = []
    for k, d in enumerate(value.type.tensor_type.shape.dim):
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif k == 0 and batch is not None:
            dims.append(batch)
        elif sample_shape is not None and 0 < k <= len(sample_shape):
            dims.append(int(sample_shape[k - 1]))
        else:
            raise DynamicShapeError(
                f"input '{value.name}' has a symbolic dimension {k} ({d.dim_param or '?'}) that shapes depend on; "
                "give the input shape (--input-shape C,H,W) or export with a fixed size")
    return dims


def run_at(model: onnx.ModelProto, names: list[str], batches: Sequence[int | None],
           sample_shape: Sequence[int] | None) -> list[dict[str, np.ndarray]]:
    """The tensors ``names`` of ``model`` on zero inputs at each batch (None: the declared one), one session."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.value_info[:]
    del probe.graph.output[:]
    for name in names:
        probe.graph.output.append(onnx.ValueInfoProto(name=name))
    feeds = [{value.name: np.zeros(_fixed_dims(value, batch, sample_shape),
                                   dtype=onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type))
              for value in probe.graph.input} for batch in batches]
    try:
        session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        runs = [dict(zip(names, (np.asarray(v) for v in session.run(names, f)), strict=True)) for f in feeds]
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise DynamicShapeError(f"cannot compute the model's run-time shapes in onnxruntime ({first}); export "
                                "with constant shapes or a fixed input size") from exc
    return runs


def _resolved(node: gs.Node, index: int, found: list[np.ndarray], batches: tuple[int, ...],
              size: int | None = None) -> np.ndarray:
    first = found[0].astype(np.int64).reshape(found[0].shape)
    if len(found) == 1 or all(np.array_equal(first, f) for f in found[1:]):
        return first
    flat = [f.reshape(-1) for f in found]
    differ = np.flatnonzero(flat[0] != flat[1]).tolist() if flat[0].shape == flat[1].shape else None
    firsts = [int(f[0]) for f in flat] if differ == [0] else []
    folds = bool(firsts) and firsts[0] % batches[0] == 0 and firsts[0] * batches[1] == firsts[1] * batches[0]
    if node.op == "Reshape" and folds:
        target = _sized(flat[0], size)
        if -1 not in target[1:]:
            target[0] = -1  # the batch (times a per-sample factor: rules/batch_fold.py) is what is left
            return target
        if tuple(firsts) == batches:
            target[0] = 0  # copy the input's batch
            return target
    entry = differ[0] if differ is not None and len(differ) == 1 else 0
    scales = entry > 0 and _scales(int(flat[0][entry]), int(flat[1][entry]), batches)
    if node.op == "Reshape" and scales and len(flat[0]) > 1:
        target = _sized(flat[0], size)
        if -1 not in target:
            target[entry] = -1  # the batch off axis 0: frontends/onnx_layout.py moves it first
            return target
    raise DynamicShapeError(
        f"{node.name} ({node.op}): input {index} is {flat[0].tolist()} at batch {batches[0]} and "
        f"{flat[1].tolist()} at batch {batches[1]}, so it depends on the batch in a way qcompile cannot keep; "
        "reshape and slice per sample (keep the batch first, as x.reshape(x.size(0), ...) does)")


def _scales(at_first: int, at_second: int, batches: tuple[int, ...]) -> bool:
    """Whether a size is the batch times a constant at both probe batches."""
    return at_first > 0 and at_first % batches[0] == 0 and at_first * batches[1] == at_second * batches[0]


def _sized(found: np.ndarray, size: int | None) -> np.ndarray:
    """The target with a -1 among its other entries resolved from the data's ``size`` (when it is known)."""
    target = found.astype(np.int64).copy()
    if -1 in target and size is not None and int(np.prod(target)) < 0:
        rest = np.delete(target, np.flatnonzero(target == -1)[0])
        target[target == -1] = size // int(np.prod(rest))
    return target


def _batch_is_symbolic(model: onnx.ModelProto) -> bool:
    dims = [v.type.tensor_type.shape.dim for v in model.graph.input]
    return any(len(d) > 0 and not d[0].HasField("dim_value") for d in dims)


def resolve_runtime_inputs(graph: gs.Graph, model: onnx.ModelProto,
                           sample_shape: Sequence[int] | None = None) -> bool:
    """Replace every pending shape-like input of ``graph`` by its computed constant; True if a Reshape target
    holds the batch off its first entry (the graph then needs ``frontends/onnx_layout.py``)."""
    moved = False
    pending = pending_inputs(graph)
    if not pending:
        return moved
    _refuse_data_dependent(pending)
    data = {node.inputs[0].name for node, i in pending
            if node.op == "Reshape" and i == 1 and not isinstance(node.inputs[0], gs.Constant)}
    names = sorted({node.inputs[i].name for node, i in pending} | data)
    batches: tuple[int, ...] = PROBE_BATCHES if _batch_is_symbolic(model) else ()
    runs = run_at(model, names, batches or (None,), sample_shape)
    made: dict[tuple[str, bytes], gs.Constant] = {}  # one constant per tensor and value (names stay unique)
    for node, i in pending:
        name = node.inputs[i].name
        if node.op == "Resize" and i == 3 and _resize_by_scales(node, runs[0][name]):
            continue
        size = int(runs[0][node.inputs[0].name].size) if node.inputs[0].name in data else None
        found = [r[name] for r in runs]
        value = _resolved(node, i, found, batches, size)
        varies = not all(np.array_equal(found[0], f) for f in found[1:])
        moved = moved or (node.op == "Reshape" and varies and int(value.reshape(-1)[0]) not in (-1, 0))
        key = (name, value.tobytes() + str(value.shape).encode())
        if key not in made:
            made[key] = gs.Constant(f"{name}_resolved{'_' + str(len(made)) if made else ''}", value)
        node.inputs[i] = made[key]
    return moved


def _resize_by_scales(node: gs.Node, sizes: np.ndarray) -> bool:
    """A Resize to computed ``sizes`` (whose batch entry follows the batch) as the same Resize by scales."""
    shape = node.inputs[0].shape
    if shape is None or len(shape) != sizes.size or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
        return False
    scales = [1.0, *(float(o) / float(d) for o, d in zip(sizes.reshape(-1)[1:], shape[1:], strict=True))]
    node.inputs[2] = gs.Constant(f"{node.name}_scales", np.array(scales, dtype=np.float32))
    node.inputs[3] = gs.Variable.empty()
    return True
