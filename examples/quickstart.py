"""Quickstart: train a tiny CNN on digits, compile it to an integer-only graph, export and verify.

Run: python examples/quickstart.py [OUT_DIR]
"""

import sys
import tempfile
from pathlib import Path

import torch

import qcompile
from qcompile.models import train_float

sys.path.insert(0, str(Path(__file__).parent))
from tiny_model import make_model  # noqa: E402


def main(out_dir: Path) -> None:
    torch.manual_seed(0)
    data = qcompile.load_data("digits")
    model = train_float(make_model(), data.x_train, data.y_train, epochs=8)

    # "4-bit everywhere, first conv and last linear 8-bit", calibrated on the training split
    cm = qcompile.compile(model, data.x_train[:1], data=data, policy="aqt")
    x = data.x_test[:8]
    print("integer graph logits (fast executor):", cm(x)[0, :4])
    assert torch.equal(cm(x), cm.reference(x)), "fast and reference executors must agree bit for bit"

    out_dir.mkdir(parents=True, exist_ok=True)
    path = cm.save_onnx(out_dir / "tiny_aqt.onnx", force=True)
    result = cm.verify(data.x_test)
    print(f"wrote {path}; onnxruntime vs reference: {result.mismatches} of {result.compared} elements differ")
    report = cm.report(data)
    print("accuracy:", {k: round(v, 2) for k, v in report["accuracy"].items()})
    print(f"relative BOPs: {report['totals']['rel_bops_percent']:.2f} %")
    assert result.mismatches == 0


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()))
