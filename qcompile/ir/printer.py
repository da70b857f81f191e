"""A readable text form of the IR: one line per node with its op, inputs and typed facts."""

from __future__ import annotations

import torch.fx as fx

from qcompile.ir.meta import get_info, get_stage


def _op(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        extra = mod.extra_repr()
        return f"{type(mod).__name__}[{node.target}]" + (f"({extra})" if extra else "")
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return f"{node.op}[{node.target}]"


def _facts(node: fx.Node) -> str:
    info = get_info(node)
    parts = []
    if info.shape is not None:
        parts.append("x".join(map(str, info.shape)))
    if info.itype is not None and info.scale is not None:
        parts.append(f"{info.itype} s={info.scale:.4g}")
    if info.source:
        parts.append(f"@{info.source}")
    return ("  : " + ", ".join(parts)) if parts else ""


def format_ir(gm: fx.GraphModule) -> str:
    lines = [f"graph ({get_stage(gm).value}):"]
    for node in gm.graph.nodes:
        args = ", ".join(f"%{a.name}" if isinstance(a, fx.Node) else repr(a) for a in node.args)
        if node.kwargs:
            args += (", " if args else "") + ", ".join(f"{k}={v!r}" for k, v in node.kwargs.items())
        lines.append(f"  %{node.name} = {_op(gm, node)}({args}){_facts(node)}")
    return "\n".join(lines)
