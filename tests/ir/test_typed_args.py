"""Typed readers of node arguments: ``rewrite.input_node`` / ``input_nodes`` and ``shapes.pair``."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx

from qcompile.ir.rewrite import input_node, input_nodes
from qcompile.ir.shapes import pair


def small_graph() -> tuple[fx.Node, fx.Node, fx.Node, fx.Node]:
    """a, b -> add(a, b) -> cat([a, add]) -> flatten(cat, 1)."""
    graph = fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    add = graph.call_function(operator.add, (a, b))
    cat = graph.call_function(torch.cat, ([a, add],), {"dim": 1})
    flat = graph.call_function(torch.flatten, (cat, 1))
    graph.output(flat)
    return a, add, cat, flat


def test_input_node_reads_node_arguments() -> None:
    a, add, cat, flat = small_graph()
    assert input_node(add) is a
    assert input_node(add, 1).name == "b"
    assert input_node(flat) is cat
    assert input_nodes(cat) == [a, add]


def test_input_node_refuses_constants_and_lists() -> None:
    _, _, cat, flat = small_graph()
    with pytest.raises(AssertionError, match="not a node"):
        input_node(flat, 1)
    with pytest.raises(AssertionError, match="not a node"):
        input_node(cat)
    with pytest.raises(AssertionError, match="not a list of nodes"):
        input_nodes(flat)


def test_pair() -> None:
    assert pair(3) == (3, 3)
    assert pair((2, 5)) == (2, 5)
    with pytest.raises(AssertionError, match="2-D size"):
        pair((1, 2, 3))
