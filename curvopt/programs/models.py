"""Small reference models used by the demo, the benchmarks and the tests."""

from __future__ import annotations

from torch import nn


def small_cnn(num_classes: int = 10, channels: int = 3, width: int = 16) -> nn.Sequential:
    """conv-BN-ReLU-pool ×2, then a linear classifier; layers ``0,1,4,5,9`` own parameters."""
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.BatchNorm2d(2 * width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * width, num_classes),
    )
