"""The torchvision zoo, compiled w8a8 from PyTorch and from its ONNX export, beside onnxruntime's quantize_static.

Per architecture (random init with seed 0, eval mode, num_classes=1000, input 3x64x64 unless --size) and
frontend (``torch``: the nn.Module; ``onnx-dyn``: torch.onnx.export with a dynamic batch; ``onnx-static``:
the same at a static batch of 1), with the default pipeline (w8a8, target ort):
  compile s      wall time of qcompile.compile (calibration on --calib random Gaussian batches of 8);
  mismatches     output elements where onnxruntime on the exported file differs in any bit from the
                 reference executor, over --samples random inputs (``cm.verify``);
  cos / top1     cosine similarity of the reference executor's logits with the float model's (per sample,
                 averaged), both centred by the float logits' mean over the inputs, and the share of samples
                 whose top-1 class agrees with the float model;
  plain cos      the same cosine without the centring (random-init logits share a large constant vector,
                 which this one counts as agreement);
  ORT ...        the same for onnxruntime's quantize_static QDQ model (int8, per tensor, MinMax) of the
                 fp32 export, calibrated on the same batches (onnx frontends only; "-" for torch);
  PT2E ...       with --pt2e, the same for PyTorch's PT2E flow (torchao, X86 inductor quantizer's default
                 static config) on the nn.Module (torch frontend only; ``pt2e_baseline``);
  blocked by     the first line of the error when a compile fails.

torchvision cannot be installed beside the torch 2.13.0 CPU build of the main venv. Make a separate venv
once (a large install from this machine's disk, ~5.5 GB):

    python3 -m venv ../venv-tv && ../venv-tv/bin/pip install torch==2.14.1 torchvision==0.29.1
    ../venv-tv/bin/pip install numpy onnx onnxruntime onnx-graphsurgeon ml_dtypes networkx scikit-learn \\
        tqdm matplotlib pydot onnxscript
    ../venv-tv/bin/pip install torchao==0.18.0 --no-deps    # only for --pt2e

and run (one thread; this takes long: pick models and frontends with the flags)

    OMP_NUM_THREADS=1 PYTHONPATH=. ../venv-tv/bin/python benchmarks/zoo.py [--models resnet18,vgg11_bn]
        [--frontends torch,onnx-dyn,onnx-static] [--samples 8] [--size 64]

Never part of the test run or CI.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
from torch import nn

import qcompile
from qcompile.frontends.torch_fx import quiet_torch
from qcompile.report import format_table

MODELS = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
          "regnet_x_400mf", "regnet_y_400mf", "squeezenet1_1", "shufflenet_v2_x1_0", "densenet121", "vgg11_bn",
          "vgg11_bn@224", "mnasnet1_0", "googlenet", "convnext_tiny"]
FRONTENDS = ["torch", "onnx-dyn", "onnx-static"]


def build(name: str) -> tuple[nn.Module, int | None]:
    """The torchvision model (random init, seed 0) and its own input size when the name carries one."""
    import torchvision

    arch, _, size = name.partition("@")
    torch.manual_seed(0)
    kwargs: dict[str, Any] = {"weights": None}
    if arch == "googlenet":
        kwargs.update(aux_logits=False, init_weights=True)
    model = torchvision.models.get_model(arch, **kwargs).eval()
    return model, int(size) if size else None


def export(model: nn.Module, x: torch.Tensor, path: Path, dynamic: bool) -> str:
    """The TorchScript exporter (opset 17), or the dynamo exporter where it refuses; returns which."""
    axes = {"x": {0: "batch"}, "logits": {0: "batch"}} if dynamic else None
    with quiet_torch(), warnings.catch_warnings():  # the exporters print whole graphs when they refuse
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (x[:1],), str(path), dynamo=False, opset_version=17, input_names=["x"],
                              output_names=["logits"], dynamic_axes=axes)
            return "torchscript"
        except Exception:  # noqa: BLE001 - e.g. adaptive pools to a non-divisor of the input
            shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic else None
            torch.onnx.export(model, (x[:2] if dynamic else x[:1],), str(path), dynamo=True, opset_version=18,
                              input_names=["x"], output_names=["logits"], dynamic_shapes=shapes,
                              external_data=False)
            return "dynamo"


@dataclass(frozen=True)
class Closeness:
    """Logits ``y`` against the float model's ``ref``, both [samples, classes]."""

    cos: float  # mean per-sample cosine of the centred logits (ref's mean over the samples taken off both)
    plain: float  # mean per-sample cosine of the logits as they are
    top1: float  # percent of samples whose arg max agrees


def closeness(y: np.ndarray, ref: np.ndarray) -> Closeness:
    """Centred and plain cosine similarity and top-1 agreement; the centring takes off the constant vector that
    dominates random-init logits."""
    a, b = torch.from_numpy(np.asarray(y, np.float64)), torch.from_numpy(np.asarray(ref, np.float64))
    centre = b.mean(dim=0, keepdim=True)
    cos = float(F.cosine_similarity(a - centre, b - centre, dim=1).mean())
    plain = float(F.cosine_similarity(a, b, dim=1).mean())
    return Closeness(cos, plain, 100.0 * float((a.argmax(1) == b.argmax(1)).double().mean()))


def ort_baseline(fp32: Path, batches: list[torch.Tensor], x: torch.Tensor, y_float: np.ndarray,
                 static: bool) -> Closeness:
    out = fp32.with_name(fp32.stem + "_qdq.onnx")
    cal = [b[i:i + 1] for b in batches for i in range(len(b))] if static else batches
    quantize_static(str(fp32), str(out), common.Reader("x", cal), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = 1, 3
    sess = ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])
    ys = [sess.run(None, {"x": x[i:i + 1].numpy()})[0] for i in range(len(x))] if static else \
        [sess.run(None, {"x": x.numpy()})[0]]
    return closeness(np.concatenate(ys), y_float)


def pt2e_baseline(model: nn.Module, batches: list[torch.Tensor], x: torch.Tensor, y_float: np.ndarray) -> Closeness:
    """PyTorch's PT2E flow (torchao's ``prepare_pt2e``/``convert_pt2e`` with the X86 inductor quantizer's default
    static config: uint8 activations per tensor, int8 weights per channel, MinMax observers), calibrated on the
    same batches; the converted module (quantize/dequantize pairs around float ops) runs the samples. Needs
    ``pip install torchao --no-deps`` in the benchmark venv; raises ImportError without it."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    with quiet_torch(), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        batch = torch.export.Dim("batch", min=1)
        graph = torch.export.export(model, (batches[0],), dynamic_shapes=({0: batch},)).module()
        prepared = prepare_pt2e(graph, quantizer)  # type: ignore[arg-type]
        for b in batches:
            prepared(b)
        converted = convert_pt2e(prepared)
        y = converted(x)
    return closeness(y.numpy(), y_float)


def blocker(exc: BaseException) -> str:
    """The unsupported op kinds with counts (from an UnsupportedOpsError), else the error's first line."""
    items = getattr(exc.__cause__, "items", None) or getattr(exc, "items", None)
    if not items:
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    kinds: dict[str, int] = {}
    for item in items:
        what = item.split("(", 1)[1].split(" at ")[0].split(":")[0].removeprefix("call_module ")
        what = what.removeprefix("call_function ").removeprefix("call_method ").rstrip(")")
        kinds[what] = kinds.get(what, 0) + 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))


@dataclass
class Row:
    model: str
    frontend: str
    compile_s: float | None = None
    mismatches: str = "-"
    close: Closeness | None = None
    ort_close: Closeness | None = None
    pt2e_close: Closeness | None = None
    blocked: str = ""

    def cells(self) -> list[Any]:
        def num(v: float | None, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        def close(c: Closeness | None) -> list[str]:
            return ["-"] * 3 if c is None else [f"{c.cos:.4f}", f"{c.plain:.4f}", f"{c.top1:.1f}"]

        return [self.model, self.frontend, num(self.compile_s, ".1f"), self.mismatches, *close(self.close),
                *close(self.ort_close), *close(self.pt2e_close), self.blocked[:150]]


def run_one(name: str, frontend: str, args: argparse.Namespace, tmp: Path) -> Row:
    model, own_size = build(name)
    size = own_size or args.size
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 3, size, size, generator=g) for _ in range(args.calib)]
    x = torch.randn(args.samples, 3, size, size, generator=g)
    with torch.no_grad():
        y_float = model(x).numpy()
    row = Row(name, frontend)
    source: nn.Module | str = model
    if frontend == "torch" and args.pt2e:
        try:
            row.pt2e_close = pt2e_baseline(model, batches, x, y_float)
        except Exception as exc:  # noqa: BLE001 - the baseline failing is reported, not fatal
            row.blocked = f"(PT2E: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:60]}) "
    if frontend != "torch":
        path = tmp / f"{name.replace('@', '_')}_{frontend}.onnx"
        try:
            if export(model, x, path, dynamic=frontend == "onnx-dyn") == "dynamo":
                row.frontend += " (dynamo)"
        except Exception as exc:  # noqa: BLE001 - both exporters refused: nothing to compile
            row.blocked = f"torch.onnx.export: {(str(exc).strip().splitlines() or [''])[0]}"
            return row
        source = str(path)
        try:
            row.ort_close = ort_baseline(path, batches, x, y_float, static=frontend == "onnx-static")
        except Exception as exc:  # noqa: BLE001 - the baseline failing is reported, not fatal
            row.blocked = f"(ORT baseline: {type(exc).__name__}) "
    start = time.perf_counter()
    try:
        cm = qcompile.compile(source, batches[0][:2], data=lambda: iter(batches), pipeline=args.pipeline)
    except Exception as exc:  # noqa: BLE001 - a refusal is a result of this benchmark
        row.blocked += blocker(exc)
        return row
    row.compile_s = time.perf_counter() - start
    result = cm.verify(x)
    row.mismatches = f"{result.mismatches}/{result.compared}"
    row.close = closeness(cm.reference(x).numpy(), y_float)
    return row


HEADERS = ["model", "frontend", "compile s", "mismatches", "cos", "plain cos", "top1 %", "ORT cos", "ORT plain cos",
           "ORT top1 %", "PT2E cos", "PT2E plain cos", "PT2E top1 %", "blocked by"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated (name@SIZE for another input size)")
    p.add_argument("--frontends", default=",".join(FRONTENDS), help="torch, onnx-dyn, onnx-static")
    p.add_argument("--samples", type=int, default=8, help="random inputs compared (default %(default)s)")
    p.add_argument("--calib", type=int, default=4, help="calibration batches of 8 (default %(default)s)")
    p.add_argument("--size", type=int, default=64, help="input height and width (default %(default)s)")
    p.add_argument("--pipeline", default=None, help="qcompile pipeline text (default: the default pipeline)")
    p.add_argument("--pt2e", action="store_true", help="add PyTorch PT2E (torchao) on the torch frontend's rows")
    args = p.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for frontend in args.frontends.split(","):
                row = run_one(name, frontend, args, Path(tmp))
                rows.append(row)
                print(format_table(HEADERS, [row.cells()]).splitlines()[-1], flush=True)
    print()
    print(format_table(HEADERS, [r.cells() for r in rows]))


if __name__ == "__main__":
    main()
