"""Runs a list of passes: verification after each (by default), timing, IR dumps, typed errors."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch.fx as fx

from qcompile.ir.verify import verify
from qcompile.passes.base import Pass, PassContext, PassError, QCompileError


@dataclass(frozen=True)
class PassTiming:
    name: str
    seconds: float
    modified: bool


IRDump = Callable[[int, Pass, fx.GraphModule], None]


@dataclass
class PassManager:
    passes: Sequence[Pass]
    verify_each: bool = True
    dump: IRDump | None = None
    timings: list[PassTiming] = field(default_factory=list)

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
        if self.verify_each:
            self._verify("input", gm)
        for index, p in enumerate(self.passes):
            start = time.perf_counter()
            try:
                result = p(gm, ctx)
            except PassError:
                raise
            except Exception as exc:  # noqa: BLE001 - every failure becomes a PassError naming the pass
                raise PassError(p.name, exc) from exc
            gm = result.gm
            self.timings.append(PassTiming(p.name, time.perf_counter() - start, result.modified))
            if self.verify_each:
                self._verify(p.name, gm)
            if self.dump is not None:
                self.dump(index, p, gm)
        return gm

    @staticmethod
    def _verify(name: str, gm: fx.GraphModule) -> None:
        try:
            verify(gm)
        except QCompileError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise PassError(name, exc) from exc
