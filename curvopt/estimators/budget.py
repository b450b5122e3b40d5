r"""How many probes are worth buying: the mini-batch variance decomposition.

Over random batches B and probes, the K-probe estimate of layer l has

    Var_total(T̂_l) = E_B[v_l(B)] / K + Var_B[tr H_ll(B)],

v_l(B) the per-probe variance at fixed batch. From a window of successive estimates
(each on its own batch) the tracker measures

* probe term   E_B[v_l]    ≈ mean over estimates of the per-probe sample variance s²_l
  (unbiased for v_l(B) at each batch);
* batch term   Var_B[tr]   ≈ sample variance of the estimates T̂_l minus E_B[v_l]/K
  (their excess over probe noise), floored at 0;
* K*_l = E_B[v_l] / Var_B[tr H_ll]: the probe count at which both terms are equal. Beyond
  K* extra probes buy little, because batch-to-batch noise dominates.

Caveat: during training θ moves between estimates, and a trend in tr H_ll inflates the batch
term (so K* is an underestimate while curvature changes quickly); keep the window short.
"""

from __future__ import annotations

import math
from collections import deque

import torch

from .result import CurvatureEstimate


class ProbeBudgetTracker:
    """Tracks E_B[v_l]/K, Var_B[tr H_ll(B)] and K*_l from successive estimates."""

    def __init__(self, window: int = 20) -> None:
        if window < 2:
            raise ValueError(f"window must be >= 2 estimates, got {window}")
        self.window = window
        self._means: deque[torch.Tensor] = deque(maxlen=window)
        self._probe_vars: deque[torch.Tensor] = deque(maxlen=window)
        self._probes: deque[int] = deque(maxlen=window)
        self.layers: list[str] | None = None

    def update(self, estimate: CurvatureEstimate) -> None:
        """Add one estimate (K ≥ 2 probes, same layers as the previous ones)."""
        if estimate.probes < 2:
            raise ValueError("the variance decomposition needs estimates with at least 2 probes")
        if self.layers is None:
            self.layers = list(estimate.layers)
        elif list(estimate.layers) != self.layers:
            raise ValueError("estimate layers differ from the ones this tracker has seen")
        values = estimate.samples["trace"]
        self._means.append(values.mean(0))
        self._probe_vars.append(values.var(0, unbiased=True))
        self._probes.append(estimate.probes)

    def state_dict(self) -> dict:
        return {
            "layers": self.layers,
            "means": [m.tolist() for m in self._means],
            "probe_vars": [v.tolist() for v in self._probe_vars],
            "probes": list(self._probes),
        }

    def load_state_dict(self, state: dict) -> None:
        self.layers = state["layers"]
        self._means = deque((torch.tensor(m, dtype=torch.float64) for m in state["means"]), maxlen=self.window)
        self._probe_vars = deque(
            (torch.tensor(v, dtype=torch.float64) for v in state["probe_vars"]), maxlen=self.window
        )
        self._probes = deque(state["probes"], maxlen=self.window)

    @property
    def count(self) -> int:
        return len(self._means)

    def components(self) -> dict[str, dict[str, float]]:
        """Per layer: ``probe_var`` E_B[v_l], ``probe_term`` E_B[v_l]/K̄, ``batch_var``, ``k_star``."""
        if self.layers is None or self.count < 2:
            raise RuntimeError("need at least 2 estimates to separate batch from probe noise")
        means = torch.stack(list(self._means))
        probe_var = torch.stack(list(self._probe_vars)).mean(0)
        inv_k = sum(1.0 / k for k in self._probes) / self.count
        batch_var = (means.var(0, unbiased=True) - probe_var * inv_k).clamp_min(0.0)
        result = {}
        for i, name in enumerate(self.layers):
            v, b = float(probe_var[i]), float(batch_var[i])
            result[name] = {
                "probe_var": v,
                "probe_term": v * inv_k,
                "batch_var": b,
                "k_star": v / b if b > 0 else math.inf,
            }
        return result

    def suggest_probes(self, low: int = 2, high: int = 32) -> int:
        """The median K*_l over layers, rounded up and clipped to ``[low, high]``."""
        k_stars = sorted(c["k_star"] for c in self.components().values())
        median = k_stars[len(k_stars) // 2]
        return int(min(high, max(low, math.ceil(median) if math.isfinite(median) else high)))
