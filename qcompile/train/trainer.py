"""The quantization-aware trainer every learned search shares.

It trains a quant-stage graph (fake quantizers with straight-through rounding) on a labelled data set:
* parameters fall into groups with their own optimizers: weights, ranges, gates and bit variables
  (modules expose the last three with ``range_parameters()`` / ``gate_parameters()`` / ``bit_parameters()``;
  no weight decay on any), all Adam;
* AQT's activation rule: during the first ``calibration_fraction`` of the steps every activation quantizer
  observes (activations stay float, amax <- (1 - c) amax + c max|x|), then all of them freeze once, the
  groups that must share a scale are unified, and the bounds never move again;
* every layer's bias is bound to its input's scale at the start of ``fit`` (``graph.bind_input_scales``),
  so that once the input grid is fixed the bias is trained on the int32 grid the lowering will use;
* distillation (``distill`` = lambda > 0): the loss is (1 - lambda) CE(y) + lambda T^2 KL(p_T || q_T) with
  p_T, q_T the softmax at temperature T of the float teacher's and of the quant graph's logits (the teacher
  is a private copy in eval mode, run without gradients);
* an optional ``regularizer()`` is added to the mean task loss (e.g. a BOPs penalty); modules may define
  ``after_step()`` (called after every optimizer step) and ``on_epoch_end`` may ask for fresh optimizers;
* fixed seeds: the batch order of epoch e is a permutation drawn from a generator seeded with (seed, e),
  and the global torch generator (gate samples, ...) is reseeded from (seed, e, rank) at every epoch, so a
  resumed run draws what the uninterrupted one drew;
* a checkpoint after every epoch (model, quantizer settings, optimizers, epoch) and resume from it (which
  says from which epoch); an existing checkpoint is never replaced unless ``resume`` (continue it) or
  ``overwrite`` (start again) says so, ``resume`` without a checkpoint file is refused, and so is a
  checkpoint written for another model, naming the first tensors that differ;
* data parallel under torchrun (``qcompile/distributed.py``): the model and its regularizer run inside one
  DistributedDataParallel module (so gradients of the task loss and of the regularizer are averaged
  together and parameters used only by the regularizer still count as used), every rank trains on its
  shard of the epoch's permutation, activation statistics are reduced over the ranks, the logged loss and
  accuracy are those of all ranks, and only rank 0 writes checkpoints and shows progress. Gates, ranges,
  weights and calibration statistics stay identical on every rank. ``device="cuda"`` trains on
  ``cuda:LOCAL_RANK`` (nccl) and hands the graph back on the CPU.
Learning rates are constant or (``schedule="cosine"``) decay to 0 over the run for weights and ranges;
not handled here: warm-up, other schedules, gradient accumulation.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from qcompile import cost, distributed
from qcompile.errors import QCompileError
from qcompile.files import write_output
from qcompile.ir.shapes import annotate_shapes
from qcompile.quant import graph, integer_sim

if TYPE_CHECKING:  # data imports the passes, which import the searches, which import this module
    from qcompile.data import Dataset


class TrainError(QCompileError):
    pass


SCHEDULES = ("constant", "cosine")
DECAYED = ("weights", "ranges")  # gates and bit variables keep their rate: their decisions need it to the end


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    batch_size: int = 64
    lr: float = 1e-3
    range_lr: float = 1e-3
    gate_lr: float = 1e-3
    bit_lr: float = 1e-2
    calibration_fraction: float = 0.2  # 0: keep the ranges the graph already has
    momentum: float = 0.1
    seed: int = 0
    checkpoint: str = ""
    resume: bool = False
    overwrite: bool = False  # replace an existing checkpoint instead of refusing to start
    progress: bool = False
    device: str = "cpu"  # "cuda": cuda:LOCAL_RANK under torchrun
    schedule: str = "constant"  # or "cosine": weights and ranges decay as (1 + cos(pi t / T)) / 2 over the run
    distill: float = 0.0  # weight lambda of the soft targets of the float teacher, in [0, 1]
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise TrainError(f"the training device must be 'cpu' or 'cuda', got '{self.device}'")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise TrainError("device 'cuda' was asked for but torch sees no CUDA device; use 'cpu'")
        if self.epochs <= 0:
            raise TrainError(f"epochs must be positive, got {self.epochs}")
        if self.schedule not in SCHEDULES:
            raise TrainError(f"unknown learning-rate schedule '{self.schedule}' (known: {', '.join(SCHEDULES)})")
        if not 0.0 <= self.distill <= 1.0:
            raise TrainError(f"the distillation weight must lie in [0, 1], got {self.distill}")
        if not self.temperature > 0.0:
            raise TrainError(f"the distillation temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.calibration_fraction < 1.0:
            raise TrainError(f"the calibration fraction must lie in [0, 1), got {self.calibration_fraction}")
        if self.resume and not self.checkpoint:
            raise TrainError("resume continues a checkpoint, but none is given; pass --checkpoint FILE "
                             "(checkpoint=FILE)")


@dataclass(frozen=True)
class EpochLog:
    epoch: int
    loss: float
    accuracy: float
    rel_bops: float


def _hook_calls(gm: nn.Module, method: str) -> list[Any]:
    """The results of calling ``method()`` on every submodule that defines it."""
    results = []
    for m in gm.modules():
        fn = getattr(m, method, None)
        if callable(fn):
            results.append(fn())
    return results


LEARNED_KINDS = ("ranges", "gates", "bits")


def parameter_groups(gm: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Weights, ranges, gates and bit variables; a parameter a module lists under a kind is not a weight.

    Modules list theirs with ``range_parameters()`` / ``gate_parameters()`` / ``bit_parameters()``.
    """
    groups = {kind: [p for ps in _hook_calls(gm, f"{kind[:-1]}_parameters") for p in ps] for kind in LEARNED_KINDS}
    special = {id(p) for params in groups.values() for p in params}
    weights = [p for p in gm.parameters() if id(p) not in special and p.requires_grad]
    return {"weights": weights, **groups}


def _signature(gm: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in gm.state_dict().items()]


def signature_differences(saved: list[tuple[str, tuple[int, ...]]], ours: list[tuple[str, tuple[int, ...]]],
                          shown: int = 2) -> str:
    """What differs between a checkpoint's tensors and the model's: the first ``shown``, and how many more."""
    have, want = dict(saved), dict(ours)
    found = [f"'{k}' is {_dims(have[k])} there and {_dims(want[k])} here" for k in want if k in have
             and have[k] != want[k]]
    found += [f"it lacks '{k}'" for k in want if k not in have]
    found += [f"it has '{k}', which this model lacks" for k in have if k not in want]
    more = f" (and {len(found) - shown} more)" if len(found) > shown else ""
    return "; ".join(found[:shown]) + more


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape) or "a scalar"


class _Objective(nn.Module):
    """The graph and its regularizer as one module returning (logits, penalty), the unit DDP wraps."""

    def __init__(self, gm: fx.GraphModule, regularizer: Callable[[], torch.Tensor] | None) -> None:
        super().__init__()
        self.gm = gm
        self.penalty = regularizer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gm(x)
        return logits, (self.penalty() if self.penalty is not None else logits.new_zeros(()))


def _device(config: TrainConfig) -> torch.device:
    if config.device == "cpu":
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


@dataclass
class QuantTrainer:
    gm: fx.GraphModule
    data: Dataset
    config: TrainConfig
    regularizer: Callable[[], torch.Tensor] | None = None
    on_step: Callable[[int, fx.GraphModule], None] | None = None
    on_epoch_end: Callable[[int, fx.GraphModule], bool] | None = None  # True: reset the optimizers' state
    teacher: nn.Module | None = None  # the float model, needed when config.distill > 0
    history: list[EpochLog] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.data.y_train is None:
            raise TrainError(f"data '{self.data.name}' has no labels; training needs labelled data")
        self.distributed = distributed.setup(self.config.device)
        annotate_shapes(self.gm, (self.data.x_train[:1],))
        self.device = _device(self.config)
        self.gm.to(self.device)
        self._teacher = self._make_teacher()
        self.optimizers = self._make_optimizers()
        per_rank = len(self.data.x_train) // distributed.world_size()
        if per_rank == 0:
            raise TrainError(f"{len(self.data.x_train)} training samples cannot be split over "
                             f"{distributed.world_size()} processes; use more data or fewer processes")
        self.steps_per_epoch = math.ceil(per_rank / self.config.batch_size)
        total = self.config.epochs * self.steps_per_epoch
        self.freeze_step = math.ceil(self.config.calibration_fraction * total)
        self.quantizers = [q for _, q in graph.act_quants(self.gm)]
        self.model = self._wrap()

    def _make_teacher(self) -> nn.Module | None:
        if self.config.distill == 0.0:
            return None
        if self.teacher is None:
            raise TrainError("distillation needs the float model as teacher; run insert-quantizers in the same "
                             "pipeline or set distill=0")
        teacher = copy.deepcopy(self.teacher).to(self.device).eval()  # private: the student shares no module
        teacher.requires_grad_(False)
        return teacher

    def _loss(self, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        task = F.cross_entropy(logits, y)
        if self._teacher is None:
            return task
        lam, t = self.config.distill, self.config.temperature
        with torch.no_grad():
            soft = F.softmax(self._teacher(x) / t, dim=1)
        kl = F.kl_div(F.log_softmax(logits / t, dim=1), soft, reduction="batchmean")
        return (1.0 - lam) * task + lam * t * t * kl

    def _make_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        groups = parameter_groups(self.gm)
        c = self.config
        lrs = {"weights": c.lr, "ranges": c.range_lr, "gates": c.gate_lr, "bits": c.bit_lr}
        return {k: torch.optim.Adam(v, lr=lrs[k]) for k, v in groups.items() if v}

    def _set_learning_rates(self, step: int) -> None:
        """The cosine schedule as a function of the global step (so a resumed run continues it)."""
        if self.config.schedule == "constant":
            return
        total = self.config.epochs * self.steps_per_epoch
        factor = 0.5 * (1.0 + math.cos(math.pi * step / total))
        base = {"weights": self.config.lr, "ranges": self.config.range_lr}
        for kind in DECAYED:
            for group in self.optimizers[kind].param_groups if kind in self.optimizers else []:
                group["lr"] = base[kind] * factor

    def _wrap(self) -> nn.Module:
        """The objective, inside DistributedDataParallel under torchrun (rank 0's values broadcast)."""
        objective = _Objective(self.gm, self.regularizer)
        if not self.distributed:
            return objective
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(objective, device_ids=ids, find_unused_parameters=True,
                                       forward_sync_buffers=False)

    # ----------------------------------------------------------------------------------- activations

    def _start_calibration(self) -> None:
        for q in self.quantizers:
            q.start_observing("max", self.config.momentum)  # the AQT rule, whatever calibrate used

    def _freeze(self) -> None:
        from qcompile.passes.share_scales import unify

        for q in self.quantizers:
            q.observing = False
            if not q.calibrated or float(q.amax) <= 0:
                raise TrainError("an activation stayed zero during calibration; check the data or the model")
        for group in graph.scale_groups(self.gm):
            unify([graph.act_quant(self.gm, n) for n in group])

    # ------------------------------------------------------------------------------------- training

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's batches of epoch ``epoch``: a slice of one permutation drawn from (seed, epoch)."""
        assert self.data.y_train is not None
        g = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        order = distributed.shard(torch.randperm(len(self.data.x_train), generator=g))
        for start in range(0, len(order), self.config.batch_size):
            idx = order[start : start + self.config.batch_size]
            yield self.data.x_train[idx].to(self.device), self.data.y_train[idx].to(self.device)

    def _step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        if step == 0 and self.freeze_step > 0:
            self._start_calibration()
        if step == self.freeze_step and self.freeze_step > 0:
            self._freeze()
        logits, penalty = self.model(x)
        loss = self._loss(x, logits, y)
        self._set_learning_rates(step)
        for opt in self.optimizers.values():
            opt.zero_grad()
        (loss + penalty).backward()
        for opt in self.optimizers.values():
            opt.step()
        _hook_calls(self.gm, "after_step")  # e.g. clamping bit variables after the optimizer step
        if self.on_step is not None:
            self.on_step(step, self.gm)
        return float(loss.detach()), int((logits.argmax(1) == y).sum())

    def _epoch(self, epoch: int) -> EpochLog:
        torch.manual_seed(self.config.seed * 100_003 + epoch + 7_919 * distributed.rank())
        self.gm.train()
        loss_sum, correct, seen = 0.0, 0, 0
        rel_bops = cost.totals(cost.quant_layer_costs(self.gm))["rel_bops_percent"]
        bar = tqdm(self._batches(epoch), f"train {epoch + 1}/{self.config.epochs}", total=self.steps_per_epoch,
                   disable=not (self.config.progress and distributed.is_main()), leave=False)
        for i, (x, y) in enumerate(bar):
            loss, hits = self._step(epoch * self.steps_per_epoch + i, x, y)
            loss_sum, correct, seen = loss_sum + loss * len(y), correct + hits, seen + len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}", bops=f"{rel_bops:.2f}%")
        self.gm.eval()
        loss_sum, correct, seen = distributed.reduce_sum(torch.tensor([loss_sum, correct, seen], dtype=torch.float64))
        return EpochLog(epoch, float(loss_sum / seen), float(100.0 * correct / seen), rel_bops)

    def fit(self) -> list[EpochLog]:
        """Train for the configured epochs (from the checkpoint when resuming); the graph ends on the CPU."""
        start = self._resume()
        graph.bind_input_scales(self.gm)
        integer_sim.bind_simulation(self.gm)
        if start > 0 and start * self.steps_per_epoch <= self.freeze_step:
            raise TrainError("cannot resume inside the calibration phase; restart without --resume")
        with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
            for epoch in range(start, self.config.epochs):
                self.history.append(self._epoch(epoch))
                if self.on_epoch_end is not None and self.on_epoch_end(epoch, self.gm):
                    self.optimizers = self._make_optimizers()
                    self.model = self._wrap()  # parameters may have changed shape
                self._save(epoch + 1)
        self.gm.to("cpu")
        return self.history

    # ---------------------------------------------------------------------------------- checkpoints

    def _quantizer_state(self) -> list[dict[str, Any]]:
        return [{"bits": q.bits, "signed": q.signed_override, "observing": q.observing} for q in self.quantizers]

    def _save(self, epochs_done: int) -> None:
        if not self.config.checkpoint:
            return
        if distributed.is_main():
            state = {"signature": _signature(self.gm), "model": self.gm.state_dict(), "epochs_done": epochs_done,
                     "quantizers": self._quantizer_state(),
                     "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()}}
            write_output(self.config.checkpoint, True, lambda tmp: torch.save(state, tmp))  # replaced every epoch
        distributed.barrier()

    def _check_checkpoint(self) -> None:
        """Refuse to start a run that would replace an existing checkpoint, or resume a missing one."""
        path, config = Path(self.config.checkpoint), self.config
        if config.resume and not path.is_file():
            raise TrainError(f"cannot resume: there is no checkpoint {path}; fix the path, or drop --resume "
                             "(resume=True) to train from the start")
        if not config.resume and not config.overwrite and path.exists():
            raise TrainError(f"checkpoint {path} already exists; pass --resume (resume=True) to continue it, "
                             "--force (overwrite=True) to train again from the start and replace it, or choose "
                             "another --checkpoint")

    def _resume(self) -> int:
        if not self.config.checkpoint:
            return 0
        self._check_checkpoint()
        path = Path(self.config.checkpoint)
        if not self.config.resume:
            return 0
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - truncated or foreign files
            raise TrainError(
                f"cannot read checkpoint {path} ({type(exc).__name__}); delete it or fix the path"
            ) from None
        saved = [(str(k), tuple(v)) for k, v in state.get("signature", [])]
        if saved != _signature(self.gm):
            raise TrainError(f"checkpoint {path} was written for another model or search: "
                             f"{signature_differences(saved, _signature(self.gm))}; resume it with the model "
                             "and search that wrote it, or use another --checkpoint")
        self.gm.load_state_dict(state["model"])
        for q, saved in zip(self.quantizers, state["quantizers"], strict=True):
            q.histogram = None  # the checkpoint's ranges stand: no mse range re-derived for its bits
            q.bits, q.signed_override, q.observing = saved["bits"], saved["signed"], saved["observing"]
        for k, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][k])
        done = int(state["epochs_done"])
        if distributed.is_main():
            total = self.config.epochs
            then = f"continuing at epoch {done + 1} of {total}" if done < total else "nothing left to train"
            print(f"resuming from {path}: {done} epoch{'s' if done != 1 else ''} done, {then}", file=sys.stderr)
        return done
