"""Quant-stage modules: quantizers that simulate the integer graph in float (fake quantization)."""

from qcompile.quant.modules import ActQuant, QConv2d, QLinear, WeightQuant, fake_quant

__all__ = ["ActQuant", "QConv2d", "QLinear", "WeightQuant", "fake_quant"]
