r"""Per-layer Hutchinson estimates of Hessian, Gauss-Newton and tensor-part curvature.

With probes z⁽¹⁾…z⁽ᴷ⁾ over *all* P coordinates and one product u = Hz per probe, every layer
l reads its own estimate from the same product:

    T̂_l = (1/K) Σ_k z_lᵀ (H z)_l,        E[T̂_l] = tr H_ll,

because E[z_lᵀ H_lm z_m] = 0 for l ≠ m. All L traces cost K products, not K·L. The price is
extra variance from the off-diagonal blocks; per probe, at fixed H,

    Rademacher:  Var = 2 Σ_{i≠j∈l} (H_ll)_ij² + Σ_{m≠l} ‖H_lm‖_F²
    Gaussian:    Var = 2 ‖H_ll‖_F²            + Σ_{m≠l} ‖H_lm‖_F²

and the reported standard error is the sample standard deviation of the K per-probe values
over √K. The same probes give the Gauss-Newton trace (z_lᵀ(Gz)_l), the tensor-part trace
(z_lᵀ(Hz − Gz)_l, exact per probe) and unbiased squared Frobenius norms of the *row blocks*
E‖(Az)_l‖² = ‖A_{l,:}‖_F² for A ∈ {H, G, Hᵀ}.

``gn_gap`` is the Frobenius ratio of “Inter-Layer Hessian Analysis of Neural Networks with DAG
Architectures” (arXiv, 2026) restricted to a layer's row block,
``gn_gap[l] = ‖Hᵀ_{l,:}‖_F / ‖G_{l,:}‖_F`` (a ratio of the two unbiased squared-norm means);
the model total is ‖Hᵀ‖_F / ‖G‖_F. The trace form ``gn_gap_trace[l] = tr Hᵀ_ll / tr G_ll`` is
reported beside it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..engine.batch import Forward
from ..engine.context import resolve_curvature_dtype
from ..engine.layers import Layer, LayerSpec
from ..engine.operator import CurvatureOperator, curvature_operator
from ..engine.probes import DISTRIBUTIONS, probe_generator, sample_probes
from .deflation import ESTIMATORS, deflated_samples, split_products
from .reductions import layer_index, reduce_chunk
from .result import CurvatureEstimate, NonFiniteCurvatureError


def estimate_curvature(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    batch: tuple[object, object],
    *,
    probes: int = 8,
    gn: bool = True,
    generator: torch.Generator | None = None,
    layers: LayerSpec | Sequence[Layer] | None = None,
    distribution: str = "rademacher",
    strategy: str = "auto",
    chunk_size: int = 4,
    forward: Forward | None = None,
    estimator: str = "hutchinson",
    sketch: int | None = None,
    curvature_dtype: str | torch.dtype | None = None,
    fd_step: float | None = None,
    fd_check: bool = True,
) -> CurvatureEstimate:
    """Estimate per-layer Hessian traces (and, with ``gn``, GN traces and GN-Gap) on one batch.

    The loss is ``loss_fn(model(inputs), targets)`` in training mode with batch statistics,
    one dropout mask per estimate, autocast off; nothing of the model or the caller's state
    is modified (see :mod:`curvopt.engine.context`). Probes are drawn from ``generator`` (pass one
    for reproducible results; ``None`` draws a fresh seed from the OS).

    Args:
        model: the model; DDP/DataParallel/torch.compile wrappers are stripped.
        loss_fn: maps (outputs, targets) to a scalar; any loss (closed-form output Hessians for
            cross-entropy, MSE and BCE-with-logits, reverse-mode differentiation otherwise).
        batch: ``(inputs, targets)``; inputs may be a tensor, a tuple or a dict of tensors.
        probes: K ≥ 1 probes (one Hessian-vector product each, serving every layer).
        gn: also compute Gauss-Newton products on the same probes (GN traces, GN-Gap).
        generator: source of probes and of the dropout-mask seed; probes are drawn on its device (default: a
            fresh generator on the parameters' device).
        layers: custom grouping (see :func:`curvopt.engine.layers.group_parameters`) or prebuilt
            :class:`~curvopt.engine.layers.Layer` objects.
        distribution: ``"rademacher"`` (default) or ``"gaussian"``.
        strategy: ``"auto"`` (exact ``"autograd"`` where it runs, finite differences where no exact strategy
            can: FSDP2-sharded parameters, operations without double backward) or one of ``STRATEGIES``:
            ``"autograd"``, ``"func"``, ``"func-vmap"`` (exact; they differ in speed) and ``"finite-difference"``
            (first derivatives only, one forward+backward per probe; smooth models only, see
            :mod:`curvopt.engine.finite_difference`).
        chunk_size: probes per vmapped call for ``"func-vmap"``.
        forward: ``forward(model, inputs) -> outputs`` when the model is not called as
            ``model(inputs)`` (e.g. ``lambda m, x: m(**x).logits``).
        estimator: ``"hutchinson"`` (K probes), ``"hutch++"`` (the same K products split into a sketch of
            ``sketch`` probes, default K // 3, its products, and K − 2·sketch deflated probes) or ``"xtrace"``
            (K/2 probes serve as sketch and as probes, by leaving each out in turn); see
            :mod:`curvopt.estimators.deflation`.
        curvature_dtype: ``None`` (products in the parameters' dtype under the global backend flags),
            ``"float32"`` (no TF32 while probing), ``"tf32"`` (CUDA TensorFloat-32 matmuls and convolutions)
            or ``"bfloat16"`` (forward and backward passes under bf16 autocast; probes and reductions in
            fp32). The cheaper formats' error is measured in benchmarks/RESULTS.md.
        fd_step: finite differences: the relative step ρ = ‖εz‖/‖θ‖ (``None``: the step a previous
            self-check settled on for this model, else by precision, fp32 1e-4).
        fd_check: finite differences: the self-check, once per model (its step is remembered): the first
            probe at ε, 2ε and 4ε, which shrinks a step too large for the model and warns
            (:class:`~curvopt.FiniteDifferenceWarning`) naming layers and modules where finite differences do
            not estimate the Hessian (kinks, rounding). It costs 2 forward+backward passes per round (≤ 4
            rounds, 1 on the measured smooth families), once; with an explicit ``fd_step`` it checks every
            call and does not change the step.

    On an FSDP2-sharded model (``fully_shard``; ``"auto"`` or ``"finite-difference"``), call it on every
    rank with the same ``generator`` state and each rank's local batch: every rank perturbs its own shards
    along the full probe a single process would draw, and one all-reduce per estimate gives every rank
    the same estimate of the global-batch curvature (Hutchinson only).

    Raises:
        ValueError: bad arguments, no trainable parameters, a non-scalar loss, a batch the
            model cannot take (``CurvatureInputError``, a ``ValueError``).
        FloatingPointError: a non-finite loss, or non-finite products
            (``NonFiniteCurvatureError`` names the layers).
    """
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be an integer >= 1, got {probes!r}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown probe distribution {distribution!r}; expected one of {DISTRIBUTIONS}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")
    if estimator != "hutchinson":
        split_products(estimator, probes, sketch)  # a bad split fails here, before any product
    precision = resolve_curvature_dtype(curvature_dtype)
    if generator is None:  # on the parameters' device: probes never cross the bus
        generator = probe_generator(secrets.randbits(63), next(iter(model.parameters())).device)
    with curvature_operator(
        model,
        loss_fn,
        batch,
        gn=gn,
        layers=layers,
        generator=generator,
        strategy=strategy,
        chunk_size=chunk_size,
        forward=forward,
        curvature_dtype=precision,
        fd_step=fd_step,
        fd_check=fd_check,
    ) as op:
        if estimator != "hutchinson":
            samples = deflated_samples(estimator, op, probes, distribution, generator, sketch)
        else:
            samples = _probe_samples(op, probes, distribution, generator)
    estimate = _checked_estimate(op, samples, distribution)
    if op.gradient_sq is not None:
        estimate.gradient_sq = dict(zip(estimate.layers, op.gradient_sq))
    estimate.estimator, estimate.products = estimator, probes
    estimate.curvature_dtype = precision
    return estimate


def _probe_samples(
    op: CurvatureOperator, probes: int, distribution: str, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """``[K, L]`` per-probe, per-layer statistics (``SAMPLE_KINDS``) from K products of ``op``."""
    index = layer_index(op.blocks, op.params[0].device)
    buffer = torch.empty(min(op.chunk_size, probes) * op.dim, dtype=torch.float32, device=generator.device)
    chunks: list[dict[str, torch.Tensor]] = []
    remaining = probes
    while remaining:
        k = min(op.chunk_size, remaining)
        z = op.localize(sample_probes(op.params, k, distribution, generator, buffer=buffer))
        hz, gz = op.engine(z)
        chunks.append(reduce_chunk(z, hz, gz, index))
        del z, hz, gz
        remaining -= k
    samples = {kind: torch.cat([c[kind] for c in chunks]).cpu() for kind in chunks[0]}
    if op.sharded:  # every value is a sum over coordinates: complete it over the ranks' shards, in one collective
        kinds = list(samples)
        stacked = op.sum_over_ranks(torch.stack([samples[kind] for kind in kinds]))
        samples = dict(zip(kinds, stacked))
    return samples


def _checked_estimate(op: CurvatureOperator, samples: dict[str, torch.Tensor], distribution: str) -> CurvatureEstimate:
    """The estimate of ``samples``, or a :class:`NonFiniteCurvatureError` naming the layers with NaN/Inf."""
    finite = torch.stack([torch.isfinite(s).all(0) for s in samples.values()]).all(0)
    bad = [block.name for block, ok in zip(op.blocks, finite.tolist()) if not ok]
    if bad:
        raise NonFiniteCurvatureError(
            f"non-finite curvature products in layer(s) {', '.join(bad)} "
            "(the loss was finite: check for overflow in these layers)",
            bad,
        )
    return CurvatureEstimate(
        layers=op.layers,
        numel=op.numel,
        samples=samples,
        loss=op.loss,
        distribution=distribution,
        strategy=op.strategy,
        batch_size=op.batch_size,
        layer_types={b.name: b.kind for b in op.blocks if b.kind},
    )
