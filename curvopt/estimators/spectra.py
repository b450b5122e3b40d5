r"""Per-layer Hessian spectra: Lanczos top eigenvalues, stable rank and SLQ spectral density.

For a layer's diagonal block H_ll (d_l × d_l, applied as restricted products, never formed):

* **Lanczos** with full reorthogonalisation, m steps from a random unit start q₁, builds
  Q_mᵀ H_ll Q_m = T_m (tridiagonal). Its eigenvalues (Ritz values) approximate the extreme
  eigenvalues first; m = d_l gives all of them exactly (in exact arithmetic). Top-k eigenvalues
  are the k largest Ritz values; ‖H_ll‖₂ ≈ max |Ritz|. 2/λ_max bounds a stable step for the layer.
* **Stochastic Lanczos quadrature**: for n_v Rademacher starts v (q₁ = v/√d), the eigenpairs
  (θ_j, s_j) of T_m give nodes θ_j with weights τ_j = s_{1j}²; the spectral density is
  approximated by φ(λ) ≈ (1/n_v) Σ_v Σ_j τ_j δ(λ − θ_j) (weights sum to 1 per start, so it
  integrates to 1). Gauss quadrature is exact for polynomials of degree ≤ 2m − 1, hence
  ∫λ dφ = (1/n_v) Σ vᵀH v/d and ∫λ² dφ = (1/n_v) Σ ‖H v‖²/d: the Hutchinson estimates of
  tr(H)/d and tr(H²)/d.
* **Stable rank** D_l = ‖H_ll‖_F² / ‖H_ll‖₂², with ‖H_ll‖_F² = tr(H_ll²) from the SLQ second moment
  and ‖H_ll‖₂ from Lanczos.

``whole_model=True`` adds the same for the full Hessian under the name ``"(model)"``.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..engine.batch import Forward
from ..engine.layers import Layer, LayerSpec
from ..engine.operator import CurvatureOperator, curvature_operator
from .result import Spectrum

MODEL = "(model)"
Matvec = Callable[[torch.Tensor], torch.Tensor]


def lanczos(matvec: Matvec, start: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha, beta)`` of T_m from ``start`` (float64, [d]); full reorthogonalisation, stops early
    on an invariant subspace (β ≈ 0)."""
    alpha, beta, _ = lanczos_basis(matvec, start, steps)
    return alpha, beta


def lanczos_basis(matvec: Matvec, start: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`lanczos` and its orthonormal Krylov basis ``[m, d]``, for Ritz vectors (``basis.T @ eigenvector``)."""
    d = start.numel()
    steps = min(steps, d)
    q = start / start.norm()
    basis = [q]
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(steps):
        w = matvec(q)
        alpha = float(torch.dot(w, q))
        alphas.append(alpha)
        Q = torch.stack(basis)
        w = w - Q.T @ (Q @ w)  # full reorthogonalisation (twice is enough)
        w = w - Q.T @ (Q @ w)
        beta = float(w.norm())
        if j == steps - 1 or beta <= 1e-10 * max(1.0, abs(alpha)):
            break
        betas.append(beta)
        q = w / beta
        basis.append(q)
    alpha_t, beta_t = torch.tensor(alphas, dtype=torch.float64), torch.tensor(betas, dtype=torch.float64)
    return alpha_t, beta_t, torch.stack(basis[: len(alphas)])


def tridiagonal_eig(alpha: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric tridiagonal T(alpha, beta)."""
    t = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    return torch.linalg.eigh(t)


def block_operator(op: CurvatureOperator, layer: int | None) -> tuple[Matvec, int]:
    if layer is None:
        shapes = [p.shape for p in op.params]
        sizes = [p.numel() for p in op.params]

        def full(x: torch.Tensor) -> torch.Tensor:
            parts = torch.split(x.float(), sizes)
            h, _ = op.matvec([t.reshape(1, *s).to(op.params[0].device) for t, s in zip(parts, shapes)])
            return torch.cat([t.reshape(-1) for t in h]).double().cpu()

        return full, op.dim

    def block(x: torch.Tensor) -> torch.Tensor:
        return op.block_matvec(layer, x.float()[None].to(op.params[0].device))[0].double().cpu()

    return block, op.blocks[layer].numel


def _spectrum(
    matvec: Matvec, name: str, d: int, *, steps: int, top_k: int, slq_probes: int, slq_steps: int, g: torch.Generator
) -> Spectrum:
    alpha, beta = lanczos(matvec, torch.randn(d, generator=g, dtype=torch.float64), steps)
    ritz, _ = tridiagonal_eig(alpha, beta)
    nodes, weights = [], []
    for _ in range(slq_probes):
        v = torch.randint(0, 2, (d,), generator=g).double().mul_(2).sub_(1)
        a, b = lanczos(matvec, v, slq_steps)
        theta, vecs = tridiagonal_eig(a, b)
        m = max(slq_steps, 1)
        pad = m - theta.numel()  # an early stop (invariant subspace) gives fewer nodes: pad with zero weight
        nodes.append(torch.cat([theta, torch.zeros(pad, dtype=torch.float64)]))
        weights.append(torch.cat([vecs[0].pow(2), torch.zeros(pad, dtype=torch.float64)]))
    empty = torch.zeros(0, max(slq_steps, 1), dtype=torch.float64)
    return Spectrum(
        name, d, ritz, torch.stack(nodes) if nodes else empty, torch.stack(weights) if weights else empty, top_k
    )


def layer_spectrum(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch: tuple[object, object],
    *,
    layers: LayerSpec | Sequence[Layer] | None = None,
    top_k: int = 1,
    steps: int = 30,
    slq_probes: int = 4,
    slq_steps: int = 30,
    whole_model: bool = False,
    only: Sequence[str] | None = None,
    generator: torch.Generator | None = None,
    strategy: str = "auto",
    forward: Forward | None = None,
) -> dict[str, Spectrum]:
    """Lanczos top eigenvalues, stable rank and SLQ density per layer block (and of the whole H).

    Cost: per block, ``steps + slq_probes · slq_steps`` products (restricted to the block).
    ``only`` limits the layers analysed. Deterministic under ``generator``.
    """
    if steps < 1 or top_k < 1 or slq_probes < 0 or slq_steps < 2:
        raise ValueError("need steps >= 1, top_k >= 1, slq_probes >= 0 and slq_steps >= 2")
    if generator is None:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    out: dict[str, Spectrum] = {}
    with curvature_operator(
        model, loss_fn, batch, layers=layers, generator=generator, strategy=strategy, forward=forward
    ) as op:
        wanted = op.layers if only is None else list(only)
        unknown = [n for n in wanted if n not in op.layers]
        if unknown:
            raise ValueError(f"unknown layer(s) {unknown}; layers are {op.layers}")
        settings = dict(steps=steps, top_k=top_k, slq_probes=slq_probes, slq_steps=slq_steps, g=generator)
        for name in wanted:
            matvec, d = block_operator(op, op.layers.index(name))
            out[name] = _spectrum(matvec, name, d, **settings)
        if whole_model:
            matvec, d = block_operator(op, None)
            out[MODEL] = _spectrum(matvec, MODEL, d, **settings)
    return out
