"""Shared helpers for the benchmark scripts: flags, seeds, timing, cached float training, tables.

Not part of the package or the test run. Trained float weights are cached under ``benchmarks/.cache/``
(ignored by git through ``benchmarks/.cache/.gitignore``, written on first use); delete the folder to
retrain.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from onnxruntime.quantization import CalibrationDataReader
from torch import nn

import qcompile
from qcompile.data import Dataset
from qcompile.report import format_table

CACHE_DIR = Path(__file__).resolve().parent / ".cache"
SEED = 0


# ----------------------------------------------------------------------------------------------- flags


def parser(description: str, epochs: int | None = None, repeats: int = 20) -> argparse.ArgumentParser:
    """An ArgumentParser with the flags every benchmark shares (--quick, --seed, --repeats[, --epochs])."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a fast smoke run: less data, fewer epochs and repeats")
    p.add_argument("--seed", type=int, default=SEED, help="seed for torch, numpy and random (default %(default)s)")
    p.add_argument("--repeats", type=int, default=repeats, help="timed repeats per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up runs before timing")
    if epochs is not None:
        p.add_argument("--epochs", type=int, default=epochs, help="float training epochs (default %(default)s)")
        p.add_argument("--retrain", action="store_true", help="ignore the cached float weights and train again")
        p.add_argument("--threads", type=int, default=0,
                       help="torch threads for training (default 0: every core; 1 when runs share the machine)")
    return p


def seed_everything(seed: int = SEED) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def quiet_warnings() -> None:
    """Silence deprecation chatter (torch.ao, the legacy ONNX exporter) so that tables stay readable."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.getLogger("torch").setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    """Seconds per call over ``repeats`` timed runs (after warm-up)."""

    median: float
    minimum: float
    repeats: int

    @property
    def ms(self) -> float:
        return 1e3 * self.median


def measure(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3) -> Timing:
    """Median (and min) wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), min(times), len(times))


def measure_interleaved(fns: dict[str, Callable[[], Any]], repeats: int = 20, warmup: int = 3) -> dict[str, Timing]:
    """Median (and min) wall time of each ``fns[k]()``, the calls interleaved round by round.

    Every round runs each function once in turn, so a change in machine load touches all of them alike
    and the ratios between them hold even on a busy machine.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(1, repeats)):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: Timing(statistics.median(v), min(v), len(v)) for k, v in times.items()}


class Reader(CalibrationDataReader):
    """onnxruntime's quantize_static calibration reader over fixed input batches (the input named ``name``)."""

    def __init__(self, name: str, batches: list[torch.Tensor]) -> None:
        self.name, self.batches = name, batches
        self.it = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        b = next(self.it, None)
        return None if b is None else {self.name: b.numpy()}

    def rewind(self) -> None:
        self.it = iter(self.batches)


class Stopwatch:
    """``with Stopwatch() as t: ...`` then ``t.seconds``."""

    seconds: float = 0.0

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


# ------------------------------------------------------------------------------------------------ data


def subset(data: Dataset, train: int | None = None, test: int | None = None) -> Dataset:
    """The first ``train``/``test`` samples of each split (a fixed-seed shuffle of the training split)."""
    xt, yt = data.x_train, data.y_train
    if train is not None and train < len(xt):
        order = torch.randperm(len(xt), generator=torch.Generator().manual_seed(SEED))[:train]
        xt, yt = xt[order], None if yt is None else yt[order]
    xs, ys = data.x_test, data.y_test
    if test is not None and test < len(xs):
        xs, ys = xs[:test], None if ys is None else ys[:test]
    return Dataset(data.name, xt, yt, xs, ys)


# ----------------------------------------------------------------------------------- cached training


def _ensure_cache_dir() -> Path:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    ignore = CACHE_DIR / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# benchmark cache (trained float weights): never committed\n*\n")
    return CACHE_DIR


def trained(factory: Callable[[], nn.Module], name: str, data: Dataset, epochs: int, seed: int = SEED,
            lr: float = 3e-3, batch: int = 64, retrain: bool = False,
            threads: int | None = None) -> tuple[nn.Module, bool, float]:
    """A float model trained with ``qcompile.models.train_float`` (Adam, one-cycle, fixed seed), cached.

    The cache key holds the model name, data set, training-set size, epochs, seed, lr and batch.
    Returns (model in eval mode, whether it came from the cache, training seconds; 0 when cached).
    """
    from qcompile.models import train_float

    if data.y_train is None:
        raise ValueError(f"{data.name} has no labels to train on")
    key = f"{name}-{data.name}-n{len(data.x_train)}-e{epochs}-s{seed}-lr{lr:g}-b{batch}.pt"
    path = _ensure_cache_dir() / key
    torch.manual_seed(seed)
    model = factory()
    if path.exists() and not retrain:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval(), True, 0.0
    old = torch.get_num_threads()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    try:
        with Stopwatch() as sw:
            model = train_float(model, data.x_train, data.y_train, epochs=epochs, batch=batch, lr=lr, seed=seed,
                                progress=sys.stderr.isatty())
    finally:
        torch.set_num_threads(old)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model.eval(), False, sw.seconds


# ---------------------------------------------------------------------------------------------- output


def table(headers: list[str], rows: list[list[Any]], title: str | None = None) -> str:
    """Print (and return) an aligned table, with an optional title line above it."""
    text = format_table(headers, rows)
    if title:
        text = f"{title}\n{text}"
    print(text, flush=True)
    print(flush=True)
    return text


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    """The SIMD features that decide onnxruntime's integer kernels (AVX2, AVX-512, VNNI)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                keep = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"]
                return " ".join(f for f in keep if f in have) or "no AVX2"
    except OSError:
        pass
    return "unknown"


def header(title: str, args: argparse.Namespace | None = None) -> None:
    """Print what ran where: the script, the date, the CPU, and library versions."""
    import onnxruntime

    print(f"== {title} ==")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; CPU: {cpu_name()} ({os.cpu_count()} cores; {cpu_flags()}); "
          f"python {platform.python_version()}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
          f"qcompile {qcompile.__version__}")
    if args is not None:
        print("flags: " + ", ".join(f"{k}={v}" for k, v in sorted(vars(args).items())))
    print(flush=True)
