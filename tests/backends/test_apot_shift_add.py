"""APoT shift-add ops: reference shift-adds == plain integer conv on the same codes == fast == onnxruntime."""

from __future__ import annotations

from functools import cache

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import compile_model, random_inputs
from onnx import numpy_helper
from torch import nn

import qcompile
from qcompile.backends import reference
from qcompile.backends.ort import run_onnx
from qcompile.ir import intops as ops
from qcompile.ir.meta import IntType

# (in, out, kernel, stride, padding, dilation, groups)
CONVS = [(3, 8, 3, 1, 1, 1, 1), (4, 6, 5, 2, 2, 1, 2), (6, 6, 3, 1, 1, 1, 6), (4, 5, 3, 2, 0, 2, 1),
         (3, 4, 1, 1, 0, 1, 1)]
SIDE = 9


class OneConv(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, padding: int, dilation: int, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups)
        side = (SIDE + 2 * padding - dilation * (k - 1) - 1) // stride + 1
        self.fc = nn.Linear(cout * side * side, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).flatten(1))


class TwoLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(20, 16), nn.Linear(16, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def _apot_pipeline(bits: int) -> str:
    return (f"canonicalize,fold-batchnorm,insert-quantizers{{scheme=apot,weights={bits},apot_first_last=true}},"
            "calibrate,share-scales,lower-integer")


@cache
def compiled_conv(index: int, bits: int, target: str = "ort") -> tuple[qcompile.CompiledModel, tuple[int, ...]]:
    torch.manual_seed(index)
    cin = CONVS[index][0]
    shape = (cin, SIDE, SIDE)
    cm = compile_model(OneConv(*CONVS[index]).eval(), pipeline=_apot_pipeline(bits), shape=shape, target=target)
    return cm, shape


def _shift_ops(cm: qcompile.CompiledModel) -> list[ops.IntShiftConv2d | ops.IntShiftLinear]:
    return [m for m in cm.integer_graph.modules() if isinstance(m, ops.SHIFT_ADD_OPS)]


def _plain(op: ops.IntShiftConv2d | ops.IntShiftLinear) -> ops.IntConv2d | ops.IntLinear:
    common = {"inp": op.inp, "w_type": op.w_type, "out": op.out, "lo": op.lo, "hi": op.hi, "fmult": op.fmult,
              "target": op.target}
    if isinstance(op, ops.IntShiftConv2d):
        return ops.IntConv2d(op.weight, op.bias, op.mult, op.shift, stride=op.stride, padding=op.padding,
                             dilation=op.dilation, groups=op.groups, **common)
    return ops.IntLinear(op.weight, op.bias, op.mult, op.shift, **common)


def _int_input(op: ops.IntShiftConv2d | ops.IntShiftLinear, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(op.inp.lo, op.inp.hi + 1, size=shape).astype(np.int64)


@pytest.mark.parametrize("target", ["ort", "integer"])
@pytest.mark.parametrize("bits", [2, 3, 5, 7])
@pytest.mark.parametrize("index", range(len(CONVS)))
def test_shift_add_conv_equals_plain_conv_fast_and_onnxruntime(index: int, bits: int, target: str) -> None:
    cm, shape = compiled_conv(index, bits, target)
    (op,) = [m for m in _shift_ops(cm) if isinstance(m, ops.IntShiftConv2d)]
    assert op.bits == bits and op.terms == (bits) // 2  # terms of the (bits-1)-bit magnitude set
    q = _int_input(op, (3, *shape))
    shifted = reference._KERNELS[ops.IntShiftConv2d](op, q)
    assert np.array_equal(shifted, reference._KERNELS[ops.IntConv2d](_plain(op), q))
    x = random_inputs(16, shape=shape) * 2
    ref = cm.reference(x)
    assert torch.equal(cm(x), ref)
    (got,) = run_onnx(cm.to_onnx(), x.numpy())
    assert np.array_equal(got, ref.numpy())


@pytest.mark.parametrize("bits", [2, 4, 6, 7])
def test_shift_add_linear(bits: int) -> None:
    torch.manual_seed(bits)
    cm = compile_model(TwoLinear().eval(), pipeline=_apot_pipeline(bits), shape=(20,))
    shift = _shift_ops(cm)
    assert [type(m) for m in shift] == [ops.IntShiftLinear, ops.IntShiftLinear]
    for op in shift:
        q = _int_input(op, (5, op.weight.shape[1]))
        assert np.array_equal(reference._KERNELS[ops.IntShiftLinear](op, q),
                              reference._KERNELS[ops.IntLinear](_plain(op), q))
    x = random_inputs(32, shape=(20,)) * 3
    ref = cm.reference(x)
    assert torch.equal(cm(x), ref) and cm.verify(x).mismatches == 0
    onnx.checker.check_model(cm.to_onnx(), full_check=True)


def test_planes_are_ternary_and_sum_to_the_codes() -> None:
    signs = torch.tensor([[[1, -1, 0, 1]], [[1, -1, 0, 0]]])
    exps = torch.tensor([[[3, 2, 0, 0]], [[1, 0, 0, 0]]])
    op = ops.IntShiftLinear(signs, exps, [0], [2**30], [31], bits=4, inp=IntType(8, False), w_type=IntType(5, True),
                            out=IntType(8, False), lo=0, hi=255)
    assert op.weight.tolist() == [[10, -5, 0, 1]]
    planes = op.planes()
    assert [p for p, _ in planes] == [0, 1, 2, 3]
    assert all(bool((t.abs() <= 1).all()) for _, t in planes)
    assert torch.equal(sum(t << p for p, t in planes), op.weight.to(torch.int64))
    assert "weight" not in op.state_dict()  # stored as terms; the codes are derived
    with pytest.raises(ValueError, match="term signs"):
        ops.IntShiftLinear(signs * 2, exps, [0], [2**30], [31], bits=4, inp=IntType(8, False),
                           w_type=IntType(5, True), out=IntType(8, False), lo=0, hi=255)


def _initializer_types(model: onnx.ModelProto) -> dict[str, int]:
    return {t.name: t.data_type for t in model.graph.initializer}


@pytest.mark.parametrize(("target", "four", "two"), [
    ("integer", onnx.TensorProto.UINT4, onnx.TensorProto.UINT2), ("ort", onnx.TensorProto.INT4, onnx.TensorProto.INT2),
])
def test_export_storage_follows_the_codes(target: str, four: int, two: int) -> None:
    cm3, _ = compiled_conv(0, 3, target)  # codes +-4: packed 4-bit
    types3 = _initializer_types(cm3.to_onnx())
    assert any(k.startswith("conv_w_packed") and v == four for k, v in types3.items())
    cm2, _ = compiled_conv(0, 2, target)  # ternary: 2-bit, opset 25
    model2 = cm2.to_onnx()
    assert model2.opset_import[0].version == 25
    assert any(v == two for v in _initializer_types(model2).values())
    cm7, _ = compiled_conv(0, 7, target)  # codes up to 448: lo/hi split, two ConvInteger for the conv
    model7 = cm7.to_onnx()
    convs = [n for n in model7.graph.node if n.op_type == "ConvInteger" and n.name.startswith("conv")]
    assert sorted(n.name for n in convs) == ["conv_hi/ConvInteger", "conv_lo/ConvInteger"]
    scale = [numpy_helper.to_array(t) for t in model7.graph.initializer if t.name == "conv_hi_scale"]
    assert scale and scale[0].reshape(-1).tolist() == [128]
