"""The shared quantization-aware trainer: AQT's activation schedule, checkpoints, refusals."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.fx as fx
from conftest import make_model, run_pipeline

from qcompile.data import Dataset
from qcompile.quant import graph
from qcompile.train import QuantTrainer, TrainConfig, TrainError
from qcompile.train.trainer import signature_differences

QUANT = "canonicalize,fold-batchnorm,insert-quantizers,calibrate,assign-bitwidths{policy=w4a4}"


def toy_data(n: int = 96, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 0).long()  # 3 classes, learnable
    return Dataset("toy", x, y, x[:32], y[:32])


def quant_graph(name: str = "residual") -> fx.GraphModule:
    return run_pipeline(make_model(name), QUANT)


def test_activation_bounds_freeze_at_the_configured_step_and_never_move() -> None:
    gm, data = quant_graph(), toy_data()
    seen: list[tuple[bool, list[float]]] = []

    def record(step: int, g: fx.GraphModule) -> None:
        quants = [q for _, q in graph.act_quants(g)]
        seen.append((quants[0].observing, [float(q.amax) for q in quants]))

    config = TrainConfig(epochs=2, batch_size=16, calibration_fraction=0.25)
    trainer = QuantTrainer(gm, data, config, on_step=record)
    trainer.fit()
    assert trainer.freeze_step == 3  # ceil(0.25 * 2 epochs * 6 steps)
    assert [observing for observing, _ in seen] == [True] * 3 + [False] * 9
    frozen = seen[3][1]
    assert all(amax == frozen for _, amax in seen[3:])  # frozen once, never updated
    assert seen[0][1] != seen[2][1]  # the EMA moved while calibrating
    for group in graph.scale_groups(gm):  # groups that meet at an add share one range after the freeze
        assert len({float(graph.act_quant(gm, n).amax) for n in group}) == 1


def test_training_reduces_the_loss() -> None:
    gm, data = quant_graph("mlp"), toy_data(256)
    history = QuantTrainer(gm, data, TrainConfig(epochs=6, batch_size=32, lr=3e-3)).fit()
    assert history[-1].loss < history[0].loss
    assert all(h.rel_bops == history[0].rel_bops for h in history)  # w4a4 bits do not change while training


class Interrupted(Exception):
    pass


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = toy_data()
    straight = quant_graph()
    QuantTrainer(straight, data, TrainConfig(epochs=3, batch_size=16)).fit()

    config = TrainConfig(epochs=3, batch_size=16, checkpoint=str(tmp_path / "run.pt"))

    def crash(step: int, g: fx.GraphModule) -> None:
        if step == 13:  # inside the third epoch: the checkpoint holds two
            raise Interrupted

    with pytest.raises(Interrupted):
        QuantTrainer(quant_graph(), data, config, on_step=crash).fit()
    capsys.readouterr()
    resumed = quant_graph()
    history = QuantTrainer(resumed, data, TrainConfig(**{**config.__dict__, "resume": True})).fit()
    assert [h.epoch for h in history] == [2]
    assert f"resuming from {tmp_path / 'run.pt'}: 2 epochs done, continuing at epoch 3 of 3" in capsys.readouterr().err
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_checkpoint_of_another_model_is_refused(tmp_path: Path) -> None:
    ckpt = str(tmp_path / "other.pt")
    QuantTrainer(quant_graph("mlp"), toy_data(), TrainConfig(epochs=1, batch_size=32, checkpoint=ckpt)).fit()
    with pytest.raises(TrainError, match="written for another model or search") as info:
        QuantTrainer(quant_graph("residual"), toy_data(), TrainConfig(epochs=2, checkpoint=ckpt, resume=True)).fit()
    assert "it lacks 'stem.bias'" in str(info.value) and "more)" in str(info.value), info.value


def test_signature_differences_name_the_tensors() -> None:
    saved = [("a.weight", (4, 2)), ("b.bias", (3,)), ("gone", ())]
    ours = [("a.weight", (8, 2)), ("b.bias", (3,)), ("new.x_max", ())]
    text = signature_differences(saved, ours, shown=3)
    assert "'a.weight' is 4x2 there and 8x2 here" in text
    assert "it lacks 'new.x_max'" in text and "it has 'gone', which this model lacks" in text
    assert signature_differences(saved, ours, shown=1).endswith("(and 2 more)")


def test_an_existing_checkpoint_is_kept_unless_resume_or_overwrite(tmp_path: Path) -> None:
    ckpt = tmp_path / "run.pt"
    ckpt.write_bytes(b"the user's earlier run")
    with pytest.raises(TrainError, match=r"already exists; pass --resume \(resume=True\) to continue it, --force"):
        QuantTrainer(quant_graph(), toy_data(), TrainConfig(epochs=1, batch_size=32, checkpoint=str(ckpt))).fit()
    assert ckpt.read_bytes() == b"the user's earlier run"
    QuantTrainer(quant_graph(), toy_data(), TrainConfig(epochs=1, batch_size=32, checkpoint=str(ckpt),
                                                        overwrite=True)).fit()
    assert torch.load(ckpt, weights_only=True)["epochs_done"] == 1


def test_resume_needs_an_existing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="none is given; pass --checkpoint FILE"):
        TrainConfig(resume=True)
    missing = TrainConfig(epochs=1, checkpoint=str(tmp_path / "missing.pt"), resume=True)
    with pytest.raises(TrainError, match="there is no checkpoint .*missing.pt; fix the path, or drop --resume"):
        QuantTrainer(quant_graph(), toy_data(), missing).fit()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"epochs": 0}, "epochs must be positive"),
    ({"calibration_fraction": 1.0}, r"\[0, 1\)"),
    ({"calibration_fraction": -0.1}, r"\[0, 1\)"),
])
def test_bad_configs_are_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(TrainError, match=message):
        TrainConfig(**kwargs)  # type: ignore[arg-type]


def test_unlabelled_data_is_refused() -> None:
    x = torch.randn(8, 1, 8, 8)
    with pytest.raises(TrainError, match="no labels"):
        QuantTrainer(quant_graph(), Dataset("random", x, None, x, None), TrainConfig())


def test_the_cosine_schedule_decays_weights_and_ranges_to_zero_and_leaves_gates_alone() -> None:
    gm, data = quant_graph(), toy_data()
    trainer: QuantTrainer | None = None
    rates: list[float] = []

    def record(step: int, g: fx.GraphModule) -> None:
        assert trainer is not None
        rates.append(trainer.optimizers["weights"].param_groups[0]["lr"])

    trainer = QuantTrainer(gm, data, TrainConfig(epochs=2, batch_size=16, lr=0.01, schedule="cosine"), on_step=record)
    trainer.fit()
    assert rates[0] == pytest.approx(0.01)
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))  # strictly decreasing
    assert rates[-1] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 11 / 12)))  # step 11 of 12


def test_an_unknown_schedule_is_refused_when_the_search_is_built() -> None:
    from qcompile.passes import parse_pipeline
    from qcompile.passes.base import PreconditionError

    for search in ("aqt", "bsq", "bayesian-bits", "apot"):
        with pytest.raises(PreconditionError, match="schedule must be one of constant, cosine"):
            parse_pipeline(f"{search}{{schedule=linear}}").build()
    with pytest.raises(TrainError, match="unknown learning-rate schedule"):
        TrainConfig(schedule="linear")
