"""Shape annotation: run the graph once on example inputs and record every node's output shape.

``pair`` turns a 2-D conv/pool size attribute (an int, or a tuple torch types as ``tuple[int, ...]``) into
the ``(h, w)`` pair the integer ops take.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from qcompile.ir.meta import set_info


class _ShapeRecorder(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            set_info(n, shape=tuple(out.shape))
        return out


def annotate_shapes(gm: fx.GraphModule, example_inputs: tuple[torch.Tensor, ...]) -> None:
    """Set ``NodeInfo.shape`` on every node that produces a tensor."""
    with torch.no_grad():
        _ShapeRecorder(gm).run(*example_inputs)


def pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    """A 2-D conv/pool size as ``(h, w)``: an int applies to both axes; a tuple must have two entries."""
    if isinstance(v, int):
        return (v, v)
    assert len(v) == 2, f"expected a 2-D size, got {v!r}"
    return (v[0], v[1])
