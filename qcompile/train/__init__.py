"""Quantization-aware training shared by every learned search."""

from qcompile.train.trainer import EpochLog, QuantTrainer, TrainConfig, TrainError

__all__ = ["EpochLog", "QuantTrainer", "TrainConfig", "TrainError"]
