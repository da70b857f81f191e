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


def test_shift_add_layers_count_additions_not_multiplications() -> None:
    pipeline = ("canonicalize,fold-batchnorm,insert-quantizers{scheme=apot,weights=6},calibrate,share-scales,"
                "lower-integer")
    cm = compile_model(make_model("residual"), pipeline=pipeline)
    layers = cm.layer_costs()
    assert layers[0].terms == layers[-1].terms == 0 and layers[0].multiplies == layers[0].macs
    middle = layers[1:-1]
    assert middle and all(c.terms == 3 and c.w_bits == 6 for c in middle)  # 5 magnitude bits: 3 terms
    assert all(c.multiplies == 0 and c.shift_adds == 3 * c.macs and c.bops == c.macs * 6 * c.a_bits for c in middle)
    totals = cost.totals(layers)
    assert totals["multiplies"] == layers[0].macs + layers[-1].macs
    assert totals["shift_adds"] == sum(3 * c.macs for c in middle)
    assert totals["multiplier_free_percent"] == 100.0 * sum(c.macs for c in middle) / totals["macs"]
    assert cm.quant_graph is not None
    quant = [(c.w_bits, c.terms, c.macs) for c in cost.quant_layer_costs(cm.quant_graph)]
    assert quant == [(c.w_bits, c.terms, c.macs) for c in layers]
    assert cost.totals([])["multiplier_free_percent"] == 0.0


class _FoldedRows(torch.nn.Module):
    """A conv, its 4x4 positions folded into the batch ([N, 8, 4, 4] -> [4 N, 4, 8]), a Linear per position,
    unfolded again: the Linear's per-sample MACs are 16 positions x 8 x 8 whatever axis 0 holds."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(128, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x)).permute(0, 2, 3, 1).reshape(-1, 4, 8)
        return self.head(torch.relu(self.fc(y)).reshape(-1, 128))


def test_a_batch_folded_axis_counts_every_row_of_a_sample() -> None:
    torch.manual_seed(0)
    cm = compile_model(_FoldedRows().eval(), shape=(1, 4, 4))
    layers = {c.name: c for c in cm.layer_costs()}
    assert layers["fc"].macs == 16 * 8 * 8 and layers["fc"].in_elems == 128
    assert layers["head"].macs == 128 * 3 and layers["conv"].macs == 16 * 8 * 9
    x = torch.randn(3, 1, 4, 4)
    assert torch.equal(cm(x), cm.reference(x))  # the fold is exact at another batch
