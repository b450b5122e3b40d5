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


class ResNet20(nn.Module):
    """The CIFAR ResNet-20 layout (He et al. 2016): a stem, three stages of three basic blocks (width, 2w, 4w),
    global pooling, a linear head; 43 parameter-owning layers (convolutions, BatchNorms, two projections, head)."""

    def __init__(self, num_classes: int = 10, channels: int = 3, width: int = 16, blocks: int = 3):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        stages, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            stages.append(
                nn.Sequential(
                    *[
                        BasicBlock(cin if b == 0 else cout, cout, stride=2 if (b == 0 and i) else 1)
                        for b in range(blocks)
                    ]
                )
            )
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.head(h.mean((2, 3)))


def resnet20(num_classes: int = 10, channels: int = 3, width: int = 16) -> ResNet20:
    return ResNet20(num_classes, channels, width)


def vgg11(num_classes: int = 10, channels: int = 3, width: int = 16) -> nn.Sequential:
    """VGG-11 with BatchNorm, widths scaled by ``width`` (64 → ``width``): 8 conv-BN-ReLU layers in five stages,
    max-pooling between them (padded, so 14-px inputs survive), a linear head; 17 parameter-owning layers."""
    plan = [1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8]
    layers: list[nn.Module] = []
    cin = channels
    for item in plan:
        if item == "M":
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
            continue
        cout = int(item) * width
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes))


class _ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        h = h + self.proj(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))
        return h + self.fc2(nn.functional.gelu(self.fc1(self.norm2(h))))


class SmallViT(nn.Module):
    """A ViT for small images (GELU, pre-LayerNorm, a class token, learned positions): ``patch`` px patches of a
    ``size`` px image, ``depth`` blocks of width ``dim``."""

    def __init__(
        self,
        num_classes: int = 10,
        channels: int = 3,
        size: int = 14,
        patch: int = 2,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp: int = 128,
    ) -> None:
        super().__init__()
        tokens = (size // patch) ** 2
        self.embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*[_ViTBlock(dim, heads, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls_token.expand(len(h), -1, -1), h], dim=1) + self.pos
        return self.head(self.norm(self.blocks(h))[:, 0])


def small_vit(num_classes: int = 10, channels: int = 3, size: int = 14) -> SmallViT:
    return SmallViT(num_classes, channels, size)
