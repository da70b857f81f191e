"""Checkpoints on the command line never lose work: kept without --resume/--force, resumed with a message."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qcompile.cli import main

TINY = str(Path(__file__).parent.parent / "examples" / "tiny_model.py") + ":make_model"


def compile_aqt(tmp_path: Path, *extra: str, epochs: str = "1") -> list[str]:
    return ["compile", TINY, "--data", "digits", "--search", "aqt", "--epochs", epochs, "--fraction", "0.2",
            "-o", str(tmp_path / "m.onnx"), "--no-progress", *extra]


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--resume"], "--resume continues a checkpoint; pass the file with --checkpoint FILE"),
    (["--resume", "--checkpoint", "missing.pt"], "--resume: there is no checkpoint missing.pt; fix the path"),
])
def test_resume_without_a_checkpoint_file_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      extra: list[str], fragment: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(compile_aqt(tmp_path, *extra)) == 2
    assert fragment in error_line(capsys.readouterr().err)
    assert not (tmp_path / "m.onnx").exists()


def test_checkpoint_needs_a_search(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["compile", TINY, "--data", "digits", "-o", str(tmp_path / "m.onnx"), "--checkpoint", "c.pt"]
    assert main(args) == 2
    assert "--checkpoint is written by a learned search" in error_line(capsys.readouterr().err)


def test_an_existing_checkpoint_is_kept_then_forced_then_resumed(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "run.pt"
    ckpt.write_bytes(b"an earlier run")
    assert main(compile_aqt(tmp_path, "--checkpoint", str(ckpt))) == 2
    assert "already exists; pass --resume to continue it, --force" in error_line(capsys.readouterr().err)
    assert ckpt.read_bytes() == b"an earlier run"

    assert main(compile_aqt(tmp_path, "--checkpoint", str(ckpt), "--force")) == 0  # replaced: one epoch
    assert torch.load(ckpt, weights_only=True)["epochs_done"] == 1
    capsys.readouterr()

    assert main(compile_aqt(tmp_path, "--checkpoint", str(ckpt), "--resume", "--force", epochs="2")) == 0
    err = capsys.readouterr().err
    assert f"resuming from {ckpt}: 1 epoch done, continuing at epoch 2 of 2" in err
    assert torch.load(ckpt, weights_only=True)["epochs_done"] == 2


def test_resuming_under_another_search_names_the_difference(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "run.pt"
    assert main(compile_aqt(tmp_path, "--checkpoint", str(ckpt))) == 0
    capsys.readouterr()
    args = ["compile", TINY, "--data", "digits", "--search", "bayesian-bits", "--epochs", "1", "--mu", "0.1",
            "--checkpoint", str(ckpt), "--resume", "-o", str(tmp_path / "b.onnx"), "--no-progress"]
    assert main(args) == 2
    line = error_line(capsys.readouterr().err)
    assert "was written for another model or search" in line and "it lacks '" in line, line
