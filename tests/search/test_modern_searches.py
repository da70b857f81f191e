"""Every search runs on a model with a squeeze-excitation block, tables and a LayerNorm, and lowers bit-exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from modern import SEARCHES, SqueezeExcitation, assert_exact, lookups
from torch import nn

import qcompile
from qcompile.api import search_pipeline
from qcompile.ir import intops as ops


class Modern(nn.Module):
    """conv, hardswish, SE (hardsigmoid gate), LayerNorm over the last dim, GELU, pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.se = nn.Conv2d(1, 8, 3, padding=1), SqueezeExcitation(8, 4)
        self.ln, self.fc = nn.LayerNorm(8), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.ln(self.se(F.hardswish(self.conv(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))



@pytest.mark.parametrize("spec", SEARCHES, ids=lambda s: s.split("{")[0])
def test_search_runs_on_tables_products_and_layernorm(spec: str, digits: qcompile.Dataset) -> None:
    torch.manual_seed(0)
    data = digits
    cm = qcompile.compile(Modern().eval(), data.x_train[:1], data=data, pipeline=search_pipeline(spec))
    mods = list(cm.integer_graph.modules())
    assert len(lookups(cm)) == 3 and all(t.inp.bits <= 8 for t in lookups(cm))
    assert sum(isinstance(m, ops.IntMul) for m in mods) == 1
    assert sum(isinstance(m, ops.IntLayerNorm) for m in mods) == 1
    assert_exact(cm, data.x_test[:64])
    report = cm.report(data)
    assert [c["op"] for c in report["pointwise"]] == ["Lookup", "Lookup", "Mul", "LayerNorm", "Lookup"]
    assert report["totals"]["lookups"] > 0 and report["totals"]["products"] > 0
