"""The fast executor's fused plan (max pooling before requantization) gives the reference's integers."""

from __future__ import annotations

import torch

import qcompile
from qcompile.backends.fast import ConvMaxPool, plan
from qcompile.models import LeNet5


def test_conv_maxpool_fusion_is_exact() -> None:
    torch.manual_seed(0)
    model = LeNet5().eval()
    x = torch.rand(16, 1, 28, 28)
    for policy in ("w8a8", "w4a4", "w3a5"):
        cm = qcompile.compile(model, x[:1], data=lambda: [x], policy=policy)
        fast = plan(cm.integer_graph)
        fused = [m for m in fast.modules() if isinstance(m, ConvMaxPool)]
        assert len(fused) == 2
        probe = torch.rand(8, 1, 28, 28) * 1.5  # beyond the calibrated range: saturation too
        assert torch.equal(fast(probe), cm.reference(probe))
        assert torch.equal(cm(probe), cm.integer_graph(probe))
