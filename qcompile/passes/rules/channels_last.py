"""canonicalize's rules for channels-last blocks (ConvNeXt) and learned per-channel scales.

* Permute sinking: ``permute(x, (0, 2, 3, 1))`` followed by a chain of single-user channels-last ops that
  act on the last dim only, ending in ``permute(., (0, 3, 1, 2))``, is the same function in NCHW:
      LayerNorm(C), F.layer_norm(., (C,)) -> ChannelLayerNorm(C)   (normalizes dim 1)
      Linear(a, b) -> Conv2d(a, b, 1)          (W[:, :, None, None], same bias)
      tables, ReLU/clamps                       unchanged (pointwise)
  and both permutes disappear. torchvision's CNBlock is exactly this chain (LayerNorm, Linear, GELU,
  Linear). A chain with any other op is left alone (a transpose op handles it, if there is one).
* Layer scale: ``p * y`` with ``p`` a parameter of shape (C, 1, 1), (C,) broadcast over y's channels or a
  scalar, and ``y`` the output of a Conv2d read only there, folds into the conv: W[c] *= p[c], b[c] *= p[c]
  (exact in real arithmetic; the float graph changes by float32 rounding only).
Not handled: other permutations, chains that branch, scales that are activations (that is IntMul).
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
from qcompile.ir.meta import get_info, set_info
from qcompile.quant import tables
from qcompile.quant.layernorm import ChannelLayerNorm

Rule = Callable[[fx.GraphModule, fx.Node], bool]
TO_LAST, TO_FIRST = (0, 2, 3, 1), (0, 3, 1, 2)


def permutation(node: fx.Node) -> tuple[int, ...] | None:
    """The dims of a ``torch.permute`` / ``x.permute`` call, or None."""
    if node.op == "call_function" and node.target is torch.permute:
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dims")
    elif node.op == "call_method" and node.target == "permute":
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    else:
        return None
    return tuple(dims) if isinstance(dims, (list, tuple)) and all(isinstance(d, int) for d in dims) else None


def _parameter(gm: fx.GraphModule, arg: Any) -> torch.Tensor | None:
    """The parameter or buffer a get_attr node reads, else None."""
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
        return None
    value: Any = gm
    for part in str(arg.target).split("."):
        value = getattr(value, part)
    return value.detach() if isinstance(value, torch.Tensor) else None


def layer_norm_module(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """F.layer_norm(x, (D,), weight, bias, eps) with parameter (or absent) affine -> an nn.LayerNorm node."""
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    bound: dict[str, Any] = {"weight": None, "bias": None, "eps": 1e-5, **dict(zip(names, node.args, strict=False)),
                             **node.kwargs}
    shape = tuple(bound["normalized_shape"])
    weight, bias = (_parameter(gm, bound[k]) for k in ("weight", "bias"))
    if len(shape) != 1 or any(bound[k] is not None and t is None for k, t in (("weight", weight), ("bias", bias))):
        return None
    ln = nn.LayerNorm(shape, float(bound["eps"]), elementwise_affine=weight is not None, bias=bias is not None)
    with torch.no_grad():
        for param, value in ((ln.weight, weight), (ln.bias, bias)):
            if param is not None and value is not None:
                param.copy_(value)
    name = rewrite.add_module(gm, node.name, ln)
    return rewrite.replace_node(gm, node, "call_module", name, (bound["input"],))


def _channels_last_op(gm: fx.GraphModule, node: fx.Node) -> bool:
    mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
    if isinstance(mod, (nn.Linear, tables.TableFunction, nn.GELU, nn.ReLU, nn.SiLU, nn.Hardswish)):
        return True
    if type(mod) is nn.LayerNorm:
        return len(mod.normalized_shape) == 1
    if node.op == "call_function" and node.target is F.layer_norm:
        shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        return isinstance(shape, (list, tuple)) and len(shape) == 1
    return node.op == "call_function" and node.target in (*tables.FUNCTIONS, torch.relu)


def _chain(gm: fx.GraphModule, start: fx.Node) -> tuple[list[fx.Node], fx.Node] | None:
    """The ops between ``start`` (to channels-last) and the permute back, if every one qualifies."""
    chain: list[fx.Node] = []
    node = start
    while len(node.users) == 1:
        node = next(iter(node.users))
        if permutation(node) == TO_FIRST:
            return chain, node
        if not _channels_last_op(gm, node) or node.args[0] is not (chain[-1] if chain else start):
            return None
        chain.append(node)
    return None


def _to_channels_first(gm: fx.GraphModule, node: fx.Node) -> None:
    mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
    if isinstance(mod, nn.Linear):
        conv = nn.Conv2d(mod.in_features, mod.out_features, 1, bias=mod.bias is not None)
        with torch.no_grad():
            conv.weight.copy_(mod.weight[:, :, None, None])
            if mod.bias is not None and conv.bias is not None:
                conv.bias.copy_(mod.bias)
        rewrite.set_module(gm, str(node.target), conv)
    elif isinstance(mod, nn.LayerNorm):
        ln = ChannelLayerNorm(mod.normalized_shape, mod.eps, mod.elementwise_affine, bias=mod.bias is not None)
        ln.load_state_dict(mod.state_dict())
        rewrite.set_module(gm, str(node.target), ln)


def sink_permutes(gm: fx.GraphModule, node: fx.Node) -> bool:
    found = _chain(gm, node) if permutation(node) == TO_LAST else None
    if found is None:
        return False
    chain, back = found
    chain = [(layer_norm_module(gm, op) or op) if op.target is F.layer_norm else op for op in chain]
    for op in chain:
        _to_channels_first(gm, op)
        shape = get_info(op).shape
        if shape is not None and len(shape) == 4:
            set_info(op, shape=(shape[0], shape[3], shape[1], shape[2]))
    back.replace_all_uses_with(chain[-1] if chain else node.args[0])  # type: ignore[arg-type]
    gm.graph.erase_node(back)
    (chain[0] if chain else node).replace_input_with(node, node.args[0])  # type: ignore[arg-type]
    gm.graph.erase_node(node)
    return True


def _per_channel(p: torch.Tensor, channels: int) -> torch.Tensor | None:
    if p.numel() == 1:
        return p.reshape(1).expand(channels)
    if p.numel() == channels and (p.shape in ((channels,), (channels, 1, 1), (1, channels, 1, 1))):
        return p.reshape(channels)
    return None


def fold_layer_scale(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``p * conv(x)`` (either order) -> conv with W, b scaled by p per output channel."""
    if node.target not in (operator.mul, torch.mul) or len(node.args) != 2 or node.kwargs:
        return False
    for p_arg, y in (node.args, node.args[::-1]):
        p = _parameter(gm, p_arg)
        conv = gm.get_submodule(str(y.target)) if isinstance(y, fx.Node) and y.op == "call_module" else None
        if p is None or not isinstance(conv, nn.Conv2d) or len(y.users) != 1:  # type: ignore[union-attr]
            continue
        scale = _per_channel(p, conv.out_channels)
        if scale is None:
            continue
        with torch.no_grad():
            conv.weight.mul_(scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
            if conv.bias is not None:
                conv.bias.mul_(scale.to(conv.bias.dtype))
        node.replace_all_uses_with(y)  # type: ignore[arg-type]
        gm.graph.erase_node(node)
        return True
    return False


def channels_rule(gm: fx.GraphModule, node: fx.Node) -> Rule | None:
    """The rule for a permute that starts a channels-last chain, or a layer scale; else None."""
    if permutation(node) == TO_LAST and _chain(gm, node) is not None:
        return sink_permutes
    if node.op == "call_function" and node.target in (operator.mul, torch.mul) and len(node.args) == 2:
        if any(_parameter(gm, a) is not None for a in node.args):
            return fold_layer_scale
    return None
