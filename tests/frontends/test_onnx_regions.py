"""An adaptive average pool written as index arithmetic (the ONNX pattern of PyTorch's dynamo exporter for
AdaptiveAvgPool2d of a size it does not divide: VGG's 2x2 -> 7x7 at 64x64) imports as one
nn.AdaptiveAvgPool2d and compiles bit-exactly in both targets, from dynamic- and static-batch files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_onnx_import import Net, run_ort, save
from torch import nn

import qcompile
from qcompile.frontends.onnx_import import UnsupportedOnnxOpsError, load_onnx


def window_indices(size: int, out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's adaptive-pool windows [floor(i n / k), ceil((i + 1) n / k)): clamped indices [out, kmax],
    the mask of slots past each window's end, and the window lengths."""
    start = np.array([i * size // out for i in range(out)])
    end = np.array([-(-(i + 1) * size // out) for i in range(out)])
    kmax = int((end - start).max())
    raw = start[:, None] + np.arange(kmax)[None, :]
    return np.minimum(raw, size - 1), raw >= end[:, None], end - start


def adaptive_pool_as_dynamo_writes_it(net: Net, x: str, hw: int, out: int, off_by: float = 0.0) -> str:
    """Transpose, GatherND, Transpose, Where x2, Gather + Add over the window slots, Div by the counts."""
    idx, mask, counts = window_indices(hw, out)
    k = idx.shape[1]
    pairs = np.stack(np.broadcast_arrays(idx[:, :, None, None], idx[None, None, :, :]), axis=-1)  # [o, k, o, k, 2]
    t = net.op("Transpose", [x], "spatial_first", perm=[2, 3, 0, 1])
    g = net.op("GatherND", [t, net.const("window_idx", pairs, np.int64)], "gather_windows")
    t = net.op("Transpose", [g], "batch_first", perm=[4, 5, 0, 1, 2, 3])
    zero = net.const("zero", np.array(0.0))
    t = net.op("Where", [net.const("mask_h", mask[:, :, None, None], np.bool_), zero, t], "mask_rows")
    t = net.op("Where", [net.const("mask_w", mask, np.bool_), zero, t], "mask_cols")
    total = None
    for a in range(k):
        row = net.op("Gather", [t, net.const(f"slot{a}", np.array(a), np.int64)], f"row{a}", axis=3)
        for b in range(k):
            part = net.op("Gather", [row, net.const(f"slot{a}_{b}", np.array(b), np.int64)], f"col{a}{b}", axis=4)
            total = part if total is None else net.op("Add", [total, part], f"sum{a}{b}")
    divisor = (counts[:, None] * counts[None, :]).astype(np.float32) + off_by
    assert total is not None
    return net.op("Div", [total, net.const("window_sizes", divisor)], "mean")


def vgg_like(folder: Path, batch: Any, off_by: float = 0.0) -> Path:
    """conv 1->4 on 8x8, ReLU, MaxPool to 2x2, the adaptive pool to 3x3, Flatten, Gemm to 3 classes."""
    net = Net(18, seed=3)
    x = net.op("Relu", [net.conv("x", 1, 4, "conv", pads=[1, 1, 1, 1])], "relu")
    x = net.op("MaxPool", [x], "pool", kernel_shape=[4, 4], strides=[4, 4])
    x = net.op("Flatten", [adaptive_pool_as_dynamo_writes_it(net, x, 2, 3, off_by)], "flatten", axis=1)
    w = net.const("fc.w", net.weights(3, 36))
    y = net.op("Gemm", [x, w, net.const("fc.b", net.rng.uniform(-0.1, 0.1, 3))], "fc", transB=1)
    return save(net.model(y, (batch, 1, 8, 8)), folder / f"vgg_like_{batch}_{off_by}.onnx")


@pytest.mark.parametrize("batch", ["N", 1])
def test_the_index_region_imports_as_one_adaptive_pool(tmp_path: Path, batch: Any) -> None:
    path = vgg_like(tmp_path, batch)
    x = torch.randn(1 if batch == 1 else 5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    gm = load_onnx(path, x)
    pools = [m for m in gm.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    assert [p.output_size for p in pools] == [(3, 3)]
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and "gather" in str(n.target).lower()]
    torch.testing.assert_close(gm(x), torch.from_numpy(run_ort(path, x)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target", ["ort", "integer"])
@pytest.mark.parametrize("batch", ["N", 1])
def test_it_compiles_bit_exactly(tmp_path: Path, batch: Any, target: str) -> None:
    path = vgg_like(tmp_path, batch)
    gen = torch.Generator().manual_seed(1)
    calib = [torch.rand(8, 1, 8, 8, generator=gen) for _ in range(3)]
    cm = qcompile.compile(str(path), calib[0][:1 if batch == 1 else 2], data=lambda: iter(calib), target=target)
    x = torch.rand(16, 1, 8, 8, generator=gen)
    result = cm.verify(x)
    assert result.mismatches == 0 and result.compared == 16 * 3
    with torch.no_grad():  # and it is the float model, to quantization error
        ref = torch.from_numpy(np.concatenate([run_ort(path, x[i:i + 1]) for i in range(16)]))
    assert float((cm.reference(x) - ref).abs().mean()) < 0.05 * float(ref.abs().max())


def test_a_region_computing_something_else_stays_refused(tmp_path: Path) -> None:
    path = vgg_like(tmp_path, "N", off_by=0.5)  # every divisor off: linear, but not the pool
    with pytest.raises(UnsupportedOnnxOpsError, match=r"GatherND \(gather_windows\)"):
        load_onnx(path, torch.randn(2, 1, 8, 8))
