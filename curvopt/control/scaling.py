r"""Layer-wise learning-rate policies: per-layer scales s_l, the base rate left to the user's schedule.

Every policy maps what it measures to scales s_l (the wrapper applies them as per-layer learning
rates lr·s_l, :mod:`curvopt.control.update_scaling`). Named policies (:data:`LR_SCALING_POLICIES`):

``"trace"``
    The block's mean Hessian eigenvalue τ_l = tr(H_ll)/d_l from each estimate, smoothed in log space
    (log τ̄_l ← (1 − ρ) log τ̄_l + ρ log τ_l), and s_l = clip((τ_ref / τ̄_l)^β, ¼, 4), τ_ref the median
    over layers, β = ½. Non-positive τ_l (small-K Hutchinson estimates can be ≤ 0) leave τ̄_l as it was.

``"local"`` — scale-amended SGD (Zhang, Chen & Liu, NeurIPS 2018)
    The block's step divided by the scalar α_l of its *local* Hessian, the Hessian of the back-matching
    loss ½‖z_l − z_l*‖² in the block's own parameters (:mod:`curvopt.estimators.local`):
    W_l ← W_l − (η / α_l) ∇L. Here s_l = clip(α_ref / ᾱ_l, 1/16, 16) with α_ref the median over layers,
    so the base rate η keeps its meaning; ᾱ_l smoothed like τ̄_l.

``"cap"`` — each layer below its own edge of stability
    λ_l = λ_max(H_ll) by Lanczos on the layer's block (every ``refresh`` estimates), and
    s_l = min(1, c / (lr_l λ_l)): a layer whose step lr·λ would exceed c (c = 1: half the edge 2/λ of
    gradient descent on a quadratic) is slowed to it; the others keep the base rate. This is plain gradient
    descent's criterion: under Adam/AdamW stability is set by the preconditioned Hessian P⁻¹H, which ``"edge"``
    reads, and a bound on the raw H seldom binds there.

``"edge"`` — below the optimizer's edge of stability from step 0, in place of a warmup
    s = min(1, margin / λ_max(D H D)) with D = √(η / (P · threshold)) from the optimizer's own preconditioner
    and momentum, one scale for all layers, on its own dense-then-sparse cadence (:mod:`curvopt.control.edge`).

``"trust"`` — an outside baseline without curvature (LARS, You et al. 2017)
    The trust ratio t_l = ‖θ_l‖ / ‖g_l‖ at every step, normalised by its median over layers and clipped,
    s_l = clip(t_l / median t, 1/10, 10), smoothed over steps.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from ..engine.layers import Layer
from ..estimators.result import CurvatureEstimate
from .edge import EdgeScaling

LR_SCALING_POLICIES = ("trace", "local", "cap", "trust", "edge")
"""The names accepted as ``lr_scaling=`` (and by ``curvopt train --lr-scaling``)."""


@runtime_checkable
class LRPolicy(Protocol):
    """What ``lr_scaling=`` takes besides a name: an object that turns each curvature estimate into per-layer
    learning-rate scales s_l (the wrapper sets each layer's rate to lr · s_l; a layer it leaves out keeps its last
    scale, 1 at first) and checkpoints its own state.

    ``update(estimate)`` may take a second argument, a :class:`PolicyContext` (lazy access to the layers, the
    curvature batch and products); a policy with ``every_step = True`` also gets ``step_update(blocks)`` before
    every optimizer step (as :class:`TrustRatio` does). Every named policy of :data:`LR_SCALING_POLICIES` is one.

    >>> class Halve:
    ...     def update(self, estimate):
    ...         return {name: 0.5 for name in estimate.layers}
    ...     def state_dict(self):
    ...         return {}
    ...     def load_state_dict(self, state):
    ...         pass
    >>> isinstance(Halve(), LRPolicy)
    True
    """

    def update(self, estimate: CurvatureEstimate, *context: Any) -> Mapping[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@dataclass
class PolicyContext:
    """What a policy may ask for at a curvature step, computed only when asked (on the curvature batch)."""

    blocks: Sequence[Layer]
    base_lrs: Mapping[str, float]  # the learning rate of each layer's param group, before scaling
    top_eigenvalues: Callable[[], dict[str, float]] = field(default=lambda: {})
    local_curvature: Callable[[], dict[str, float]] = field(default=lambda: {})


class _Smoothed:
    """Per-layer log-space EWMA of positive values, and median-normalised scales from it."""

    def __init__(self, smoothing: float) -> None:
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        self.smoothing = smoothing
        self.log: dict[str, float] = {}

    def fold(self, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            if not (math.isfinite(value) and value > 0):
                continue
            previous = self.log.get(name)
            y = math.log(value)
            self.log[name] = y if previous is None else previous + self.smoothing * (y - previous)

    def relative(self, names: Sequence[str], power: float, low: float, high: float) -> dict[str, float]:
        """clip((ref / v̄_l)^power, low, high) with ref the median; 1 for layers never measured."""
        ref = statistics.median(self.log.values()) if self.log else 0.0
        return {n: min(high, max(low, math.exp(power * (ref - self.log[n])))) if n in self.log else 1.0 for n in names}


class TraceScaling:
    """The ``"trace"`` policy: s_l = clip((τ_ref / τ̄_l)^β, s_min, s_max)."""

    name = "trace"

    def __init__(self, *, beta: float = 0.5, s_min: float = 0.25, s_max: float = 4.0, smoothing: float = 0.3) -> None:
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if not 0 < s_min <= 1 <= s_max:
            raise ValueError(f"need 0 < s_min <= 1 <= s_max, got s_min={s_min}, s_max={s_max}")
        self.beta, self.s_min, self.s_max = beta, s_min, s_max
        self.levels = _Smoothed(smoothing)
        self.scales: dict[str, float] = {}

    def update(self, estimate: CurvatureEstimate, context: PolicyContext | None = None) -> dict[str, float]:
        """Fold one estimate into the smoothed curvatures and return the new scales."""
        self.levels.fold({n: estimate.mean_eigenvalue(n) for n in estimate.layers})
        self.scales = self.levels.relative(estimate.layers, self.beta, self.s_min, self.s_max)
        return dict(self.scales)

    def state_dict(self) -> dict:
        return {"log_tau": dict(self.levels.log), "scales": dict(self.scales)}

    def load_state_dict(self, state: Mapping) -> None:
        self.levels.log = dict(state["log_tau"])
        self.scales = dict(state["scales"])


class LocalHessianScaling:
    """The ``"local"`` policy (scale-amended SGD): s_l = clip(α_ref / ᾱ_l, s_min, s_max)."""

    name = "local"

    def __init__(self, *, s_min: float = 1 / 16, s_max: float = 16.0, smoothing: float = 0.3) -> None:
        self.s_min, self.s_max = s_min, s_max
        self.levels = _Smoothed(smoothing)
        self.scales: dict[str, float] = {}

    def update(self, estimate: CurvatureEstimate, context: PolicyContext | None = None) -> dict[str, float]:
        if context is None:
            raise ValueError("the 'local' policy measures each layer's local Hessian: it needs the wrapper's context")
        self.levels.fold(context.local_curvature())
        self.scales = self.levels.relative(estimate.layers, 1.0, self.s_min, self.s_max)
        return dict(self.scales)

    def state_dict(self) -> dict:
        return {"log_alpha": dict(self.levels.log), "scales": dict(self.scales)}

    def load_state_dict(self, state: Mapping) -> None:
        self.levels.log = dict(state["log_alpha"])
        self.scales = dict(state["scales"])


class CurvatureCap:
    """The ``"cap"`` policy: s_l = min(1, c / (lr_l λ_max(H_ll))), λ refreshed every ``refresh`` estimates."""

    name = "cap"

    def __init__(self, *, c: float = 1.0, refresh: int = 4) -> None:
        if not c > 0 or refresh < 1:
            raise ValueError(f"need c > 0 and refresh >= 1, got c={c}, refresh={refresh}")
        self.c, self.refresh = c, refresh
        self.top: dict[str, float] = {}
        self.count = 0
        self.scales: dict[str, float] = {}

    def update(self, estimate: CurvatureEstimate, context: PolicyContext | None = None) -> dict[str, float]:
        if context is None:
            raise ValueError("the 'cap' policy needs each layer's top eigenvalue: it needs the wrapper's context")
        if self.count % self.refresh == 0 or not self.top:
            self.top = {n: v for n, v in context.top_eigenvalues().items() if math.isfinite(v)}
        self.count += 1
        self.scales = {}
        for name in estimate.layers:
            lam, lr = self.top.get(name, 0.0), context.base_lrs.get(name, 0.0)
            self.scales[name] = min(1.0, self.c / (lr * lam)) if lam > 0 and lr > 0 else 1.0
        return dict(self.scales)

    def state_dict(self) -> dict:
        return {"top": dict(self.top), "count": self.count, "scales": dict(self.scales)}

    def load_state_dict(self, state: Mapping) -> None:
        self.top, self.count, self.scales = dict(state["top"]), int(state["count"]), dict(state["scales"])


class TrustRatio:
    """The ``"trust"`` policy (LARS-style, no curvature): s_l = clip(t_l / median t), t_l = ‖θ_l‖/‖g_l‖."""

    name = "trust"
    every_step = True  # the wrapper calls :meth:`step_update` before every optimizer step

    def __init__(self, *, s_min: float = 0.1, s_max: float = 10.0, smoothing: float = 0.1) -> None:
        self.s_min, self.s_max = s_min, s_max
        self.levels = _Smoothed(smoothing)
        self.scales: dict[str, float] = {}

    @torch.no_grad()
    def step_update(self, blocks: Sequence[Layer]) -> dict[str, float]:
        ratios = {}
        for block in blocks:
            grads = [p.grad for p in block.params if p.grad is not None]
            if not grads:
                continue
            g = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            w = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(block.params))))
            ratios[block.name] = float(w / g) if float(g) > 0 else math.nan
        self.levels.fold(ratios)
        self.scales = self.levels.relative([b.name for b in blocks], -1.0, self.s_min, self.s_max)
        return dict(self.scales)

    def update(self, estimate: CurvatureEstimate, context: PolicyContext | None = None) -> dict[str, float]:
        return dict(self.scales)  # curvature does not enter

    def state_dict(self) -> dict:
        return {"log_ratio": dict(self.levels.log), "scales": dict(self.scales)}

    def load_state_dict(self, state: Mapping) -> None:
        self.levels.log = dict(state["log_ratio"])
        self.scales = dict(state["scales"])


POLICIES: dict[str, Callable[[], Any]] = {
    "trace": TraceScaling,
    "local": LocalHessianScaling,
    "cap": CurvatureCap,
    "trust": TrustRatio,
    "edge": EdgeScaling,
}


def make_policy(policy: object) -> LRPolicy | None:
    """``None`` (off), a name in :data:`LR_SCALING_POLICIES`, or an :class:`LRPolicy` object."""
    if policy is None:
        return None
    if isinstance(policy, str):
        if policy not in POLICIES:
            raise ValueError(
                f"unknown lr_scaling policy {policy!r}; expected None, one of {LR_SCALING_POLICIES} or a policy object"
            )
        return POLICIES[policy]()
    for method in ("update", "state_dict", "load_state_dict"):
        if not callable(getattr(policy, method, None)):
            raise TypeError(f"lr_scaling policy object must define {method}() (see curvopt.LRPolicy)")
    return policy
