"""canonicalize rules for pools, means and eval-mode identities.

Rewrites (each keeps the computed function identical in eval mode):
  AdaptiveAvgPool2d(n) / F.adaptive_avg_pool2d   -> removed when n is the input size (None entries too);
                                                    AvgPool2d(k, stride=k) when n divides the input (k = L / n);
                                                    kept otherwise (1 x 1, or bins of varying size: the
                                                    lowering makes those an IntAvgPoolTable)
  x.mean(3).mean(2), x.mean(-1, keepdim=True).mean(-2, keepdim=True) and every other chain of
  single-axis means over H and W of NCHW         -> AdaptiveAvgPool2d(1) (+ reshape to the chain's shape)
  torchvision.ops.stochastic_depth / StochasticDepth, timm's DropPath, drop_path (not training)
                                                 -> removed, as dropout is
AvgPool2d keeps every setting (ceil_mode, count_include_pad=False, divisor_override): lower-integer gives
pools whose windows are not all full an IntAvgPoolTable. Not handled: means over other axes, a chain whose
intermediate mean has other users (it is refused, naming it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from qcompile.ir import rewrite
from qcompile.ir.meta import get_info

Rule = Callable[[fx.GraphModule, fx.Node], bool]
IDENTITY_MODULES = ("StochasticDepth", "DropPath")
IDENTITY_FUNCTIONS = ("stochastic_depth", "drop_path")


def _output_size(output_size: Any, in_hw: tuple[int, int]) -> tuple[int, int]:
    size: Any = (output_size, output_size) if isinstance(output_size, int) or output_size is None else output_size
    h, w = (in_hw[a] if size[a] is None else int(size[a]) for a in range(2))
    return h, w


def adaptive(gm: fx.GraphModule, node: fx.Node, output_size: Any) -> bool:
    """The canonical form of an adaptive average pool of ``node.args[0]`` to ``output_size``."""
    src = node.args[0]
    shape = get_info(src).shape if isinstance(src, fx.Node) else None
    if shape is None or len(shape) != 4:
        return False
    in_hw = (shape[2], shape[3])
    out_hw = _output_size(output_size, in_hw)
    if out_hw == in_hw:
        rewrite.bypass(gm, node)
    elif out_hw != (1, 1) and all(in_hw[a] % out_hw[a] == 0 for a in range(2)):
        kernel = (in_hw[0] // out_hw[0], in_hw[1] // out_hw[1])
        _swap(gm, node, nn.AvgPool2d(kernel, kernel))
    elif node.op != "call_module":
        _swap(gm, node, nn.AdaptiveAvgPool2d(output_size))
    return True


def _swap(gm: fx.GraphModule, node: fx.Node, module: nn.Module) -> None:
    name = rewrite.add_module(gm, str(node.target) if node.op == "call_module" else node.name, module)
    rewrite.replace_node(gm, node, "call_module", name, (node.args[0],))


def adaptive_module_rule(gm: fx.GraphModule, node: fx.Node) -> bool:
    pool = gm.get_submodule(str(node.target))
    assert isinstance(pool, nn.AdaptiveAvgPool2d)
    return adaptive(gm, node, pool.output_size)


def is_canonical_adaptive(gm: fx.GraphModule, node: fx.Node) -> bool:
    """An adaptive pool left as it is (1 x 1, or to a size that does not divide the input)."""
    src = node.args[0]
    shape = get_info(src).shape if isinstance(src, fx.Node) else None
    pool = gm.get_submodule(str(node.target))
    if shape is None or len(shape) != 4 or not isinstance(pool, nn.AdaptiveAvgPool2d):
        return False
    in_hw = (shape[2], shape[3])
    out_hw = _output_size(pool.output_size, in_hw)
    return out_hw == (1, 1) or (out_hw != in_hw and any(in_hw[a] % out_hw[a] for a in range(2)))


def _mean_axes(node: fx.Node) -> tuple[fx.Node, list[int], bool] | None:
    """(input, axes as given, keepdim) of a torch.mean / x.mean call, None if not a mean over given axes."""
    is_mean = (node.op == "call_function" and node.target is torch.mean) or (
        node.op == "call_method" and node.target == "mean")
    if not is_mean or len(node.args) < 2 and "dim" not in node.kwargs:
        return None
    src = node.args[0]
    dims: Any = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
    dims = list(dims) if isinstance(dims, (list, tuple)) else [dims]
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if not isinstance(src, fx.Node) or not all(isinstance(d, int) for d in dims) or not isinstance(keep, bool):
        return None
    return src, dims, keep


Chain = tuple[fx.Node, set[int], list[fx.Node], list[int]]  # base, reduced axes, the means, axes of the output


def _original_axes(node: fx.Node) -> Chain | None:
    """Follow a chain of means back to a 4-D tensor: (that tensor, its axes reduced, the chain, and for each
    axis of ``node``'s output the base axis it is)."""
    found = _mean_axes(node)
    if found is None:
        return None
    src, dims, keep = found
    inner = _original_axes(src) if _mean_axes(src) is not None and len(src.users) == 1 else None
    if inner is None:
        shape = get_info(src).shape
        if shape is None or len(shape) != 4:
            return None
        inner = (src, set(), [], [0, 1, 2, 3])
    base, reduced, chain, axes = inner
    here = {axes[d % len(axes)] for d in dims}
    left = axes if keep else [a for a in axes if a not in here]
    return base, reduced | here, [*chain, node], left


def mean_chain(gm: fx.GraphModule, node: fx.Node) -> bool:
    """A mean (or chain of single-axis means) reducing exactly H and W of NCHW -> a global average pool."""
    found = _original_axes(node)
    out = get_info(node).shape
    if found is None or found[1] != {2, 3} or out is None:
        return False
    base = found[0]
    name = rewrite.add_module(gm, node.name, nn.AdaptiveAvgPool2d(1))
    with gm.graph.inserting_before(node):
        value = gm.graph.call_module(name, (base,))
        if len(out) == 2:
            value = gm.graph.call_function(torch.flatten, (value, 1))
        elif tuple(out[2:]) != (1, 1):
            value = gm.graph.call_function(torch.reshape, (value, (-1, *out[1:])))
    value.meta.update(node.meta)
    node.replace_all_uses_with(value)
    for dead in reversed(found[2]):
        gm.graph.erase_node(dead)
    return True


def _is_identity_call(node: fx.Node) -> bool:
    name = getattr(node.target, "__name__", "")
    training = node.kwargs.get("training", node.args[3] if len(node.args) > 3 else True)
    return name in IDENTITY_FUNCTIONS and training is False


def identity_rule(gm: fx.GraphModule, node: fx.Node) -> bool:
    """stochastic_depth(x, p, mode, training=False) and friends: the input itself."""
    if node.op == "call_function" and not _is_identity_call(node):
        return False
    if node.op == "call_module" and gm.get_submodule(str(node.target)).training:
        return False
    rewrite.bypass(gm, node)
    return True


def module_rule(gm: fx.GraphModule, node: fx.Node) -> Rule | None:
    module = gm.get_submodule(str(node.target))
    if type(module).__name__ in IDENTITY_MODULES:
        return identity_rule
    if isinstance(module, nn.AdaptiveAvgPool2d) and not is_canonical_adaptive(gm, node):
        return adaptive_module_rule
    return None


def function_rule(target: Any) -> Rule | None:
    """Rules for functions matched by name (from packages qcompile does not import, e.g. torchvision)."""
    return identity_rule if getattr(target, "__name__", None) in IDENTITY_FUNCTIONS else None

