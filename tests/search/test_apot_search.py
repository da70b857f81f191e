"""The apot search: a tiny APoT compile on digits, per-layer tables, options, the pipeline it brings."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path

import onnx
import pytest
import torch

import qcompile
from qcompile.api import search_pipeline
from qcompile.frontends import trace_module
from qcompile.ir import intops as ops
from qcompile.models import DemoNet, train_float
from qcompile.passes import PassContext, PassManager, parse_pipeline
from qcompile.passes.base import PreconditionError
from qcompile.quant import graph
from qcompile.quant.apot import APoTWeightQuant

APOT = "canonicalize,fold-batchnorm,insert-quantizers{scheme=apot},calibrate,apot{bits=3,epochs=1},share-scales," \
       "lower-integer"
APOT_PTQ = "canonicalize,fold-batchnorm,insert-quantizers{scheme=apot,weights=3},calibrate,share-scales,lower-integer"


@cache
def float_model() -> torch.nn.Module:
    torch.manual_seed(0)
    data = qcompile.load_data("digits")
    assert data.y_train is not None
    return train_float(DemoNet(width=8), data.x_train, data.y_train, epochs=4)


def test_tiny_apot_compile_on_digits_exports_bit_exactly() -> None:
    data = qcompile.load_data("digits")
    cm = qcompile.compile(float_model(), data.x_train[:1], data=data, pipeline=APOT.replace("epochs=1", "epochs=3"))
    kinds = [type(m) for m in cm.integer_graph.modules() if isinstance(m, (ops.IntConv2d, ops.IntLinear))]
    assert kinds[0] is ops.IntConv2d and kinds[-1] is ops.IntLinear  # first and last: 8-bit uniform
    assert set(kinds[1:-1]) == {ops.IntShiftConv2d}
    model = cm.to_onnx()
    onnx.checker.check_model(model, full_check=True)
    report = cm.report(data, data.x_test)
    assert report["verify"]["mismatches"] == 0 and report["verify"]["compared"] == 10 * len(data.x_test)
    assert report["accuracy"]["integer"] == report["accuracy"]["onnx"] > 50.0  # 10 classes; float is 73 %
    untrained = qcompile.compile(float_model(), data.x_train[:1], data=data, pipeline=APOT_PTQ)
    assert report["accuracy"]["integer"] > untrained.accuracies(data)["integer"] + 3.0  # training helps (76 vs 71)
    assert abs(report["accuracy"]["simulated"] - report["accuracy"]["integer"]) < 2.0
    layers = report["layers"]
    assert [layer["w_bits"] for layer in layers] == [8, 3, 3, 3, 8]
    assert [layer["shift_adds"] > 0 for layer in layers] == [False, True, True, True, False]
    assert all(layer["multiplies"] == (0 if layer["terms"] else layer["macs"]) for layer in layers)
    t = report["totals"]
    assert t["shift_adds"] == sum(layer["macs"] for layer in layers[1:-1])  # 3-bit APoT: one term per weight
    assert t["multiplier_free_percent"] == pytest.approx(100.0 * t["shift_adds"] / t["macs"])


def test_alpha_is_learned() -> None:
    data = qcompile.load_data("digits")
    ctx = PassContext((data.x_train[:1],), data.calibration(), dataset=data)
    gm = PassManager(parse_pipeline(APOT.replace(",share-scales,lower-integer", "")).build()).run(
        trace_module(copy.deepcopy(float_model()), ctx.example_inputs), ctx)
    layers = [layer for _, layer in graph.layers(gm) if isinstance(layer.weight_quant, APoTWeightQuant)]
    assert len(layers) == 3
    for layer in layers:
        q = layer.weight_quant
        assert isinstance(q, APoTWeightQuant)
        fresh = APoTWeightQuant(3, layer.weight.detach())
        assert abs(float(q.alpha.detach()) - float(fresh.alpha.detach())) > 1e-3  # moved off the grid init


def test_a_table_sets_bits_per_layer(tmp_path: Path) -> None:
    data = qcompile.load_data("digits")
    table = tmp_path / "bits.json"
    table.write_text(json.dumps({"block1.0": {"w": 2, "a": 8}, "block2.0": {"w": 5, "a": 8},
                                 "default": {"w": 8, "a": 8}}))
    pipeline = APOT.replace("apot{bits=3,epochs=1}", f"apot{{policy={table},epochs=1}}")
    cm = qcompile.compile(float_model(), data.x_train[:1], data=data, pipeline=pipeline)
    bits = {c.name: (c.w_bits, c.terms) for c in cm.layer_costs()}
    assert bits == {"stem.0": (8, 0), "block1.0": (2, 1), "block2.0": (5, 2), "conv.0": (8, 0), "head": (8, 0)}
    assert cm.verify(data.x_test[:64]).mismatches == 0


@pytest.mark.parametrize(("options", "message"), [
    ("bits=1", "2..7 bits"), ("bits=9", "2..7 bits"), ("epochs=0", "epochs must be positive"),
    ("first_last=int4", "first_last must be one of"),
])
def test_bad_options_are_refused(options: str, message: str) -> None:
    with pytest.raises(PreconditionError, match=message):
        parse_pipeline(f"apot{{{options}}}").build()


def test_search_pipeline_inserts_apot_quantizers() -> None:
    text = search_pipeline("apot{bits=4}")
    assert "insert-quantizers{scheme=apot}" in text and "apot{bits=4}" in text
    assert "assign-bitwidths" not in text
