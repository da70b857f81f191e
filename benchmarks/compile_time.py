"""Compile time of a ResNet-50-sized graph: qcompile's default pipeline vs torch.ao's prepare_fx/convert_fx.

ResNet-50 (bottleneck blocks [3, 4, 6, 3], widths 64..2048, BatchNorm, 1000 classes, 25.6 M parameters) with
random weights and BatchNorm statistics set by a few train-mode passes over random data, so that folding
is not a no-op. Inputs are 64x64 (224x224 makes calibration slow on a CPU), batch 2, --calib-batches random
calibration batches, given to both tools.

qcompile: qcompile.compile(model, x, data=batches, policy=w8a8) runs trace -> canonicalize -> fold-batchnorm ->
insert-quantizers -> calibrate -> assign-bitwidths -> share-scales -> lower-integer with the IR verified
after every pass; per-pass seconds come from cm.timings, tracing is timed on its own, and "rest" is the
total minus the passes (input checks, tracing, IR verification). ONNX export (cm.to_onnx()) is timed apart.
torch.ao: prepare_fx + calibration over the same batches + convert_fx with
get_default_qconfig_mapping("x86") (deprecation warnings suppressed).

Each phase: median over --repeats runs after --warmup untimed runs; torch.set_num_threads(--threads).

    python benchmarks/compile_time.py [--quick]
"""

from __future__ import annotations

import copy
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

import qcompile  # noqa: E402
from qcompile.frontends.torch_fx import trace_module  # noqa: E402


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + identity)


class ResNet50(nn.Module):
    """torchvision's ResNet-50 layout (v1.5: stride on the 3x3 conv), written out here."""

    def __init__(self, layers: tuple[int, ...] = (3, 4, 6, 3), classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, cin = [], 64
        for i, (n, width) in enumerate(zip(layers, (64, 128, 256, 512), strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(cin, width, 2 if j == 0 and i > 0 else 1))
                cin = width * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build(seed: int, size: int, batch: int, calib: int) -> tuple[nn.Module, torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = ResNet50()
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the warm-up passes
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(8, 3, size, size, generator=g))
    model.eval()
    x = torch.randn(batch, 3, size, size, generator=g)
    batches = [torch.randn(batch, 3, size, size, generator=g) for _ in range(calib)]
    return model, x, batches


LAST: qcompile.CompiledModel | None = None


def run_qcompile(model: nn.Module, x: torch.Tensor, batches: list[torch.Tensor]) -> dict[str, float]:
    phases: dict[str, float] = {}
    with common.Stopwatch() as sw:
        trace_module(copy.deepcopy(model), (x,))
    phases["trace (timed on its own)"] = sw.seconds
    with common.Stopwatch() as total:
        cm = qcompile.compile(model, x, data=lambda: iter(batches), policy="w8a8", calibration_steps=len(batches))
    passes = 0.0
    for t in cm.timings:
        phases[t.name] = t.seconds
        passes += t.seconds
    phases["rest: checks, trace, IR verification"] = total.seconds - passes
    phases["total compile()"] = total.seconds
    with common.Stopwatch() as sw:
        cm.to_onnx()
    phases["ONNX export (to_onnx)"] = sw.seconds
    phases["compile() + ONNX export"] = total.seconds + sw.seconds
    global LAST  # noqa: PLW0603 - the last compiled model, checked once after timing
    LAST = cm
    return phases


def run_torch_ao(model: nn.Module, x: torch.Tensor, batches: list[torch.Tensor]) -> dict[str, float]:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    m = copy.deepcopy(model).eval()
    mapping = get_default_qconfig_mapping("x86")
    phases: dict[str, float] = {}
    with common.Stopwatch() as sw:
        prepared = prepare_fx(m, mapping, example_inputs=(x,))
    phases["prepare_fx (trace, fuse conv-bn, observers)"] = sw.seconds
    with common.Stopwatch() as sw, torch.no_grad():
        for b in batches:
            prepared(b)
    phases["calibrate"] = sw.seconds
    with common.Stopwatch() as sw:
        convert_fx(prepared)
    phases["convert_fx"] = sw.seconds
    phases["total"] = sum(phases.values())
    return phases


def median_phases(fn, repeats: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    runs: dict[str, list[float]] = defaultdict(list)
    for _ in range(max(1, repeats)):
        for k, v in fn().items():
            runs[k].append(v)
    return {k: statistics.median(v) for k, v in runs.items()}


def main() -> int:
    p = common.parser(__doc__.splitlines()[0], repeats=3)
    p.add_argument("--size", type=int, default=64, help="input height and width (default %(default)s)")
    p.add_argument("--batch", type=int, default=2, help="calibration batch size (default %(default)s)")
    p.add_argument("--calib-batches", type=int, default=8, help="calibration batches (default %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default %(default)s)")
    p.set_defaults(warmup=1)
    args = p.parse_args()
    if args.quick:
        args.repeats, args.warmup, args.calib_batches = 1, 0, min(args.calib_batches, 2)
    common.quiet_warnings()
    common.seed_everything(args.seed)
    torch.set_num_threads(args.threads)
    common.header("compile time: ResNet-50", args)

    model, x, batches = build(args.seed, args.size, args.batch, args.calib_batches)
    params = sum(p.numel() for p in model.parameters())
    print(f"ResNet-50: {params / 1e6:.1f} M parameters, input {tuple(x.shape)}, {len(batches)} calibration batches; "
          f"median of {args.repeats} run(s) after {args.warmup} warm-up run(s)\n", flush=True)

    q = median_phases(lambda: run_qcompile(model, x, batches), args.repeats, args.warmup)
    t = median_phases(lambda: run_torch_ao(model, x, batches), args.repeats, args.warmup)

    total_q = q["total compile()"]
    no_share = ("compile() + ONNX export", "trace (timed on its own)")
    rows = [["qcompile", k, v, "-" if k in no_share else 100.0 * v / total_q] for k, v in q.items()]
    rows += [["torch.ao", k, v, 100.0 * v / t["total"]] for k, v in t.items()]
    common.table(["tool", "phase", "seconds", "% of total"], rows,
                 title="seconds per phase (medians per phase, so they need not add up exactly; qcompile %: of "
                       "total compile(); the trace row is a separate run)")
    common.table(["tool", "to an integer model (s)", "incl. ONNX export (s)", "vs torch.ao"],
                 [["qcompile", total_q, q["compile() + ONNX export"], total_q / t["total"]],
                  ["torch.ao (x86)", t["total"], "-", 1.0]], title="summary")
    if LAST is not None:  # sanity check of what was timed (not timed itself)
        v = LAST.verify(x)
        with torch.no_grad():
            same = int((LAST(x).argmax(1) == model(x).argmax(1)).sum())
        print(f"check: qcompile's ONNX vs its reference executor on the {len(x)} example inputs: {v.mismatches} "
              f"mismatching of {v.compared} output elements; integer top-1 equals float top-1 on {same}/{len(x)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
