"""Thread counts: a default that does not oversubscribe the machine, and calibration at a fixed count.

Every onnxruntime session qcompile opens uses one intra-op thread (``backends/ort.py``). The torch
intra-op pool gets the usable cores less that one, at least 1: ``max(1, cores - 1)``, so the two pools
together never ask for more than the cores (on a 1-core machine both get one thread; they never run at
the same time). ``OMP_NUM_THREADS`` set in the environment is respected when no count is given.

What depends on the thread count, and what does not:

* the integer graph, its executors and the export are exact integer arithmetic: no thread dependence;
* calibration (the float forward passes that set the activation ranges) runs at one torch thread
  whatever the pool size (``fixed_threads``), so a post-training compile gives the same ONNX bytes at
  any thread count;
* training (the learned searches, the demo's float model) sums gradients in an order that depends on the
  thread count, so a trained search is reproducible at a fixed thread count only (``--threads N``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

ORT_THREADS = 1  # what backends.ort.session uses


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """Torch intra-op threads that leave one core to onnxruntime: ``max(1, cores - 1)``."""
    return max(1, usable_cores() - ORT_THREADS)


def configure(threads: int | None) -> int:
    """Set torch's intra-op pool: ``threads``, else ``OMP_NUM_THREADS`` if set, else ``default_threads()``."""
    import torch

    if threads is None and os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    count = threads if threads is not None else default_threads()
    torch.set_num_threads(count)
    return count


@contextmanager
def configured(threads: int | None) -> Iterator[int]:
    """``configure(threads)`` for the body, then the count it had before."""
    import torch

    before = torch.get_num_threads()
    try:
        yield configure(threads)
    finally:
        torch.set_num_threads(before)


@contextmanager
def fixed_threads(count: int = 1) -> Iterator[None]:
    """Run the body with ``count`` torch intra-op threads, then restore the previous count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
