"""lower-integer rules for constant arithmetic and differences: ``IntRescale`` and ``IntSub``.

For an input of scale s_x and an output quantizer of scale s_y:
  MulConst(c), c > 0 (per sample broadcast):  acc = q_x,  M = s_x c / s_y (one multiplier per entry of c);
  AddConst(c):  acc = 2^k q_x + round(c 2^k / s_x),  M = s_x / (2^k s_y), with k = ADD_BITS: the constant
                is represented on a grid 2^k times finer than the input's (error <= s_x 2^-(k+1));
  a - b (one shared scale s, from share-scales):  acc = q_a - q_b,  M = s / s_y.
Not handled: subtraction of tensors on different scales (run share-scales first).
"""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from qcompile.ir import intops as ops
from qcompile.ir.elementwise import AddConst, MulConst
from qcompile.ir.meta import IntType, get_info
from qcompile.ir.rewrite import input_node
from qcompile.passes.base import PreconditionError

if TYPE_CHECKING:
    import torch.fx as fx

    from qcompile.passes.lower_integer import Value, _Lowering

ADD_BITS = 8


def _param_shape(value: torch.Tensor, rank: int) -> tuple[int, ...]:
    """The per-sample broadcast shape of ``value`` against a tensor of ``rank`` (batch included)."""
    return (1,) * (rank - 1 - value.dim()) + tuple(value.shape)


def _lower_sub(lw: _Lowering, point: fx.Node, out: IntType, s_y: float, bounds: tuple[int, int]) -> Value:
    a, b = lw.value(input_node(point, 0)), lw.value(input_node(point, 1))
    if not math.isclose(a.scale, b.scale, rel_tol=1e-9):
        raise PreconditionError(f"inputs of sub '{point.name}' have different scales; run share-scales first")
    op = ops.IntSub(**lw.requant(a.scale / s_y), inp=(a.itype, b.itype), out=out, lo=bounds[0], hi=bounds[1])
    return lw.emit(point.name, op, (a.node, b.node), out, s_y, point)


def _lower_constant(lw: _Lowering, point: fx.Node, mod: AddConst | MulConst, out: IntType, s_y: float,
                    bounds: tuple[int, int]) -> Value:
    src = input_node(point)
    x, shape = lw.value(src), get_info(src).shape
    assert shape is not None, f"'{point.name}' has no recorded input shape"
    c = mod.value.double()
    params = _param_shape(c, len(shape))
    if isinstance(mod, MulConst):
        kwargs = {**lw.requant((x.scale * c / s_y).reshape(-1).numpy()), "gain": 1, "offset": [0]}
    else:
        gain = 1 << ADD_BITS
        offset = np.round(c.reshape(-1).numpy() * gain / x.scale).astype(np.int64)
        kwargs = {**lw.requant(x.scale / (gain * s_y)), "gain": gain, "offset": offset}
    op = ops.IntRescale(**kwargs, param_shape=params, inp=x.itype, out=out, lo=bounds[0], hi=bounds[1])
    return lw.emit(point.name, op, (x.node,), out, s_y, point)


def lower_elementwise(lw: _Lowering, point: fx.Node, mod: nn.Module | None, out: IntType, s_y: float,
                      bounds: tuple[int, int]) -> Value | None:
    """The integer op of a constant-arithmetic or subtraction quantization point; None for other points."""
    if point.op == "call_function" and point.target is operator.sub:
        return _lower_sub(lw, point, out, s_y, bounds)
    if isinstance(mod, (AddConst, MulConst)):
        return _lower_constant(lw, point, mod, out, s_y, bounds)
    return None
