"""Every search runs on a small timm-style ViT: its Linear layers get bit-widths, the attention matmuls'
operands stay within 8 bits (their int32 bound), and the result lowers bit-exactly."""

from __future__ import annotations

import pytest
import torch
from modern import SEARCHES, assert_exact
from vit import TinyViT

import qcompile
from qcompile.api import search_pipeline
from qcompile.ir import intops as ops


@pytest.mark.parametrize("spec", SEARCHES, ids=lambda s: s.split("{")[0])
def test_search_runs_on_a_vit(spec: str, digits: qcompile.Dataset) -> None:
    torch.manual_seed(0)
    data = digits
    model = TinyViT(classes=10).eval()
    cm = qcompile.compile(model, data.x_train[:1], data=data, pipeline=search_pipeline(spec))
    mods = list(cm.integer_graph.modules())
    matmuls = [m for m in mods if isinstance(m, ops.IntMatMul)]
    assert len(matmuls) == 2 and all(t.bits <= 8 for m in matmuls for t in m.inp)
    assert all(m.bound <= 2**31 - 1 for m in matmuls)
    assert_exact(cm, data.x_test[:32])
    layers = cm.report(data)["layers"]
    assert len(layers) == 6  # patch embedding conv, qkv, proj, fc1, fc2, head
    if spec.startswith("aqt"):
        assert sorted({layer["w_bits"] for layer in layers}) == [4, 8]
