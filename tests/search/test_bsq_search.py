"""The BSQ search: bits go down as alpha grows, the result lowers bit-exactly, bad options are refused."""

from __future__ import annotations

import pytest
import torch

import qcompile
from qcompile.passes import parse_pipeline
from qcompile.passes.base import PreconditionError

PIPELINE = "canonicalize,fold-batchnorm,insert-quantizers,calibrate,bsq{{{}}},share-scales,lower-integer"



@pytest.mark.parametrize("start", ["float", "bsq"])
def test_bits_go_down_as_alpha_grows_and_the_graph_stays_bit_exact(trained_demonet: tuple, start: str) -> None:
    model, data = trained_demonet
    bits = {}
    for alpha in (0.0, 2.0):
        options = f"alpha={alpha},epochs=3,finetune_epochs=1,finetune_from={start}"
        cm = qcompile.compile(model, data.x_train[:1], data=data, pipeline=PIPELINE.format(options))
        bits[alpha] = [c.w_bits for c in cm.layer_costs()]
        assert cm.verify(data.x_test[:128]).mismatches == 0
        assert all(2 <= b <= 8 for b in bits[alpha])
    assert bits[0.0] == [8] * len(bits[0.0])  # no pressure: every layer keeps its 7 magnitude bits + sign
    assert sum(bits[2.0]) < sum(bits[0.0])


@pytest.mark.parametrize(("options", "message"), [
    ("alpha=-0.1", "alpha must be >= 0"),
    ("epochs=0", "must be positive"),
    ("start_bits=8", r"start_bits must lie in 1\.\.7"),
    ("finetune_from=scratch", "finetune_from must be one of float, bsq"),
    ("finetune_grid=row", "finetune_grid must be one of layer, channel"),
])
def test_bad_options_are_refused(options: str, message: str) -> None:
    with pytest.raises(PreconditionError, match=message):
        parse_pipeline(f"bsq{{{options}}}").build()


@pytest.mark.parametrize("grid", ["channel", "layer"])
@pytest.mark.parametrize("bits", [1, 2, 4, 7])
def test_freezing_the_precision_keeps_the_weights_bsq_found(bits: int, grid: str) -> None:
    """The fine-tune's quantizer reproduces BSQ's values exactly (a per-channel max|W| grid would not)."""
    from qcompile.quant.bsq import BitPlaneWeight
    from qcompile.quant.modules import QLinear
    from qcompile.search.bsq import _freeze_precision

    torch.manual_seed(bits)
    layer = QLinear.from_float(torch.nn.Linear(16, 6))
    planes = BitPlaneWeight(layer.weight.detach() * torch.linspace(0.2, 1.0, 6)[:, None], bits=bits)
    found = planes().detach().clone()
    assert _freeze_precision([layer], [planes], grid) == [bits + 1]
    assert layer.weight_quant.x_max.numel() == (6 if grid == "channel" else 1)
    with torch.no_grad():
        assert torch.allclose(layer.weight_quant(layer.weight), found, rtol=0, atol=1e-7)
        q = torch.round(found / layer.weight_quant.scale(layer.weight)[:, None])
        assert int(q.abs().max()) <= 2**bits - 1  # the codes fit the signed (bits + 1)-bit narrow type


def test_restarting_from_float_keeps_only_the_precision() -> None:
    """finetune_from=float: the float weight and the per-channel max|W| quantizer come back at BSQ's width."""
    from qcompile.quant.bsq import BitPlaneWeight
    from qcompile.quant.modules import QLinear, WeightQuant
    from qcompile.search.bsq import _attach_planes, _restart_from_float

    torch.manual_seed(0)
    layer = QLinear.from_float(torch.nn.Linear(16, 6))
    weight, quant = layer.weight.detach().clone(), layer.weight_quant
    (planes,) = _attach_planes([layer], 4)
    assert isinstance(planes, BitPlaneWeight) and not layer.weight.requires_grad
    with torch.no_grad():
        planes.pos[0].zero_()
        planes.neg[0].zero_()  # an empty MSB plane: the precision drops from 4 to 3 magnitude bits
    planes.requantize_()  # as the search does before it restarts
    assert _restart_from_float([layer], [planes], [(weight, quant)]) == [4]
    assert layer.weight_quant is quant and isinstance(quant, WeightQuant)
    assert torch.equal(layer.weight.detach(), weight) and layer.weight.requires_grad
