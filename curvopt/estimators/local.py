r"""The local Hessian of each layer's back-matching loss, as a scalar (Zhang, Chen & Liu, NeurIPS 2018).

Back-matching propagation views a backward pass as each block b matching its output z_b to a target
z_b* = z_b − η ∂L/∂z_b, with its input held fixed: ℓ_b(θ_b) = ½ ‖z_b(θ_b; x_b) − z_b*‖². The Hessian of
this local loss in the block's own parameters is J_bᵀ J_b, J_b = ∂z_b/∂θ_b (the loss above the block
enters only through the target), and its scalar approximation is the mean eigenvalue

    α_b = tr(J_bᵀ J_b) / d_b = E_v ‖J_bᵀ v‖² / d_b,      v Rademacher over the block's outputs.

For a linear layer z = W x over a batch, α_b = Σ_i ‖x_i‖² / d_in (plus 1 for the bias): the energy of
the layer's input, which is what drifts with depth in networks without normalisation. Measured here
for any module by re-running it on its own recorded input (detached, so nothing above or below it
contributes) and K backward passes through it alone.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..engine.batch import Forward, call_model, split_batch
from ..engine.context import probing_context
from ..engine.layers import ROOT_LAYER, Layer, unwrap_model


def local_curvature(
    model: nn.Module,
    blocks: Sequence[Layer],
    batch: tuple[Any, Any],
    *,
    probes: int = 4,
    generator: torch.Generator | None = None,
    forward: Forward | None = None,
) -> dict[str, float]:
    """α_l = tr(J_lᵀ J_l) / d_l per layer (see the module docstring); NaN for parameters on the root module.

    Runs in the probing context (train mode, batch statistics without touching running statistics,
    the caller's RNG and state restored). Layers must be the default one-module-per-layer grouping.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    core = unwrap_model(model)
    modules = dict(core.named_modules())
    unknown = [b.name for b in blocks if b.name != ROOT_LAYER and (not b.kind or b.name not in modules)]
    if unknown:
        raise ValueError(f"local curvature needs one module per layer; {unknown} are custom groupings")
    inputs, _ = split_batch(batch)
    recorded: dict[str, tuple[Any, ...]] = {}

    def recorder(name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if name not in recorded:  # a module used twice: its first use
                recorded[name] = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)

        return hook

    result = {b.name: float("nan") for b in blocks}
    with probing_context(core, mask_seed=int(torch.randint(0, 2**62, (1,), generator=generator))) as rewind:
        handles = [modules[b.name].register_forward_pre_hook(recorder(b.name)) for b in blocks if b.name in modules]
        try:
            rewind()
            with torch.no_grad():
                call_model(core, inputs, forward)
        finally:
            for handle in handles:
                handle.remove()
        for block in blocks:
            if block.name not in recorded:
                continue
            rewind()
            out = modules[block.name](*recorded[block.name])
            total = 0.0
            for _ in range(probes):
                v = torch.randint(0, 2, out.shape, generator=generator).to(out).mul_(2).sub_(1)
                grads = torch.autograd.grad(out, block.params, v, retain_graph=True, allow_unused=True)
                total += sum(float(g.double().pow(2).sum()) for g in grads if g is not None)
            result[block.name] = total / probes / block.numel
    return result
