"""The one mutation API passes use on a GraphModule: add/replace submodules, insert and erase nodes.

Every helper keeps the graph linted and the NodeInfo of replaced nodes; passes call ``finish`` once at
the end to drop unused submodules and recompile. ``input_node`` / ``input_nodes`` read a node's tensor
inputs typed as nodes (torch.fx types every argument as the broad ``Argument`` union).
"""

from __future__ import annotations

import copy
from typing import Any

import torch.fx as fx
from torch import nn

from qcompile.ir.meta import META_KEY


def input_node(node: fx.Node, i: int = 0) -> fx.Node:
    """``node.args[i]``, a tensor input: a node by construction of the graph (asserted)."""
    arg = node.args[i]
    assert isinstance(arg, fx.Node), f"argument {i} of '{node.name}' is {arg!r}, not a node"
    return arg


def input_nodes(node: fx.Node, i: int = 0) -> list[fx.Node]:
    """``node.args[i]``, a list of tensor inputs (``torch.cat``'s tensors): nodes by construction (asserted)."""
    arg = node.args[i]
    assert isinstance(arg, (list, tuple)), f"argument {i} of '{node.name}' is {arg!r}, not a list of nodes"
    nodes = [a for a in arg if isinstance(a, fx.Node)]
    assert len(nodes) == len(arg), f"argument {i} of '{node.name}' is {arg!r}, not a list of nodes"
    return nodes


def unique_name(gm: fx.GraphModule, base: str) -> str:
    base = base.replace(".", "_")
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def add_module(gm: fx.GraphModule, base: str, module: nn.Module) -> str:
    name = unique_name(gm, base)
    gm.add_submodule(name, module)
    return name


def set_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    """Replace the submodule at ``target`` (a dotted path) in place."""
    parent_name, _, leaf = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, leaf, module)


def module_of(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    if node.op != "call_module":
        return None
    return gm.get_submodule(str(node.target))


def insert_module_after(gm: fx.GraphModule, node: fx.Node, base: str, module: nn.Module) -> fx.Node:
    """Insert ``module`` on ``node``'s output; every former user of ``node`` now reads the new node."""
    name = add_module(gm, base, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, (node,))
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    return new


def replace_node(gm: fx.GraphModule, old: fx.Node, op: str, target: Any, args: tuple[Any, ...],
                 kwargs: dict[str, Any] | None = None) -> fx.Node:
    """Create a node before ``old`` that takes over its uses, its name hint and its meta; erase ``old``."""
    with gm.graph.inserting_before(old):
        new = gm.graph.create_node(op, target, args, kwargs or {})
    new.meta.update(old.meta)
    old.replace_all_uses_with(new)
    gm.graph.erase_node(old)
    return new


def bypass(gm: fx.GraphModule, node: fx.Node) -> None:
    """Remove a unary node, wiring its input to its users."""
    src = input_node(node)
    node.replace_all_uses_with(src)
    gm.graph.erase_node(node)


def copy_info(src: fx.Node, dst: fx.Node) -> None:
    if META_KEY in src.meta:
        dst.meta[META_KEY] = src.meta[META_KEY]


def shallow_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with its own graph and module tree but the same leaf modules (no weights copied).

    Safe to keep while passes go on with ``gm``: passes replace modules (``set_module``), they never
    change a module's parameters in place.
    """
    graph = copy.deepcopy(gm.graph)
    copied = fx.GraphModule(gm, graph, type(gm).__name__)
    copied.meta.update(gm.meta)
    return copied


def finish(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm
