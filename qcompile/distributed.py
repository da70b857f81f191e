"""Data-parallel training under ``torchrun``: process group, data shards, and reductions that keep ranks equal.

``torchrun --nproc_per_node N -m qcompile compile ...`` (or any script calling the trainer) starts N
processes with ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``/``MASTER_ADDR`` in their environment. ``setup()``
joins them into one process group (gloo on the CPU; nccl when the trainer runs on CUDA devices) the first
time a trainer needs it; with one process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) every helper here is a
no-op, so single-process code paths are unchanged.

What keeps the ranks identical (the trainer's contract):
* parameters: DistributedDataParallel broadcasts rank 0's parameters at the start and averages every
  gradient, so the same optimizer steps run on the same values on every rank (gates and ranges included);
* calibration statistics: an activation quantizer's batch statistic is reduced over the ranks before the
  EMA (``reduce_max`` for max|x| and the minimum, ``reduce_mean`` for a percentile), so the EMA follows the
  global batch and every rank holds the same bound;
* data: every rank draws the same permutation of the training set and takes its own slice
  (``shard``), trimmed so that all ranks run the same number of steps.
Only rank 0 writes files and shows progress bars (``is_main()``).

Not handled: more than one node's worth of error handling (a rank that dies leaves the others waiting on a
collective until torchrun's own timeout), model parallelism, gradient accumulation.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def requested_world_size() -> int:
    """The number of processes torchrun started (1 outside torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def setup(device: str = "cpu") -> bool:
    """Join the torchrun process group once (gloo on CPU, nccl on CUDA); True when running distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if requested_world_size() <= 1 or not dist.is_available():
        return False
    backend = "nccl" if device.startswith("cuda") and dist.is_nccl_available() else "gloo"
    dist.init_process_group(backend=backend)
    return dist.get_world_size() > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank: from the process group, else from torchrun's ``RANK`` (0 outside torchrun)."""
    if active():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def shard(order: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a permutation shared by all ranks; every slice has the same length."""
    n = world_size()
    if n == 1:
        return order
    per_rank = len(order) // n
    return order[rank() * per_rank : (rank() + 1) * per_rank]


def _reduce(value: torch.Tensor, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
    out = value.detach().clone()
    dist.all_reduce(out, op=op)
    return out


def reduce_max(value: torch.Tensor) -> torch.Tensor:
    return _reduce(value, dist.ReduceOp.MAX) if active() else value


def reduce_min(value: torch.Tensor) -> torch.Tensor:
    return _reduce(value, dist.ReduceOp.MIN) if active() else value


def reduce_sum(value: torch.Tensor) -> torch.Tensor:
    return _reduce(value, dist.ReduceOp.SUM) if active() else value


def reduce_mean(value: torch.Tensor) -> torch.Tensor:
    return reduce_sum(value) / world_size() if active() else value


def barrier() -> None:
    if active():
        dist.barrier()
