"""Frontends: turn a user's model into a traced torch.fx GraphModule (stage TRACED)."""

from qcompile.frontends.torch_fx import TraceError, load_pt2, trace_module

__all__ = ["TraceError", "load_pt2", "trace_module"]
