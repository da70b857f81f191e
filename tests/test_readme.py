"""Every fenced bash and python block of README.md runs as written.

Each block runs in a fresh folder holding a link to examples/ (the snippets use repository-relative
paths) and, for every block but the one that makes it, the `tiny.pt` that block makes (the only thing
one block takes from another); `qcompile`, `python` and `torchrun` run this checkout with this
interpreter. Blocks without a language are outputs or pipeline texts, not commands. The set-up commands
(a fresh venv and pip installs) are the one exception: .ci/run runs exactly those on a fresh machine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
SET_UP = "python3 -m venv"
MAKES_TINY = "python examples/train_tiny.py tiny.pt"


def snippets() -> list[tuple[str, str, int]]:
    """(language, text, line) of every bash/python block of the README, set-up commands left out."""
    text = (ROOT / "README.md").read_text()
    found = []
    for match in FENCE.finditer(text):
        lang, body = match.group(1), match.group(2)
        if lang in ("bash", "python") and SET_UP not in body:
            found.append((lang, body, text.count("\n", 0, match.start()) + 1))
    return found


def run_snippet(lang: str, body: str, work: Path) -> subprocess.CompletedProcess[str]:
    (work / "examples").symlink_to(ROOT / "examples")
    bin_dir = work / ".bin"
    bin_dir.mkdir()
    for name, target in [("qcompile", "-m qcompile"), ("python", ""), ("torchrun", "-m torch.distributed.run")]:
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}" {target} "$@"\n')
        script.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}
    script = work / (".snippet.sh" if lang == "bash" else ".snippet.py")
    script.write_text(body)
    command = ["bash", "-euo", "pipefail", str(script)] if lang == "bash" else [sys.executable, str(script)]
    return subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, check=False, timeout=600)


@pytest.fixture(scope="module")
def tiny_pt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny.pt the README's first block makes, made the way it says."""
    work = tmp_path_factory.mktemp("tiny")
    result = run_snippet("bash", MAKES_TINY + "\n", work)
    assert result.returncode == 0, result.stderr[-2000:]
    return work / "tiny.pt"


def test_the_readme_has_the_snippets_it_promises() -> None:
    found = snippets()
    langs = [lang for lang, _, _ in found]
    assert langs.count("python") >= 2 and langs.count("bash") >= 5
    assert MAKES_TINY in found[0][1]  # the first command makes what the others use
    bodies = "\n".join(body for _, body, _ in found)
    assert " model.py:make" not in bodies


@pytest.mark.parametrize(("lang", "body", "line"), snippets(), ids=[f"line{line}" for _, _, line in snippets()])
def test_readme_snippet_runs_as_written(lang: str, body: str, line: int, tmp_path: Path, tiny_pt: Path) -> None:
    if MAKES_TINY not in body:
        shutil.copy(tiny_pt, tmp_path / "tiny.pt")
    result = run_snippet(lang, body, tmp_path)
    assert result.returncode == 0, f"README.md line {line}:\n{body}\n{result.stdout[-1500:]}{result.stderr[-3000:]}"
