"""The Python API leaves the user's model as it was."""

from __future__ import annotations

import copy

import torch

import qcompile
from qcompile.models import DemoNet


def test_compile_leaves_the_users_model_untouched() -> None:
    torch.manual_seed(0)
    model = DemoNet().train()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(256, 1, 8, 8) * 2
    cm = qcompile.compile(model, x[:1], data=lambda: [x], policy="w4a4")
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert cm.verify(x).mismatches == 0
