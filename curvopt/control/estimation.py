"""One curvature estimate at a training step: the curvature batch, the probe budget, the DDP
combine, and what went wrong when there is no estimate.

Two kinds of failure are told apart. A *configuration error* (:class:`~curvopt.CurvatureInputError`:
a non-scalar loss, a model or loss that cannot take the batch, a strategy the model cannot run, no
batch ever given) will fail every estimate: with ``strict`` (the wrapper's first curvature steps,
before any estimate succeeded) :class:`EstimateRunner` raises it, with the message the estimator
gave. Anything else (a non-finite product, a transient exception, a missing batch at one step) is
returned as ``None`` with a warning key and a message, and the wrapper skips that estimate. Under
``torch.distributed`` every rank joins the one collective of :mod:`curvopt.estimators.distributed`,
also when its own estimate failed, so no rank waits forever, and a configuration error on any rank
raises on every rank. An FSDP2-sharded model is different: its estimate is collective by construction
(every rank perturbs its shards along the same global probes and one all-reduce inside the estimate
completes the sums, :mod:`curvopt.engine.sharding`), so the ranks draw shared probes and there is no
second combine.

Strategy. ``"auto"`` is resolved once: when the first estimate had to fall back to finite
differences (no double backward through this model), later estimates go there directly instead of
trying the exact strategy again. The finite-difference self-check runs at the first estimate only.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..engine.batch import CurvatureInputError, Forward, slice_batch, split_batch
from ..engine.finite_difference import FiniteDifferenceWarning
from ..engine.layers import Layer
from ..engine.probes import probe_generator
from ..engine.sharding import is_sharded
from ..engine.strategies import FINITE_DIFFERENCE
from ..estimators import distributed as dist_utils
from ..estimators.budget import ProbeBudgetTracker
from ..estimators.result import SAMPLE_KINDS, CurvatureEstimate
from ..estimators.trace import estimate_curvature
from .settings import CurvatureConfig

Problem = tuple[str, str]  # (warning key, message)


@dataclass
class Outcome:
    """An estimate, or the reason there is none (``error``: a configuration error, re-raised when strict)."""

    estimate: CurvatureEstimate | None
    problem: Problem | None = None
    error: CurvatureInputError | None = None


def curvature_batch(batch: tuple[Any, Any], size: int) -> tuple[Any, Any]:
    """The first ``size`` samples of every tensor in a batch (inputs may be tensors, tuples or dicts)."""
    x, y = split_batch(batch)
    return slice_batch(x, size), slice_batch(y, size)


class EstimateRunner:
    """Runs :func:`~curvopt.estimate_curvature` for the wrapper and keeps its probe stream and K* tracker."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        blocks: Sequence[Layer],
        settings: CurvatureConfig,
        process_group: Any = None,
        forward: Forward | None = None,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.forward = forward
        self.blocks = list(blocks)
        self.settings = settings
        self.process_group = process_group
        self.device = self.blocks[0].params[0].device
        self.generator = probe_generator(settings.seed, self.device)  # probes drawn where the parameters live
        self.probe_tracker = ProbeBudgetTracker(window=20)
        self.sharded = is_sharded([p for block in self.blocks for p in block.params])
        self.strategy = settings.strategy  # "auto" until an estimate shows it must be finite differences
        self.fd_checked = False

    def probes(self) -> int:
        """K for the next estimate: fixed, or K* from the tracker within ``auto_probes``."""
        if self.settings.probes != "auto":
            return int(self.settings.probes)
        low, high = self.settings.auto_probes
        k = max(low, min(high, 8)) if self.probe_tracker.count < 3 else self.probe_tracker.suggest_probes(low, high)
        if self.settings.estimator == "hutchinson":
            return k
        k = max(k, 6)  # the deflated estimators need a sketch and at least two samples
        return k + (k % 2) if self.settings.estimator == "xtrace" else k

    def run(
        self, step: int, batch: tuple[Any, Any] | None, *, strict: bool = False, ever_batched: bool = True
    ) -> Outcome:
        """The estimate of optimizer step ``step`` on ``batch`` (combined over ranks under DDP).

        With ``strict``, a configuration error raises :class:`~curvopt.CurvatureInputError`; no
        batch at all (``ever_batched`` false) counts as one.
        """
        distributed = dist_utils.is_active(self.process_group)
        outcome = self._local(step, batch, distributed, ever_batched)
        if distributed and not self.sharded:
            outcome = self._combine_ranks(outcome, strict)
        if strict and outcome.error is not None:
            raise outcome.error
        if outcome.estimate is not None and outcome.estimate.probes >= 2:
            self.probe_tracker.update(outcome.estimate)
        return outcome

    def _local(self, step: int, batch: tuple[Any, Any] | None, distributed: bool, ever_batched: bool) -> Outcome:
        mode = "shared" if self.sharded else self.settings.distributed_probes  # FSDP: one global probe per draw
        generator = self.generator
        if distributed:
            generator = dist_utils.rank_generator(self.generator, mode, self.process_group)
        if batch is None:
            how = "pass step(batch=(x, y)) or call observe(x, y) before step()"
            if not ever_batched:
                error = CurvatureInputError(f"step {step} is a curvature step but no batch was ever given: {how}")
                return Outcome(None, ("no-batch", f"curvopt: {error}"), error)
            message = f"curvopt: step {step} is a curvature step but no batch was given; {how}. Estimate skipped."
            return Outcome(None, ("no-batch", message))
        try:
            with warnings.catch_warnings():
                if dist_utils.rank(self.process_group) != 0:  # one console for all ranks, as the Notifier does
                    warnings.simplefilter("ignore", FiniteDifferenceWarning)
                estimate = self._estimate(batch, generator)
        except CurvatureInputError as exc:
            message = f"curvopt: curvature estimate at step {step} failed and was skipped: {exc}"
            return Outcome(None, (f"config-{type(exc).__name__}", message), exc)
        except FloatingPointError as exc:
            return Outcome(None, ("nonfinite", f"curvopt: non-finite curvature at step {step} discarded ({exc})"))
        except Exception as exc:  # estimation must never stop training
            return Outcome(
                None,
                (
                    f"error-{type(exc).__name__}",
                    f"curvopt: curvature estimate at step {step} failed and was skipped: {type(exc).__name__}: {exc}",
                ),
            )
        if estimate.strategy == FINITE_DIFFERENCE:
            self.strategy, self.fd_checked = FINITE_DIFFERENCE, True
        return Outcome(estimate)

    def _estimate(self, batch: tuple[Any, Any], generator: torch.Generator) -> CurvatureEstimate:
        return estimate_curvature(
            self.model,
            self.loss_fn,
            curvature_batch(batch, self.settings.curvature_batch_size),
            probes=self.probes(),
            gn=self.settings.gn,
            generator=generator,
            layers=self.blocks,
            strategy=self.strategy,
            forward=self.forward,
            estimator=self.settings.estimator,
            curvature_dtype=self.settings.curvature_dtype,
            fd_check=not self.fd_checked,
        )

    def _combine_ranks(self, outcome: Outcome, strict: bool) -> Outcome:
        """The one collective of an estimate; every rank joins it, also when its own estimate failed."""
        kinds = [k for k in SAMPLE_KINDS if self.settings.gn or k in ("trace", "hess_row_sq")]
        names = [b.name for b in self.blocks]
        layout = dist_utils.Layout(
            layers=names,
            numel={b.name: b.numel for b in self.blocks},
            kinds=kinds,
            probes=self.settings.samples_per_estimate(self.probes()),
        )
        estimate, problem = outcome.estimate, outcome.problem
        if estimate is not None and (estimate.layers != names or sorted(estimate.samples) != sorted(kinds)):
            estimate, problem = None, ("layout", "curvopt: the estimate's layers or kinds differ from the wrapper's")
        combined, failed, fatal = dist_utils.all_gather_estimate(
            estimate,
            layout,
            mode=self.settings.distributed_probes,
            group=self.process_group,
            device=dist_utils.collective_device(self.process_group),
            configuration_error=outcome.error is not None,
        )
        error = outcome.error
        if strict and fatal and error is None:
            error = CurvatureInputError(f"rank(s) {fatal} cannot estimate curvature (a configuration error there)")
        if combined is None and problem is None:
            message = f"curvopt: rank(s) {failed} could not estimate; the estimate is skipped on all ranks"
            problem = ("rank-failed", message)
        return Outcome(combined, problem, error)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "probe_tracker": self.probe_tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.generator.set_state(state["generator"])
        except (RuntimeError, ValueError, TypeError):  # saved on another device type: its stream cannot continue here
            seed = int.from_bytes(hashlib.blake2b(bytes(state["generator"].tolist()), digest_size=8).digest(), "little")
            self.generator.manual_seed(seed % 2**62)
            message = (
                f"curvopt: the checkpoint's probe stream was drawn on another device type; probes on "
                f"{self.device.type} continue from a seed derived from it (estimates stay exact, the "
                "probe sequence differs from the original device's)"
            )
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        self.probe_tracker.load_state_dict(state["probe_tracker"])
