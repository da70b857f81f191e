"""share-scales: the quantizers meeting at an add or a concatenation end up with one scale and type."""

from __future__ import annotations

import operator
from typing import Any

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from conftest import context, make_model, run_pipeline
from torch import nn

from qcompile.passes import PassError
from qcompile.passes.share_scales import ShareScales
from qcompile.quant.modules import ActQuant

CALIBRATED = "canonicalize,fold-batchnorm,insert-quantizers,calibrate"


def act_quant(gm: fx.GraphModule, node: fx.Node) -> ActQuant | None:
    if node.op != "call_module":
        return None
    mod = gm.get_submodule(str(node.target))
    return mod if isinstance(mod, ActQuant) else None


def defining_quant(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The quantizer nodes whose scale ``node`` carries (through max pool / flatten / cat)."""
    if act_quant(gm, node) is not None:
        return [node]
    if node.target is torch.cat:
        return [q for a in node.args[0] for q in defining_quant(gm, a)]
    return defining_quant(gm, node.args[0])


def meeting_groups(gm: fx.GraphModule) -> list[list[fx.Node]]:
    return [
        [q for a in (n.args[0] if n.target is torch.cat else n.args) for q in defining_quant(gm, a)]
        for n in gm.graph.nodes if n.op == "call_function" and n.target in (operator.add, torch.cat)
    ]


def share(model: nn.Module) -> tuple[fx.GraphModule, dict[str, tuple[float, bool, int]]]:
    ctx = context()
    gm = run_pipeline(model, CALIBRATED, ctx)
    before = {n.name: (float(q.amax), q.signed, q.bits) for n in gm.graph.nodes if (q := act_quant(gm, n))}
    result = ShareScales()(gm, ctx)
    assert result.modified == bool(meeting_groups(gm))
    return result.gm, before


@pytest.mark.parametrize("name", ["residual", "concat"])
def test_inputs_of_add_and_cat_share_one_scale(name: str) -> None:
    gm, before = share(make_model(name))
    groups = meeting_groups(gm)
    assert groups
    for group in groups:
        quants = [act_quant(gm, n) for n in group]
        assert len({float(q.scale) for q in quants}) == 1
        assert len({q.itype for q in quants}) == 1
        assert float(quants[0].amax) == pytest.approx(max(before[n.name][0] for n in group))


class Mixed(nn.Module):
    """cat(relu(a), b) + c: one group of three quantizers, one of them signed, with different bits."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 2, 3, padding=1)
        self.b = nn.Conv2d(1, 2, 3, padding=1)
        self.c = nn.Conv2d(1, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1) + self.c(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def test_groups_are_transitive_and_unify_sign_and_bits() -> None:
    ctx = context()
    gm = run_pipeline(Mixed().eval(), CALIBRATED, ctx)
    (add,) = [n for n in gm.graph.nodes if n.target is operator.add]
    members = [q for a in add.args for q in defining_quant(gm, a)]
    assert len(members) == 3
    mods = [act_quant(gm, n) for n in members]
    mods[1].bits = 5  # one member asks for fewer bits, another is signed
    assert [m.signed for m in mods] == [False, False, True]
    amax = max(float(m.amax) for m in mods)
    ShareScales()(gm, ctx)
    assert {(m.bits, m.signed) for m in mods} == {(8, True)}
    assert {float(m.amax) for m in mods} == {amax}


class Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        self.values[n] = out = super().run_node(n)
        return out


@pytest.mark.parametrize("name", ["residual", "concat"])
def test_simulated_add_and_cat_inputs_lie_on_one_grid(name: str) -> None:
    gm, _ = share(make_model(name))
    rec = Recorder(gm.eval())
    with torch.no_grad():
        rec.run(torch.randn(4, 1, 8, 8) * 2)
    for group, node in zip(meeting_groups(gm), [n for n in gm.graph.nodes if n.target in (operator.add, torch.cat)],
                           strict=True):
        scale = float(act_quant(gm, group[0]).scale)
        inputs = node.args[0] if node.target is torch.cat else node.args
        for a in inputs:
            codes = rec.values[a] / scale
            torch.testing.assert_close(codes, torch.round(codes), rtol=0, atol=1e-3)


def test_nothing_to_share_means_not_modified(mlp_model: nn.Module) -> None:
    gm, _ = share(mlp_model)
    assert not meeting_groups(gm)


def test_lowering_without_share_scales_is_refused() -> None:
    with pytest.raises(PassError, match="different scales; run share-scales first"):
        run_pipeline(make_model("residual"), CALIBRATED + ",assign-bitwidths,lower-integer")
