"""Single-thread inference latency: qcompile's two export targets vs fp32 ONNX vs onnxruntime's own QDQ model.

Models (ONNX_NOTES.md shapes; torchvision-shaped networks written here, random init, BatchNorm folded):
  * LeNet-5 trained on Fashion-MNIST (the cached float weights of lenet5_fashion_mnist.py; trained here if
    missing), batch 64 of test images, calibrated on the training set;
  * ConvStack: the conv stack of ONNX_NOTES.md "Speed" (3->64->64->128->128->256->256, 3x3, ReLU, 2x2 max
    pools after the 2nd and 4th conv, 1.22 GMAC at batch 8 on 32x32), global pool, linear head, batch 8;
  * ResNet-18 and MobileNetV2 as torchvision builds them (BasicBlock [2, 2, 2, 2]; inverted residuals with
    ReLU6, width 1.0), 3x64x64, batch 8, Gaussian calibration batches.

Table 1 (onnxruntime, CPUExecutionProvider, intra_op_num_threads=1; the median of --repeats rounds in which
every session runs once in turn, so that machine load touches all alike):
  fp32 ONNX from torch.onnx.export (TorchScript exporter, opset 17);
  onnxruntime.quantization.quantize_static QDQ model of that file (int8 activations and weights, MinMax over
  the same calibration batches, after quant_pre_process), default session (on AVX2 CPUs without VNNI its
  u8 x s8 kernels saturate: it is fast but not what it simulates);
  qcompile target=ort (QLinearConv, float32 requantization; --ort-cpu any: exact on every x86 CPU);
  qcompile target=ort --ort-cpu avx2 (8-bit weights quantized to 7 bits: int8 kernels everywhere, exact on
  every x86 CPU; its own compile, so its quality columns show what the narrower weights cost);
  qcompile target=ort --ort-cpu vnni (int8 weights everywhere; exact only on VNNI CPUs: shown for speed);
  qcompile target=integer (ConvInteger u8 x u8 + the exact integer requantization chain).
Quality columns: top-1 accuracy on the LeNet-5 test set, else top-1 agreement with the float model and the
centred logit error 100 * ||y - y_float|| / ||y_float - mean(y_float)|| on --quality-samples random inputs;
"≠ ref" counts output elements of the timed batch not bit-identical to our reference executor (for our
exports; for the QDQ model, against our ort reference, only to show it is another computation).
Table 2 checks the issue's targets. Table 3 (PyTorch, one thread): qcompile's fast executor vs the float model.

    python benchmarks/latency.py [--quick] [--models lenet5,convstack,resnet18,mobilenetv2] [--policy w8a8]
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

import qcompile  # noqa: E402
from qcompile.backends.onnx_export import export_onnx  # noqa: E402
from qcompile.backends.ort import run_onnx  # noqa: E402
from qcompile.models import LeNet5  # noqa: E402

TARGET_RATIO = 1.5


TARGETS_VS_QDQ = 1.1  # target=ort latency / ORT quantize_static QDQ
TARGETS_VS_FP32 = {"LeNet-5": 0.75, "default": 0.6}  # target=ort latency / fp32 ONNX
INTEGER_VS_FP32 = 2.0  # target=integer latency / fp32 ONNX


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


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock: two 3x3 conv-BN, ReLU, identity or 1x1 stride-2 projection."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.a, self.b = conv_bn(cin, cout, 3, stride), conv_bn(cout, cout, 3)
        self.down = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.down is None else self.down(x)
        return F.relu(self.b(F.relu(self.a(x))) + skip)


class ResNet18(nn.Module):
    """torchvision resnet18: 7x7/2 stem, 3x3/2 max pool, BasicBlock stages [2, 2, 2, 2], global pool, fc."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem, self.pool = conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1)
        blocks, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks, self.fc = nn.Sequential(*blocks), nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.pool(F.relu(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV2 block: 1x1 expand + ReLU6, 3x3 depthwise + ReLU6, 1x1 project, residual."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = conv_bn(cin, hidden, 1) if expand != 1 else None
        self.dw, self.project = conv_bn(hidden, hidden, 3, stride, hidden), conv_bn(hidden, cout, 1)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x if self.expand is None else F.relu6(self.expand(x))
        y = self.project(F.relu6(self.dw(y)))
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    """torchvision mobilenet_v2 (width 1.0): stem 32, the seven (t, c, n, s) stages, 1x1 to 1280, classifier."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1))

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        self.stem, self.blocks, self.last = conv_bn(3, 32, 3, 2), nn.Sequential(*layers), conv_bn(cin, 1280, 1)
        self.fc = nn.Linear(1280, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.last(self.blocks(F.relu6(self.stem(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def init_like_torchvision(model: nn.Module) -> nn.Module:
    """Kaiming-normal convs (fan_out), BN at identity with random running statistics, small linear weights."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():  # random statistics: folding then changes every weight, as for a trained model
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
    return model.eval()


@dataclass
class Case:
    name: str
    model: nn.Module
    x: torch.Tensor                                   # the timed batch
    calibration: list[torch.Tensor]                   # calibration batches (ours and onnxruntime's)
    quality_x: torch.Tensor                           # inputs for the quality columns
    quality_y: torch.Tensor | None                    # labels (accuracy) or None (agreement with float)


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
    quantize_static(str(pre), str(out), common.Reader("x", batches), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)


def ort_session(path_or_model: Path | onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
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


def random_case(name: str, model: nn.Module, shape: tuple[int, ...], args) -> Case:
    g = torch.Generator().manual_seed(args.seed + 1)
    calib = [torch.randn(8, *shape, generator=g) for _ in range(args.calib_batches)]
    x = torch.randn(8, *shape, generator=g)
    qx = torch.randn(args.quality_samples, *shape, generator=g)
    return Case(name, model.eval(), x, calib, qx, None)


def builders() -> dict[str, Callable[[Any], Case]]:
    return {
        "lenet5": lenet_case,
        "convstack": lambda a: random_case("ConvStack", ConvStack(), (3, 32, 32), a),
        "resnet18": lambda a: random_case("ResNet-18", init_like_torchvision(ResNet18()), (3, 64, 64), a),
        "mobilenetv2": lambda a: random_case("MobileNetV2", init_like_torchvision(MobileNetV2()), (3, 64, 64), a),
    }


def quality(case: Case, predict: Callable[[torch.Tensor], torch.Tensor],
            float_out: torch.Tensor) -> tuple[float, float]:
    """(test accuracy %, or top-1 agreement with float %), centred logit error vs float (%)."""
    out = batched(predict, case.quality_x).to(torch.float64)
    top1 = out.argmax(1)
    truth = case.quality_y if case.quality_y is not None else float_out.argmax(1)
    spread = float((float_out - float_out.mean(0)).norm())
    return 100.0 * float((top1 == truth).float().mean()), 100.0 * float((out - float_out).norm()) / spread


def compile_targets(case: Case, args) -> dict[str, qcompile.CompiledModel]:
    out = {}
    for key, target, cpu in (("ort", "ort", "any"), ("avx2", "ort", "avx2"), ("integer", "integer", "any")):
        with common.Stopwatch() as sw:
            out[key] = qcompile.compile(case.model, case.x[:1], data=lambda: iter(case.calibration),
                                        policy=args.policy, calibration_steps=len(case.calibration),
                                        target=target, ort_cpu=cpu)
        print(f"{case.name}: compiled ({args.policy}, target={target}, ort-cpu {cpu}) in {sw.seconds:.1f} s",
              flush=True)
    return out


def sessions(case: Case, cms: dict[str, qcompile.CompiledModel], tmp: Path) -> dict[str, tuple[Any, Any]]:
    """label -> (onnxruntime session, the compiled model whose reference it is compared with)."""
    fp32_path, qdq_path = tmp / f"{case.name}_fp32.onnx", tmp / f"{case.name}_qdq.onnx"
    export_fp32(case.model, case.x, fp32_path)
    quantize_qdq(fp32_path, qdq_path, case.calibration)
    vnni = export_onnx(cms["ort"].integer_graph, "vnni")
    return {
        "fp32 ONNX": (ort_session(fp32_path), None),
        "ORT quantize_static QDQ": (ort_session(qdq_path), cms["ort"]),
        "qcompile target=ort": (ort_session(cms["ort"].to_onnx()), cms["ort"]),
        "qcompile target=ort, --ort-cpu avx2": (ort_session(cms["avx2"].to_onnx()), cms["avx2"]),
        "qcompile target=ort, --ort-cpu vnni": (ort_session(vnni), cms["ort"]),
        "qcompile target=integer": (ort_session(cms["integer"].to_onnx()), cms["integer"]),
    }


def target_checks(name: str, ms: dict[str, float]) -> list[list[object]]:
    """The issue's latency targets for target=ort (default --ort-cpu any, and avx2) and target=integer."""
    fp32, qdq = ms["fp32 ONNX"], ms["ORT quantize_static QDQ"]
    limit = TARGETS_VS_FP32.get(name, TARGETS_VS_FP32["default"])
    rows = []
    for label, what in (("qcompile target=ort", "ort"), ("qcompile target=ort, --ort-cpu avx2", "ort avx2")):
        rows += [(f"{what} <= {TARGETS_VS_QDQ}x QDQ", ms[label] / qdq, TARGETS_VS_QDQ),
                 (f"{what} <= {limit}x fp32", ms[label] / fp32, limit)]
    rows.append((f"integer <= {INTEGER_VS_FP32}x fp32", ms["qcompile target=integer"] / fp32, INTEGER_VS_FP32))
    return [[name, what, ratio, "met" if ratio <= bound else "NOT met"] for what, ratio, bound in rows]


def run_case(case: Case, args, tmp: Path) -> tuple[list[list[object]], list[list[object]], list[object]]:
    torch.set_num_threads(1)
    cms = compile_targets(case, args)
    sess = sessions(case, cms, tmp)
    xb = case.x.numpy()
    timings = common.measure_interleaved(
        {k: (lambda s=s: s.run(None, {s.get_inputs()[0].name: xb})) for k, (s, _) in sess.items()},
        args.repeats, args.warmup)
    with torch.no_grad():
        float_out = batched(case.model, case.quality_x).to(torch.float64)
    fp32, qdq = timings["fp32 ONNX"].median, timings["ORT quantize_static QDQ"].median
    rows = []
    for label, (s, cm) in sess.items():
        q, err = quality(case, lambda b, s=s: torch.from_numpy(run_onnx(s, b.numpy())[0]), float_out)
        if cm is None:
            exact = "-"
        else:
            out, ref = run_onnx(s, xb)[0].astype(np.float32), cm.reference(case.x).numpy().astype(np.float32)
            exact = f"{int(np.sum(out.view(np.uint32) != ref.view(np.uint32)))} / {out.size}"
        t = timings[label]
        rows.append([case.name, label, len(case.x), t.ms, t.median / fp32, t.median / qdq, q, err, exact])
    checks = target_checks(case.name, {k: t.median for k, t in timings.items()})
    with torch.no_grad():
        fast = common.measure_interleaved({"float": lambda: case.model(case.x), "fast": lambda: cms["ort"](case.x)},
                                          args.repeats, args.warmup)
    ratio = fast["fast"].median / fast["float"].median
    fast_row = [case.name, len(case.x), fast["float"].ms, fast["fast"].ms, ratio,
                "met" if ratio <= TARGET_RATIO else "NOT met"]
    return rows, checks, fast_row


def main() -> int:
    p = common.parser(__doc__.splitlines()[0], epochs=8, repeats=50)
    p.add_argument("--batch", type=int, default=64, help="LeNet-5 timed batch size (default %(default)s)")
    p.add_argument("--calib-batches", type=int, default=8, help="calibration batches of 8 for the random-input models")
    p.add_argument("--quality-samples", type=int, default=256, help="random inputs for the quality columns")
    p.add_argument("--models", default="lenet5,convstack,resnet18,mobilenetv2", help="comma-separated: "
                   + ", ".join(builders()))
    p.add_argument("--policy", default="w8a8", help="qcompile policy of both targets (default w8a8)")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.warmup = min(args.repeats, 5), min(args.warmup, 1)
        args.quality_samples, args.calib_batches = min(args.quality_samples, 32), min(args.calib_batches, 2)
    common.quiet_warnings()
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's pre-processing advice (we do pre-process)
    common.seed_everything(args.seed)
    common.header("single-thread inference latency", args)
    ort_rows, check_rows, fast_rows = [], [], []
    with tempfile.TemporaryDirectory() as d:
        for name in args.models.split(","):
            torch.set_num_threads(args.threads or os.cpu_count() or 1)  # training, if not cached
            torch.manual_seed(args.seed)
            rows, checks, fast = run_case(builders()[name](args), args, Path(d))
            ort_rows, check_rows, fast_rows = ort_rows + rows, check_rows + checks, fast_rows + [fast]
    print()
    common.table(["model", "backend", "batch", "median ms", "vs fp32", "vs QDQ", "acc or top-1 = float %",
                  "logit err vs float %", "elements ≠ ref"], ort_rows,
                 title=f"onnxruntime CPU, 1 thread, interleaved medians, {args.policy} (see the docstring)")
    common.table(["model", "target", "ratio", "status"], check_rows, title="the fast-export issue's latency targets")
    common.table(["model", "batch", "float PyTorch ms", "fast executor ms", "ratio", f"target <= {TARGET_RATIO}x"],
                 fast_rows, title="PyTorch, torch.set_num_threads(1), no_grad: qcompile fast executor (ort) vs float")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
