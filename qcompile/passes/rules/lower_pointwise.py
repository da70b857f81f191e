"""lower-integer's rules for pointwise ops: tables and products of two activations.

* A ``TableFunction`` f between the input quantizer (scale s_x, type t_x, b <= 8 bits) and its output
  quantizer (s_y, clamps folded into [lo, hi]) becomes ``IntLookup`` with
  T[q] = clamp(round(f(s_x q) / s_y), lo, hi) (``quant.tables.build_table``). Refused, naming the node,
  when t_x is wider than 8 bits or f is not finite on [s_x t_x.lo, s_x t_x.hi].
* ``operator.mul(a, b)`` becomes ``IntMul`` with M = s_a s_b / s_y on the int32 product q_a q_b.
* ``MatMul(alpha)(a, b)`` becomes ``IntMatMul`` with M = alpha s_a s_b / s_y on the int32 sum of
  K = a.shape[-1] products q_a q_b (the verifier proves K max|q_a| max|q_b| <= 2^31 - 1).
* ``nn.LayerNorm`` over the last dim (``ChannelLayerNorm``: over dim 1) becomes ``IntLayerNorm`` (integers
  chosen by ``quant.layernorm.plan``); ``nn.Softmax(dim)`` becomes ``IntSoftmax`` (``quant.softmax.plan``);
  both built by ``quant.integer_sim.integer_op``, which the simulation calls too.

Not handled here: products with a constant (a scale folds into the neighbouring requantization, not an
IntMul), tables on inputs wider than 8 bits (see ``quant/tables.py``).
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING

import torch.fx as fx
from torch import nn

from qcompile.ir import intops as ops
from qcompile.ir.attention import MatMul
from qcompile.ir.contract import MultiplierError
from qcompile.ir.meta import IntType, get_info
from qcompile.ir.rewrite import input_node
from qcompile.passes.base import PreconditionError
from qcompile.quant import layernorm, softmax
from qcompile.quant.integer_sim import integer_op
from qcompile.quant.tables import TableError, TableFunction, build_table

if TYPE_CHECKING:
    from qcompile.passes.lower_integer import Value, _Lowering


def _lower_table(lw: _Lowering, point: fx.Node, fn: TableFunction, out: IntType, s_y: float,
                 bounds: tuple[int, int]) -> Value:
    x = lw.value(input_node(point))
    try:
        table = build_table(fn, x.itype, x.scale, out, s_y, *bounds)
    except TableError as exc:
        where = get_info(point).source
        raise PreconditionError(f"table function '{point.name}' ({fn.label}{' at ' + where if where else ''}): "
                                f"{exc}") from None
    op = ops.IntLookup(table, inp=x.itype, out=out, lo=bounds[0], hi=bounds[1], label=fn.label)
    return lw.emit(point.name, op, (x.node,), out, s_y, point)


def _lower_mul(lw: _Lowering, point: fx.Node, out: IntType, s_y: float, bounds: tuple[int, int]) -> Value:
    a, b = lw.value(input_node(point, 0)), lw.value(input_node(point, 1))
    op = ops.IntMul(**lw.requant(a.scale * b.scale / s_y), inp=(a.itype, b.itype), out=out, lo=bounds[0],
                    hi=bounds[1])
    return lw.emit(point.name, op, (a.node, b.node), out, s_y, point)


def _lower_matmul(lw: _Lowering, point: fx.Node, mm: MatMul, out: IntType, s_y: float,
                  bounds: tuple[int, int]) -> Value:
    src = input_node(point, 0)
    a, b = lw.value(src), lw.value(input_node(point, 1))
    shape = get_info(src).shape
    assert shape is not None, f"'{src.name}' has no recorded shape"
    try:
        requant = lw.requant(mm.alpha * a.scale * b.scale / s_y)
    except PreconditionError as exc:
        raise PreconditionError(f"matmul '{point.name}': {exc}") from None
    op = ops.IntMatMul(**requant, inner=shape[-1], inp=(a.itype, b.itype), out=out, lo=bounds[0], hi=bounds[1])
    return lw.emit(point.name, op, (a.node, b.node), out, s_y, point)


def _lower_planned(lw: _Lowering, point: fx.Node, mod: nn.Module, out: IntType, s_y: float,
                   bounds: tuple[int, int]) -> Value:
    """LayerNorm and softmax: the op ``quant.integer_sim.integer_op`` builds (the simulation builds the same)."""
    x = lw.value(input_node(point))
    shape = get_info(point).shape
    assert shape is not None, f"'{point.name}' has no recorded shape"
    if isinstance(mod, nn.Softmax) and isinstance(mod.dim, int) and shape[mod.dim] >= softmax.MAX_AXIS:
        raise PreconditionError(f"softmax '{point.name}' over {shape[mod.dim]} elements "
                                f"(at most {softmax.MAX_AXIS - 1})")
    try:
        op = integer_op(mod, x.itype, x.scale, out, s_y, bounds, lw.requant, len(shape))
    except (layernorm.LayerNormPlanError, MultiplierError, ValueError) as exc:
        what = "LayerNorm" if isinstance(mod, nn.LayerNorm) else "softmax"
        raise PreconditionError(f"{what} '{point.name}': {exc}") from None
    return lw.emit(point.name, op, (x.node,), out, s_y, point)


def lower_point(lw: _Lowering, point: fx.Node, mod: nn.Module | None, out: IntType, s_y: float,
                bounds: tuple[int, int]) -> Value | None:
    """The lowering of a pointwise quantization point, or None when ``point`` is not one."""
    if isinstance(mod, TableFunction):
        return _lower_table(lw, point, mod, out, s_y, bounds)
    if point.op == "call_function" and point.target is operator.mul:
        return _lower_mul(lw, point, out, s_y, bounds)
    if isinstance(mod, MatMul):
        return _lower_matmul(lw, point, mod, out, s_y, bounds)
    if isinstance(mod, (nn.LayerNorm, nn.Softmax)):
        return _lower_planned(lw, point, mod, out, s_y, bounds)
    return None
