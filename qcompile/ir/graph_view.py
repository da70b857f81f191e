"""A read-only networkx view of the IR, and drawings of it (DOT text, PNG) highlighted by bit-width.

The view is not a second IR: it is rebuilt from the GraphModule whenever it is needed. Node attributes:
``label`` (op and main facts), ``bits`` (weight bits of a layer, else the value's integer bits, else None).
"""

from __future__ import annotations

from pathlib import Path

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


def _label(gm: fx.GraphModule, node: fx.Node, bits: int | None) -> str:
    if node.op == "call_module":
        kind = type(gm.get_submodule(str(node.target))).__name__
        head = f"{node.target}\n{kind}"
    elif node.op == "call_function":
        head = f"{node.name}\n{getattr(node.target, '__name__', node.target)}"
    else:
        head = f"{node.name}\n{node.op}"
    info = get_info(node)
    extras = [f"{bits} bits"] if bits is not None else []
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


def write_dot(gm: fx.GraphModule, path: Path) -> None:
    g = to_networkx(gm)
    dot = nx.DiGraph()
    for name, data in g.nodes(data=True):
        dot.add_node(name, label=f'"{data["label"]}"', shape="box", style="filled",
                     fillcolor=f'"{_color(data["bits"])}"')
    dot.add_edges_from(g.edges)
    nx.nx_pydot.write_dot(dot, path)


def write_png(gm: fx.GraphModule, path: Path) -> None:
    """A left-to-right drawing by topological generation (matplotlib, no graphviz needed)."""
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
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
