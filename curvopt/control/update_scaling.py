r"""How per-layer scales s_l reach the parameters: scaling each layer's *update*.

θ_l ← θ_l,old + s_l (θ_l,new − θ_l,old) after the inner optimizer's step. For SGD (torch's
momentum convention) and Adam/AdamW (weight decay included) this is exactly a per-layer learning
rate lr·s_l; for any optimizer it is a per-layer step-size multiplier; it works where gradient
scaling does not (Adam is invariant to the gradient's scale), leaves the inner optimizer's groups,
state and fused/foreach kernels as they are, and leaves schedulers in charge of the base rate. Its
cost is one copy of the scaled parameters per step, paid only while some scale differs from 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

ScaledLayer = tuple[float, Sequence[torch.Tensor]]  # (s_l, the layer's parameter tensors)


def scaled_step(step: Callable[[], Any], scaled: Sequence[ScaledLayer]) -> Any:
    """Run the inner ``step()`` with each layer's update multiplied by its scale; returns its result."""
    if not scaled:
        return step()
    with torch.no_grad():
        before = [torch._foreach_mul(list(params), 1.0) for _, params in scaled]  # snapshot θ_old
    result = step()
    with torch.no_grad():
        for (scale, params), old in zip(scaled, before):
            # θ ← θ_new + (1 − s)(θ_old − θ_new) = θ_old + s (θ_new − θ_old), in place
            torch._foreach_lerp_(list(params), old, 1.0 - scale)
    return result
