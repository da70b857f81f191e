"""The pointwise integer ops (tables, products, LayerNorm) have a kernel in every backend and an emitter
for every target, and requantizing ones carry both multiplier forms."""

from __future__ import annotations

import pytest

from qcompile.backends import fast, reference
from qcompile.backends.onnx_export import emitters
from qcompile.ir import intops as ops
from qcompile.ir.contract import Target

NEW_OPS = [ops.IntLookup, ops.IntMul, ops.IntLayerNorm, ops.IntSoftmax, ops.IntMatMul, ops.IntConstCat]


@pytest.mark.parametrize("op", NEW_OPS, ids=lambda t: t.__name__)
def test_every_backend_and_target_has_the_op(op: type) -> None:
    assert op in ops.INTEGER_MODULES
    assert op in reference._KERNELS and op in fast._KERNELS
    for target in Target:
        assert op in emitters(target), f"{op.__name__} has no emitter for target {target.value}"
    assert (op in ops.REQUANTIZING_OPS) == issubclass(op, ops._Requantizing)
