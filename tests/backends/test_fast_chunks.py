"""The fast executor's float32 chunking of large reductions: the vectorised greedy split equals the plain
per-column greedy loop, every chunk's bound stays below 2^24, and a wide linear (VGG's 25,088 inputs) plans
without a Python loop over its columns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qcompile.backends import fast
from qcompile.ir import contract
from qcompile.ir import intops as ops
from qcompile.ir.meta import IntType

U8, S8 = IntType(8, False), IntType(8, True)


def greedy_loop(columns: torch.Tensor) -> list[slice] | None:
    """The obvious specification: walk the columns, start a new chunk before the one that would reach 2^24."""
    chunks, start, running = [], 0, torch.zeros(columns.shape[0], dtype=torch.int64)
    for i in range(columns.shape[1]):
        if int(columns[:, i].max()) >= 2**24:
            return None
        if int((running + columns[:, i]).max()) >= 2**24:
            chunks.append(slice(start, i))
            start, running = i, torch.zeros_like(running)
        running += columns[:, i]
    return [*chunks, slice(start, columns.shape[1])]


def linear(weight: torch.Tensor, inp: IntType = U8) -> ops.IntLinear:
    o = weight.shape[0]
    mult, shift = contract.quantize_multipliers(np.full(o, 2.0**-20))
    return ops.IntLinear(weight, torch.zeros(o, dtype=torch.int64), mult, shift, inp=inp, w_type=S8, out=U8,
                         lo=0, hi=255)


@pytest.mark.parametrize("seed", range(6))
def test_vectorised_chunks_equal_the_greedy_loop(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    o, k = 1 + seed * 3, 300 + 97 * seed
    weight = torch.randint(-127, 128, (o, k), generator=gen)
    weight[:, torch.randint(0, k, (k // 10,), generator=gen)] = 0  # zero columns do not end a chunk
    op = linear(weight, IntType(16, False) if seed % 2 else U8)
    columns = weight.abs() * max(abs(op.inp.lo), op.inp.hi)
    got = fast._channel_chunks(op)
    assert got == greedy_loop(columns)
    assert got is not None and got[0].start == 0 and got[-1].stop == k
    for chunk in got:
        assert int(columns[:, chunk].sum(dim=1).max()) < 2**24


def conv(weight: torch.Tensor) -> ops.IntConv2d:
    o = weight.shape[0]
    mult, shift = contract.quantize_multipliers(np.full(o, 2.0**-20))
    return ops.IntConv2d(weight, torch.zeros(o, dtype=torch.int64), mult, shift, inp=IntType(16, False),
                         w_type=S8, out=U8, lo=0, hi=255, padding=(1, 1))


def test_a_later_channel_alone_too_large_has_no_float32_split() -> None:
    weight = torch.ones((2, 40, 3, 3), dtype=torch.int64)
    weight[1, 30] = 127  # channel 30 alone: 9 * 127 * 65535 >= 2^24 (the first 30 channels fit together)
    op = conv(weight)
    columns = weight.abs().sum(dim=(2, 3)) * 65535
    assert greedy_loop(columns) is None and fast._channel_chunks(op) is None
    assert fast.gemm_plan(op).dtype is torch.float64  # exact, without float32 chunks
    weight[1, 30] = 20  # 9 * 20 * 65535 < 2^24: chunks again, each below the bound
    chunks = fast._channel_chunks(conv(weight))
    assert chunks == greedy_loop(weight.abs().sum(dim=(2, 3)) * 65535) and chunks is not None and len(chunks) > 1


def test_wide_linear_plans_in_one_step_per_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    """VGG's classifier (25,088 inputs) planned in ~3 minutes with a step per column; now a step per chunk."""
    gen = torch.Generator().manual_seed(7)
    op = linear(torch.randint(-127, 128, (64, 25088), generator=gen))
    steps = []
    search = torch.searchsorted

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        steps.append(1)
        return search(*args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(torch, "searchsorted", counted)
    chunks = fast._channel_chunks(op)
    assert chunks is not None and len(chunks) > 20  # 25,088 * 64 * 255 (mean |w| 64) / 2^24: about 25 chunks
    assert len(steps) == len(chunks)
    assert chunks == greedy_loop(op.weight.abs() * 255)
