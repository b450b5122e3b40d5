r"""How per-layer scales s_l reach the parameters: per-layer learning rates.

Two mechanisms with the same effect, θ_l,new − θ_l,old = s_l × (the inner optimizer's update):

* **Through the learning rate** (:func:`lr_scaled_step`), for optimizers whose update is linear in
  the learning rate — ``torch.optim.SGD`` (momentum, Nesterov and weight decay included: θ ← θ − lr·buf),
  ``Adam`` and ``AdamW`` (decoupled decay θ(1 − lr·wd) scales too). For the step only, each param
  group is split by scale into groups with ``lr × s`` and otherwise the user's hyper-parameters; the
  optimizer state is keyed by parameter, so nothing else changes, and the user's groups — which LR
  schedulers write — are put back at once. Cost: a few dict copies per step.
* **Through the update** (:func:`lerp_scaled_step`), for any optimizer (Lamb, Lookahead, timm's): snapshot
  θ_old, run the inner step, set θ ← θ_old + s (θ_new − θ_old). It works where neither gradient scaling
  (Adam is invariant to it) nor learning-rate scaling (a trust ratio cancels it) would, at the cost of
  one copy of the scaled parameters per step, paid only while some scale differs from 1.

Either way schedulers stay in charge of the base rate. :func:`scaled_step` picks the first where it is
exact (tests/control/test_lr_scaling.py checks both against each other).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

ScaledLayer = tuple[float, Sequence[torch.Tensor]]  # (s_l, the layer's parameter tensors)
LR_LINEAR = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
"""Optimizers (exact classes: a subclass may change the update) whose update is linear in ``lr``."""


def lr_is_linear(optimizer: Optimizer) -> bool:
    return type(optimizer) in LR_LINEAR


def scaled_step(optimizer: Optimizer, step: Callable[[], Any], scaled: Sequence[ScaledLayer]) -> Any:
    """Run ``step()`` with each listed layer's update multiplied by its scale (the cheaper exact mechanism)."""
    if not scaled:
        return step()
    if lr_is_linear(optimizer):
        return lr_scaled_step(optimizer, step, scaled)
    return lerp_scaled_step(step, scaled)


def lr_scaled_step(optimizer: Optimizer, step: Callable[[], Any], scaled: Sequence[ScaledLayer]) -> Any:
    """The step with per-layer learning rates: groups split by scale for this step only."""
    scale_of = {id(p): s for s, params in scaled for p in params}
    original = optimizer.param_groups
    groups: list[dict[str, Any]] = []
    for group in original:
        by_scale: dict[float, list[torch.Tensor]] = {}
        for p in group["params"]:
            by_scale.setdefault(scale_of.get(id(p), 1.0), []).append(p)
        for s, params in by_scale.items():
            groups.append({**group, "params": params, "lr": group["lr"] * s})
    optimizer.param_groups = groups
    try:
        return step()
    finally:
        optimizer.param_groups = original


def snapshot(scaled: Sequence[ScaledLayer]) -> list[list[torch.Tensor]]:
    """θ_old of the scaled layers, taken right before a step."""
    with torch.no_grad():
        return [torch._foreach_mul(list(params), 1.0) for _, params in scaled]


def scale_update(scaled: Sequence[ScaledLayer], before: Sequence[Sequence[torch.Tensor]]) -> None:
    """After the step: θ ← θ_new + (1 − s)(θ_old − θ_new) = θ_old + s (θ_new − θ_old), in place."""
    with torch.no_grad():
        for (scale, params), old in zip(scaled, before):
            torch._foreach_lerp_(list(params), list(old), 1.0 - scale)


def lerp_scaled_step(step: Callable[[], Any], scaled: Sequence[ScaledLayer]) -> Any:
    """The step with each layer's update scaled after the fact: θ ← θ_old + s (θ_new − θ_old)."""
    before = snapshot(scaled)
    result = step()
    scale_update(scaled, before)
    return result
