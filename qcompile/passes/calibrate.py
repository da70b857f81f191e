"""calibrate: set every activation range from data.

With all quantizers observing (activations stay float, as in AQT's first phase), each ActQuant keeps
amax <- (1 - momentum) * amax + momentum * stat over ``steps`` batches, where stat is the batch max|x|
or, with ``percentile``, that percentile of |x|. It refuses a range that is zero or not finite (an
activation that is always zero cannot be given a scale) and names the quantizer.

The forward passes run at one torch thread whatever the pool size, so the ranges (and the ONNX bytes of a
post-training compile) do not depend on the thread count; max, the k-th value and the EMA are
order-independent or sequential, so nothing else does either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from tqdm import tqdm

from qcompile.ir.meta import Stage
from qcompile.passes.base import Pass, PassContext, PassResult, QCompileError, option, register_pass
from qcompile.quant import graph, integer_sim
from qcompile.threads import fixed_threads


class CalibrationError(QCompileError):
    pass


def _check_range(node: fx.Node, q: Any) -> None:
    """Refuse a range that cannot give a scale, with its likely cause."""
    amax, source = float(q.amax), node.args[0]
    what = f"activation '{source}'"
    if not q.calibrated:
        raise CalibrationError(f"{what} was never reached: the calibration data gave no batches; pass --data with "
                               "samples (or calibration batches in the API)")
    if not math.isfinite(amax):
        raise CalibrationError(f"{what} is not finite (NaN or Inf) on the calibration data; a weight, bias or "
                               "input upstream is not finite, a table function is infinite there, or the values "
                               "overflow float32: check the model")
    if amax <= 0.0 and isinstance(source, fx.Node) and source.op == "placeholder":
        raise CalibrationError(f"the calibration inputs '{source}' are all zero; pass --data with real samples "
                               "(without it the example input, zeros, calibrates)")
    if amax <= 0.0:
        raise CalibrationError(f"{what} is always zero on the calibration data; check the data and weights, "
                               "or remove the dead layer")


@register_pass
@dataclass(frozen=True)
class Calibrate(Pass):
    name = "calibrate"
    summary = "calibrate activation ranges (EMA of batch max|x|, or of a percentile)"
    requires = (Stage.QUANT,)

    steps: int = option(32, "number of calibration batches")
    momentum: float = option(0.1, "EMA coefficient c in amax <- (1-c)*amax + c*stat")
    percentile: float | None = option(None, "use this percentile of |x| instead of the max (e.g. 99.99)")

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        quants = list(graph.act_quants(gm))
        for _node, q in quants:
            q.momentum, q.percentile, q.observing = self.momentum, self.percentile, True
            q.amax.zero_()
            q.batches.zero_()
        gm.eval()
        try:
            with torch.no_grad(), fixed_threads(1):  # the ranges, hence the ONNX bytes, at any thread count
                batches = ctx.calibration_batches()
                for step, batch in enumerate(tqdm(batches, "calibrate", total=self.steps, disable=not ctx.progress)):
                    if step >= self.steps:
                        break
                    gm(batch)
        finally:
            for _node, q in quants:
                q.observing = False
        for node, q in quants:
            _check_range(node, q)
        graph.bind_input_scales(gm)  # from here on the layers' biases sit on the int32 accumulator grid
        integer_sim.bind_simulation(gm)  # and LayerNorm, softmax and constants compute the integer graph's values
        return PassResult(gm, True)
