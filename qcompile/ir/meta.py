"""Typed per-node facts and the stages of the IR.

Every fact qcompile records about a node lives in ``node.meta[META_KEY]`` as one ``NodeInfo``
dataclass; there are no side tables keyed by node names. The stage of a whole graph lives in
``gm.meta[STAGE_KEY]``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

import torch.fx as fx

from qcompile.ir.contract import Target

META_KEY = "qc"
STAGE_KEY = "qc_stage"
TARGET_KEY = "qc_target"


class Stage(enum.Enum):
    """The dialect a graph is in; each has a verifier listing the ops it allows."""

    TRACED = "traced"  # whatever the frontend produced
    FLOAT = "float"  # canonical float ops only
    QUANT = "quant"  # float ops plus quantizer modules (simulation)
    INTEGER = "integer"  # qcompile integer ops only; float only at the boundary


@dataclass(frozen=True)
class IntType:
    """An integer activation or weight type: ``bits`` wide, signed or unsigned.

    Signed values use the narrow symmetric range [-(2^(b-1)-1), 2^(b-1)-1], or, with ``neg`` = n (an
    activation whose negative side is short, as after SiLU or hardswish), the skewed range
    [-n, 2^b - 1 - n] with 1 <= n < 2^(b-1) - 1: all 2^b codes, n of them negative. Unsigned values use
    [0, 2^b-1]. The real value is always ``scale * q`` (zero at q = 0); the ONNX container (uint8) holds
    ``q + zero_point``.
    """

    bits: int
    signed: bool
    neg: int | None = None

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 16:
            raise ValueError(f"bit-width {self.bits} outside the supported range 2..16")
        if self.neg is not None and not (self.signed and 1 <= self.neg < 2 ** (self.bits - 1) - 1):
            raise ValueError(f"a skewed range needs a signed type and 1 <= neg < {2 ** (self.bits - 1) - 1}, "
                             f"not neg={self.neg} on {'' if self.signed else 'un'}signed {self.bits} bits")

    @property
    def lo(self) -> int:
        if self.neg is not None:
            return -self.neg
        return -(2 ** (self.bits - 1) - 1) if self.signed else 0

    @property
    def hi(self) -> int:
        if self.neg is not None:
            return 2**self.bits - 1 - self.neg
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def zero_point(self) -> int:
        """Offset that carries this type in a uint8 container (ONNX export): q + zero_point >= 0."""
        if self.neg is not None:
            return self.neg
        return 128 if self.signed else 0

    def __str__(self) -> str:
        if self.neg is not None:
            return f"i{self.bits}[{self.lo},{self.hi}]"
        return f"{'i' if self.signed else 'u'}{self.bits}"


@dataclass(frozen=True)
class NodeInfo:
    """Everything qcompile knows about one node's output.

    ``shape`` is the output shape for the example input (batch included); ``itype``/``scale`` describe
    an integer-stage value (real value = scale * q); ``source`` is the user's file:line for messages;
    ``layer`` is the original module path of the layer an integer op was lowered from.
    """

    shape: tuple[int, ...] | None = None
    itype: IntType | None = None
    scale: float | None = None
    source: str | None = None
    layer: str | None = None


def get_info(node: fx.Node) -> NodeInfo:
    info = node.meta.get(META_KEY)
    return info if isinstance(info, NodeInfo) else NodeInfo()


def set_info(node: fx.Node, **fields: object) -> NodeInfo:
    """Update some fields of ``node``'s NodeInfo, keeping the rest."""
    info = replace(get_info(node), **fields)  # type: ignore[arg-type]
    node.meta[META_KEY] = info
    return info


def get_stage(gm: fx.GraphModule) -> Stage:
    stage = gm.meta.get(STAGE_KEY, Stage.TRACED)
    return stage if isinstance(stage, Stage) else Stage(stage)


def set_stage(gm: fx.GraphModule, stage: Stage) -> None:
    gm.meta[STAGE_KEY] = stage


def get_target(gm: fx.GraphModule) -> Target:
    """The requantization contract an integer graph follows (``integer`` for graphs lowered without one)."""
    return Target.parse(gm.meta.get(TARGET_KEY, Target.INTEGER))


def set_target(gm: fx.GraphModule, target: Target) -> None:
    gm.meta[TARGET_KEY] = target
