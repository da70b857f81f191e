"""calibrate: amax <- (1 - c) * amax + c * stat over the batches, stat = max|x| or a percentile of |x|; or
method=mse, the least expected-error clip of a histogram, re-derived when the bits change."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from conftest import compile_model, context, make_model, random_inputs, run_pipeline
from torch import nn

from qcompile.api import default_pipeline
from qcompile.ir.meta import IntType
from qcompile.passes import PassContext, PassError, parse_pipeline
from qcompile.passes.base import PreconditionError
from qcompile.passes.calibrate import Calibrate, CalibrationError
from qcompile.quant import graph
from qcompile.quant.modules import ActQuant

QUANT = "canonicalize,fold-batchnorm,insert-quantizers"


def quant_graph(model: nn.Module | None = None) -> fx.GraphModule:
    return run_pipeline(model or make_model("mlp"), QUANT)


def input_quantizer(gm: fx.GraphModule) -> ActQuant:
    ph = next(n for n in gm.graph.nodes if n.op == "placeholder")
    (user,) = ph.users
    q = gm.get_submodule(user.target)
    assert isinstance(q, ActQuant)
    return q


def batches_with_max(maxima: list[float], signed: bool = True) -> Callable[[], Iterable[torch.Tensor]]:
    """Batches whose largest |x| is exactly the given value."""
    data = []
    for i, m in enumerate(maxima):
        g = torch.Generator().manual_seed(i)
        x = torch.rand(8, 1, 8, 8, generator=g) * (0.5 * m)  # below m ...
        x[3, 0, 2, 5] = -m if signed else m  # ... except one element
        if signed:
            x[1] = -x[1]
        data.append(x)
    return lambda: iter(data)


def calibrate(gm: fx.GraphModule, data: Callable[[], Iterable[torch.Tensor]], **options: object) -> fx.GraphModule:
    ctx = PassContext(context().example_inputs, data)
    return Calibrate(**options)(gm, ctx).gm  # type: ignore[arg-type]


def test_ema_of_batch_maxima() -> None:
    c = 0.25
    gm = calibrate(quant_graph(), batches_with_max([2.0, 4.0, 1.0]), momentum=c, method="max")
    # first batch initialises; then amax <- (1 - c) amax + c max|x|
    expected = 2.0
    for m in (4.0, 1.0):
        expected = (1 - c) * expected + c * m
    q = input_quantizer(gm)
    assert float(q.amax) == pytest.approx(expected, rel=1e-6)  # 2.125
    assert int(q.batches) == 3
    assert not q.observing


def test_steps_limits_the_batches() -> None:
    gm = calibrate(quant_graph(), batches_with_max([2.0, 4.0, 100.0, 100.0]), momentum=0.5, steps=2, method="max")
    assert float(input_quantizer(gm).amax) == pytest.approx(0.5 * 2.0 + 0.5 * 4.0)
    assert int(input_quantizer(gm).batches) == 2


def test_percentile_statistic() -> None:
    values = torch.arange(1, 129, dtype=torch.float32)  # |x| = 1..128 over one batch of 2 samples
    signs = torch.where(torch.arange(128) % 3 == 0, -1.0, 1.0)
    batch = (values * signs)[torch.randperm(128)].reshape(2, 1, 8, 8)
    gm = calibrate(quant_graph(), lambda: iter([batch]), percentile=75.0)
    assert float(input_quantizer(gm).amax) == 96.0  # 75 % of the 128 magnitudes are <= 96
    gm = calibrate(quant_graph(), lambda: iter([batch]), percentile=100.0)
    assert float(input_quantizer(gm).amax) == 128.0
    gm = calibrate(quant_graph(), lambda: iter([batch]), method="max")
    assert float(input_quantizer(gm).amax) == 128.0


def test_signedness_comes_from_the_data() -> None:
    gm = calibrate(quant_graph(), batches_with_max([1.0], signed=True))
    assert input_quantizer(gm).signed
    gm = calibrate(quant_graph(), batches_with_max([1.0], signed=False))
    assert not input_quantizer(gm).signed
    relu_quants = [gm.get_submodule(n.target) for n in gm.graph.nodes
                   if n.op == "call_module" and n.args[0].target is torch.relu]
    assert relu_quants and all(not q.signed for q in relu_quants)


def test_every_quantizer_is_calibrated_and_quantizes_on_its_grid(any_model: nn.Module) -> None:
    gm = run_pipeline(any_model, QUANT + ",calibrate")
    quants = [m for m in gm.modules() if isinstance(m, ActQuant)]
    assert quants and all(q.calibrated and float(q.amax) > 0 for q in quants)
    q = input_quantizer(gm)
    x = torch.randn(4, 1, 8, 8) * 3
    with torch.no_grad():
        codes = q(x) / q.scale
    t = q.itype
    torch.testing.assert_close(codes, torch.round(codes), rtol=0, atol=1e-4)
    assert float(codes.min()) >= t.lo - 1e-4 and float(codes.max()) <= t.hi + 1e-4


def test_calibrated_simulation_is_close_to_float(any_model: nn.Module) -> None:
    gm = run_pipeline(any_model, QUANT + ",calibrate")
    x = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        sim, ref = gm(x), any_model(x)
    # 8-bit weights and activations: typical errors of a few output steps, far below the output range
    # (a few inputs beyond the calibrated range saturate, so the maximum error is not bounded as tightly)
    err, scale = (sim - ref).abs(), float(ref.abs().max())
    assert float(err.mean()) < 0.015 * scale and float(err.median()) < 0.01 * scale
    assert not torch.equal(sim, ref)  # ...but quantization did happen


def test_recalibration_starts_afresh() -> None:
    gm = calibrate(quant_graph(), batches_with_max([50.0, 60.0]))
    gm = calibrate(gm, batches_with_max([1.0]), method="max")
    assert float(input_quantizer(gm).amax) == pytest.approx(1.0)
    assert int(input_quantizer(gm).batches) == 1


class DeadRelu(nn.Module):
    """The ReLU after ``dead`` never sees a positive value: its range is zero."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.dead = nn.Conv2d(2, 2, 1)
        with torch.no_grad():
            self.dead.weight.zero_()
            self.dead.bias.fill_(-1.0)
        self.fc = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.dead(F.relu(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_zero_range_activation_is_named() -> None:
    gm = quant_graph(DeadRelu().eval())
    dead = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "dead")
    (relu,) = dead.users
    with pytest.raises(CalibrationError, match="always zero") as info:
        calibrate(gm, batches_with_max([1.0, 2.0]))
    assert f"'{relu.name}'" in str(info.value)


def test_zero_range_through_the_manager_is_a_pass_error() -> None:
    with pytest.raises(PassError, match="pass 'calibrate' failed") as info:
        run_pipeline(DeadRelu().eval(), QUANT + ",calibrate")
    assert isinstance(info.value.__cause__, CalibrationError)


def test_no_batches_means_never_reached() -> None:
    with pytest.raises(CalibrationError, match="never reached"):
        calibrate(quant_graph(), lambda: iter([]))


def test_calibration_needs_data() -> None:
    gm = quant_graph()
    with pytest.raises(PreconditionError, match="calibration data"):
        Calibrate()(gm, PassContext(context().example_inputs, None))


def test_percentile_rank_rounds_up_and_sparse_tensors_keep_their_max() -> None:
    values = torch.arange(1, 129, dtype=torch.float32).reshape(2, 1, 8, 8)
    gm = calibrate(quant_graph(), lambda: iter([values]), percentile=90.0)
    assert float(input_quantizer(gm).amax) == 116.0  # ceil(128 * 0.9) = 116th smallest: 90.6 % at or below
    sparse = torch.zeros(2, 1, 8, 8)
    sparse[0, 0, 0, :3] = torch.tensor([1.0, 2.0, 3.0])  # 3 of 128 non-zero: the 50th percentile is 0
    gm = calibrate(quant_graph(), lambda: iter([sparse]), percentile=50.0)
    assert float(input_quantizer(gm).amax) == 3.0


# ----------------------------------------------------------------------------------- method=mse


def laplace_batches(n: int = 3, scale: float = 1.0) -> Callable[[], Iterable[torch.Tensor]]:
    data = [torch.distributions.Laplace(0.0, scale).sample((16, 1, 8, 8)) for _ in range(n)]
    return lambda: iter(data)


def grid_error(x: torch.Tensor, q: ActQuant) -> float:
    t = q.itype
    s = float(q.amax) / t.hi
    return float(((x - s * torch.clamp(torch.round(x / s), t.lo, t.hi)) ** 2).sum())


def test_mse_range_clips_the_tail_and_beats_the_max() -> None:
    data = laplace_batches()
    x = torch.cat(list(data()))
    at4 = "canonicalize,fold-batchnorm,insert-quantizers{acts=4}"
    q_mse = input_quantizer(calibrate(run_pipeline(make_model("mlp"), at4), data, method="mse"))
    q_max = input_quantizer(calibrate(run_pipeline(make_model("mlp"), at4), data, momentum=1.0, method="max"))
    assert q_mse.histogram is not None
    assert float(q_mse.amax) == pytest.approx(q_mse.histogram.mse_range(q_mse.itype), rel=1e-7)  # float32
    assert float(q_mse.amax) < 0.9 * float(x.abs().max())  # a Laplace tail is worth clipping at 4 bits
    assert grid_error(x, q_mse) < grid_error(x, q_max)
    assert q_mse.signed and not q_mse.observing


def test_mse_range_is_deterministic() -> None:
    data = laplace_batches()
    ranges = [{n.name: float(q.amax) for n, q in graph.act_quants(calibrate(quant_graph(), data, method="mse"))}
              for _ in range(2)]
    assert ranges[0] == ranges[1]


def test_a_later_bit_width_re_derives_the_mse_range() -> None:
    data = laplace_batches()
    q = input_quantizer(calibrate(quant_graph(), data, method="mse"))
    at8 = float(q.amax)
    q.bits = 4
    assert q.histogram is not None and float(q.amax) < at8
    assert float(q.amax) == pytest.approx(q.histogram.mse_range(IntType(4, True)), rel=1e-7)
    # the policy after calibrate gives every quantizer the range a calibration at those bits gives
    ctx = PassContext(context().example_inputs, data)
    late = run_pipeline(make_model("residual"), QUANT + ",calibrate{method=mse},assign-bitwidths{policy=w4a4}", ctx)
    early = run_pipeline(make_model("residual"),
                         "canonicalize,fold-batchnorm,insert-quantizers{acts=4},calibrate{method=mse},"
                         "assign-bitwidths{policy=w4a4}", ctx)
    assert [float(q.amax) for _, q in graph.act_quants(late)] == [float(q.amax) for _, q in graph.act_quants(early)]
    assert {q.bits for _, q in graph.act_quants(late)} == {4, 8}  # inputs and outputs stay at 8 bits


def test_max_calibration_keeps_no_histogram_and_recalibration_drops_it() -> None:
    gm = calibrate(quant_graph(), laplace_batches(), method="mse")
    gm = calibrate(gm, batches_with_max([1.0]), method="max")
    q = input_quantizer(gm)
    assert q.histogram is None and float(q.amax) == pytest.approx(1.0)
    q.bits = 4
    assert float(q.amax) == pytest.approx(1.0)  # a max range does not depend on the bits


@pytest.mark.parametrize(("text", "method", "percentile"), [
    ("calibrate", "max", None),
    ("calibrate{method=max}", "max", None),
    ("calibrate{method=mse}", "mse", None),
    ("calibrate{percentile=99.9}", "percentile", 99.9),
    ("calibrate{method=percentile}", "percentile", None),
    ("calibrate{percentile=99.5,method=percentile}", "percentile", 99.5),
])
def test_method_option(text: str, method: str, percentile: float | None) -> None:
    (cal,) = parse_pipeline(text).build()
    assert isinstance(cal, Calibrate) and cal.chosen_method == method and cal.percentile == percentile
    assert cal.spec() == text


def test_method_percentile_alone_uses_99_99() -> None:
    values = torch.arange(1, 64_001, dtype=torch.float32).reshape(1000, 1, 8, 8)
    gm = calibrate(quant_graph(), lambda: iter([values]), method="percentile")
    assert float(input_quantizer(gm).amax) == 63994.0  # ceil(64000 * 0.9999)-th smallest


@pytest.mark.parametrize(("options", "message"), [
    ({"method": "entropy"}, "method must be one of max, percentile, mse, got 'entropy'"),
    ({"method": "mse", "percentile": 99.0}, "applies to method=percentile only"),
    ({"percentile": 0.0}, r"percentile must lie in \(0, 100\]"),
    ({"method": "mse", "norm_percentile": 101.0}, r"norm_percentile must lie in \(0, 100\]"),
    ({"tables": "percentile"}, "tables must be max or mse, got 'percentile'"),
])
def test_bad_method_options_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(PreconditionError, match=message):
        Calibrate(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize("model_name", ["residual", "concat"])
def test_mse_compile_is_exact_in_onnxruntime(model_name: str) -> None:
    pipeline = default_pipeline().replace("calibrate", "calibrate{method=mse}")
    cm = compile_model(make_model(model_name), pipeline=pipeline)
    assert cm.verify(random_inputs(32, seed=4)).mismatches == 0


def test_layernorm_inputs_weigh_their_error_by_the_normalized_spread() -> None:
    from vit import TinyViT

    from qcompile.passes.calibrate import normalized_error

    torch.manual_seed(0)
    model = TinyViT().eval()
    gm = run_pipeline(model, QUANT + ",calibrate{method=mse,norm_percentile=none}", shape=(1, 8, 8))
    weighed = [n for n, _ in graph.act_quants(gm) if normalized_error(gm, n) is not None]
    ln_inputs = [u.args[0] for u in gm.graph.nodes if isinstance(graph.module(gm, u), nn.LayerNorm)]
    assert weighed and set(weighed) == {n for n in ln_inputs if graph.is_act_quant(gm, n)}
    assert all(q.histogram is not None and q.histogram.weigh is None for _, q in graph.act_quants(gm))  # dropped
    tokens = torch.tensor([[[1.0, -1.0, 1.0, -1.0], [10.0, -10.0, 10.0, -10.0]]])  # spreads 1 and 10
    weigh = normalized_error(gm, weighed[0])
    assert weigh is not None
    torch.testing.assert_close(weigh(tokens).flatten().float(), torch.tensor([1.0, 0.01]), rtol=1e-4, atol=0)
    for _, q in graph.act_quants(gm):
        torch.save(q, io.BytesIO())  # nothing unpicklable stays behind
    clipped = run_pipeline(model, QUANT + ",calibrate{norm_percentile=90}", shape=(1, 8, 8))  # under max too
    by_name = {n.name: q for n, q in graph.act_quants(clipped)}
    assert all(by_name[n.name].histogram is None and by_name[n.name].percentile == 90.0 for n in weighed)


def test_tables_option_gives_only_the_inputs_of_lookup_tables_the_mse_range() -> None:
    from qcompile.quant.tables import TableFunction

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.SiLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(64, 3)).eval()
    gm = run_pipeline(model, QUANT + ",calibrate{tables=mse}", shape=(1, 8, 8))
    feeds = {n.args[0] for n in gm.graph.nodes if isinstance(graph.module(gm, n), TableFunction)}
    with_histogram = {n for n, q in graph.act_quants(gm) if q.histogram is not None}
    assert feeds and with_histogram == feeds  # the SiLU's input quantizer, nothing else
    pipeline = default_pipeline().replace("calibrate", "calibrate{tables=mse}")
    cm = compile_model(model, shape=(1, 8, 8), pipeline=pipeline)
    assert cm.verify(random_inputs(16, seed=4, shape=(1, 8, 8))).mismatches == 0
