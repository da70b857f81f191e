"""Integer softmax over a small axis: independent float math, every spelling, both frontends and targets."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compile_model, random_inputs, run_pipeline
from modern import TARGETS, assert_exact, pipeline
from torch import nn

from qcompile.backends import fast, reference
from qcompile.ir import intops as ops
from qcompile.ir.meta import IntType
from qcompile.quant import softmax


@pytest.mark.parametrize("size", [2, 5, 32])
def test_integer_softmax_is_within_one_step_of_float(size: int) -> None:
    inp, out = IntType(8, True), IntType(8, False)
    s_x, s_y = 0.04, 1.0 / 255
    op = ops.IntSoftmax(**softmax.plan(inp, s_x, s_y), axis=1, inp=inp, out=out, lo=out.lo, hi=out.hi)
    rng = np.random.default_rng(size)
    q = np.clip(rng.normal(0, 50, size=(500, size, 3)).round(), -127, 127).astype(np.int64)
    got = reference.run_kernel(op, q)
    want = F.softmax(torch.from_numpy(q * s_x), dim=1).numpy() / s_y
    assert np.abs(got - want).max() <= 0.5 + 0.01  # the final rounding plus the stated approximation
    assert np.array_equal(fast.run_op(op, torch.from_numpy(q).float()).numpy(), got)


@pytest.mark.parametrize("length", [197, 1024, 4096])
def test_softmax_over_a_long_last_axis_is_within_half_a_step(length: int) -> None:
    """Attention's softmax: [N, heads, L, L] rows, a finer output scale than 8-bit of [0, 1] too."""
    inp, out = IntType(8, True), IntType(8, False)
    rng = np.random.default_rng(length)
    q = np.clip(rng.normal(0, 40, size=(2, 2, 4, length)).round(), -127, 127).astype(np.int64)
    for s_x, s_y in ((0.02, 1 / 255), (0.1, 1 / 2040)):
        op = ops.IntSoftmax(**softmax.plan(inp, s_x, s_y), axis=3, inp=inp, out=out, lo=out.lo, hi=out.hi)
        got = reference.run_kernel(op, q)
        want = F.softmax(torch.from_numpy(q * s_x), dim=3).numpy() / s_y
        inside = want <= out.hi  # above the output range the clamp decides
        assert np.abs(got - want)[inside].max() <= 0.5 + 0.01
        assert np.array_equal(fast.run_op(op, torch.from_numpy(q).float()).numpy(), got)


class Softmaxes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head, self.act = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 3, 1), nn.Softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(F.softmax(self.conv(x), dim=1))  # over the 4 channels
        return self.act(y) + torch.softmax(y, 1) + y.softmax(2)


def test_every_spelling_becomes_softmax_with_a_positive_dim() -> None:
    gm = run_pipeline(Softmaxes(), "canonicalize")
    dims = sorted(m.dim for m in gm.modules() if isinstance(m, nn.Softmax))
    assert dims == [1, 1, 2, 3]
    model = Softmaxes()
    x = random_inputs(4)
    torch.testing.assert_close(run_pipeline(model, "canonicalize")(x), model(x))


@pytest.mark.parametrize("frontend", ["pytorch", "onnx"])
def test_softmax_graphs_are_exact_everywhere(frontend: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Softmaxes().eval()
    source: nn.Module | str = model
    if frontend == "onnx":
        source = str(tmp_path / "softmax.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (random_inputs(1),), source, dynamo=False, opset_version=17, input_names=["x"],
                              dynamic_axes={"x": {0: "N"}})
    for target in TARGETS:
        cm = compile_model(source, pipeline=pipeline(target))
        assert sorted(m.axis for m in cm.integer_graph.modules() if isinstance(m, ops.IntSoftmax)) == [1, 1, 2, 3]
        assert_exact(cm, random_inputs(16, seed=5))
