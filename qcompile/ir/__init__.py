"""The qcompile IR: a torch.fx GraphModule in one of four stages, with typed per-node facts."""

from qcompile.ir.meta import META_KEY, IntType, NodeInfo, Stage, get_info, set_info

__all__ = ["META_KEY", "IntType", "NodeInfo", "Stage", "get_info", "set_info"]
