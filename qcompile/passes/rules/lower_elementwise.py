"""lower-integer rules for constant arithmetic and differences: ``IntRescale`` and ``IntSub``.

For an input of scale s_x and an output quantizer of scale s_y:
  MulConst(c), c > 0 (per sample broadcast):  acc = q_x,  M = s_x c / s_y (one multiplier per entry of c);
  AddConst(c):  acc = 2^k q_x + round(c 2^k / s_x),  M = s_x / (2^k s_y), with k = 8 (ADD_BITS in
                quant/integer_sim.py, which builds both ops for the lowering and the simulation): the
                constant is represented on a grid 2^k times finer than the input's (error <= s_x 2^-(k+1));
  a - b (one shared scale s, from share-scales):  acc = q_a - q_b,  M = s / s_y.
Not handled: subtraction of tensors on different scales (run share-scales first).
"""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING

from torch import nn

from qcompile.ir import intops as ops
from qcompile.ir.elementwise import AddConst, MulConst
from qcompile.ir.meta import IntType, get_info
from qcompile.ir.rewrite import input_node
from qcompile.passes.base import PreconditionError
from qcompile.quant.integer_sim import integer_op

if TYPE_CHECKING:
    import torch.fx as fx

    from qcompile.passes.lower_integer import Value, _Lowering


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
    op = integer_op(mod, x.itype, x.scale, out, s_y, bounds, lw.requant, len(shape))  # the simulation's too
    return lw.emit(point.name, op, (x.node,), out, s_y, point)


def lower_elementwise(lw: _Lowering, point: fx.Node, mod: nn.Module | None, out: IntType, s_y: float,
                      bounds: tuple[int, int]) -> Value | None:
    """The integer op of a constant-arithmetic or subtraction quantization point; None for other points."""
    if point.op == "call_function" and point.target is operator.sub:
        return _lower_sub(lw, point, out, s_y, bounds)
    if isinstance(mod, (AddConst, MulConst)):
        return _lower_constant(lw, point, mod, out, s_y, bounds)
    return None
