"""A model file for the command line: `qcompile compile examples/tiny_model.py:make_model ...`."""

import torch.nn.functional as F
from torch import nn


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.reshape(x.size(0), -1))


def make_model() -> nn.Module:
    """Factory called by the CLI; load trained weights with --weights."""
    return TinyNet()
