"""Simulation = integer graph for the ops whose integer form is not a float op followed by rounding.

LayerNorm (``IntLayerNorm``: integer mean, Newton square root, 16-bit gamma), softmax (``IntSoftmax``: a
20-bit exp table, an integer division) and constant arithmetic (``IntRescale``: the added constant on a
grid 2^8 finer than the input's, a dyadic or float32 multiplier) compute integers that float LayerNorm /
softmax followed by the output quantizer miss by an output step on about 1 % of the values (x + c, x * c:
at rounding near-ties, a few in 10^4; tests/quant/test_integer_sim.py). So in the quant graph each
such module gets a forward hook (``IntegerSimulation``) that, once its input quantizer (the scale root of
its input, scale s_x) and its output quantizer (s_y, with the clamps between them) have fixed grids,
replaces the module's output by the integer graph's: with the integer op built exactly as lower-integer
builds it (``integer_op``, from the same Python floats s_x, s_y and the same clamp bounds),
  q_x = round(x / s_x),  q_y = op(q_x)  (the fast executor's kernel),  y = q_y * s_y  (float32),
and the output quantizer rounds y / s_y back to q_y. In training the gradient is the float module's
(straight-through): y = f(x) + (q_y s_y - f(x)).detach().

The requantization depends on the target, known only at lowering: calibrate and the trainer bind with
``ort`` (the default), lower-integer binds again with its target, so the quant graph a CompiledModel keeps
simulates the integer graph it was lowered to. While a grid is not fixed (observing, uncalibrated, gated)
or the integer op cannot be built at the current scales (lowering would refuse them, naming the node) the
module's float output stays; so does that of a module called at several places (canonicalize gives each
LayerNorm / softmax call its own module; a custom pipeline might not).

Not handled: the products of two activations and tables (already exact: f then the output quantizer is
what the table stores), and convs, adds and pools (float arithmetic then rounding; they equal the integer
graph except at rounding ties, see tests/quant/test_bias_grid.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from qcompile.ir import contract
from qcompile.ir import intops as ops
from qcompile.ir.elementwise import AddConst, MulConst
from qcompile.ir.meta import IntType
from qcompile.ir.rewrite import input_node
from qcompile.quant import graph, layernorm, softmax
from qcompile.quant.modules import ActQuant

Requant = Callable[[Any], dict[str, Any]]
SIMULATED = (nn.LayerNorm, nn.Softmax, AddConst, MulConst)
ADD_BITS = 8  # AddConst's constant on a grid 2^ADD_BITS finer than its input's


def requant_kwargs(real: Any, target: contract.Target) -> dict[str, Any]:
    """Both forms of the multiplier(s) M, as lower-integer computes them (contract.py)."""
    mult, shift = contract.quantize_multipliers(real)
    return {"mult": mult, "shift": shift, "fmult": contract.float_multipliers(real), "target": target}


def _param_shape(value: torch.Tensor, rank: int) -> tuple[int, ...]:
    """The per-sample broadcast shape of ``value`` against a tensor of ``rank`` (batch included)."""
    return (1,) * (rank - 1 - value.dim()) + tuple(value.shape)


def _constant_op(mod: AddConst | MulConst, inp: IntType, s_x: float, out: IntType, s_y: float,
                 bounds: tuple[int, int], requant: Requant, rank: int) -> ops.IntRescale:
    c = mod.value.double()
    if isinstance(mod, MulConst):
        kwargs = {**requant((s_x * c / s_y).reshape(-1).numpy()), "gain": 1, "offset": [0]}
    else:
        gain = 1 << ADD_BITS
        offset = np.round(c.reshape(-1).numpy() * gain / s_x).astype(np.int64)
        kwargs = {**requant(s_x / (gain * s_y)), "gain": gain, "offset": offset}
    return ops.IntRescale(**kwargs, param_shape=_param_shape(c, rank), inp=inp, out=out, lo=bounds[0], hi=bounds[1])


def integer_op(mod: nn.Module, inp: IntType, s_x: float, out: IntType, s_y: float, bounds: tuple[int, int],
               requant: Requant, rank: int) -> ops.IntOp:
    """The integer op of a LayerNorm / softmax / constant-arithmetic module (lower-integer's and the
    simulation's). Raises ValueError (LayerNormPlanError, MultiplierError...) when the scales admit none."""
    if isinstance(mod, nn.LayerNorm):
        attrs = layernorm.plan(mod, inp, s_x, s_y)
        real_m = attrs.pop("real_m")
        axis = 1 if isinstance(mod, layernorm.ChannelLayerNorm) else rank - 1
        return ops.IntLayerNorm(**attrs, **requant(real_m), axis=axis, inp=inp, out=out, lo=bounds[0], hi=bounds[1])
    if isinstance(mod, nn.Softmax):
        assert isinstance(mod.dim, int), "canonicalize gives every softmax a dim"
        return ops.IntSoftmax(**softmax.plan(inp, s_x, s_y), axis=mod.dim % rank, inp=inp, out=out, lo=bounds[0],
                              hi=bounds[1])
    assert isinstance(mod, (AddConst, MulConst)), f"no integer simulation for {type(mod).__name__}"
    return _constant_op(mod, inp, s_x, out, s_y, bounds, requant, rank)


class IntegerSimulation:
    """Forward hook of a SIMULATED module: its output becomes the integer graph's (see the module docstring)."""

    def __init__(self, source: ActQuant, quant: ActQuant, limits: list[tuple[float | None, float | None]],
                 target: contract.Target) -> None:
        self.source, self.quant, self.limits, self.target = source, quant, limits, target

    def _op(self, mod: nn.Module, rank: int) -> ops.IntOp | None:
        s_x, s_y = float(self.source.scale), float(self.quant.scale)
        lo, hi = graph.clamp_bounds(self.limits, self.quant.itype, s_y)
        if lo > hi:
            return None
        try:
            return integer_op(mod, self.source.itype, s_x, self.quant.itype, s_y, (lo, hi),
                              lambda real: requant_kwargs(real, self.target), rank)
        except ValueError:  # scales lowering would refuse: keep the float output
            return None

    def __call__(self, mod: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        s_x, s_y = self.source.fixed_scale(), self.quant.fixed_scale()
        x = args[0]
        op = self._op(mod, x.dim()) if s_x is not None and s_y is not None else None
        if op is None or s_x is None or s_y is None:
            return None
        with torch.no_grad():
            q_y = op.to(x.device)(torch.round(x.detach() / s_x).float())
            y = (q_y * s_y).to(output.dtype)
        return output + (y - output).detach() if output.requires_grad else y


def bind_simulation(gm: fx.GraphModule, target: contract.Target = contract.Target.ORT) -> int:
    """Hook every LayerNorm / softmax / constant-arithmetic quantization point; returns how many."""
    bound = 0
    calls: dict[str, int] = {}
    for node in gm.graph.find_nodes(op="call_module"):
        calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    for qnode, q in graph.act_quants(gm):
        point, clamps = graph.chain_start(gm, qnode)
        mod = graph.module(gm, point)
        if not isinstance(mod, SIMULATED):
            continue
        for key in [k for k, hook in mod._forward_hooks.items() if isinstance(hook, IntegerSimulation)]:
            del mod._forward_hooks[key]
        found = graph.roots(gm, input_node(point))
        if found and calls[str(point.target)] == 1:  # a module called twice has two pairs of quantizers: float
            source = graph.act_quant(gm, found[0])
            mod.register_forward_hook(IntegerSimulation(source, q, graph.clamp_limits(clamps), target))
            bound += 1
    return bound
