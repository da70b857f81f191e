"""Reshapes that fold the batch into axis 0 together with other axes (MobileViT's unfold to patches:
[N, C, H, W] -> [N C n_h, p_h, n_w, p_w] -> ... -> [N P, L, C] tokens, and the fold back).

Math: a row-major reshape of [N k1, *a] to [N k2, *b] with k1 prod(a) = k2 prod(b) moves no element from
one sample to another: sample n holds the contiguous block [n S, (n + 1) S) of both tensors (S = k1 prod(a)
elements per sample), so ``torch.reshape(x, (-1, *b))`` is the same per-sample reshape at every batch N.
Axis 0 of every tensor then holds the batch as its outermost factor times a per-sample factor k; a
permute that keeps axis 0 first keeps that, and the IR's other ops compute row by row along axis 0.

Which axis-0 sizes scale with the batch is measured, not guessed from divisibility: the graph runs once
more at batch N + 1 (the example inputs with their first sample appended), and a reshape is accepted only
when the axis 0 of its input and of its output both grow by exactly the factor (N + 1) / N and no other
axis changes. Not handled: the batch anywhere but outermost in axis 0 (a seq-first [L, N, E] layout), or a
graph that does not run at batch N + 1 (a batch fixed in the model's code).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

EXAMPLE_KEY, SHAPES_KEY = "qcompile_example_inputs", "qcompile_next_batch_shapes"


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, shapes: dict[fx.Node, tuple[int, ...]]) -> None:
        super().__init__(gm)
        self.shapes = shapes

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n] = tuple(out.shape)
        return out


def _next_batch_shapes(gm: fx.GraphModule, nodes: tuple[fx.Node, ...]) -> dict[fx.Node, tuple[int, ...]] | None:
    shapes: dict[fx.Node, tuple[int, ...]] = gm.meta.setdefault(SHAPES_KEY, {})
    if all(n in shapes for n in nodes):
        return shapes
    inputs = gm.meta.get(EXAMPLE_KEY)
    if inputs is None:
        return None
    grown = tuple(torch.cat([x, x[:1]]) for x in inputs)
    shapes.clear()
    try:
        with torch.no_grad():
            _Recorder(gm, shapes).run(*grown)
    except Exception:  # noqa: BLE001 - a model that only runs at its traced batch: no fold is proven
        return None
    return shapes


def folds_batch(gm: fx.GraphModule, src: fx.Node, node: fx.Node, before: tuple[int, ...],
                after: tuple[int, ...]) -> bool:
    """Whether ``node`` = reshape(``src``) maps [N k1, ...] to [N k2, ...], the batch outermost in both axes 0."""
    inputs = gm.meta.get(EXAMPLE_KEY)
    if inputs is None or not inputs or not before or not after:
        return False
    n = int(inputs[0].shape[0])
    shapes = _next_batch_shapes(gm, (src, node))
    if shapes is None or src not in shapes or node not in shapes:
        return False
    for now, grown in ((before, shapes[src]), (after, shapes[node])):
        if len(now) != len(grown) or now[1:] != grown[1:] or now[0] % n or grown[0] * n != now[0] * (n + 1):
            return False
    return True
