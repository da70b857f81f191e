"""The command line: successful runs, and every bad input ending in one clear line with a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from qcompile.cli import main

MODELS = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4 * 4 * 4, 10)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
            return self.fc(x.flatten(1))

    class Branchy(Small):
        def forward(self, x):
            y = self.conv(x)
            if y.sum() > 0:
                y = -y
            return y.flatten(1)

    class Sigmoid(Small):
        def forward(self, x):
            return torch.sin(self.conv(x)).flatten(1).abs()

    class Dead(Small):
        def __init__(self):
            super().__init__()
            nn.init.constant_(self.conv.weight, -1.0)
            nn.init.constant_(self.conv.bias, -1.0)

        def forward(self, x):
            return self.fc(F.max_pool2d(F.relu(self.conv(x)), 2).flatten(1))

    def small(): return Small()
    def branchy(): return Branchy()
    def sigmoid(): return Sigmoid()
    def dead(): return Dead()
    def nan():
        m = Small()
        with torch.no_grad():
            m.conv.weight[0, 0, 0, 0] = float("inf")
        return m
    """
)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "models.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def saved(workdir: Path) -> Path:
    """The Small model's state dict (w.pt) and its torch.export program (m.pt2) in the work folder."""
    sys.path.insert(0, str(workdir))
    try:
        import models  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(workdir))
    model = models.small().eval()
    torch.save(model.state_dict(), workdir / "w.pt")
    torch.export.save(torch.export.export(model, (torch.zeros(2, 1, 8, 8),)), workdir / "m.pt2")
    return workdir


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([*args, "--no-progress"])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert len(lines[0]) <= 300, lines[0]  # every CLI error test: a line a user can read
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_compile_writes_onnx_report_and_verifies(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["compile", "models.py:small", "--data", "digits", "--policy", "aqt", "-o", "m.onnx",
                        "--report", "r.json", "--verify", "--verify-samples", "64"], capsys)
    assert code == 0
    report = json.loads((workdir / "r.json").read_text())
    assert {"layers", "totals", "accuracy", "verify"} <= report.keys()
    assert [layer["name"] for layer in report["layers"]] == ["conv", "fc"]
    assert report["layers"][0]["w_bits"] == 8 and report["layers"][1]["w_bits"] == 8
    assert {"macs", "bops", "rel_bops_percent", "weight_bytes"} <= report["totals"].keys()
    assert set(report["accuracy"]) == {"float", "simulated", "integer", "onnx"}
    assert report["verify"] == {"mismatches": 0, "compared": 64 * 10}
    onnx.checker.check_model(onnx.load("m.onnx"), full_check=True)
    assert "0 mismatching" in out

    code, out, _ = run(["eval", "m.onnx", "--data", "digits"], capsys)
    assert code == 0 and f"{report['accuracy']['onnx']:.2f} %" in out


def test_ort_cpu_avx2_compiles_seven_bit_weights_exactly(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["compile", "models.py:small", "--data", "digits", "--ort-cpu", "avx2", "-o", "m.onnx",
                        "--report", "r.json", "--verify", "--verify-samples", "64"], capsys)
    assert code == 0 and "0 mismatching" in out
    report = json.loads((workdir / "r.json").read_text())
    assert report["ort_cpu"] == "avx2" and report["verify"]["mismatches"] == 0
    assert [layer["w_bits"] for layer in report["layers"]] == [7, 7]  # the 8-bit policy, narrowed
    model = onnx.load("m.onnx")
    assert {p.key: p.value for p in model.metadata_props}["qcompile.ort_cpu"] == "avx2"
    inits = {i.name: i for i in model.graph.initializer}
    weights = [inits[n.input[3 if n.op_type == "QLinearConv" else 1]] for n in model.graph.node
               if n.op_type in ("QLinearConv", "MatMulInteger")]
    assert [w.data_type for w in weights] == [onnx.TensorProto.INT8] * 2


def test_weights_and_pt2(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = run(["compile", "models.py:small", "--weights", "w.pt", "--data", "digits", "-o", "a.onnx"], capsys)
    assert code == 0
    code, _, _ = run(["compile", "m.pt2", "--data", "digits", "-o", "b.onnx", "--verify"], capsys)
    assert code == 0
    x = np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32)
    import onnxruntime as ort

    outs = [ort.InferenceSession(p).run(None, {"input": x})[0] for p in ("a.onnx", "b.onnx")]
    assert outs[0].shape == outs[1].shape == (4, 10)


def test_passes_lists_every_pass_with_options(capsys: pytest.CaptureFixture[str]) -> None:
    from qcompile import PASSES

    code, out, _ = run(["passes"], capsys)
    assert code == 0
    for name in PASSES:
        assert f"{name}:" in out
    assert "steps=32" in out and "policy=w8a8" in out


BAD_INPUTS = [
    (["models.py:branchy", "--input-shape", "1,8,8"], ["cannot trace Branchy", "models.py:"]),
    (["models.py:sigmoid", "--input-shape", "1,8,8"], ["unsupported op", "sin", "abs", "models.py:"]),
    (["models.py:dead", "--data", "digits"], ["always zero"]),
    (["models.py:nan", "--input-shape", "1,8,8"], ["conv.weight", "NaN or Inf"]),
    (["models.py:small", "--input-shape", "3,32,32"],
     ["does not accept inputs of shape (1, 3, 32, 32)", "--input-shape"]),
    (["models.py:small", "--data", "fashion-mnist:nowhere"], ["no Fashion-MNIST files in nowhere"]),
    (["models.py:small", "--data", "digits", "--pipeline", "canonicalize,nope"],
     ["unknown pass 'nope'", "character 14"]),
    (["models.py:missing", "--data", "digits"], ["has no 'missing'"]),
    (["nofile.py:small", "--data", "digits"], ["no such model file"]),
    (["models.py:small", "--data", "digits", "--policy", "w4x"], ["unknown policy 'w4x'"]),
    (["models.py:small", "--data", "digits", "--target", "integer", "--ort-cpu", "avx2"],
     ["--ort-cpu avx2", "drop it for target integer"]),
]


@pytest.mark.parametrize(("args", "fragments"), BAD_INPUTS, ids=[a[0] + "-" + a[-1] for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line(workdir: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                               fragments: list[str]) -> None:
    code, _, err = run(["compile", *args, "-o", "out.onnx"], capsys)
    assert_one_line_error(code, err, *fragments)
    assert not (workdir / "out.onnx").exists()


def test_corrupt_files(saved: Path, capsys: pytest.CaptureFixture[str]) -> None:
    workdir = saved
    (workdir / "trunc.pt").write_bytes((workdir / "w.pt").read_bytes()[:200])
    (workdir / "trunc.pt2").write_bytes((workdir / "m.pt2").read_bytes()[:400])
    torch.save({"conv.weight": torch.zeros(3)}, workdir / "other.pt")
    cases = [
        (["trunc.pt2", "--input-shape", "1,8,8"], ["trunc.pt2 is not a readable torch.export program"]),
        (["models.py:small", "--weights", "trunc.pt", "--data", "digits"], ["cannot read weights trunc.pt"]),
        (["models.py:small", "--weights", "other.pt", "--data", "digits"], ["do not match the model", "conv.bias"]),
        (["models.py:small", "--weights", "absent.pt", "--data", "digits"], ["no such weights file"]),
    ]
    for args, fragments in cases:
        code, _, err = run(["compile", *args, "-o", "out.onnx"], capsys)
        assert_one_line_error(code, err, *fragments)
    code, _, err = run(["eval", "trunc.pt", "--data", "digits"], capsys)
    assert_one_line_error(code, err, "not a loadable ONNX model")


def test_existing_output_is_kept_unless_force(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (workdir / "out.onnx").write_bytes(b"precious")
    code, _, err = run(["compile", "models.py:small", "--data", "digits", "-o", "out.onnx"], capsys)
    assert_one_line_error(code, err, "out.onnx already exists", "--force")
    assert (workdir / "out.onnx").read_bytes() == b"precious"
    code, _, _ = run(["compile", "models.py:small", "--data", "digits", "-o", "out.onnx", "--force"], capsys)
    assert code == 0
    onnx.checker.check_model(onnx.load("out.onnx"), full_check=True)


def test_debug_shows_traceback(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["compile", "models.py:nan", "--input-shape", "1,8,8", "-o", "o.onnx", "--debug"], capsys)
    assert code != 0 and "Traceback" in err


def test_console_script_exit_status() -> None:
    result = subprocess.run([sys.executable, "-m", "qcompile.cli", "eval", "missing.onnx", "--data", "digits"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: no such file: missing.onnx"


def test_demo_runs_and_prints_zero_mismatches(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["demo", "--epochs", "3", "--policies", "w8a8,aqt"], capsys)
    assert code == 0
    assert "0 mismatching output elements" in out
    assert "aqt" in out and "w8a8" in out


def test_plugin_registers_passes_and_bad_plugin_is_one_line(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plugin = Path(__file__).parent.parent / "examples" / "custom_pass.py"
    code, out, _ = run(["passes", "--plugin", str(plugin)], capsys)
    assert code == 0 and "keep-extreme-8bit:" in out and "ratio=8.0" in out
    code, _, err = run(["passes", "--plugin", "no_such_plugin_module"], capsys)
    assert_one_line_error(code, err, "cannot import module 'no_such_plugin_module'")


def test_print_ir_and_dump_dir(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["compile", "models.py:small", "--data", "digits", "--policy", "w4a8", "-o", "m.onnx",
                        "--print-ir-after-all", "--dump-dir", "dump"], capsys)
    assert code == 0
    assert "IR after lower-integer" in err and "IntConv2d[conv]" in err
    names = sorted(p.name for p in (workdir / "dump").iterdir())
    assert "07-lower-integer.png" in names and "01-canonicalize.dot" in names and "03-insert-quantizers.txt" in names
    dot = (workdir / "dump" / "07-lower-integer.dot").read_text()
    assert "digraph" in dot and "4 bits" in dot
    assert (workdir / "dump" / "07-lower-integer.png").read_bytes()[:4] == b"\x89PNG"


def test_search_aqt_from_the_command_line(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = run(["compile", "models.py:small", "--data", "digits", "--search", "aqt", "--epochs", "1",
                      "-o", "aqt.onnx", "--report", "r.json", "--verify", "--verify-samples", "64"], capsys)
    assert code == 0
    report = json.loads((workdir / "r.json").read_text())
    assert report["verify"]["mismatches"] == 0
    assert "aqt{epochs=1}" in report["pipeline"]
    assert [(layer["w_bits"], layer["a_bits"]) for layer in report["layers"]] == [(8, 8), (8, 8)]


SEARCH_ERRORS = [
    (["--search", "nope"], ["unknown search 'nope'", "aqt", "assign-bitwidths"]),
    (["--search", "aqt", "--fraction", "1.5"], ["fraction must lie in (0, 1)"]),
    (["--search", "aqt", "--epochs", "0"], ["epochs must be positive"]),
    (["--search", "assign-bitwidths", "--epochs", "2"], ["has no option --epochs"]),
    (["--search", "aqt", "--pipeline", "canonicalize"], ["give one of them"]),
    (["--search", "aqt", "--distill", "1.5"], ["aqt distill must lie in [0, 1], got 1.5"]),
    (["--search", "bsq", "--alpha", "-1"], ["alpha must be >= 0"]),
    (["--search", "assign-bitwidths", "--distill", "0.5"], ["has no option --distill"]),
    (["--search", "bsq", "--option", "finetune_from"], ["--option finetune_from: expected NAME=VALUE", "alpha"]),
    (["--search", "bsq", "--option", "colour=red"], ["--option colour=red: expected NAME=VALUE"]),
    (["--search", "bsq", "--alpha", "1", "--option", "alpha=2"], ["alpha is also given as --alpha"]),
    (["--search", "bsq", "--option", "finetune_from=scratch"], ["finetune_from must be one of float, bsq"]),
]


@pytest.mark.parametrize(("args", "fragments"), SEARCH_ERRORS, ids=[" ".join(a) for a, _ in SEARCH_ERRORS])
def test_search_bad_input_is_one_line(workdir: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                      fragments: list[str]) -> None:
    code, _, err = run(["compile", "models.py:small", "--data", "digits", *args, "-o", "out.onnx"], capsys)
    assert_one_line_error(code, err, *fragments)


def test_learned_search_needs_labels(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["compile", "models.py:small", "--data", "random", "--input-shape", "1,8,8", "--search", "aqt",
                        "-o", "out.onnx"], capsys)
    assert_one_line_error(code, err, "learns from labelled data")


@pytest.mark.parametrize(("flags", "spec"), [
    (["--search", "bsq", "--alpha", "0.5"], "bsq{epochs=1,alpha=0.5}"),
    (["--search", "aqt", "--distill", "0.5"], "aqt{epochs=1,distill=0.5}"),
    (["--search", "bsq", "--option", "finetune_from=bsq", "--option", "finetune_grid=channel"],
     "bsq{epochs=1,finetune_from=bsq,finetune_grid=channel}"),
], ids=["bsq-alpha", "aqt-distill", "bsq-option"])
def test_search_options_from_the_command_line(workdir: Path, capsys: pytest.CaptureFixture[str], flags: list[str],
                                              spec: str) -> None:
    code, _, _ = run(["compile", "models.py:small", "--data", "digits", *flags, "--epochs", "1", "-o", "s.onnx",
                      "--report", "r.json", "--verify", "--verify-samples", "32"], capsys)
    assert code == 0
    report = json.loads((workdir / "r.json").read_text())
    assert spec in report["pipeline"] and report["verify"]["mismatches"] == 0


def test_apot_quantizer_from_the_command_line(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["compile", "models.py:small", "--data", "digits", "--quantizer", "apot", "--w-bits", "3",
                        "--epochs", "1", "--policy", "w3a8", "-o", "apot.onnx", "--report", "r.json", "--verify",
                        "--verify-samples", "64"], capsys)
    assert code == 0
    report = json.loads((workdir / "r.json").read_text())
    assert "insert-quantizers{scheme=apot}" in report["pipeline"] and "apot{" in report["pipeline"]
    assert report["verify"]["mismatches"] == 0
    assert [(layer["w_bits"], layer["terms"]) for layer in report["layers"]] == [(3, 1), (3, 1)]
    assert report["totals"]["multiplier_free_percent"] == 100.0 and "multiplier-free: 100.00 %" in out
    onnx.checker.check_model(onnx.load(str(workdir / "apot.onnx")), full_check=True)


APOT_ERRORS = [
    (["--quantizer", "apot", "--w-bits", "1"], ["--w-bits 1", "2..7 bits"]),
    (["--quantizer", "apot", "--w-bits", "9"], ["--w-bits 9", "2..7 bits"]),
    (["--quantizer", "int4"], ["unknown quantizer 'int4'", "uniform, apot"]),
    (["--w-bits", "3"], ["--w-bits sets APoT weight bits", "--quantizer apot"]),
    (["--quantizer", "apot", "--search", "bsq"], ["drop --search bsq"]),
]


@pytest.mark.parametrize(("args", "fragments"), APOT_ERRORS, ids=[" ".join(a) for a, _ in APOT_ERRORS])
def test_apot_bad_input_is_one_line(workdir: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                    fragments: list[str]) -> None:
    code, _, err = run(["compile", "models.py:small", "--data", "digits", *args, "-o", "out.onnx"], capsys)
    assert_one_line_error(code, err, *fragments)
    assert not (workdir / "out.onnx").exists()
