"""Learned bit-width searches on Fashion-MNIST: BSQ (alpha sweep) and the AQT recipe vs uniform baselines.

For LeNet-5 and SmallResNet: a float model (cached training, common.trained), then, from the same float
weights and with the same training budget (``--search-epochs`` epochs over the ``--train-subset`` images)
for every learned method:
  * bsq       ``bsq{alpha=A,epochs=E-F,finetune_epochs=F}`` for each alpha of ``--alphas`` (F =
              ``--bsq-finetune``: E-F regularized epochs, then F epochs at the frozen precision; activations 8-bit);
  * aqt       ``aqt{epochs=E}``: the AQT recipe, 4-bit with 8-bit first conv / last linear;
  * qat       ``aqt{policy=w8a8,epochs=E}`` and ``aqt{policy=w4a4,epochs=E}``: uniform, trained the same way;
  * ptq       ``assign-bitwidths{policy=w8a8|w4a4}``: post-training, no training, for reference.
Every search runs in ``canonicalize,fold-batchnorm,insert-quantizers,calibrate,SEARCH,share-scales,lower-integer``.

One table per model: integer-graph (fast executor) and onnxruntime top-1 on the full 10k test set, the drop
vs float in points, relative BOPs, weight bytes, compression vs float32 (float_weight_bytes / weight_bytes),
weight bits per layer, the search pass's seconds and the whole compile's seconds, and the onnxruntime vs
reference-executor mismatches on the first ``--verify`` test images. Then the issue's targets:
  * BSQ reaches >= 10x weight compression vs float with integer-graph accuracy within 1.0 point of float;
  * the AQT recipe's 4-bit model is within 1.0 point of float.
Nothing is asserted; a method that fails is reported (traceback on stderr) and the run goes on.

``--lr`` sets the weights' Adam learning rate of every learned method (default: each search's 1e-3) and
``--bsq-bit-lr`` BSQ's bit-variable learning rate (default 1e-2), ``--bsq-from`` where BSQ's fine-tune starts
(``float``: the float weights at the found bits, the search's default; ``bsq``: BSQ's own weights, as in the
paper, with ``--bsq-grid`` choosing their learned step per layer or per channel), ``--schedule`` the learning-rate
schedule of every learned method (constant or cosine) and ``--distill`` their weight of the float model's
soft targets; all start from a converged float model.
The float models are trained on ``--float-train-subset`` images (default all 60k; cached in .cache/).

Seeds: ``--seed`` seeds torch/numpy/random before the float training and before every method; the
searches' trainers use ``--train-seed`` (``qcompile.compile(seed=...)``, default 0).

    python benchmarks/searches_fashion_mnist.py --train-subset 30000 --search-epochs 3   # ~22 min on 2 cores
    # the RESULTS.md run (LeNet-5 ~32 min with one thread; SmallResNet with --lr 1e-3 ~45 min):
    python benchmarks/searches_fashion_mnist.py --models lenet5 --alphas 0.015,0.03,0.05 --search-epochs 10 \\
        --bsq-finetune 7 --lr 3e-4 --schedule cosine --distill 0.5 --verify 500 --threads 1
    python benchmarks/searches_fashion_mnist.py --quick     # float 1 epoch on 6k, searches 1 epoch on 1k, verify 100
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

import qcompile  # noqa: E402
from qcompile.data import Dataset  # noqa: E402
from qcompile.models import LeNet5, SmallResNet  # noqa: E402

PREFIX = "canonicalize,fold-batchnorm,insert-quantizers,calibrate"
SUFFIX = "share-scales,lower-integer"
MODELS: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "lenet5": ("LeNet-5", LeNet5),
    "smallresnet": ("SmallResNet", SmallResNet),
}
METHODS = ["bsq", "aqt", "qat-w8a8", "qat-w4a4", "ptq-w8a8", "ptq-w4a4"]
TARGET_POINTS = 1.0
TARGET_COMPRESSION = 10.0


@dataclass(frozen=True)
class Method:
    method: str  # bsq, aqt, qat, ptq
    knob: str  # what distinguishes it within the method (alpha, policy)
    search: str  # the pipeline's search pass


@dataclass
class Row:
    m: Method
    report: dict[str, Any] | None = None
    search_s: float = 0.0
    compile_s: float = 0.0
    error: str = ""

    @property
    def acc(self) -> dict[str, float]:
        return self.report["accuracy"] if self.report else {}

    @property
    def compression(self) -> float:
        t = self.report["totals"] if self.report else {}
        return t["float_weight_bytes"] / max(t["weight_bytes"], 1) if t else float("nan")

    @property
    def drop(self) -> float:
        return self.acc["integer"] - self.acc["float"] if self.report else float("nan")


def methods(args: Any) -> list[Method]:
    e, ft = args.search_epochs, min(args.bsq_finetune, args.search_epochs - 1)
    chosen = args.methods.split(",")
    lr = f",lr={args.lr:g}" if args.lr else ""
    lr += f",schedule={args.schedule}" if args.schedule != "constant" else ""
    lr += f",distill={args.distill:g}" if args.distill else ""
    out = []
    if "bsq" in chosen:
        for a in args.alphas.split(","):
            bit_lr = f",bit_lr={args.bsq_bit_lr:g}" if args.bsq_bit_lr else ""
            bit_lr += f",finetune_from={args.bsq_from}" if args.bsq_from != "float" else ""
            bit_lr += f",finetune_grid={args.bsq_grid}" if args.bsq_grid != "layer" else ""
            opts = f"alpha={float(a):g},epochs={e - ft},finetune_epochs={ft}{lr}{bit_lr}"
            out.append(Method("bsq", f"alpha={float(a):g}", f"bsq{{{opts}}}"))
    if "aqt" in chosen:
        out.append(Method("aqt", "policy=aqt", f"aqt{{epochs={e}{lr}}}"))
    for policy in ("w8a8", "w4a4"):
        if f"qat-{policy}" in chosen:
            out.append(Method("qat", f"policy={policy}", f"aqt{{policy={policy},epochs={e}{lr}}}"))
    for policy in ("w8a8", "w4a4"):
        if f"ptq-{policy}" in chosen:
            out.append(Method("ptq", f"policy={policy}", f"assign-bitwidths{{policy={policy}}}"))
    return out


def run_method(model: nn.Module, m: Method, search_data: Dataset, test: Dataset, verify_n: int, seed: int,
               progress: bool, train_seed: int = 0) -> Row:
    common.seed_everything(seed)
    pipeline = f"{PREFIX},{m.search},{SUFFIX}"
    row = Row(m)
    try:
        with common.Stopwatch() as sw:
            cm = qcompile.compile(model, search_data.x_train[:1], data=search_data, pipeline=pipeline,
                                  progress=progress, seed=train_seed)
        row.compile_s = sw.seconds
        search_name = m.search.split("{", 1)[0]
        row.search_s = sum(t.seconds for t in cm.timings if t.name == search_name)
        row.report = cm.report(test, verify_inputs=test.x_test[:verify_n], progress=progress)
    except Exception as exc:  # noqa: BLE001 - report the failure and go on with the other methods
        print(f"\n[{m.method} {m.knob}] FAILED; pipeline: {pipeline}", file=sys.stderr)
        traceback.print_exc(file=sys.stderr)
        row.error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
    return row


def table_rows(rows: list[Row]) -> list[list[Any]]:
    out = []
    for r in rows:
        if r.report is None:
            out.append([r.m.method, r.m.knob, "FAILED", *["-"] * 9])
            continue
        acc, t, v = r.acc, r.report["totals"], r.report["verify"]
        bits = ",".join(str(layer["w_bits"]) for layer in r.report["layers"])
        out.append([r.m.method, r.m.knob, acc["integer"], acc["onnx"], f"{r.drop:+.2f}", t["rel_bops_percent"],
                    t["weight_bytes"], f"{r.compression:.1f}x", bits, round(r.search_s, 1), round(r.compile_s, 1),
                    f"{v['mismatches']} / {v['compared']}"])
    return out


HEADERS = ["method", "knob", "integer-graph acc %", "onnxruntime acc %", "Δ vs float (points)", "rel. BOPs %",
           "weight bytes", "compression vs fp32", "w bits per layer", "search s", "compile s",
           "ORT vs ref mismatching elements"]


def verdicts(name: str, float_acc: float, rows: list[Row]) -> list[str]:
    lines = []
    bsq = [r for r in rows if r.m.method == "bsq" and r.report is not None]
    if bsq:
        hits = [r for r in bsq if r.compression >= TARGET_COMPRESSION and r.drop >= -TARGET_POINTS]
        detail = "; ".join(f"{r.m.knob}: {r.compression:.1f}x, {r.drop:+.2f} points" for r in bsq)
        lines.append(f"{name}: BSQ reaches >= {TARGET_COMPRESSION:g}x weight compression vs float with integer-graph "
                     f"accuracy within {TARGET_POINTS} point of float ({float_acc:.2f} %): "
                     f"{'MET by ' + ', '.join(r.m.knob for r in hits) if hits else 'NOT MET'} ({detail})")
    else:
        lines.append(f"{name}: BSQ target: no BSQ result (not run or failed)")
    aqt = [r for r in rows if r.m.method == "aqt" and r.report is not None]
    if aqt:
        r = aqt[0]
        met = r.drop >= -TARGET_POINTS
        lines.append(f"{name}: the AQT recipe's 4-bit model is within {TARGET_POINTS} point of float: "
                     f"{'MET' if met else 'NOT MET'} (integer {r.acc['integer']:.2f} % vs float {float_acc:.2f} %, "
                     f"{r.drop:+.2f} points, {r.compression:.1f}x)")
    else:
        lines.append(f"{name}: AQT target: no AQT result (not run or failed)")
    return lines


def main() -> int:
    p = common.parser(__doc__.splitlines()[0], epochs=8)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated models (default %(default)s)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (default %(default)s)")
    p.add_argument("--alphas", default="0.003,0.01,0.03,0.1", help="BSQ regularizer strengths (default %(default)s)")
    p.add_argument("--search-epochs", type=int, default=3,
                   help="training budget of every learned method, in epochs (default %(default)s)")
    p.add_argument("--bsq-finetune", type=int, default=1,
                   help="of the budget, BSQ's epochs at the frozen precision (default %(default)s)")
    p.add_argument("--lr", type=float, default=0.0,
                   help="Adam learning rate of every learned method's weights (0: each search's default, 1e-3)")
    p.add_argument("--bsq-bit-lr", type=float, default=0.0,
                   help="Adam learning rate of BSQ's bit variables (0: the search's default, 1e-2)")
    p.add_argument("--bsq-from", choices=("float", "bsq"), default="float",
                   help="where BSQ's fine-tune starts: the float weights at the found bits, or BSQ's "
                   "(default %(default)s)")
    p.add_argument("--bsq-grid", choices=("layer", "channel"), default="layer",
                   help="with --bsq-from bsq, the fine-tune's weight step: one learned per output channel or BSQ's "
                   "per layer (default %(default)s)")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="learning-rate schedule of every learned method's weights (default %(default)s)")
    p.add_argument("--distill", type=float, default=0.0,
                   help="weight of the float model's soft targets in every learned method's loss (default 0)")
    p.add_argument("--train-seed", type=int, default=0,
                   help="seed of the searches' trainers (batch order), the float model unchanged (default 0)")
    p.add_argument("--train-subset", type=int, default=0,
                   help="train/search on this many training images (a fixed-seed subset; 0: all 60k)")
    p.add_argument("--float-train-subset", type=int, default=0,
                   help="train the float models on this many training images (0: all 60k)")
    p.add_argument("--verify", type=int, default=0,
                   help="test images for the ORT-vs-reference check (0: 1000, or 100 with --quick)")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.search_epochs = min(args.epochs, 1), 1
        args.train_subset = args.train_subset or 1000
        args.float_train_subset = args.float_train_subset or 6000
    args.verify = args.verify or (100 if args.quick else 1000)
    if args.search_epochs <= 0:
        p.error("--search-epochs must be positive")
    common.quiet_warnings()
    common.seed_everything(args.seed)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)  # nothing here is a latency benchmark
    common.header("Fashion-MNIST: learned bit-width searches (BSQ, AQT) vs uniform baselines", args)
    progress = sys.stderr.isatty()
    start = time.perf_counter()

    full = qcompile.load_data("fashion-mnist")
    float_data = common.subset(full, train=args.float_train_subset or None)
    search_data = common.subset(full, train=args.train_subset or None)
    todo = methods(args)
    e, ft = args.search_epochs, min(args.bsq_finetune, args.search_epochs - 1)
    print(f"float training: {args.epochs} epochs Adam one-cycle on {len(float_data.x_train)} images; searches: "
          f"{e} epoch(s) each on {len(search_data.x_train)} images (BSQ: {e - ft} regularized + {ft} fine-tune), "
          f"calibration: 32 batches of 64 of those; test set: {len(full.x_test)} images; "
          f"ORT-vs-reference check on the first {args.verify} test images")
    print(f"pipeline: {PREFIX},SEARCH,{SUFFIX}; searches: " + ", ".join(m.search for m in todo) + "\n", flush=True)

    verdict_lines = []
    for key in args.models.split(","):
        name, factory = MODELS[key]
        common.seed_everything(args.seed)
        model, cached, seconds = common.trained(factory, key, float_data, args.epochs, seed=args.seed,
                                                retrain=args.retrain)
        print(f"{name}: {sum(q.numel() for q in model.parameters())} parameters; float: {args.epochs} epochs on "
              f"{len(float_data.x_train)} images, " + ("weights from the cache" if cached else
                                                       f"trained in {seconds:.0f} s"), flush=True)
        rows = []
        for m in todo:
            rows.append(run_method(model, m, search_data, full, args.verify, args.seed, progress, args.train_seed))
            r = rows[-1]
            if progress:
                status = f"{r.acc['integer']:.2f} %, compile {r.compile_s:.0f} s" if r.report else r.error
                print(f"  done: {m.method} {m.knob}: {status}", file=sys.stderr, flush=True)
        ok = [r for r in rows if r.report is not None]
        float_acc = ok[0].acc["float"] if ok else float("nan")
        common.table(HEADERS, table_rows(rows),
                     title=f"{name}, Fashion-MNIST test set ({len(full.x_test)} images); float (folded BN) "
                           f"{float_acc:.2f} %")
        for r in rows:
            if r.error:
                print(f"  {r.m.method} {r.m.knob} failed: {r.error}")
        verdict_lines += verdicts(name, float_acc, rows)

    print("targets")
    for line in verdict_lines:
        print(f"  {line}")
    print(f"\nwall time of the whole run: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
