"""Vision transformers (timm and torchvision, random init), compiled w8a8 from PyTorch and from ONNX, beside
onnxruntime's quantize_static: the columns and the method of ``zoo.py``, on

  deit_tiny_patch16_224 (timm, 224x224), mobilevit_xxs (timm, 64x64), efficientformer_l1 (timm, 224x224),
  vit_b_16 (torchvision, image_size=64).

Needs the torchvision venv of ``zoo.py`` with timm added without its dependencies:

    ../venv-tv/bin/pip install timm --no-deps
    OMP_NUM_THREADS=1 PYTHONPATH=. ../venv-tv/bin/python benchmarks/vit_zoo.py [--models deit_tiny_patch16_224]
        [--frontends torch,onnx-dyn] [--samples 4] [--calib 2] [--pipeline TEXT]

Never part of the test run or CI.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
import zoo
from torch import nn

from qcompile.report import format_table

MODELS = {"deit_tiny_patch16_224": 224, "mobilevit_xxs": 64, "efficientformer_l1": 224, "vit_b_16": 64}


def build(name: str) -> tuple[nn.Module, int | None]:
    """The model (random init, seed 0, eval) and its input size."""
    torch.manual_seed(0)
    if name == "vit_b_16":
        import torchvision

        model = torchvision.models.vit_b_16(weights=None, image_size=MODELS[name]).eval()
        nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initializes the head: logits all 0
        return model, MODELS[name]
    import timm

    kwargs: dict[str, Any] = {"pretrained": False}
    if name.startswith("efficientformer"):
        kwargs["num_classes"] = 1000
    model = timm.create_model(name, **kwargs).eval()
    for m in model.modules():  # timm zero-initializes each block's last BatchNorm: an always-zero activation
        if isinstance(m, nn.BatchNorm2d) and not m.weight.any():
            nn.init.ones_(m.weight)
    return model, MODELS[name]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    p.add_argument("--frontends", default="torch,onnx-dyn", help="torch, onnx-dyn, onnx-static")
    p.add_argument("--samples", type=int, default=4, help="random inputs compared (default %(default)s)")
    p.add_argument("--calib", type=int, default=2, help="calibration batches of 8 (default %(default)s)")
    p.add_argument("--pipeline", default=None, help="qcompile pipeline text (default: the default pipeline)")
    p.add_argument("--pt2e", action="store_true", help="add PyTorch PT2E (torchao) on the torch frontend's rows")
    args = p.parse_args()
    args.size = 64
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    zoo.build = build  # the same measurement, other models
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for frontend in args.frontends.split(","):
                row = zoo.run_one(name, frontend, args, Path(tmp))
                rows.append(row)
                print(format_table(zoo.HEADERS, [row.cells()]).splitlines()[-1], flush=True)
    print()
    print(format_table(zoo.HEADERS, [r.cells() for r in rows]))


if __name__ == "__main__":
    main()
