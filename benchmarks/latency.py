"""Single-thread inference latency: our integer ONNX vs fp32 ONNX vs onnxruntime's own QDQ quantization.

Two models:
  * LeNet-5 trained on Fashion-MNIST (the cached float weights of lenet5_fashion_mnist.py; trained here if
    missing), batch 64 of test images, calibrated on the training set;
  * ConvStack: the conv stack of ONNX_NOTES.md "Speed" (3->64->64->128->128->256->256, 3x3, padding 1,
    ReLU, no BatchNorm, 2x2 max pool after the 2nd and 4th conv, i.e. 1.22 GMAC at batch 8 on 32x32), plus
    global average pool and a linear head; random He-initialised weights (zero biases), batch 8, random
    Gaussian calibration batches.

Table 1 (onnxruntime, CPUExecutionProvider, intra_op_num_threads=1, median of --repeats after warm-up):
  fp32 ONNX from torch.onnx.export (legacy TorchScript exporter, dynamo=False, opset 17);
  qcompile w8a8 integer ONNX (cm.to_onnx());
  onnxruntime.quantization.quantize_static QDQ model of the same fp32 ONNX (default settings: QDQ, int8
  activations and weights, per-tensor, MinMax over the same calibration batches), run with the default
  session and with session.x64quantprecision=1.
The fp32 model is pre-processed with onnxruntime's quant_pre_process before quantize_static, as its docs ask.
Quality columns, on the LeNet-5 test set or --quality-samples random ConvStack inputs: top-1 accuracy
(LeNet-5 only); logit error vs float PyTorch, 100 * ||y - y_float|| / ||y_float - mean_over_inputs(y_float)||
(centred, because random-weight ConvStack logits are dominated by a constant per class); top-1 disagreement
with our reference executor ("-" where the float model gives every input the same class, as the random
ConvStack does); and, on the timed batch, output elements not bit-identical to our reference
executor (only meaningful for our export: the QDQ model quantizes differently).

Table 2 (PyTorch, torch.set_num_threads(1), under torch.no_grad): qcompile's fast executor
(`cm(x)`: the integer graph with its fused plan) vs the float model on the same input; target: within 1.5x.

    python benchmarks/latency.py [--quick]
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

import qcompile  # noqa: E402
from qcompile.backends.ort import run_onnx  # noqa: E402
from qcompile.models import LeNet5  # noqa: E402

TARGET_RATIO = 1.5


class ConvStack(nn.Module):
    """ONNX_NOTES.md speed stack: six 3x3 convs (ReLU, no BatchNorm), two max pools, global pool, linear."""

    def __init__(self, widths: tuple[int, ...] = (3, 64, 64, 128, 128, 256, 256), classes: int = 10) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(widths[:-1], widths[1:], strict=True))
        self.head = nn.Linear(widths[-1], classes)
        for m in self.modules():  # He init, zero bias: the input-dependent signal survives six layers
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = F.relu(conv(x))
            if i in (1, 3):
                x = F.max_pool2d(x, 2)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@dataclass
class Case:
    name: str
    model: nn.Module
    x: torch.Tensor                                   # the timed batch
    calibration: list[torch.Tensor]                   # calibration batches (ours and onnxruntime's)
    quality_x: torch.Tensor                           # inputs for the quality columns
    quality_y: torch.Tensor | None                    # labels (accuracy) or None (agreement with float)
    cm: qcompile.CompiledModel | None = None


class Reader(CalibrationDataReader):
    def __init__(self, name: str, batches: list[torch.Tensor]) -> None:
        self.name, self.batches = name, batches
        self.it = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        b = next(self.it, None)
        return None if b is None else {self.name: b.numpy()}

    def rewind(self) -> None:
        self.it = iter(self.batches)


def export_fp32(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    torch.onnx.export(model.eval(), (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})


def quantize_qdq(fp32: Path, out: Path, batches: list[torch.Tensor]) -> None:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_name(out.stem + "_pre.onnx")
    try:
        quant_pre_process(str(fp32), str(pre))
    except Exception as exc:  # noqa: BLE001 - pre-processing is advice, not a requirement
        print(f"  quant_pre_process failed ({type(exc).__name__}: {exc}); quantizing the raw export", flush=True)
        pre = fp32
    quantize_static(str(pre), str(out), Reader("x", batches), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)


def ort_session(path_or_model: Path | onnx.ModelProto, x64: bool = False) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if x64:
        opts.add_session_config_entry("session.x64quantprecision", "1")
    data = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def batched(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([torch.as_tensor(fn(x[i : i + batch])) for i in range(0, len(x), batch)])


def lenet_case(args) -> Case:
    data = qcompile.load_data("fashion-mnist")
    epochs = args.epochs
    if args.quick:
        data, epochs = common.subset(data, train=6000, test=1000), min(epochs, 1)
    model, cached, seconds = common.trained(LeNet5, "lenet5", data, epochs, seed=args.seed)
    print(f"LeNet-5: {epochs} epochs on {len(data.x_train)} images, "
          + ("weights from the cache" if cached else f"trained in {seconds:.0f} s"), flush=True)
    calib = list(data.calibration()())[:32]
    return Case("LeNet-5", model, data.x_test[: args.batch], calib, data.x_test, data.y_test)


def convstack_case(args) -> Case:
    torch.manual_seed(args.seed)
    model = ConvStack().eval()
    g = torch.Generator().manual_seed(args.seed + 1)
    calib = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(args.calib_batches)]
    x = torch.randn(8, 3, 32, 32, generator=g)
    qx = torch.randn(args.quality_samples, 3, 32, 32, generator=g)
    return Case("ConvStack", model, x, calib, qx, None)


def quality(case: Case, predict: Callable[[torch.Tensor], torch.Tensor], ref_top1: torch.Tensor,
            float_out: torch.Tensor) -> tuple[object, float, object]:
    """(test accuracy % or "-"), (centred logit error vs float, %), (top-1 disagreement with our reference, %)."""
    out = batched(predict, case.quality_x).to(torch.float64)
    top1 = out.argmax(1)
    acc = "-" if case.quality_y is None else 100.0 * float((top1 == case.quality_y).float().mean())
    spread = float((float_out - float_out.mean(0)).norm())
    err = 100.0 * float((out - float_out).norm()) / spread
    if len(float_out.argmax(1).unique()) < 2:  # every input gets one class: top-1 says nothing
        return acc, err, "-"
    return acc, err, 100.0 * float((top1 != ref_top1).float().mean())


def fast_dtypes(cm: qcompile.CompiledModel) -> str:
    """How the fast executor runs the conv/linear layers: one float32 GEMM, float32 chunks, or float64."""
    from qcompile.backends.fast import gemm_plan
    from qcompile.ir import intops as ops

    plans = [gemm_plan(m) for m in cm.integer_graph.modules() if isinstance(m, (ops.IntConv2d, ops.IntLinear))]
    single = sum(p.dtype is torch.float32 and len(p.chunks) == 1 for p in plans)
    chunked = sum(p.dtype is torch.float32 and len(p.chunks) > 1 for p in plans)
    return f"{single} float32 / {chunked} float32-chunked / {len(plans) - single - chunked} float64"


def run_case(case: Case, args, tmp: Path) -> tuple[list[list[object]], list[object]]:
    torch.set_num_threads(1)
    model = case.model.eval()
    calib = case.calibration
    with common.Stopwatch() as sw:
        case.cm = cm = qcompile.compile(model, case.x[:1], data=lambda: iter(calib), policy="w8a8",
                                        calibration_steps=len(calib))
    print(f"{case.name}: compiled (w8a8) in {sw.seconds:.1f} s; timed batch {tuple(case.x.shape)}", flush=True)

    fp32_path, qdq_path = tmp / f"{case.name}_fp32.onnx", tmp / f"{case.name}_qdq.onnx"
    export_fp32(model, case.x, fp32_path)
    quantize_qdq(fp32_path, qdq_path, calib)
    ours = cm.to_onnx()
    sessions = {
        "fp32 ONNX (torch.onnx.export)": ort_session(fp32_path),
        "qcompile w8a8 integer ONNX": ort_session(ours),
        "ORT quantize_static QDQ": ort_session(qdq_path),
        "ORT QDQ + x64quantprecision=1": ort_session(qdq_path, x64=True),
    }

    # quality columns
    with torch.no_grad():
        float_out = batched(model, case.quality_x).to(torch.float64)
    ref_top1 = batched(cm.reference, case.quality_x).argmax(1)
    xb = case.x.numpy()
    ref_out = cm.reference(case.x).numpy()
    rows, base = [], None
    for label, sess in sessions.items():
        t = common.measure(lambda s=sess: s.run(None, {s.get_inputs()[0].name: xb}), args.repeats, args.warmup)
        base = base or t.median
        acc, err, disagree = quality(case, lambda b, s=sess: torch.from_numpy(run_onnx(s, b.numpy())[0]), ref_top1,
                                     float_out)
        out = run_onnx(sess, xb)[0].astype(np.float32)
        if "qcompile" in label:
            mism = int(np.sum(out.view(np.uint32) != ref_out.astype(np.float32).view(np.uint32)))
            exact = f"{mism} / {out.size}"
        else:
            exact = f"{int(np.sum(out != ref_out))} / {out.size}"
        rows.append([case.name, label, tuple(case.x.shape)[0], t.ms, 1e3 * t.minimum, t.median / base, acc,
                     err, disagree, exact])

    # fast executor vs float PyTorch, same input, one thread
    with torch.no_grad():
        t_float = common.measure(lambda: model(case.x), args.repeats, args.warmup)
        t_fast = common.measure(lambda: cm(case.x), args.repeats, args.warmup)
    ratio = t_fast.median / t_float.median
    fast = [case.name, tuple(case.x.shape)[0], t_float.ms, t_fast.ms, ratio,
            "met" if ratio <= TARGET_RATIO else "NOT met", fast_dtypes(cm)]
    return rows, fast


def main() -> int:
    p = common.parser(__doc__.splitlines()[0], epochs=8, repeats=50)
    p.add_argument("--batch", type=int, default=64, help="LeNet-5 timed batch size (default %(default)s)")
    p.add_argument("--calib-batches", type=int, default=8, help="ConvStack calibration batches of 8")
    p.add_argument("--quality-samples", type=int, default=256, help="ConvStack inputs for the quality columns")
    p.add_argument("--models", default="lenet5,convstack", help="comma-separated: lenet5, convstack")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.warmup = min(args.repeats, 5), min(args.warmup, 1)
        args.quality_samples, args.calib_batches = min(args.quality_samples, 32), min(args.calib_batches, 2)
    common.quiet_warnings()
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's pre-processing advice (we do pre-process)
    common.seed_everything(args.seed)
    common.header("single-thread inference latency", args)

    builders = {"lenet5": lenet_case, "convstack": convstack_case}
    ort_rows, fast_rows = [], []
    with tempfile.TemporaryDirectory() as d:
        for name in args.models.split(","):
            torch.set_num_threads(args.threads or os.cpu_count() or 1)  # training, if not cached
            case = builders[name](args)
            rows, fast = run_case(case, args, Path(d))
            ort_rows += rows
            fast_rows.append(fast)
    print()
    common.table(["model", "backend", "batch", "median ms", "min ms", "vs fp32 ONNX", "test acc %",
                  "logit err vs float %", "top-1 ≠ our ref %", "elements ≠ our ref"], ort_rows,
                 title="onnxruntime CPU, 1 thread (quality columns: see the script's docstring)")
    common.table(["model", "batch", "float PyTorch ms", "fast executor ms", "ratio", f"target <= {TARGET_RATIO}x",
                  "fast-executor GEMM dtypes"],
                 fast_rows, title="PyTorch, torch.set_num_threads(1), no_grad: qcompile fast executor vs float model")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
