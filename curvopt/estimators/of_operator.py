r"""Estimators as pure functions of a :class:`~curvopt.engine.operator.CurvatureOperator` and a generator.

Open an operator once (``with curvopt.curvature_operator(model, loss_fn, batch, gn=True) as op:``) and ask it
for what you need; every function here only applies ``op`` to directions it draws from ``generator``:

* :func:`layer_traces` — Hutchinson (Hutchinson, "A stochastic estimator of the trace of the influence matrix for
  Laplacian smoothing splines", 1989): with Rademacher probes z, E[z_lᵀ (Hz)_l] = tr(H_ll) for every layer l from
  the same products; the standard error is the sample SD over the K probes / √K. With ``gn=True`` the same probes
  give tr(G_ll) from the Gauss-Newton products.
* :func:`layer_diagonals` — the diagonal of each layer's block, E[z ⊙ Hz] = diag(H) (Bekas, Kokiopoulou & Saad,
  "An estimator for the diagonal of a matrix", 2007), per coordinate, with its standard error.
* :func:`layer_top_eigenvalues` — λ_max(H_ll) of each layer's block by ``steps`` Lanczos iterations on H_ll alone
  (the largest Ritz value; Lanczos 1950), the rest of the network held fixed.

The per-layer estimates of :func:`curvopt.estimate_curvature` (traces, GN traces, GN-Gap, Frobenius norms) and
:mod:`curvopt.estimators.spectra` / :mod:`curvopt.estimators.blocks` use the same operator; these three are the small
building blocks for a user's own estimator.
"""

from __future__ import annotations

import torch

from ..engine.operator import CurvatureOperator
from ..engine.probes import sample_probes
from .result import LayerEstimate, mean_and_se
from .spectra import block_operator, lanczos, tridiagonal_eig


def _probe_rows(op: CurvatureOperator, probes: int, generator: torch.Generator | None, gn: bool):
    """For each chunk of probes: the probes z, H z and (``gn``; else ``None``) G z, as ``[k, d_l]`` per layer
    (float64, CPU)."""
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    done = 0
    while done < probes:
        k = min(op.chunk_size, probes - done)
        z = sample_probes(op.params, k, "rademacher", generator)
        h, g = op.matvec(z)
        if gn and g is None:
            raise ValueError("Gauss-Newton estimates need the operator opened with gn=True")
        for index, name in enumerate(op.layers):
            z_l, h_l = (op.restrict(index, t).double().cpu() for t in (z, h))
            yield name, (z_l, h_l, op.restrict(index, g).double().cpu() if gn else None)
        done += k


def layer_traces(
    op: CurvatureOperator, probes: int = 8, *, generator: torch.Generator | None = None, gn: bool = False
) -> LayerEstimate | tuple[LayerEstimate, LayerEstimate]:
    """Hutchinson's tr(H_ll) per layer (and, with ``gn``, tr(G_ll) from the same probes: a pair)."""
    samples: dict[str, list[torch.Tensor]] = {}
    gn_samples: dict[str, list[torch.Tensor]] = {}
    for name, (z, hz, gz) in _probe_rows(op, probes, generator, gn):
        samples.setdefault(name, []).append((z * hz).sum(1))
        if gn:
            gn_samples.setdefault(name, []).append((z * gz).sum(1))

    def summarise(table: dict[str, list[torch.Tensor]]) -> LayerEstimate:
        stats = {name: mean_and_se(torch.cat(parts)) for name, parts in table.items()}
        return LayerEstimate(
            {n: float(m) for n, (m, _) in stats.items()}, {n: float(s) for n, (_, s) in stats.items()}, probes
        )

    return (summarise(samples), summarise(gn_samples)) if gn else summarise(samples)


def layer_diagonals(
    op: CurvatureOperator, probes: int = 8, *, generator: torch.Generator | None = None
) -> LayerEstimate:
    """diag(H_ll) per layer (flat coordinates, float64), E[z ⊙ Hz], with per-coordinate standard errors."""
    samples: dict[str, list[torch.Tensor]] = {}
    for name, (z, hz, _) in _probe_rows(op, probes, generator, False):
        samples.setdefault(name, []).append(z * hz)
    stats = {name: mean_and_se(torch.cat(parts)) for name, parts in samples.items()}
    return LayerEstimate({n: m for n, (m, _) in stats.items()}, {n: s for n, (_, s) in stats.items()}, probes)


def layer_top_eigenvalues(
    op: CurvatureOperator, steps: int = 20, *, generator: torch.Generator | None = None
) -> dict[str, float]:
    """λ_max(H_ll) per layer: the largest Ritz value after ``steps`` Lanczos steps (at most d_l) on H_ll."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    top = {}
    for index, name in enumerate(op.layers):
        block, d = block_operator(op, index)
        alpha, beta = lanczos(block, torch.randn(d, generator=generator, dtype=torch.float64), steps)
        ritz, _ = tridiagonal_eig(alpha, beta)
        top[name] = float(ritz.max())
    return top
