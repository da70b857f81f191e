"""Simulation = integer graph for LayerNorm, softmax and constant arithmetic (quant/integer_sim.py).

Each model ends in the op under test, so the simulated output is that op's integers times the output scale;
with float LayerNorm / softmax / x + c in the simulation (the hooks removed) the same check misses by
whole output steps, so it can fail. Random inputs, both targets, every op of each kind.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compile_model, random_inputs
from modern import pipeline
from torch import nn

import qcompile
from qcompile.backends import reference
from qcompile.ir.contract import Target
from qcompile.ir.elementwise import AddConst, MulConst
from qcompile.ir.meta import get_info
from qcompile.quant.integer_sim import IntegerSimulation, integer_op, requant_kwargs
from qcompile.quant.modules import ActQuant


class LayerNorms(nn.Module):
    """LayerNorm over W of NCHW (functional, learned affine), then over the flattened features (the output).

    No conv or linear before them: a float layer's output can land on a rounding near-tie that the float32
    summation order (the CPU's vector width) decides, so the hooked op's input would differ by a step for
    reasons that are not the op's (tests/quant/test_bias_grid.py covers layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.w, self.b = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.randn(8) * 0.2)
        self.ln = nn.LayerNorm(64, eps=1e-6)
        with torch.no_grad():
            self.ln.weight.normal_(1.0, 0.3)
            self.ln.bias.normal_(0.0, 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(torch.flatten(F.layer_norm(x, (8,), self.w, self.b), 1))


class Softmaxes(nn.Module):
    """softmax over H, then over W (the output); no float layer before them (see LayerNorms)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(F.softmax(x, dim=2), -1)


class Constants(nn.Module):
    """x + c (scalar), x * c, x + c[channel]: each after a ReLU, so none folds into the conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.c = nn.Parameter(torch.randn(4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        return torch.relu(y + 0.37) * 1.7 + self.c


# model, hooked ops, whether float ops in the simulation miss on these inputs (constants: only at rare
# near-ties on this model; test_float_constants_miss_where_the_hook_does_not shows one)
MODELS = {"layernorm": (LayerNorms, 2, True), "softmax": (Softmaxes, 2, True), "constants": (Constants, 3, False)}


def _steps(cm: qcompile.CompiledModel, x: torch.Tensor) -> float:
    """max |simulation - integer graph| in output steps."""
    assert cm.quant_graph is not None
    out = next(n for n in cm.integer_graph.graph.nodes if n.op == "output").args[0]
    with torch.no_grad():
        return float(((cm.quant_graph.eval()(x) - cm(x)).abs() / get_info(out).scale).max())


def _hooks(gm: torch.nn.Module) -> list[IntegerSimulation]:
    return [h for m in gm.modules() for h in m._forward_hooks.values() if isinstance(h, IntegerSimulation)]


@pytest.mark.parametrize("target", ["ort", "integer"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_simulation_is_the_integer_graph(name: str, target: str) -> None:
    make, hooked, float_misses = MODELS[name]
    torch.manual_seed(0)
    # max ranges: with the mse ones the float softmax happens to stay within 0.99999 of a step here
    cm = compile_model(make().eval(), pipeline=pipeline(target).replace("calibrate", "calibrate{method=max}"))
    assert cm.quant_graph is not None
    hooks = _hooks(cm.quant_graph)
    assert len(hooks) == hooked and all(h.target.value == target for h in hooks)
    for seed in (3, 4):
        assert _steps(cm, random_inputs(256, seed=seed)) == 0.0
    for m in cm.quant_graph.modules():  # float ops in the simulation: whole steps off
        for key in [k for k, h in m._forward_hooks.items() if isinstance(h, IntegerSimulation)]:
            del m._forward_hooks[key]
    assert (_steps(cm, random_inputs(256, seed=3)) >= 1.0) == float_misses


def _quantizer(amax: float, signed: bool) -> ActQuant:
    q = ActQuant(8)
    q.amax.fill_(amax)
    q.amin.fill_(-1.0 if signed else 0.0)
    q.batches.fill_(1)
    return q


@pytest.mark.parametrize("target", [Target.ORT, Target.INTEGER])
def test_float_constants_miss_where_the_hook_does_not(target: Target) -> None:
    """x + c and x * c on every 8-bit input, for 60 constants: the hook gives the integer op's values
    (reference kernel); float arithmetic then rounding misses a few near-ties (2 of 15,300 products here)."""
    src, out = _quantizer(3.0, True), _quantizer(4.0, True)
    q = torch.arange(-127, 128, dtype=torch.float32).view(1, 1, 1, -1)
    x = q * src.scale
    misses = 0
    for c in torch.linspace(0.013, 1.7, 60).tolist():
        for mod in (AddConst(c), MulConst(c)):
            hook = IntegerSimulation(src, out, [], target)
            with torch.no_grad():
                sim = out(hook(mod, (x,), mod(x)))
                op = integer_op(mod, src.itype, float(src.scale), out.itype, float(out.scale), (-127, 127),
                                lambda real: requant_kwargs(real, target), 4)
                want = reference._KERNELS[type(op)](op, q.numpy().astype(np.int64))
                assert np.array_equal(torch.round(sim / out.scale).numpy(), want)
                misses += int((out(mod(x)) != sim).sum())
    assert misses > 0


def test_training_sees_the_integer_values_and_float_gradients() -> None:
    torch.manual_seed(0)
    cm = compile_model(LayerNorms().eval(), pipeline=pipeline("ort"))
    assert cm.quant_graph is not None
    x = random_inputs(32, seed=5)
    with torch.no_grad():
        want = cm(x)
    gm = cm.quant_graph.train()
    out = gm(x)
    assert torch.equal(out.detach(), want)
    out.square().sum().backward()
    ln = next(m for m in gm.modules() if isinstance(m, nn.LayerNorm) and m.normalized_shape == (64,))
    assert ln.weight.grad is not None and float(ln.weight.grad.abs().sum()) > 0


def test_float_output_while_the_grids_are_not_fixed() -> None:
    torch.manual_seed(0)
    cm = compile_model(Softmaxes().eval(), pipeline=pipeline("ort"))
    assert cm.quant_graph is not None
    hook = _hooks(cm.quant_graph)[0]
    hook.source.observing = True  # an observing quantizer passes floats through: the hook keeps float softmax
    x = torch.randn(2, 4, 8, 8)
    sm = nn.Softmax(dim=1)
    with torch.no_grad():
        assert hook(sm, (x,), sm(x)) is None
        hook.source.observing = False
        assert hook(sm, (x,), sm(x)) is not None


class Shared(nn.Module):
    """One Softmax and one LayerNorm module, each called twice (on different scales)."""

    def __init__(self) -> None:
        super().__init__()
        self.sm, self.ln = nn.Softmax(dim=-1), nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.sm(self.ln(self.sm(x))))


def test_a_module_called_twice_gets_one_copy_per_call() -> None:
    torch.manual_seed(0)
    cm = compile_model(Shared().eval(), pipeline=pipeline("ort"))
    assert cm.quant_graph is not None
    assert len(_hooks(cm.quant_graph)) == 4  # canonicalize copied the second call of each
    assert _steps(cm, random_inputs(256, seed=3)) == 0.0
