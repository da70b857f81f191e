"""canonicalize: data movement, pools, identities and constant arithmetic (Before / Expected graphs).

Each Before graph is written the way torchvision writes the block; the Expected graph is the canonical form
written by hand. Both are compared structurally and numerically (``assert_canonicalizes_to``).
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from conftest import channel_shuffle, graph_signature, stochastic_depth
from test_canonicalize import Conv, assert_canonicalizes_to, canonicalize
from torch import nn

from qcompile.ir.elementwise import AddConst, MulConst
from qcompile.passes.canonicalize import UnsupportedOpsError


def test_channel_shuffle_and_chunk_become_reshape_permute_narrow() -> None:
    class Before(Conv):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x1, x2 = self.conv(x).chunk(2, dim=1)
            return channel_shuffle(torch.cat((x1, torch.relu(x2)), dim=1), 2)

    class Expected(Conv):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            x1, x2 = torch.narrow(y, 1, 0, 2), torch.narrow(y, 1, 2, 2)
            z = torch.reshape(torch.cat((x1, torch.relu(x2)), dim=1), (-1, 2, 2, 8, 8))
            return torch.reshape(torch.permute(z, (0, 2, 1, 3, 4)), (-1, 4, 8, 8))

    assert_canonicalizes_to(Before(), Expected())


def test_slices_split_unbind_and_permutes() -> None:
    class Before(Conv):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            a = y.permute(0, 2, 3, 1)[:, :, :, 1:3].permute(0, 3, 1, 2)
            b = torch.split(y, [1, 3], dim=1)[1][:, -2:]
            c = y.unbind(1)[3].unsqueeze(1)
            return torch.cat([a, b, c, y.swapaxes(2, 3)[..., :]], dim=1)

    class Expected(Conv):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            a = torch.permute(torch.narrow(torch.permute(y, (0, 2, 3, 1)), 3, 1, 2), (0, 3, 1, 2))
            b = torch.narrow(torch.narrow(y, 1, 1, 3), 1, 1, 2)
            c = torch.reshape(torch.reshape(torch.narrow(y, 1, 3, 1), (-1, 8, 8)), (-1, 1, 8, 8))
            return torch.cat([a, b, c, torch.permute(y, (0, 1, 3, 2))], dim=1)

    assert_canonicalizes_to(Before(), Expected())


def test_moving_the_batch_is_refused() -> None:
    class Before(Conv):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).transpose(0, 1)[1:]

    with pytest.raises(UnsupportedOpsError) as info:
        canonicalize(Before())
    assert len(info.value.items) == 2 and all("test_canonical_plumbing.py:" in i for i in info.value.items)


def test_adaptive_pools_identity_divisor_and_irregular() -> None:
    class Before(Conv):
        def __init__(self) -> None:
            super().__init__()
            self.same, self.halves = nn.AdaptiveAvgPool2d(8), nn.AdaptiveAvgPool2d((4, None))
            self.odd = nn.AdaptiveAvgPool2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.same(self.conv(x))
            parts = [self.halves(y).flatten(1), self.odd(y).flatten(1), F.adaptive_avg_pool2d(y, 2).flatten(1)]
            return torch.cat(parts, 1)

    class Expected(Conv):
        def __init__(self) -> None:
            super().__init__()
            self.halves, self.odd = nn.AvgPool2d((2, 1), (2, 1)), nn.AdaptiveAvgPool2d(3)
            self.two = nn.AvgPool2d((4, 4), (4, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return torch.cat([torch.flatten(self.halves(y), 1), torch.flatten(self.odd(y), 1),
                              torch.flatten(self.two(y), 1)], dim=1)

    assert_canonicalizes_to(Before(), Expected())


def test_chained_means_and_stochastic_depth_become_one_pool() -> None:
    class StochasticDepth(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    class Before(Conv):
        def __init__(self) -> None:
            super().__init__()
            self.sd = StochasticDepth()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.sd(stochastic_depth(self.conv(x), 0.2, "row", False))
            return y.mean(3).mean(2) + y.mean(-1, keepdim=True).mean(-2, keepdim=True).flatten(1)

    class Expected(Conv):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.AdaptiveAvgPool2d(1), nn.AdaptiveAvgPool2d(1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return operator.add(torch.flatten(self.a(y), 1), torch.flatten(self.b(y), 1))

    assert_canonicalizes_to(Before(), Expected())


def test_constants_fold_into_layers_or_become_modules() -> None:
    class Before(Conv):
        def __init__(self) -> None:
            super().__init__()
            self.gamma = nn.Parameter(torch.full((4, 1, 1), 0.5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x) * -2.0 + 1.0  # folds into the conv (any sign)
            h = F.relu6(y + 3) / 6  # hardsigmoid written out
            return (self.gamma * h - 0.25) - y

    gm = canonicalize(Before())
    kinds = [type(gm.get_submodule(str(n.target))) for n in gm.graph.nodes if n.op == "call_module"]
    assert kinds == [nn.Conv2d, AddConst, MulConst, MulConst, AddConst]
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [torch.clamp, operator.sub]
    model = Before().eval()
    before_w = model.conv.weight.clone()
    x = torch.randn(3, 2, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(model.conv.weight, before_w), "the user's model must keep its weights"
    again = canonicalize(Before())
    assert graph_signature(again) == graph_signature(gm)


def test_negative_factor_without_a_layer_is_refused() -> None:
    class Before(Conv):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.conv(x))
            return y * -1.5 + (3 - y)

    with pytest.raises(UnsupportedOpsError) as info:
        canonicalize(Before())
    assert [i.split(" ")[0] for i in info.value.items] == ["mul", "sub"]
