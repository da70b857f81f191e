"""Every fenced bash and python block of README.md runs as written, in order, in one fresh folder.

The folder holds a link to examples/ (the snippets use repository-relative paths) and `qcompile`,
`python` and `torchrun` run this checkout with this interpreter. Blocks without a language are
outputs or pipeline texts, not commands. The set-up commands (a fresh venv and pip installs) are the
one exception: .ci/run runs exactly those on a fresh machine.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parent.parent
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
SET_UP = "python3 -m venv"


def snippets() -> list[tuple[str, str, int]]:
    """(language, text, line) of every bash/python block of the README, set-up commands left out."""
    text = (ROOT / "README.md").read_text()
    found = []
    for match in FENCE.finditer(text):
        lang, body = match.group(1), match.group(2)
        if lang in ("bash", "python") and SET_UP not in body:
            found.append((lang, body, text.count("\n", 0, match.start()) + 1))
    return found


def shims(folder: Path) -> Path:
    folder.mkdir()
    for name, target in [("qcompile", "-m qcompile"), ("python", ""), ("torchrun", "-m torch.distributed.run")]:
        script = folder / name
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}" {target} "$@"\n')
        script.chmod(0o755)
    return folder


def test_the_readme_has_the_snippets_it_promises() -> None:
    found = snippets()
    langs = [lang for lang, _, _ in found]
    assert langs.count("python") >= 2 and langs.count("bash") >= 5
    bodies = "\n".join(body for _, body, _ in found)
    assert " model.py:make" not in bodies and "python examples/train_tiny.py tiny.pt" in bodies


def test_every_readme_snippet_runs_as_written(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "examples").symlink_to(ROOT / "examples")
    bin_dir = shims(tmp_path / "bin")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    for index, (lang, body, line) in enumerate(snippets()):
        script = work / f"snippet{index}.{'sh' if lang == 'bash' else 'py'}"
        script.write_text(body)
        command = ["bash", "-euo", "pipefail", str(script)] if lang == "bash" else [sys.executable, str(script)]
        result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, check=False,
                                timeout=600)
        assert result.returncode == 0, f"README.md line {line}:\n{body}\n{result.stdout[-1500:]}{result.stderr[-3000:]}"
        if os.environ.get("QC_TIME_README"):
            print(line, time.perf_counter() - start, flush=True)
            start = time.perf_counter()
