"""A read-only networkx view of the IR, and drawings of it (DOT text, PNG) highlighted by bit-width.

The view is not a second IR: it is rebuilt from the GraphModule whenever it is needed. Node attributes:
``label`` (op and main facts), ``bits`` (weight bits of a layer, else the value's integer bits, else None).
The fill colour is ``bits`` (the drawings carry a legend saying so); the label spells the types out the
way the text dump does: ``u8xi8->u4`` for an integer layer (input x weight -> output), ``w4 a8`` for a
quant-stage layer, ``u8`` for an integer value, ``8 bits`` for an activation quantizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import networkx as nx
import torch.fx as fx

from qcompile.ir.intops import SHIFT_ADD_OPS
from qcompile.ir.meta import get_info
from qcompile.quant.modules import ActQuant, QConv2d, QLinear

BIT_COLORS = {2: "#d73027", 3: "#f46d43", 4: "#fdae61", 5: "#fee08b", 6: "#d9ef8b", 8: "#a6d96a", 16: "#66bd63"}
NO_BITS = "#e0e0e0"


def _bits(gm: fx.GraphModule, node: fx.Node) -> int | None:
    mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
    if isinstance(mod, (QConv2d, QLinear)):
        return mod.weight_quant.bits
    if isinstance(mod, ActQuant):
        return mod.bits
    if isinstance(mod, SHIFT_ADD_OPS):
        return mod.bits  # the APoT width, not the wider container of its codes
    w_type = getattr(mod, "w_type", None)
    if w_type is not None:
        return int(w_type.bits)
    itype = get_info(node).itype
    return itype.bits if itype is not None else None


def _bits_text(gm: fx.GraphModule, node: fx.Node, bits: int | None) -> str | None:
    """The types as the text dump prints them (``u8xi8->u4``), else ``N bits``; None when there are none."""
    mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
    inp, w_type, out = (getattr(mod, k, None) for k in ("inp", "w_type", "out"))
    if w_type is not None and inp is not None and out is not None:
        return f"{inp}x{w_type}->{out}"
    if isinstance(mod, (QConv2d, QLinear)):
        return f"w{mod.weight_quant.bits}"
    itype = get_info(node).itype
    if itype is not None:
        return str(itype)
    return f"{bits} bits" if bits is not None else None


def _label(gm: fx.GraphModule, node: fx.Node, bits: int | None) -> str:
    if node.op == "call_module":
        kind = type(gm.get_submodule(str(node.target))).__name__
        head = f"{node.target}\n{kind}"
    elif node.op == "call_function":
        head = f"{node.name}\n{getattr(node.target, '__name__', node.target)}"
    else:
        head = f"{node.name}\n{node.op}"
    info = get_info(node)
    text = _bits_text(gm, node, bits)
    extras = [text] if text is not None else []
    if info.shape is not None:
        extras.append("x".join(map(str, info.shape[1:])))
    return head + ("\n" + ", ".join(extras) if extras else "")


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    g: nx.DiGraph = nx.DiGraph()
    for node in gm.graph.nodes:
        bits = _bits(gm, node)
        g.add_node(node.name, label=_label(gm, node, bits), bits=bits)
        for src in node.all_input_nodes:
            g.add_edge(src.name, node.name)
    return g


def _color(bits: int | None) -> str:
    if bits is None:
        return NO_BITS
    return BIT_COLORS.get(bits, BIT_COLORS[min(BIT_COLORS, key=lambda b: abs(b - bits))])


LEGEND_TITLE = "fill: weight bits of a layer, else bits of the value"


def legend_entries(g: nx.DiGraph) -> list[tuple[str, str]]:
    """(label, colour) for every colour the drawing uses, narrowest first, "no bits" last."""
    used = sorted({b for _, b in g.nodes(data="bits") if b is not None})
    entries = [(f"{b} bits", _color(b)) for b in used]
    if any(b is None for _, b in g.nodes(data="bits")):
        entries.append(("no bits (float, shapes)", NO_BITS))
    return entries


def write_dot(gm: fx.GraphModule, path: Path) -> None:
    g = to_networkx(gm)
    dot = nx.DiGraph()
    for name, data in g.nodes(data=True):
        dot.add_node(name, label=f'"{data["label"]}"', shape="box", style="filled",
                     fillcolor=f'"{_color(data["bits"])}"')
    dot.add_edges_from(g.edges)
    legend = nx.nx_pydot.to_pydot(dot)
    import pydot

    box = pydot.Cluster("legend", label=f'"{LEGEND_TITLE}"')
    for index, (text, color) in enumerate(legend_entries(g)):
        box.add_node(pydot.Node(f"legend_{index}", label=f'"{text}"', shape="box", style="filled",
                                fillcolor=f'"{color}"'))
    legend.add_subgraph(box)
    Path(path).write_text(legend.to_string())


def write_png(gm: fx.GraphModule, path: Path) -> None:
    """``graph_figure(gm)`` saved as a PNG."""
    import matplotlib.pyplot as plt

    fig = graph_figure(gm)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def graph_figure(gm: fx.GraphModule) -> Any:
    """A left-to-right drawing by topological generation, with a colour legend (matplotlib, no graphviz)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = to_networkx(gm)
    generations = list(nx.topological_generations(g))
    for layer, names in enumerate(generations):
        for name in names:
            g.nodes[name]["layer"] = layer
    pos = nx.multipartite_layout(g, subset_key="layer")
    tallest = max((len(names) for names in generations), default=1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(generations)), max(1.6, 1.3 * tallest)))
    nx.draw_networkx_edges(g, pos, ax=ax, arrows=True, arrowsize=8, node_size=2200)
    for name, (x, y) in pos.items():
        data = g.nodes[name]
        ax.text(x, y, data["label"], ha="center", va="center", fontsize=6,
                bbox={"boxstyle": "round", "facecolor": _color(data["bits"]), "edgecolor": "#555555"})
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=color, edgecolor="#555555", label=text) for text, color in legend_entries(g)]
    ax.legend(handles=handles, title=LEGEND_TITLE, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=6,
              title_fontsize=6, frameon=False)
    ax.set_axis_off()
    fig.tight_layout()
    return fig
