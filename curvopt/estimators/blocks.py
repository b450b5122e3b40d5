r"""Inter-layer curvature: the L × L map of block norms ‖H_vw‖_F² and what it implies.

A probe supported on layer w only, z = (0, …, z_w, …, 0) with E z_w z_wᵀ = I, gives for *every*
layer v at once

    E ‖(H z)_v‖² = E ‖H_vw z_w‖² = ‖H_vw‖_F²,

so one block-restricted product per source layer per probe yields the whole map (K·L products).
H is symmetric, so ‖H_vw‖_F = ‖H_wv‖_F and both directions are averaged (2K samples per
off-diagonal pair). From the map:

* resonance    R(v, w) = ‖H_vw‖_F
* coupling     C(v, w) = ‖H_vw‖_F / sqrt(‖H_vv‖_F ‖H_ww‖_F)      (can exceed 1)
* cross-block mass  Φ = 1 − Σ_v ‖H_vv‖_F² / Σ_{v,w} ‖H_vw‖_F²   (what a block-diagonal
  preconditioner discards; 0 for a block-diagonal H)

The squared norms are unbiased; R, C and Φ are smooth functions of them (consistent, with an
O(1/K) bias). Standard errors: the sample SE of each squared norm, and leave-one-probe-out
jackknife SEs for R, C and Φ. With ``gn`` the same products give the Gauss-Newton and tensor maps
‖G_vw‖_F² and ‖Hᵀ_vw‖_F² (Hᵀ = H − G).

Parameter space (this module) is what an optimizer acts on. :func:`activation_block_norms` is the definition of
“Inter-Layer Hessian Analysis of Neural Networks with DAG Architectures” (arXiv, 2026): the Hessian of the loss
with respect to the layers' *outputs*.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..engine.batch import Forward, call_loss, call_model, check_finite_loss, split_batch
from ..engine.context import probing_context
from ..engine.layers import Layer, LayerSpec
from ..engine.operator import curvature_operator, draw_mask_seed
from ..engine.probes import DISTRIBUTIONS
from .result import BlockNorms

MAP_KINDS = ("hess", "gn", "tensor")


def _restricted_probes(d: int, k: int, distribution: str, generator: torch.Generator) -> torch.Tensor:
    if distribution == "rademacher":
        return torch.randint(0, 2, (k, d), generator=generator).mul_(2).sub_(1).float()
    return torch.randn(k, d, generator=generator)


def block_norms(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch: tuple[object, object],
    *,
    probes: int = 8,
    layers: LayerSpec | Sequence[Layer] | None = None,
    gn: bool = False,
    generator: torch.Generator | None = None,
    distribution: str = "rademacher",
    strategy: str = "auto",
    forward: Forward | None = None,
) -> BlockNorms:
    """Estimate the L × L map ‖H_vw‖_F² (and with ``gn`` ‖G_vw‖_F², ‖Hᵀ_vw‖_F²) from K·L restricted products.

    The function probed is the training loss exactly as in :func:`curvopt.estimate_curvature`
    (train mode, batch statistics, one dropout mask per call, nothing modified).
    """
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be an integer >= 1, got {probes!r}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown probe distribution {distribution!r}; expected one of {DISTRIBUTIONS}")
    if generator is None:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    with curvature_operator(
        model, loss_fn, batch, gn=gn, layers=layers, generator=generator, strategy=strategy, forward=forward
    ) as op:
        n = len(op.blocks)
        kinds = MAP_KINDS if gn else ("hess",)
        samples = {kind: torch.zeros(probes, n, n, dtype=torch.float64) for kind in kinds}
        for w, block in enumerate(op.blocks):
            z = _restricted_probes(block.numel, probes, distribution, generator).to(op.params[0].device)
            hz, gz = op.matvec(op.embed(w, z))
            samples["hess"][:, :, w] = op.layer_sq_norms(hz)
            if gn and gz is not None:
                samples["gn"][:, :, w] = op.layer_sq_norms(gz)
                samples["tensor"][:, :, w] = op.layer_sq_norms([h - g for h, g in zip(hz, gz)])
    bad = [name for kind in kinds for name, ok in zip(op.layers, torch.isfinite(samples[kind]).all(0).all(0)) if not ok]
    if bad:
        raise FloatingPointError(f"non-finite block norms for layer(s) {sorted(set(bad))}")
    return BlockNorms(op.layers, op.numel, samples, op.loss)


def activation_block_norms(
    model: nn.Sequential,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch: tuple[torch.Tensor, torch.Tensor],
    *,
    probes: int = 8,
    modules: Sequence[str] | None = None,
    generator: torch.Generator | None = None,
) -> BlockNorms:
    """The inter-layer Hessian paper's activation-space map (module docstring): ‖∂²L/∂a_v∂a_w‖_F² for the outputs
    a_l of ``modules``.

    a_l is the output of child module l of an ``nn.Sequential`` over the whole batch (shape
    ``[B, …]``); the loss is differentiated with respect to a perturbation δ_l added to that
    output, at δ = 0. Differences from the parameter-space map: the coordinates are activations
    of *this batch* (B × features per layer, no weight sharing across samples), the Hessian has
    no term from a layer's own weights, and R/C measure how strongly the loss couples the
    representations of two depths rather than two parameter blocks. Default ``modules``: the
    children that own parameters. Runs in :func:`~curvopt.engine.context.probing_context`, like the
    parameter-space estimators: train mode with batch-statistic BN and the model's state
    restored, autocast off, math attention. All probes differentiate one forward pass, so they
    share one dropout mask, drawn from a private RNG stream seeded from ``generator`` (the
    global RNG is left as it was, and the same ``generator`` gives the same map).
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError("activation_block_norms needs an nn.Sequential (the layer outputs must be a chain)")
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be an integer >= 1, got {probes!r}")
    names = (
        list(modules)
        if modules is not None
        else [n for n, m in model.named_children() if any(True for _ in m.parameters(recurse=True))]
    )
    children = dict(model.named_children())
    missing = [n for n in names if n not in children]
    if missing:
        raise ValueError(f"no child module(s) {missing} in the Sequential")
    if generator is None:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    x, y = split_batch(batch)
    deltas: dict[str, torch.Tensor] = {}

    def hook_for(name: str) -> Callable:
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> torch.Tensor:
            if name not in deltas:
                deltas[name] = torch.zeros_like(output, requires_grad=True)
            return output + deltas[name]

        return hook

    mask_seed = draw_mask_seed(generator)
    handles = [children[n].register_forward_hook(hook_for(n)) for n in names]
    try:
        with probing_context(model, mask_seed=mask_seed) as rewind:
            rewind()
            loss = call_loss(loss_fn, call_model(model, x, None), y)
            order = [deltas[n] for n in names]
            grads = torch.autograd.grad(loss, order, create_graph=True)
            n = len(names)
            samples = torch.zeros(probes, n, n, dtype=torch.float64)
            for w in range(n):
                for k in range(probes):
                    z = torch.randint(0, 2, grads[w].shape, generator=generator).mul_(2).sub_(1).to(grads[w])
                    hz = torch.autograd.grad(grads[w], order, z, retain_graph=True, allow_unused=True)
                    for v, h in enumerate(hz):
                        samples[k, v, w] = 0.0 if h is None else float(h.double().pow(2).sum())
    finally:
        for handle in handles:
            handle.remove()
    check_finite_loss(float(loss.detach()))
    numel = {n: deltas[n].numel() for n in names}
    return BlockNorms(names, numel, {"hess": samples}, float(loss.detach()))
