"""The wrapper's curvature settings: one validated record, so every check lives in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..engine.context import resolve_curvature_dtype
from ..engine.strategies import STRATEGIES
from ..estimators.deflation import ESTIMATORS, split_products
from ..estimators.distributed import PROBE_MODES


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class CurvatureSettings:
    """How often and how the wrapper estimates curvature (see :class:`~curvopt.CurvatureAwareOptimizer`).

    Construction validates every field and raises ``ValueError`` naming the field and the value.
    """

    every: int = 500
    probes: int | str = 8
    curvature_batch_size: int = 32
    gn: bool = True
    strategy: str = "auto"
    seed: int = 0
    history: int = 256
    auto_probes: tuple[int, int] = (4, 32)
    distributed_probes: str = "independent"
    inter_every: int = 0
    inter_probes: int = 4
    spectrum_steps: int = 20
    spectrum_starts: int = 2
    estimator: str = "hutchinson"
    curvature_dtype: str | None = None

    def __post_init__(self) -> None:
        if not _is_int(self.every) or self.every < 0:
            raise ValueError(f"every must be an integer >= 0 (0 turns monitoring off), got {self.every!r}")
        if self.probes != "auto" and (not _is_int(self.probes) or self.probes < 1):
            raise ValueError(f"probes must be an integer >= 1 or 'auto', got {self.probes!r}")
        if not _is_int(self.curvature_batch_size) or self.curvature_batch_size < 1:
            raise ValueError(f"curvature_batch_size must be an integer >= 1, got {self.curvature_batch_size!r}")
        if not _is_int(self.history) or self.history < 1:
            raise ValueError(f"history must be an integer >= 1, got {self.history!r}")
        low, high = self.auto_probes
        if not (_is_int(low) and _is_int(high) and 1 <= low <= high):
            raise ValueError(f"auto_probes must be (low, high) with 1 <= low <= high, got {self.auto_probes!r}")
        if not _is_int(self.inter_every) or self.inter_every < 0:
            raise ValueError(f"inter_every must be an integer >= 0 (0: off), got {self.inter_every!r}")
        for name in ("inter_probes", "spectrum_steps", "spectrum_starts"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.strategy != "auto" and self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be 'auto' or one of {STRATEGIES}, got {self.strategy!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.estimator != "hutchinson" and self.probes != "auto":
            split_products(self.estimator, int(self.probes))  # raises ValueError for a K it cannot split
        self.curvature_dtype = resolve_curvature_dtype(self.curvature_dtype)  # ValueError names the choices
        if self.distributed_probes not in PROBE_MODES:
            raise ValueError(f"distributed_probes must be one of {PROBE_MODES}, got {self.distributed_probes!r}")

    def samples_per_estimate(self, products: int) -> int:
        """Rows of an estimate's samples for K = ``products`` (K for Hutchinson; fewer for deflated estimators)."""
        return products if self.estimator == "hutchinson" else split_products(self.estimator, products)[1]

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) is a curvature step."""
        return self.every > 0 and step % self.every == 0

    def inter_due(self, step: int) -> bool:
        """Whether step ``step`` runs the slower inter-layer diagnostics."""
        return self.inter_every > 0 and step % self.inter_every == 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
