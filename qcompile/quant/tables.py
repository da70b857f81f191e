"""Pointwise functions as exact lookup tables: the float/quant form and the table the lowering builds.

A pointwise function f (SiLU, sigmoid, hardswish, ...) on a quantized input with b <= 8 bits takes at most
2^b distinct inputs, so the integer graph computes it as a table of 2^b integers,

    T[q] = clamp(round(f(s_x * q) / s_y), lo, hi)       for q in [type.lo, type.hi],

built at lowering from the input quantizer's scale s_x, the output quantizer's scale s_y and the clamp
bounds folded into the output (``build_table``). The integer graph indexes it (``IntLookup``); the ONNX
export is one ``Gather`` on the uint8 container, the same on both targets: exact by construction.

Simulation = integer graph: in the float and quant stages the function is a ``TableFunction`` module that
computes f in float64 on its (fake-quantized, float32) input and returns float32; the output quantizer
then rounds y / s_y. ``build_table`` runs exactly those operations on the 2^b grid values s_x * q (float32
multiply, float64 f, float32 division, round half even), so a table entry is what the simulation computes
for that input, up to torch evaluating f in float64 differently for a lone element than inside a larger
tensor (never observed; the tests compare both on every entry).

The registry maps a function (``F.silu``, ``torch.sigmoid``, ``F.gelu`` with either ``approximate``...)
or an nn.Module type (``nn.SiLU``...) to the way f is computed; ``register_table_function`` adds a user's
own. A function that is not finite somewhere on the input range [s_x * lo, s_x * hi] is refused at
lowering, naming the node.

A per-channel function (``nn.PReLU`` with one slope per channel) gets one row per channel, T[c, q], built
by evaluating f on a [1, C, 2^b] grid; the export gathers at c * 256 + (q + zp).

Deliberately not done: inputs wider than 8 bits. A 16-bit input would need a 65,536-entry table per node
(128 KiB as int16, and a Gather whose index no longer fits the uint8 container, so the export would need
a 16-bit container for every neighbouring tensor), or a piecewise approximation (segments of a polynomial
in integer arithmetic) that is no longer exact by construction and needs its own error bound. Searches
and policies cap a table's input at 8 bits instead (``cap_table_inputs``).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qcompile.ir.meta import IntType

MAX_TABLE_BITS = 8
FloatFn = Callable[[torch.Tensor], torch.Tensor]


class TableFunction(nn.Module):
    """f applied pointwise, computed in float64 and returned in the input's dtype; lowered to a table."""

    def __init__(self, name: str, fn: FloatFn, key: Any = None, channels: int = 0) -> None:
        super().__init__()
        self.label = name
        self.fn = fn  # a plain function (or partial), or an nn.Module (then a submodule)
        self.key = key  # the registered function or module type it came from
        self.channels = channels  # > 0: f depends on the channel (dim 1), one table row per channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x.double()).to(x.dtype)

    def extra_repr(self) -> str:
        return self.label


@dataclass(frozen=True)
class _Entry:
    """How to build f from a call: ``make(target_or_module, args after the input, kwargs)``."""

    make: Callable[[Any, tuple[Any, ...], dict[str, Any]], FloatFn]


def _call_function(fn: Callable[..., torch.Tensor] | None) -> _Entry:
    def make(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> FloatFn:
        return functools.partial(fn or target, *args, **kwargs)

    return _Entry(make)


def _call_module(fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None) -> _Entry:
    def make(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> FloatFn:
        inner = copy.deepcopy(module).double()
        return inner if fn is None else functools.partial(fn, inner)

    return _Entry(make)


FUNCTIONS: dict[Any, _Entry] = {}
MODULES: dict[type, _Entry] = {}
# x.sigmoid() and friends: the method name -> the function it calls
METHODS: dict[str, Any] = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "sigmoid_": torch.sigmoid,
                           "tanh_": torch.tanh}


def register_table_function(target: Any, fn: Callable[..., torch.Tensor] | None = None) -> None:
    """Lower every call of ``target`` (a function, or an nn.Module type) to an exact lookup table.

    ``fn`` computes f on float64 tensors. For a function target it is called as the original,
    ``fn(x, *other_args, **kwargs)`` with the call's other (constant) arguments; by default it is
    ``target`` itself. For a module type it is called as ``fn(module, x)`` with a float64 copy of the
    module; by default ``module(x)``. The function must be pointwise; the lowering refuses it where it is
    not finite on the input's range.
    """
    if isinstance(target, type):
        if not issubclass(target, nn.Module):
            raise TypeError(f"{target.__name__} is not an nn.Module type; register a function or a module type")
        MODULES[target] = _call_module(fn)
    elif callable(target):
        FUNCTIONS[target] = _call_function(fn)
    else:
        raise TypeError(f"{target!r} is neither a function nor an nn.Module type")


def hard_sigmoid(x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """ONNX HardSigmoid: clamp(alpha x + beta, 0, 1) (F.hardsigmoid is alpha = 1/6, beta = 1/2)."""
    return torch.clamp(alpha * x + beta, 0.0, 1.0)


def _builtins() -> None:
    for f in (hard_sigmoid, F.silu, F.hardswish, F.hardsigmoid, F.gelu, F.leaky_relu, F.elu, F.sigmoid, F.tanh,
              torch.sigmoid, torch.tanh, torch.special.expit):
        register_table_function(f)
    for m in (nn.SiLU, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.GELU, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.PReLU):
        register_table_function(m)


_builtins()


def label_of(target: Any, kwargs: dict[str, Any]) -> str:
    name = getattr(target, "__name__", type(target).__name__)
    extra = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    return f"{name}({extra})" if extra else name


def table_function(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> TableFunction | None:
    """The TableFunction of a call of ``target`` (a function or a module instance); None if not registered."""
    kwargs = {k: v for k, v in kwargs.items() if k != "inplace"}
    if isinstance(target, nn.Module):
        entry = next((e for t, e in MODULES.items() if type(target) is t), None)
        channels = target.num_parameters if isinstance(target, nn.PReLU) and target.num_parameters > 1 else 0
        return None if entry is None else TableFunction(repr(target), entry.make(target, (), {}), type(target),
                                                        channels)
    entry = FUNCTIONS.get(target)
    if entry is None:
        return None
    return TableFunction(label_of(target, kwargs), entry.make(target, args, kwargs), target)


SIGMOIDS = (torch.sigmoid, F.sigmoid, torch.special.expit, nn.Sigmoid)
# functions with a short negative side bounded below (SiLU >= -0.279, hardswish >= -0.375, GELU >= -0.17,
# ELU >= -alpha): their output quantizer may take a skewed range (insert-quantizers). Not LeakyReLU/PReLU,
# unbounded below, where the calibrated minimum says nothing about unseen inputs.
BOUNDED_BELOW = (F.silu, nn.SiLU, F.hardswish, nn.Hardswish, F.gelu, nn.GELU, F.elu, nn.ELU)


def silu() -> TableFunction:
    """The table of x * sigmoid(x) (canonicalize fuses that product into it)."""
    return TableFunction("silu", F.silu, F.silu)


class TableError(ValueError):
    """A table that cannot be built (f not finite on the input range, input too wide)."""


def build_table(fn: nn.Module, inp: IntType, s_x: float, out: IntType, s_y: float, lo: int,
                hi: int) -> torch.Tensor:
    """T[q - inp.lo] = clamp(round(f(s_x * q) / s_y), lo, hi) for q in [inp.lo, inp.hi], int64 ([C, 2^b]
    for a per-channel function such as PReLU with C slopes).

    The same float operations as the quant graph in eval mode (see the module docstring).
    """
    if inp.bits > MAX_TABLE_BITS:
        raise TableError(f"its input has {inp.bits} bits; a table takes at most {MAX_TABLE_BITS}: give the "
                         f"input quantizer at most {MAX_TABLE_BITS} bits")
    q = torch.arange(inp.lo, inp.hi + 1, dtype=torch.float32)
    channels = getattr(fn, "channels", 0)
    grid = q.expand(1, channels, -1) if channels else q  # per channel: [1, C, 2^b], f sees channels on dim 1
    with torch.no_grad():
        y = fn(grid * torch.tensor(s_x, dtype=torch.float32))
        y = y[0] if channels else y
        q = q.expand_as(y)
    bad = ~torch.isfinite(y)
    if bool(bad.any()):
        x = float(q[bad][0]) * s_x
        raise TableError(f"f is not finite at x = {x:g} inside the input range [{inp.lo * s_x:g}, {inp.hi * s_x:g}]: "
                         "clamp the input away from the singularity before the call")
    v = (y.float() / torch.tensor(s_y, dtype=torch.float32)).clamp(out.lo, out.hi)
    return torch.round(v).clamp(lo, hi).to(torch.int64)


def cap_table_inputs(gm: Any) -> None:
    """Lower the activation quantizers that feed a table, a softmax (its exp table) or either operand of a
    product of two activations (MatMul: K 2^7 2^8 stays inside int32 for K < 2^16, where 16-bit operands
    would overflow at K = 2) to at most 8 bits (searches and policies call it)."""
    from torch import nn

    from qcompile.ir.attention import MatMul
    from qcompile.ir.rewrite import input_node
    from qcompile.quant import graph

    for node in gm.graph.nodes:
        mod = graph.module(gm, node)
        operands = (0, 1) if isinstance(mod, MatMul) else (0,) if isinstance(mod, (TableFunction, nn.Softmax)) else ()
        for i in operands:
            for root in graph.roots(gm, input_node(node, i)):
                q = graph.act_quant(gm, root)
                q.bits = min(q.bits, MAX_TABLE_BITS)
