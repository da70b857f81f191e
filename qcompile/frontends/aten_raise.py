"""Raise a torch.export (aten) graph to the torch-level vocabulary of a symbolically traced one.

``aten.conv2d``/``aten.linear``/``aten.batch_norm`` whose parameters are graph attributes become
``nn.Conv2d``/``nn.Linear``/``nn.BatchNorm*`` submodules named after the original module path; pooling
becomes pooling modules; elementwise and shape ops map to their torch functions. Guard modules and
dropout disappear. Ops not listed are kept as they are, so canonicalize reports them as unsupported.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from qcompile.ir import rewrite

aten = torch.ops.aten
Raise = Callable[[fx.GraphModule, fx.Node], None]


def _tensor(gm: fx.GraphModule, arg: Any) -> torch.Tensor | None:
    """The parameter or buffer a get_attr node reads, else None."""
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
        return None
    obj: Any = gm
    for part in str(arg.target).split("."):
        obj = getattr(obj, part)
    return obj if isinstance(obj, torch.Tensor) else None


def _module_name(node: fx.Node, fallback: str) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [path for path, _cls in stack.values() if path]
    return paths[-1] if paths else fallback


def _int(v: fx.node.Argument, default: int) -> int:
    """An int argument of an aten op; None (not given) means ``default``."""
    if v is None:
        return default
    assert isinstance(v, int), f"expected an int argument, got {v!r}"
    return v


def _float(v: fx.node.Argument) -> float:
    """A float argument of an aten op (eps, momentum)."""
    assert isinstance(v, (int, float)), f"expected a float argument, got {v!r}"
    return float(v)


def _pair(v: Any, default: int) -> tuple[int, int]:
    if v is None or v == []:
        return (default, default)
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[-1]))


def _place_module(gm: fx.GraphModule, node: fx.Node, module: nn.Module) -> str:
    """Put ``module`` at the original module path of ``node`` when there is one (keeps layer names)."""
    path = _module_name(node, "")
    try:
        existing = gm.get_submodule(path) if path else None
    except AttributeError:
        existing = None
    replaceable = type(existing) in (type(module), nn.Module)  # the exported container or the same kind
    if existing is not None and replaceable and not hasattr(existing, "_qc_raised"):
        module._qc_raised = True  # type: ignore[assignment]  # torch types Module.__setattr__ values as Tensor | Module
        rewrite.set_module(gm, path, module)
        return path
    return rewrite.add_module(gm, path or node.name, module)


def _swap_to_module(gm: fx.GraphModule, node: fx.Node, module: nn.Module, x: fx.Node) -> None:
    rewrite.replace_node(gm, node, "call_module", _place_module(gm, node, module), (x,))


def _load(layer: nn.Conv2d | nn.Linear, w: torch.Tensor, b: torch.Tensor | None) -> None:
    with torch.no_grad():
        layer.weight.copy_(w)
        if b is not None:
            assert layer.bias is not None  # the layer was made with bias=True
            layer.bias.copy_(b)


def _conv(gm: fx.GraphModule, node: fx.Node) -> None:
    _, w_node, b_node, *rest = list(node.args) + [None] * (7 - len(node.args))
    w, b = _tensor(gm, w_node), _tensor(gm, b_node)
    if w is None or w.dim() != 4:
        return
    stride, padding, dilation, groups = rest[0], rest[1], rest[2], _int(rest[3], 1)
    if isinstance(padding, str):
        return
    conv = nn.Conv2d(w.shape[1] * groups, w.shape[0], (w.shape[2], w.shape[3]), _pair(stride, 1),
                     _pair(padding, 0), _pair(dilation, 1), groups, bias=b is not None)
    _load(conv, w, b)
    _swap_to_module(gm, node, conv, rewrite.input_node(node))


def _linear(gm: fx.GraphModule, node: fx.Node) -> None:
    _, w_node, b_node = (list(node.args) + [None])[:3]
    w, b = _tensor(gm, w_node), _tensor(gm, b_node)
    if w is None:
        return
    linear = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    _load(linear, w, b)
    _swap_to_module(gm, node, linear, rewrite.input_node(node))


def _batchnorm_module(gm: fx.GraphModule, node: fx.Node, args: list[Any], eps: float) -> nn.Module | None:
    weight, bias, mean, var = (_tensor(gm, a) for a in args[1:5])
    if mean is None or var is None:
        return None
    val = node.meta.get("val")
    cls = nn.BatchNorm1d if val is not None and val.dim() == 2 else nn.BatchNorm2d
    bn = cls(mean.shape[0], eps=eps, affine=weight is not None)
    assert bn.running_mean is not None and bn.running_var is not None  # made with track_running_stats=True
    with torch.no_grad():
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        if weight is not None and bias is not None:
            bn.weight.copy_(weight)
            bn.bias.copy_(bias)
    return bn.eval()


def _batch_norm(gm: fx.GraphModule, node: fx.Node) -> None:
    args = list(node.args)
    bn = _batchnorm_module(gm, node, args, _float(args[7]))
    if bn is not None and not args[5]:
        _swap_to_module(gm, node, bn, rewrite.input_node(node))


def _batch_norm_legit(gm: fx.GraphModule, node: fx.Node) -> None:
    args = list(node.args)
    getitems = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
    bn = _batchnorm_module(gm, node, args, _float(args[6]))
    if bn is None or len(getitems) != len(node.users):
        return
    name = _place_module(gm, node, bn)
    for item in getitems:
        rewrite.replace_node(gm, item, "call_module", name, (args[0],))
    gm.graph.erase_node(node)


def _pool_module(make: Callable[[list[Any]], nn.Module]) -> Raise:
    def raise_pool(gm: fx.GraphModule, node: fx.Node) -> None:
        _swap_to_module(gm, node, make(list(node.args)), rewrite.input_node(node))

    return raise_pool


def _max_pool(a: list[Any]) -> nn.Module:
    a += [None] * (6 - len(a))
    kernel = _pair(a[1], 1)
    stride = _pair(a[2], 0) if a[2] else kernel
    return nn.MaxPool2d(kernel, stride, _pair(a[3], 0), _pair(a[4], 1), ceil_mode=bool(a[5]))


def _avg_pool(a: list[Any]) -> nn.Module:
    a += [None] * (7 - len(a))
    kernel = _pair(a[1], 1)
    count = True if a[5] is None else bool(a[5])
    return nn.AvgPool2d(kernel, _pair(a[2], 0) if a[2] else kernel, _pair(a[3], 0), bool(a[4]), count, a[6])


def _function(target: Callable[..., Any], arity: int | None = None) -> Raise:
    def raise_function(gm: fx.GraphModule, node: fx.Node) -> None:
        args = node.args if arity is None else node.args[:arity]
        rewrite.replace_node(gm, node, "call_function", target, tuple(args), dict(node.kwargs))

    return raise_function


def _drop(gm: fx.GraphModule, node: fx.Node) -> None:
    rewrite.bypass(gm, node)


def _add(gm: fx.GraphModule, node: fx.Node) -> None:
    if node.kwargs.get("alpha", 1) == 1:
        rewrite.replace_node(gm, node, "call_function", operator.add, tuple(node.args[:2]))


def _index(dim: Any, item: Any) -> tuple[Any, ...]:
    return (*[slice(None)] * _int(dim, 0), item)


def _slice(gm: fx.GraphModule, node: fx.Node) -> None:
    """aten.slice(x, dim, start, end, step) -> x[:, ..., start:end:step] (canonicalize makes it a narrow)."""
    x, dim, start, end, step = (list(node.args) + [0, None, None, 1][len(node.args) - 1:])[:5]
    rewrite.replace_node(gm, node, "call_function", operator.getitem, (x, _index(dim, slice(start, end, step))))


def _select(gm: fx.GraphModule, node: fx.Node) -> None:
    x, dim, index = node.args[:3]
    rewrite.replace_node(gm, node, "call_function", operator.getitem, (x, _index(dim, index)))


MOVEMENT_RAISES: dict[Any, Raise] = {
    aten.permute.default: _function(torch.permute),
    aten.transpose.int: _function(torch.transpose),
    aten.narrow.default: _function(torch.narrow),
    aten.split.Tensor: _function(torch.split),
    aten.split_with_sizes.default: _function(torch.split),
    aten.chunk.default: _function(torch.chunk),
    aten.unbind.int: _function(torch.unbind),
    aten.squeeze.dim: _function(torch.squeeze),
    aten.squeeze.dims: _function(torch.squeeze),
    aten.unsqueeze.default: _function(torch.unsqueeze),
    aten._unsafe_view.default: _function(torch.reshape),
    aten.contiguous.default: _drop,
    aten.slice.Tensor: _slice,
    aten.select.int: _select,
}


RAISES: dict[Any, Raise] = {
    **MOVEMENT_RAISES,
    aten.conv2d.default: _conv,
    aten.linear.default: _linear,
    aten.batch_norm.default: _batch_norm,
    aten._native_batch_norm_legit_no_training.default: _batch_norm_legit,
    aten.relu.default: _function(torch.relu),
    aten.relu_.default: _function(torch.relu),
    aten.relu6.default: _function(torch.nn.functional.relu6),
    aten.hardtanh.default: _function(torch.clamp),
    aten.clamp.default: _function(torch.clamp),
    aten.clip.default: _function(torch.clamp),
    aten.add.Tensor: _add,
    aten.cat.default: _function(torch.cat),
    aten.mean.dim: _function(torch.mean),
    aten.view.default: _function(torch.reshape),
    aten.reshape.default: _function(torch.reshape),
    aten.flatten.using_ints: _function(torch.flatten),
    aten.max_pool2d.default: _pool_module(_max_pool),
    aten.avg_pool2d.default: _pool_module(_avg_pool),
    aten.adaptive_avg_pool2d.default: _pool_module(lambda a: nn.AdaptiveAvgPool2d(tuple(a[1]))),
    aten.dropout.default: _drop,
    aten.clone.default: _drop,
    aten.alias.default: _drop,
}


def raise_aten(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite aten ops of an exported program's module to the torch-level vocabulary, in place."""
    for method in ("train", "eval"):  # ExportedProgram.module() shadows them with methods that raise
        gm.__dict__.pop(method, None)
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            gm.graph.erase_node(node)
        elif node.op == "call_function" and node.target in RAISES:
            RAISES[node.target](gm, node)
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    rewrite.finish(gm)
    # a fresh GraphModule drops the exported module's input-shape hooks (they pin the traced batch size)
    return fx.GraphModule(gm, gm.graph, type(gm).__name__)


# pointwise functions (tables), products of activations, LayerNorm and permutes (passes/rules/)
RAISES.update({
    aten.silu.default: _function(torch.nn.functional.silu), aten.silu_.default: _function(torch.nn.functional.silu),
    aten.sigmoid.default: _function(torch.sigmoid), aten.tanh.default: _function(torch.tanh),
    aten.hardswish.default: _function(torch.nn.functional.hardswish),
    aten.hardswish_.default: _function(torch.nn.functional.hardswish),
    aten.hardsigmoid.default: _function(torch.nn.functional.hardsigmoid),
    aten.gelu.default: _function(torch.nn.functional.gelu),
    aten.leaky_relu.default: _function(torch.nn.functional.leaky_relu, 2),
    aten.elu.default: _function(torch.nn.functional.elu, 2),
    aten.mul.Tensor: _function(operator.mul),
    aten.layer_norm.default: _function(torch.nn.functional.layer_norm, 5),
    aten.permute.default: _function(torch.permute),
    aten.add_.Tensor: _add,  # result += x (torchvision's residuals)
    aten._softmax.default: _function(torch.nn.functional.softmax, 2),
    aten.softmax.int: _function(torch.nn.functional.softmax, 2),
    aten.scaled_dot_product_attention.default: _function(torch.nn.functional.scaled_dot_product_attention),
    aten.conv_transpose2d.input: _function(torch.nn.functional.conv_transpose2d),  # canonicalize: dilate_pad + conv
})
