"""Skewed signed activation ranges (``IntType.neg``, ``ActQuant.negative_codes``, insert-quantizers' ``skew``):
the type's codes and container offset, the least n covering the calibrated minimum, which quantizers the
pipeline skews, share-scales keeping one type per group, and skewed blocks bit-exact on both targets with
simulation = integer graph."""

from __future__ import annotations

import math

import onnx
import pytest
import torch
import torch.nn.functional as F
from modern import assert_exact
from torch import nn

import qcompile
from qcompile.api import default_pipeline
from qcompile.ir import intops as ops
from qcompile.ir.meta import IntType
from qcompile.passes.share_scales import unify
from qcompile.quant import graph
from qcompile.quant.modules import ActQuant


def test_skewed_type_has_all_codes_and_its_offset_as_zero_point() -> None:
    t = IntType(8, True, 14)
    assert (t.lo, t.hi, t.zero_point, str(t)) == (-14, 241, 14, "i8[-14,241]")
    assert t.hi - t.lo + 1 == 256 and t.lo + t.zero_point == 0 and t.hi + t.zero_point == 255  # fills uint8
    assert (IntType(4, True, 3).lo, IntType(4, True, 3).hi) == (-3, 12)
    plain = IntType(8, True)
    assert (plain.lo, plain.hi, plain.zero_point, str(plain)) == (-127, 127, 128, "i8")


@pytest.mark.parametrize("bits, signed, neg", [(8, False, 5), (8, True, 0), (8, True, 127), (4, True, 7)])
def test_skewed_type_outside_its_range_is_refused(bits: int, signed: bool, neg: int) -> None:
    with pytest.raises(ValueError, match="skewed range"):
        IntType(bits, signed, neg)


def calibrated(x: torch.Tensor, skewed: bool = True, bits: int = 8) -> ActQuant:
    q = ActQuant(bits)
    q.skewed = skewed
    q.observe(x)
    return q


@pytest.mark.parametrize("low, high, bits", [(-0.2785, 5.0, 8), (-0.375, 2.0, 8), (-3.0, 5.0, 8), (-0.3, 4.0, 4),
                                             (-1e-4, 3.0, 8)])
def test_negative_codes_are_the_least_that_cover_the_minimum(low: float, high: float, bits: int) -> None:
    q = calibrated(torch.tensor([low, 0.0, high]), bits=bits)
    n = q.negative_codes()
    assert n is not None
    levels = 2**bits - 1
    assert n == max(1, math.ceil(levels * -low / (high - low)))  # independent of the code's form
    s = float(q.scale)
    assert q.itype == IntType(bits, True, n) and math.isclose(s, high / (levels - n), rel_tol=1e-6)
    assert n * s >= -low * (1 - 1e-6)  # the minimum is inside the grid
    assert n == 1 or (n - 1) * high / (levels - n + 1) < -low  # and one code fewer would not reach it


def test_symmetric_where_the_negative_side_is_not_short_or_not_asked_for() -> None:
    assert calibrated(torch.tensor([-4.9, 5.0])).negative_codes() is None  # n would reach 127
    assert calibrated(torch.tensor([-0.28, 5.0]), skewed=False).itype == IntType(8, True)
    assert calibrated(torch.tensor([0.0, 5.0])).itype == IntType(8, False)  # unsigned stays unsigned
    assert ActQuant(8).negative_codes() is None  # uncalibrated
    wide = calibrated(torch.tensor([-0.28, 5.0]), bits=12)
    assert wide.negative_codes() is None and wide.itype == IntType(12, True)  # tables and containers are 8-bit


def test_skew_lowers_the_quantization_error_of_silu_outputs() -> None:
    x = F.silu(torch.randn(20000, generator=torch.Generator().manual_seed(0)) * 3)
    err = {skew: float((calibrated(x, skew)(x) - x).pow(2).mean()) for skew in (False, True)}
    assert err[True] < 0.3 * err[False]  # about twice the levels on the positive side: ~1/4 the error


def test_share_scales_gives_skewed_members_one_type() -> None:
    a, b = calibrated(torch.tensor([-0.2, 3.0])), calibrated(torch.tensor([-0.5, 2.0]))
    unify([a, b])
    assert a.itype == b.itype and float(a.scale) == float(b.scale)
    assert a.itype.lo * float(a.scale) <= -0.5 * (1 - 1e-6)  # the wider negative side is covered
    c = calibrated(torch.tensor([-0.2, 3.0]), skewed=False)
    unify([a, c])
    assert a.itype == c.itype == IntType(8, True)  # one symmetric member keeps the group symmetric


class Block(nn.Module):
    """MBConv-like: SiLU, squeeze-excitation (SiLU, sigmoid gate), a residual add, hardswish, LeakyReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.se_a, self.se_b = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.project, self.leaky, self.fc = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(self.bn(self.stem(x)))
        z = F.silu(self.dw(y))
        z = z * torch.sigmoid(self.se_b(F.silu(self.se_a(F.adaptive_avg_pool2d(z, 1)))))
        z = F.hardswish(self.project(z) + y)
        z = F.leaky_relu(self.leaky(z), 0.1)
        return self.fc(F.adaptive_avg_pool2d(z, 1).flatten(1))


def compiled(target: str, skew: str | None = None) -> qcompile.CompiledModel:
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    text = default_pipeline(target=target)
    if skew is not None:
        text = text.replace("insert-quantizers", f"insert-quantizers{{skew={skew}}}")
    return qcompile.compile(model, x[:1], data=lambda: iter([x[:32], x[32:]]), pipeline=text)


def output_types(cm: qcompile.CompiledModel) -> dict[str, IntType]:
    """The type of each activation quantizer of the quant graph, named after the value it quantizes."""
    assert cm.quant_graph is not None
    return {str(n.args[0]): q.itype for n, q in graph.act_quants(cm.quant_graph)}


def test_pipeline_skews_bounded_tables_and_products_only() -> None:
    types = output_types(compiled("ort"))
    skewed = {name for name, t in types.items() if t.neg is not None}
    # the depthwise SiLU, the SE product and the hardswish; not the stem's SiLU (it meets the projection
    # conv at the residual add, which is not skewed), nor LeakyReLU (unbounded below), convs or adds
    assert {name.rstrip("_0123456789") for name in skewed} == {"silu", "mul", "hardswish"}
    assert all(name.startswith(("silu", "mul", "hardswish")) for name in skewed)
    stem = [name for name in types if name.startswith("silu")][0]
    assert types[stem] == IntType(8, True)
    assert all(t.neg is None for t in output_types(compiled("ort", "none")).values())
    everything = output_types(compiled("ort", "all"))
    assert sum(t.neg is not None for t in everything.values()) > len(skewed)


@pytest.mark.parametrize("target", ["ort", "integer"])
def test_skewed_block_is_exact_and_simulation_is_the_integer_graph(target: str) -> None:
    cm = compiled(target, "all")
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 1.5
    types = [m.out for m in cm.integer_graph.modules() if isinstance(m, ops.IntLookup)]
    assert any(t.neg is not None for t in types), "no table output took a skewed range"
    assert_exact(cm, x)
    assert cm.quant_graph is not None
    with torch.no_grad():
        assert torch.equal(cm.quant_graph(x), cm(x)), "simulation != integer graph"
    onnx.checker.check_model(cm.to_onnx(), full_check=True)
