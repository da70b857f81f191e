"""ONNX converters for pointwise functions, products and LayerNorm (registered into onnx_ops.CONVERTERS).

  Sigmoid / Tanh / HardSwish                          -> torch.sigmoid / torch.tanh / F.hardswish
  HardSigmoid(alpha, beta)                            -> F.hardsigmoid (alpha = 1/6, beta = 1/2, PyTorch's), else
                                                         tables.hard_sigmoid(x, alpha, beta) = clamp(a x + b, 0, 1)
  LeakyRelu(alpha) / Elu(alpha) / Gelu(approximate)   -> F.leaky_relu / F.elu / F.gelu
  PRelu(constant slope: one, or one per channel)      -> nn.PReLU (a per-channel table)
  Softmax(axis) (opset >= 13; before it, the last axis) -> F.softmax(x, axis)
  Mul(a, b)                                           -> operator.mul(a, b) (a constant becomes a graph
                                                         attribute: canonicalize folds a layer scale)
  Transpose(perm) (unless another converter is there) -> torch.permute(x, perm) (canonicalize removes
                                                         ConvNeXt's channels-last chains)
  LayerNormalization over the last axis (constant
  Scale and B; Mean/InvStdDev outputs unused)         -> nn.LayerNorm(D)
Before conversion ``fuse_patterns`` rewrites the erf form of GELU that exporters emit below opset 20,
Mul(Mul(x, Add(Erf(Div(x, sqrt 2)), 1)), 0.5) (either operand order of each Add/Mul, or Mul(x, 1/sqrt 2)
for the Div), into one Gelu node, so it becomes one exact table instead of four ops.
Not handled: LayerNormalization over several
axes or with run-time Scale/B, the tanh form of GELU spelled out in elementary ops (export at opset 20).
"""

from __future__ import annotations

import math
import operator

import numpy as np
import onnx_graphsurgeon as gs
import torch
import torch.nn.functional as F
from torch import nn

from qcompile.frontends import onnx_ops
from qcompile.frontends.onnx_ops import Builder, Unsupported
from qcompile.quant.tables import hard_sigmoid


def _unary(fn: object) -> onnx_ops.Converter:
    def convert(imp: Builder, node: gs.Node) -> None:
        imp.emit_function(node, fn, (imp.value(node.inputs[0]),))  # type: ignore[arg-type]

    return convert


def _hard_sigmoid(imp: Builder, node: gs.Node) -> None:
    alpha, beta = float(node.attrs.get("alpha", 0.2)), float(node.attrs.get("beta", 0.5))
    x = imp.value(node.inputs[0])
    if math.isclose(alpha, 1 / 6, rel_tol=1e-6) and beta == 0.5:
        imp.emit_function(node, F.hardsigmoid, (x,))
    else:
        imp.emit_function(node, hard_sigmoid, (x, alpha, beta))


def _with_alpha(fn: object, default: float) -> onnx_ops.Converter:
    def convert(imp: Builder, node: gs.Node) -> None:
        imp.emit_function(node, fn, (imp.value(node.inputs[0]), float(node.attrs.get("alpha", default))))  # type: ignore[arg-type]

    return convert


def _prelu(imp: Builder, node: gs.Node) -> None:
    slope = onnx_ops._weight(node, 1, "slope")
    rank = onnx_ops._rank(node.inputs[0])
    per_channel = slope.size > 1
    if per_channel and (rank is None or slope.shape not in ((slope.size,) + (1,) * (rank - 2),
                                                             (1, slope.size) + (1,) * (rank - 2))):
        raise Unsupported(f"slope of shape {list(slope.shape)} (only one slope, or one per channel of dim 1)")
    prelu = nn.PReLU(slope.size)
    onnx_ops._set(prelu.weight, slope.reshape(-1))
    imp.emit_module(node, prelu, node.inputs[0])


def _softmax(imp: Builder, node: gs.Node) -> None:
    rank = onnx_ops._rank(node.inputs[0])
    axis = onnx_ops._axis(node, node.inputs[0], -1)
    if imp.graph.opset < 13 and rank is not None and axis != rank - 1:
        raise Unsupported(f"opset {imp.graph.opset} softmax over the flattened axes from {axis} (only the last)")
    imp.emit_function(node, F.softmax, (imp.value(node.inputs[0]), axis))


def _gelu(imp: Builder, node: gs.Node) -> None:
    approximate = str(node.attrs.get("approximate", "none"))
    imp.emit_function(node, F.gelu, (imp.value(node.inputs[0]),), {"approximate": approximate})


def _mul(imp: Builder, node: gs.Node) -> None:
    """Mul of two activations (a product); with a constant operand, onnx_arith's multiply by a constant."""
    a, b = node.inputs
    if isinstance(a, gs.Constant) or isinstance(b, gs.Constant):
        from qcompile.frontends.onnx_arith import multiply_constant

        multiply_constant(imp, node)
        return
    imp.emit_function(node, operator.mul, (imp.value(a), imp.value(b)))


def _transpose(imp: Builder, node: gs.Node) -> None:
    perm = node.attrs.get("perm")
    if perm is None:
        raise Unsupported("no perm attribute (reverses every axis)")
    imp.emit_function(node, torch.permute, (imp.value(node.inputs[0]), tuple(int(p) for p in perm)))


def _layer_norm(imp: Builder, node: gs.Node) -> None:
    onnx_ops._refuse_used_extra_outputs(imp, node, "Mean/InvStdDev")
    rank = onnx_ops._rank(node.inputs[0])
    axis = int(node.attrs.get("axis", -1))
    if axis != -1 and (rank is None or axis != rank - 1):
        raise Unsupported(f"axis {axis} (only the last axis is supported)")
    scale = onnx_ops._weight(node, 1, "Scale")
    bias = onnx_ops._optional_weight(node, 2, "B")
    ln = nn.LayerNorm(scale.size, float(node.attrs.get("epsilon", 1e-5)), bias=bias is not None)
    onnx_ops._set(ln.weight, scale)
    if bias is not None:
        onnx_ops._set(ln.bias, bias)
    imp.emit_module(node, ln, node.inputs[0])


# ------------------------------------------------------------------------------------ erf GELU pattern


def _scalar(t: gs.Tensor) -> float | None:
    return float(np.asarray(t.values).reshape(-1)[0]) if isinstance(t, gs.Constant) and t.values.size == 1 else None


def _only_user(t: gs.Tensor, op: str) -> gs.Node | None:
    return t.outputs[0] if len(t.outputs) == 1 and t.outputs[0].op == op else None


def _other(node: gs.Node, t: gs.Tensor) -> gs.Tensor | None:
    """The operand of a binary ``node`` that is not ``t`` (None if ``t`` is not one of them)."""
    a, b = node.inputs
    return b if a is t else a if b is t else None


def _gelu_input(erf: gs.Node) -> gs.Tensor | None:
    """x when erf's input is x / sqrt(2) (Div) or x * (1/sqrt(2)) (Mul)."""
    pre = erf.inputs[0].inputs[0] if erf.inputs[0].inputs else None
    if pre is None or pre.op not in ("Div", "Mul") or len(pre.inputs) != 2:
        return None
    x, c = pre.inputs if pre.op == "Div" or not isinstance(pre.inputs[0], gs.Constant) else pre.inputs[::-1]
    want = math.sqrt(2.0) if pre.op == "Div" else 1 / math.sqrt(2.0)
    value = _scalar(c)
    return x if value is not None and math.isclose(value, want, rel_tol=1e-5) else None


def _match_erf_gelu(erf: gs.Node) -> tuple[gs.Tensor, gs.Node] | None:
    x = _gelu_input(erf)
    add = _only_user(erf.outputs[0], "Add")
    if x is None or add is None or _scalar(_other(add, erf.outputs[0]) or gs.Variable("-")) != 1.0:
        return None
    mul = _only_user(add.outputs[0], "Mul")
    if mul is None or _other(mul, add.outputs[0]) is not x:
        return None
    half = _only_user(mul.outputs[0], "Mul")
    if half is None or _scalar(_other(half, mul.outputs[0]) or gs.Variable("-")) != 0.5:
        return None
    return x, half


def fuse_patterns(graph: gs.Graph) -> None:
    """Rewrite every erf-form GELU into one Gelu node (named after its Erf)."""
    fused = False
    for erf in [n for n in graph.nodes if n.op == "Erf"]:
        found = _match_erf_gelu(erf)
        if found is None:
            continue
        x, last = found
        graph.nodes.append(gs.Node("Gelu", erf.name, {"approximate": "none"}, [x], list(last.outputs)))
        last.outputs.clear()
        fused = True
    if fused:
        graph.cleanup().toposort()


onnx_ops.CONVERTERS.update({
    "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh), "HardSwish": _unary(F.hardswish),
    "HardSigmoid": _hard_sigmoid, "LeakyRelu": _with_alpha(F.leaky_relu, 0.01), "Elu": _with_alpha(F.elu, 1.0),
    "Gelu": _gelu, "Mul": _mul, "LayerNormalization": _layer_norm, "PRelu": _prelu,
    "Softmax": _softmax,
})
onnx_ops.CONVERTERS.setdefault("Transpose", _transpose)
