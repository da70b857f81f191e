"""The fuzzer in CI: a fixed-seed, bounded set of mutated ONNX models, .pt2 archives, weights and .npz files,
each run through the CLI in this process; every one must succeed correctly or end in one clean line.
The long version (hundreds of cases, a process per case, hangs and signals) is benchmarks/fuzz.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from cases import BAD, Case, generate
from runner import run_in_process

CASES = [*generate("onnx", 24), *generate("pt2", 6), *generate("weights", 5), *generate("npz", 6)]
FAST = [c for c in CASES if "2000" not in " ".join(c.args)]  # a huge --input-shape: refused, but keep CI fast


@pytest.mark.parametrize("case", FAST, ids=[f"{c.name}-{';'.join(c.notes)}"[:80] for c in FAST])
def test_case_succeeds_correctly_or_fails_cleanly(case: Case, tmp_path: Path) -> None:
    result = run_in_process(case, tmp_path)
    assert result.outcome not in BAD, f"{result.outcome}: {result.detail}"


def test_the_cases_are_reproducible_and_varied() -> None:
    again = [*generate("onnx", 24), *generate("pt2", 6), *generate("weights", 5), *generate("npz", 6)]
    assert [(c.name, c.notes) for c in again] == [(c.name, c.notes) for c in CASES]
    # byte for byte, except .pt2 archives: torch.export.save stamps each archive with a random serialization id
    assert [c.files for c in again if c.kind != "pt2"] == [c.files for c in CASES if c.kind != "pt2"]
    assert len({n.split(" ")[0] for c in CASES if c.kind == "onnx" for n in c.notes}) >= 10
