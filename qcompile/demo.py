"""``qcompile demo``: the built-in default job, start to finish on scikit-learn's digits.

Trains DemoNet (a small residual CNN) in float, compiles it at several policies, exports each to
integer ONNX, verifies it in onnxruntime against the reference executor on the whole test split, and
prints accuracy, cost and mismatches side by side.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

import qcompile
from qcompile.files import write_text
from qcompile.models import DemoNet, train_float
from qcompile.report import format_table, layer_table


def run_demo(epochs: int, policies: list[str], out_dir: Path | None, force: bool, progress: bool) -> int:
    torch.manual_seed(0)
    start = time.perf_counter()
    data = qcompile.load_data("digits")
    assert data.y_train is not None
    model = train_float(DemoNet(), data.x_train, data.y_train, epochs=epochs, progress=progress)
    print(f"trained DemoNet on digits ({len(data.x_train)} train / {len(data.x_test)} test images, {epochs} epochs)")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    rows, mismatches, reports = [], 0, {}
    for policy in policies:
        cm = qcompile.compile(model, data.x_train[:1], data=data, policy=policy, progress=progress)
        report = cm.report(data, data.x_test, progress=progress)
        reports[policy] = report
        acc, t, v = report["accuracy"], report["totals"], report["verify"]
        mismatches += v["mismatches"]
        rows.append([policy, acc["float"], acc["simulated"], acc["integer"], acc["onnx"],
                     t["rel_bops_percent"], t["weight_bytes"], f"{v['mismatches']}/{v['compared']}"])
        if out_dir is not None:
            cm.save_onnx(out_dir / f"demo_{policy}.onnx", force=force)
            write_text(out_dir / f"demo_{policy}.json", json.dumps(report, indent=2) + "\n", force)
    headers = ["policy", "float %", "simulated %", "integer %", "onnxruntime %", "rel. BOPs %", "weight bytes",
               "mismatches"]
    print(format_table(headers, rows))
    last = policies[-1]
    print(f"\nper layer, policy {last}:\n{layer_table(reports[last])}")
    print(f"\n{mismatches} mismatching output elements between onnxruntime and the reference executor "
          f"({time.perf_counter() - start:.1f} s)")
    if mismatches:
        print("error: the integer ONNX export is not bit-exact", file=sys.stderr)
        return 1
    return 0
