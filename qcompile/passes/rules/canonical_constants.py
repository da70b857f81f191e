"""canonicalize rules for arithmetic with constants, and the difference of two activations.

A constant is a Python number or a tensor the graph reads (a parameter or buffer, or its view/reshape to
constant sizes, as layer scales ``gamma.view(1, -1, 1, 1)``), broadcast against one
sample (a scalar, per channel [C, 1, 1], or along the last axis). Rewrites (the function is unchanged):
  x + c, c + x, x - c, torch.add(x, c, alpha=a)      -> folded into the bias of the conv / linear / BatchNorm
                                                        that produces x (when x has no other user), else
                                                        AddConst(c) (AddConst(a c), AddConst(-c))
  x * c, c * x, x / c (c > 0, or any sign when it folds) -> folded into that layer's weights and bias
                                                        (W c, b c per output channel), else MulConst(c)
                                                        (MulConst(1 / c)); a factor of 1 is removed;
                                                        a scalar c > 0 after a MatMul joins its alpha
  a - b of two activations of one shape              -> operator.sub(a, b)
The layer is copied before it is changed (the user's model keeps its weights). Refused (canonicalize lists
the node): c - x, a factor <= 0 that does not fold, division with a rounding mode, constants that touch the
batch axis or do not broadcast, in-place variants on graph inputs.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from qcompile.ir import rewrite
from qcompile.ir.attention import MatMul
from qcompile.ir.elementwise import AddConst, MulConst
from qcompile.ir.meta import get_info

Rule = Callable[[fx.GraphModule, fx.Node], bool]
FOLDABLE = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d)


def constant(gm: fx.GraphModule, arg: Any) -> torch.Tensor | None:
    """The value of a constant operand (a number, or a tensor read by get_attr), else None."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return torch.tensor(float(arg))
    if is_constant_view(arg):
        return _evaluate(gm, arg)
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        obj: Any = gm
        for part in str(arg.target).split("."):
            obj = getattr(obj, part)
        return obj.detach().float() if isinstance(obj, torch.Tensor) else None
    return None


CONSTANT_METHODS = ("view", "reshape")


def is_constant_view(arg: Any) -> bool:
    """A view/reshape or an indexing of parameters with constant sizes or constant index tensors:
    ``gamma.view(1, -1, 1, 1)`` (layer scale), ``biases[:, idxs]`` (EfficientFormer's attention biases)."""
    if not isinstance(arg, fx.Node):
        return False
    if not ((arg.op == "call_method" and arg.target in CONSTANT_METHODS)
            or (arg.op == "call_function" and arg.target is operator.getitem)):
        return False
    found: list[fx.Node] = []

    def note(n: fx.Node) -> fx.Node:
        found.append(n)
        return n

    fx.node.map_arg(arg.args, note)
    return bool(found) and all(n.op == "get_attr" or is_constant_view(n) for n in found)


def _evaluate(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    def value(n: fx.Node) -> Any:
        v = constant(gm, n) if n.op == "get_attr" else _evaluate(gm, n)
        if n.op == "get_attr" and v is not None:  # index tensors keep their integer dtype
            obj: Any = gm
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            v = obj.detach()
        return v

    args: Any = fx.node.map_arg(node.args, value)
    if any(a is None for a in args):
        return None
    with torch.no_grad():
        out = getattr(args[0], str(node.target))(*args[1:]) if node.op == "call_method" else args[0][args[1]]
    return out.detach().float() if isinstance(out, torch.Tensor) else None


def _per_sample(c: torch.Tensor, shape: tuple[int, ...] | None) -> torch.Tensor | None:
    """``c`` as a per-sample broadcast operand of a tensor of ``shape``; None if it touches the batch."""
    if shape is None or c.dim() > len(shape) or (c.dim() == len(shape) and c.shape[0] != 1):
        return None
    c = c.reshape(c.shape[1:]) if c.dim() == len(shape) else c
    try:
        torch.broadcast_shapes(c.shape, shape[1:])
    except RuntimeError:
        return None
    return c if torch.broadcast_shapes(c.shape, shape[1:]) == tuple(shape[1:]) else None


def _channel_vector(layer: Any, c: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor | None:
    """``c`` as one value per output channel of ``layer`` (whose output has ``shape``), None if it is not."""
    channels = layer.weight.shape[0] if not isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)) else layer.num_features
    if c.numel() == 1:
        return c.reshape(1).expand(channels)
    axis = 1 if len(shape) > 2 and not isinstance(layer, nn.Linear) else len(shape) - 1
    want = [1] * (len(shape) - 1)
    want[axis - 1] = channels
    full = c.reshape([1] * (len(want) - c.dim()) + list(c.shape))
    return full.reshape(-1) if list(full.shape) == want else None


def _fold(gm: fx.GraphModule, x: fx.Node, c: torch.Tensor, mul: bool) -> bool:
    """Fold ``x * c`` or ``x + c`` into the layer computing ``x``; False if that is not possible."""
    layer = gm.get_submodule(str(x.target)) if x.op == "call_module" else None
    shape = get_info(x).shape
    if isinstance(layer, MatMul):  # a positive scalar joins the product's alpha
        return mul and _fold_matmul(gm, x, layer, c)
    if not isinstance(layer, FOLDABLE) or len(x.users) != 1 or shape is None:
        return False
    if len(gm.graph.find_nodes(op="call_module", target=x.target)) != 1:
        return False  # the layer is called more than once
    vector = _channel_vector(layer, c, shape)
    if vector is None or (isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)) and not layer.affine):
        return False
    new = copy.deepcopy(layer)
    with torch.no_grad():
        if new.bias is None:
            new.bias = nn.Parameter(torch.zeros(vector.numel()))
        if mul:
            new.weight.mul_(vector.view(-1, *[1] * (new.weight.dim() - 1)))
            new.bias.mul_(vector)
        else:
            new.bias.add_(vector)
    rewrite.set_module(gm, str(x.target), new)
    return True


def _fold_matmul(gm: fx.GraphModule, x: fx.Node, layer: MatMul, c: torch.Tensor) -> bool:
    if c.numel() != 1 or not float(c) > 0 or len(x.users) != 1:
        return False
    rewrite.set_module(gm, str(x.target), MatMul(layer.alpha * float(c)))
    return True


def _operands(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, torch.Tensor, bool] | None:
    """(tensor operand, constant, whether the constant came first) of a binary op, None if not one."""
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    ca, cb = constant(gm, a), constant(gm, b)
    if cb is not None and isinstance(a, fx.Node) and ca is None:
        return a, cb, False
    if ca is not None and isinstance(b, fx.Node) and cb is None:
        return b, ca, True
    return None


def _replace(gm: fx.GraphModule, node: fx.Node, x: fx.Node, module: nn.Module) -> bool:
    name = rewrite.add_module(gm, node.name, module)
    rewrite.replace_node(gm, node, "call_module", name, (x,))
    return True


def _bypass_to(gm: fx.GraphModule, node: fx.Node, x: fx.Node) -> bool:
    node.replace_all_uses_with(x)
    gm.graph.erase_node(node)
    return True


def add_constant(gm: fx.GraphModule, node: fx.Node, negate: bool = False) -> bool:
    found = _operands(gm, node)
    if found is None or (negate and found[2]):
        return False
    x, c, _ = found
    alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)
    if not isinstance(alpha, (int, float)):
        return False
    c = c * float(alpha) * (-1.0 if negate else 1.0)
    value = _per_sample(c, get_info(x).shape)
    if value is None:
        return False
    if not bool(value.any()):
        return _bypass_to(gm, node, x)
    if _fold(gm, x, value, mul=False):
        return _bypass_to(gm, node, x)
    return _replace(gm, node, x, AddConst(value))


def mul_constant(gm: fx.GraphModule, node: fx.Node, divide: bool = False) -> bool:
    found = _operands(gm, node)
    if found is None or (divide and (found[2] or node.kwargs.get("rounding_mode") is not None)):
        return False
    x, c, _ = found
    value = _per_sample(1.0 / c if divide else c, get_info(x).shape)
    if value is None or not bool(torch.isfinite(value).all()):
        return False
    if bool((value == 1).all()) or _fold(gm, x, value, mul=True):
        return _bypass_to(gm, node, x)
    if not bool((value > 0).all()):
        return False
    return _replace(gm, node, x, MulConst(value))


def _both_activations(node: fx.Node) -> bool:
    args = node.args[:2]
    return len(args) == 2 and all(isinstance(a, fx.Node) and a.op != "get_attr" and not is_constant_view(a)
                                  for a in args)


def sub_rule(gm: fx.GraphModule, node: fx.Node) -> bool:
    if not _both_activations(node):
        return add_constant(gm, node, negate=True)
    a, b = node.args[:2]
    alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)
    if alpha != 1 or get_info(a).shape != get_info(b).shape:  # type: ignore[arg-type]
        return False
    rewrite.replace_node(gm, node, "call_function", operator.sub, (a, b))
    return True


def add_rule(fallback: Rule) -> Rule:
    """Adds of two activations go to canonicalize's own rule; adds of a constant are handled here."""
    def rule(gm: fx.GraphModule, node: fx.Node) -> bool:
        return fallback(gm, node) if _both_activations(node) else add_constant(gm, node)

    return rule


def is_canonical(node: fx.Node) -> bool | None:
    """operator.add / operator.sub are canonical on two activations only (None: not those functions)."""
    if node.target not in (operator.add, operator.sub):
        return None
    return not node.kwargs and _both_activations(node)


def _mul(gm: fx.GraphModule, node: fx.Node) -> bool:
    return mul_constant(gm, node)


def _div(gm: fx.GraphModule, node: fx.Node) -> bool:
    return mul_constant(gm, node, divide=True)


FUNCTION_RULES: dict[Any, Rule] = {
    operator.mul: _mul, torch.mul: _mul, operator.imul: _mul, operator.truediv: _div, torch.div: _div,
    torch.true_divide: _div, operator.itruediv: _div, operator.sub: sub_rule, torch.sub: sub_rule,
    operator.isub: sub_rule,
}
METHOD_RULES: dict[str, Rule] = {"mul": _mul, "mul_": _mul, "div": _div, "div_": _div, "sub": sub_rule,
                                 "sub_": sub_rule}
