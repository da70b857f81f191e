"""LeNet-5 on Fashion-MNIST: float training, then post-training compilation at every policy.

For each policy (w8a8, w4a8, w4a4, aqt) it prints top-1 test accuracy of the float model, the quant-graph
simulation, the integer graph (fast executor) and the exported ONNX in onnxruntime, the relative BOPs, the
weight bytes, and the onnxruntime-vs-reference mismatches over the whole test set. Target: the w8a8 integer
graph within 0.3 points of float.

    python benchmarks/lenet5_fashion_mnist.py            # 8 epochs on 60k images, 10k test images
    python benchmarks/lenet5_fashion_mnist.py --quick    # 1 epoch on 6k images, 1k test images
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

import qcompile  # noqa: E402
from qcompile.models import LeNet5  # noqa: E402
from qcompile.report import layer_table  # noqa: E402

POLICIES = ["w8a8", "w4a8", "w4a4", "aqt"]
TARGET_POINTS = 0.3


def main() -> int:
    p = common.parser(__doc__.splitlines()[0], epochs=8)
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated policies (default %(default)s)")
    p.add_argument("--layers", action="store_true", help="also print the per-layer cost table of each policy")
    args = p.parse_args()
    common.quiet_warnings()
    common.seed_everything(args.seed)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)  # nothing here is timed
    common.header("LeNet-5 / Fashion-MNIST: post-training compilation", args)

    data = qcompile.load_data("fashion-mnist")
    epochs = args.epochs
    if args.quick:
        data, epochs = common.subset(data, train=6000, test=1000), min(epochs, 1)
    model, cached, seconds = common.trained(LeNet5, "lenet5", data, epochs, seed=args.seed, retrain=args.retrain)
    print(f"float model: LeNet-5, {sum(p.numel() for p in model.parameters())} parameters, {epochs} epochs Adam "
          f"on {len(data.x_train)} images, " + ("weights from the cache" if cached else f"trained in {seconds:.0f} s"))
    print(f"test set: {len(data.x_test)} images; calibration: 32 batches of 64 training images\n", flush=True)

    rows, w8a8 = [], None
    for policy in args.policies.split(","):
        with common.Stopwatch() as sw:
            cm = qcompile.compile(model, data.x_train[:1], data=data, policy=policy)
        report = cm.report(data, verify_inputs=data.x_test)
        acc, totals, ver = report["accuracy"], report["totals"], report["verify"]
        rows.append([policy, acc["float"], acc.get("simulated", float("nan")), acc["integer"], acc["onnx"],
                     totals["rel_bops_percent"], totals["weight_bytes"], f"{ver['mismatches']} / {ver['compared']}",
                     round(sw.seconds, 1)])
        if policy == "w8a8":
            w8a8 = acc
        if args.layers:
            print(f"[{policy}]\n{layer_table(report)}\n", flush=True)

    common.table(["policy", "float acc %", "simulated acc %", "integer-graph acc %", "onnxruntime acc %",
                  "rel. BOPs %", "weight bytes", "mismatches (ORT vs ref)", "compile s"], rows,
                 title=f"LeNet-5, Fashion-MNIST test set ({len(data.x_test)} images)")
    if w8a8 is not None:
        drop = w8a8["float"] - w8a8["integer"]
        met = drop <= TARGET_POINTS
        print(f"target: w8a8 integer-graph accuracy within {TARGET_POINTS} points of float: "
              f"float {w8a8['float']:.2f} %, integer {w8a8['integer']:.2f} %, drop {drop:+.2f} points -> "
              f"{'MET' if met else 'NOT MET'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
