"""Run by test_distributed.py under torchrun: the same learned compiles on every rank, each rank's state saved.

Usage: ``torchrun --standalone --nproc_per_node 2 tests/train/ddp_worker.py OUTDIR``. Writes
``OUTDIR/rank{R}.pt`` with the world size, this rank's shard of a permutation, the quant-graph state of a
Bayesian Bits search (weights, gates, ranges) and of the AQT recipe (calibrated activation bounds), and the
exported ONNX bytes and the searches' records (final gate probabilities) of both.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import qcompile
from qcompile import distributed
from qcompile.api import search_pipeline
from qcompile.models import DemoNet, train_float

SEARCHES = {
    "bayesian-bits": "bayesian-bits{mu=0.5,epochs=2,finetune_epochs=1,gate_init=1,gate_lr=0.05}",
    "aqt": "aqt{epochs=2,fraction=0.5}",
}


def main(out: Path) -> None:
    torch.set_num_threads(1)
    data = qcompile.load_data("digits")
    data = qcompile.data.Dataset(data.name, data.x_train[:512], data.y_train[:512], data.x_test[:64],
                                 data.y_test[:64])
    torch.manual_seed(0)
    assert data.y_train is not None
    model = train_float(DemoNet(width=8), data.x_train, data.y_train, epochs=1, seed=0).eval()
    state: dict[str, object] = {"world": None}
    for name, spec in SEARCHES.items():
        cm = qcompile.compile(model, data.x_train[:1], data=data, pipeline=search_pipeline(spec))
        state[name] = {k: v.clone() for k, v in cm.quant_graph.state_dict().items()}
        state[f"{name}-onnx"] = cm.to_onnx().SerializeToString()
        state[f"{name}-records"] = cm.records
    state["world"] = distributed.world_size()
    state["shard"] = distributed.shard(torch.arange(11))
    torch.save(state, out / f"rank{distributed.rank()}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
