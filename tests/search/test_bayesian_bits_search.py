"""The bayesian-bits search: mu moves bits and channels down, the result lowers bit-exactly, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import qcompile
from qcompile import cost
from qcompile.api import search_pipeline
from qcompile.cli import main
from qcompile.frontends.model_spec import load_model
from qcompile.models import train_float
from qcompile.passes import PassError, parse_pipeline
from qcompile.passes.base import PreconditionError

TINY = str(Path(__file__).parent.parent.parent / "examples" / "tiny_model.py") + ":make_model"
FAST = "epochs=2,finetune_epochs=1,gate_lr=0.1,gate_init=3"



def compile_bb(model: torch.nn.Module, data: qcompile.Dataset, options: str) -> qcompile.CompiledModel:
    return qcompile.compile(model, data.x_train[:1], data=data, pipeline=search_pipeline(f"bayesian-bits{{{options}}}"))


def test_pipeline_inserts_gated_quantizers_and_prunes_after_the_search() -> None:
    assert search_pipeline("bayesian-bits{mu=0.1}") == (
        "canonicalize,fold-batchnorm,insert-quantizers{scheme=bayesian-bits},calibrate,bayesian-bits{mu=0.1},"
        "prune-channels,share-scales,lower-integer")


def test_bits_and_bops_go_down_as_mu_grows_and_the_graph_stays_bit_exact(trained_demonet: tuple) -> None:
    model, data = trained_demonet
    results = {}
    for mu in (0.001, 1.0):
        cm = compile_bb(model, data, f"mu={mu},{FAST}")
        report = cm.report(data, data.x_test[:128])
        assert report["verify"]["mismatches"] == 0
        results[mu] = report
        learned = report["records"]["bayesian-bits"]["layers"]
        for layer in report["layers"]:
            assert layer["w_bits"] in (2, 4, 8) and layer["a_bits"] in (2, 4, 8)
            assert layer["w_bits"] == learned[layer["name"]]["w_bits"]
            assert {"z4", "z8", "z16", "z32"} <= set(layer["gate_probabilities"])
            assert 1 <= layer["kept_channels"] <= layer["channels"]
    low, high = results[0.001], results[1.0]
    assert high["totals"]["bops"] < low["totals"]["bops"]
    assert sum(x["w_bits"] for x in high["layers"]) < sum(x["w_bits"] for x in low["layers"])
    assert low["accuracy"]["integer"] > low["accuracy"]["float"] - 2.0  # little pressure: close to float


def test_pruned_channels_are_removed_from_the_integer_graph(trained_demonet: tuple) -> None:
    model, data = trained_demonet
    cm = compile_bb(model, data, f"mu=1.0,{FAST}")
    learned = cm.records["bayesian-bits"]["layers"]
    pruned = {name: v["channels"] - v["kept_channels"] for name, v in learned.items()}
    assert sum(pruned.values()) > 0, "mu = 1 should prune some channel"
    removed = cm.records["prune-channels"]
    for name, n in pruned.items():
        if n and removed[name]["removed"]:
            assert removed[name]["channels_left"] == learned[name]["kept_channels"]
    assert cm.verify(data.x_test[:128]).mismatches == 0
    assert learned["head"]["kept_channels"] == 10  # the logits are never pruned
    # relative BOPs and compression count the model as given: pruning lowers BOPs, not the reference
    totals = cm.report()["totals"]
    dense_macs, dense_params = cost.dense_totals(cm.float_graph, cm.example_inputs)
    assert totals["macs"] < totals["dense_macs"] == dense_macs
    assert totals["rel_bops_percent"] == pytest.approx(100 * totals["bops"] / (dense_macs * 1024))
    assert totals["float_weight_bytes"] == 4 * dense_params


def test_post_training_learns_gates_and_ranges_but_keeps_the_weights(trained_demonet: tuple) -> None:
    model, data = trained_demonet
    cm = compile_bb(model, data, f"mu=0.3,{FAST},post_training=true,samples=256")
    assert cm.quant_graph is not None
    folded = dict(cm.float_graph.named_parameters())
    learned = cm.records["bayesian-bits"]["layers"]
    for name, layer in cm.quant_graph.named_modules():
        if name in learned and learned[name]["kept_channels"] == learned[name]["channels"]:
            assert torch.equal(layer.weight, folded[f"{name}.weight"]), f"{name}: post-training changed weights"
    assert cm.verify(data.x_test[:64]).mismatches == 0


@pytest.mark.parametrize(("options", "message"), [
    ("mu=0", "mu must be a number > 0"),
    ("mu=-1", "mu must be a number > 0"),
    ("mu=nan", "mu must be a number > 0"),
    ("epochs=0", "epochs must be positive"),
    ("gate_init=-1", "gate_init must exceed"),
])
def test_bad_options_are_refused(options: str, message: str) -> None:
    with pytest.raises(PreconditionError, match=message):
        parse_pipeline(f"bayesian-bits{{{options}}}").build()


def test_needs_the_gated_quantizers(trained_demonet: tuple) -> None:
    model, data = trained_demonet
    pipeline = "canonicalize,fold-batchnorm,insert-quantizers,calibrate,bayesian-bits,lower-integer"
    with pytest.raises(PassError, match=r"insert-quantizers\{scheme=bayesian-bits\}"):
        qcompile.compile(model, data.x_train[:1], data=data, pipeline=pipeline)


def test_a_search_that_prunes_a_whole_layer_is_refused(trained_demonet: tuple) -> None:
    model, data = trained_demonet
    with pytest.raises(PassError, match="pruned every output channel of layer '.*'; lower mu"):
        compile_bb(model, data, "mu=1000,epochs=2,gate_lr=1.0,gate_init=3")


def test_cli_compile_writes_the_learned_choice_into_the_report(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out, report = tmp_path / "m.onnx", tmp_path / "r.json"
    code = main(["compile", "qcompile.models:DemoNet", "--data", "digits", "--search", "bayesian-bits", "--mu",
                 "0.1", "--epochs", "1", "--post-training", "-o", str(out), "--report", str(report), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    layers = json.loads(report.read_text())["layers"]
    assert all({"kept_channels", "channels", "gate_probabilities"} <= set(layer) for layer in layers)


@pytest.mark.parametrize(("flags", "message"), [
    (["--mu", "0"], "mu must be a number > 0, got 0.0"),
    (["--epochs", "0"], "epochs must be positive"),
    (["--alpha", "0.1"], "search 'bayesian-bits' has no option --alpha"),
])
def test_cli_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str],
                                   message: str) -> None:
    code = main(["compile", "qcompile.models:DemoNet", "--data", "digits", "--search", "bayesian-bits", *flags,
                 "-o", str(tmp_path / "m.onnx"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()


def test_cli_refuses_a_checkpoint_of_another_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "search.ckpt"
    base = ["--data", "digits", "--search", "bayesian-bits", "--epochs", "1", "--checkpoint", str(ckpt),
            "--no-progress"]
    assert main(["compile", "qcompile.models:DemoNet", *base, "-o", str(tmp_path / "a.onnx")]) == 0
    code = main(["compile", TINY, *base, "--resume",
                 "-o", str(tmp_path / "b.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "written for another model" in err
    assert ckpt.exists()


def test_cli_sweep_over_mu_with_trained_uniform_baselines(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = qcompile.load_data("digits")
    assert data.y_train is not None
    torch.manual_seed(0)
    weights = tmp_path / "tiny.pt"
    torch.save(train_float(load_model(TINY), data.x_train, data.y_train, epochs=4).state_dict(), weights)
    out = tmp_path / "sweep"
    code = main(["sweep", TINY, "--weights", str(weights), "--data", "digits", "--search", "bayesian-bits", "--mu",
                 "0.01,1", "--epochs", "2", "--option", "gate_lr=0.1", "--option", "gate_init=3", "--baselines",
                 "w4a4", "--baseline-epochs", "2", "-o", str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    points = json.loads((out / "sweep.json").read_text())["points"]
    assert [p["method"] for p in points[:2]] == ["ptq", "qat{epochs=2}"]
    assert [(p["method"], p["knobs"]) for p in points[2:]] == [
        ("bayesian-bits{epochs=2,gate_lr=0.1,gate_init=3}", {"mu": 0.01}),
        ("bayesian-bits{epochs=2,gate_lr=0.1,gate_init=3}", {"mu": 1.0})]
    assert all("kept_channels" in layer for p in points[2:] for layer in p["layers"])
    assert points[3]["rel_bops_percent"] < points[2]["rel_bops_percent"]
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_diagnostics_line_and_a_warning_when_nothing_moved(trained_demonet: tuple,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    model, data = trained_demonet
    cm = compile_bb(model, data, "mu=0.001,epochs=1,finetune_epochs=0,gate_lr=0.0001,gate_init=6")  # cannot move
    err = capsys.readouterr().err
    facts = cm.records["bayesian-bits"]["diagnostics"]
    assert facts["changed_layers"] == [] and facts["max_move"] < facts["move_needed"]
    steps = facts["steps"]
    assert f"bayesian-bits: {steps} training steps; gates moved by at most" in err
    assert "warning: bayesian-bits changed no layer within its budget" in err and "--epochs" in err
    assert "gate_lr" in err
    cm = compile_bb(model, data, f"mu=1.0,{FAST}")  # strong pressure: layers change, no warning
    err = capsys.readouterr().err
    assert cm.records["bayesian-bits"]["diagnostics"]["changed_layers"] and "warning" not in err
