"""Bayesian Bits on Fashion-MNIST LeNet-5: a mu sweep against uniform policies trained for the same budget.

The paper's LeNet-5 (conv32 5x5, maxpool, conv64 5x5, maxpool, FC 1024->512, FC 512->10; ``models.LeNet5``),
float-trained for ``--epochs`` on all 60k images (cached in .cache/), is compiled with
``bayesian-bits{mu=M,epochs=E-F,finetune_epochs=F}`` for every M of ``--mus`` (E = ``--search-epochs``,
F = ``--finetune``) and, as references with the same budget, with the uniform policies w8a8, w4a4 and
``aqt`` trained for E epochs (``aqt{policy=P,epochs=E}``) and post-training. Everything runs through
``qcompile.sweep`` (the engine of ``qcompile sweep``): accuracy of the integer graph and in onnxruntime on
the 10k test images, relative BOPs, weight bytes, Pareto marks; then per-layer bits (w/a) and kept
channels of every Bayesian Bits point, the time of one gated search epoch relative to one float training
epoch on the same images (both measured here, same threads, after the sweep: the faster of two float
epochs; the search epoch is the bayesian-bits pass of a 1-epoch compile, gate setup and decision
included), and the issue's targets:
  * some point reaches <= 0.5 % relative BOPs with integer-graph accuracy within 1.0 point of float;
  * no Bayesian Bits point is dominated (higher BOPs and lower accuracy) by a uniform policy;
  * one search epoch costs at most 2.5x one float epoch.
The sweep's JSON and PNG go to ``--out`` (default .cache/bayesian-bits-sweep). Nothing is asserted.

    python benchmarks/bayesian_bits_fashion_mnist.py            # mu 0.1,0.2,0.3; 10 epochs on 60k each
    python benchmarks/bayesian_bits_fashion_mnist.py --quick
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

import qcompile  # noqa: E402
from qcompile.api import search_pipeline  # noqa: E402
from qcompile.data import Dataset  # noqa: E402
from qcompile.models import LeNet5, train_float  # noqa: E402
from qcompile.sweep import Sweep, SweepPoint, baseline_points, grid, run_sweep, write_sweep  # noqa: E402

TARGET_BOPS, TARGET_POINTS, TARGET_EPOCH_RATIO = 0.5, 1.0, 2.5


def bb_points(args: Any) -> list[SweepPoint]:
    knobs = {"mu": [f"{float(m):g}" for m in args.mus.split(",")], "epochs": [str(args.search_epochs - args.finetune)],
             "finetune_epochs": [str(args.finetune)], "gate_lr": [f"{args.gate_lr:g}"], "lr": [f"{args.lr:g}"],
             "gate_init": [f"{args.gate_init:g}"], "schedule": [args.schedule]}
    if args.distill:
        knobs["distill"] = [f"{args.distill:g}"]
    return grid("bayesian-bits", knobs)


def epoch_ratio(model: torch.nn.Module, data: Dataset, args: Any) -> tuple[float, float]:
    """Seconds of one float training epoch and of one gated Bayesian Bits epoch (with ``--distill``) on the
    same images."""
    assert data.y_train is not None
    float_s = float("inf")
    for _ in range(2):  # the faster of two runs (the first also warms the thread pool up)
        common.seed_everything(args.seed)
        with common.Stopwatch() as float_sw:
            train_float(LeNet5().train(), data.x_train, data.y_train, epochs=1, seed=args.seed)
        float_s = min(float_s, float_sw.seconds)
    distill = f",distill={args.distill:g}" if args.distill else ""
    spec = f"bayesian-bits{{mu=0.01,epochs=1,finetune_epochs=0,gate_lr={args.gate_lr:g},gate_init={args.gate_init:g}" \
           f"{distill}}}"
    cm = qcompile.compile(model, data.x_train[:1], data=data, pipeline=search_pipeline(spec))
    search_s = sum(t.seconds for t in cm.timings if t.name == "bayesian-bits")
    return float_s, search_s


def layer_rows(sweep: Sweep) -> list[list[Any]]:
    rows = []
    for r in sweep.results:
        bits = " ".join(f"{x['w_bits']}/{x['a_bits']}" for x in r.layers)
        kept = " ".join(f"{x['kept_channels']}/{x['channels']}" if "channels" in x else "-" for x in r.layers)
        rows.append([r.point.method, r.point.knob_label, bits, kept, round(r.seconds, 1)])
    return rows


def ratio_line(float_s: float, search_s: float) -> str:
    ratio = search_s / float_s
    met = "MET" if ratio <= TARGET_EPOCH_RATIO else "NOT MET"
    return f"one search epoch <= {TARGET_EPOCH_RATIO}x one float epoch: {met} ({search_s:.1f} s vs {float_s:.1f} s = " \
           f"{ratio:.2f}x)"


def verdicts(sweep: Sweep, float_s: float, search_s: float) -> list[str]:
    bb = [r for r in sweep.results if r.point.search == "bayesian-bits"]
    uniform = [r for r in sweep.results if r.point.search != "bayesian-bits"]
    hits = [r for r in bb if r.rel_bops_percent <= TARGET_BOPS
            and r.integer_accuracy >= sweep.float_accuracy - TARGET_POINTS]
    detail = "; ".join(f"{r.point.knob_label}: {r.rel_bops_percent:.3f} %, "
                       f"{r.integer_accuracy - sweep.float_accuracy:+.2f} points" for r in bb)
    met = "MET by " + ", ".join(r.point.knob_label for r in hits) if hits else "NOT MET"
    lines = [f"some point <= {TARGET_BOPS} % relative BOPs within {TARGET_POINTS} point of float "
             f"({sweep.float_accuracy:.2f} %): {met} ({detail})"]
    dominated = [f"{r.point.knob_label} by {u.point.method} {u.point.knob_label}" for r in bb for u in uniform
                 if u.rel_bops_percent <= r.rel_bops_percent and u.integer_accuracy >= r.integer_accuracy]
    lines.append("no Bayesian Bits point dominated by a uniform policy: "
                 + ("MET" if not dominated else "NOT MET (" + "; ".join(dominated) + ")"))
    lines.append(ratio_line(float_s, search_s))
    return lines


def main() -> int:
    p = common.parser(__doc__.splitlines()[0], epochs=8)
    p.add_argument("--mus", default="0.1,0.2,0.3", help="regularizer strengths (default %(default)s)")
    p.add_argument("--search-epochs", type=int, default=10, help="training budget of every method (default 10)")
    p.add_argument("--finetune", type=int, default=4, help="of the budget, epochs with frozen gates (default 4)")
    p.add_argument("--gate-lr", type=float, default=1e-2, help="Adam learning rate of the gates (default 1e-2)")
    p.add_argument("--gate-init", type=float, default=2.0, help="initial log alpha of the gates (default 2)")
    p.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate of the weights, also of the "
                   "trained uniform policies (default 3e-4)")
    p.add_argument("--schedule", default="cosine", choices=["constant", "cosine"],
                   help="learning-rate schedule of every trained method (default %(default)s)")
    p.add_argument("--distill", type=float, default=0.0, help="weight of the float model's soft targets in the "
                   "loss of every trained method (default 0: labels only)")
    p.add_argument("--policies", default="w8a8,w4a4,aqt", help="uniform references (default %(default)s)")
    p.add_argument("--train-subset", type=int, default=0, help="search on this many training images (0: all)")
    p.add_argument("--verify", type=int, default=1000, help="test images for the ORT-vs-reference check")
    p.add_argument("--epoch-ratio-only", action="store_true",
                   help="only time one float epoch against one gated epoch (run it with the CPU to itself)")
    p.add_argument("--out", default=str(common.CACHE_DIR / "bayesian-bits-sweep"), help="sweep.json/png folder")
    args = p.parse_args()
    if args.quick:
        args.epochs, args.search_epochs, args.finetune = 1, 2, 1
        args.train_subset, args.verify = args.train_subset or 2000, 100
    if not 0 <= args.finetune < args.search_epochs:
        p.error("--finetune must lie in [0, --search-epochs)")
    common.quiet_warnings()
    common.seed_everything(args.seed)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    common.header("Fashion-MNIST LeNet-5: Bayesian Bits mu sweep vs uniform policies (same training budget)", args)
    start = time.perf_counter()
    full = qcompile.load_data("fashion-mnist")
    float_data = full if not args.quick else common.subset(full, train=6000)
    data = common.subset(full, train=args.train_subset or None)
    model, cached, seconds = common.trained(LeNet5, "lenet5", float_data, args.epochs, seed=args.seed,
                                            retrain=args.retrain)
    print(f"float LeNet-5: {args.epochs} epochs on {len(float_data.x_train)} images "
          + ("(cached)" if cached else f"(trained in {seconds:.0f} s)") + f"; searches on {len(data.x_train)} "
          f"images, budget {args.search_epochs} epochs (Bayesian Bits: {args.search_epochs - args.finetune} gated + "
          f"{args.finetune} frozen), test set {len(full.x_test)} images", flush=True)
    if args.epoch_ratio_only:
        float_s, search_s = epoch_ratio(model, data, args)
        print(ratio_line(float_s, search_s))
        return 0
    training = (("lr", f"{args.lr:g}"), ("schedule", args.schedule))
    training += (("distill", f"{args.distill:g}"),) if args.distill else ()
    points = bb_points(args) + baseline_points(args.policies.split(","), epochs=args.search_epochs, training=training)
    sweep = run_sweep(model, data, points, verify_samples=args.verify, progress=sys.stderr.isatty(),
                      log=lambda line: print(line, file=sys.stderr, flush=True))
    paths = write_sweep(sweep, Path(args.out), force=True)
    print(sweep.table())
    print()
    common.table(["method", "knob", "w/a bits per layer", "kept channels per layer", "seconds"], layer_rows(sweep))
    float_s, search_s = epoch_ratio(model, data, args)
    print("\ntargets")
    for line in verdicts(sweep, float_s, search_s):
        print("  " + line)
    names = ", ".join(p.name for p in paths)
    print(f"\nsweep written to {names} in --out; wall time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
