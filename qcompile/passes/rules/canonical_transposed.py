"""canonicalize's rule for transposed convolutions: zero insertion and padding, then an ordinary Conv2d.

A transposed convolution with weight W [C_in, C_out / g, kh, kw], stride s, padding p (begin and end per
axis), output padding o, dilation d and g groups scatters every input pixel:
  y[n, G C_og + j, s h + d a - p_begin, ...] += x[n, G C_ig + i, h, ...] W[G C_ig + i, j, a, ...].
The same sum, gathered, is a stride-1 convolution with dilation d of
  z = dilate_pad(x, s, (P_top, P_left, P_bottom, P_right)),  P_begin = d (k - 1) - p_begin,
  P_end = d (k - 1) - p_end + o                       (ir/movement.py: s - 1 zeros between pixels)
with the kernel flipped in space and its in/out axes swapped per group,
  W'[G C_og + j, i, a, b] = W[G C_ig + i, j, kh - 1 - a, kw - 1 - b],
and the same bias. The output size is s (H - 1) + d (k - 1) + 1 - p_begin - p_end + o, as the transposed
convolution's. A pad P < 0 (p > d (k - 1)) crops that side of z instead. The inserted zeros are the real 0
on every scale (zero point 0), so the rewrite is exact in float, in the quant graph and in the integer
graph; quantization, BatchNorm folding, searches, costs and both ONNX targets see an ordinary conv
(``cost.py`` counts the transposed convolution's own MACs, the products with real input pixels).

Handled: ``nn.ConvTranspose2d`` (padding_mode zeros, called without ``output_size``) and
``F.conv_transpose2d`` with parameter (get_attr) weight and bias; the ONNX importer builds the same form
from ``ConvTranspose`` (``equivalent_conv``). Not handled (listed as unsupported): 1-D/3-D transposed
convolutions, weights computed at run time, ``output_size`` at call time.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from qcompile.ir import rewrite
from qcompile.ir.movement import dilate_pad
from qcompile.ir.shapes import pair
from qcompile.passes.rules.channels_last import _parameter

Pads = tuple[int, int, int, int]  # (top, left, bottom, right)


def flipped_kernel(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """W' [C_out, C_in / g, kh, kw] of the equivalent conv from a transposed conv's W [C_in, C_out / g, kh, kw]."""
    c_in, c_og, kh, kw = weight.shape
    w = weight.reshape(groups, c_in // groups, c_og, kh, kw).transpose(1, 2)
    return w.reshape(groups * c_og, c_in // groups, kh, kw).flip(2, 3).contiguous()


def input_pads(kernel: tuple[int, int], dilation: tuple[int, int], begin: tuple[int, int], end: tuple[int, int],
               output_padding: tuple[int, int]) -> Pads:
    """(P_top, P_left, P_bottom, P_right) of ``dilate_pad``: d (k - 1) - p, plus the output padding at the end."""
    reach = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
    return (reach[0] - begin[0], reach[1] - begin[1], reach[0] - end[0] + output_padding[0],
            reach[1] - end[1] + output_padding[1])


def equivalent_conv(weight: torch.Tensor, bias: torch.Tensor | None, dilation: tuple[int, int],
                    groups: int) -> nn.Conv2d:
    """The stride-1 Conv2d (no padding) that, after ``dilate_pad``, computes the transposed convolution."""
    w = flipped_kernel(weight.detach().float(), groups)
    conv = nn.Conv2d(w.shape[1] * groups, w.shape[0], (w.shape[2], w.shape[3]), 1, 0, dilation, groups,
                     bias=bias is not None)
    with torch.no_grad():
        conv.weight.copy_(w)
        if bias is not None and conv.bias is not None:
            conv.bias.copy_(bias.detach().float())
    return conv


def _emit(gm: fx.GraphModule, node: fx.Node, src: fx.Node, conv: nn.Conv2d, stride: tuple[int, int],
          pads: Pads) -> bool:
    with gm.graph.inserting_before(node):
        z = gm.graph.call_function(dilate_pad, (src, stride, pads))
    rewrite.copy_info(node, z)
    if node.op == "call_module":  # the conv takes the transposed conv's place (and name) in the module tree
        rewrite.set_module(gm, str(node.target), conv)
        node.args = (z,)
    else:
        rewrite.replace_node(gm, node, "call_module", rewrite.add_module(gm, node.name, conv), (z,))
    return True


def transposed_module(gm: fx.GraphModule, node: fx.Node) -> bool:
    """nn.ConvTranspose2d(x) -> Conv2d(dilate_pad(x)); False (unsupported) for other padding modes or call forms."""
    mod = gm.get_submodule(str(node.target))
    assert isinstance(mod, nn.ConvTranspose2d)
    src = node.args[0]
    if mod.padding_mode != "zeros" or len(node.args) != 1 or node.kwargs or not isinstance(src, fx.Node):
        return False
    kernel, dilation, padding = pair(mod.kernel_size), pair(mod.dilation), pair(mod.padding)  # type: ignore[arg-type]
    pads = input_pads(kernel, dilation, padding, padding, pair(mod.output_padding))
    conv = equivalent_conv(mod.weight, mod.bias, dilation, mod.groups)
    return _emit(gm, node, src, conv, pair(mod.stride), pads)


def transposed_function(gm: fx.GraphModule, node: fx.Node) -> bool:
    """F.conv_transpose2d(x, W, b, stride, padding, output_padding, groups, dilation) with parameter W, b."""
    names = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
    b: dict[str, Any] = {"bias": None, "stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1}
    b |= dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    weight, bias = _parameter(gm, b["weight"]), _parameter(gm, b["bias"])
    settings = [b[k] for k in ("stride", "padding", "output_padding", "groups", "dilation")]
    if (weight is None or weight.dim() != 4 or (b["bias"] is not None and bias is None)
            or not isinstance(b["input"], fx.Node) or any(isinstance(v, fx.Node) for v in settings)):
        return False
    dilation, padding = pair(b["dilation"]), pair(b["padding"])
    pads = input_pads((weight.shape[2], weight.shape[3]), dilation, padding, padding, pair(b["output_padding"]))
    conv = equivalent_conv(weight, bias, dilation, int(b["groups"]))
    return _emit(gm, node, b["input"], conv, pair(b["stride"]), pads)


def is_canonical_dilate(node: fx.Node) -> bool:
    args: Any = node.args
    return (not node.kwargs and len(args) == 3 and isinstance(args[1], tuple) and isinstance(args[2], tuple)
            and all(isinstance(v, int) and v >= 1 for v in args[1]) and all(isinstance(v, int) for v in args[2]))
