r"""Layer-wise learning-rate scales from per-layer curvature (DESIGN §6).

Scale-amended SGD (Zhang et al., NeurIPS 2018) shrinks a block's step with its local
curvature scalar α_b. The measurable scalar here is the block's mean eigenvalue
τ_l = tr(H_ll) / d_l, smoothed over estimates in log space,

    log τ̄_l ← (1 − ρ) log τ̄_l + ρ log τ_l,

and the scale is

    s_l = clip((τ_ref / τ̄_l)^β, s_min, s_max),   τ_ref = median_l τ̄_l.

Non-positive or non-finite τ_l (Hutchinson estimates with small K can be ≤ 0) carry no usable
curvature scale: that layer's smoothed value is left as it was, and a layer that never had a
positive estimate keeps s_l = 1. Scales are plain floats in [s_min, s_max].
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

from ..estimators.trace import CurvatureEstimate

LR_SCALING_POLICIES = ("trace",)
"""The names accepted as ``lr_scaling=`` (and by ``curvopt train --lr-scaling``)."""


class TraceScaling:
    """The ``"trace"`` policy: s_l = clip((τ_ref / τ̄_l)^β, s_min, s_max)."""

    name = "trace"

    def __init__(self, *, beta: float = 0.5, s_min: float = 0.25, s_max: float = 4.0, smoothing: float = 0.3) -> None:
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if not 0 < s_min <= 1 <= s_max:
            raise ValueError(f"need 0 < s_min <= 1 <= s_max, got s_min={s_min}, s_max={s_max}")
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        self.beta, self.s_min, self.s_max, self.smoothing = beta, s_min, s_max, smoothing
        self.log_tau: dict[str, float] = {}
        self.scales: dict[str, float] = {}

    def update(self, estimate: CurvatureEstimate) -> dict[str, float]:
        """Fold one estimate into the smoothed curvatures and return the new scales."""
        for name in estimate.layers:
            tau = estimate.mean_eigenvalue(name)
            if not (math.isfinite(tau) and tau > 0):
                continue
            previous = self.log_tau.get(name)
            log_tau = math.log(tau)
            self.log_tau[name] = log_tau if previous is None else previous + self.smoothing * (log_tau - previous)
        log_ref = statistics.median(self.log_tau.values()) if self.log_tau else 0.0
        for name in estimate.layers:
            if name in self.log_tau:
                raw = math.exp(self.beta * (log_ref - self.log_tau[name]))
                self.scales[name] = min(self.s_max, max(self.s_min, raw))
            else:
                self.scales.setdefault(name, 1.0)
        return dict(self.scales)

    def state_dict(self) -> dict:
        return {"log_tau": dict(self.log_tau), "scales": dict(self.scales)}

    def load_state_dict(self, state: Mapping) -> None:
        self.log_tau = dict(state["log_tau"])
        self.scales = dict(state["scales"])


def make_policy(policy: object) -> TraceScaling | None:
    """``None`` (off), ``"trace"``, or a policy object with ``update``/``state_dict``/``load_state_dict``."""
    if policy is None:
        return None
    if policy == "trace":
        return TraceScaling()
    if isinstance(policy, str):
        raise ValueError(f"unknown lr_scaling policy {policy!r}; expected None, 'trace' or a policy object")
    for method in ("update", "state_dict", "load_state_dict"):
        if not callable(getattr(policy, method, None)):
            raise TypeError(f"lr_scaling policy object must define {method}()")
    return policy  # type: ignore[return-value]
