"""The graph drawings: labels spell the types like the text dump, and a legend explains the colours."""

from __future__ import annotations

import re
from pathlib import Path

import torch

import qcompile
from qcompile.ir.graph_view import LEGEND_TITLE, graph_figure, legend_entries, to_networkx, write_dot
from qcompile.ir.printer import format_ir
from qcompile.models import DemoNet


def compiled() -> qcompile.CompiledModel:
    torch.manual_seed(0)
    return qcompile.compile(DemoNet(), torch.randn(8, 1, 8, 8), policy="w8a4")


def test_integer_labels_match_the_text_dump() -> None:
    gm = compiled().integer_graph
    text_types = re.findall(r"\[(\w+)\]\((\w\d+x\w\d+->\w\d+)", format_ir(gm))
    assert text_types and any(t.endswith("->u4") for _, t in text_types)  # 8-bit weights, 4-bit outputs
    labels = dict(to_networkx(gm).nodes(data="label"))
    by_target = {str(n.target): n.name for n in gm.graph.nodes if n.op == "call_module"}
    for target, types in text_types:
        assert types in labels[by_target[target]], (target, labels[by_target[target]])
        assert "8 bits" not in labels[by_target[target]]


def test_drawings_have_a_colour_legend(tmp_path: Path) -> None:
    gm = compiled().integer_graph
    entries = legend_entries(to_networkx(gm))
    assert {"4 bits", "8 bits"} <= {t for t, _ in entries}
    write_dot(gm, tmp_path / "g.dot")
    dot = (tmp_path / "g.dot").read_text()
    assert "cluster_legend" in dot and LEGEND_TITLE in dot and all(t in dot for t, _ in entries)
    legend = graph_figure(gm).axes[0].get_legend()
    assert legend is not None and legend.get_title().get_text() == LEGEND_TITLE
    assert [t.get_text() for t in legend.get_texts()] == [t for t, _ in entries]
