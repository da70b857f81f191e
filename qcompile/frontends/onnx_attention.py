"""ONNX converters for attention and transformer plumbing (registered into ``onnx_ops.CONVERTERS``).

  MatMul(A, B) with B computed at run time            -> torch.matmul(A, B) (canonicalize: MatMul(alpha))
  Transpose(perm), any perm                           -> torch.permute(x, perm) (canonicalize keeps a perm
                                                         that moves the batch only as timm's head split)
  Split(axis 0, pieces of 1) whose outputs are read
  only by Squeeze(axis 0)                             -> torch.unbind(x, 0) and getitem(i) per output
  Gather(x, scalar constant index, axis 0)            -> operator.getitem(x, i) (the same head split)
  Concat(Expand(constant [1, ...], shape), x) or
  Concat(x, Expand(...)) along an axis >= 1           -> ConstCat(constant[0], axis) (a class token)

Everything else of these ops goes to the converters they wrap (onnx_ops, onnx_movement). Not handled:
Expand of a computed tensor, an Expand read by anything other than a Concat.
"""

from __future__ import annotations

import operator

import numpy as np
import onnx_graphsurgeon as gs
import torch

from qcompile.frontends import onnx_movement, onnx_ops
from qcompile.frontends.onnx_ops import Builder, Unsupported, _constant
from qcompile.ir.attention import ConstCat

_matmul_weight, _split_nonzero, _squeeze_other, _gather_other, _concat_tensors = (
    onnx_ops.CONVERTERS[k] for k in ("MatMul", "Split", "Squeeze", "Gather", "Concat"))


def _matmul(imp: Builder, node: gs.Node) -> None:
    b = node.inputs[1]
    if isinstance(b, gs.Constant) or _constant(b) is not None:
        _matmul_weight(imp, node)
        return
    imp.emit_function(node, torch.matmul, (imp.value(node.inputs[0]), imp.value(b)))


def _transpose(imp: Builder, node: gs.Node) -> None:
    rank = len(node.inputs[0].shape or onnx_movement._static_shape(node.inputs[0]))
    perm = [int(p) for p in node.attrs.get("perm", list(range(rank))[::-1])]
    imp.emit_function(node, torch.permute, (imp.value(node.inputs[0]), tuple(perm)))


def _squeezed_by_consumer(t: gs.Tensor) -> bool:
    return bool(t.outputs) and all(c.op == "Squeeze" and _squeeze_axes(c) == [0] for c in t.outputs)


def _squeeze_axes(node: gs.Node) -> list[int] | None:
    axes = _constant(onnx_ops._present(node, 1)) if len(node.inputs) > 1 else None
    values = axes.reshape(-1).tolist() if axes is not None else node.attrs.get("axes")
    return [int(a) for a in values] if values is not None else None


def _split(imp: Builder, node: gs.Node) -> None:
    shape = list(node.inputs[0].shape or [])
    axis = int(node.attrs.get("axis", 0)) % max(len(shape), 1)
    if axis != 0 or len(shape) < 3 or not isinstance(shape[0], int):  # the batch moved off axis 0 (or not)
        _split_nonzero(imp, node)
        return
    sizes = onnx_movement._split_sizes(node, shape[0])
    if any(s != 1 for s in sizes) or not all(_squeezed_by_consumer(t) for t in node.outputs):
        raise Unsupported("splits the batch axis")
    pieces = imp.fx_graph.call_function(torch.unbind, (imp.value(node.inputs[0]), 0))
    for i, out in enumerate(node.outputs):
        imp.env[out.name] = imp.fx_graph.call_function(operator.getitem, (pieces, i))


def _squeeze(imp: Builder, node: gs.Node) -> None:
    src = imp.env.get(node.inputs[0].name)
    if (node.op == "Squeeze" and src is not None and src.target is operator.getitem
            and getattr(src.args[0], "target", None) is torch.unbind):
        imp.bind(node, src)  # unbind already dropped the axis
        return
    _squeeze_other(imp, node)


def _gather(imp: Builder, node: gs.Node) -> None:
    shape = list(node.inputs[0].shape or [])
    axis = int(node.attrs.get("axis", 0)) % max(len(shape), 1)
    index = _constant(node.inputs[1])
    if axis != 0 or index is None or index.ndim != 0 or len(shape) < 3 or not isinstance(shape[0], int):
        _gather_other(imp, node)
        return
    imp.emit_function(node, operator.getitem, (imp.value(node.inputs[0]), int(index)))


def _expanded_constant(t: gs.Tensor) -> np.ndarray | None:
    """The constant [1, ...] that ``t`` expands (the output of Expand(constant, shape)), else None."""
    producer = t.inputs[0] if t.inputs else None
    if producer is None or producer.op != "Expand":
        return None
    value = _constant(producer.inputs[0])
    return value if value is not None and value.ndim >= 2 and value.shape[0] == 1 else None


def detach_class_token_shapes(graph: gs.Graph) -> None:
    """The target shape of Expand(constant, shape) read only by Concats is not needed (the Concat becomes a
    ConstCat): cut it off, so that its Shape/Gather/Where chain (which follows the batch) is removed."""
    for node in graph.nodes:
        if node.op != "Expand" or not node.outputs:
            continue
        out = node.outputs[0]
        value = _expanded_constant(out)
        if value is not None and all(c.op == "Concat" for c in out.outputs):
            node.inputs[1] = gs.Constant(f"{node.name}_per_sample", np.array(value.shape, dtype=np.int64))
    graph.cleanup()


def _expand(imp: Builder, node: gs.Node) -> None:
    if _expanded_constant(node.outputs[0]) is None or not all(c.op == "Concat" for c in node.outputs[0].outputs):
        raise Unsupported("Expand (only of a constant concatenated to the tokens, as a class token)")
    # nothing to emit: the Concat reading it becomes a ConstCat


def _concat(imp: Builder, node: gs.Node) -> None:
    values = [_expanded_constant(t) for t in node.inputs]
    if all(v is None for v in values):
        _concat_tensors(imp, node)
        return
    rank = len(node.outputs[0].shape or [])
    axis = int(node.attrs.get("axis", 0)) % max(rank, 1)
    if len(values) != 2 or values[0] is not None and values[1] is not None or axis == 0:
        raise Unsupported("concatenates an expanded constant with more than one tensor, or along the batch")
    i = 0 if values[0] is not None else 1
    value = values[i]
    assert value is not None
    module = ConstCat(torch.from_numpy(np.asarray(value[0], dtype=np.float32)), axis, first=i == 0)
    imp.emit_module(node, module, node.inputs[1 - i])


onnx_ops.CONVERTERS.update({"MatMul": _matmul, "Transpose": _transpose, "Split": _split, "Squeeze": _squeeze,
                            "Gather": _gather, "Expand": _expand, "Concat": _concat})
