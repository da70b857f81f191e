"""Cost models: every model per layer, and the totals the reports print."""

from __future__ import annotations

import math

import torch
from conftest import compile_model, make_model

from qcompile import cost


def test_every_cost_model_per_layer() -> None:
    cm = compile_model(make_model("residual"), policy="aqt")
    layers = cm.layer_costs()
    assert set(cost.COST_MODELS) == {"bops", "linear-bits", "weight-memory", "activation-memory"}
    stem = layers[0]
    assert stem.in_elems == 1 * 8 * 8 and stem.a_bits == 8  # the network input counts as 8-bit
    for c in layers:
        assert cost.cost_model("bops")(c) == c.macs * c.w_bits * c.a_bits
        assert cost.cost_model("linear-bits")(c) == c.macs * max(c.w_bits, c.a_bits)
        assert cost.cost_model("weight-memory")(c) == math.ceil(c.params * c.w_bits / 8)
        assert cost.cost_model("activation-memory")(c) == math.ceil(c.in_elems * c.a_bits / 8)
    totals = cost.totals(layers)
    assert totals["rel_bops_percent"] == 100.0 * totals["bops"] / (totals["macs"] * 1024)
    assert totals["float_weight_bytes"] == 4 * sum(c.params for c in layers)


def test_quant_stage_costs_match_the_integer_graph() -> None:
    cm = compile_model(make_model("concat"), policy="w4a8")
    assert cm.quant_graph is not None
    quant = [(c.w_bits, c.a_bits, c.macs, c.params, c.in_elems) for c in cost.quant_layer_costs(cm.quant_graph)]
    integer = [(c.w_bits, c.a_bits, c.macs, c.params, c.in_elems) for c in cm.layer_costs()]
    assert quant == integer
    assert torch.is_tensor(next(cm.quant_graph.parameters()))
