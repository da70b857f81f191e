"""ONNX converter for ``ConvTranspose`` (registered into ``onnx_ops.CONVERTERS``).

  ConvTranspose(x, W, B; strides, pads, output_padding, dilations, group), 2-D, constant W and B
      -> Conv2d(dilate_pad(x, strides, P), W')       (the math: passes/rules/canonical_transposed.py)

with P = d (k - 1) - pads_begin on the top/left and d (k - 1) - pads_end + output_padding on the
bottom/right, so asymmetric pads need nothing more. Not handled (a one-line reason each): 1-D/3-D
transposed convolutions, run-time weights, ``output_shape`` and ``auto_pad`` SAME_UPPER/SAME_LOWER (their
padding split differs between the ONNX specification and runtimes; export with explicit pads).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import torch

from qcompile.frontends import onnx_ops
from qcompile.frontends.onnx_ops import Builder, Unsupported, _ints, _optional_weight, _weight
from qcompile.ir.movement import dilate_pad
from qcompile.passes.rules.canonical_transposed import equivalent_conv, input_pads


def _settings(node: gs.Node, kernel: tuple[int, int]) -> tuple[list[int], list[int], list[int], list[int]]:
    """strides, dilations, pads [begin_h, begin_w, end_h, end_w] and output_padding of a 2-D ConvTranspose."""
    if "output_shape" in node.attrs:
        raise Unsupported("output_shape is given (export with pads and output_padding instead)")
    auto = node.attrs.get("auto_pad", "NOTSET")
    if auto not in ("NOTSET", "VALID"):
        raise Unsupported(f"auto_pad={auto} (export with explicit pads)")
    pads = [0, 0, 0, 0] if auto == "VALID" else _ints(node, "pads", [0, 0, 0, 0])
    found = [_ints(node, "strides", [1, 1]), _ints(node, "dilations", [1, 1]), pads,
             _ints(node, "output_padding", [0, 0])]
    if [len(v) for v in found] != [2, 2, 4, 2] or len(kernel) != 2:
        raise Unsupported("a ConvTranspose that is not 2-D")
    return found[0], found[1], found[2], found[3]


def _conv_transpose(imp: Builder, node: gs.Node) -> None:
    weight = _weight(node, 1, "weights")
    bias = _optional_weight(node, 2, "bias")
    if weight.ndim != 4:
        raise Unsupported(f"{weight.ndim - 2}-D transposed convolution (only 2-D is supported)")
    kernel = (int(weight.shape[2]), int(weight.shape[3]))
    strides, dilations, pads, extra = _settings(node, kernel)
    groups = int(node.attrs.get("group", 1))
    p = input_pads(kernel, (dilations[0], dilations[1]), (pads[0], pads[1]), (pads[2], pads[3]), (extra[0], extra[1]))
    conv = equivalent_conv(torch.from_numpy(weight), None if bias is None else torch.from_numpy(np.asarray(bias)),
                           (dilations[0], dilations[1]), groups)
    z = imp.emit_function(node, dilate_pad, (imp.value(node.inputs[0]), (strides[0], strides[1]), p))
    imp.emit_module(node, conv, z)


onnx_ops.CONVERTERS["ConvTranspose"] = _conv_transpose
