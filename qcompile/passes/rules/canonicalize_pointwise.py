"""canonicalize's rules for pointwise functions and products of two activations.

  F.silu / torch.sigmoid / F.gelu(approximate=...) / x.sigmoid() / nn.SiLU() / any registered function
  or module type (``quant/tables.py``)                    -> TableFunction(f) module (lowered to a table)
  a * b, torch.mul(a, b), a.mul(b) of two computed tensors -> operator.mul(a, b) (lowered to IntMul)
  x * sigmoid(x) (the sigmoid read only there)             -> TableFunction(silu)(x)
  F.layer_norm(x, (D,), weight, bias, eps) with parameter
  (get_attr) or absent weight/bias                         -> nn.LayerNorm(D) module (lowered to IntLayerNorm)
  F.softmax(x, dim) / torch.softmax / x.softmax / nn.Softmax -> nn.Softmax(dim >= 0) (lowered to IntSoftmax)

A registered function whose other arguments are tensors (not constants), or a product whose operands
are not both computed activations (a constant or a parameter: that is a scale, not an IntMul), is
rejected, which canonicalize reports with the other unsupported nodes.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qcompile.ir import rewrite
from qcompile.ir.meta import get_info
from qcompile.passes.rules.canonical_constants import is_constant_view
from qcompile.passes.rules.channels_last import channels_rule, layer_norm_module
from qcompile.quant import tables

Rule = Callable[[fx.GraphModule, fx.Node], bool]
MUL_FUNCTIONS = (operator.mul, operator.imul, torch.mul, torch.multiply)
MUL_METHODS = ("mul", "mul_", "multiply")


def _has_node(values: Any) -> bool:
    found: list[fx.Node] = []

    def note(n: fx.Node) -> fx.Node:
        found.append(n)
        return n

    fx.node.map_arg(values, note)
    return bool(found)


def _swap(gm: fx.GraphModule, node: fx.Node, module: tables.TableFunction, x: Any = None) -> bool:
    name = rewrite.add_module(gm, node.name, module)
    rewrite.replace_node(gm, node, "call_module", name, (node.args[0] if x is None else x,))
    return True


def _function_table(gm: fx.GraphModule, node: fx.Node) -> bool:
    target = tables.METHODS.get(str(node.target)) if node.op == "call_method" else node.target
    rest, kwargs = tuple(node.args[1:]), dict(node.kwargs)
    if not isinstance(node.args[0], fx.Node) or _has_node((rest, kwargs)):
        return False
    module = tables.table_function(target, rest, kwargs)
    return module is not None and _swap(gm, node, module)


def _module_table(gm: fx.GraphModule, node: fx.Node) -> bool:
    module = tables.table_function(gm.get_submodule(str(node.target)), (), {})
    return module is not None and _swap(gm, node, module)


def _is_activation(arg: Any) -> bool:
    return isinstance(arg, fx.Node) and arg.op != "get_attr" and not is_constant_view(arg)


def _sigmoid_of(gm: fx.GraphModule, gate: Any, x: Any) -> bool:
    """``gate`` is sigmoid(x) as a table, read by nothing else."""
    mod = gm.get_submodule(str(gate.target)) if isinstance(gate, fx.Node) and gate.op == "call_module" else None
    return (isinstance(mod, tables.TableFunction) and mod.key in tables.SIGMOIDS and gate.args[0] is x
            and len(gate.users) == 1)


def _mul(gm: fx.GraphModule, node: fx.Node) -> bool:
    if len(node.args) != 2 or node.kwargs or not all(_is_activation(a) for a in node.args):
        return False
    a, b = node.args
    for x, gate in ((a, b), (b, a)):
        if _sigmoid_of(gm, gate, x):  # x * sigmoid(x): one SiLU table instead of a table and a product
            return _swap(gm, node, tables.silu(), x)
    rewrite.replace_node(gm, node, "call_function", operator.mul, (a, b))
    return True


def is_canonical_mul(node: fx.Node) -> bool:
    return node.target is operator.mul and len(node.args) == 2 and not node.kwargs and all(
        _is_activation(a) for a in node.args)


def _layer_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    return layer_norm_module(gm, node) is not None


SOFTMAX_FUNCTIONS = (F.softmax, torch.softmax, torch.special.softmax)


def _softmax(gm: fx.GraphModule, node: fx.Node) -> bool:
    """F.softmax(x, dim) / x.softmax(dim) / nn.Softmax(dim) -> nn.Softmax(dim >= 0)."""
    dim: Any
    if node.op == "call_module":
        dim = gm.get_submodule(str(node.target)).dim
    else:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    shape = get_info(node).shape
    if not isinstance(dim, int) or shape is None or node.kwargs.get("dtype") is not None:
        return False
    name = rewrite.add_module(gm, node.name, nn.Softmax(dim % len(shape)))
    rewrite.replace_node(gm, node, "call_module", name, (node.args[0],))
    return True


def _canonical_softmax_dim(gm: fx.GraphModule, node: fx.Node) -> bool:
    """nn.Softmax with a non-negative int dim is canonical."""
    dim = gm.get_submodule(str(node.target)).dim
    return isinstance(dim, int) and dim >= 0


def _module_rule(gm: fx.GraphModule, node: fx.Node) -> Rule | None:
    mod = gm.get_submodule(str(node.target))
    if isinstance(mod, nn.Softmax):
        return None if _canonical_softmax_dim(gm, node) else _softmax
    return _module_table if type(mod) in tables.MODULES else None


def _function_rule(gm: fx.GraphModule, node: fx.Node) -> Rule | None:
    if node.target in MUL_FUNCTIONS:
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else None
        swish = _sigmoid_of(gm, b, a) or _sigmoid_of(gm, a, b)
        return None if is_canonical_mul(node) and not swish else _mul
    if node.target is F.layer_norm:
        return _layer_norm
    if node.target in SOFTMAX_FUNCTIONS:
        return _softmax
    return _function_table if node.target in tables.FUNCTIONS else None


def _method_rule(node: fx.Node) -> Rule | None:
    if node.target in MUL_METHODS:
        return _mul
    if node.target == "softmax":
        return _softmax
    return _function_table if node.target in tables.METHODS else None


def pointwise_rule(gm: fx.GraphModule, node: fx.Node) -> Rule | None:
    """The rule for ``node`` if it is a registered pointwise function, a product, a LayerNorm or a softmax."""
    if getattr(node, "_erased", False):  # removed by an earlier rewrite of its chain
        return None
    channels = channels_rule(gm, node)  # ConvNeXt's channels-last chains and layer scales
    if channels is not None:
        return channels
    if node.op == "call_module":
        return _module_rule(gm, node)
    if node.op == "call_function":
        return _function_rule(gm, node)
    return _method_rule(node) if node.op == "call_method" else None
