"""Small reference models for the demo, the tests and the benchmarks (CPU-sized)."""

from __future__ import annotations

import torch
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


def mnist_cnn(num_classes: int = 10, channels: int = 1, width: int = 32, hidden: int = 256) -> nn.Sequential:
    """A CPU-sized CNN with the capacity to memorise thousands of random labels: a 5×5 stride-2 conv,
    max-pool, and a two-layer classifier (28×28 inputs: 405k parameters)."""
    return nn.Sequential(
        nn.Conv2d(channels, width, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(width * 7 * 7, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the (projected) input, then ReLU: a ResNet basic block."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A BatchNorm ResNet for 28-32 px images: stem, three stages of one basic block (width, 2w, 4w), head.

    ``stem_stride=2`` halves the resolution in the stem (a quarter of the compute), as a CPU budget allows.
    """

    def __init__(self, num_classes: int = 10, channels: int = 3, width: int = 16, stem_stride: int = 1):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(channels, width, 3, stride=stem_stride, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.layer3 = BasicBlock(2 * width, 4 * width, stride=2)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.head(h.mean((2, 3)))


def small_resnet(num_classes: int = 10, channels: int = 3, width: int = 16, stem_stride: int = 1) -> SmallResNet:
    return SmallResNet(num_classes, channels, width, stem_stride)
