r"""Curvature estimates under ``torch.distributed`` (DDP through ``torchrun``): one collective per estimate.

Each rank probes the *unwrapped* module on its local curvature batch B_r (``autograd.grad`` never
fires DDP's reducer). Its per-probe, per-layer values (``CurvatureEstimate.samples``, K × L per
kind), its loss and a validity flag go into row r of a ``[W, n]`` float64 buffer that is
all-reduced (SUM) **once**: afterwards every rank holds every rank's values and combines them with
the same arithmetic, so estimates, CUSUM state, alarms and LR scales are bit-identical on all ranks.

Combination (W ranks, equal local batches, global loss L = (1/W) Σ_r L_r so H = (1/W) Σ_r H_r):

* ``"independent"`` probes (the default; rank r draws its own): the W·K values are pooled,
  T̂_l = (1/(WK)) Σ_{r,k} z_{rk,l}ᵀ(H_r z_{rk})_l, unbiased for tr H_ll. Its variance is
  (1/W²) Σ_r v_r/K, so the **effective number of probes is W·K** (for similar H_r); the reported
  SE is the pooled sample SD over √(WK), which also carries the between-rank batch variation.
* ``"shared"`` probes (every rank draws the same z): per probe the W values are averaged first,
  (1/W) Σ_r z_kᵀ H_r z_k = z_kᵀ H z_k, so the result equals a single process probing the
  concatenated batch with the same probes (up to float summation order); effective K stays K.

Traces are linear in H and therefore exactly global. The squared row-block norms
E‖(H_r z)_l‖² = ‖(H_r)_{l,:}‖_F² are averaged over ranks, and so are the per-layer gradient norms
‖∇_l L_r‖²: the Frobenius GN-Gap, the monitor's signal and the gradient norms describe a *per-rank*
batch (what one process with the local batch size would see), not ‖(mean_r H_r)_{l,:}‖_F², which would
need the full HVP vectors all-reduced.

If any rank could not estimate (no batch, non-finite values, an exception) every rank learns it
from the same collective and all skip the estimate together: a failing rank never leaves the
others waiting in a collective.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..engine.probes import derive_seed, probe_generator
from .result import CurvatureEstimate

PROBE_MODES = ("independent", "shared")
_RANK_STRIDE = 1_000_003  # seeds of rank r: base + r·stride (independent probes)


def is_active(group: object = None) -> bool:
    """A process group is initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank(group: object = None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def world_size(group: object = None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank_generator(shared: torch.Generator, mode: str, group: object = None) -> torch.Generator:
    """This rank's probe generator for one estimate, derived from the generator all ranks share.

    Every rank draws the same ``base`` from ``shared`` (their states are equal), so checkpointing
    ``shared`` once restores all ranks; rank r then probes with seed ``base + r·stride``
    (``"independent"``) or ``base`` (``"shared"``).
    """
    if mode not in PROBE_MODES:
        raise ValueError(f"unknown distributed probe mode {mode!r}; expected one of {PROBE_MODES}")
    base = derive_seed(shared)
    offset = rank(group) * _RANK_STRIDE if mode == "independent" else 0
    return probe_generator(base + offset, shared.device)


@dataclass
class Layout:
    """What every rank must agree on to share one buffer."""

    layers: Sequence[str]
    numel: dict[str, int]
    kinds: Sequence[str]
    probes: int

    @property
    def width(self) -> int:  # valid flag, loss, batch size, samples, per-layer gradient norms
        return 3 + len(self.kinds) * self.probes * len(self.layers) + len(self.layers)


def all_gather_estimate(
    estimate: CurvatureEstimate | None,
    layout: Layout,
    *,
    mode: str = "independent",
    group: object = None,
    device: torch.device | None = None,
    configuration_error: bool = False,
) -> tuple[CurvatureEstimate | None, list[int], list[int]]:
    """One ``all_reduce`` → ``(combined estimate or None, ranks that failed, ranks with a configuration error)``.

    A rank without an estimate sends status 0, or −1 with ``configuration_error`` (a mistake that
    will fail every estimate, which the caller may raise on every rank together).
    """
    world, me = dist.get_world_size(group), dist.get_rank(group)
    buffer = torch.zeros(world, layout.width, dtype=torch.float64, device=device)
    if estimate is None and configuration_error:
        buffer[me, 0] = -1.0
    if estimate is not None:
        row = buffer[me]
        row[0] = 1.0
        row[1] = estimate.loss
        row[2] = estimate.batch_size
        offset = 3
        for kind in layout.kinds:
            values = estimate.samples[kind].to(torch.float64).reshape(-1)
            row[offset : offset + values.numel()] = values.to(buffer.device)
            offset += values.numel()
        grad = [estimate.gradient_sq.get(name, float("nan")) for name in layout.layers]
        row[offset : offset + len(grad)] = torch.tensor(grad, dtype=torch.float64, device=buffer.device)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    buffer = buffer.cpu()
    failed = [r for r in range(world) if buffer[r, 0].item() != 1.0]
    fatal = [r for r in range(world) if buffer[r, 0].item() == -1.0]
    if failed or estimate is None:  # this rank's own row is valid exactly when it has an estimate
        return None, failed, fatal
    k, n_layers = layout.probes, len(layout.layers)
    samples: dict[str, torch.Tensor] = {}
    offset = 3
    for kind in layout.kinds:
        per_rank = buffer[:, offset : offset + k * n_layers].reshape(world, k, n_layers)
        samples[kind] = per_rank.reshape(world * k, n_layers) if mode == "independent" else per_rank.mean(0)
        offset += k * n_layers
    grad = buffer[:, offset : offset + n_layers].mean(0)  # per-rank-batch gradient norms, averaged
    gradient_sq = {} if torch.isnan(grad).any() else {n: float(v) for n, v in zip(layout.layers, grad)}
    return (
        CurvatureEstimate(
            layers=list(layout.layers),
            numel=dict(layout.numel),
            samples=samples,
            loss=float(buffer[:, 1].mean()),
            distribution=estimate.distribution,
            strategy=estimate.strategy,
            batch_size=int(buffer[:, 2].sum()),
            layer_types=dict(estimate.layer_types),
            gradient_sq=gradient_sq,
        ),
        [],
        [],
    )


def collective_device(group: object = None) -> torch.device:
    """Where the buffer must live for the group's backend (NCCL: the current CUDA device)."""
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_over_ranks(value: float, group: object = None) -> float:
    """The mean of a per-rank float over the ranks (one all-reduce on the group's collective device)."""
    tensor = torch.tensor([value], dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(tensor, group=group)
    return float(tensor[0]) / world_size(group)


def broadcast_from_first(tensors: list[torch.Tensor], group: object = None) -> list[torch.Tensor]:
    """The group's first rank's ``tensors`` on every rank (one broadcast of their float64 concatenation); for
    quantities each rank computed from its own shard of the batch that must agree bit for bit afterwards."""
    if not tensors:
        return tensors
    device = collective_device(group)
    flat = torch.cat([t.detach().reshape(-1).to(device, torch.float64) for t in tensors])
    dist.broadcast(flat, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    parts = flat.split([t.numel() for t in tensors])
    return [part.reshape(t.shape).to(t.device, t.dtype) for part, t in zip(parts, tensors)]
