"""canonicalize rules for data movement: transposes, slices and splits become permute / narrow.

Rewrites (each keeps the computed function identical; shapes come from canonicalize's run on the example
inputs, so shape arithmetic such as ``x.size(0)`` or ``x.shape[1] // g`` is dead afterwards and removed):
  torch.transpose / x.transpose / swapaxes / swapdims / x.permute / torch.permute  -> torch.permute(x, dims)
                                                         (the identity permutation is removed)
  x[:, a:b, ...] (slices with step 1, ints, Ellipsis)    -> torch.narrow(x, dim, a, b - a) per sliced axis
                                                         (+ torch.reshape when an int index drops an axis)
  torch.narrow(x, dim, start, length) (any spelling)     -> torch.narrow(x, dim >= 1, start >= 0, length)
  F.interpolate / nn.Upsample (mode nearest, integer factors or sizes)
                                                         -> upsample_nearest(x, (a, b))
  the same with mode bilinear                           -> nn.Upsample(scale_factor=(a, b), mode="bilinear")
  x.chunk / torch.chunk / torch.split / x.split / tensor_split(sections) / unbind, then getitem(i)
                                                         -> one torch.narrow per used piece
                                                         (+ torch.reshape for unbind, which drops the axis)
The batch axis (0) must stay where it is and whole (a permute that moves it is taken apart when only
pieces along its new first axis are read: rules/canonical_attention.py): a permute that moves it
otherwise, a slice or split of it, a step other than 1, or an index tensor is refused (the rule fails,
canonicalize lists the node).
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
from qcompile.ir.movement import upsample_nearest
from qcompile.passes.rules.canonical_attention import select_from_permute

Rule = Callable[[fx.GraphModule, fx.Node], bool]


def _shape(arg: Any) -> tuple[int, ...] | None:
    return get_info(arg).shape if isinstance(arg, fx.Node) else None


def _dims(arg: Any, rest: tuple[Any, ...]) -> list[int] | None:
    """``permute(x, 0, 2, 1)`` or ``permute(x, (0, 2, 1))`` -> [0, 2, 1]; None when not all ints."""
    dims = list(arg) if isinstance(arg, (list, tuple)) else [arg, *rest]
    return dims if all(isinstance(d, int) for d in dims) else None


def _to_permute(gm: fx.GraphModule, node: fx.Node, src: fx.Node, perm: list[int]) -> bool:
    rank = len(perm)
    perm = [d % rank for d in perm]
    if sorted(perm) != list(range(rank)):
        return False
    if perm[0] != 0:  # the batch moves: only a head split whose pieces are taken at once (timm's qkv)
        return select_from_permute(gm, node, perm)
    if perm == list(range(rank)):
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        return True
    rewrite.replace_node(gm, node, "call_function", torch.permute, (src, tuple(perm)))
    return True


def _permute(gm: fx.GraphModule, node: fx.Node) -> bool:
    src = node.args[0]
    dims = _dims(node.args[1] if len(node.args) > 1 else node.kwargs.get("dims"), tuple(node.args[2:]))
    shape = _shape(src)
    if not isinstance(src, fx.Node) or dims is None or shape is None or len(dims) != len(shape):
        return False
    return _to_permute(gm, node, src, dims)


def _transpose(gm: fx.GraphModule, node: fx.Node) -> bool:
    src, *ab = [*node.args, *node.kwargs.values()]
    ab_: list[Any] = ab
    shape = _shape(src)
    if not isinstance(src, fx.Node) or shape is None or len(ab) != 2 or not all(isinstance(d, int) for d in ab):
        return False
    perm = list(range(len(shape)))
    a, b = ab_[0] % len(shape), ab_[1] % len(shape)
    perm[a], perm[b] = perm[b], perm[a]
    return _to_permute(gm, node, src, perm)


def _narrow_node(gm: fx.GraphModule, before: fx.Node, src: fx.Node, dim: int, start: int, length: int) -> fx.Node:
    with gm.graph.inserting_before(before):
        return gm.graph.call_function(torch.narrow, (src, dim, start, length))


def _finish_as(gm: fx.GraphModule, node: fx.Node, value: fx.Node, reshape_to: tuple[int, ...] | None) -> None:
    """Let ``value`` (reshaped to ``reshape_to`` per sample when given) take over ``node``'s uses."""
    if reshape_to is not None:
        with gm.graph.inserting_before(node):
            value = gm.graph.call_function(torch.reshape, (value, (-1, *reshape_to)))
    value.meta.update(node.meta)
    node.replace_all_uses_with(value)
    gm.graph.erase_node(node)


def _narrow(gm: fx.GraphModule, node: fx.Node) -> bool:
    names = ("input", "dim", "start", "length")
    b: dict[str, Any] = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    shape = _shape(b.get("input"))
    if shape is None or not all(isinstance(b.get(k), int) for k in names[1:]):
        return False
    dim, start = b["dim"] % len(shape), b["start"] % shape[b["dim"]] if b["start"] < 0 else b["start"]
    if dim == 0:
        return False
    rewrite.replace_node(gm, node, "call_function", torch.narrow, (b["input"], dim, start, b["length"]))
    return True


def _index_items(index: Any, rank: int) -> list[Any] | None:
    """The index expanded to one entry per axis (Ellipsis filled with full slices); None if unsupported."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(i is None or isinstance(i, fx.Node) or not isinstance(i, (int, slice, type(Ellipsis))) for i in items):
        return None
    if items.count(Ellipsis) > 1:
        return None
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (rank - len(items) + 1)
    return items + [slice(None)] * (rank - len(items)) if len(items) <= rank else None


def _slice_range(item: Any, size: int) -> tuple[int, int] | None:
    """(start, length) of an int or a step-1 slice along an axis of ``size``."""
    if isinstance(item, int):
        i = item % size
        return i, 1
    if item.step not in (None, 1) or not all(v is None or isinstance(v, int) for v in (item.start, item.stop)):
        return None
    start, stop, _ = item.indices(size)
    return start, max(0, stop - start)


def _tensor_getitem(gm: fx.GraphModule, node: fx.Node, src: fx.Node, shape: tuple[int, ...]) -> bool:
    items = _index_items(node.args[1], len(shape))
    if items is None:
        return False
    ranges = [_slice_range(item, size) for item, size in zip(items, shape, strict=True)]
    if any(r is None for r in ranges) or ranges[0] != (0, shape[0]) or isinstance(items[0], int):
        return False
    value = src
    for dim, (r, size) in enumerate(zip(ranges, shape, strict=True)):
        assert r is not None
        if r != (0, size):
            value = _narrow_node(gm, node, value, dim, *r)
    out = _shape(node)
    drops = any(isinstance(i, int) for i in items)
    if value is src and not drops:
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        return True
    _finish_as(gm, node, value, out[1:] if drops and out is not None else None)
    return True


def _getitem(gm: fx.GraphModule, node: fx.Node) -> bool:
    src = node.args[0]
    shape = _shape(src)
    if not isinstance(src, fx.Node) or shape is None:
        return False  # a piece of a split (handled at the split) or shape arithmetic (dead once reshapes fold)
    return _tensor_getitem(gm, node, src, shape)


def _piece_sizes(kind: str, arg: Any, size: int) -> list[int] | None:
    """Sizes of the pieces of a split of an axis of ``size``, as torch computes them."""
    if kind == "chunk" and isinstance(arg, int) and arg > 0:
        step = -(-size // arg)
        return [min(step, size - s) for s in range(0, size, step)]
    if kind == "split" and isinstance(arg, int) and arg > 0:
        return [min(arg, size - s) for s in range(0, size, arg)]
    if kind == "split" and isinstance(arg, (list, tuple)) and all(isinstance(v, int) for v in arg):
        return list(arg) if sum(arg) == size else None
    if kind == "tensor_split" and isinstance(arg, int) and arg > 0:
        return [size // arg + (1 if i < size % arg else 0) for i in range(arg)]
    if kind == "unbind":
        return [1] * size
    return None


ALIASES = {"tensor": "input", "self": "input", "chunks": "sections", "split_size": "sections",
           "split_size_or_sections": "sections", "indices_or_sections": "sections"}


def _split_rule(kind: str, names: tuple[str, ...], defaults: dict[str, Any]) -> Rule:
    def rule(gm: fx.GraphModule, node: fx.Node) -> bool:
        kwargs = {ALIASES.get(k, k): v for k, v in node.kwargs.items()}
        b = dict(defaults) | dict(zip(names, node.args, strict=False)) | kwargs
        src, shape = b["input"], _shape(b["input"])
        users = list(node.users)
        if not isinstance(src, fx.Node) or shape is None or not isinstance(b["dim"], int):
            return False
        dim = b["dim"] % len(shape)
        sizes = _piece_sizes(kind, b.get("sections"), shape[dim])
        if dim == 0 or sizes is None or not all(u.target is operator.getitem and isinstance(u.args[1], int)
                                               for u in users):
            return False
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        for user in users:
            index: Any = user.args[1]
            i = int(index) % len(sizes)
            piece = _narrow_node(gm, user, src, dim, starts[i], sizes[i])
            out = _shape(user)
            _finish_as(gm, user, piece, out[1:] if kind == "unbind" and out is not None else None)
        gm.graph.erase_node(node)
        return True

    return rule


_chunk = _split_rule("chunk", ("input", "sections", "dim"), {"dim": 0})
_split = _split_rule("split", ("input", "sections", "dim"), {"dim": 0})
_tensor_split = _split_rule("tensor_split", ("input", "sections", "dim"), {"dim": 0})
_unbind = _split_rule("unbind", ("input", "dim"), {"dim": 0})


def _is_canonical_narrow(node: fx.Node) -> bool:
    args: Any = node.args
    return (not node.kwargs and len(args) == 4 and all(isinstance(a, int) for a in args[1:])
            and 0 < int(args[1]) and int(args[2]) >= 0)


def _is_canonical_permute(node: fx.Node) -> bool:
    dims = node.args[1] if len(node.args) == 2 else None
    return not node.kwargs and isinstance(dims, tuple) and dims[:1] == (0,)


def is_canonical(node: fx.Node) -> bool | None:
    """Whether a movement function call is already in canonical form (None: not a movement function)."""
    if node.target is torch.narrow:
        return _is_canonical_narrow(node)
    if node.target is torch.permute:
        return _is_canonical_permute(node)
    if node.target is upsample_nearest:
        return _is_canonical_upsample(node)
    return None


def _factors(in_hw: tuple[int, ...], scale: Any, size: Any) -> tuple[int, int] | None:
    """Integer upsampling factors from F.interpolate's ``scale_factor`` or ``size``; None if not integers."""
    if size is not None:
        out = (size, size) if isinstance(size, int) else tuple(size)
        ok = all(o % i == 0 and o >= i for o, i in zip(out, in_hw, strict=True))
        return (out[0] // in_hw[0], out[1] // in_hw[1]) if ok else None
    pair = (scale, scale) if isinstance(scale, (int, float)) else tuple(scale or ())
    if len(pair) != 2 or not all(float(f).is_integer() and f >= 1 for f in pair):
        return None
    return int(pair[0]), int(pair[1])


def upsample(gm: fx.GraphModule, node: fx.Node, size: Any, scale: Any, mode: str,
             align_corners: Any = None) -> bool:
    """Nearest upsampling by integer factors -> upsample_nearest(x, factors) (the identity is removed)."""
    src, shape = node.args[0], _shape(node.args[0])
    if not isinstance(src, fx.Node) or shape is None or len(shape) != 4 or mode not in ("nearest", "bilinear"):
        return False
    factors = _factors(shape[2:], scale, size)
    if factors is None:
        return False
    if mode == "bilinear":  # a weighted average: a quantization point, lowered to IntAvgPoolTable
        if node.op == "call_module":
            return True
        up = nn.Upsample(scale_factor=tuple(float(f) for f in factors), mode="bilinear",
                         align_corners=bool(align_corners))
        rewrite.replace_node(gm, node, "call_module", rewrite.add_module(gm, node.name, up), (src,))
        return True
    if factors == (1, 1):
        return _to_permute(gm, node, src, [0, 1, 2, 3])
    rewrite.replace_node(gm, node, "call_function", upsample_nearest, (src, factors))
    return True


def _interpolate(gm: fx.GraphModule, node: fx.Node) -> bool:
    names = ("input", "size", "scale_factor", "mode", "align_corners")
    b: dict[str, Any] = {"size": None, "scale_factor": None, "mode": "nearest", "align_corners": None}
    b |= dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    return upsample(gm, node, b["size"], b["scale_factor"], b["mode"], b["align_corners"])


def upsample_module(gm: fx.GraphModule, node: fx.Node) -> bool:
    mod: Any = gm.get_submodule(str(node.target))
    return upsample(gm, node, mod.size, mod.scale_factor, mod.mode, getattr(mod, "align_corners", None))


def _is_canonical_upsample(node: fx.Node) -> bool:
    args: Any = node.args
    return (not node.kwargs and len(args) == 2 and isinstance(args[1], tuple)
            and all(isinstance(f, int) for f in args[1]))


FUNCTION_RULES: dict[Any, Rule] = {
    F.interpolate: _interpolate, F.upsample: _interpolate, F.upsample_nearest: _interpolate,
    torch.permute: _permute, torch.transpose: _transpose, torch.swapaxes: _transpose, torch.swapdims: _transpose,
    torch.narrow: _narrow, operator.getitem: _getitem, torch.chunk: _chunk, torch.split: _split,
    torch.tensor_split: _tensor_split, torch.unbind: _unbind,
}
METHOD_RULES: dict[str, Rule] = {
    "permute": _permute, "transpose": _transpose, "swapaxes": _transpose, "swapdims": _transpose,
    "narrow": _narrow, "chunk": _chunk, "split": _split, "tensor_split": _tensor_split, "unbind": _unbind,
}
