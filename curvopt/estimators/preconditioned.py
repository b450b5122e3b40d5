r"""The top eigenvalue of a preconditioned Hessian, D H D, by Lanczos with a warm start.

An optimizer whose update is θ ← θ − η P⁻¹ g (Adam: P = diag(√v̂) + ε; SGD: P = I) is stable on a quadratic
only while the top eigenvalue of η P⁻¹ H stays below a threshold set by its momentum (Cohen et al., "Adaptive
Gradient Methods at the Edge of Stability", 2022). η P⁻¹ H is not symmetric, but M = D H D with
D = diag(√(η/P)) is, and has the same spectrum, so Lanczos needs only Hessian-vector products. A few steps
started from the previous call's top Ritz vector follow a top eigenvector that moves slowly along training.
Lanczos (with full reorthogonalisation) rather than power iteration: power iteration converges to the
eigenvalue of largest *magnitude*, which early in training is often a negative one; the largest Ritz value of
the Krylov space approaches λ_max from below whatever the negative part of the spectrum. A λ_max ≤ 0 (no
positive curvature found) is reported as 0: no step-size limit.
"""

from __future__ import annotations

import math

import torch

from ..engine.operator import CurvatureOperator
from .spectra import lanczos_basis, tridiagonal_eig

Tensors = list[torch.Tensor]


def preconditioned_top_eigenpair(
    operator: CurvatureOperator,
    scale: Tensors,
    *,
    start: Tensors | None = None,
    iterations: int = 3,
    generator: torch.Generator | None = None,
) -> tuple[float, Tensors]:
    """``(λ, v)``: the top eigenvalue of M = D H D (D = ``diag(scale)``, per tensor of ``operator.params``) and its
    unit Ritz vector after ``iterations`` Lanczos steps from ``start`` (a Gaussian direction when ``None``).

    Cost: ``iterations`` Hessian-vector products on the operator's batch.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if len(scale) != len(operator.params):
        raise ValueError(f"scale has {len(scale)} tensors, the operator {len(operator.params)}")
    d = operator.flatten([s.unsqueeze(0) for s in scale])[0].double()
    if start is None:
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        q = torch.randn(d.numel(), generator=g, dtype=torch.float64).to(d.device)
    else:
        q = operator.flatten([t.unsqueeze(0) for t in start])[0].double()
    if not float(q.norm()) > 0:
        raise ValueError("the start direction is zero")

    def matvec(x: torch.Tensor) -> torch.Tensor:  # D H D x on flat float64 coordinates
        h, _ = operator.matvec(operator.unflatten((d * x).unsqueeze(0).float()))
        return d * operator.flatten(h)[0].double()

    alpha, beta, basis = lanczos_basis(matvec, q, iterations)
    values, vectors = tridiagonal_eig(alpha, beta)
    top = float(values[-1])
    ritz = basis.T @ vectors[:, -1].to(basis.device)
    vector = [v[0] for v in operator.unflatten(ritz.unsqueeze(0).float())]
    return (max(top, 0.0) if math.isfinite(top) else math.nan), vector
