r"""``lr_scaling="edge"``: keep the optimizer below its edge of stability from step 0, in place of a warmup.

**Why.** Warmup lets a network tolerate a large target learning rate by moving it, while the rate is small, to
regions where the optimizer is stable (Kalra & Barkeshli, "Why Warmup the Learning Rate?", NeurIPS 2024). What
decides stability is the top eigenvalue of the *preconditioned* Hessian η P⁻¹ H against a threshold set by the
optimizer's momentum (Cohen et al., "Adaptive Gradient Methods at the Edge of Stability", 2022). On a quadratic,
with momentum buffer b ← μ b + (1 − d) g and step θ ← θ − η P⁻¹ b, the iteration is stable while

    η λ_max(P⁻¹ H) < 2 (1 + μ) / (1 − d)          (heavy ball; Nesterov: 2 (1 + μ) / (1 + 2μ))

so plain SGD has 2, SGD with momentum 0.9 has 3.8, and Adam/AdamW (μ = d = β₁, P = diag(√v̂) + ε) has
2 (1 + β₁)/(1 − β₁) = 38 for β₁ = 0.9. :func:`step_geometry` reads η, P and the threshold from the optimizer's
groups and state for the step about to be taken (Adam: v̂ including this step's gradient) and folds them into
one diagonal D = √(η / (P · threshold)), so the *edge ratio* r = λ_max(D H D) is 1 exactly at the edge
(D H D is symmetric with the spectrum of η P⁻¹ H / threshold).

**Policy.** Every layer's learning rate is multiplied by s = min(1, margin / r): the whole preconditioned
Hessian decides stability, so one scale serves all layers. Early in training r is large (Adam's small v̂) and
s acts as a warmup that is measured, not scheduled; as r falls, s returns to 1 and the user's schedule runs
untouched. The scale multiplies whatever the scheduler set (it is applied at the step, not written into
``lr``).

**Cadence (its own, independent of ``every=``).** r is measured by power iteration on D H D
(Lanczos, :func:`~curvopt.estimators.preconditioned.preconditioned_top_eigenpair`, warm-started from the last
top Ritz vector: ``first_iterations`` products the first time, ``iterations`` after) at step 1, then after an
interval that grows by ``growth`` while s < 1 and doubles once s = 1, up to ``max_interval`` steps. Between
measurements r is carried forward with the change of D along the last eigenvector v: with F = D_now / D_then,
r_now ≈ r_then · Σ_i v_i² F_i² (exact when the eigenvector does not turn), which costs no product. A step
without a batch keeps the carried-forward value.

**``criterion="update"``** looks at the step about to be taken instead of the top eigenvalue: with Δ the
optimizer's upcoming update (:func:`upcoming_update`), the quadratic model L + s gᵀΔ + ½ s² ΔᵀHΔ is lowest at
s* = −gᵀΔ / ΔᵀHΔ, and s = min(1, margin · s*), from one product per measurement. It is a design variant measured
in benchmarks/warmup.py (RESULTS.md), not the default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import SGD, Adam, AdamW, Optimizer

from ..engine.layers import Layer

Tensors = list[torch.Tensor]
SUPPORTED_OPTIMIZERS = (SGD, Adam, AdamW)
"""Optimizers whose preconditioner and momentum :func:`step_geometry` reads (subclasses included)."""


class UnsupportedOptimizerError(TypeError):
    """The ``"edge"`` policy cannot read this optimizer's preconditioner."""


@dataclass
class StepGeometry:
    """D = √(η / (P · threshold)) per parameter tensor for the upcoming step (0 where a parameter has no gradient)."""

    scale: Tensors


def momentum_threshold(momentum: float, dampening: float = 0.0, nesterov: bool = False) -> float:
    """The edge η λ_max(P⁻¹H) of heavy-ball momentum (module docstring)."""
    if nesterov:
        return 2.0 * (1.0 + momentum) / (1.0 + 2.0 * momentum)
    return 2.0 * (1.0 + momentum) / (1.0 - dampening) if dampening < 1 else math.inf


def _unsupported(optimizer: Optimizer) -> UnsupportedOptimizerError:
    names = ", ".join(cls.__name__ for cls in SUPPORTED_OPTIMIZERS)
    return UnsupportedOptimizerError(
        f"lr_scaling='edge' reads the optimizer's preconditioner and momentum, and knows {names} (and their "
        f"subclasses); {type(optimizer).__name__} is not one of them. Use lr_scaling='trust' (no curvature) or a "
        "warmup schedule with this optimizer"
    )


def _adam_moments(
    group: Mapping[str, Any], state: Mapping[str, Any], grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(m̂, √v̂ + ε) of Adam's upcoming step, float32: this step's gradient folded into both moments, bias-corrected
    with the upcoming step number (the running maximum of v under ``amsgrad``), as torch's Adam/AdamW compute them."""
    beta1, beta2 = group["betas"]
    step = (float(state["step"]) if "step" in state else 0.0) + 1
    grad = grad.to(torch.float32)
    m = grad * (1 - beta1)
    v = grad.square().mul_(1 - beta2)
    if "exp_avg" in state:
        m.add_(state["exp_avg"].float(), alpha=beta1)
    if "exp_avg_sq" in state:
        v.add_(state["exp_avg_sq"].float(), alpha=beta2)
    if group.get("amsgrad") and state.get("max_exp_avg_sq") is not None:
        v = torch.maximum(v, state["max_exp_avg_sq"].float())
    return m / (1 - beta1**step), (v / (1 - beta2**step)).sqrt_().add_(group["eps"])


@torch.no_grad()
def step_geometry(optimizer: Optimizer, params: Sequence[torch.Tensor]) -> StepGeometry:
    """The diagonal D of the upcoming step for ``params`` (module docstring); needs this step's gradients."""
    if not isinstance(optimizer, SUPPORTED_OPTIMIZERS):
        raise _unsupported(optimizer)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    scale = []
    for p in params:
        group = group_of.get(id(p))
        if group is None or p.grad is None or group["lr"] == 0:
            scale.append(torch.zeros_like(p))
            continue
        lr = float(group["lr"])
        if isinstance(optimizer, (Adam, AdamW)):
            _, precondition = _adam_moments(group, optimizer.state.get(p, {}), p.grad)
            threshold = momentum_threshold(group["betas"][0], dampening=group["betas"][0])
            scale.append((lr / threshold / precondition).sqrt_().to(p.dtype))
        else:
            threshold = momentum_threshold(
                group.get("momentum", 0.0), group.get("dampening", 0.0), group.get("nesterov", False)
            )
            scale.append(torch.full_like(p, math.sqrt(lr / threshold)))
    return StepGeometry(scale)


@torch.no_grad()
def upcoming_update(optimizer: Optimizer, params: Sequence[torch.Tensor]) -> Tensors:
    """Δ, the step the optimizer is about to take on ``params`` (before any scaling; decoupled weight decay left out:
    it is not part of the loss): Adam/AdamW −η m̂/(√v̂ + ε) with this step's gradient folded into m and v; SGD
    −η b with b its momentum buffer after this step (Nesterov: −η (g + μ b))."""
    if not isinstance(optimizer, SUPPORTED_OPTIMIZERS):
        raise _unsupported(optimizer)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    update = []
    for p in params:
        group = group_of.get(id(p))
        if group is None or p.grad is None:
            update.append(torch.zeros_like(p))
            continue
        lr, state = float(group["lr"]), optimizer.state.get(p, {})
        if isinstance(optimizer, (Adam, AdamW)):
            m_hat, denominator = _adam_moments(group, state, p.grad)
            update.append((m_hat / denominator * -lr).to(p.dtype))
        else:
            grad = p.grad.to(torch.float32)
            momentum, dampening = group.get("momentum", 0.0), group.get("dampening", 0.0)
            buffer = state.get("momentum_buffer")
            b = grad if buffer is None or momentum == 0 else buffer.float() * momentum + grad * (1 - dampening)
            direction = grad + momentum * b if group.get("nesterov", False) else b
            update.append((direction * -lr).to(p.dtype))
    return update


@dataclass
class StepContext:
    """What a per-step policy may use at the upcoming step: its number, the inner optimizer, the parameters in layer
    order, and ``measure(scale, start, iterations) -> (λ, v)`` on this step's curvature batch (``None``: no batch)."""

    step: int
    optimizer: Optimizer
    params: Sequence[torch.Tensor]
    measure: Callable[[Tensors, Tensors | None, int], tuple[float, Tensors]] | None


class EdgeScaling:
    """The ``"edge"`` policy (module docstring): s = min(1, margin / r), r = λ_max(D H D)."""

    name = "edge"
    every_step = True

    def __init__(
        self,
        *,
        margin: float = 1.0,
        iterations: int = 3,
        first_iterations: int = 8,
        growth: float = 1.5,
        max_interval: int = 1000,
        criterion: str = "edge",
    ) -> None:
        if criterion not in ("edge", "update"):
            raise ValueError(f"criterion must be 'edge' or 'update', got {criterion!r}")
        self.criterion = criterion
        if not margin > 0:
            raise ValueError(f"margin must be > 0, got {margin}")
        if iterations < 1 or first_iterations < 1:
            raise ValueError("iterations and first_iterations must be >= 1")
        if not growth >= 1 or max_interval < 1:
            raise ValueError(f"need growth >= 1 and max_interval >= 1, got {growth}, {max_interval}")
        self.margin, self.iterations, self.first_iterations = margin, iterations, first_iterations
        self.growth, self.max_interval = growth, max_interval
        self.next_step = 1
        self.interval = 1.0
        self.ratio = math.nan  # r at the last measurement
        self.scale = 1.0
        self.measurements = 0
        self.products = 0
        self._vector: Tensors | None = None
        self._weights: Tensors | None = None  # v_i² / D_i² at the last measurement: r_now ≈ r · Σ w_i D_now,i²

    def current_ratio(self, geometry: StepGeometry) -> float:
        """r carried forward from the last measurement to this step's D (module docstring)."""
        if self._weights is None or not math.isfinite(self.ratio):
            return self.ratio
        carried = sum(
            float(torch.dot(w.reshape(-1).double(), d.reshape(-1).double().square()))
            for w, d in zip(self._weights, geometry.scale)
        )
        return self.ratio * carried

    def step_update(self, blocks: Sequence[Layer], context: StepContext) -> dict[str, float]:
        if self.criterion == "update":
            return self._update_criterion(blocks, context)
        geometry = step_geometry(context.optimizer, context.params)
        if context.step >= self.next_step and context.measure is not None:
            iterations = self.iterations if self._vector is not None else self.first_iterations
            ratio, vector = context.measure(geometry.scale, self._vector, iterations)
            if math.isfinite(ratio):
                self.ratio, self._vector = ratio, vector
                with torch.no_grad():
                    self._weights = [
                        v.square() / d.square().clamp_min(torch.finfo(d.dtype).tiny)
                        for v, d in zip(vector, geometry.scale)
                    ]
                self.measurements += 1
                self.products += iterations
            scale = self._scale(self.ratio)
            self.interval = min(self.max_interval, self.interval * (2.0 if scale >= 1.0 else self.growth))
            self.next_step = context.step + max(1, int(self.interval))
        self.scale = self._scale(self.current_ratio(geometry))
        return {b.name: self.scale for b in blocks}

    def _update_criterion(self, blocks: Sequence[Layer], context: StepContext) -> dict[str, float]:
        """``criterion="update"``: the quadratic model along the step about to be taken, Δ. The loss along sΔ is
        L + s gᵀΔ + ½ s² ΔᵀHΔ, lowest at s* = −gᵀΔ / ΔᵀHΔ; the scale is min(1, margin · s*) (margin 2: the largest
        step that still lowers the model). One product per measurement (a one-step Lanczos from Δ); between
        measurements the scale is held."""
        if context.step >= self.next_step and context.measure is not None:
            update = upcoming_update(context.optimizer, context.params)
            slope = sum(
                float(torch.dot(p.grad.reshape(-1).double(), u.reshape(-1).double()))
                for p, u in zip(context.params, update)
                if p.grad is not None
            )
            size = math.sqrt(sum(float(u.double().square().sum()) for u in update))
            if size > 0 and slope < 0:
                ones = [torch.ones_like(u) for u in update]
                curvature, _ = context.measure(ones, update, 1)  # qᵀHq for q = Δ/‖Δ‖ (0 when not positive)
                self.ratio = curvature * size**2 / -slope if math.isfinite(curvature) else math.nan  # 1/s*
                self.measurements += 1
                self.products += 1
            self.scale = self._scale(self.ratio)
            self.interval = min(self.max_interval, self.interval * (2.0 if self.scale >= 1.0 else self.growth))
            self.next_step = context.step + max(1, int(self.interval))
        return {b.name: self.scale for b in blocks}

    def _scale(self, ratio: float) -> float:
        return min(1.0, self.margin / ratio) if math.isfinite(ratio) and ratio > 0 else 1.0

    def update(self, estimate: Any, context: Any = None) -> dict[str, float]:
        """The monitor's estimates do not enter: the scale comes from :meth:`step_update`."""
        return {name: self.scale for name in estimate.layers}

    def state_dict(self) -> dict[str, Any]:
        """Cadence and the last measurement (the eigenvector is not saved: a resumed run measures afresh)."""
        return {
            "next_step": self.next_step,
            "interval": self.interval,
            "ratio": self.ratio,
            "scale": self.scale,
            "measurements": self.measurements,
            "products": self.products,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.interval, self.ratio, self.scale = float(state["interval"]), float(state["ratio"]), float(state["scale"])
        self.measurements, self.products = int(state["measurements"]), int(state["products"])
        self.next_step = 0  # no eigenvector to carry r forward with: measure at the next step
        self._vector = self._weights = None
