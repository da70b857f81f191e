"""APoT vs uniform weights on Fashion-MNIST (LeNet-5, SmallResNet) at 3 and 4 weight bits, same budget.

For each model: a float model (cached training, common.trained), then from the same float weights and with
the same training budget (``--search-epochs`` epochs over ``--train-subset`` images, Adam at ``--lr``
(default 1e-3) with ``--schedule`` and ``--distill``, the trainer's seed 0, AQT's activation schedule) and
8-bit activations:
  * apot     ``insert-quantizers{scheme=apot},calibrate,apot{bits=B,epochs=E}``: APoT weights (shift-add
             layers), first conv and last linear 8-bit uniform;
  * uniform  ``insert-quantizers,calibrate,aqt{policy=TABLE,epochs=E}`` with a table giving every layer B-bit
             weights except the first conv and the last linear (8-bit): the same layers, uniform grids.
  * apot with ``--apot-variant`` options (default ``center=true``: the method's normalization, mean dropped) at the
             lowest bit-width, as a variant of the method.
Both end in ``share-scales,lower-integer``. One table per model: integer-graph (fast executor) and onnxruntime
top-1 on the 10k test images, the drop vs float, relative BOPs, multiplies and shift-adds per sample, the
multiplier-free share of the MACs, and the onnxruntime vs reference-executor mismatches on the first
``--verify`` test images. Then the issue's targets: APoT at 3 bits at least as accurate as uniform at 3 bits
on both models, and every APoT model bit-exact in onnxruntime. Nothing is asserted.

    python benchmarks/apot_fashion_mnist.py --train-subset 20000 --search-epochs 2
    python benchmarks/apot_fashion_mnist.py --quick     # float 1 epoch on 6k, 1 epoch on 1k, verify 100
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from searches_fashion_mnist import MODELS  # noqa: E402

import qcompile  # noqa: E402
from qcompile.data import Dataset  # noqa: E402

SUFFIX = "share-scales,lower-integer"
HEADERS = ["method", "w bits", "train seed", "integer-graph acc %", "onnxruntime acc %", "Δ vs float (points)",
           "rel. BOPs %", "multiplies", "shift-adds", "multiplier-free %", "w bits per layer", "compile s",
           "ORT vs ref mismatching elements"]


@dataclass(frozen=True)
class Method:
    method: str  # apot | uniform
    bits: int
    options: str = ""  # extra apot options, e.g. center=false

    @property
    def label(self) -> str:
        return self.method + (f" {self.options}" if self.options else "")

    def pipeline(self, epochs: int, tables: Path, names: list[str], training: str = "") -> str:
        """``training``: options both methods share, e.g. ``,lr=0.0003,schedule=cosine``."""
        if self.method == "apot":
            extra = f",{self.options}" if self.options else ""
            return f"canonicalize,fold-batchnorm,insert-quantizers{{scheme=apot}},calibrate," \
                   f"apot{{bits={self.bits},epochs={epochs}{training}{extra}}},{SUFFIX}"
        table = tables / f"uniform-w{self.bits}.json"
        layers = {n: {"w": self.bits, "a": 8} for n in names[1:-1]}
        table.write_text(json.dumps({**layers, "default": {"w": 8, "a": 8}}))
        return f"canonicalize,fold-batchnorm,insert-quantizers,calibrate," \
               f"aqt{{policy={table},epochs={epochs}{training}}},{SUFFIX}"


@dataclass
class Row:
    m: Method
    seed: int = 0
    report: dict[str, Any] | None = None
    compile_s: float = 0.0
    error: str = ""

    @property
    def integer(self) -> float:
        return self.report["accuracy"]["integer"] if self.report else float("nan")


def layer_names(model: nn.Module) -> list[str]:
    """Conv/linear layers in graph order (after BN folding: the module names of the convs)."""
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    cm = qcompile.compile(model, x[:1], data=lambda: [x])
    return [c.name for c in cm.layer_costs()]


def run_method(model: nn.Module, m: Method, pipeline: str, search_data: Dataset, test: Dataset, verify_n: int,
               seed: int, progress: bool, train_seed: int = 0) -> Row:
    common.seed_everything(seed)
    row = Row(m, train_seed)
    try:
        with common.Stopwatch() as sw:
            cm = qcompile.compile(model, search_data.x_train[:1], data=search_data, pipeline=pipeline,
                                  progress=progress, seed=train_seed)
        row.compile_s = sw.seconds
        row.report = cm.report(test, verify_inputs=test.x_test[:verify_n], progress=progress)
    except Exception as exc:  # noqa: BLE001 - report the failure and go on
        print(f"\n[{m.label} w{m.bits}] FAILED; pipeline: {pipeline}", file=sys.stderr)
        traceback.print_exc(file=sys.stderr)
        row.error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
    return row


def table_rows(rows: list[Row]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for r in rows:
        if r.report is None:
            out.append([r.m.label, r.m.bits, r.seed, "FAILED", *["-"] * (len(HEADERS) - 4)])
            continue
        acc, t, v = r.report["accuracy"], r.report["totals"], r.report["verify"]
        bits = ",".join(str(layer["w_bits"]) + ("p" if layer["terms"] else "") for layer in r.report["layers"])
        out.append([r.m.label, r.m.bits, r.seed, acc["integer"], acc["onnx"], f"{acc['integer'] - acc['float']:+.2f}",
                    t["rel_bops_percent"], t["multiplies"], t["shift_adds"], t["multiplier_free_percent"], bits,
                    round(r.compile_s, 1), f"{v['mismatches']} / {v['compared']}"])
    return out


def mean_rows(rows: list[Row]) -> dict[tuple[str, int], list[float]]:
    """Integer-graph accuracies over the training seeds, per (method label, bits); a failed run counts as nan."""
    by: dict[tuple[str, int], list[float]] = {}
    for r in rows:
        by.setdefault((r.m.label, r.m.bits), []).append(r.integer)
    return by


def summary_rows(rows: list[Row]) -> list[list[Any]]:
    return [[label, bits, len(accs), f"{sum(accs) / len(accs):.2f}", f"{min(accs):.2f}", f"{max(accs):.2f}"]
            for (label, bits), accs in mean_rows(rows).items()]


def verdicts(name: str, rows: list[Row]) -> list[str]:
    by = {key: sum(accs) / len(accs) for key, accs in mean_rows(rows).items()}
    lines = []
    apot3, uni3 = by.get(("apot", 3)), by.get(("uniform", 3))
    if apot3 is not None and uni3 is not None and apot3 == apot3 and uni3 == uni3:
        met = apot3 >= uni3
        lines.append(f"{name}: APoT 3-bit at least as accurate as uniform 3-bit (mean over the training seeds): "
                     f"{'MET' if met else 'NOT MET'} ({apot3:.2f} % vs {uni3:.2f} %)")
    else:
        lines.append(f"{name}: APoT vs uniform at 3 bits: not run or failed")
    for (label, bits), acc in by.items():
        if label != "apot" and label.startswith("apot") and bits == 3 and uni3 is not None:
            lines.append(f"{name}: variant {label} at 3 bits vs uniform 3-bit: {acc:.2f} % vs {uni3:.2f} %")
    apot = [r for r in rows if r.m.method == "apot"]
    exact = all(r.report is not None and r.report["verify"]["mismatches"] == 0 for r in apot)
    lines.append(f"{name}: every APoT model bit-exact in onnxruntime: {'MET' if exact and apot else 'NOT MET'}")
    return lines


def main() -> int:
    p = common.parser(__doc__.splitlines()[0], epochs=8)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated models (default %(default)s)")
    p.add_argument("--bits", default="3,4", help="weight bit-widths compared (default %(default)s)")
    p.add_argument("--search-epochs", type=int, default=2, help="training epochs of every method (default 2)")
    p.add_argument("--train-subset", type=int, default=20000, help="training images (fixed-seed subset; 0: all)")
    p.add_argument("--float-train-subset", type=int, default=0,
                   help="train the float models on this many training images (0: all 60k)")
    p.add_argument("--verify", type=int, default=0, help="test images for the ORT check (0: 500, 100 with --quick)")
    p.add_argument("--apot-variant", default="center=true",
                   help="extra apot options compared too at the lowest bit-width ('' for none; default %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of both methods (default 1e-3)")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="learning-rate schedule of both methods (default %(default)s)")
    p.add_argument("--distill", type=float, default=0.0,
                   help="weight of the float model's soft targets in both methods' loss (default 0)")
    p.add_argument("--train-seeds", default="0",
                   help="trainer seeds (batch order) every method runs with; the verdict compares means (default 0)")
    args = p.parse_args()
    train_seeds = [int(v) for v in args.train_seeds.split(",")]
    training = f",lr={args.lr:g},schedule={args.schedule}" + (f",distill={args.distill:g}" if args.distill else "")
    if args.quick:
        args.epochs, args.search_epochs, args.train_subset = min(args.epochs, 1), 1, 1000
    args.verify = args.verify or (100 if args.quick else 500)
    common.quiet_warnings()
    common.seed_everything(args.seed)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    common.header("Fashion-MNIST: APoT (shift-add) vs uniform weights at the same training budget", args)
    progress = sys.stderr.isatty()
    start = time.perf_counter()
    full = qcompile.load_data("fashion-mnist")
    float_data = common.subset(full, train=args.float_train_subset or (6000 if args.quick else None))
    search_data = common.subset(full, train=args.train_subset or None)
    bits = [int(b) for b in args.bits.split(",")]
    todo = [Method(method, b) for b in bits for method in ("apot", "uniform")]
    if args.apot_variant:
        todo.insert(1, Method("apot", min(bits), args.apot_variant))
    print(f"training: {args.search_epochs} epoch(s) on {len(search_data.x_train)} images per method, activations "
          f"8-bit, first conv / last linear 8-bit uniform; test: {len(full.x_test)} images; ORT check on "
          f"{args.verify}. In 'w bits per layer' p marks an APoT (shift-add) layer.\n", flush=True)
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models.split(","):
            name, factory = MODELS[key]
            common.seed_everything(args.seed)
            model, cached, seconds = common.trained(factory, key, float_data, args.epochs, seed=args.seed,
                                                    retrain=args.retrain)
            print(f"{name}: float {args.epochs} epochs on {len(float_data.x_train)} images, "
                  + ("weights from the cache" if cached else f"trained in {seconds:.0f} s"), flush=True)
            names = layer_names(model)
            rows = [run_method(model, m, m.pipeline(args.search_epochs, Path(tmp), names, training), search_data, full,
                               args.verify, args.seed, progress, train_seed)
                    for m in todo for train_seed in train_seeds]
            ok = [r for r in rows if r.report is not None]
            float_acc = ok[0].report["accuracy"]["float"] if ok and ok[0].report else float("nan")
            common.table(HEADERS, table_rows(rows), title=f"{name}, Fashion-MNIST test set ({len(full.x_test)} "
                         f"images); float (folded BN) {float_acc:.2f} %")
            if len(train_seeds) > 1:
                common.table(["method", "w bits", "seeds", "mean integer acc %", "min", "max"], summary_rows(rows),
                             title=f"{name}: over training seeds {args.train_seeds}")
            lines += verdicts(name, rows)
    print("targets")
    for line in lines:
        print(f"  {line}")
    print(f"\nwall time of the whole run: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
