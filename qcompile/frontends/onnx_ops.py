"""ONNX op converters: each ONNX node becomes torch-level fx nodes (the vocabulary canonicalize accepts).

Each conversion keeps the computed function:

  Conv (2-D; group, strides, dilations, pads, auto_pad)      -> nn.Conv2d
  Gemm  Y = alpha * A * op(B) + beta * C  (transA = 0)        -> nn.Linear(W = alpha * op(B)^T, b = beta * C)
  MatMul(A, constant B)                                       -> nn.Linear(W = B^T, no bias)
  Add(bias-less Linear/Conv, constant per-channel c)          -> that layer with bias c (the MatMul + Add idiom)
  Add(x, y)                                                   -> operator.add(x, y)
  BatchNormalization (inference)                              -> nn.BatchNorm2d (nn.BatchNorm1d on 2-D/3-D)
  Relu / Clip(x, constant min, constant max)                  -> torch.relu / torch.clamp(x, min=, max=)
  MaxPool / AveragePool / GlobalAveragePool                   -> nn.MaxPool2d / nn.AvgPool2d / AdaptiveAvgPool2d(1)
  ReduceMean over axes (2, 3)                                 -> torch.mean (canonicalize makes it a pool)
  Flatten(axis=1) / Reshape(constant target, batch kept)      -> torch.flatten(x, 1) / torch.reshape(x, (-1, ...))
  Concat(axis=1)                                              -> torch.cat([...], dim=1)
  Identity / Dropout (inference)                              -> removed

Padding: auto_pad SAME_UPPER/SAME_LOWER needs total = max(0, (ceil(in/s) - 1) * s + (k - 1) * d + 1 - in)
per axis (the input size ``in`` only when s > 1: with s = 1 the total is (k - 1) * d), the extra one at the
end (UPPER) or the beginning (LOWER). Explicit or computed, pads must split evenly (begin = end).
Reshape: the batch (dim 0) stays symbolic. The target's first entry must be 0, -1 or the input's static
batch (a model exported at batch 1 is generalized); the others are per-sample: 0 copies the input's entry,
a -1 among several is computed from the static per-sample size.
Average pooling without padding ignores count_include_pad (it is set to PyTorch's True).

Not handled (a converter raises ``Unsupported`` with the reason; the caller lists every such node): other
op types and domains, asymmetric padding, 1-D/3-D convolution and pooling, transA, run-time weights or clip
bounds, training-mode BatchNormalization/Dropout, used MaxPool indices or extra BatchNormalization outputs,
constant Add operands other than a bias, concatenation or flattening across another axis, a reshape that
moves the batch. Shapes these rules need but cannot get raise DynamicShapeError at once.
"""

from __future__ import annotations

import keyword
import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
import torch
import torch.fx as fx
from torch import nn

from qcompile.errors import QCompileError
from qcompile.ir.meta import set_info

Dim = int | str | None


class OnnxImportError(QCompileError):
    """An ONNX model qcompile cannot import; the message names the problem and a fix."""


class DynamicShapeError(OnnxImportError):
    """A shape the import needs is symbolic or computed at run time and cannot be resolved."""


class Unsupported(Exception):
    """Raised by a converter: this node (or this setting of it) has no torch-level form; the text says why."""


def attr_name(text: str) -> str:
    """A Python identifier for an ONNX name (never a keyword: fx writes it into generated code)."""
    name = re.sub(r"\W+", "_", text, flags=re.ASCII).strip("_") or "node"
    name = f"n_{name}" if name[0].isdigit() else name
    return f"{name}_" if keyword.iskeyword(name) or name in RESERVED else name


RESERVED = ("self", "forward", "training", "inf", "nan", "torch", "device", "fx_pytree", "pytree")


def _layer_name(node: gs.Node) -> str:
    """'/layer1/conv/Conv_2' (the PyTorch exporter's module path + op) -> 'layer1_conv'; else the sanitized name."""
    path, _, last = node.name.rpartition("/")
    exporter_style = path.strip("/") and re.fullmatch(rf"{re.escape(node.op)}(_\d+)?", last)
    return attr_name(path if exporter_style else node.name)


def _present(node: gs.Node, index: int) -> gs.Tensor | None:
    """Input ``index`` of ``node``, or None when it is absent (past the end, or the empty name)."""
    if index >= len(node.inputs) or not node.inputs[index].name:
        return None
    return node.inputs[index]


def _constant(t: gs.Tensor | None) -> np.ndarray | None:
    return np.asarray(t.values) if isinstance(t, gs.Constant) else None


def _used(t: gs.Tensor, graph: gs.Graph) -> bool:
    return bool(t.outputs) or any(t is out for out in graph.outputs)


def _label(node: gs.Node) -> str:
    return f"{node.name} ({node.op})"


@dataclass
class Builder:
    """Builds the fx graph from ``graph``; ``env`` maps ONNX tensor names to the fx values computing them."""

    graph: gs.Graph
    root: nn.Module = field(default_factory=nn.Module)
    fx_graph: fx.Graph = field(default_factory=fx.Graph)
    env: dict[str, fx.Node] = field(default_factory=dict)
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (name, op type, why) of refused nodes
    route: Callable[[gs.Node], Converter | None] | None = None  # a converter before CONVERTERS' (onnx_layout)

    def value(self, t: gs.Tensor) -> fx.Node:
        if isinstance(t, gs.Constant):
            raise Unsupported(f"constant operand '{t.name}' where a computed tensor is expected")
        return self.env[t.name]

    def bind(self, node: gs.Node, value: fx.Node) -> None:
        self.env[node.outputs[0].name] = value

    def emit_module(self, node: gs.Node, module: nn.Module, x: gs.Tensor | fx.Node) -> fx.Node:
        arg, base, i = x if isinstance(x, fx.Node) else self.value(x), _layer_name(node), 1
        name = base
        while hasattr(self.root, name):
            name, i = f"{base}_{i}", i + 1
        self.root.add_module(name, module.eval())
        return self._finish(node, self.fx_graph.call_module(name, (arg,)))

    def emit_function(self, node: gs.Node, fn: Callable[..., Any], args: tuple[Any, ...],
                      kwargs: dict[str, Any] | None = None) -> fx.Node:
        created = self.fx_graph.create_node("call_function", fn, args, kwargs or {}, name=attr_name(node.name))
        return self._finish(node, created)

    def _finish(self, node: gs.Node, created: fx.Node) -> fx.Node:
        set_info(created, source=_label(node))
        self.bind(node, created)
        return created

    def convert(self, node: gs.Node) -> None:
        """Convert ``node``; if it has no torch-level form, record why and alias its outputs to an input."""
        rule = CONVERTERS.get(node.op) if node.domain in (None, "", "ai.onnx") else None
        rule = (self.route(node) if self.route is not None and rule is not None else None) or rule
        try:
            if rule is None:
                raise Unsupported(f"domain {node.domain}" if node.domain not in (None, "", "ai.onnx") else "")
            rule(self, node)
        except Unsupported as why:
            self.problems.append((node.name, node.op, str(why)))
            self._bind_through(node)

    def _bind_through(self, node: gs.Node) -> None:
        """After a refused node, let its users convert anyway (to report them too): alias an input."""
        known = [self.env[t.name] for t in node.inputs if t.name in self.env]
        stand_in = known[0] if known else next(iter(self.env.values()))
        for out in node.outputs:
            self.env.setdefault(out.name, stand_in)


# ------------------------------------------------------------------------------------------ windows


def _ints(node: gs.Node, name: str, default: Sequence[int]) -> list[int]:
    return [int(v) for v in node.attrs.get(name, default)]


def _same_total(node: gs.Node, axis: int, k: int, s: int, d: int) -> int:
    """Total SAME padding along spatial ``axis``: (k - 1) * d at stride 1, else from the static input size."""
    if s == 1:
        return (k - 1) * d
    shape = node.inputs[0].shape
    size = shape[2 + axis] if shape is not None and len(shape) > 2 + axis else None
    if not isinstance(size, int):
        raise DynamicShapeError(
            f"{_label(node)}: auto_pad={node.attrs['auto_pad']} with stride {s} needs a static input size, "
            f"got {shape}; export with a fixed height and width or explicit pads"
        )
    return max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)


def _same_pads(node: gs.Node, kernel: list[int], strides: list[int], dilations: list[int]) -> list[int]:
    """[begin_h, begin_w, end_h, end_w]; the odd one goes to the end (SAME_UPPER) or the beginning (SAME_LOWER)."""
    totals = [_same_total(node, i, *kds) for i, kds in enumerate(zip(kernel, strides, dilations, strict=True))]
    small, large = [t // 2 for t in totals], [t - t // 2 for t in totals]
    return small + large if node.attrs["auto_pad"] == "SAME_UPPER" else large + small


def _padding(node: gs.Node, kernel: list[int], strides: list[int], dilations: list[int]) -> tuple[int, int]:
    auto = node.attrs.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = _same_pads(node, kernel, strides, dilations)
    else:
        pads = [0, 0, 0, 0] if auto == "VALID" else _ints(node, "pads", [0, 0, 0, 0])
    if pads[:2] != pads[2:]:
        raise Unsupported(f"asymmetric pads {pads} (begin != end); pad symmetrically or add an explicit Pad")
    return (pads[0], pads[1])


@dataclass(frozen=True)
class _Window:
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]


def _window(node: gs.Node, kernel: list[int]) -> _Window:
    if len(kernel) != 2:
        raise Unsupported(f"{len(kernel)}-D window (only 2-D is supported)")
    strides, dilations = _ints(node, "strides", [1, 1]), _ints(node, "dilations", [1, 1])
    padding = _padding(node, kernel, strides, dilations)
    return _Window((kernel[0], kernel[1]), (strides[0], strides[1]), padding, (dilations[0], dilations[1]))


# ------------------------------------------------------------------------------------------ helpers


def _weight(node: gs.Node, index: int, what: str) -> np.ndarray:
    values = _constant(_present(node, index))
    if values is None:
        raise Unsupported(f"run-time {what} (input {index} must be a constant initializer)")
    return values.astype(np.float32)


def _optional_weight(node: gs.Node, index: int, what: str) -> np.ndarray | None:
    return None if _present(node, index) is None else _weight(node, index, what)


def _set(param: torch.Tensor | None, values: np.ndarray) -> None:
    assert param is not None, "the module was created with this parameter"
    with torch.no_grad():
        param.copy_(torch.from_numpy(np.array(values, dtype=np.float32)).reshape(param.shape))


def _rank(t: gs.Tensor) -> int | None:
    return None if t.shape is None else len(t.shape)


def _axis(node: gs.Node, t: gs.Tensor, default: int) -> int:
    axis = int(node.attrs.get("axis", default))
    if axis >= 0:
        return axis
    rank = _rank(t)
    if rank is None:
        raise Unsupported(f"negative axis {axis} on a tensor of unknown rank")
    return axis + rank


def _refuse_used_extra_outputs(imp: Builder, node: gs.Node, what: str) -> None:
    if any(_used(t, imp.graph) for t in node.outputs[1:]):
        raise Unsupported(f"its {what} output is used")


# ------------------------------------------------------------------------------------------ converters


def _conv(imp: Builder, node: gs.Node) -> None:
    weight = _weight(node, 1, "weights")
    bias = _optional_weight(node, 2, "bias")
    if weight.ndim != 4:
        raise Unsupported(f"{weight.ndim - 2}-D convolution (only 2-D is supported)")
    win, groups = _window(node, list(weight.shape[2:])), int(node.attrs.get("group", 1))
    conv = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], win.kernel, win.stride, win.padding,
                     win.dilation, groups, bias=bias is not None)
    _set(conv.weight, weight)
    if bias is not None:
        _set(conv.bias, bias)
    imp.emit_module(node, conv, node.inputs[0])


def _linear(weight: np.ndarray, bias: np.ndarray | None) -> nn.Linear:
    """nn.Linear computing x @ weight.T + bias; ``bias`` broadcasts from 1 or out_features values."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None)
    _set(linear.weight, weight)
    if bias is not None:
        if bias.size not in (1, out_features) or bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1):
            raise Unsupported(f"bias of shape {list(bias.shape)} does not broadcast per output feature")
        _set(linear.bias, np.broadcast_to(bias.reshape(-1), (out_features,)))
    return linear


def _gemm(imp: Builder, node: gs.Node) -> None:
    if node.attrs.get("transA", 0):
        raise Unsupported("transA=1 (the activation would be transposed)")
    b = _weight(node, 1, "B")
    c = _optional_weight(node, 2, "C")
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    weight = alpha * (b if node.attrs.get("transB", 0) else b.T)
    imp.emit_module(node, _linear(weight, None if c is None else beta * c), node.inputs[0])


def _matmul(imp: Builder, node: gs.Node) -> None:
    b = _weight(node, 1, "right operand")
    if b.ndim != 2:
        raise Unsupported(f"{b.ndim}-D right operand (only a 2-D weight matrix is supported)")
    imp.emit_module(node, _linear(b.T, None), node.inputs[0])


def _absorb_bias(imp: Builder, node: gs.Node, x: gs.Tensor, bias: np.ndarray) -> bool:
    """Add(bias-less Linear/Conv output, constant per-channel c) -> that layer with bias c."""
    producer = imp.env[x.name]
    layer = imp.root.get_submodule(str(producer.target)) if producer.op == "call_module" else None
    if not isinstance(layer, (nn.Linear, nn.Conv2d)) or layer.bias is not None:
        return False
    if len(x.outputs) != 1 or any(x is out for out in imp.graph.outputs) or x.inputs[0].op not in (
        "MatMul", "Gemm", "Conv", "ConvTranspose"
    ):
        return False
    channels = layer.weight.shape[0]
    per_channel = (channels,) if isinstance(layer, nn.Linear) else (channels, 1, 1)
    if bias.size != channels or bias.shape[-len(per_channel):] != per_channel:
        return False
    layer.bias = nn.Parameter(torch.from_numpy(np.array(bias.reshape(-1), dtype=np.float32)))
    set_info(producer, source=f"{x.inputs[0].name} ({x.inputs[0].op}) + {_label(node)}")
    imp.bind(node, producer)
    return True


def _add(imp: Builder, node: gs.Node) -> None:
    a, b = node.inputs
    if not isinstance(a, gs.Constant) and not isinstance(b, gs.Constant):
        imp.emit_function(node, operator.add, (imp.value(a), imp.value(b)))
        return
    x, c = (b, a) if isinstance(a, gs.Constant) else (a, b)
    if not _absorb_bias(imp, node, x, np.asarray(c.values)):
        raise Unsupported(f"adds constant '{c.name}' (only a bias right after a bias-less MatMul/Gemm/Conv)")


def _batchnorm(imp: Builder, node: gs.Node) -> None:
    if node.attrs.get("training_mode", 0):
        raise Unsupported("training_mode=1 (export the model in eval mode)")
    _refuse_used_extra_outputs(imp, node, "running statistics")
    gamma, beta, mean, var = (_weight(node, i, "statistics") for i in range(1, 5))
    rank = _rank(node.inputs[0])
    if rank not in (None, 2, 3, 4):
        raise Unsupported(f"{rank}-D input (only 2-D to 4-D is supported)")
    kind = nn.BatchNorm2d if rank in (None, 4) else nn.BatchNorm1d
    bn = kind(gamma.size, eps=float(node.attrs.get("epsilon", 1e-5)))
    for param, values in ((bn.weight, gamma), (bn.bias, beta), (bn.running_mean, mean), (bn.running_var, var)):
        _set(param, values)
    imp.emit_module(node, bn, node.inputs[0])


def _relu(imp: Builder, node: gs.Node) -> None:
    imp.emit_function(node, torch.relu, (imp.value(node.inputs[0]),))


def _bound(node: gs.Node, index: int) -> float | None:
    t = _present(node, index)
    if t is None:
        return None
    values = _constant(t)
    if values is None or values.size != 1:
        raise Unsupported(f"run-time or non-scalar bound '{t.name}' (min/max must be constant scalars)")
    return float(values.reshape(-1)[0])


def _clip(imp: Builder, node: gs.Node) -> None:
    lo, hi = _bound(node, 1), _bound(node, 2)
    if lo is None and hi is None:
        imp.bind(node, imp.value(node.inputs[0]))
        return
    imp.emit_function(node, torch.clamp, (imp.value(node.inputs[0]),), {"min": lo, "max": hi})


def _max_pool(imp: Builder, node: gs.Node) -> None:
    _refuse_used_extra_outputs(imp, node, "Indices")
    win = _window(node, _ints(node, "kernel_shape", []))
    pool = nn.MaxPool2d(win.kernel, win.stride, win.padding, win.dilation,
                        ceil_mode=bool(node.attrs.get("ceil_mode", 0)))
    imp.emit_module(node, pool, node.inputs[0])


def _avg_pool(imp: Builder, node: gs.Node) -> None:
    win = _window(node, _ints(node, "kernel_shape", []))
    if win.dilation != (1, 1):
        raise Unsupported(f"dilations {list(win.dilation)} (average pooling has no dilation in PyTorch)")
    include_pad = bool(node.attrs.get("count_include_pad", 0)) or win.padding == (0, 0)  # no padding: no effect
    pool = nn.AvgPool2d(win.kernel, win.stride, win.padding, bool(node.attrs.get("ceil_mode", 0)), include_pad)
    imp.emit_module(node, pool, node.inputs[0])


def _global_avg_pool(imp: Builder, node: gs.Node) -> None:
    if _rank(node.inputs[0]) not in (None, 4):
        raise Unsupported(f"{_rank(node.inputs[0])}-D input (only 4-D NCHW is supported)")
    imp.emit_module(node, nn.AdaptiveAvgPool2d(1), node.inputs[0])


def _reduce_mean(imp: Builder, node: gs.Node) -> None:
    axes_input = _constant(_present(node, 1))
    axes = [int(a) for a in (axes_input if axes_input is not None else node.attrs.get("axes", []))]
    rank = _rank(node.inputs[0])
    if rank != 4 or sorted(a % 4 for a in axes) != [2, 3]:
        raise Unsupported(f"mean over axes {axes} of a rank-{rank} tensor (only over (2, 3) of NCHW)")
    keep = bool(node.attrs.get("keepdims", 1))
    imp.emit_function(node, torch.mean, (imp.value(node.inputs[0]), (2, 3)), {"keepdim": keep})


def _flatten(imp: Builder, node: gs.Node) -> None:
    axis = _axis(node, node.inputs[0], 1)
    if axis != 1:
        raise Unsupported(f"axis {axis} (only axis 1, which keeps the batch dimension, is supported)")
    imp.emit_function(node, torch.flatten, (imp.value(node.inputs[0]), 1))


def _concat(imp: Builder, node: gs.Node) -> None:
    axis = _axis(node, node.outputs[0], 1)
    if axis != 1:
        raise Unsupported(f"axis {axis} (only the channel axis 1 is supported)")
    imp.emit_function(node, torch.cat, ([imp.value(t) for t in node.inputs],), {"dim": 1})


def _passthrough(imp: Builder, node: gs.Node) -> None:
    if node.op == "Dropout":
        _refuse_used_extra_outputs(imp, node, "mask")
        mode = _present(node, 2)
        training = _constant(mode)
        if mode is not None and (training is None or bool(training.reshape(-1)[0])):
            raise Unsupported("training_mode is not a constant False (export the model in eval mode)")
    imp.bind(node, imp.value(node.inputs[0]))


# ------------------------------------------------------------------------------------------ reshape


def _target_shape(node: gs.Node) -> tuple[int, list[int]]:
    """The Reshape target as (first entry, the others); load_onnx has folded or resolved it to a constant."""
    values = _constant(_present(node, 1))
    if values is None or values.size == 0:
        raise DynamicShapeError(
            f"{_label(node)}: the target shape is computed at run time and does not fold to a constant; export "
            "with a constant shape (torch.flatten(x, 1), or x.reshape(-1, C, H, W)) or a fixed input size"
        )
    target = [int(v) for v in values.reshape(-1)]
    return target[0], target[1:]


def _keeps_batch(first: int, in_shape: Sequence[Dim] | None) -> bool:
    static_batch = in_shape[0] if in_shape and isinstance(in_shape[0], int) else None
    return first in (0, -1) or first == static_batch


def _static(node: gs.Node, in_shape: Sequence[Dim] | None, axes: range) -> list[int]:
    dims = [in_shape[i] if in_shape is not None and i < len(in_shape) else None for i in axes]
    if not all(isinstance(d, int) for d in dims):
        raise DynamicShapeError(
            f"{_label(node)}: the target shape needs static input dimensions, got {in_shape}; export with a "
            "fixed input size or a fully specified target shape"
        )
    return [int(d) for d in dims]  # type: ignore[arg-type]


def _per_sample(node: gs.Node, rest: list[int], in_shape: Sequence[Dim] | None) -> list[int]:
    """Target entries after the batch: 0 copies the input's entry, a -1 among several is resolved."""
    out = [_static(node, in_shape, range(i, i + 1))[0] if v == 0 else v for i, v in enumerate(rest, start=1)]
    if -1 in out and len(out) > 1:
        per_sample = math.prod(_static(node, in_shape, range(1, len(in_shape) if in_shape else 2)))
        out[out.index(-1)] = per_sample // -math.prod(out)
    return out


def _reshape(imp: Builder, node: gs.Node) -> None:
    (first, rest), in_shape = _target_shape(node), node.inputs[0].shape
    if node.attrs.get("allowzero", 0) and 0 in [first, *rest]:
        raise Unsupported("allowzero=1 with a zero in the target shape")
    if not _keeps_batch(first, in_shape):
        batch = in_shape[0] if in_shape else "unknown"
        raise Unsupported(f"target shape {[first, *rest]} does not keep the batch dimension ({batch}) first")
    rest = _per_sample(node, rest, in_shape)
    x = imp.value(node.inputs[0])
    flat = in_shape is not None and all(isinstance(d, int) for d in in_shape[1:]) and rest == [
        math.prod(int(d) for d in in_shape[1:])]  # type: ignore[arg-type]
    if rest == [-1] or flat:
        imp.emit_function(node, torch.flatten, (x, 1))
    else:
        imp.emit_function(node, torch.reshape, (x, (-1, *rest)))


Converter = Callable[[Builder, gs.Node], None]
CONVERTERS: dict[str, Converter] = {
    "Conv": _conv, "Gemm": _gemm, "MatMul": _matmul, "Add": _add, "BatchNormalization": _batchnorm,
    "Relu": _relu, "Clip": _clip, "MaxPool": _max_pool, "AveragePool": _avg_pool,
    "GlobalAveragePool": _global_avg_pool, "ReduceMean": _reduce_mean, "Flatten": _flatten,
    "Reshape": _reshape, "Concat": _concat, "Identity": _passthrough, "Dropout": _passthrough,
}
