"""ONNX export of IntLinear / IntShiftLinear on inputs of rank 3 or 4 (channels-last blocks), both targets.

A Linear over the last axis of [N, ..., K] is the same integers as a 1 x 1 convolution over channels:
``Transpose`` the last axis to axis 1 (and ``Unsqueeze`` a rank-3 input to 4-D), run the target's own
rank-2 lowering of the op (ConvInteger + chain, or QLinearConv) on [N, K, H, W] through its 1 x 1 conv form,
and move the axis back. The 2-D case is the targets' emitter unchanged. Not handled: rank 5 and above.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
import torch.fx as fx

from qcompile.backends import onnx_export, onnx_ort
from qcompile.ir import intops as ops
from qcompile.ir.meta import get_info
from qcompile.ir.rewrite import input_node


def _rank(node: fx.Node) -> int:
    shape = get_info(input_node(node)).shape
    return 2 if shape is None else len(shape)


def _as_conv(op: ops.IntLinear) -> ops.IntConv2d:
    """The 1 x 1 IntConv2d (IntShiftConv2d for APoT) computing the same integers as ``op`` over channels."""
    kwargs: dict[str, Any] = {"inp": op.inp, "w_type": op.w_type, "out": op.out, "lo": op.lo, "hi": op.hi,
                              "fmult": op.fmult, "target": op.target}
    if isinstance(op, ops.IntShiftLinear):
        return ops.IntShiftConv2d(op.term_sign[..., None, None], op.term_exp[..., None, None], op.bias, op.mult,
                                  op.shift, bits=op.bits, **kwargs)
    return ops.IntConv2d(op.weight[:, :, None, None], op.bias, op.mult, op.shift, **kwargs)


def _wrap(conv_emitter: Any, linear_emitter: Any) -> onnx_export.Emitter:
    def emit(e: onnx_export._Emitter, node: fx.Node, op: Any, args: list[Any]) -> gs.Variable:
        rank = _rank(node)
        if rank == 2:
            return linear_emitter(e, node, op, args)
        if rank not in (3, 4):
            raise onnx_export.ExportError(f"Linear '{node.name}' on a rank-{rank} input cannot be exported")
        name, x = node.name, args[0]
        x = e.op("Transpose", name, [x], np.uint8, perm=[0, rank - 1, *range(1, rank - 1)])
        axes = e.const(f"{name}_nd_axes", np.array([3], dtype=np.int64))
        if rank == 3:
            x = e.op("Unsqueeze", name, [x, axes], np.uint8)
        y = conv_emitter(e, node, _as_conv(op), [x])
        if rank == 3:
            y = e.op("Squeeze", name, [y, axes], np.uint8)
        return e.op("Transpose", name, [y], np.uint8, perm=[0, *range(2, rank), 1])

    return emit


for _table in (onnx_export.INTEGER_EMITTERS, onnx_ort.ORT_EMITTERS):
    for _linear, _conv in ((ops.IntLinear, ops.IntConv2d), (ops.IntShiftLinear, ops.IntShiftConv2d)):
        _table[_linear] = _wrap(_table[_conv], _table[_linear])
