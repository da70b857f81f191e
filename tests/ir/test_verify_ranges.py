"""verify's range check of stored constants: the vectorised integer comparison equals the exact Python one."""

from __future__ import annotations

import pytest
import torch

from qcompile.ir.verify import _out_of


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.float64])
def test_out_of_range_values_are_found_exactly(dtype: torch.dtype) -> None:
    values = torch.tensor([0, 127, -127, 128, -128, 5, 2**31 - 1 if dtype in (torch.int64, torch.float64) else 3])
    values = values.to(dtype) if dtype is not torch.int8 else torch.tensor([0, 127, -127, -128, 5], dtype=dtype)
    expected = [v for v in (int(x) for x in values.tolist()) if not -127 <= v <= 127][:3]
    assert _out_of(values, -127, 127) == expected
    assert expected  # the check can fail: something is out of range
    assert _out_of(torch.arange(-127, 128, dtype=dtype), -127, 127) == []
    assert _out_of(torch.tensor([2**31 - 1, 2**31], dtype=torch.int64), 1, 2**31 - 1) == [2**31]
