"""ONNX converters for elementwise arithmetic with constants (registered into ``onnx_ops.CONVERTERS``).

  Add(x, constant bias) right after a bias-less MatMul/Gemm/Conv  -> that layer's bias (onnx_ops._absorb_bias)
  Add / Sub / Mul / Div(x, constant c)   -> operator.add / sub / mul / truediv(x, c) (a scalar c as a number,
                                            else a buffer read by get_attr); canonicalize folds them into a
                                            layer or makes them AddConst / MulConst
  Add(c, x), Mul(c, x)                   -> the same, commuted
  Add / Sub(a, b) of two activations     -> operator.add / operator.sub
Not handled: c - x and c / x (refused), Mul / Div of two activations (another op's business).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
import torch

from qcompile.frontends import onnx_ops
from qcompile.frontends.onnx_ops import Builder, Unsupported, attr_name


def _constant_arg(imp: Builder, c: gs.Constant) -> Any:
    """A scalar as a float, else a buffer of the root module read through a get_attr node."""
    values = np.asarray(c.values, dtype=np.float32)
    if values.size == 1 and values.ndim <= 1:
        return float(values.reshape(-1)[0])
    name, i = attr_name(c.name), 1
    while hasattr(imp.root, name):
        name, i = f"{attr_name(c.name)}_{i}", i + 1
    imp.root.register_buffer(name, torch.from_numpy(values.copy()))
    return imp.fx_graph.get_attr(name)


def _binary(fn: Callable[[Any, Any], Any], commutes: bool, what: str) -> onnx_ops.Converter:
    def convert(imp: Builder, node: gs.Node) -> None:
        a, b = node.inputs
        if isinstance(a, gs.Constant) and isinstance(b, gs.Constant):
            raise Unsupported("both operands are constants")
        if isinstance(b, gs.Constant):
            imp.emit_function(node, fn, (imp.value(a), _constant_arg(imp, b)))
        elif isinstance(a, gs.Constant):
            if not commutes:
                raise Unsupported(f"{what} with the constant first (c {what} x)")
            imp.emit_function(node, fn, (imp.value(b), _constant_arg(imp, a)))
        elif fn in (operator.add, operator.sub):
            imp.emit_function(node, fn, (imp.value(a), imp.value(b)))
        else:
            raise Unsupported(f"{what} of two activations")

    return convert


_add_constant = _binary(operator.add, True, "+")


def _add(imp: Builder, node: gs.Node) -> None:
    a, b = node.inputs
    if isinstance(a, gs.Constant) != isinstance(b, gs.Constant):
        x, c = (b, a) if isinstance(a, gs.Constant) else (a, b)
        if onnx_ops._absorb_bias(imp, node, x, np.asarray(c.values)):
            return
    _add_constant(imp, node)


multiply_constant = _binary(operator.mul, True, "*")  # onnx_pointwise's Mul hands constants here
onnx_ops.CONVERTERS.update({
    "Add": _add, "Sub": _binary(operator.sub, False, "-"), "Mul": multiply_constant,
    "Div": _binary(operator.truediv, False, "/"),
})
