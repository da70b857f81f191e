"""Distillation from the float model: the loss, the teacher it uses, and refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model, run_pipeline

import qcompile
from qcompile.frontends import trace_module
from qcompile.models import DemoNet, train_float
from qcompile.passes import PassContext, PassManager, parse_pipeline
from qcompile.passes.base import PreconditionError
from qcompile.train import QuantTrainer, TrainConfig, TrainError

QUANT = "canonicalize,fold-batchnorm,insert-quantizers,calibrate,assign-bitwidths{policy=w4a4}"
SEARCHES = ("aqt", "bsq", "bayesian-bits", "apot")


def _data() -> qcompile.Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    return qcompile.Dataset("toy", x, y, x[:16], y[:16])


def test_the_loss_mixes_labels_and_the_teachers_soft_targets() -> None:
    data = _data()
    gm = run_pipeline(make_model("mlp"), QUANT)
    teacher = make_model("mlp")
    x, y = data.x_train[:16], data.y_train[:16]  # type: ignore[index]
    logits = torch.randn(16, 3)
    with torch.no_grad():
        soft = F.softmax(teacher(x) / 2.0, dim=1)
    kl = float(F.kl_div(F.log_softmax(logits / 2.0, dim=1), soft, reduction="batchmean"))
    ce = float(F.cross_entropy(logits, y))
    trainer = QuantTrainer(gm, data, TrainConfig(distill=0.25, temperature=2.0), teacher=teacher)
    assert float(trainer._loss(x, logits, y)) == pytest.approx(0.75 * ce + 0.25 * 4.0 * kl, rel=1e-5)
    plain = QuantTrainer(run_pipeline(make_model("mlp"), QUANT), data, TrainConfig())
    assert float(plain._loss(x, logits, y)) == pytest.approx(ce, rel=1e-6)
    with torch.no_grad():  # pure distillation of the teacher's own logits costs nothing
        pure = QuantTrainer(run_pipeline(make_model("mlp"), QUANT), data, TrainConfig(distill=1.0), teacher=teacher)
        assert float(pure._loss(x, teacher(x), y)) == pytest.approx(0.0, abs=1e-6)


def test_insert_quantizers_keeps_the_float_graph_as_teacher_and_training_leaves_it_alone() -> None:
    torch.manual_seed(0)
    data = qcompile.load_data("digits")
    assert data.y_train is not None
    model = train_float(DemoNet(width=8), data.x_train, data.y_train, epochs=2)
    ctx = PassContext((data.x_train[:1],), data.calibration(), dataset=data)
    gm = trace_module(model, ctx.example_inputs)
    passes = parse_pipeline("canonicalize,fold-batchnorm,insert-quantizers,calibrate,"
                            "aqt{epochs=1,distill=0.5,temperature=2}").build()
    PassManager(passes).run(gm, ctx)
    assert ctx.teacher is not None
    with torch.no_grad():
        x = data.x_test[:64]
        assert torch.allclose(ctx.teacher(x), model.eval()(x), atol=1e-4)  # still the float function


def test_distillation_without_a_teacher_is_refused() -> None:
    with pytest.raises(TrainError, match="distillation needs the float model"):
        QuantTrainer(run_pipeline(make_model("mlp"), QUANT), _data(), TrainConfig(distill=0.5))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"distill": 1.5}, r"distillation weight must lie in \[0, 1\]"),
    ({"distill": -0.1}, r"distillation weight must lie in \[0, 1\]"),
    ({"temperature": 0.0}, "temperature must be positive"),
])
def test_bad_distillation_configs_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(TrainError, match=message):
        TrainConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("search", SEARCHES)
def test_every_trained_search_refuses_bad_distillation_options_when_built(search: str) -> None:
    with pytest.raises(PreconditionError, match=rf"{search} distill must lie in \[0, 1\], got 2"):
        parse_pipeline(f"{search}{{distill=2}}").build()
    with pytest.raises(PreconditionError, match=f"{search} temperature must be positive"):
        parse_pipeline(f"{search}{{temperature=-1}}").build()
