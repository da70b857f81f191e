"""Every example runs as a user would run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


@pytest.mark.parametrize("script", [p for p in EXAMPLES if p.name != "tiny_model.py"], ids=lambda p: p.name)
def test_example_runs(script: Path, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                            check=False, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_tiny_model_compiles_from_the_command_line(tmp_path: Path) -> None:
    model = Path(__file__).parent.parent / "examples" / "tiny_model.py"
    out = tmp_path / "tiny.onnx"
    result = subprocess.run([sys.executable, "-m", "qcompile.cli", "compile", f"{model}:make_model", "--data",
                             "digits", "-o", str(out), "--verify", "--no-progress"], capture_output=True, text=True,
                            check=False, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.is_file() and "0 mismatching" in result.stdout
