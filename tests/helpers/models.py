"""Small models the tests share, and curvopt's default grouping of their parameters."""

from __future__ import annotations

import torch
from torch import nn


class TiedMLP(nn.Module):
    """y = head(tanh(W tanh(W x))): one square weight used twice (tied), counted once."""

    def __init__(self, d: int = 5, classes: int = 3):
        super().__init__()
        self.first = nn.Linear(d, d)
        self.second = nn.Linear(d, d)
        self.second.weight = self.first.weight  # tie
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.second(torch.tanh(self.first(x)))))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3))


def bn_cnn(dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(3 * 3 * 3, 4),
    )


class LayerNormGELU(nn.Module):
    """Linear → affine LayerNorm → GELU → Linear: the case where torch.func.hessian is wrong on torch 2.15."""

    def __init__(self, d_in: int = 5, width: int = 6, classes: int = 3):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, classes)

    def forward(self, x):
        return self.out(nn.functional.gelu(self.norm(self.inp(x))))


class TinyAttention(nn.Module):
    """One self-attention head over T tokens (scaled_dot_product_attention), pre-LayerNorm, mean-pooled head."""

    def __init__(self, d: int = 4, classes: int = 3):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):  # x: [B, T, d]
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        h = x + self.proj(nn.functional.scaled_dot_product_attention(q, k, v))
        return self.head(h.mean(1))


def layer_params(model: nn.Module) -> dict[str, list[str]]:
    """curvopt's default grouping as {layer: parameter names}, for dense references."""
    from curvopt import group_parameters

    return {layer.name: list(layer.param_names) for layer in group_parameters(model)}
