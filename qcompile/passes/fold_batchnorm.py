"""fold-batchnorm: fold eval-mode BatchNorm into the preceding Conv2d / Linear.

For y = gamma * (conv(x) + b - mu) / sqrt(var + eps) + beta the folded layer has
W' = W * gamma / sqrt(var + eps) (per output channel) and b' = (b - mu) * gamma / sqrt(var + eps) + beta;
torch's own ``fuse_conv_bn_eval`` / ``fuse_linear_bn_eval`` compute it, so results equal torch's fusion.
A BatchNorm2d with no foldable producer (its input has other users, is not a conv, or comes from a conv
module that the model also calls elsewhere) becomes an equivalent depthwise 1x1 convolution.
Not handled: a standalone BatchNorm1d, training-mode statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from qcompile.ir import rewrite
from qcompile.ir.meta import Stage
from qcompile.passes.base import Pass, PassContext, PassResult, PreconditionError, register_pass


def _producer(gm: fx.GraphModule, bn_node: fx.Node) -> tuple[fx.Node, nn.Conv2d | nn.Linear] | None:
    src = bn_node.args[0]
    if not isinstance(src, fx.Node) or len(src.users) != 1:
        return None
    if len(gm.graph.find_nodes(op="call_module", target=src.target)) != 1:
        return None  # a layer called at several places: folding would change its other calls too
    mod = rewrite.module_of(gm, src)
    return (src, mod) if isinstance(mod, (nn.Conv2d, nn.Linear)) else None


def _as_depthwise(bn: nn.BatchNorm2d) -> nn.Conv2d:
    assert bn.running_mean is not None and bn.running_var is not None  # checked by FoldBatchnorm.run
    conv = nn.Conv2d(bn.num_features, bn.num_features, 1, groups=bn.num_features)
    assert conv.bias is not None
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(inv_std)
    beta = bn.bias if bn.affine else torch.zeros_like(inv_std)
    with torch.no_grad():
        conv.weight.copy_((gamma * inv_std).view(-1, 1, 1, 1))
        conv.bias.copy_(beta - bn.running_mean * gamma * inv_std)
    return conv


def _fold_one(gm: fx.GraphModule, bn_node: fx.Node, bn: nn.BatchNorm1d | nn.BatchNorm2d) -> None:
    found = _producer(gm, bn_node)
    if found is not None:
        layer_node, layer = found
        fused = fuse_conv_bn_eval(layer, bn) if isinstance(layer, nn.Conv2d) else fuse_linear_bn_eval(layer, bn)
        rewrite.set_module(gm, str(layer_node.target), fused)
        rewrite.bypass(gm, bn_node)
    elif isinstance(bn, nn.BatchNorm2d):
        rewrite.set_module(gm, str(bn_node.target), _as_depthwise(bn))
    else:
        raise PreconditionError(
            f"BatchNorm1d '{bn_node.name}' does not follow a Linear layer; place it right after one"
        )


@register_pass
@dataclass(frozen=True)
class FoldBatchnorm(Pass):
    name = "fold-batchnorm"
    summary = "fold BatchNorm into the preceding conv/linear (standalone BatchNorm2d -> depthwise conv)"
    requires = (Stage.FLOAT,)
    produces = Stage.FLOAT

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        gm.eval()
        modified = False
        for node in list(gm.graph.nodes):
            mod = rewrite.module_of(gm, node)
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                if mod.running_mean is None or mod.running_var is None:
                    raise PreconditionError(f"BatchNorm '{node.name}' has no running statistics to fold")
                _fold_one(gm, node, mod)
                modified = True
        return PassResult(rewrite.finish(gm), modified)
