"""prune-channels: remove output channels that are exactly zero, and the inputs that read them.

A conv/linear output channel c whose weights are all zero and whose bias is zero (or absent) computes
y_c = 0 for every input; its quantized value is the integer 0 (scales are symmetric, zero point 0), ReLU,
clamps, max/average pooling, nearest upsampling and the zero insertion of a transposed conv (``dilate_pad``)
keep it 0 (zero padding adds zeros), and a conv or linear layer reading it
adds 0 * w to its accumulators (its weight scale is pinned first, so dropping the dead columns does not
change max|W_c|). So the channel is removed from the producing layer (weight rows, bias,
the weight quantizer's per-channel state) and input channel c from every layer reading it (for a linear
layer after ``torch.flatten`` the H*W features of channel c): the integer graph computes the same
integers with fewer MACs and bytes. A layer is only shrunk when every path from it reaches conv (groups
= 1) / linear layers through activation quantizers, ReLU/clamp, pooling, upsampling, ``dilate_pad`` or flatten
(so a transposed conv, canonicalised to ``dilate_pad`` + conv, prunes like a conv); otherwise (a residual
add, a concatenation, a depthwise conv, a graph output) the zero channels stay and the record says why.
A layer whose every channel is zero is refused: removing it would change the network's structure.

Not handled: depthwise/grouped consumers, reshapes other than flatten, adds and concatenations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from qcompile.ir.meta import Stage, get_info
from qcompile.ir.movement import dilate_pad, upsample_nearest
from qcompile.ir.shapes import annotate_shapes
from qcompile.passes.base import Pass, PassContext, PassResult, PreconditionError, register_pass
from qcompile.quant import graph
from qcompile.quant.modules import ActQuant, QConv2d, QLinear

Consumer = tuple[fx.Node, int]  # (conv/linear node, features per channel: 0 = a conv's channel)
_PASS_MODULES = (ActQuant, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_PASS_FUNCTIONS = (dilate_pad, upsample_nearest)  # per-channel data movement that keeps a zero channel zero


def zero_channels(layer: QConv2d | QLinear) -> torch.Tensor:
    """Boolean mask of output channels with all-zero weights and zero (or no) bias."""
    w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
    zero = (w == 0).all(dim=1)
    return zero & (layer.bias.detach() == 0) if layer.bias is not None else zero


def _follow(gm: fx.GraphModule, node: fx.Node, spatial: int) -> tuple[list[Consumer], str]:
    """The layers reading ``node``'s channels, or ([], reason) when some path is not prunable."""
    found: list[Consumer] = []
    for user in node.users:
        mod = graph.module(gm, user)
        if isinstance(mod, (QConv2d, QLinear)):
            if isinstance(mod, QConv2d) and (mod.groups != 1 or spatial):
                return [], f"read by '{user.name}', a grouped conv or a conv after flatten"
            found.append((user, spatial if isinstance(mod, QLinear) else 0))
            continue
        if user.op == "call_function" and user.target is torch.flatten:  # canonical: torch.flatten(x, 1)
            shape = get_info(node).shape
            assert shape is not None, f"'{node.name}' has no recorded shape"
            inner, why = _follow(gm, user, math.prod(shape[2:]))
        elif isinstance(mod, _PASS_MODULES) or (user.op == "call_function" and (
                user.target in graph.CLAMPS or (user.target in _PASS_FUNCTIONS and not spatial))):
            inner, why = _follow(gm, user, spatial)
        else:
            return [], f"read by '{user.name}' ({user.op} {getattr(user.target, '__name__', user.target)})"
        if why:
            return [], why
        found += inner
    return found, ""


def _shrink_outputs(layer: QConv2d | QLinear, keep: torch.Tensor) -> None:
    layer.weight = nn.Parameter(layer.weight.detach()[keep].clone(), layer.weight.requires_grad)
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.detach()[keep].clone(), layer.bias.requires_grad)
    if isinstance(layer, QConv2d):
        layer.out_channels = int(keep.sum())
    else:
        layer.out_features = int(keep.sum())
    select = getattr(layer.weight_quant, "select_channels", None)
    if callable(select):
        select(keep)


def _shrink_inputs(layer: QConv2d | QLinear, keep: torch.Tensor, per_channel: int) -> None:
    """Drop input columns; a weight quantizer whose scale depends on them keeps its current scale."""
    pin = getattr(layer.weight_quant, "pin_scale", None)
    if callable(pin):
        pin(layer.weight.detach())
    cols = keep if not per_channel else keep.repeat_interleave(per_channel)
    layer.weight = nn.Parameter(layer.weight.detach()[:, cols].clone(), layer.weight.requires_grad)
    if isinstance(layer, QConv2d):
        layer.in_channels = int(keep.sum())
    else:
        layer.in_features = int(cols.sum())


def prune(gm: fx.GraphModule) -> dict[str, Any]:
    """Remove zero channels wherever exact; returns per layer what was removed or why not."""
    record: dict[str, Any] = {}
    for node, layer in list(graph.layers(gm)):
        zero = zero_channels(layer)
        if not bool(zero.any()):
            continue
        if bool(zero.all()):
            raise PreconditionError(f"every output channel of layer '{node.target}' is zero; the layer computes "
                                    "nothing: lower the pruning pressure (e.g. --mu) or remove the layer")
        consumers, why = _follow(gm, node, 0)
        if why or not consumers:
            record[str(node.target)] = {"zero_channels": int(zero.sum()), "removed": 0, "kept_because": why}
            continue
        keep = ~zero
        _shrink_outputs(layer, keep)
        for user, per_channel in consumers:
            consumer = graph.module(gm, user)
            assert isinstance(consumer, (QConv2d, QLinear))
            _shrink_inputs(consumer, keep, per_channel)
        record[str(node.target)] = {"zero_channels": int(zero.sum()), "removed": int(zero.sum()),
                                    "channels_left": int(keep.sum())}
    return record


@register_pass
@dataclass(frozen=True)
class PruneChannels(Pass):
    name = "prune-channels"
    summary = "remove all-zero output channels (and the inputs reading them) from conv/linear layers"
    requires = (Stage.QUANT,)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        annotate_shapes(gm, ctx.example_inputs)
        record = prune(gm)
        ctx.records[self.name] = record
        removed = any(r["removed"] for r in record.values())
        if removed:
            gm.recompile()
            annotate_shapes(gm, ctx.example_inputs)
        return PassResult(gm, removed)
