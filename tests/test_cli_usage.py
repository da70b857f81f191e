"""The command line before any work: fast --help, --version, one-line usage errors, thread counts, Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import qcompile
from qcompile import threads
from qcompile.cli import main

ROOT = Path(__file__).parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_help_import_and_missing_files_do_not_import_torch() -> None:
    code = ("import sys, contextlib, io, qcompile\nfrom qcompile.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
            "assert main(['compile', 'nofile.py:make', '-o', 'x.onnx']) == 2\n"
            "assert main(['eval', 'nofile.onnx', '--data', 'digits']) == 2\n"
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=True)
    assert result.stdout.strip() == "False", result.stderr
    assert result.stderr.splitlines() == ["error: no such model file: nofile.py", "error: no such file: nofile.onnx"]


@pytest.mark.parametrize("name", ["load_data", "Stage", "QCompileError"])
def test_any_public_name_can_come_first(name: str) -> None:
    code = f"import qcompile; print(qcompile.{name}.__name__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=False)
    assert result.returncode == 0 and result.stdout.strip() == name, result.stderr[-2000:]


def test_public_api_is_there_on_first_use() -> None:
    assert set(qcompile.__all__) == set(qcompile._EXPORTS)
    for name in qcompile.__all__:
        assert getattr(qcompile, name) is not None
    assert callable(qcompile.compile) and qcompile.Stage.INTEGER
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        qcompile.nope  # noqa: B018


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"qcompile {qcompile.__version__}"


def test_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ([], ["compile"], ["sweep"], ["demo"], ["eval"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        out = capsys.readouterr().out
        assert "``" not in out and ":func:" not in out and "usage: qcompile" in out


USAGE_ERRORS = [
    (["compile", "m.py:f", "--polcy", "aqt", "-o", "a.onnx"], "did you mean --policy?", "qcompile compile"),
    (["compile", "m.py:f", "--polcy=aqt", "-o", "a.onnx"], "did you mean --policy?", "qcompile compile"),
    (["sweep", "m.py:f", "--baselnes", "w8a8"], "did you mean --baselines?", "qcompile sweep"),
    (["compil", "m.py:f"], "did you mean compile?", "qcompile"),
    (["compile", "m.py:f"], "required: -o/--output", "qcompile compile"),
    (["compile", "m.py:f", "-o", "a.onnx", "--threads", "0"], "not a positive whole number", "qcompile compile"),
    (["compile", "m.py:f", "-o", "a.onnx", "--input-shape", "a,b"], "not a shape", "qcompile compile"),
    (["eval", "a.onnx"], "required: --data", "qcompile eval"),
    ([], "required: command", "qcompile"),
]


@pytest.mark.parametrize(("args", "fragment", "prog"), USAGE_ERRORS, ids=lambda v: " ".join(v) if isinstance(v, list)
                         else None)
def test_usage_errors_are_one_line(args: list[str], fragment: str, prog: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("error: ") and fragment in line
    assert line.endswith(f"see `{prog} --help`"), line


def test_thread_defaults_do_not_oversubscribe(monkeypatch: pytest.MonkeyPatch) -> None:
    cores = threads.usable_cores()
    assert threads.default_threads() == max(1, cores - threads.ORT_THREADS)
    assert threads.default_threads() + threads.ORT_THREADS <= max(cores, 2)
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert threads.configure(None) == threads.default_threads() == torch.get_num_threads()
        assert threads.configure(3) == 3 == torch.get_num_threads()
        with threads.fixed_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        assert threads.configure(None) == 2  # the environment's choice is kept
        assert main(["passes", "--threads", "3"]) == 0
        assert torch.get_num_threads() == 2  # main() in a process leaves the count as it found it
    finally:
        torch.set_num_threads(before)


def _compile(tmp_path: Path, count: int, *extra: str) -> subprocess.CompletedProcess[str]:
    out = tmp_path / f"t{count}.onnx"
    args = [sys.executable, "-m", "qcompile", "compile", "qcompile.models:SmallResNet", "--data", "random",
            "--input-shape", "1,16,16", "--policy", "aqt", "-o", str(out), "--threads", str(count), *extra]
    return subprocess.run(args, capture_output=True, text=True, env=ENV, timeout=300, check=False)


def test_post_training_compile_is_the_same_bytes_at_1_and_2_threads(tmp_path: Path) -> None:
    """Also: without --weights the factory's init is seeded (two processes, same bytes) and one warning says so."""
    runs = [_compile(tmp_path, count) for count in (1, 2)]
    for result in runs:
        assert result.returncode == 0, result.stderr[-2000:]
        warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
        assert len(warnings) == 1 and "no --weights" in warnings[0] and "untrained" in warnings[0]
    assert (tmp_path / "t1.onnx").read_bytes() == (tmp_path / "t2.onnx").read_bytes()


INTERRUPTIBLE = textwrap.dedent(
    """
    import pathlib, time
    import torch
    from torch import nn

    class Slow(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            if isinstance(x, torch.fx.Proxy):  # inside torch.fx's tracer
                pathlib.Path("started").write_text("1")
                time.sleep(60)
            return self.fc(x.flatten(1))

    def make():
        return Slow()
    """
)


def test_ctrl_c_while_tracing_is_one_line_and_130(tmp_path: Path) -> None:
    (tmp_path / "slow.py").write_text(INTERRUPTIBLE)
    proc = subprocess.Popen([sys.executable, "-m", "qcompile", "compile", "slow.py:make", "--input-shape", "1,8,8",
                             "-o", "s.onnx"], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "started").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["error: interrupted"], err
    assert not (tmp_path / "s.onnx").exists()


def test_ctrl_c_swallowed_by_a_library_still_reports_the_interrupt(monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """A library that turns our KeyboardInterrupt into its own error is reported as the interruption."""
    from qcompile import cli, cli_usage

    def swallowing(args: object) -> int:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            raise RuntimeError("cannot trace: something went wrong") from None
        return 0

    monkeypatch.setitem(cli.COMMANDS, "passes", swallowing)
    monkeypatch.setitem(cli_usage._state, "interrupted", False)
    previous = signal.getsignal(signal.SIGINT)
    try:
        assert main(["passes"]) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
        cli_usage._state["interrupted"] = False
    assert one_line(capsys.readouterr().err) == "error: interrupted"


def test_shape_mismatches_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    tiny = str(ROOT / "examples" / "tiny_model.py") + ":make_model"
    assert main(["compile", tiny, "--data", "digits", "--input-shape", "1,9,9", "-o", "a.onnx"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "--input-shape 1,9,9 does not match the samples of 'digits' (1,8,8)" in line
    assert main(["compile", tiny, "--data", "digits", "-o", "d.onnx", "--no-progress"]) == 0
    capsys.readouterr()
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "big.npz", x=rng.normal(size=(8, 1, 28, 28)).astype(np.float32), y=rng.integers(0, 10, 8))
    assert main(["eval", "d.onnx", "--data", "big.npz"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "takes inputs of shape 1,8,8" in line and "are 1,28,28" in line
