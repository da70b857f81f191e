"""canonicalize: every spelling of a supported op becomes its one canonical form; the rest is listed.

Each test compares the canonicalized Before graph with the traced Expected graph structurally
(``graph_signature``: ops, module hyper-parameters, functions, arguments) and numerically.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from conftest import context, graph_signature
from torch import nn

from qcompile.frontends import trace_module
from qcompile.ir.meta import Stage, get_stage
from qcompile.passes import PassManager
from qcompile.passes.base import PreconditionError
from qcompile.passes.canonicalize import Canonicalize, UnsupportedOpsError

SHAPE = (2, 8, 8)


def canonicalize(model: nn.Module, shape: tuple[int, ...] = SHAPE) -> fx.GraphModule:
    ctx = context(shape=shape)
    gm = trace_module(model, ctx.example_inputs)
    result = Canonicalize()(gm, ctx)
    assert get_stage(result.gm) is Stage.FLOAT
    return result.gm


def assert_canonicalizes_to(before: nn.Module, expected: nn.Module, shape: tuple[int, ...] = SHAPE) -> None:
    x = torch.randn(4, *shape)
    with torch.no_grad():
        want = before.eval()(x)
    gm = canonicalize(before, shape)
    expected_gm = trace_module(expected.eval(), (x[:2],))
    assert graph_signature(gm) == graph_signature(expected_gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), want, rtol=1e-6, atol=1e-6)


class Conv(nn.Module):
    """Shared first layer so Before and Expected have identical weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)


def test_relu_spellings_become_torch_relu() -> None:
    class Before(Conv):
        def __init__(self) -> None:
            super().__init__()
            self.relu = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.relu(self.conv(x))
            x = F.relu(x)
            x = x.relu()
            x = F.relu(x, inplace=True)
            return torch.relu_(x)

    class Expected(Conv):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(torch.relu(torch.relu(torch.relu(torch.relu(self.conv(x))))))

    assert_canonicalizes_to(Before(), Expected())


def test_clamp_spellings_become_torch_clamp() -> None:
    class Before(Conv):
        def __init__(self) -> None:
            super().__init__()
            self.relu6 = nn.ReLU6()
            self.hardtanh = nn.Hardtanh(-2.0, 3.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv(x)
            a = F.relu6(x)
            b = self.relu6(x)
            c = self.hardtanh(x)
            d = F.hardtanh(x)
            e = x.clamp(0, 4)
            f = torch.clip(x, min=-1)
            return torch.cat([a, b, c, d, e, f], 1)

    class Expected(Conv):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv(x)
            return torch.cat([
                torch.clamp(x, min=0.0, max=6.0), torch.clamp(x, min=0.0, max=6.0),
                torch.clamp(x, min=-2.0, max=3.0), torch.clamp(x, min=-1.0, max=1.0),
                torch.clamp(x, min=0.0, max=4.0), torch.clamp(x, min=-1.0, max=None),
            ], dim=1)

    assert_canonicalizes_to(Before(), Expected())


def test_flatten_spellings_become_torch_flatten() -> None:
    class Before(Conv):
        def __init__(self) -> None:
            super().__init__()
            self.flatten = nn.Flatten()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv(x)
            return torch.cat([x.view(x.size(0), -1), self.flatten(x), x.flatten(1), x.reshape(x.shape[0], -1),
                              torch.flatten(x, start_dim=1), x.view(-1, 256)], 1)

    class Expected(Conv):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv(x)
            f = torch.flatten
            return torch.cat([f(x, 1), f(x, 1), f(x, 1), f(x, 1), f(x, 1), f(x, 1)], dim=1)

    assert_canonicalizes_to(Before(), Expected())


def test_other_reshapes_become_torch_reshape_with_free_batch() -> None:
    class Before(Conv):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv(x)
            return x.view(x.size(0), 16, 4, 4) + x.reshape(-1, 16, 4, 4)

    class Expected(Conv):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv(x)
            return operator.add(torch.reshape(x, (-1, 16, 4, 4)), torch.reshape(x, (-1, 16, 4, 4)))

    assert_canonicalizes_to(Before(), Expected())


def test_spatial_mean_becomes_adaptive_pool_and_flatten() -> None:
    class Before(Conv):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv(x)
            kept = x.mean((2, 3), keepdim=True)
            return x.mean((2, 3)) + torch.mean(x, dim=[-1, -2]) + kept.flatten(1)

    class Expected(Conv):
        def __init__(self) -> None:
            super().__init__()
            self.p1, self.p2, self.p3 = nn.AdaptiveAvgPool2d(1), nn.AdaptiveAvgPool2d(1), nn.AdaptiveAvgPool2d(1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv(x)
            kept = self.p1(x)
            a = torch.flatten(self.p2(x), 1)
            b = torch.flatten(self.p3(x), 1)
            return operator.add(operator.add(a, b), torch.flatten(kept, 1))

    assert_canonicalizes_to(Before(), Expected())


def test_dropout_identity_contiguous_are_dropped() -> None:
    class Before(Conv):
        def __init__(self) -> None:
            super().__init__()
            self.drop, self.drop2d, self.ident = nn.Dropout(0.5), nn.Dropout2d(0.3), nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.ident(self.drop(self.conv(x)))
            x = F.dropout(self.drop2d(x), 0.2, training=False)
            return x.contiguous().clone()

    class Expected(Conv):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    assert_canonicalizes_to(Before(), Expected())


def test_add_and_cat_spellings() -> None:
    class Before(Conv):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv(x)
            y = torch.add(x, x)
            y = y.add(x)
            y += x
            return torch.concat((y, x), dim=-3)

    class Expected(Conv):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv(x)
            y = operator.add(operator.add(operator.add(x, x), x), x)
            return torch.cat([y, x], dim=1)

    assert_canonicalizes_to(Before(), Expected())


def test_functional_pools_become_modules() -> None:
    class Before(Conv):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.conv(x)
            x = F.max_pool2d(x, 2)
            x = F.avg_pool2d(x, 3, stride=1, padding=1)
            x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1, ceil_mode=True)
            return F.adaptive_avg_pool2d(x, 1)

    class Expected(Conv):
        def __init__(self) -> None:
            super().__init__()
            self.max1 = nn.MaxPool2d(2, 2)
            self.avg = nn.AvgPool2d(3, 1, 1)
            self.max2 = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
            self.gap = nn.AdaptiveAvgPool2d(1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.gap(self.max2(self.avg(self.max1(self.conv(x)))))

    assert_canonicalizes_to(Before(), Expected())


def test_canonical_graphs_are_left_alone() -> None:
    class Canonical(Conv):
        def __init__(self) -> None:
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.clamp(torch.relu(self.conv(x)), min=0.0, max=6.0)
            return self.fc(torch.flatten(self.pool(operator.add(x, x)), 1))

    ctx = context(shape=SHAPE)
    gm = trace_module(Canonical(), ctx.example_inputs)
    before = graph_signature(gm)
    result = Canonicalize()(gm, ctx)
    assert not result.modified
    assert graph_signature(result.gm) == before
    again = Canonicalize()(result.gm, ctx)  # a FLOAT graph may be canonicalized again: a fixed point
    assert not again.modified


def test_unsupported_ops_are_all_listed_with_source_lines() -> None:
    class Before(Conv):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.sin(self.conv(x))
            y = x.abs()
            z = torch.cat([x, y], dim=2)  # supported op, unsupported axis
            return torch.add(z, z, alpha=2)[:, :, ::2] + torch.roll(z, 1, 2)[:, :, :8]

    with pytest.raises(UnsupportedOpsError) as info:
        canonicalize(Before())
    items = info.value.items
    text = " | ".join(items)
    for what in ("sin", "abs", "cat", "add", "getitem", "roll"):
        assert what in text, f"{what} missing from {items}"
    assert len(items) == 6
    assert all("test_canonicalize.py:" in item for item in items)
    assert str(len(items)) in str(info.value)


def test_canonicalize_refuses_quant_graphs() -> None:
    from conftest import make_model, run_pipeline

    gm = run_pipeline(make_model("mlp"), "canonicalize,fold-batchnorm,insert-quantizers")
    with pytest.raises(PreconditionError, match="traced or float"):
        Canonicalize()(gm, context())


def test_canonicalize_in_a_manager_on_every_model(any_model: nn.Module) -> None:
    ctx = context()
    gm = trace_module(any_model, ctx.example_inputs)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        want = any_model(x)
    out = PassManager([Canonicalize()]).run(gm, ctx)
    with torch.no_grad():
        torch.testing.assert_close(out(x), want, rtol=1e-6, atol=1e-6)
    assert not any(n.op == "call_method" for n in out.graph.nodes)
