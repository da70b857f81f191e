"""Integer LayerNorm: the error bound against float64 LayerNorm, the integer square root, and exactness
of the reference executor, the fast executor and onnxruntime (both targets) on graphs that use it."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compile_model, random_inputs, run_pipeline
from modern import TARGETS, assert_exact, pipeline
from torch import nn

import qcompile
from qcompile.backends import fast, reference
from qcompile.ir import contract
from qcompile.ir import intops as ops
from qcompile.ir.meta import IntType
from qcompile.quant import layernorm

S_X, S_Y = 0.05, 4.0 / 127


INT8 = IntType(8, True)


def make_op(size: int, target: str, seed: int = 0, inp: IntType = INT8) -> tuple[nn.LayerNorm, ops.IntLayerNorm]:
    g = torch.Generator().manual_seed(seed)
    ln = nn.LayerNorm(size)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(size, generator=g) * 0.5 + 1)
        ln.bias.copy_(torch.randn(size, generator=g) * 0.5)
    attrs = layernorm.plan(ln, inp, S_X, S_Y)
    real_m = attrs.pop("real_m")
    m, n = contract.quantize_multiplier(real_m)
    out = IntType(8, True)
    op = ops.IntLayerNorm(**attrs, mult=m, shift=n, fmult=np.float32(real_m), target=target, axis=1, inp=inp,
                          out=out, lo=out.lo, hi=out.hi)
    return ln, op


def rows(size: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of every spread, from nearly constant to the full 8-bit range, with random offsets."""
    parts = [rng.normal(0, spread, size=(120, size)).round() + rng.integers(-20, 20, size=(120, 1))
             for spread in (0.4, 1, 3, 10, 40, 127)]
    return np.clip(np.concatenate(parts), -127, 127).astype(np.int64)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("size", [16, 64, 768])
def test_error_against_float_layernorm_is_bounded(size: int, target: str) -> None:
    ln, op = make_op(size, target, seed=size)
    q = rows(size, np.random.default_rng(size))
    got = reference.run_kernel(op, q)
    with torch.no_grad():
        y = F.layer_norm(torch.from_numpy(q * S_X).double(), (size,), ln.weight.double(), ln.bias.double(),
                         ln.eps).numpy() / S_Y
    inside = np.abs(y) < 127
    assert np.abs(got - y)[inside].max() <= 0.54  # 0.5 is the final rounding; the docstring states the rest
    assert np.abs(got - np.clip(np.rint(y), -127, 127)).max() <= 1
    assert np.mean(got != np.clip(np.rint(y), -127, 127)) < 0.01
    assert np.array_equal(fast.run_op(op, torch.from_numpy(q).float()).numpy(), got)


@pytest.mark.parametrize("size", [2, 16, 768])
def test_newton_square_root_is_exact_on_the_planned_range(size: int) -> None:
    _, op = make_op(size, "integer")
    rng = np.random.default_rng(1)
    x_min = (size * (size - 1) + op.eps_q) * 4**op.p
    x_max = (size**3 * 254**2 // 4 + 1 + op.eps_q) * 4**op.p
    samples = [x_min, x_max, *(int(v) for v in np.exp(rng.uniform(math.log(x_min), math.log(x_max), 300)))]
    for x in samples:
        y = op.y0
        for _ in range(op.steps):
            y = min(y, (y + x // y) >> 1)
        assert y == math.isqrt(x)
    assert x_max < 2**62 and op.bound <= contract.INT32_MAX


def test_constant_rows_normalize_to_beta() -> None:
    ln, op = make_op(32, "ort")
    q = np.full((3, 32), 17, dtype=np.int64)
    expected = np.clip(np.rint(ln.bias.detach().double().numpy() / S_Y), -127, 127)
    assert np.array_equal(reference.run_kernel(op, q), np.broadcast_to(expected, q.shape))


def test_a_bias_too_large_for_int32_is_refused() -> None:
    ln = nn.LayerNorm(8)
    with torch.no_grad():
        ln.weight.fill_(1e-6)
        ln.bias.fill_(1e6)
    with pytest.raises(layernorm.LayerNormPlanError, match="bias is too large"):
        layernorm.plan(ln, IntType(8, True), S_X, S_Y)


class LayerNorms(nn.Module):
    """LayerNorm over W of NCHW (functional, learned affine), then over features (module), GELU, head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.w, self.b = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.randn(8) * 0.2)
        self.fc, self.ln, self.head = nn.Linear(256, 32), nn.LayerNorm(32, eps=1e-6), nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(self.conv(x), (8,), self.w, self.b)
        return self.head(F.gelu(self.ln(self.fc(torch.flatten(x, 1)))))


def test_functional_layer_norm_becomes_the_module() -> None:
    model = LayerNorms()
    gm = run_pipeline(model, "canonicalize")
    lns = {m.normalized_shape[0]: m for m in gm.modules() if isinstance(m, nn.LayerNorm)}
    assert sorted(lns) == [8, 32] and torch.equal(lns[8].weight, model.w) and torch.equal(lns[8].bias, model.b)
    assert lns[8].eps == 1e-5 and lns[32].eps == 1e-6
    x = random_inputs(4)
    torch.testing.assert_close(gm(x), model(x))


@pytest.mark.parametrize("target", TARGETS)
def test_layernorm_graphs_are_exact_everywhere(target: str) -> None:
    torch.manual_seed(0)
    cm = compile_model(LayerNorms().eval(), pipeline=pipeline(target))
    lns = [m for m in cm.integer_graph.modules() if isinstance(m, ops.IntLayerNorm)]
    assert [(op.axis, op.size) for op in lns] == [(3, 8), (1, 32)]
    x = random_inputs(32, seed=9)
    assert_exact(cm, x)
    assert cm.quant_graph is not None
    with torch.no_grad():
        sim = cm.quant_graph.eval()(x)
    step = next(m for m in cm.integer_graph.modules() if isinstance(m, ops.Dequantize)).scale
    assert float((sim - cm.reference(x)).abs().max()) <= step  # the heads' float convs: ties (test_integer_sim)


def test_onnx_layer_normalization_imports_and_compiles_exactly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LayerNorms().eval()
    path = tmp_path / "ln.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (random_inputs(1),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], dynamic_axes={"x": {0: "N"}})
    from qcompile.frontends.onnx_import import load_onnx

    gm = load_onnx(path)
    assert sum(isinstance(m, nn.LayerNorm) for m in gm.modules()) == 2
    cm = compile_model(str(path), pipeline=pipeline("ort"))
    assert_exact(cm, random_inputs(16, seed=3))
    assert isinstance(cm, qcompile.CompiledModel)
