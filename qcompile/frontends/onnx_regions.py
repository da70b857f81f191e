"""Linear index regions of an ONNX graph recognised by the function they compute (adaptive average pools).

PyTorch's dynamo exporter writes ``AdaptiveAvgPool2d(k)`` of an input whose size k does not divide as
index arithmetic: ``Transpose`` (spatial axes first, the batch moved), ``GatherND`` with constant window
indices, ``Transpose`` back, ``Where(constant mask, 0, x)`` zeroing the padded window slots, ``Gather`` +
``Add`` summing the window, ``Div`` by the constant window sizes. None of these is a per-sample data
movement the converters accept, but together they are one known op. Here:

* A *region* starts at a tensor x that feeds a ``GatherND`` or a ``Transpose`` moving the batch axis, and
  takes, in topological order, every node of ``LINEAR`` that is linear in the region tensors it reads:
  the others are constants, ``Where`` has a constant condition and an all-zero constant branch, ``Add``
  and ``Sub`` take two region tensors, ``Div`` divides by a constant, a ``Gather``'s indices are constant.
  So the region computes y = L x for one constant matrix L. It must have one exit y (the only region
  tensor used outside it), 4-D like x.
* L is identified by evaluation: the region, cut out as a model of its own, runs in onnxruntime on
  ``PROBES`` Gaussian inputs; if y equals ``adaptive_avg_pool2d(x, y's H x W)`` on each (to float32
  rounding), L is that pool's matrix (two different linear maps agree on a Gaussian vector with
  probability 0), and the region becomes one ``AdaptiveAveragePool`` node, which the converter turns into
  ``nn.AdaptiveAvgPool2d``. Otherwise the region is left as it is, and its nodes are refused as before.

Not handled: regions computing anything other than an adaptive average pool (upsampling, strided or
shuffled gathers), regions with several exits, and affine regions (a ``Where`` filling a non-zero value).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

from qcompile.frontends import onnx_ops
from qcompile.frontends.onnx_ops import Builder, Unsupported

LINEAR = frozenset({"Transpose", "GatherND", "Gather", "Where", "Add", "Sub", "Mul", "Div", "Unsqueeze", "Squeeze"})
PROBES = 2
FUSED_OP = "AdaptiveAveragePool"  # in memory only, between this rewrite and its converter


def _seeds(graph: gs.Graph) -> list[gs.Variable]:
    """Tensors entering a GatherND or a batch-moving Transpose: where a region may start."""
    found: dict[str, gs.Variable] = {}
    for node in graph.nodes:
        perm = node.attrs.get("perm") if node.op == "Transpose" else None
        moves_batch = perm is not None and len(perm) > 0 and int(perm[0]) != 0
        x = node.inputs[0] if node.inputs else None
        if (node.op == "GatherND" or moves_batch) and isinstance(x, gs.Variable):
            found.setdefault(x.name, x)
    return list(found.values())


def _linear_in(node: gs.Node, inside: set[str]) -> bool:
    """Whether ``node`` is linear in the region tensors it reads, every other input a constant."""
    if node.op not in LINEAR:
        return False
    reads = [t.name in inside for t in node.inputs]
    if not any(reads) or not all(r or isinstance(t, gs.Constant) for r, t in zip(reads, node.inputs, strict=True)):
        return False
    if node.op == "Where":  # cond ? 0 : v or cond ? v : 0, the condition a constant
        zero = [t for t, r in zip(node.inputs[1:], reads[1:], strict=True) if not r]
        return not reads[0] and len(zero) == 1 and not np.any(zero[0].values)
    if node.op in ("Add", "Sub"):  # of two region tensors (a constant term would be affine)
        return all(reads)
    if node.op == "Mul":
        return sum(reads) == 1
    return reads[0] and not any(reads[1:])  # Div by constants, Gather(ND) at constant indices, movement


def region(graph: gs.Graph, x: gs.Variable) -> tuple[list[gs.Node], gs.Variable] | None:
    """The nodes linear in ``x`` alone (graph order) and the region's one exit, else None."""
    inside, nodes = {x.name}, []
    for node in graph.nodes:
        if _linear_in(node, inside):
            nodes.append(node)
            inside.update(t.name for t in node.outputs)
    produced = {t.name: t for n in nodes for t in n.outputs}
    members = {id(n) for n in nodes}
    outputs = {t.name for t in graph.outputs}
    exits = [t for name, t in produced.items()
             if name in outputs or any(id(user) not in members for user in t.outputs)]
    if len(exits) != 1 or not isinstance(exits[0], gs.Variable):
        return None
    return nodes, exits[0]


def _probe_shape(x: gs.Variable) -> list[int] | None:
    shape = x.shape
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        return None
    return [shape[0] if isinstance(shape[0], int) else 2, *shape[1:]]


def _run_region(graph: gs.Graph, nodes: list[gs.Node], x: gs.Variable, y: gs.Variable,
                inputs: list[np.ndarray]) -> list[np.ndarray] | None:
    """The region alone in onnxruntime on ``inputs``; None where it does not run."""
    sub = gs.Graph(nodes=nodes, inputs=[x], outputs=[y], opset=graph.opset)
    model = gs.export_onnx(sub, do_type_check=False)
    model.ir_version = min(model.ir_version, 10)
    del model.graph.value_info[:]
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info(y.name, onnx.TensorProto.FLOAT, None))
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return [np.asarray(session.run(None, {x.name: v})[0]) for v in inputs]
    except Exception:  # noqa: BLE001 - a region onnxruntime cannot run alone is simply not recognised
        return None


def _is_adaptive_pool(graph: gs.Graph, nodes: list[gs.Node], x: gs.Variable, y: gs.Variable) -> bool:
    shape = _probe_shape(x)
    out = y.shape
    if shape is None or out is None or len(out) != 4 or not all(isinstance(d, int) for d in out[2:]):
        return False
    gen = np.random.default_rng(0)
    inputs = [gen.standard_normal(shape).astype(np.float32) for _ in range(PROBES)]
    got = _run_region(graph, nodes, x, y, inputs)
    if got is None:
        return False
    for v, g in zip(inputs, got, strict=True):
        want = F.adaptive_avg_pool2d(torch.from_numpy(v).double(), (int(out[2]), int(out[3]))).numpy()
        if g.shape != want.shape or not np.allclose(g, want, rtol=1e-5, atol=1e-6):
            return False
    return True


def fuse_adaptive_pools(graph: gs.Graph) -> int:
    """Replace every region computing an adaptive average pool by one node; returns how many."""
    fused = 0
    for x in _seeds(graph):
        found = region(graph, x)
        if found is None or not _is_adaptive_pool(graph, found[0], x, found[1]):
            continue
        nodes, y = found
        size = [int(d) for d in y.shape[2:]]  # type: ignore[index]
        graph.nodes.append(gs.Node(FUSED_OP, f"{nodes[-1].name}_adaptive_pool", {"output_size": size}, [x], [y]))
        for node in nodes:
            node.outputs.clear()
        fused += 1
    if fused:
        graph.cleanup().toposort()
    return fused


def _adaptive_pool(imp: Builder, node: gs.Node) -> None:
    if node.domain not in (None, "", "ai.onnx") or "output_size" not in node.attrs:
        raise Unsupported(f"'{FUSED_OP}' is not an ONNX operator")
    imp.emit_module(node, nn.AdaptiveAvgPool2d(tuple(int(d) for d in node.attrs["output_size"])), node.inputs[0])


onnx_ops.CONVERTERS[FUSED_OP] = _adaptive_pool
