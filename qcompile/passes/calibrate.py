"""calibrate: set every activation range from data.

With all quantizers observing (activations stay float, as in AQT's first phase), each ActQuant sets its
range amax by ``method`` over ``steps`` batches:

* ``max``: amax <- (1 - momentum) * amax + momentum * stat, stat the batch max|x| (the first batch
  initialises it; the AQT rule);
* ``percentile``: the same EMA of the ``percentile``-th percentile of |x| (``percentile=P`` alone selects it,
  as before the method option existed);
* ``mse``: the batches fill a histogram of x (``quant/histogram.py``); amax is the clip c that minimises the
  expected squared error of the tensor on its grid, E(c) = sum over values of (x - s clamp(round(x/s), lo,
  hi))^2 with s = c / hi, rounding inside [0, c] plus clipping beyond it, at the quantizer's bits and
  signedness; momentum does not apply. The pass runs before assign-bitwidths in the default pipeline, so
  the quantizer keeps the histogram and a later change of its bits re-derives c for the new width. The
  input of a LayerNorm is measured after the normalization (each value weighed by 1 / (var + eps) of its
  group, ``normalized_error``) when ``norm_percentile=none``.

Under ``max`` and ``mse`` the input of a LayerNorm takes the ``norm_percentile`` (default 99) of |x|: on a
random-init DeiT-tiny the residual stream carries a class token 30x smaller than the patch tokens, which a
per-tensor range set by the patch tokens leaves a few codes wide (plain cosine to float 0.89 with max
everywhere, 0.93 with the weighed mse range, 0.966 with max elsewhere and 0.967 with mse elsewhere; on the
trained tiny ViT all are within 0.05 points of float; benchmarks/RESULTS.md, "Calibration methods"). Not
measured: a pretrained transformer, whose few outlier channels in the residual stream a 99th-percentile clip
would cut (``norm_percentile=none`` is the option then).

``tables=mse`` (or ``max``) gives the input quantizer of every lookup table (SiLU, GELU, ...) that method
whatever ``method`` is: on the trained EfficientNet-B0 below, max elsewhere with mse table inputs measured
70.4 % against 70.0 % with max everywhere (3000 test images, one run); not the default yet (MobileNetV3 and
the transformers not measured with it).

``max`` is the default: on the trained EfficientNet-B0 (Fashion-MNIST, w8a8) mse ranges cost 1.8 points of
top-1 against max (68.2 vs 70.0 % on 3000 test images, float 71.2), while on DemoNet mse gains 0.2-0.4
points at w4a4 and aqt; ``method=mse`` is the option for low-bit policies. Searches that train (AQT, BSQ,
APoT) re-calibrate with the max rule inside their trainer.

It refuses a range that is zero or not finite (an activation that is always zero cannot be given a scale)
and names the quantizer.

The forward passes run at one torch thread whatever the pool size, so the ranges (and the ONNX bytes of a
post-training compile) do not depend on the thread count; max, the k-th value, the EMA and the histogram's
counts are order-independent or sequential, so nothing else does either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from tqdm import tqdm

from qcompile.ir.meta import Stage
from qcompile.passes.base import (
    Pass,
    PassContext,
    PassResult,
    PreconditionError,
    QCompileError,
    option,
    register_pass,
)
from qcompile.quant import graph, integer_sim
from qcompile.quant.histogram import Weigh
from qcompile.quant.layernorm import ChannelLayerNorm
from qcompile.quant.tables import TableFunction
from qcompile.threads import fixed_threads


class CalibrationError(QCompileError):
    pass


METHODS = ("max", "percentile", "mse")
DEFAULT_METHOD = "max"
DEFAULT_NORM_PERCENTILE = 99.0  # max and mse: the inputs of LayerNorms (benchmarks/RESULTS.md, "Calibration")
DEFAULT_PERCENTILE = 99.99


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


def normalized_error(gm: fx.GraphModule, node: fx.Node) -> Weigh | None:
    """For a quantizer a LayerNorm reads: weigh each value by 1 / (var + eps) of its normalized group.

    LayerNorm divides every group (a token's features) by its standard deviation sigma, so an error e in
    the input reaches the output as about gamma e / sigma: the error to minimise is sum e^2 / sigma^2, which
    favours the groups of small spread (in a transformer, the class token the head reads)."""
    for user in node.users:
        ln = graph.module(gm, user)
        if isinstance(ln, nn.LayerNorm) and user.args and user.args[0] is node:
            dims = (1,) if isinstance(ln, ChannelLayerNorm) else tuple(range(-len(ln.normalized_shape), 0))
            eps = float(ln.eps)
            return lambda x: 1.0 / (x.double().var(dim=dims, unbiased=False, keepdim=True) + eps)
    return None


def _feeds_table(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether the quantizer ``node`` is the input of a lookup-table function (SiLU, GELU, ...)."""
    return any(isinstance(graph.module(gm, user), TableFunction) for user in node.users)


@register_pass
@dataclass(frozen=True)
class Calibrate(Pass):
    name = "calibrate"
    summary = "calibrate activation ranges (EMA of batch max|x|, or of a percentile, or the least expected-error clip)"
    requires = (Stage.QUANT,)

    steps: int = option(32, "number of calibration batches")
    momentum: float = option(0.1, "EMA coefficient c in amax <- (1-c)*amax + c*stat (max, percentile)")
    percentile: float | None = option(None, "method=percentile: this percentile of |x| (default 99.99); given "
                                            "alone it selects method=percentile")
    method: str | None = option(None, f"max | percentile | mse (least expected squared error clip at the "
                                      f"quantizer's bits); none: percentile if percentile= is given, else "
                                      f"{DEFAULT_METHOD}")

    norm_percentile: float | None = option(DEFAULT_NORM_PERCENTILE, "max, mse: a LayerNorm's input takes this "
                                           "percentile of |x| instead (none: the method's range; under mse its "
                                           "error weighed by 1/var); percentile ignores it")

    tables: str | None = option(None, "max | mse: the method of a lookup table's input quantizer (none: method)")

    def __post_init__(self) -> None:
        method = self.chosen_method
        if method not in METHODS:
            raise PreconditionError(f"calibrate method must be one of {', '.join(METHODS)}, got '{method}'")
        if self.tables is not None and self.tables not in ("max", "mse"):
            raise PreconditionError(f"calibrate tables must be max or mse, got '{self.tables}'")
        if self.percentile is not None and method != "percentile":
            raise PreconditionError(f"calibrate percentile={self.percentile} applies to method=percentile only, "
                                    f"not method={method}; drop one of them")
        for key in ("percentile", "norm_percentile"):
            value = getattr(self, key)
            if value is not None and not 0.0 < value <= 100.0:
                raise PreconditionError(f"calibrate {key} must lie in (0, 100], got {value}")

    @property
    def chosen_method(self) -> str:
        if self.method is not None:
            return self.method
        return "percentile" if self.percentile is not None else DEFAULT_METHOD

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        quants = list(graph.act_quants(gm))
        method = self.chosen_method
        percentile = (self.percentile or DEFAULT_PERCENTILE) if method == "percentile" else None
        for node, q in quants:
            weigh = normalized_error(gm, node) if method != "percentile" else None
            if weigh is not None and self.norm_percentile is not None:  # a LayerNorm's input, under max or mse
                q.start_observing("percentile", self.momentum, self.norm_percentile)
            elif self.tables is not None and _feeds_table(gm, node):
                q.start_observing(self.tables, self.momentum)
            else:
                q.start_observing(method, self.momentum, percentile, weigh if method == "mse" else None)
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
        with fixed_threads(1):
            for _node, q in quants:
                q.stop_observing()
        for node, q in quants:
            _check_range(node, q)
        graph.bind_input_scales(gm)  # from here on the layers' biases sit on the int32 accumulator grid
        integer_sim.bind_simulation(gm)  # and LayerNorm, softmax and constants compute the integer graph's values
        return PassResult(gm, True)
