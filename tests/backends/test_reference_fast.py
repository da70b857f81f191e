"""Integer ops built directly: reference executor == independent computation == fast executor, bit for bit.

The independent computation runs the float64 torch op on the integer values (exact: every sum stays far
below 2^53) and requantizes with Python's arbitrary-precision ints: floor((acc * m + 2^(n-1)) / 2^n).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qcompile.backends import fast
from qcompile.backends.reference import run_reference
from qcompile.ir import contract
from qcompile.ir import intops as ops
from qcompile.ir.meta import IntType, NodeInfo, Stage, set_stage
from qcompile.ir.verify import verify

U8, S8, U16 = IntType(8, False), IntType(8, True), IntType(16, False)
U4, S4, S2 = IntType(4, False), IntType(4, True), IntType(2, True)


# ------------------------------------------------------------------------------------------- helpers


def single_op_graph(op: nn.Module, in_types: Sequence[IntType]) -> fx.GraphModule:
    """x_i -> Quantize(scale 1) -> op -> Dequantize(scale 1): integers in, the op's integers out."""
    root, graph = nn.Module(), fx.Graph()
    args = []
    for i, t in enumerate(in_types):
        ph = graph.placeholder(f"x{i}")
        root.add_module(f"q{i}", ops.Quantize(1.0, t))
        q = graph.call_module(f"q{i}", (ph,))
        q.meta["qc"] = NodeInfo(itype=t, scale=1.0)
        args.append(q)
    root.add_module("op", op)
    y = graph.call_module("op", tuple(args))
    y.meta["qc"] = NodeInfo(itype=op.out, scale=1.0)
    root.add_module("dq", ops.Dequantize(1.0, op.out))
    out = graph.call_module("dq", (y,))
    out.meta["qc"] = NodeInfo(itype=op.out, scale=1.0)
    graph.output(out)
    gm = fx.GraphModule(root, graph, "SingleOp")
    set_stage(gm, Stage.INTEGER)
    verify(gm)
    return gm


def random_ints(gen: torch.Generator, t: IntType, shape: Sequence[int]) -> torch.Tensor:
    """Integers of type ``t`` as a float32 tensor (extremes included with high probability)."""
    x = torch.randint(t.lo, t.hi + 1, tuple(shape), generator=gen)
    flat = x.view(-1)
    flat[0], flat[-1] = t.lo, t.hi
    return x.to(torch.float32)


def exact_requant(acc: np.ndarray, m: np.ndarray, n: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Python-int requantization: floor((acc * m + 2^(n-1)) / 2^n), clamped; m/n broadcast against acc."""
    a = np.asarray(acc).astype(object)
    m_o, n_o = np.broadcast_arrays(np.asarray(m).astype(object), np.asarray(n).astype(object))
    m_o, n_o = np.broadcast_to(m_o, a.shape), np.broadcast_to(n_o, a.shape)
    out = np.empty(a.shape, dtype=object)
    for idx in np.ndindex(a.shape):
        k = int(n_o[idx])
        out[idx] = max(lo, min(hi, (int(a[idx]) * int(m_o[idx]) + 2 ** (k - 1)) // 2**k))
    return out.astype(np.int64)


def multipliers(gen: torch.Generator, channels: int, bound: int, out: IntType) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel dyadic multipliers that map a typical accumulator onto the output range (and beyond)."""
    reals = (out.hi / max(bound, 1)) * (0.5 + 2.0 * torch.rand(channels, generator=gen, dtype=torch.float64))
    return contract.quantize_multipliers(reals.numpy())


def run_both(gm: fx.GraphModule, *xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ref = run_reference(gm, *xs)
    with torch.no_grad():
        got = gm(*xs)
    assert ref.dtype == torch.float32 and got.dtype == torch.float32
    return ref, got


def assert_bit_exact(ref: torch.Tensor, got: torch.Tensor, expected: np.ndarray) -> None:
    assert ref.shape == got.shape == expected.shape
    assert torch.equal(ref, torch.from_numpy(expected.astype(np.float32))), "reference != independent result"
    assert torch.equal(ref, got), "fast executor != reference"


# ---------------------------------------------------------------------------------------------- conv

CONV_CASES = [
    # cin, cout, kernel, stride, padding, dilation, groups, (H, W)
    pytest.param(3, 4, (3, 3), (1, 1), (0, 0), (1, 1), 1, (7, 7), id="plain"),
    pytest.param(3, 5, (3, 3), (2, 2), (1, 1), (1, 1), 1, (8, 8), id="stride2-pad1"),
    pytest.param(2, 3, (1, 3), (1, 1), (0, 1), (1, 1), 1, (5, 6), id="kernel1x3"),
    pytest.param(2, 4, (3, 3), (2, 1), (2, 0), (1, 1), 1, (7, 6), id="stride2x1-pad2x0"),
    pytest.param(3, 3, (3, 3), (1, 1), (2, 2), (2, 2), 1, (7, 7), id="dilation2"),
    pytest.param(4, 6, (3, 3), (1, 1), (1, 1), (1, 1), 2, (6, 6), id="groups2"),
    pytest.param(4, 4, (3, 3), (1, 1), (1, 1), (1, 1), 4, (6, 6), id="depthwise"),
    pytest.param(4, 4, (3, 3), (2, 2), (1, 1), (1, 1), 4, (7, 7), id="depthwise-stride2"),
    pytest.param(3, 6, (3, 3), (1, 1), (1, 1), (1, 1), 3, (5, 5), id="depthwise-multiplier2"),
    pytest.param(5, 2, (1, 1), (1, 1), (0, 0), (1, 1), 1, (4, 4), id="pointwise"),
]
TYPE_CASES = [
    pytest.param(U8, S8, U8, 0, 255, id="u8xs8->u8"),
    pytest.param(S8, S8, S8, -127, 127, id="s8xs8->s8"),
    pytest.param(U4, S4, U4, 0, 15, id="u4xs4->u4"),
    pytest.param(S8, S2, U8, 0, 100, id="s8xs2->u8-clamped"),
    pytest.param(U8, S4, S8, -20, 127, id="u8xs4->s8-clamped"),
]


def make_conv(gen: torch.Generator, cin: int, cout: int, kernel: tuple[int, int], stride: tuple[int, int],
              padding: tuple[int, int], dilation: tuple[int, int], groups: int, inp: IntType, w_type: IntType,
              out: IntType, lo: int, hi: int) -> ops.IntConv2d:
    weight = torch.randint(w_type.lo, w_type.hi + 1, (cout, cin // groups, *kernel), generator=gen)
    fan_in = (cin // groups) * kernel[0] * kernel[1]
    typical = int(fan_in**0.5 * max(abs(inp.lo), inp.hi) * w_type.hi)
    bias = torch.randint(-typical // 8, typical // 8 + 1, (cout,), generator=gen)
    mult, shift = multipliers(gen, cout, typical, out)
    return ops.IntConv2d(weight, bias, mult, shift, inp=inp, w_type=w_type, out=out, lo=lo, hi=hi, stride=stride,
                         padding=padding, dilation=dilation, groups=groups)


def independent_conv(op: ops.IntConv2d, x: torch.Tensor) -> np.ndarray:
    acc = F.conv2d(x.double(), op.weight.double(), None, op.stride, op.padding, op.dilation, op.groups)
    acc_i = acc.round().to(torch.int64) + op.bias.view(1, -1, 1, 1)
    return exact_requant(acc_i.numpy(), op.mult.numpy().reshape(1, -1, 1, 1), op.shift.numpy().reshape(1, -1, 1, 1),
                         op.lo, op.hi)


@pytest.mark.parametrize(("inp", "w_type", "out", "lo", "hi"), TYPE_CASES)
@pytest.mark.parametrize(("cin", "cout", "kernel", "stride", "padding", "dilation", "groups", "hw"), CONV_CASES)
def test_conv2d(cin: int, cout: int, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                dilation: tuple[int, int], groups: int, hw: tuple[int, int], inp: IntType, w_type: IntType,
                out: IntType, lo: int, hi: int) -> None:
    gen = torch.Generator().manual_seed(cin * 100 + cout * 10 + groups)
    op = make_conv(gen, cin, cout, kernel, stride, padding, dilation, groups, inp, w_type, out, lo, hi)
    gm = single_op_graph(op, [inp])
    x = random_ints(gen, inp, (3, cin, *hw))
    ref, got = run_both(gm, x)
    expected = independent_conv(op, x)
    assert_bit_exact(ref, got, expected)
    assert len(np.unique(expected)) > 3, "degenerate test: the outputs are (almost) all clamped"


@settings(max_examples=30)
@given(
    cin_g=st.integers(1, 3), cout_g=st.integers(1, 3), groups=st.integers(1, 3), k=st.sampled_from([1, 2, 3]),
    stride=st.integers(1, 3), pad=st.integers(0, 2), dil=st.integers(1, 2), size=st.integers(5, 9),
    seed=st.integers(0, 2**16), signed_in=st.booleans(), w_bits=st.integers(2, 8), a_bits=st.integers(2, 8),
)
def test_conv2d_random(cin_g: int, cout_g: int, groups: int, k: int, stride: int, pad: int, dil: int, size: int,
                       seed: int, signed_in: bool, w_bits: int, a_bits: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    inp, w_type, out = IntType(a_bits, signed_in), IntType(w_bits, True), IntType(a_bits, False)
    op = make_conv(gen, cin_g * groups, cout_g * groups, (k, k), (stride, stride), (pad, pad), (dil, dil), groups,
                   inp, w_type, out, out.lo, out.hi)
    gm = single_op_graph(op, [inp])
    x = random_ints(gen, inp, (2, cin_g * groups, size, size))
    ref, got = run_both(gm, x)
    assert_bit_exact(ref, got, independent_conv(op, x))


def test_fast_conv_switches_to_float64_and_stays_exact() -> None:
    gen = torch.Generator().manual_seed(3)
    inp, w_type, out = U16, IntType(10, True), IntType(16, True)
    weight = torch.randint(w_type.lo, w_type.hi + 1, (3, 4, 3, 3), generator=gen)
    weight[0] = w_type.hi  # channel 0 reaches the bound 36 * 511 * 65535 > 2^24
    bias = torch.randint(-1000, 1001, (3,), generator=gen)
    mult, shift = contract.quantize_multipliers(np.array([2.0**-10, 3.1e-4, 1.7e-3]))
    op = ops.IntConv2d(weight, bias, mult, shift, inp=inp, w_type=w_type, out=out, lo=out.lo, hi=out.hi,
                       padding=(1, 1))
    bound = fast.accumulator_bound(op)
    assert 2**24 <= bound <= contract.INT32_MAX
    x = random_ints(gen, inp, (4, 4, 6, 6))
    x[0, :, :, :] = inp.hi  # a window summing to the bound
    gm = single_op_graph(op, [inp])
    ref, got = run_both(gm, x)
    assert fast.gemm_plan(op).dtype is torch.float64  # one input channel alone exceeds 2^24: no float32 split
    assert_bit_exact(ref, got, independent_conv(op, x))
    # the switch matters: float32 partial sums of these operands are not exact
    acc32 = F.conv2d(x, weight.float(), None, 1, 1).to(torch.int64)
    acc64 = F.conv2d(x.double(), weight.double(), None, 1, 1).to(torch.int64)
    assert not torch.equal(acc32, acc64)


def test_fast_conv_keeps_float32_below_2_24() -> None:
    gen = torch.Generator().manual_seed(4)
    op = make_conv(gen, 3, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1, U8, S8, U8, 0, 255)
    assert fast.accumulator_bound(op) < 2**24
    gm = single_op_graph(op, [U8])
    x = random_ints(gen, U8, (2, 3, 5, 5))
    ref, got = run_both(gm, x)
    assert fast.gemm_plan(op).dtype is torch.float32 and len(fast.gemm_plan(op).chunks) == 1
    assert_bit_exact(ref, got, independent_conv(op, x))


def test_fast_conv_splits_large_reductions_into_exact_float32_chunks() -> None:
    gen = torch.Generator().manual_seed(5)
    weight = torch.full((4, 64, 3, 3), 127)
    weight[1:] = torch.randint(-127, 128, (3, 64, 3, 3), generator=gen)
    op = ops.IntConv2d(weight, torch.tensor([5, -7, 0, 3]), *contract.quantize_multipliers(np.full(4, 2.0**-22)),
                       inp=U8, w_type=S8, out=U8, lo=0, hi=255, padding=(1, 1))
    assert 2**24 <= fast.accumulator_bound(op) <= contract.INT32_MAX  # 64 * 9 * 127 * 255
    plan = fast.gemm_plan(op)
    assert plan.dtype is torch.float32 and len(plan.chunks) == 2  # 57 channels fit below 2^24 per chunk
    x = torch.full((2, 64, 5, 5), 255.0)
    x[1] = random_ints(gen, U8, (1, 64, 5, 5))[0]
    gm = single_op_graph(op, [U8])
    ref, got = run_both(gm, x)
    assert_bit_exact(ref, got, independent_conv(op, x))


def test_accumulator_bound_formula() -> None:
    weight = torch.tensor([[[[1, -2], [3, 0]]], [[[-7, 7], [7, -7]]]])
    op = ops.IntConv2d(weight, [5, -100], [2**30, 2**30], [40, 40], inp=S8, w_type=S4, out=S8, lo=-127, hi=127)
    # channel 0: (1 + 2 + 3) * 127 + 5 = 767; channel 1: 28 * 127 + 100 = 3656
    assert fast.accumulator_bound(op) == 3656


# -------------------------------------------------------------------------------------------- linear


@pytest.mark.parametrize(("inp", "w_type", "out", "lo", "hi"), TYPE_CASES)
@pytest.mark.parametrize(("k", "o"), [(1, 1), (7, 3), (64, 10)])
def test_linear(k: int, o: int, inp: IntType, w_type: IntType, out: IntType, lo: int, hi: int) -> None:
    gen = torch.Generator().manual_seed(k * 7 + o)
    weight = torch.randint(w_type.lo, w_type.hi + 1, (o, k), generator=gen)
    typical = int(k**0.5 * max(abs(inp.lo), inp.hi) * w_type.hi)
    bias = torch.randint(-typical, typical + 1, (o,), generator=gen)
    mult, shift = multipliers(gen, o, typical, out)
    op = ops.IntLinear(weight, bias, mult, shift, inp=inp, w_type=w_type, out=out, lo=lo, hi=hi)
    gm = single_op_graph(op, [inp])
    x = random_ints(gen, inp, (16, k))
    ref, got = run_both(gm, x)
    acc = (x.double() @ weight.double().T).round().to(torch.int64) + bias
    expected = exact_requant(acc.numpy(), mult.reshape(1, -1), shift.reshape(1, -1), lo, hi)
    assert_bit_exact(ref, got, expected)


# ----------------------------------------------------------------------------------------------- add


@pytest.mark.parametrize(("t", "out", "lo", "hi", "real"), [
    (U8, U8, 0, 255, 0.37), (S8, S8, -127, 127, 0.61), (S8, U8, 0, 255, 1.3), (U4, U4, 0, 15, 0.5),
    (S4, S8, -100, 90, 7.5),
])
def test_add(t: IntType, out: IntType, lo: int, hi: int, real: float) -> None:
    gen = torch.Generator().manual_seed(5)
    m, n = contract.quantize_multiplier(real)
    op = ops.IntAdd(m, n, inp=(t, t), out=out, lo=lo, hi=hi)
    gm = single_op_graph(op, [t, t])
    a, b = random_ints(gen, t, (3, 4, 5, 5)), random_ints(gen, t, (3, 4, 5, 5))
    ref, got = run_both(gm, a, b)
    acc = (a + b).to(torch.int64).numpy()
    assert_bit_exact(ref, got, exact_requant(acc, np.array(m), np.array(n), lo, hi))


def test_add_exact_ties() -> None:
    # M = 1/2: an odd sum is an exact tie and rounds toward +inf
    op = ops.IntAdd(2**30, 31, inp=(S8, S8), out=S8, lo=-127, hi=127)
    gm = single_op_graph(op, [S8, S8])
    a = torch.tensor([[1.0, -1.0, 3.0, -3.0, 127.0, -127.0]])
    b = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    ref, got = run_both(gm, a, b)
    assert ref.tolist() == [[1.0, 0.0, 2.0, -1.0, 64.0, -63.0]]
    assert torch.equal(ref, got)


# ------------------------------------------------------------------------------------------- pooling


@pytest.mark.parametrize(("kernel", "stride", "padding", "hw"), [
    ((2, 2), (2, 2), (0, 0), (8, 8)),
    ((3, 3), (1, 1), (1, 1), (5, 6)),
    ((3, 3), (2, 2), (1, 1), (7, 7)),
    ((2, 3), (1, 2), (1, 1), (6, 7)),
    ((5, 5), (1, 1), (0, 0), (5, 5)),  # global (adaptive 1x1) pooling
])
@pytest.mark.parametrize(("inp", "out", "lo", "hi"), [(U8, U8, 0, 255), (S8, S8, -127, 127), (U4, U4, 0, 15),
                                                      (U16, U8, 0, 255)])
def test_avgpool(kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int], hw: tuple[int, int],
                 inp: IntType, out: IntType, lo: int, hi: int) -> None:
    gen = torch.Generator().manual_seed(6)
    k = kernel[0] * kernel[1]
    # average, then map the input range onto the output range: M = s_x / (k s_y)
    m, n = contract.quantize_multiplier(out.hi / (k * inp.hi) * 1.3)
    op = ops.IntAvgPool2d(m, n, kernel=kernel, stride=stride, padding=padding, inp=inp, out=out, lo=lo, hi=hi)
    gm = single_op_graph(op, [inp])
    x = random_ints(gen, inp, (2, 3, *hw))
    ref, got = run_both(gm, x)
    ones = torch.ones(3, 1, *kernel, dtype=torch.float64)
    window_sum = F.conv2d(x.double(), ones, None, stride, padding, groups=3).round().to(torch.int64)
    assert_bit_exact(ref, got, exact_requant(window_sum.numpy(), np.array(m), np.array(n), lo, hi))


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation", "ceil_mode", "hw"), [
    ((2, 2), (2, 2), (0, 0), (1, 1), False, (8, 8)),
    ((2, 2), (2, 2), (0, 0), (1, 1), True, (7, 7)),
    ((3, 3), (2, 2), (1, 1), (1, 1), False, (7, 8)),
    ((3, 3), (2, 2), (1, 1), (1, 1), True, (6, 6)),
    ((3, 3), (2, 2), (0, 0), (1, 1), True, (6, 7)),
    ((2, 2), (3, 3), (1, 1), (1, 1), True, (7, 5)),  # a window that would start in the right padding
    ((3, 2), (1, 2), (1, 0), (2, 1), False, (7, 7)),
    ((2, 2), (2, 2), (1, 1), (2, 2), True, (6, 6)),
    ((3, 3), (3, 3), (1, 1), (1, 1), True, (8, 8)),
])
@pytest.mark.parametrize("t", [U8, S8, U4])
def test_maxpool(kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                 dilation: tuple[int, int], ceil_mode: bool, hw: tuple[int, int], t: IntType) -> None:
    gen = torch.Generator().manual_seed(7)
    op = ops.IntMaxPool2d(kernel=kernel, stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode,
                          inp=t)
    gm = single_op_graph(op, [t])
    x = random_ints(gen, t, (2, 3, *hw))
    ref, got = run_both(gm, x)
    expected = F.max_pool2d(x.double(), kernel, stride, padding, dilation, ceil_mode=ceil_mode)
    assert_bit_exact(ref, got, expected.to(torch.int64).numpy())


@pytest.mark.parametrize(("t", "lo", "hi"), [(U8, 0, 255), (U8, 3, 200), (S8, -127, 127), (S8, 0, 50), (U4, 2, 9)])
def test_clamp(t: IntType, lo: int, hi: int) -> None:
    gen = torch.Generator().manual_seed(8)
    op = ops.IntClamp(lo, hi, inp=t)
    gm = single_op_graph(op, [t])
    x = random_ints(gen, t, (2, 3, 4, 4))
    ref, got = run_both(gm, x)
    expected = np.clip(x.to(torch.int64).numpy(), lo, hi)
    assert_bit_exact(ref, got, expected)


def test_quantize_dequantize_boundary() -> None:
    """Quantize: float32 division, round half even, clamp; Dequantize: float32 product."""
    s = 0.5
    root, graph = nn.Module(), fx.Graph()
    x = graph.placeholder("x")
    root.add_module("q", ops.Quantize(s, S4))
    q = graph.call_module("q", (x,))
    q.meta["qc"] = NodeInfo(itype=S4, scale=s)
    root.add_module("dq", ops.Dequantize(0.25, S4))
    y = graph.call_module("dq", (q,))
    y.meta["qc"] = NodeInfo(itype=S4, scale=0.25)
    graph.output(y)
    gm = fx.GraphModule(root, graph)
    set_stage(gm, Stage.INTEGER)
    verify(gm)
    inp = torch.tensor([0.25, 0.75, 1.25, -0.25, -0.75, -1.25, 100.0, -100.0, 1.0])
    # x / 0.5 = 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 200, -200, 2 -> half even, clamp to [-7, 7]
    expected = torch.tensor([0.0, 2.0, 2.0, 0.0, -2.0, -2.0, 7.0, -7.0, 2.0]) * 0.25
    ref, got = run_both(gm, inp)
    assert torch.equal(ref, expected)
    assert torch.equal(got, expected)


def test_intops_refuse_clamp_outside_output_type() -> None:
    with pytest.raises(ValueError, match="outside the output type"):
        ops.IntAdd(2**30, 31, inp=(U8, U8), out=U4, lo=0, hi=16)
    with pytest.raises(ValueError, match="outside the output type"):
        ops.IntLinear([[1]], [0], [2**30], [31], inp=U8, w_type=S8, out=S8, lo=-128, hi=127)


def test_reference_refuses_int32_overflow_at_run_time() -> None:
    # a graph that skipped verification: the reference executor still refuses the int32 overflow
    weight = torch.full((1, 64), 32767)
    op = ops.IntLinear(weight, [0], [2**30], [54], inp=U16, w_type=IntType(16, True), out=U8, lo=0, hi=255)
    root, graph = nn.Module(), fx.Graph()
    x = graph.placeholder("x")
    root.add_module("q", ops.Quantize(1.0, U16))
    root.add_module("op", op)
    graph.output(graph.call_module("op", (graph.call_module("q", (x,)),)))
    gm = fx.GraphModule(root, graph)
    with pytest.raises(OverflowError):
        run_reference(gm, torch.full((1, 64), 65535.0))
