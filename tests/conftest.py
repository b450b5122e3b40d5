"""Shared test helpers: dense Hessian / GGN references computed independently with torch.func."""

from __future__ import annotations

import copy
import os

# One intra-op thread per test process, set before torch loads its thread pool. pytest-xdist runs
# two test processes (pyproject.toml), and DDP workers and CLI subprocesses inherit this: on a busy
# 2-core machine, spinning OpenMP teams of several threads per process slow the suite down 3-4x.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from dataclasses import dataclass

import pytest
import torch

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
from torch import nn  # noqa: E402
from torch.func import functional_call, hessian, jacrev  # noqa: E402

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@dataclass
class DenseCurvature:
    """Dense H, G = Jᵀ H_out J and per-layer coordinate slices."""

    H: torch.Tensor
    G: torch.Tensor
    slices: dict[str, slice]

    def block(self, A: torch.Tensor, a: str, b: str | None = None) -> torch.Tensor:
        return A[self.slices[a], self.slices[b or a]]

    def rows(self, A: torch.Tensor, a: str) -> torch.Tensor:
        return A[self.slices[a], :]

    @property
    def T(self) -> torch.Tensor:  # tensor part
        return self.H - self.G


def dense_curvature(model: nn.Module, loss_fn, batch, layer_params: dict[str, list[str]]) -> DenseCurvature:
    """Exact curvature of the train-mode loss (batch statistics) in float64.

    Independent of curvopt's machinery: a deep copy in float64 whose norm layers are built to use
    batch statistics (``track_running_stats=False`` and no buffers, i.e. the textbook train-mode
    function), differentiated by ``torch.func.hessian`` / ``jacrev`` w.r.t. a flat vector.
    """
    ref = copy.deepcopy(model).double().train()
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
    x, y = batch
    x = x.double() if x.is_floating_point() else x
    names = [n for ps in layer_params.values() for n in ps]
    named = dict(ref.named_parameters(remove_duplicate=False))
    tensors = [named[n].detach() for n in names]
    sizes = [t.numel() for t in tensors]
    flat = torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(v):
        parts = torch.split(v, sizes)
        return {n: p.view_as(t) for n, p, t in zip(names, parts, tensors)}

    def outputs(v):
        return functional_call(ref, unflatten(v), (x,))

    def loss(v):
        return loss_fn(outputs(v), y)

    H = hessian(loss)(flat)
    out = outputs(flat).detach()
    J = jacrev(outputs)(flat).reshape(out.numel(), -1)
    H_out = hessian(lambda o: loss_fn(o.view_as(out), y))(out.reshape(-1))
    G = J.T @ H_out @ J
    slices, start = {}, 0
    for layer, ps in layer_params.items():
        n = sum(named[p].numel() for p in ps)
        slices[layer] = slice(start, start + n)
        start += n
    return DenseCurvature(H=H.detach(), G=G.detach(), slices=slices)


def rademacher_variance(A: torch.Tensor, dense: DenseCurvature, layer: str) -> float:
    """Var(z_lᵀ(Az)_l) = 2 Σ_{i≠j∈l} (A_ll)_ij² + Σ_{m≠l} ‖A_lm‖_F² (A symmetric)."""
    blk = dense.block(A, layer)
    off = (blk.square().sum() - blk.diagonal().square().sum()) * 2
    rows = dense.rows(A, layer).square().sum() - blk.square().sum()
    return float(off + rows)


def gaussian_variance(A: torch.Tensor, dense: DenseCurvature, layer: str) -> float:
    """Var(z_lᵀ(Az)_l) = 2 ‖A_ll‖_F² + Σ_{m≠l} ‖A_lm‖_F² (A symmetric)."""
    blk = dense.block(A, layer)
    return float(2 * blk.square().sum() + dense.rows(A, layer).square().sum() - blk.square().sum())


def variance_se(samples: torch.Tensor) -> tuple[float, float]:
    """Sample variance of i.i.d. values and its standard error sqrt((m4 − s⁴)/n)."""
    n = samples.numel()
    centred = samples - samples.mean()
    s2 = float(centred.square().sum() / (n - 1))
    m4 = float(centred.pow(4).mean())
    return s2, ((m4 - s2**2) / n) ** 0.5


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


@pytest.fixture
def mlp_problem():
    torch.manual_seed(0)
    model = mlp()
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    return model, nn.CrossEntropyLoss(), (x, y)


@pytest.fixture
def cnn_problem():
    torch.manual_seed(1)
    model = bn_cnn()
    # some steps so BN running stats differ from batch stats (makes the train/eval difference real)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 2, 5, 5) * 2 + 1)
    x, y = torch.randn(8, 2, 5, 5), torch.randint(0, 4, (8,))
    return model, nn.CrossEntropyLoss(), (x, y)
