"""Run a fuzz case (in a subprocess with a timeout, or in this process) and classify its outcome (cases.py)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from cases import MARKER, MAX_LINE, SHAPE, WRONG_REL_ERROR, Case

REPO = Path(__file__).resolve().parents[2]
MEMORY_LIMIT = 6 * 2**30  # address space of a forked case; beyond it the case fails with MemoryError


@dataclass(frozen=True)
class Result:
    case: Case
    outcome: str
    detail: str


def _input_shape(case: Case) -> tuple[int, ...]:
    if "--input-shape" in case.args:
        return tuple(int(v) for v in case.args[case.args.index("--input-shape") + 1].split(","))
    return SHAPE


def _inputs(case: Case, folder: Path) -> np.ndarray:
    """Test inputs from the distribution that calibrated the model, at the reference's static batch (or 8)."""
    batch = 8
    if case.reference is not None:
        dims = onnx.load(str(folder / case.reference)).graph.input[0].type.tensor_type.shape.dim
        batch = dims[0].dim_value if dims and dims[0].dim_value > 0 else 8
    if "digits" in case.args:
        from qcompile.data import load_data

        x = load_data("digits").x_test[:batch].numpy()
        return np.ascontiguousarray(x, dtype=np.float32)
    return np.random.default_rng(0).standard_normal((batch, *_input_shape(case))).astype(np.float32)


def _ort_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0], dtype=np.float64)


def _check_success(case: Case, folder: Path) -> tuple[str, str]:
    out = folder / "out.onnx"
    try:
        onnx.checker.check_model(onnx.load(str(out)), full_check=True)
        x = _inputs(case, folder)
        got = _ort_outputs(out, x)
    except Exception as exc:  # noqa: BLE001 - any failure of the written model
        return "succeeded but wrong", f"the output fails: {type(exc).__name__}: {str(exc)[:200]}"
    if case.reference is None:
        return "success", ""
    try:
        want = _ort_outputs(folder / case.reference, x)
    except Exception as exc:  # noqa: BLE001 - onnxruntime refuses the input model
        return "success on a model onnxruntime refuses", f"{type(exc).__name__}: {str(exc)[:200]}"
    scale = float(np.linalg.norm(want))
    error = float(np.linalg.norm(got - want)) / scale if scale > 0 else float(np.linalg.norm(got))
    if want.shape != got.shape or not np.isfinite(error) or error > WRONG_REL_ERROR:
        return "succeeded but wrong", f"relative L2 error {error:.3g} vs the float model"
    return "success", f"relative L2 error {error:.3g}"


def classify(case: Case, folder: Path, code: int, stderr: str) -> Result:
    """The outcome of a finished run (see cases.py for the categories)."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if (folder / MARKER).exists():
        return Result(case, "ran code", "the crafted pickle wrote its marker")
    if code < 0:
        return Result(case, "signal", signal.Signals(-code).name)
    if "Traceback (most recent call last)" in stderr:
        return Result(case, "traceback", last[:300])
    if "internal error" in stderr:
        return Result(case, "internal error", last[:300])
    if code != 0:
        clean = len(lines) == 1 and last.startswith("error: ") and len(last) <= MAX_LINE
        return Result(case, "clean error" if clean else "messy error", " | ".join(lines)[:400])
    outcome, detail = _check_success(case, folder)
    return Result(case, outcome, detail)


def command(case: Case) -> list[str]:
    return ["compile", *case.args, "-o", "out.onnx", "--no-progress"]


def run_subprocess(case: Case, folder: Path, timeout: float) -> Result:
    """``python -m qcompile compile ...`` in ``folder`` with one thread; a hang is killed after ``timeout``."""
    case.write(folder)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    try:
        proc = subprocess.run([sys.executable, "-m", "qcompile", *command(case)], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return Result(case, "hang", f"no exit after {timeout:.0f} s")
    return classify(case, folder, proc.returncode, proc.stderr)


def run_forked(case: Case, folder: Path, timeout: float) -> Result:
    """The CLI in a forked child of this (warm) process: a process per case without the import cost of
    ``python -m``; stdout/stderr go to files, a hang is killed after ``timeout``, a signal is seen as such."""
    case.write(folder)
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 70
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))  # a shared machine
            os.chdir(folder)
            for fd, name in ((1, "stdout.txt"), (2, "stderr.txt")):
                os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)  # noqa: SIM115
            from qcompile.cli import main

            code = main(command(case))
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return Result(case, "hang", f"no exit after {timeout:.0f} s")
        time.sleep(0.02)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    stderr = (folder / "stderr.txt").read_text(errors="replace") if (folder / "stderr.txt").exists() else ""
    return classify(case, folder, code, stderr)


def run_in_process(case: Case, folder: Path) -> Result:
    """``qcompile.cli.main`` in this process, in ``folder`` (no timeout; for the fast CI subset)."""
    from qcompile.cli import main

    case.write(folder)
    err, here = io.StringIO(), Path.cwd()
    os.chdir(folder)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(command(case))
    finally:
        os.chdir(here)
    return classify(case, folder, code, err.getvalue())
