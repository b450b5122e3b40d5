"""Shared test helpers: dense Hessian / GGN references in float64 (double backward), small models."""

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
from torch.func import functional_call  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

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


def _to_double(obj):
    """Floating tensors (also inside tuples, lists and dicts) as float64; everything else as it is."""
    if isinstance(obj, torch.Tensor):
        return obj.double() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _to_double(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_double(v) for v in obj)
    return obj


def dense_curvature(model: nn.Module, loss_fn, batch, layer_params: dict[str, list[str]], forward=None):
    """Exact curvature of the train-mode loss (batch statistics) in float64.

    Independent of curvopt's machinery: a deep copy in float64 whose norm layers are built to use
    batch statistics (``track_running_stats=False`` and no buffers, i.e. the textbook train-mode
    function), differentiated by ``torch.autograd.functional.hessian`` / ``jacobian`` (double backward)
    with respect to a flat vector. Not ``torch.func.hessian``: on torch 2.15 it is wrong through an
    affine LayerNorm (test_losses.py checks this reference against finite differences).
    """
    ref = copy.deepcopy(model).double().train()
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
    ref_loss = copy.deepcopy(loss_fn).double() if isinstance(loss_fn, nn.Module) else loss_fn
    x, y = _to_double(batch[0]), _to_double(batch[1])
    names = [n for ps in layer_params.values() for n in ps]
    named = dict(ref.named_parameters(remove_duplicate=False))
    tensors = [named[n].detach() for n in names]
    sizes = [t.numel() for t in tensors]
    flat = torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(v):
        parts = torch.split(v, sizes)
        return {n: p.view_as(t) for n, p, t in zip(names, parts, tensors)}

    def outputs(v):
        if forward is None:
            return functional_call(ref, unflatten(v), (x,))
        with torch.nn.utils.stateless._reparametrize_module(ref, unflatten(v), tie_weights=True):  # as functional_call
            return forward(ref, x)

    def loss(v):
        return ref_loss(outputs(v), y)

    with sdpa_kernel([SDPBackend.MATH]):  # fused attention kernels have no double backward
        H = torch.autograd.functional.hessian(loss, flat)
        out = outputs(flat).detach()
        J = torch.autograd.functional.jacobian(outputs, flat).reshape(out.numel(), -1)
    H_out = torch.autograd.functional.hessian(lambda o: ref_loss(o.view_as(out), y), out.reshape(-1))
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
