"""Dense float64 references: the exact Hessian, Gauss-Newton and tensor parts of a small model's train-mode loss,
and the exact variance of the Hutchinson estimators built from them."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel


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
