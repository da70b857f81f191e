"""Calibration methods side by side on CNNs: ``calibrate{method=max|mse|percentile}`` at several policies.

Rows: the demo's DemoNet (residual CNN, ``qcompile demo``: 15 epochs on scikit-learn's digits, seed 0),
compiled with each method at each policy and calibrated on the whole training split (the demo's data);
columns: float, simulated, integer (reference executor) and onnxruntime top-1 on the test split, the
mismatches between onnxruntime and the reference executor, and the seconds the calibrate pass took.

``--models lenet5`` adds LeNet-5 on Fashion-MNIST (``lenet5_fashion_mnist.py``'s cached float model: 8 epochs on
60k images, trained on first use), calibrated on 32 batches of 64 training images. ``resnet18`` (needs
torchvision) adds the calibrate pass's seconds on a randomly initialised ResNet-18 (8 batches of 8 normal
224x224 images).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/calibration_methods.py [--methods max,mse]
        [--policies w8a8,w4a8,w4a4,aqt] [--models demo,lenet5,resnet18]

Never part of the test run or CI.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import qcompile  # noqa: E402
from qcompile.api import default_pipeline  # noqa: E402
from qcompile.data import Dataset  # noqa: E402
from qcompile.report import format_table  # noqa: E402

HEADERS = ["model", "policy", "method", "float %", "simulated %", "integer %", "onnxruntime %", "mismatches",
           "calibrate s"]


def pipeline(policy: str, method: str, steps: int) -> str:
    """The default pipeline at ``policy`` with ``calibrate{method=...}`` (a percentile as ``percentile=P``)."""
    named = method.startswith("p") and method != "percentile"
    option = f"percentile={method.removeprefix('p')}" if named else f"method={method}"
    text = default_pipeline(policy, steps)
    if "calibrate{" in text:
        return text.replace("calibrate{", f"calibrate{{{option},", 1)
    return text.replace("calibrate", f"calibrate{{{option}}}", 1)


def calibrate_seconds(cm: qcompile.CompiledModel) -> float:
    return sum(t.seconds for t in cm.timings if t.name == "calibrate")


def rows_for(name: str, model: nn.Module, data: Dataset, calibration: Any, steps: int, policies: list[str],
             methods: list[str]) -> list[list[Any]]:
    rows = []
    for policy, method in itertools.product(policies, methods):
        cm = qcompile.compile(model, data.x_train[:1], data=calibration, pipeline=pipeline(policy, method, steps))
        report = cm.report(data, data.x_test)
        acc, v = report["accuracy"], report["verify"]
        rows.append([name, policy, method, acc["float"], acc["simulated"], acc["integer"], acc["onnx"],
                     f"{v['mismatches']}/{v['compared']}", f"{calibrate_seconds(cm):.2f}"])
        print("  " + "  ".join(str(c) for c in rows[-1]), flush=True)
    return rows


def demo_rows(args: argparse.Namespace) -> list[list[Any]]:
    from qcompile.models import DemoNet, train_float

    torch.manual_seed(0)
    data = qcompile.load_data("digits")
    assert data.y_train is not None
    model = train_float(DemoNet(), data.x_train, data.y_train, epochs=15)
    return rows_for("DemoNet digits", model, data, data, 32, args.policies.split(","), args.methods.split(","))


def lenet5_rows(args: argparse.Namespace) -> list[list[Any]]:
    import common

    from qcompile.models import LeNet5

    data = qcompile.load_data("fashion-mnist")
    model, _cached, _seconds = common.trained(LeNet5, "lenet5", data, 8, seed=common.SEED)
    return rows_for("LeNet-5 Fashion-MNIST", model, data, data, 32, args.policies.split(","),
                    args.methods.split(","))


def resnet18_seconds(methods: list[str]) -> list[list[Any]]:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 3, 224, 224, generator=g) for _ in range(8)]
    rows = []
    for method in methods:
        text = pipeline("w8a8", method, len(batches)).split(",assign-bitwidths")[0]
        from qcompile.frontends.torch_fx import trace_module
        from qcompile.passes import PassContext, PassManager, parse_pipeline

        ctx = PassContext((batches[0][:1],), lambda: iter(batches))
        manager = PassManager(parse_pipeline(text).build())
        manager.run(trace_module(model, ctx.example_inputs), ctx)
        seconds = sum(t.seconds for t in manager.timings if t.name == "calibrate")
        rows.append(["ResNet-18 (random init)", method, f"{seconds:.1f}"])
        print("  " + "  ".join(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="max,mse", help="comma-separated: max, mse, percentile or pNN.NN "
                                                        "(that percentile)")
    p.add_argument("--policies", default="w8a8,w4a8,w4a4,aqt", help="comma-separated policies")
    p.add_argument("--models", default="demo", help="comma-separated: demo, lenet5 (trains on first use), "
                                                   "resnet18 (calibrate seconds only; needs torchvision)")
    args = p.parse_args()
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    models = args.models.split(",")
    rows = (demo_rows(args) if "demo" in models else []) + (lenet5_rows(args) if "lenet5" in models else [])
    if rows:
        print(format_table(HEADERS, rows))
    if "resnet18" in models:
        print(format_table(["model", "method", "calibrate s"], resnet18_seconds(args.methods.split(","))))


if __name__ == "__main__":
    main()
