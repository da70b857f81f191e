"""A user-written pass: keep layers with an extreme weight range at 8 bits.

Per-channel symmetric quantization spends its levels on max|W|; when a channel's max|W| is many times
its typical magnitude (median |W|), 4 bits leave most weights at zero. This pass runs after
assign-bitwidths and raises such layers (weights and their input activation) back to 8 bits.

Run: python examples/custom_pass.py
"""

from dataclasses import dataclass

import torch
import torch.fx as fx

import qcompile
from qcompile.passes.base import option
from qcompile.quant import graph


@qcompile.register_pass
@dataclass(frozen=True)
class KeepExtremeLayers8Bit(qcompile.Pass):
    name = "keep-extreme-8bit"
    summary = "8-bit weights for layers whose max|W| / median|W| exceeds a ratio"
    requires = (qcompile.Stage.QUANT,)

    ratio: float = option(8.0, "max|W| / median|W| above which a layer keeps 8 bits")

    def run(self, gm: fx.GraphModule, ctx: qcompile.PassContext) -> qcompile.PassResult:
        modified = False
        for node, layer in graph.layers(gm):
            w = layer.weight.detach().abs()
            if float(w.max() / w.median().clamp_min(1e-12)) > self.ratio and layer.weight_quant.bits < 8:
                layer.weight_quant.bits = 8
                for root in graph.roots(gm, node.args[0]):
                    gm.get_submodule(str(root.target)).bits = 8
                modified = True
        return qcompile.PassResult(gm, modified)


def main() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 10)).eval()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = 25.0  # one outlier makes conv 0 "extreme"
    x = torch.rand(16, 1, 8, 8)
    pipeline = ("canonicalize,fold-batchnorm,insert-quantizers,calibrate,assign-bitwidths{policy=w4a4},"
                "keep-extreme-8bit{ratio=8.0},share-scales,lower-integer")
    cm = qcompile.compile(model, x[:1], data=lambda: [x], pipeline=pipeline)
    for layer in cm.layer_costs():
        print(f"{layer.name}: w{layer.w_bits}a{layer.a_bits}")
    assert [c.w_bits for c in cm.layer_costs()] == [8, 4]
    assert cm.verify(x).mismatches == 0


if __name__ == "__main__":
    main()
