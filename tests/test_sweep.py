"""Sweeps: the Pareto front, planning points from flags, a tiny sweep on digits, and every bad input."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch.fx as fx

import qcompile
from qcompile.cli import main
from qcompile.frontends.model_spec import load_model
from qcompile.passes.base import PASSES, PassContext, option, register_pass
from qcompile.search.base import Search, layer_kinds
from qcompile.search.policies import Assignment, LayerBits
from qcompile.sweep import (
    Sweep,
    SweepError,
    SweepPoint,
    SweepResult,
    baseline_points,
    grid,
    legend_columns,
    pareto_front,
    points_from_flags,
    run_sweep,
    sweep_figure,
    write_sweep,
)

TINY = str(Path(__file__).parent.parent / "examples" / "tiny_model.py") + ":make_model"


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([*args, "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


# -------------------------------------------------------------------------------------- Pareto front


def test_pareto_front_excludes_dominated_points() -> None:
    points = [(1.0, 50.0), (2.0, 60.0), (2.0, 55.0), (3.0, 60.0), (0.5, 40.0), (4.0, 70.0), (5.0, 65.0)]
    # (2, 55): same cost, lower accuracy; (3, 60): same accuracy, higher cost; (5, 65): both worse than (4, 70)
    assert pareto_front(points) == [4, 0, 1, 5]


def test_pareto_front_keeps_ties_and_orders_by_cost() -> None:
    assert pareto_front([(2.0, 60.0), (1.0, 50.0), (2.0, 60.0)]) == [1, 0, 2]  # identical points: neither dominates
    assert pareto_front([]) == []
    assert pareto_front([(3.0, 10.0)]) == [0]
    assert pareto_front([(1.0, 90.0), (2.0, 80.0), (3.0, 70.0)]) == [0]  # the cheapest is also the best


# ------------------------------------------------------------------------------------------ planning


def test_grid_is_the_cartesian_product_and_single_values_name_the_method() -> None:
    points = grid("aqt", {"epochs": ("1",), "fraction": ("0.2", "0.5"), "lr": ("0.01", "0.001")})
    assert len(points) == 4
    assert {p.method for p in points} == {"aqt{epochs=1}"}
    assert [p.spec for p in points[:2]] == ["aqt{epochs=1,fraction=0.2,lr=0.01}", "aqt{epochs=1,fraction=0.2,lr=0.001}"]
    assert points[0].knobs == ("fraction", "lr") and points[0].knob_label == "fraction=0.2 lr=0.01"


def test_flags_after_search_belong_to_it_and_each_search_takes_its_options() -> None:
    flags = [("epochs", "2"), ("search", "aqt,assign-bitwidths"), ("policy", "w4a4,w8a8"),
             ("search", "assign-bitwidths"), ("option", "policy=aqt")]
    specs = [p.spec for p in points_from_flags(flags)]
    assert specs == ["aqt{epochs=2,policy=w4a4}", "aqt{epochs=2,policy=w8a8}", "assign-bitwidths{policy=w4a4}",
                     "assign-bitwidths{policy=w8a8}", "assign-bitwidths{policy=aqt}"]


@pytest.fixture
def user_search() -> Iterator[str]:
    """A search with options named alpha and mu (as a BSQ-like search has), registered for one test."""

    @register_pass
    @dataclass(frozen=True)
    class UniformFromAlpha(Search):
        name = "sweep-test-search"
        alpha: float = option(0.01, "strength")
        mu: float = option(1.0, "weight")

        def search(self, gm: fx.GraphModule, ctx: PassContext) -> Assignment:
            bits = 4 if self.alpha > 0.05 else 8
            return Assignment({name: LayerBits(bits, 8) for name, _ in layer_kinds(gm)}, 8)

    try:
        yield UniformFromAlpha.name
    finally:
        del PASSES[UniformFromAlpha.name]


def test_any_search_option_is_a_sweep_flag(user_search: str) -> None:
    points = points_from_flags([("search", user_search), ("alpha", "0.01,0.1"), ("mu", "2")])
    assert [p.spec for p in points] == [f"{user_search}{{alpha=0.01,mu=2}}", f"{user_search}{{alpha=0.1,mu=2}}"]
    assert points[0].method == f"{user_search}{{mu=2}}"


def test_baselines_post_training_and_trained_for_the_budget() -> None:
    specs = [(p.method, p.spec) for p in baseline_points(["w8a8", "aqt"], epochs=3)]
    assert specs == [("ptq", "assign-bitwidths{policy=w8a8}"), ("ptq", "assign-bitwidths{policy=aqt}"),
                     ("qat{epochs=3}", "aqt{policy=w8a8,epochs=3}"), ("qat{epochs=3}", "aqt{policy=aqt,epochs=3}")]
    assert all(p.baseline for p in baseline_points(["w4a4"]))
    trained = baseline_points(["w4a4"], epochs=2, training=(("lr", "0.0003"), ("schedule", "cosine")))[1]
    assert (trained.method, trained.spec) == ("qat{epochs=2,lr=0.0003,schedule=cosine}",
                                              "aqt{policy=w4a4,epochs=2,lr=0.0003,schedule=cosine}")
    with pytest.raises(qcompile.QCompileError, match="schedule must be one of"):
        baseline_points(["w4a4"], epochs=2, training=(("schedule", "linear"),))


# -------------------------------------------------------------------------------------------- running


def test_python_api_sweep_of_baselines(tmp_path: Path, user_search: str) -> None:
    data = qcompile.load_data("digits")
    points = [*baseline_points(["w8a8", "w4a4"]), *grid(user_search, {"alpha": ("0.01", "0.1")})]
    sweep = run_sweep(load_model(TINY), data, points)
    assert [r.point.spec for r in sweep.results][2:] == [f"{user_search}{{alpha=0.01}}", f"{user_search}{{alpha=0.1}}"]
    assert sweep.results[3].values == {"alpha": 0.1} and sweep.results[3].layers[0]["w_bits"] == 4
    w8a8, w4a4 = sweep.results[:2]
    assert w8a8.compression == pytest.approx(4.0) and w4a4.compression == pytest.approx(8.0)
    assert sweep.front("bops")[0] == 1  # w4a4 has the fewest BOPs: always first on that front
    assert sweep.float_accuracy == w8a8.accuracy["float"]
    written = write_sweep(sweep, tmp_path / "new" / "folder")
    assert [p.name for p in written] == ["sweep.json", "sweep.png"]
    with pytest.raises(SweepError, match="already exists"):
        write_sweep(sweep, tmp_path / "new" / "folder")


@pytest.mark.parametrize("label_chars", [8, 40, 90])
def test_the_legend_stays_inside_the_figure(label_chars: int) -> None:
    """Long method labels wrap and take fewer columns instead of running past the figure's edges."""
    results = []
    for i in range(6):
        point = SweepPoint(f"m{i}-" + "x" * label_chars, "aqt", (("fraction", "0.2"),), ("fraction",))
        results.append(SweepResult(point, "", {"fraction": 0.2}, {"float": 90.0, "integer": 80.0 + i}, 1.0 + i,
                                   1000 * (i + 1), 4000, [], 0, 0.0))
    fig = sweep_figure(Sweep("digits", results, 90.0, 4000))
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    box = fig.legends[0].get_window_extent(renderer)
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y0 >= 0
    assert legend_columns(["a" * 200], 13.0) == 1 and legend_columns(["ab"] * 9, 13.0) == 6


def test_point_labels_never_overprint() -> None:
    """Coinciding and nearby points (the same cost and accuracy) get labels that do not overlap."""
    results = []
    for i, (cost_, acc) in enumerate([(2.0, 90.0)] * 4 + [(2.02, 90.05), (2.0, 90.1), (8.0, 70.0)]):
        point = SweepPoint("aqt", "aqt", (("fraction", f"0.{i + 1}"),), ("fraction",))
        results.append(SweepResult(point, "", {"fraction": 0.1}, {"float": 95.0, "integer": acc}, cost_,
                                   1000, 4000, [], 0, 0.0))
    fig = sweep_figure(Sweep("digits", results, 95.0, 4000))
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    for ax in fig.axes:
        boxes = [t.get_window_extent(renderer) for t in ax.texts]
        assert len(boxes) == len(results)
        for i, a in enumerate(boxes):
            assert not any(a.overlaps(b) for b in boxes[i + 1:]), [t.get_text() for t in ax.texts]


def test_tiny_sweep_writes_json_png_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "sweep.json").write_text("old")
    code, stdout, err = run(["sweep", TINY, "--data", "digits", "--search", "aqt", "--epochs", "1", "--fraction",
                             "0.2,0.5", "--baselines", "w8a8,w4a4", "-o", str(out), "--force", "--verify",
                             "--verify-samples", "32"], capsys)
    assert code == 0, err
    report = json.loads((out / "sweep.json").read_text())
    points = report["points"]
    assert len(points) == 4
    assert [(p["method"], p["knobs"]) for p in points] == [
        ("ptq", {"policy": "w8a8"}), ("ptq", {"policy": "w4a4"}),
        ("aqt{epochs=1}", {"fraction": 0.2}), ("aqt{epochs=1}", {"fraction": 0.5})]
    for p in points:
        assert set(p["accuracy"]) == {"float", "simulated", "integer", "onnx"}
        assert p["mismatches"] == 0
        assert p["compression"] == pytest.approx(p["float_weight_bytes"] / p["weight_bytes"], rel=1e-3)
        assert [layer["name"] for layer in p["layers"]] == ["conv1", "conv2", "fc"]
    assert "aqt{epochs=1,fraction=0.5}" in points[3]["pipeline"]
    assert any(p["pareto_bops"] for p in points) and any(p["pareto_bytes"] for p in points)
    png = (out / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    table = stdout.splitlines()
    assert table[0].split()[:2] == ["method", "knob"] and "Pareto" in table[0]
    assert table[2].startswith("float") and table[3].startswith("ptq") and table[5].startswith("aqt{epochs=1}")
    assert "✓" in stdout and "[4/4]" in err


def test_apot_points_in_a_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    code, stdout, err = run(["sweep", TINY, "--data", "digits", "--search", "apot", "--bits", "2,4", "--epochs", "1",
                             "--baselines", "none", "-o", str(out), "--verify", "--verify-samples", "32"], capsys)
    assert code == 0, err
    points = json.loads((out / "sweep.json").read_text())["points"]
    assert [p["knobs"] for p in points] == [{"bits": 2}, {"bits": 4}]
    assert "insert-quantizers{scheme=apot}" in points[0]["pipeline"]
    for p, bits in zip(points, (2, 4), strict=True):
        assert p["mismatches"] == 0
        assert [(layer["w_bits"], layer["terms"]) for layer in p["layers"]] == [(8, 0), (bits, bits // 2), (8, 0)]
    assert "apot{epochs=1}" in stdout


# ---------------------------------------------------------------------------------------- bad inputs

BASE = [TINY, "--data", "digits", "-o", "out"]
BAD_INPUTS = [
    ([*BASE, "--search", "nope"], ["unknown search 'nope'", "aqt"]),
    ([*BASE, "--search", "assign-bitwidths", "--epochs", "1,2"],
     ["search 'assign-bitwidths' has no option --epochs", "its options: policy, table"]),
    ([*BASE, "--search", "aqt", "--alpha", "0.1"], ["search 'aqt' has no option --alpha", "fraction"]),
    ([*BASE, "--search", "aqt,assign-bitwidths", "--mu", "1"], ["none of the searches", "--mu"]),
    ([*BASE, "--search", "aqt", "--fraction", ""], ["--fraction needs a comma-separated list"]),
    ([*BASE, "--search", "aqt", "--fraction", "0.2,,0.5"], ["--fraction needs a comma-separated list"]),
    ([*BASE, "--search", "aqt", "--fraction", "a,b"], ["fraction=a", "must be float"]),
    ([*BASE, "--search", "aqt", "--fraction", "0.2,1.5"], ["fraction must lie in (0, 1)"]),
    ([*BASE, "--search", "aqt", "--option", "batch_size"], ["--option needs NAME=V1,V2"]),
    ([*BASE, "--epochs", "1"], ["name the search with --search"]),
    ([*BASE, "--baselines", "w4x"], ["unknown policy 'w4x'"]),
    ([*BASE, "--baselines", ""], ["--baselines needs a comma-separated list"]),
    ([*BASE, "--baselines", "none"], ["nothing to sweep"]),
    ([TINY, "--data", "random", "--input-shape", "1,8,8", "-o", "out"], ["data 'random' has no labels"]),
    ([TINY, "-o", "out", "--search", "aqt"], ["pass labelled --data"]),
    ([TINY, "--data", "digits", "--search", "aqt"], ["pass -o OUTDIR"]),
]


@pytest.mark.parametrize(("args", "fragments"), BAD_INPUTS, ids=[f[0] for _, f in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str], args: list[str],
                                      fragments: list[str]) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["sweep", *args], capsys)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not (tmp_path / "out" / "sweep.json").exists()


def test_existing_output_is_refused_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "sweep.png").write_bytes(b"precious")
    code, _, err = run(["sweep", TINY, "--data", "digits", "-o", str(tmp_path), "--baselines", "w8a8"], capsys)
    assert code == 2 and err.count("\n") == 1 and "sweep.png already exists" in err and "--force" in err
    assert (tmp_path / "sweep.png").read_bytes() == b"precious"
