"""Where the batch is in every tensor of an ONNX graph, and converters that move it first (seq-first layouts).

PyTorch's TorchScript exporter writes ``nn.MultiheadAttention(batch_first=True)`` in a sequence-first
layout: Transpose to [L, N, E], the in-projection, Reshape to [L, N, 3, E] and [L, N h, d] (the batch
folded with the heads), Transpose to [N h, L, d], the attention on [N, h, L, d], then [L, N, h, d],
[L N, E] (the batch folded *inside* the tokens), the out-projection, [L, N, E] and back to [N, L, E].
The IR wants the batch outermost in axis 0 (``ir/movement.py``), so such a graph is converted in the
batch-first form of every tensor instead.

Math. A tensor T of shape S whose axis b has size k N (N the batch) is, read row-major, [O, N, R] with O =
prod(S[:b]) k1 the entries before the sample index and R = k2 prod(S[b+1:]) those after (k = k1 k2: k1 is
the factor of axis b outside the batch, k2 the one inside). Its *layout* is (b, k1, k). Its batch-first
form E(T) is the [N, O R] block of each sample, shaped [N, S[:b], k, S[b+1:]] (the k axis dropped when
k = 1); sample n's flat order in E(T) is o R + r, the order of T's [O, N, R] view with n fixed. Hence:

* Reshape (and Flatten/Squeeze/Unsqueeze) keeps O and R (it keeps the flat order), so it is the
  per-sample reshape E(out) = reshape(E(in), (-1, ...)) and the output's k1 = O / prod(S_out[:b']);
* Transpose(perm) carries the axis with its k1: E(out) = permute(E(in), (0, ...)) on the other axes;
* Gather/Slice along another axis, a MatMul whose contraction misses axis b, Softmax over another
  axis, and elementwise ops (constants broadcasting from the axes after b only) act on E(in) as on T.

A tensor with layout (0, 1, k) is kept as it is, [N k, ...] (``passes/rules/batch_fold.py``); every other
one is held in its batch-first form, so the emitted graph only has batch-first reshapes, permutes with
perm[0] = 0, and narrows off axis 0. Which axis grows with the batch is measured, not guessed: the graph
(its Reshape targets resolved by ``frontends/onnx_shapes.py``) runs in onnxruntime at batches 2 and 3,
and a tensor has a layout when exactly one axis differs, by a factor 3 / 2. k1 is propagated (Reshape
keeps O, the others keep k1). Not handled (one line naming the node): the batch spread over two axes, an
op that reads along the axis holding the batch (a Gather, Slice, Softmax or contraction over it),
constants that vary along the axes before the batch, and any other op type while the batch is off axis 0.
Models with a static batch are not analysed (a batch of 1 does not say which axis is the batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
import torch.fx as fx
import torch.nn.functional as F

from qcompile.frontends import onnx_ops
from qcompile.frontends.onnx_ops import Builder, Converter, Unsupported, _constant, _label
from qcompile.frontends.onnx_shapes import PROBE_BATCHES, run_at
from qcompile.ir.meta import set_info

RESHAPES = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")
UNARY = ("Identity", "Dropout", "Relu", "Clip", "Erf", "Gelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish",
         "LeakyRelu", "Elu")
BINARY = ("Add", "Sub", "Mul", "Div")


@dataclass(frozen=True)
class Layout:
    """The batch in one tensor: on ``axis``, whose size is ``factor`` N with ``outer`` of it outside the
    batch; ``dims`` is the shape with that axis' size given as ``factor``."""

    axis: int
    outer: int
    factor: int
    dims: tuple[int, ...]

    @property
    def plain(self) -> bool:
        """The batch outermost in axis 0: the tensor is held as it is."""
        return self.axis == 0 and self.outer == 1

    @property
    def first(self) -> tuple[int, ...]:
        """The batch-first form's shape after its batch entry."""
        b, k = self.axis, self.factor
        return (*self.dims[:b], *((k,) if k > 1 else ()), *self.dims[b + 1:])

    @property
    def held(self) -> tuple[int, ...]:
        """The shape of the value that computes the tensor, after its first entry."""
        return self.dims[1:] if self.plain else self.first

    def first_axis(self, a: int) -> int | None:
        """Axis ``a`` of the tensor in its batch-first form (None: axis b with k = 1, which it drops)."""
        if a < self.axis:
            return a + 1
        if a == self.axis:
            return a + 1 if self.factor > 1 else None
        return a + 1 if self.factor > 1 else a


Layouts = dict[str, Layout]


def _with_shapes(model: onnx.ModelProto, names: list[str]) -> tuple[onnx.ModelProto, list[str]]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outs = [f"{name}__qcompile_shape" for name in names]
    probe.graph.node.extend(onnx.helper.make_node("Shape", [n], [o]) for n, o in zip(names, outs, strict=True))
    return probe, outs


def probe_shapes(graph: gs.Graph, sample_shape: Sequence[int] | None) -> list[dict[str, tuple[int, ...]]]:
    """The shape of every computed tensor of ``graph`` at each probe batch (onnxruntime, zero inputs)."""
    names = sorted({t.name for node in graph.nodes for t in node.outputs if isinstance(t, gs.Variable) and t.name})
    model, outs = _with_shapes(gs.export_onnx(graph), names)
    runs = run_at(model, outs, PROBE_BATCHES, sample_shape)
    return [{n: tuple(int(d) for d in run[o]) for n, o in zip(names, outs, strict=True)} for run in runs]


def _measured(at: tuple[tuple[int, ...], ...]) -> tuple[int, int, tuple[int, ...]] | None:
    """(axis, factor, dims) from the shapes at the probe batches, None unless one axis grows with the batch."""
    if len({len(s) for s in at}) != 1:
        return None
    differ = [i for i in range(len(at[0])) if len({s[i] for s in at}) > 1]
    if len(differ) != 1:
        return None
    b, (n0, n1) = differ[0], PROBE_BATCHES
    if at[0][b] % n0 or at[0][b] * n1 != at[1][b] * n0:
        return None
    factor = at[0][b] // n0
    return b, factor, tuple(factor if i == b else d for i, d in enumerate(at[0]))


def _outer(node: gs.Node, found: Layouts, axis: int, factor: int, dims: tuple[int, ...]) -> int | None:
    """k1 of an output of ``node``: a reshape keeps O (the entries before the sample), any other op k1."""
    inputs = [found[t.name] for t in node.inputs if t.name in found]
    if not inputs:
        return 1
    if node.op not in RESHAPES:
        return inputs[0].outer
    src = inputs[0]
    before, ahead = math.prod(src.dims[:src.axis]) * src.outer, math.prod(dims[:axis])
    if before % ahead or factor % (before // ahead):
        return None  # the entries before the sample do not end inside the batch's axis
    return before // ahead


def analyse(graph: gs.Graph, shapes: list[dict[str, tuple[int, ...]]],
            sample_shape: Sequence[int] | None = None) -> Layouts:
    """The layout of every tensor whose one axis grows with the batch (graph inputs: the batch first)."""
    found: Layouts = {}
    for t in graph.inputs:
        given = tuple(t.shape or ())[1:]
        if sample_shape is not None and len(sample_shape) == len(given):
            given = tuple(sample_shape)
        if t.shape and all(isinstance(d, int) for d in given):
            found[t.name] = Layout(0, 1, 1, (1, *(int(d) for d in given)))
    for node in graph.nodes:
        for t in node.outputs:
            measured = _measured(tuple(s[t.name] for s in shapes)) if t.name in shapes[0] else None
            if measured is None:
                continue
            axis, factor, dims = measured
            outer = _outer(node, found, axis, factor, dims)
            if outer is not None:
                found[t.name] = Layout(axis, outer, factor, dims)
    return found


# ------------------------------------------------------------------------------------------ converters


def _layout(lays: Layouts, t: gs.Tensor) -> Layout:
    lay = lays.get(t.name)
    if lay is None:
        raise Unsupported(f"the batch spans several axes (or none) of '{t.name}'; keep it in one axis (reshape "
                          "per sample)")
    return lay


def _call(imp: Builder, node: gs.Node, fn: Callable[..., object], *args: object) -> fx.Node:
    created = imp.fx_graph.call_function(fn, args)  # type: ignore[arg-type]
    set_info(created, source=_label(node))
    return created


def _first(imp: Builder, node: gs.Node, t: gs.Tensor, lay: Layout) -> fx.Node:
    """The batch-first form of ``t`` (a kept [N k, ...] tensor is reshaped to [N, k, ...])."""
    value = imp.value(t)
    return _call(imp, node, torch.reshape, value, (-1, *lay.first)) if lay.plain and lay.factor > 1 else value


def _held(imp: Builder, node: gs.Node, out: gs.Tensor, value: fx.Node, lay: Layout) -> None:
    """Bind ``out`` to its batch-first form ``value``, reshaped to [N k, ...] when the tensor is kept."""
    if lay.plain and lay.factor > 1:
        value = _call(imp, node, torch.reshape, value, (-1, *lay.dims[1:]))
    set_info(value, source=_label(node))
    imp.env[out.name] = value


def _kept(src: Layout, out: Layout, axis: int | None = None) -> None:
    """Refuse unless ``out`` holds the batch as this op moves it: on ``axis`` (default: where it was)."""
    if (src.axis if axis is None else axis, src.outer, src.factor) != (out.axis, out.outer, out.factor):
        raise Unsupported(f"onnxruntime finds the batch on axis {out.axis} of the output, not where this op puts "
                          f"axis {src.axis}")


def _transpose(imp: Builder, node: gs.Node, lays: Layouts) -> None:
    src, out = _layout(lays, node.inputs[0]), _layout(lays, node.outputs[0])
    rank = len(src.dims)
    perm = [int(p) % rank for p in node.attrs.get("perm", list(range(rank))[::-1])]
    _kept(src, out, perm.index(src.axis))
    moved = [0, *(a for a in (src.first_axis(p) for p in perm) if a is not None)]
    value = _first(imp, node, node.inputs[0], src)
    if moved != sorted(moved):
        value = _call(imp, node, torch.permute, value, tuple(moved))
    _held(imp, node, node.outputs[0], value, out)


def _reshape(imp: Builder, node: gs.Node, lays: Layouts) -> None:
    src, out = _layout(lays, node.inputs[0]), _layout(lays, node.outputs[0])
    value = imp.value(node.inputs[0])
    if src.held != out.held:
        value = _call(imp, node, torch.reshape, value, (-1, *out.held))
    set_info(value, source=_label(node))
    imp.env[node.outputs[0].name] = value


def _axis_of(node: gs.Node, lay: Layout, default: int = 0) -> int:
    axis = int(node.attrs.get("axis", default)) % len(lay.dims)
    if axis == lay.axis:
        raise Unsupported(f"reads along axis {axis}, which holds the batch; keep the batch whole")
    return axis


def _gather(imp: Builder, node: gs.Node, lays: Layouts) -> None:
    src, out = _layout(lays, node.inputs[0]), _layout(lays, node.outputs[0])
    axis, index = _axis_of(node, src), _constant(node.inputs[1])
    flat = [] if index is None or index.ndim > 1 else [int(i) % src.dims[axis] for i in index.reshape(-1)]
    if not flat or flat != list(range(flat[0], flat[0] + len(flat))):
        raise Unsupported("indices that are not a constant scalar or contiguous run")
    scalar = index is not None and index.ndim == 0
    _kept(src, out, src.axis - int(scalar and axis < src.axis))
    axis_first = src.first_axis(axis)
    assert axis_first is not None, "not the batch's axis"
    value = _call(imp, node, torch.narrow, _first(imp, node, node.inputs[0], src), axis_first, flat[0], len(flat))
    if scalar:
        value = _call(imp, node, torch.reshape, value, (-1, *out.first))
    _held(imp, node, node.outputs[0], value, out)


def _slice(imp: Builder, node: gs.Node, lays: Layouts) -> None:
    src, out = _layout(lays, node.inputs[0]), _layout(lays, node.outputs[0])
    ints = [_constant(onnx_ops._present(node, i)) for i in range(1, 5)]
    if ints[0] is None or ints[1] is None:
        raise Unsupported("run-time starts or ends")
    starts, ends = ints[0].reshape(-1).tolist(), ints[1].reshape(-1).tolist()
    axes = ints[2].reshape(-1).tolist() if ints[2] is not None else list(range(len(starts)))
    steps = ints[3].reshape(-1).tolist() if ints[3] is not None else [1] * len(starts)
    if any(s != 1 for s in steps):
        raise Unsupported(f"steps {steps} (only 1 is supported)")
    _kept(src, out)
    value = _first(imp, node, node.inputs[0], src)
    for axis, start, end in zip(axes, starts, ends, strict=True):
        axis = int(axis) % len(src.dims)
        if axis == src.axis:
            if int(start) != 0 or int(end) < 2**62:
                raise Unsupported("slices the axis that holds the batch")
            continue
        begin, stop, _ = slice(int(start), int(end)).indices(src.dims[axis])
        if (begin, stop) != (0, src.dims[axis]):
            value = _call(imp, node, torch.narrow, value, src.first_axis(axis), begin, max(0, stop - begin))
    _held(imp, node, node.outputs[0], value, out)


def _matmul(imp: Builder, node: gs.Node, lays: Layouts) -> None:
    src, out = _layout(lays, node.inputs[0]), _layout(lays, node.outputs[0])
    rank = len(src.dims)
    b = node.inputs[1]
    _kept(src, out)
    if _constant(b) is not None:
        if src.axis == rank - 1 or node.attrs.get("transA", 0):
            raise Unsupported("the product contracts the axis that holds the batch")
        onnx_ops.CONVERTERS[node.op](imp, node)  # a Linear on the last axis: the same on either form
        return
    other = _layout(lays, b)
    if node.op != "MatMul" or other != src or src.axis >= rank - 2:
        raise Unsupported("a product of two activations whose batch is not on the same leading axis")
    value = _call(imp, node, torch.matmul, _first(imp, node, node.inputs[0], src), _first(imp, node, b, other))
    _held(imp, node, node.outputs[0], value, out)


def _elementwise(imp: Builder, node: gs.Node, lays: Layouts) -> None:
    computed = [t for t in node.inputs if not isinstance(t, gs.Constant)]
    found = [_layout(lays, t) for t in computed]
    if any(lay != found[0] for lay in found[1:]):
        raise Unsupported("operands whose batch is in different places")
    lay = found[0]
    for c in (t for t in node.inputs if isinstance(t, gs.Constant)):
        shape = (1,) * (len(lay.dims) - np.ndim(c.values)) + tuple(np.shape(c.values))
        if any(d != 1 for d in shape[:lay.axis + 1]):
            raise Unsupported(f"constant '{c.name}' varies along the axes up to the batch's axis {lay.axis}")
    for out in node.outputs:
        _kept(lay, lays.setdefault(out.name, lay))
    onnx_ops.CONVERTERS[node.op](imp, node)  # elementwise: the same on either form


def _softmax(imp: Builder, node: gs.Node, lays: Layouts) -> None:
    src = _layout(lays, node.inputs[0])
    axis = _axis_of(node, src, -1)
    if imp.graph.opset < 13 and axis != len(src.dims) - 1:
        raise Unsupported(f"opset {imp.graph.opset} softmax over the flattened axes from {axis} (only the last)")
    _kept(src, lays.setdefault(node.outputs[0].name, src))
    value = _call(imp, node, F.softmax, _first(imp, node, node.inputs[0], src), src.first_axis(axis))
    _held(imp, node, node.outputs[0], value, src)


def _layer_norm(imp: Builder, node: gs.Node, lays: Layouts) -> None:
    src = _layout(lays, node.inputs[0])
    if _axis_of(node, src, -1) != len(src.dims) - 1:
        raise Unsupported("LayerNormalization over axes other than the last")
    _kept(src, lays.setdefault(node.outputs[0].name, src))
    onnx_ops.CONVERTERS[node.op](imp, node)


LayoutConverter = Callable[[Builder, gs.Node, Layouts], None]
RULES: dict[str, LayoutConverter] = {
    "Transpose": _transpose, "Gather": _gather, "Slice": _slice, "MatMul": _matmul, "Gemm": _matmul,
    "Softmax": _softmax, "LayerNormalization": _layer_norm,
    **dict.fromkeys(RESHAPES, _reshape), **dict.fromkeys(UNARY + BINARY, _elementwise),
}


def _refuse(imp: Builder, node: gs.Node, lays: Layouts) -> None:
    held = [lays[t.name] for t in (*node.inputs, *node.outputs) if t.name in lays and not lays[t.name].plain]
    where = f"axis {held[0].axis}" + (f" inside a factor {held[0].outer}" if held[0].outer > 1 else "")
    raise Unsupported(f"batch on {where} (seq-first); move it to axis 0 before this op "
                      "(batch_first=True, no transpose of the batch)")


def router(lays: Layouts) -> Callable[[gs.Node], Converter | None]:
    """For Builder.route: the layout converter of a node that reads or writes a tensor held batch-first."""

    def route(node: gs.Node) -> Converter | None:
        tensors = [t for t in (*node.inputs, *node.outputs) if not isinstance(t, gs.Constant) and t.name]
        if not any(t.name in lays and not lays[t.name].plain for t in tensors):
            return None
        rule = RULES.get(node.op, _refuse)
        return lambda imp, n: rule(imp, n, lays)

    return route
