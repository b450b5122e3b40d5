"""One curvature estimate at a training step: the curvature batch, the probe budget, the DDP
combine, and what went wrong when there is no estimate.

:class:`EstimateRunner` never raises for a problem of one step (no batch, a non-finite product,
an exception inside the estimator): it returns ``None`` with a warning key and a message, and the
wrapper skips that estimate. Under ``torch.distributed`` every rank joins the one collective of
:mod:`curvopt.estimators.distributed`, also when its own estimate failed, so no rank waits forever.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..engine.layers import Layer
from ..estimators import distributed as dist_utils
from ..estimators.budget import ProbeBudgetTracker
from ..estimators.trace import SAMPLE_KINDS, CurvatureEstimate, estimate_curvature
from .settings import CurvatureSettings

Problem = tuple[str, str]  # (warning key, message)


@dataclass
class Outcome:
    """An estimate, or the reason there is none."""

    estimate: CurvatureEstimate | None
    problem: Problem | None = None


def curvature_batch(batch: tuple[Any, Any], size: int) -> tuple[Any, Any]:
    """The first ``size`` samples of a batch (tensors are sliced, anything else passes through)."""
    x, y = (t[:size] if isinstance(t, torch.Tensor) else t for t in batch)
    return x, y


class EstimateRunner:
    """Runs :func:`~curvopt.estimate_curvature` for the wrapper and keeps its probe stream and K* tracker."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        blocks: Sequence[Layer],
        settings: CurvatureSettings,
        process_group: Any = None,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.blocks = list(blocks)
        self.settings = settings
        self.process_group = process_group
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.probe_tracker = ProbeBudgetTracker(window=20)

    def probes(self) -> int:
        """K for the next estimate: fixed, or K* from the tracker within ``auto_probes``."""
        if self.settings.probes != "auto":
            return int(self.settings.probes)
        low, high = self.settings.auto_probes
        if self.probe_tracker.count < 3:
            return max(low, min(high, 8))
        return self.probe_tracker.suggest_probes(low, high)

    def run(self, step: int, batch: tuple[Any, Any] | None) -> Outcome:
        """The estimate of optimizer step ``step`` on ``batch`` (combined over ranks under DDP)."""
        distributed = dist_utils.is_active(self.process_group)
        outcome = self._local(step, batch, distributed)
        if distributed:
            outcome = self._combine_ranks(outcome)
        if outcome.estimate is not None and outcome.estimate.probes >= 2:
            self.probe_tracker.update(outcome.estimate)
        return outcome

    def _local(self, step: int, batch: tuple[Any, Any] | None, distributed: bool) -> Outcome:
        generator = (
            dist_utils.rank_generator(self.generator, self.settings.distributed_probes, self.process_group)
            if distributed
            else self.generator
        )
        if batch is None:
            message = (f"curvopt: step {step} is a curvature step but no batch was given; pass step(batch=(x, y)) "
                       "or call observe(x, y) before step(). Estimate skipped.")  # fmt: skip
            return Outcome(None, ("no-batch", message))
        try:
            estimate = estimate_curvature(
                self.model, self.loss_fn, curvature_batch(batch, self.settings.curvature_batch_size),
                probes=self.probes(), gn=self.settings.gn, generator=generator, layers=self.blocks,
                strategy=self.settings.strategy,
            )  # fmt: skip
        except FloatingPointError as exc:
            return Outcome(None, ("nonfinite", f"curvopt: non-finite curvature at step {step} discarded ({exc})"))
        except Exception as exc:  # estimation must never stop training
            return Outcome(None, (f"error-{type(exc).__name__}", f"curvopt: curvature estimate at step {step} failed "
                                  f"and was skipped: {type(exc).__name__}: {exc}"))  # fmt: skip
        return Outcome(estimate)

    def _combine_ranks(self, outcome: Outcome) -> Outcome:
        """The one collective of an estimate; every rank joins it, also when its own estimate failed."""
        kinds = [k for k in SAMPLE_KINDS if self.settings.gn or k in ("trace", "hess_row_sq")]
        names = [b.name for b in self.blocks]
        layout = dist_utils.Layout(layers=names, numel={b.name: b.numel for b in self.blocks}, kinds=kinds,
                                   probes=self.probes())  # fmt: skip
        estimate, problem = outcome.estimate, outcome.problem
        if estimate is not None and (estimate.layers != names or sorted(estimate.samples) != sorted(kinds)):
            estimate, problem = None, ("layout", "curvopt: the estimate's layers or kinds differ from the wrapper's")
        combined, failed = dist_utils.all_gather_estimate(
            estimate, layout, mode=self.settings.distributed_probes, group=self.process_group,
            device=dist_utils.collective_device(self.process_group),
        )  # fmt: skip
        if combined is None and problem is None:
            message = f"curvopt: rank(s) {failed} could not estimate; the estimate is skipped on all ranks"
            problem = ("rank-failed", message)
        return Outcome(combined, problem)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "probe_tracker": self.probe_tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.probe_tracker.load_state_dict(state["probe_tracker"])
