"""A tiny ViT trained on Fashion-MNIST: w8a8 integer accuracy beside float, onnxruntime and a bit-width search.

The model is ``tests/vit.py``'s TinyViT, written as timm writes its blocks (patch-embedding conv + flatten
+ transpose, class token, position embedding, pre-norm blocks: LayerNorm, qkv Linear, reshape/permute/
unbind, ``scaled_dot_product_attention``, proj Linear, residual add; LayerNorm, Linear, GELU, Linear,
residual add; final LayerNorm, class-token select, Linear head), sized by the flags: by default 4 blocks,
dim 64, 4 heads, patch 4 on the 28x28 images (49 patches + the class token), MLP hidden 128, 139k
parameters. The images are normalized with the training set's mean and standard deviation. Float training:
``common.trained`` (Adam, one-cycle, seed 0, cached in ``benchmarks/.cache``), ``--epochs`` over the first
``--train`` (shuffled) training images.

The rows of the table (the columns and the method of ``modern_fashion_mnist.py``, whose helpers run them):
  qcompile w8a8 target=ort / target=integer   ``qcompile.compile(model, policy="w8a8", target=...)``
      calibrated on --calib batches of 64 training images; "integer %" is top-1 of the integer graph on the
      fast executor, "onnxruntime %" that of the exported integer ONNX in onnxruntime, "mismatches" the
      output elements where onnxruntime differs in any bit from the reference executor on the first
      --verify test images;
  ORT quantize_static per-tensor / per-channel   onnxruntime's quantizer (QDQ, int8, MinMax) on the fp32
      export, calibrated on the same batches; "integer %" unfused, "onnxruntime %" a default session;
  qcompile aqt   the AQT recipe (``aqt{epochs=E}``: 4-bit weights, 8-bit first and last layer, 8-bit
      activations), trained --search-epochs over the first --search-train training images; its weight bits
      per layer are printed below the table.
The last line checks the issue's target: w8a8 integer accuracy within 1.0 point of float.

Runs in the main venv (torch only):

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/vit_fashion_mnist.py [--epochs 3] [--train 20000]
        [--calib 32] [--verify 500] [--search-epochs 1] [--search-train 4000] [--quick]

The first run trains (about 16 minutes at load 7-9 on a shared 2-core CPU); later runs load the cached weights.
Never part of the test run or CI.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import common  # noqa: E402
import modern_fashion_mnist as modern  # noqa: E402
from vit import TinyViT  # noqa: E402

import qcompile  # noqa: E402
from qcompile.api import accuracy, search_pipeline  # noqa: E402
from qcompile.backends.ort import run_onnx, session  # noqa: E402
from qcompile.data import Dataset  # noqa: E402

TARGET_POINTS = 1.0


def normalized() -> Dataset:
    data = qcompile.load_data("fashion-mnist")
    def norm(x: torch.Tensor) -> torch.Tensor:
        return (x - modern.MEAN) / modern.STD

    return Dataset("fashion-mnist-norm", norm(data.x_train), data.y_train, norm(data.x_test), data.y_test)


def factory(args: argparse.Namespace) -> nn.Module:
    return TinyViT(img=28, patch=args.patch, chans=1, dim=args.dim, depth=args.depth, num_heads=args.heads,
                   classes=10, fused_attn=True)


def float_model(data: Dataset, args: argparse.Namespace) -> tuple[nn.Module, str]:
    train = common.subset(data, train=args.train)
    name = f"tinyvit-d{args.depth}-c{args.dim}-h{args.heads}-p{args.patch}"
    model, cached, seconds = common.trained(lambda: factory(args), name, train, args.epochs, seed=args.seed,
                                            lr=args.lr, batch=args.batch, retrain=args.retrain,
                                            threads=args.threads)
    how = (f"{name}: {sum(p.numel() for p in model.parameters())} parameters, {args.epochs} epochs Adam (one-cycle, "
           f"lr {args.lr:g}, batch {args.batch}) on {len(train.x_train)} images, "
           + ("weights from the cache" if cached else f"trained in {seconds:.0f} s"))
    return model, how


def aqt_row(model: nn.Module, data: Dataset, args: argparse.Namespace, float_acc: float) -> tuple[modern.Row, str]:
    """The AQT recipe on the float weights, trained on the first --search-train images; the row and its bits."""
    spec = f"aqt{{epochs={args.search_epochs}}}"
    search = common.subset(data, train=args.search_train)
    with common.Stopwatch() as sw:
        cm = qcompile.compile(model, search.x_train[:1], data=search, pipeline=search_pipeline(spec))
    x, y = data.x_test, data.y_test
    assert y is not None
    sess = session(cm.to_onnx())
    row = modern.Row(args.name, f"qcompile {spec}", float_acc, accuracy(cm, x, y),
                     accuracy(lambda b, s=sess: run_onnx(s, b.numpy()), x, y))  # type: ignore[misc]
    ver = cm.verify(x[: args.verify])
    row.mismatches = f"{ver.mismatches}/{ver.compared}"
    layers = cm.report()["layers"]
    bits = ", ".join(f"{layer['name']} w{layer['w_bits']}" for layer in layers)
    print(f"  compiled in {sw.seconds:.0f} s: {row}", flush=True)
    return row, f"{spec} on {len(search.x_train)} images ({sw.seconds:.0f} s): weight bits {bits}"


def main() -> int:
    p = common.parser(__doc__.splitlines()[0], epochs=3)
    p.add_argument("--train", type=int, default=20000, help="float training images (default %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="float training learning rate (default %(default)s)")
    p.add_argument("--batch", type=int, default=128, help="float training batch (default %(default)s)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--patch", type=int, default=4)
    modern.add_compile_flags(p, verify=500)
    p.add_argument("--search-epochs", type=int, default=1, help="aqt training epochs (0: no search row)")
    p.add_argument("--search-train", type=int, default=4000, help="aqt training images (default %(default)s)")
    args = p.parse_args()
    modern.start("Tiny ViT, Fashion-MNIST 1x28x28: w8a8 post-training and a bit-width search", args)
    data = normalized()
    if args.quick:
        args.epochs, args.train, args.calib, args.verify, args.search_train = 1, 2000, 4, 32, 500
        data = common.subset(data, test=1000)
    model, how = float_model(data, args)
    args.name = "tiny ViT"
    print(how, flush=True)
    torch.set_num_threads(1)
    batches = list(itertools.islice(data.calibration()(), args.calib))
    rows = modern.qcompile_rows(args.name, model, data, batches, args)
    with tempfile.TemporaryDirectory() as tmp:
        rows += modern.ort_rows(args.name, model, data, batches, rows[0].float_acc, Path(tmp))
    best = max(r.quantized() for r in rows if not r.quantizer.startswith("qcompile"))
    bits = ""
    if args.search_epochs > 0:
        row, bits = aqt_row(model, data, args, rows[0].float_acc)
        rows.append(row)
    common.table(modern.HEADERS, [modern.cells(r, best) for r in rows],
                 title=f"Fashion-MNIST test set ({len(data.x_test)} images), 1x28x28; calibration: {args.calib} "
                       f"batches of 64 training images, the same for both tools")
    if bits:
        print(bits)
    for r in rows[:2]:
        drop = r.float_acc - r.quantized()
        print(f"{r.quantizer}: {modern.below(drop, 'float')} (target <= {TARGET_POINTS}) -> "
              + ("MET" if drop <= TARGET_POINTS else "NOT MET"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
