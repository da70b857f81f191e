"""canonicalize: one form for every op the compiler understands, and a list of those it does not.

Rewrites (each keeps the computed function identical):
  Dropout / Identity / contiguous / clone / torch._assert  -> removed
  ReLU module, F.relu, torch.relu, x.relu()               -> torch.relu(x)
  ReLU6, Hardtanh, F.relu6, F.hardtanh, clamp/clip         -> torch.clamp(x, min=lo, max=hi)
  Flatten module, flatten/view/reshape (any spelling)      -> torch.flatten(x, 1) when the result is
                                                              [N, -1], else torch.reshape(x, (-1, ...));
                                                              also when it folds the batch into axis 0
                                                              (rules/batch_fold.py: MobileViT's patches)
  +, torch.add, x.add(y), +=                               -> operator.add(a, b)
  torch.cat / concat / concatenate on the channel axis     -> torch.cat([...], dim=1)
  F.max_pool2d / F.avg_pool2d / F.adaptive_avg_pool2d      -> the pooling modules
  mean over (H, W)                                         -> AdaptiveAvgPool2d(1) (+ flatten)
  SiLU/sigmoid/hardswish/GELU/... (module, function or
  method; any registered table function), a * b of two
  activations                                              -> TableFunction / operator.mul
                                                              (passes/rules/canonicalize_pointwise.py)
  mean over (H, W), or a chain of single-axis means       -> AdaptiveAvgPool2d(1) (+ flatten / reshape)
  squeeze / unsqueeze                                      -> torch.reshape (as flatten/view above)
  a @ b of activations, scaled_dot_product_attention, MultiheadAttention, timm's head split
                                                           -> MatMul / Softmax / movement
                                                              (rules/canonical_attention.py)
  transposes, slices, splits; adaptive pools to k x k; stochastic depth in eval mode; arithmetic
  with constants, a - b                                    -> rules/canonical_movement.py, canonical_pool.py,
                                                              canonical_constants.py
  ConvTranspose2d / F.conv_transpose2d                     -> Conv2d(dilate_pad(x)) (canonical_transposed.py)
  a LayerNorm / Softmax module called at several places   -> one copy per call (the simulation hooks each)
Shapes come from one run on the example inputs. Anything else (or a supported op with an unsupported
setting: non-unit alpha, a concat across another axis) is reported in one UnsupportedOpsError listing
every such node with its op and source line. Control flow is the frontend's business, not this pass's.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qcompile.errors import group_items
from qcompile.ir import rewrite
from qcompile.ir.meta import Stage, get_info
from qcompile.ir.movement import dilate_pad
from qcompile.ir.shapes import annotate_shapes
from qcompile.ir.verify import FLOAT_FUNCTIONS, FLOAT_MODULES
from qcompile.passes.base import Pass, PassContext, PassResult, QCompileError, register_pass
from qcompile.passes.rules import batch_fold
from qcompile.passes.rules import canonical_attention as attention
from qcompile.passes.rules import canonical_constants as constants
from qcompile.passes.rules import canonical_movement as movement
from qcompile.passes.rules import canonical_pool as pools
from qcompile.passes.rules import canonical_transposed as transposed
from qcompile.passes.rules.canonicalize_pointwise import is_canonical_mul, pointwise_rule


class UnsupportedOpsError(QCompileError):
    """Every node without a supported form: ``items`` (and ``details``) list them all; the message groups
    them by ``kinds`` (op type), with the first ``examples`` (node name and source line) of each."""

    what = "op(s)"
    fix = "rewrite them with supported ops (the README lists them)"

    def __init__(self, items: list[str], kinds: list[str] | None = None, examples: list[str] | None = None) -> None:
        self.items = self.details = items
        listed = group_items(kinds or items, examples or items)
        super().__init__(f"{len(items)} unsupported {self.what}: {listed} — {self.fix}")


def _bind(node: fx.Node, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
    """Positional and keyword arguments of a call, by parameter name."""
    bound = dict(defaults)
    bound.update(zip(names, node.args, strict=False))
    bound.update(node.kwargs)
    return bound


Rule = Callable[[fx.GraphModule, fx.Node], bool]


def _to_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    rewrite.replace_node(gm, node, "call_function", torch.relu, (node.args[0],))
    return True


def _to_clamp(gm: fx.GraphModule, node: fx.Node, lo: float | None, hi: float | None) -> bool:
    if lo is None and hi is None:
        rewrite.bypass(gm, node)
        return True
    kwargs = {"min": None if lo is None else float(lo), "max": None if hi is None else float(hi)}
    rewrite.replace_node(gm, node, "call_function", torch.clamp, (node.args[0],), kwargs)
    return True


def _clamp_call(gm: fx.GraphModule, node: fx.Node) -> bool:
    b = _bind(node, ("input", "min", "max"), {"min": None, "max": None})
    if isinstance(b["min"], fx.Node) or isinstance(b["max"], fx.Node):
        return False
    return _to_clamp(gm, node, b["min"], b["max"])


def _hardtanh_call(gm: fx.GraphModule, node: fx.Node) -> bool:
    b = _bind(node, ("input", "min_val", "max_val"), {"min_val": -1.0, "max_val": 1.0})
    return _to_clamp(gm, node, b["min_val"], b["max_val"])


def _reshape(gm: fx.GraphModule, node: fx.Node) -> bool:
    src = node.args[0]
    assert isinstance(src, fx.Node)
    in_shape, out_shape = get_info(src).shape, get_info(node).shape
    if in_shape is None or out_shape is None:
        return False
    if in_shape[0] != out_shape[0] and not batch_fold.folds_batch(gm, src, node, in_shape, out_shape):
        return False
    if len(out_shape) == 2 and in_shape[0] == out_shape[0]:
        rewrite.replace_node(gm, node, "call_function", torch.flatten, (src, 1))
    else:
        rewrite.replace_node(gm, node, "call_function", torch.reshape, (src, (-1, *out_shape[1:])))
    return True


def _add(gm: fx.GraphModule, node: fx.Node) -> bool:
    b = _bind(node, ("input", "other", "alpha"), {"alpha": 1})
    if b["alpha"] != 1 or not all(isinstance(b[k], fx.Node) for k in ("input", "other")):
        return False
    shapes = {get_info(b[k]).shape for k in ("input", "other")}
    if len(shapes) != 1:
        return False
    rewrite.replace_node(gm, node, "call_function", operator.add, (b["input"], b["other"]))
    return True


def _cat(gm: fx.GraphModule, node: fx.Node) -> bool:
    b = _bind(node, ("tensors", "dim"), {"dim": 0})
    if (with_constant := attention.const_cat(gm, node, b["tensors"], b["dim"])) is not None:  # a class token
        return with_constant
    shape = get_info(node).shape
    if shape is None or b["dim"] % len(shape) != 1:
        return False
    rewrite.replace_node(gm, node, "call_function", torch.cat, (list(b["tensors"]),), {"dim": 1})
    return True


def _swap_module(gm: fx.GraphModule, node: fx.Node, module: nn.Module) -> bool:
    name = rewrite.add_module(gm, node.name, module)
    rewrite.replace_node(gm, node, "call_module", name, (node.args[0],))
    return True


def _max_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    b = _bind(node, ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
              {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False})
    if b["return_indices"]:
        return False
    pool = nn.MaxPool2d(b["kernel_size"], b["stride"] or b["kernel_size"], b["padding"], b["dilation"],
                        ceil_mode=b["ceil_mode"])
    return _swap_module(gm, node, pool)


def _avg_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    b = _bind(node, ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                     "divisor_override"), {"stride": None, "padding": 0, "ceil_mode": False,
                                           "count_include_pad": True, "divisor_override": None})
    pool = nn.AvgPool2d(b["kernel_size"], b["stride"] or b["kernel_size"], b["padding"], b["ceil_mode"],
                        b["count_include_pad"], b["divisor_override"])
    return _swap_module(gm, node, pool)


def _adaptive_pool(gm: fx.GraphModule, node: fx.Node) -> bool:
    return pools.adaptive(gm, node, _bind(node, ("input", "output_size"), {})["output_size"])


def _drop(gm: fx.GraphModule, node: fx.Node) -> bool:
    rewrite.bypass(gm, node)
    return True


def _drop_assert(gm: fx.GraphModule, node: fx.Node) -> bool:
    """torch._assert on shapes: the example inputs passed it (shapes were recorded by running the graph),
    and the compiled graph has those shapes."""
    if node.users:
        return False
    gm.graph.erase_node(node)
    return True


FUNCTION_RULES: dict[Any, Rule] = {
    F.relu: _to_relu, torch.relu: _to_relu, torch.relu_: _to_relu, F.relu_: _to_relu,
    F.relu6: lambda gm, n: _to_clamp(gm, n, 0.0, 6.0),
    F.hardtanh: _hardtanh_call, torch.clamp: _clamp_call, torch.clip: _clamp_call,
    torch.flatten: _reshape, torch.reshape: _reshape,
    operator.add: _add, operator.iadd: _add, torch.add: _add,
    torch.cat: _cat, torch.concat: _cat, torch.concatenate: _cat,
    F.max_pool2d: _max_pool, F.avg_pool2d: _avg_pool, torch._C._nn.avg_pool2d: _avg_pool,
    F.adaptive_avg_pool2d: _adaptive_pool,
    torch._assert: _drop_assert,
    F.dropout: _drop, F.dropout1d: _drop, F.dropout2d: _drop, F.alpha_dropout: _drop,
}
METHOD_RULES: dict[str, Rule] = {
    "relu": _to_relu, "relu_": _to_relu, "clamp": _clamp_call, "clip": _clamp_call, "clamp_": _clamp_call,
    "flatten": _reshape, "view": _reshape, "reshape": _reshape, "add": _add, "add_": _add,
    "contiguous": _drop, "clone": _drop,
    "squeeze": _reshape, "unsqueeze": _reshape,
}
FUNCTION_RULES.update({torch.squeeze: _reshape, torch.unsqueeze: _reshape, **movement.FUNCTION_RULES,
                       torch.mean: attention.mean_rule(pools.mean_chain), **constants.FUNCTION_RULES,
                       F.conv_transpose2d: transposed.transposed_function,
                       **{f: constants.add_rule(_add) for f in (operator.add, operator.iadd, torch.add)},
                       **attention.FUNCTION_RULES})
METHOD_RULES.update({**attention.METHOD_RULES, **movement.METHOD_RULES, "mean": attention.mean_rule(pools.mean_chain),
                     **constants.METHOD_RULES,
                     "add": constants.add_rule(_add), "add_": constants.add_rule(_add)})


def _module_rule(module: nn.Module) -> Rule | None:  # noqa: C901 - a flat table of module kinds
    if isinstance(module, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout, nn.Identity)):
        return _drop
    if isinstance(module, nn.ReLU):
        return _to_relu
    if isinstance(module, nn.ReLU6):
        return lambda gm, n: _to_clamp(gm, n, 0.0, 6.0)
    if isinstance(module, nn.Hardtanh):
        return lambda gm, n: _to_clamp(gm, n, module.min_val, module.max_val)
    if isinstance(module, nn.Flatten):
        return _reshape
    if isinstance(module, nn.MultiheadAttention):
        return attention.multihead_attention
    if isinstance(module, nn.Upsample) and module.mode != "bilinear":  # bilinear modules are canonical
        return movement.upsample_module
    if isinstance(module, nn.ConvTranspose2d):
        return transposed.transposed_module
    return None


def _is_canonical(node: fx.Node) -> bool:
    if node.target is torch.flatten:
        return node.args[1:] == (1,) and not node.kwargs
    if node.target is torch.clamp:
        return len(node.args) == 1 and set(node.kwargs) == {"min", "max"}
    if node.target is torch.reshape:
        return isinstance(node.args[1], tuple) and node.args[1][:1] == (-1,)
    if node.target is torch.cat:
        pieces: Any = node.args[0] if node.args else ()
        return node.kwargs == {"dim": 1} and len(node.args) == 1 and all(
            isinstance(p, fx.Node) and p.op not in ("get_attr", "call_method") for p in pieces)
    if node.target is operator.mul:  # a product of two activations; a multiply by a constant is not
        return is_canonical_mul(node)
    if node.target is dilate_pad:
        return transposed.is_canonical_dilate(node)
    moved = movement.is_canonical(node)
    if moved is None:
        moved = constants.is_canonical(node)
    if moved is not None:
        return moved
    return node.target in FLOAT_FUNCTIONS


def _rule_for(gm: fx.GraphModule, node: fx.Node) -> Rule | None:
    """Pointwise functions and products (canonicalize_pointwise) first; the other rules where they decline
    (a product with a constant is canonical_constants' multiply)."""
    pointwise, other = pointwise_rule(gm, node), _other_rule(gm, node)
    if pointwise is None or other is None:
        return pointwise or other
    return lambda g, n: pointwise(g, n) or other(g, n)


def _other_rule(gm: fx.GraphModule, node: fx.Node) -> Rule | None:
    if node.op == "call_module":
        return pools.module_rule(gm, node) or _module_rule(gm.get_submodule(str(node.target)))
    if node.op == "call_function":
        return None if _is_canonical(node) else FUNCTION_RULES.get(node.target) or pools.function_rule(node.target)
    if node.op == "call_method":
        return METHOD_RULES.get(str(node.target))
    return None


def _unsupported_setting(gm: fx.GraphModule, node: fx.Node) -> str | None:
    mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
    if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)) and mod.padding_mode != "zeros":
        return f"{type(mod).__name__} with padding_mode={mod.padding_mode}"
    if isinstance(mod, nn.ConvTranspose2d):
        return "ConvTranspose2d called with output_size (give output_padding instead)"
    if node.op == "call_function" and node.target is F.conv_transpose2d:  # left only when its rule declined
        return "conv_transpose2d with a weight, bias or setting computed at run time (only parameters)"
    if isinstance(mod, nn.MultiheadAttention):
        return attention.mha_problem(gm, node)
    if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
        return attention.sdpa_problem(node)
    return None


def describe(gm: fx.GraphModule, node: fx.Node, why: str | None = None) -> str:
    if node.op == "call_module":
        what = type(gm.get_submodule(str(node.target))).__name__
    else:
        what = getattr(node.target, "__name__", str(node.target))
    where = get_info(node).source
    return f"{node.name} ({node.op} {why or what}{' at ' + where if where else ''})"


def _kind(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    return str(getattr(node.target, "__name__", node.target))


def _unsupported(gm: fx.GraphModule, rejected: set[str]) -> UnsupportedOpsError | None:
    items, kinds, examples = [], [], []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):  # a parameter read is no op; its users are listed
            continue
        why = _unsupported_setting(gm, node)
        allowed = (
            (node.op == "call_module" and type(gm.get_submodule(str(node.target))) in FLOAT_MODULES)
            or (node.op == "call_function" and node.target in FLOAT_FUNCTIONS)
        )
        if node.name in rejected:
            why = why or f"{getattr(node.target, '__name__', node.target)} with unsupported arguments"
        if why or not allowed:
            items.append(describe(gm, node, why))
            kinds.append(_kind(gm, node))
            where = get_info(node).source
            examples.append(f"{node.name}{': ' + why if why else ''}{' at ' + where if where else ''}"[:120])
    return UnsupportedOpsError(items, kinds, examples) if items else None


UNSHARED = (nn.LayerNorm, nn.Softmax)  # each call gets its own quantizers' integer op (quant/integer_sim.py)


def _unshare(gm: fx.GraphModule) -> bool:
    """A LayerNorm or softmax module called at several places: one copy per call (same parameters' values)."""
    seen: set[str] = set()
    modified = False
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(str(node.target)), UNSHARED):
            continue
        if str(node.target) in seen:
            node.target = rewrite.add_module(gm, node.name, copy.deepcopy(gm.get_submodule(str(node.target))))
            modified = True
        seen.add(str(node.target))
    return modified


@register_pass
@dataclass(frozen=True)
class Canonicalize(Pass):
    name = "canonicalize"
    summary = "one canonical form per op; drop dropout/identity; list unsupported ops"
    requires = (Stage.TRACED, Stage.FLOAT)
    produces = Stage.FLOAT

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        annotate_shapes(gm, ctx.example_inputs)
        gm.meta[batch_fold.EXAMPLE_KEY] = tuple(ctx.example_inputs)  # a fold of the batch is measured
        modified, rejected = False, set()
        for node in list(gm.graph.nodes):
            if getattr(node, "_erased", False):  # removed with the chain an earlier rule rewrote
                continue
            rule = _rule_for(gm, node)
            if rule is None:
                continue
            if rule(gm, node):
                modified = True
            else:
                rejected.add(node.name)
        for key in (batch_fold.EXAMPLE_KEY, batch_fold.SHAPES_KEY):
            gm.meta.pop(key, None)
        modified = _unshare(gm) or modified
        rewrite.finish(gm)
        attention.refuse_attention(gm)  # a mask or dropout: its own line, naming the node and the fix
        problems = _unsupported(gm, rejected)
        if problems is not None:
            raise problems
        return PassResult(gm, modified)
