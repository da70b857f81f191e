"""Per-stage verifiers: which ops each stage allows and which facts must be present.

The integer verifier also proves the absence of int32 overflow: for every convolution and linear op,
|acc| <= max_c (sum_k |w_ck| * max|q_x| + |b_c|), a bound from the input bit-width, the fan-in (through
the weights actually stored) and the bias, must not exceed 2^31 - 1. It refuses the graph otherwise.
APoT (shift-add) ops are covered by the same bound on their combined codes: all terms of a weight share
its sign, so |k| = sum_p |T_p| 2^p and every partial sum of the shift-add evaluation (and each part of
the export's lo/hi split) is bounded by sum |k| * max|q_x|. Other ops with an accumulator state its bound
themselves (``accumulator_bound()``, e.g. IntAvgPoolTable: largest window * max|q_x|; ``bound`` of IntMul,
IntLayerNorm and IntMatMul: K * max|q_a| * max|q_b| for a product of two activations), checked the same way.
The bound is computed in exact integers (Python ints), and before it every stored constant is checked
against its contract range: weights inside their type, |q_b| <= 2^31 - 1, multipliers m in [1, 2^31),
shifts n in [MIN_SHIFT, MAX_SHIFT], boundary scales positive and finite. A constant that saturated when it
became an integer (round(1e30) -> INT64_MIN) is therefore refused, not taken at its wrapped absolute value.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable

import torch
import torch.fx as fx
from torch import nn

from qcompile.ir import intops
from qcompile.ir.attention import ConstCat, MatMul
from qcompile.ir.contract import INT32_MAX, MAX_SHIFT, MIN_SHIFT
from qcompile.ir.elementwise import CONSTANT_MODULES
from qcompile.ir.meta import Stage, get_info, get_stage
from qcompile.ir.movement import MOVEMENT_FUNCTIONS
from qcompile.quant.bayesian_bits import BayesianBitsActQuant
from qcompile.quant.layernorm import ChannelLayerNorm
from qcompile.quant.modules import ActQuant, QConv2d, QLinear
from qcompile.quant.tables import TableFunction

FLOAT_FUNCTIONS = (torch.relu, torch.clamp, torch.flatten, torch.reshape, operator.add, torch.cat, operator.mul,
                   *MOVEMENT_FUNCTIONS, operator.sub)
POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Upsample)  # Upsample: bilinear only
POINTWISE_MODULES = (TableFunction, nn.LayerNorm, ChannelLayerNorm, nn.Softmax, MatMul)  # lowered to pointwise ops
FLOAT_MODULES = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, *POOL_MODULES, *POINTWISE_MODULES,
                 *CONSTANT_MODULES, ConstCat)
QUANT_MODULES = (QConv2d, QLinear, ActQuant, BayesianBitsActQuant, *POOL_MODULES, *POINTWISE_MODULES,
                 *CONSTANT_MODULES, ConstCat)


class VerificationError(Exception):
    """The IR breaks its stage's rules; ``problems`` lists each one."""

    def __init__(self, stage: Stage, problems: list[str]) -> None:
        self.stage, self.problems = stage, problems
        shown = "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
        super().__init__(f"{stage.value} IR invalid: {shown}")


def _check_ops(gm: fx.GraphModule, modules: tuple[type, ...], functions: tuple[object, ...]) -> list[str]:
    problems = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if type(mod) not in modules:
                problems.append(f"{node.name}: module {type(mod).__name__} not allowed")
        elif node.op == "call_function" and node.target not in functions:
            problems.append(f"{node.name}: function {getattr(node.target, '__name__', node.target)} not allowed")
        elif node.op in ("call_method", "get_attr"):
            problems.append(f"{node.name}: {node.op} {node.target} not allowed")
    return problems


def _verify_traced(gm: fx.GraphModule) -> list[str]:
    return []


def _verify_float(gm: fx.GraphModule) -> list[str]:
    return _check_ops(gm, FLOAT_MODULES, FLOAT_FUNCTIONS)


def _verify_quant(gm: fx.GraphModule) -> list[str]:
    problems = _check_ops(gm, QUANT_MODULES, FLOAT_FUNCTIONS)
    for node in gm.graph.find_nodes(op="placeholder"):
        if not any(isinstance(gm.get_submodule(u.target), ActQuant) for u in node.users if u.op == "call_module"):
            problems.append(f"{node.name}: graph input without an input quantizer")
    return problems


def _verify_integer(gm: fx.GraphModule) -> list[str]:
    problems = _check_ops(gm, intops.INTEGER_MODULES, intops.INTEGER_FUNCTIONS)
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        info = get_info(node)
        if info.itype is None or info.scale is None:
            problems.append(f"{node.name}: integer value without itype/scale")
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(mod, nn.Module):
            problems.extend(constant_problems(node.name, mod))
        if isinstance(mod, (intops.IntConv2d, intops.IntLinear)):
            problems.extend(_overflow_problems(node.name, mod))
        elif isinstance(mod, (intops.IntMul, intops.IntLayerNorm, intops.IntMatMul)) and mod.bound > INT32_MAX:
            problems.append(f"{node.name}: int32 accumulator may overflow (|acc| <= {mod.bound} > 2^31-1 with "
                            f"{mod.inp} inputs); lower the bit-widths of its inputs")
        elif callable(bound := getattr(mod, "accumulator_bound", None)) and int(bound()) > INT32_MAX:
            problems.append(f"{node.name}: int32 accumulator may overflow (|acc| <= {int(bound())} > 2^31-1); "
                            "lower the bit-width of its input")
    return problems


def _out_of(values: torch.Tensor, lo: int, hi: int) -> list[int]:
    """The values outside [lo, hi], compared exactly (at most three shown): integer tensors in int64 (one
    vectorised comparison; a weight tensor has up to 10^8 entries), others as Python ints."""
    flat = values.reshape(-1)
    if not flat.is_floating_point() and not flat.is_complex():
        wide = flat.to(torch.int64)
        return [int(v) for v in wide[(wide < lo) | (wide > hi)][:3].tolist()]
    return [v for v in (int(x) for x in flat.tolist()) if not lo <= v <= hi][:3]


def _requant_problems(name: str, mult: torch.Tensor, shift: torch.Tensor) -> list[str]:
    problems = []
    if bad := _out_of(mult, 1, 2**31 - 1):
        problems.append(f"{name}: requantization multiplier(s) {bad} outside [1, 2^31)")
    if bad := _out_of(shift, MIN_SHIFT, MAX_SHIFT):
        problems.append(f"{name}: requantization shift(s) {bad} outside [{MIN_SHIFT}, {MAX_SHIFT}]")
    return problems


def constant_problems(name: str, op: nn.Module) -> list[str]:
    """Every stored constant inside its contract range: weights in their type, |bias| <= 2^31-1, m, n, scales."""
    problems = []
    if isinstance(op, (intops.Quantize, intops.Dequantize)) and not (math.isfinite(op.scale) and op.scale > 0):
        problems.append(f"{name}: scale {op.scale!r} is not a positive finite number")
    mult, shift = getattr(op, "mult", None), getattr(op, "shift", None)
    if isinstance(mult, torch.Tensor) and isinstance(shift, torch.Tensor):
        problems.extend(_requant_problems(name, mult, shift))
    if isinstance(op, (intops.IntConv2d, intops.IntLinear)):
        if bad := _out_of(op.weight, op.w_type.lo, op.w_type.hi):
            problems.append(f"{name}: weight(s) {bad} outside {op.w_type} [{op.w_type.lo}, {op.w_type.hi}]")
        if bad := _out_of(op.bias, -INT32_MAX, INT32_MAX):
            problems.append(f"{name}: bias value(s) {bad} outside int32")
        if op.bias.numel() != op.weight.shape[0]:
            problems.append(f"{name}: {op.bias.numel()} bias values for {op.weight.shape[0]} output channels")
    return problems


def _overflow_problems(name: str, op: intops.IntConv2d | intops.IntLinear) -> list[str]:
    from qcompile.backends.fast import accumulator_bound

    bound = accumulator_bound(op)
    if bound <= INT32_MAX:
        return []
    return [
        f"{name}: int32 accumulator may overflow (|acc| <= {bound} > 2^31-1 with {op.inp} inputs and "
        f"{op.w_type} weights); lower the bit-widths of this layer or its input"
    ]


VERIFIERS: dict[Stage, Callable[[fx.GraphModule], list[str]]] = {
    Stage.TRACED: _verify_traced,
    Stage.FLOAT: _verify_float,
    Stage.QUANT: _verify_quant,
    Stage.INTEGER: _verify_integer,
}


def verify(gm: fx.GraphModule) -> None:
    """Lint the graph and run its stage's verifier; raise VerificationError listing every problem."""
    gm.graph.lint()
    stage = get_stage(gm)
    problems = VERIFIERS[stage](gm)
    if problems:
        raise VerificationError(stage, problems)
