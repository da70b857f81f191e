"""quantize_on_grid's gradient at the grid's edges is the project's, whatever torch's clamp does there."""

from __future__ import annotations

import torch

from qcompile.quant.bayesian_bits import grid_scale, quantize_on_grid


def test_straight_through_onto_the_edge_and_none_where_clipped() -> None:
    x_max = torch.tensor(1.0, dtype=torch.float64)
    s = float(grid_scale(x_max, 2, True))  # ternary: 2/3, q in [-1, 1]
    # 1.0 / s = 1.5 rounds (half to even) to 2: clipped to 1; 0.7 / s = 1.05 rounds onto the edge 1: passes
    x = torch.tensor([0.7, -0.7, 1.0, 0.1], dtype=torch.float64, requires_grad=True)
    y = quantize_on_grid(x, x_max, 2, True)
    assert torch.equal(y.detach(), torch.tensor([s, -s, s, 0.0], dtype=torch.float64))
    y.sum().backward()
    assert x.grad is not None and x.grad.tolist() == [1.0, 1.0, 0.0, 1.0]
