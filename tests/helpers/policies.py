"""A learning-rate policy with a known effect, for checking how scales reach an update."""

from __future__ import annotations

from typing import Any


class FixedScale:
    """Every layer's update multiplied by ``scale`` from the first estimate on (with ``every=1``: before the first
    step), so a run with it must equal the run at ``scale`` times the rate for an optimizer linear in its rate."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def update(self, estimate: Any) -> dict[str, float]:
        return {name: self.scale for name in estimate.layers}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Any) -> None:
        pass
