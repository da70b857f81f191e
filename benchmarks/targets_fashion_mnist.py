"""Both export targets on Fashion-MNIST LeNet-5: accuracy and onnxruntime exactness on the whole test set.

For each policy (w8a8, w4a8, w4a4, aqt = mixed 4-bit with 8-bit first and last layers, and APoT 3-bit
weights trained for ``--apot-epochs`` epochs on ``--train-subset`` images) the float LeNet-5 (cached
training, common.trained) is compiled post-training (APoT: trained) at each target: ``ort`` (float32
requantization, QLinearConv export, ``--ort-cpu any``) and ``integer`` (dyadic, ConvInteger + integer
chain). Columns: integer-graph (fast executor) and onnxruntime top-1 on the 10k test images, the
difference between the targets, and onnxruntime vs reference-executor mismatching output elements over
every test image. Nothing is asserted.

    python benchmarks/targets_fashion_mnist.py [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

import qcompile  # noqa: E402
from qcompile.models import LeNet5  # noqa: E402

POLICIES = ("w8a8", "w4a8", "w4a4", "aqt")


def pipelines(args) -> dict[str, str | None]:
    apot = (f"canonicalize,fold-batchnorm,insert-quantizers{{scheme=apot}},calibrate,"
            f"apot{{bits=3,epochs={args.apot_epochs}}},share-scales,lower-integer")
    return {**{p: None for p in POLICIES}, "apot w3": apot}


def main() -> int:
    p = common.parser(__doc__.splitlines()[0], epochs=8, repeats=1)
    p.add_argument("--train-subset", type=int, default=10000, help="APoT training images (default %(default)s)")
    p.add_argument("--apot-epochs", type=int, default=1, help="APoT training epochs (default %(default)s)")
    args = p.parse_args()
    common.quiet_warnings()
    common.header("export targets on Fashion-MNIST LeNet-5", args)
    data = qcompile.load_data("fashion-mnist")
    epochs = args.epochs
    if args.quick:
        data, epochs, args.train_subset = common.subset(data, train=6000, test=1000), 1, 1000
    model, cached, seconds = common.trained(LeNet5, "lenet5", data, epochs, seed=args.seed)
    print(f"LeNet-5: {epochs} epochs, " + ("weights from the cache" if cached else f"trained in {seconds:.0f} s"))
    torch.set_num_threads(args.threads or 1)
    train = common.subset(data, train=args.train_subset)
    rows = []
    for label, pipeline in pipelines(args).items():
        acc: dict[str, float] = {}
        for target in ("ort", "integer"):
            with common.Stopwatch() as sw:
                cm = qcompile.compile(model, data.x_train[:1], data=train if pipeline else data,
                                      policy=label if pipeline is None else "w8a8", pipeline=pipeline, target=target)
            report = cm.report(data, data.x_test)
            a, v = report["accuracy"], report["verify"]
            acc[target] = a["integer"]
            rows.append([label, target, a["float"], a["integer"], a["onnx"], f"{v['mismatches']} / {v['compared']}",
                         report["totals"]["rel_bops_percent"], sw.seconds])
        rows[-1].append(acc["ort"] - acc["integer"])
        rows[-2].append("")
    common.table(["policy", "target", "float %", "integer %", "onnxruntime %", "mismatches (whole test set)",
                  "rel. BOPs %", "compile s", "ort - integer (points)"], rows,
                 title="LeNet-5, Fashion-MNIST test set, onnxruntime CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
