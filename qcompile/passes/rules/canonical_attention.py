"""canonicalize rules for attention: products of two activations, scaled dot-product attention, multi-head
attention, and the head split that moves the batch axis.

Rewrites (each keeps the computed function identical; shapes from canonicalize's run on the example inputs):
  a @ b, torch.matmul / torch.bmm / a.matmul(b) of two activations of one rank >= 3
                                        -> MatMul(1)(a, b); a scalar MulConst(c) operand read only there
                                           joins alpha (q * scale @ k^T -> MatMul(scale)(q, k^T))
  F.scaled_dot_product_attention(q, k, v) (no mask, no dropout, not causal)
                                        -> MatMul(scale or 1/sqrt(E))(q, permute(k, ..., -1, -2)),
                                           nn.Softmax(last), MatMul(1)(., v)
  nn.MultiheadAttention(x, x, x) (self-attention, batch_first, no mask; the weights output unused)
                                        -> Linear(in_proj), narrow per q/k/v, reshape to heads, permute, the
                                           attention above, permute/reshape back, Linear(out_proj)
  torch.cat((param.expand(B, -1, -1), x), dim) (a class token; either order)
                                        -> ConstCat(param[0], dim, first)(x)
  x.mean(dim=1) of [N, L, D] tokens      -> AdaptiveAvgPool2d(1) of permute/reshape to [N, D, L, 1]
  permute(x, p) with p[0] != 0 read only by unbind(0) / x[i] along its first axis (timm's
  qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0))
                                        -> per piece i: narrow(x, p[0], i, 1), reshape dropping that axis,
                                           permute(rest of p) (the batch first again)
Refused with the reason (canonicalize lists the node): an attention mask (``attn_mask`` or ``is_causal``):
it is computed at run time or depends on the input, and an integer softmax takes none; dropout_p > 0;
a MultiheadAttention that is not batch_first self-attention. A sequence length that changes with the input
cannot reach here: shapes are those of the example input, fixed at compile time.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from qcompile.errors import QCompileError, one_line
from qcompile.ir import rewrite
from qcompile.ir.attention import ConstCat, MatMul
from qcompile.ir.elementwise import MulConst
from qcompile.ir.meta import get_info, set_info
from qcompile.passes.rules import canonical_constants as constants

Rule = Callable[[fx.GraphModule, fx.Node], bool]
MATMUL_FUNCTIONS = (operator.matmul, torch.matmul, torch.bmm)
MATMUL_METHODS = ("matmul", "bmm", "__matmul__")
SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SDPA_DEFAULTS: dict[str, Any] = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                                 "enable_gqa": False}


def _shape(arg: Any) -> tuple[int, ...] | None:
    return get_info(arg).shape if isinstance(arg, fx.Node) else None


def _call(gm: fx.GraphModule, before: fx.Node, op: str, target: Any, args: tuple[Any, ...],
          shape: tuple[int, ...] | None) -> fx.Node:
    with gm.graph.inserting_before(before):
        node = gm.graph.create_node(op, target, args, {})
    set_info(node, shape=shape, source=get_info(before).source)
    return node


def _module(gm: fx.GraphModule, before: fx.Node, base: str, module: nn.Module, args: tuple[Any, ...],
            shape: tuple[int, ...] | None) -> fx.Node:
    return _call(gm, before, "call_module", rewrite.add_module(gm, base, module), args, shape)


def _scalar_scale(gm: fx.GraphModule, arg: Any) -> tuple[Any, float]:
    """(input, c) when ``arg`` is a scalar MulConst(c) read only by the product, else (arg, 1)."""
    mod = rewrite.module_of(gm, arg) if isinstance(arg, fx.Node) else None
    if isinstance(mod, MulConst) and mod.value.numel() == 1 and len(arg.users) == 1:
        return arg.args[0], float(mod.value)
    return arg, 1.0


def _matmul_shape(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...]:
    return (*torch.broadcast_shapes(a[:-2], b[:-2]), a[-2], b[-1])


def matmul(gm: fx.GraphModule, node: fx.Node) -> bool:
    args = node.args
    if len(args) != 2 or node.kwargs or not all(isinstance(a, fx.Node) and a.op != "get_attr" for a in args):
        return False  # a constant operand is a Linear (not a product of activations)
    sa, sb = _shape(args[0]), _shape(args[1])
    if sa is None or sb is None or len(sa) != len(sb) or len(sa) < 3 or sa[0] != sb[0]:
        return False  # the batch axis first, the same in both operands
    (a, ca), (b, cb) = _scalar_scale(gm, args[0]), _scalar_scale(gm, args[1])
    name = rewrite.add_module(gm, node.name, MatMul(ca * cb))
    rewrite.replace_node(gm, node, "call_module", name, (a, b))
    return True


def _attention(gm: fx.GraphModule, before: fx.Node, q: fx.Node, k: fx.Node, v: fx.Node, scale: float) -> fx.Node:
    """softmax(scale q k^T) v on [N, ..., L, E] operands, as canonical nodes inserted before ``before``."""
    sq, sk, sv = _shape(q), _shape(k), _shape(v)
    assert sq is not None and sk is not None and sv is not None
    rank = len(sq)
    perm = (*range(rank - 2), rank - 1, rank - 2)
    kt = _call(gm, before, "call_function", torch.permute, (k, perm), tuple(sk[p] for p in perm))
    scores_shape = _matmul_shape(sq, tuple(sk[p] for p in perm))
    scores = _module(gm, before, f"{before.name}_scores", MatMul(scale), (q, kt), scores_shape)
    probs = _module(gm, before, f"{before.name}_softmax", nn.Softmax(rank - 1), (scores,), scores_shape)
    return _module(gm, before, f"{before.name}_context", MatMul(1.0), (probs, v), _matmul_shape(scores_shape, sv))


def sdpa_problem(node: fx.Node) -> str | None:
    """Why ``F.scaled_dot_product_attention`` at ``node`` has no integer form (None: it has one)."""
    b = dict(SDPA_DEFAULTS) | dict(zip(SDPA_ARGS, node.args, strict=False)) | dict(node.kwargs)
    if b["attn_mask"] is not None or b["is_causal"]:
        return ("attention with a mask (attn_mask/is_causal); compile the model without the mask (the integer "
                "softmax takes none)")
    if b["dropout_p"] != 0 or b["enable_gqa"]:
        return "attention with dropout_p > 0 or enable_gqa; pass dropout_p=0.0 in eval mode"
    if not all(_shape(b[k]) is not None for k in ("query", "key", "value")) or len(_shape(b["query"]) or ()) < 3:
        return "attention on operands of unknown shape or rank < 3"
    if b["scale"] is not None and not (isinstance(b["scale"], (int, float)) and b["scale"] > 0):
        return f"attention with scale={b['scale']!r} (a positive number is needed)"
    return None


def sdpa(gm: fx.GraphModule, node: fx.Node) -> bool:
    if sdpa_problem(node) is not None:
        return False
    b = dict(SDPA_DEFAULTS) | dict(zip(SDPA_ARGS, node.args, strict=False)) | dict(node.kwargs)
    width = (_shape(b["query"]) or (1,))[-1]
    scale = float(b["scale"]) if b["scale"] is not None else 1.0 / math.sqrt(width)
    out = _attention(gm, node, b["query"], b["key"], b["value"], scale)
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    return True


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight.detach())
        if bias is not None and layer.bias is not None:
            layer.bias.copy_(bias.detach())
    return layer


def mha_problem(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Why the nn.MultiheadAttention at ``node`` has no integer form (None: it has one)."""
    mha = gm.get_submodule(str(node.target))
    assert isinstance(mha, nn.MultiheadAttention)
    x = node.args[0] if node.args else node.kwargs.get("query")
    qkv = [*node.args[:3], *(node.kwargs.get(k) for k in ("query", "key", "value")[len(node.args):])]
    extra = {k: v for k, v in node.kwargs.items() if k not in ("query", "key", "value", "need_weights")}
    if len(node.args) > 3 or any(v is not None and v is not False for v in extra.values()):
        return "MultiheadAttention with a mask or other arguments; call it as attn(x, x, x)"
    if not (mha.batch_first and mha._qkv_same_embed_dim and all(a is x for a in qkv)) or mha.bias_k is not None:
        return "MultiheadAttention that is not batch_first self-attention attn(x, x, x); use batch_first=True"
    if any(u.target is not operator.getitem or (u.args[1] != 0 and u.users) for u in node.users):
        return "MultiheadAttention whose attention weights are used; pass need_weights=False"
    if mha.dropout and mha.training:
        return "MultiheadAttention with dropout in training mode; call model.eval()"
    return None


def _heads(gm: fx.GraphModule, before: fx.Node, qkv: fx.Node, i: int, shape: tuple[int, ...], heads: int) -> fx.Node:
    """Piece i (q, k or v) of the in-projection [N, L, 3E] as [N, H, L, E/H]."""
    n, length, e3 = shape
    e, d = e3 // 3, e3 // 3 // heads
    part = _call(gm, before, "call_function", torch.narrow, (qkv, 2, i * e, e), (n, length, e))
    split = _call(gm, before, "call_function", torch.reshape, (part, (-1, length, heads, d)), (n, length, heads, d))
    return _call(gm, before, "call_function", torch.permute, (split, (0, 2, 1, 3)), (n, heads, length, d))


def multihead_attention(gm: fx.GraphModule, node: fx.Node) -> bool:
    if mha_problem(gm, node) is not None:
        return False
    mha = gm.get_submodule(str(node.target))
    x = node.args[0] if node.args else node.kwargs["query"]
    shape = _shape(x)
    assert isinstance(mha, nn.MultiheadAttention) and isinstance(x, fx.Node)
    if shape is None or len(shape) != 3:
        return False
    n, length, e = shape
    h, d = mha.num_heads, e // mha.num_heads
    qkv = _module(gm, node, f"{node.name}_in_proj", _linear(mha.in_proj_weight, mha.in_proj_bias), (x,),
                  (n, length, 3 * e))
    q, k, v = (_heads(gm, node, qkv, i, (n, length, 3 * e), h) for i in range(3))
    ctx = _attention(gm, node, q, k, v, 1.0 / math.sqrt(d))
    back = _call(gm, node, "call_function", torch.permute, (ctx, (0, 2, 1, 3)), (n, length, h, d))
    merged = _call(gm, node, "call_function", torch.reshape, (back, (-1, length, e)), (n, length, e))
    out = _module(gm, node, f"{node.name}_out_proj", _linear(mha.out_proj.weight, mha.out_proj.bias), (merged,),
                  (n, length, e))
    for user in list(node.users):
        if user.args[1] == 0:
            user.replace_all_uses_with(out)
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    return True


def _select_users(node: fx.Node) -> list[tuple[fx.Node, int]] | None:
    """(node, i) for every piece along axis 0 read from ``node``, or None when another user reads it."""
    found = []
    for user in node.users:
        if user.target is operator.getitem and isinstance(user.args[1], int):
            found.append((user, user.args[1]))
        elif user.target in ("unbind", torch.unbind) and (user.args[1:] or (0,))[0] == 0 and not user.kwargs:
            for piece in user.users:
                if piece.target is not operator.getitem or not isinstance(piece.args[1], int):
                    return None
                found.append((piece, piece.args[1]))
        else:
            return None
    return found


def select_from_permute(gm: fx.GraphModule, node: fx.Node, perm: list[int]) -> bool:
    """permute(x, perm) with the batch off axis 0 whose users only take pieces along axis 0 (see the module)."""
    src, shape = node.args[0], _shape(node.args[0])
    rank = len(perm)
    if not isinstance(src, fx.Node) or shape is None or rank != len(shape) or rank < 3 or perm[1] % rank != 0:
        return False
    perm = [p % rank for p in perm]
    axis, rest = perm[0], [p - (p > perm[0]) for p in perm[1:]]
    pieces = _select_users(node)
    if not pieces:
        return False
    kept = tuple(d for i, d in enumerate(shape) if i != axis)
    for piece, i in pieces:
        one = _call(gm, piece, "call_function", torch.narrow, (src, axis, i % shape[axis], 1),
                    tuple(1 if j == axis else d for j, d in enumerate(shape)))
        value = _call(gm, piece, "call_function", torch.reshape, (one, (-1, *kept[1:])), kept)
        if rest != list(range(rank - 1)):
            value = _call(gm, piece, "call_function", torch.permute, (value, tuple(rest)),
                          tuple(kept[p] for p in rest))
        piece.replace_all_uses_with(value)
    for user in list(node.users):
        for piece in list(user.users):
            gm.graph.erase_node(piece)
        gm.graph.erase_node(user)
    gm.graph.erase_node(node)
    return True


FUNCTION_RULES: dict[Any, Rule] = {**{f: matmul for f in MATMUL_FUNCTIONS}, F.scaled_dot_product_attention: sdpa}
METHOD_RULES: dict[str, Rule] = dict.fromkeys(MATMUL_METHODS, matmul)


def _constant_piece(gm: fx.GraphModule, arg: Any) -> torch.Tensor | None:
    """One sample of a parameter read as it is or expanded over the batch (``cls_token.expand(B, -1, -1)``)."""
    if isinstance(arg, fx.Node) and arg.op == "call_method" and arg.target == "expand" and len(arg.users) == 1:
        arg = arg.args[0]
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
        return None
    value = constants.constant(gm, arg)
    return value[0] if value is not None and value.dim() >= 2 and value.shape[0] == 1 else None


def const_cat(gm: fx.GraphModule, node: fx.Node, tensors: Any, dim: Any) -> bool | None:
    """cat([constant, x], dim) or cat([x, constant], dim) -> ConstCat; None when no piece is a constant."""
    pieces = list(tensors) if isinstance(tensors, (list, tuple)) else []
    values = [_constant_piece(gm, p) for p in pieces]
    if len(pieces) != 2 or all(v is None for v in values):
        return None
    shape, i = _shape(node), 0 if values[0] is not None else 1
    x, value = pieces[1 - i], values[i]
    if shape is None or not isinstance(dim, int) or value is None or values[1 - i] is not None:
        return False
    dim = dim % len(shape)
    if dim == 0 or value.dim() != len(shape) - 1:
        return False
    name = rewrite.add_module(gm, node.name, ConstCat(value, dim, first=i == 0))
    rewrite.replace_node(gm, node, "call_module", name, (x,))
    return True


def token_mean(gm: fx.GraphModule, node: fx.Node) -> bool:
    """x.mean(dim=1) of [N, L, D] tokens -> AdaptiveAvgPool2d(1) over permute/reshape to [N, D, L, 1]."""
    args = dict(zip(("input", "dim", "keepdim"), node.args, strict=False)) | dict(node.kwargs)
    src, shape, dim = args.get("input"), _shape(args.get("input")), args.get("dim")
    dim = dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim
    if not isinstance(src, fx.Node) or shape is None or len(shape) != 3 or not isinstance(dim, int) or dim % 3 != 1:
        return False
    if args.get("dtype") is not None:
        return False
    n, length, d = shape
    moved = _call(gm, node, "call_function", torch.permute, (src, (0, 2, 1)), (n, d, length))
    grid = _call(gm, node, "call_function", torch.reshape, (moved, (-1, d, length, 1)), (n, d, length, 1))
    pooled = _module(gm, node, f"{node.name}_pool", nn.AdaptiveAvgPool2d(1), (grid,), (n, d, 1, 1))
    out = (-1, 1, d) if args.get("keepdim") else (-1, d)
    value = _call(gm, node, "call_function", torch.reshape, (pooled, out), (n, *out[1:]))
    node.replace_all_uses_with(value)
    gm.graph.erase_node(node)
    return True


def mean_rule(fallback: Rule) -> Rule:
    """A mean over the tokens of [N, L, D] here; the other means go to ``fallback`` (pools over H and W)."""
    def rule(gm: fx.GraphModule, node: fx.Node) -> bool:
        return token_mean(gm, node) or fallback(gm, node)

    return rule


class AttentionError(QCompileError):
    """An attention op without an integer form (a mask, dropout, a layout): one line naming the node."""


def refuse_attention(gm: fx.GraphModule) -> None:
    """Raise AttentionError for the first attention node left with a problem (after canonicalize's rules)."""
    for node in gm.graph.nodes:
        why = None
        if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
            why = sdpa_problem(node)
        elif isinstance(rewrite.module_of(gm, node), nn.MultiheadAttention):
            why = mha_problem(gm, node)
        if why is not None:
            where = get_info(node).source
            raise AttentionError(one_line(f"'{node.name}'{' at ' + where if where else ''}: {why}"))
