"""IntAvgPoolTable (pools, bilinear) and IntRescale against independent math (PyTorch's pooling and
interpolation, the real-valued formula), and reference == fast executor, for both targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qcompile.backends import fast, reference
from qcompile.ir import contract
from qcompile.ir import intops as ops
from qcompile.ir.meta import IntType
from qcompile.passes.rules.lower_pools import adaptive_axis, bilinear_axis, pool_axis

U8 = IntType(8, False)
POOLS = [  # kernel, stride, padding, ceil_mode, count_include_pad, input size
    (3, 2, 1, True, False, (7, 8)), (3, 2, 1, True, True, (8, 8)), (2, 2, 0, True, True, (5, 7)),
    (3, 1, 1, False, False, (6, 6)),
]


def _table_op(rows: np.ndarray, cols: np.ndarray, divisor: np.ndarray, target: str) -> ops.IntAvgPoolTable:
    real = 1.0 / divisor  # s_x = s_y: q_y = rq(window sum / divisor)
    mult, shift = contract.quantize_multipliers(real)
    return ops.IntAvgPoolTable(rows, cols, mult, shift, inp=U8, out=U8, lo=0, hi=255,
                               fmult=contract.float_multipliers(real), target=target)


def _check(op: ops.IntAvgPoolTable, q: torch.Tensor, want: torch.Tensor) -> None:
    got = reference._KERNELS[ops.IntAvgPoolTable](op, q.numpy().astype(np.int64))
    assert got.shape == tuple(want.shape)
    assert np.abs(got - want.numpy()).max() <= 0.5 + 1e-6, "not the rounded average of each window"
    assert torch.equal(fast.run_op(op, q.float()), torch.from_numpy(got).float()), "fast != reference"


@pytest.mark.parametrize("target", ["ort", "integer"])
@pytest.mark.parametrize(("k", "s", "p", "ceil", "include", "size"), POOLS)
def test_avg_pool_table_is_pytorchs_average(k: int, s: int, p: int, ceil: bool, include: bool,
                                            size: tuple[int, int], target: str) -> None:
    q = torch.randint(0, 256, (2, 3, *size), generator=torch.Generator().manual_seed(0))
    want = F.avg_pool2d(q.double(), k, s, p, ceil_mode=ceil, count_include_pad=include)
    out_hw = want.shape[2:]
    (rows, d_h), (cols, d_w) = (pool_axis(size[a], out_hw[a], k, s, p, include) for a in range(2))
    _check(_table_op(rows, cols, np.outer(d_h, d_w).astype(np.float64), target), q, want)


@pytest.mark.parametrize("target", ["ort", "integer"])
@pytest.mark.parametrize(("size", "out"), [((2, 2), (7, 7)), ((7, 8), (3, 5)), ((5, 5), (5, 2))])
def test_adaptive_pool_table_is_pytorchs_adaptive_average(size: tuple[int, int], out: tuple[int, int],
                                                          target: str) -> None:
    q = torch.randint(0, 256, (2, 3, *size), generator=torch.Generator().manual_seed(1))
    want = F.adaptive_avg_pool2d(q.double(), out)
    (rows, d_h), (cols, d_w) = adaptive_axis(size[0], out[0]), adaptive_axis(size[1], out[1])
    _check(_table_op(rows, cols, np.outer(d_h, d_w).astype(np.float64), target), q, want)


@pytest.mark.parametrize("target", ["ort", "integer"])
def test_rescale_adds_and_scales_as_the_real_formula(target: str) -> None:
    s_x, s_y = 0.05, 0.07
    c = torch.tensor([0.3, -1.2, 2.5]).view(3, 1, 1)
    gain = 256
    offset = np.round(c.reshape(-1).numpy() * gain / s_x).astype(np.int64)
    real = s_x / (gain * s_y)
    i8 = IntType(8, True)
    mult, shift = contract.quantize_multipliers(real)
    op = ops.IntRescale(mult, shift, gain=gain, offset=offset, param_shape=(3, 1, 1), inp=i8, out=i8, lo=i8.lo,
                        hi=i8.hi, fmult=contract.float_multipliers(real), target=target)
    q = torch.randint(-127, 128, (2, 3, 4, 4), generator=torch.Generator().manual_seed(2))
    got = reference._KERNELS[ops.IntRescale](op, q.numpy().astype(np.int64))
    want = ((q.double() * s_x + c.double()) / s_y).clamp(-127, 127)
    assert np.abs(got - want.numpy()).max() <= 0.5 + 1e-3
    assert torch.equal(fast.run_op(op, q.float()), torch.from_numpy(got).float())


@pytest.mark.parametrize("target", ["ort", "integer"])
@pytest.mark.parametrize(("size", "out", "corners"), [((4, 3), (8, 6), False), ((4, 3), (8, 9), True),
                                                      ((3, 5), (7, 10), False)])
def test_bilinear_table_is_pytorchs_interpolation(size: tuple[int, int], out: tuple[int, int], corners: bool,
                                                  target: str) -> None:
    q = torch.randint(0, 256, (2, 3, *size), generator=torch.Generator().manual_seed(3))
    want = F.interpolate(q.double(), size=out, mode="bilinear", align_corners=corners)
    (rows, d_h), (cols, d_w) = bilinear_axis(size[0], out[0], corners), bilinear_axis(size[1], out[1], corners)
    _check(_table_op(rows, cols, np.outer(d_h, d_w).astype(np.float64), target), q, want)
