"""Data-parallel training under torchrun with 2 CPU processes (gloo): every rank ends identical."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import onnx
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_learn_identical_gates_ranges_and_calibration(tmp_path: Path) -> None:
    run = torchrun(str(HERE / "ddp_worker.py"), str(tmp_path), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["shard"].tolist() == [0, 1, 2, 3, 4]  # each rank trains on its own half
    assert ranks[1]["shard"].tolist() == [5, 6, 7, 8, 9]
    for search in ("bayesian-bits", "aqt"):
        a, b = ranks[0][search], ranks[1][search]
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert different == [], f"{search}: ranks differ in {different}"
        assert ranks[0][f"{search}-onnx"] == ranks[1][f"{search}-onnx"]
        assert ranks[0][f"{search}-records"] == ranks[1][f"{search}-records"]
    learned = ranks[0]["bayesian-bits-records"]["bayesian-bits"]["layers"]
    initial = 1.0 / (1.0 + math.exp(-(1.0 + 1.5986)))  # P(z != 0) at gate_init = 1
    moved = [p for layer in learned.values() for p in layer["gate_probabilities"].values()]
    assert moved and any(abs(p - initial) > 0.05 for p in moved)  # the gates learned (identically on both)
    bounds = [v for k, v in ranks[0]["aqt"].items() if k.endswith("_act.amax") and not k.startswith("x_")]
    assert bounds and all(float(v) > 0 for v in bounds)  # calibrated during training (and equal: above)


def test_the_cli_under_torchrun_writes_once_from_rank_zero(tmp_path: Path) -> None:
    run = torchrun("-m", "qcompile", "compile", str(ROOT / "examples" / "tiny_model.py") + ":make_model",
                   "--data", "digits", "--search", "aqt", "--epochs", "1", "-o", "m.onnx", "--report", "r.json",
                   "--verify", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote m.onnx") == 1
    onnx.checker.check_model(onnx.load(str(tmp_path / "m.onnx")), full_check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "r.json"]
