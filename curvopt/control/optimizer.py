"""``CurvatureAwareOptimizer``: any torch optimizer, plus periodic per-layer curvature.

The wrapper *is* a ``torch.optim.Optimizer`` that shares ``param_groups`` and ``state`` with
the optimizer it wraps (as timm's Lookahead does), so torch and timm LR schedulers,
``torch.amp.GradScaler`` and timm's ``NativeScaler`` reach the real groups unchanged.

Every ``every`` optimizer steps it estimates per-layer curvature on a slice of the current
batch (``step(batch=...)`` or an earlier ``observe(x, y)``), feeds the CUSUM monitor and the
LR-scaling policy, and hands metrics and alarms to the loggers and callbacks.

The current batch is the one handed over in this step, also from inside a closure: with
``step(closure)`` the closure runs first (frameworks such as Lightning run the training step, where
``observe`` is called, inside it) and the inner optimizer gets its result, so the estimate uses this
step's batch (before, the estimate ran first and used the batch of the step before). The batch lives in
one shared slot, cleared after every step, so a framework's copy of the wrapper (Lightning's
``LightningOptimizer`` copies its ``__dict__``) hands over to the same estimate. Frameworks that step the
optimizer themselves call :meth:`record_step` instead of :meth:`step` (:mod:`curvopt.integrations`). The parts:
:mod:`~curvopt.control.settings` (validated settings), :mod:`~curvopt.control.estimation` (one
estimate, DDP included), :mod:`~curvopt.control.diagnostics` (the slower inter-layer cadence),
:mod:`~curvopt.control.update_scaling` (how LR scales reach the parameters) and
:mod:`~curvopt.control.notify` (loggers, callbacks, warnings).
"""

from __future__ import annotations

import inspect
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ..engine.batch import split_batch
from ..engine.layers import group_parameters, unwrap_model
from ..engine.operator import curvature_operator
from ..estimators import distributed as dist_utils
from ..estimators.local import local_curvature
from ..estimators.preconditioned import preconditioned_top_eigenpair
from ..estimators.result import CurvatureEstimate
from ..estimators.spectra import layer_spectrum
from . import log_schema
from .diagnostics import InterLayerDiagnostics
from .edge import StepContext
from .estimation import EstimateRunner, curvature_batch
from .monitor import Alarm, CusumMonitor
from .notify import CurvatureSink, Notifier, as_sinks
from .scaling import PolicyContext, make_policy
from .settings import CurvatureConfig
from .update_scaling import ScaledLayer, scaled_step

__all__ = ["CurvatureAwareOptimizer", "CurvatureSink"]


class CurvatureAwareOptimizer(Optimizer):
    """Wraps ``optimizer``; estimates curvature every ``every`` steps (0: never).

    Args:
        optimizer: any ``torch.optim.Optimizer`` (SGD, AdamW, timm optimizers, Lookahead).
        model: the model owning the optimizer's parameters (DDP/compile wrappers allowed).
        loss_fn: ``loss_fn(model(x), y)`` is the training loss.
        config: a :class:`~curvopt.CurvatureConfig`, every curvature option in one record (default: its
            defaults); ``**options`` replace its fields.
        **options: any :class:`~curvopt.CurvatureConfig` field by name: ``every`` (default 500 here: the wrapper
            does not know the run's length; one estimate with K = 8, GN on and 32 samples costs about 12 resnet18
            training steps at batch 128 on CPU, benchmarks/RESULTS.md, and the CUSUM warm-up is 8 estimates, so
            short runs want a smaller ``every``), ``probes``, ``curvature_batch_size``, ``gn``, ``strategy``,
            ``estimator``, ``curvature_dtype``, ``seed``, ``history``, ``auto_probes``, ``distributed_probes``
            (estimates, alarms and LR scales are identical on all ranks; only rank 0 logs, warns and calls the
            alarm callbacks), ``inter_every``, ``inter_probes``, ``spectrum_steps``, ``spectrum_starts``;
            :func:`curvopt.control.settings.describe_options` lists each one's meaning.
        monitor: ``"cusum"`` (default settings), a ``CusumMonitor``, or ``None``.
        lr_scaling: ``None`` (off), a name in ``curvopt.LR_SCALING_POLICIES`` or a policy object (see
            :mod:`curvopt.control.scaling`).
        logger: a sink (``log``/``alert``) or a list of them; failures warn once, never raise.
        callbacks: called as ``callback(alarm)`` for every alarm.
        layers: custom grouping, as for :func:`curvopt.estimate_curvature`.
        forward: ``forward(model, inputs) -> outputs`` when the model is not called as
            ``model(inputs)`` (dict inputs: ``lambda m, x: m(**x).logits``); used by every estimate.
        process_group: the group to reduce over (default: the default group, when initialised).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        config: CurvatureConfig | None = None,
        *,
        monitor: str | CusumMonitor | None = "cusum",
        lr_scaling: object = None,
        logger: CurvatureSink | Iterable[CurvatureSink] | None = None,
        callbacks: Iterable[Callable[[Alarm], None]] = (),
        layers: Any = None,
        forward: Any = None,
        process_group: Any = None,
        **options: Any,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable")
        if forward is not None and not callable(forward):
            raise TypeError(f"forward must be callable as forward(model, inputs), got {type(forward).__name__}")
        self.config = CurvatureConfig.build(config, **options)
        seed, history = self.config.seed, self.config.history
        _check_ownership(optimizer, model)
        # Optimizer.__init__ sets up hooks and step patching; from then on `param_groups` and `state` read through
        # to the wrapped optimizer (properties below), also after its load_state_dict replaced them.
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.optimizer = optimizer
        self.defaults = optimizer.defaults

        self.model = model
        self.loss_fn = loss_fn
        self.process_group = process_group
        self.monitor = _make_monitor(monitor)
        self.lr_policy = make_policy(lr_scaling)
        self._policy_takes_context = (
            self.lr_policy is not None and len(inspect.signature(self.lr_policy.update).parameters) >= 2
        )
        self._step_policy_takes_context = getattr(self.lr_policy, "every_step", False) and (
            len(inspect.signature(self.lr_policy.step_update).parameters) >= 2
        )
        self.policy_generator = torch.Generator().manual_seed(seed + 2)  # the policies' own probes
        self.layer_blocks = group_parameters(unwrap_model(model), layers)
        self.runner = EstimateRunner(model, loss_fn, self.layer_blocks, self.config, process_group, forward)
        self.diagnostics = InterLayerDiagnostics(model, loss_fn, self.layer_blocks, self.config, forward)
        self.notifier = Notifier(as_sinks(logger), callbacks, process_group)

        self.step_count = 0
        self.history: deque[dict[str, float]] = deque(maxlen=history)
        self.alarms: list[Alarm] = []
        self.lr_scales: dict[str, float] = {b.name: 1.0 for b in self.layer_blocks}
        self.last_estimate: CurvatureEstimate | None = None
        self.skipped_estimates = 0
        self.skips: dict[str, Any] = {}  # first_step, last_step, last_reason of skipped estimates
        self.estimate_seconds: deque[float] = deque(maxlen=history)  # wall time of each estimate in this process
        self._slot = _BatchSlot()
        self.notifier.config(self.settings())

    # ------------------------------------------------------------------ the wrapped optimizer's groups and state
    # Shared, not copied: torch's load_state_dict and FSDP's set_optimizer_state_dict replace the wrapped
    # optimizer's lists, so the wrapper always reads them from it (schedulers, GradScaler and timm reach the real
    # groups whoever loaded a state). Before the wrapped optimizer is set (inside Optimizer.__init__), own ones.
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        inner = self.__dict__.get("optimizer")
        return inner.param_groups if inner is not None else self.__dict__.setdefault("_groups", [])

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        inner = self.__dict__.get("optimizer")
        if inner is not None:
            inner.param_groups = value
        else:
            self.__dict__["_groups"] = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        inner = self.__dict__.get("optimizer")
        return inner.state if inner is not None else self.__dict__.setdefault("_state", {})

    @state.setter
    def state(self, value: Any) -> None:
        inner = self.__dict__.get("optimizer")
        if inner is not None:
            inner.state = value
        else:
            self.__dict__["_state"] = value

    # ------------------------------------------------------------------ settings, as attributes
    every = property(lambda self: self.config.interval, doc="Estimate every N optimizer steps (0: never).")
    probes = property(lambda self: self.config.probes, doc="K, or ``'auto'``.")
    curvature_batch_size = property(lambda self: self.config.curvature_batch_size)
    gn = property(lambda self: self.config.gn, doc="Whether Gauss-Newton traces and GN-Gap are estimated.")
    strategy = property(lambda self: self.config.strategy, doc="The product strategy.")
    loggers = property(lambda self: self.notifier.loggers, doc="The sinks metrics and alarms go to.")
    callbacks = property(lambda self: self.notifier.callbacks, doc="Functions called with every alarm.")
    generator = property(lambda self: self.runner.generator, doc="The probe generator (checkpointed).")
    probe_tracker = property(lambda self: self.runner.probe_tracker, doc="The K* variance tracker.")
    last_block_norms = property(lambda self: self.diagnostics.last_block_norms)
    last_spectra = property(lambda self: self.diagnostics.last_spectra)

    @property
    def monitoring(self) -> bool:
        return self.config.interval > 0

    @property
    def estimated_last_step(self) -> bool:
        """Whether the latest optimizer step (``step_count``) made a curvature estimate."""
        return bool(self.history) and self.history[-1]["step"] == self.step_count

    # ------------------------------------------------------------------ torch.optim interface
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Called once by Optimizer.__init__ (before self.optimizer exists) for each group.
        if "optimizer" not in self.__dict__:
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)

    def observe(self, inputs: Any, targets: Any) -> None:
        """Hand the wrapper this step's batch, for code that calls a bare ``step()``."""
        self._hand_over((inputs, targets))

    def add_logger(self, sink: CurvatureSink) -> None:
        """Send metrics and alarms to one more sink from now on (it gets :meth:`settings` first)."""
        self.notifier.loggers.append(sink)
        self.notifier.config(self.settings(), only=sink)

    @property
    def _pending_batch(self) -> tuple[Any, Any] | None:
        return self._slot.batch

    def _hand_over(self, batch: Any) -> None:
        split_batch(batch)  # a wrong batch raises here, where it is given, not at the next curvature step
        self._slot.put((batch[0], batch[1]))

    def step(self, closure: Callable[[], Any] | None = None, *, batch: tuple[Any, Any] | None = None) -> Any:
        """Inner ``step(closure)``; on every ``every``-th step, estimate curvature first.

        ``batch`` is ``(inputs, targets)`` (checked here). A configuration error that will fail every
        estimate (a non-scalar loss, a batch the model or loss cannot take, no batch ever given)
        raises :class:`~curvopt.CurvatureInputError` at the first curvature step; later problems of one
        step (a missing batch, non-finite curvature) skip that estimate with one warning. A ``closure``
        runs first, once (its result is what the inner optimizer's first closure call returns), so a batch
        it hands over is this step's.
        """
        inner_closure = closure
        if closure is not None:
            inner_closure = _replay_first(closure)
        if batch is not None:
            self._hand_over(batch)
        self._before_update()
        inner = self.optimizer
        result = scaled_step(
            inner, lambda: inner.step(inner_closure) if closure is not None else inner.step(), self.scaled_layers()
        )
        self._after_update()
        return result

    def record_step(self, batch: tuple[Any, Any] | None = None) -> None:
        """Count an optimizer step that a framework takes itself (Hugging Face Trainer, Lightning), estimating
        first when it is due, on ``batch`` or the one handed over by :meth:`observe`. Call it right before the
        framework's ``optimizer.step()``. With ``lr_scaling`` the scales for that step are ready afterwards in
        :meth:`scaled_layers`; the framework's step cannot be wrapped, so the caller applies them to its update
        (:func:`~curvopt.control.update_scaling.snapshot` before, :func:`~curvopt.control.update_scaling.scale_update`
        after)."""
        if batch is not None:
            self._hand_over(batch)
        self._before_update()
        self._after_update()

    def _before_update(self) -> None:
        """The curvature work of the upcoming step: the estimate and the inter-layer diagnostics when due, then a
        per-step policy's scales (the trust ratio, the edge: from this step's gradients)."""
        upcoming = self.step_count + 1
        if self.config.due(upcoming):
            self._estimate_and_update()
        if self.config.inter_due(upcoming) and self.notifier.reports:
            self._inter_layer_diagnostics()
        if getattr(self.lr_policy, "every_step", False):
            self.lr_scales |= self._step_policy_update()

    def _after_update(self) -> None:
        self._slot.batch = None
        self.step_count += 1

    def scaled_layers(self) -> list[ScaledLayer]:
        """(s_l, the layer's parameters) for every layer whose scale is not 1 at the step about to be taken."""
        if self.lr_policy is None:
            return []
        return [(self.lr_scales[b.name], b.params) for b in self.layer_blocks if self.lr_scales.get(b.name, 1.0) != 1.0]

    # ------------------------------------------------------------------ estimation
    def _estimate_and_update(self) -> None:
        """Estimate at the upcoming step, then feed the monitor, the LR policy and the loggers."""
        step = self.step_count + 1
        strict = self.last_estimate is None and not self.history  # nothing has worked yet: a config error is final
        started = time.perf_counter()
        outcome = self.runner.run(step, self._pending_batch, strict=strict, ever_batched=self._slot.ever)
        seconds = time.perf_counter() - started
        if outcome.estimate is None:
            self.skipped_estimates += 1
            reason = outcome.problem[1] if outcome.problem is not None else "unknown"
            self.skips = {"first_step": self.skips.get("first_step", step), "last_step": step, "last_reason": reason}
            if outcome.problem is not None:
                self.notifier.warn_once(*outcome.problem)
            self.notifier.metrics(
                step, {log_schema.SKIPPED: float(self.skipped_estimates), log_schema.SKIP_REASON: reason}
            )
            return
        metrics, new_alarms = self._absorb(step, outcome.estimate)
        self.estimate_seconds.append(seconds)  # wall time: kept apart from the (replayable, rank-identical) history
        self.history.append({"step": float(step), **metrics})
        self.notifier.metrics(step, metrics)
        for alarm in new_alarms:
            self.alarms.append(alarm)
            self.notifier.alarm(alarm)

    def _absorb(self, step: int, estimate: CurvatureEstimate) -> tuple[dict[str, float], list[Alarm]]:
        """Fold one estimate into the monitor and the LR policy; return its metrics and new alarms."""
        self.last_estimate = estimate
        metrics = log_schema.prefixed(estimate.to_dict())
        metrics[log_schema.PROBES] = float(estimate.probes)
        new_alarms: list[Alarm] = []
        if self.monitor is not None:
            new_alarms = self.monitor.update(step, estimate)
            metrics |= log_schema.prefixed(self.monitor.statistics())
        if self.lr_policy is not None:
            if self._policy_takes_context:
                self.lr_scales |= self.lr_policy.update(estimate, self._policy_context())
            else:
                self.lr_scales |= self.lr_policy.update(estimate)
            metrics |= {log_schema.per_layer("lr_scale", k): v for k, v in self.lr_scales.items()}
        metrics[log_schema.ALARM] = float(bool(new_alarms))
        return metrics, new_alarms

    def _step_policy_update(self) -> dict[str, float]:
        """A per-step policy's scales for the upcoming step (:class:`~curvopt.control.edge.StepContext` for the
        policies that take one)."""
        if not self._step_policy_takes_context:
            return self.lr_policy.step_update(self.layer_blocks)
        params = [p for b in self.layer_blocks for p in b.params]
        measure = None if self._pending_batch is None else self._measure_preconditioned
        return self.lr_policy.step_update(
            self.layer_blocks, StepContext(self.step_count + 1, self.optimizer, params, measure)
        )

    def _measure_preconditioned(
        self, scale: list[torch.Tensor], start: list[torch.Tensor] | None, iterations: int
    ) -> tuple[float, list[torch.Tensor]]:
        """λ_max(D H D) on this step's curvature batch (averaged over ranks); NaN when it cannot be measured."""
        batch = curvature_batch(self._pending_batch, self.config.curvature_batch_size)
        try:
            with curvature_operator(
                self.model,
                self.loss_fn,
                batch,
                layers=self.layer_blocks,
                generator=self.policy_generator,
                strategy=self.runner.strategy,
                forward=self.runner.forward,
            ) as op:
                ratio, vector = preconditioned_top_eigenpair(
                    op, scale, start=start, iterations=iterations, generator=self.policy_generator
                )
        except Exception as exc:  # a measurement must never stop training: the scale is carried forward
            self.notifier.warn_once(
                f"edge-{type(exc).__name__}",
                f"curvopt: lr_scaling='edge' could not measure "
                f"at step {self.step_count + 1}: {type(exc).__name__}: {exc}",
            )
            # NaN (a measurement the policy skips), still taking part in the collectives below: the other ranks
            # wait in them, and the NaN reaches them too, so every rank skips this measurement
            ratio, vector = float("nan"), [torch.zeros_like(s) for s in scale]
        if dist_utils.is_active(self.process_group):
            # each rank measured on its own shard of the batch: one ratio, and one eigenvector to carry it forward
            # with, so that every rank applies the same scale
            ratio = dist_utils.mean_over_ranks(ratio, self.process_group)
            vector = dist_utils.broadcast_from_first(vector, self.process_group)
        return ratio, vector

    def _policy_context(self) -> PolicyContext:
        """What a policy may ask for at this step, computed lazily on the curvature batch."""
        batch = curvature_batch(self._pending_batch, self.config.curvature_batch_size)
        group_lr = {id(p): g["lr"] for g in self.optimizer.param_groups for p in g["params"]}
        base_lrs = {b.name: float(group_lr.get(id(b.params[0]), 0.0)) for b in self.layer_blocks}

        def top_eigenvalues() -> dict[str, float]:
            spectra = layer_spectrum(
                self.model,
                self.loss_fn,
                batch,
                layers=self.layer_blocks,
                steps=8,
                slq_probes=0,
                generator=self.policy_generator,
                strategy=self.config.strategy,
                forward=self.runner.forward,
            )
            return {name: s.top[0] for name, s in spectra.items()}

        def local() -> dict[str, float]:
            return local_curvature(
                self.model,
                self.layer_blocks,
                batch,
                probes=4,
                generator=self.policy_generator,
                forward=self.runner.forward,
            )

        return PolicyContext(self.layer_blocks, base_lrs, top_eigenvalues, local)

    def _inter_layer_diagnostics(self) -> None:
        """Block norms and per-layer spectra on the curvature batch; logged, never applied."""
        step = self.step_count + 1
        if self._pending_batch is None:
            return
        try:
            metrics = self.diagnostics.run(curvature_batch(self._pending_batch, self.config.curvature_batch_size))
        except Exception as exc:  # diagnostics must never stop training
            self.notifier.warn_once(
                f"inter-{type(exc).__name__}",
                f"curvopt: inter-layer diagnostics at step {step} failed and were skipped: {type(exc).__name__}: {exc}",
            )
            return
        self.notifier.metrics(step, metrics)

    def settings(self) -> dict[str, Any]:
        """The wrapper's configuration as plain values (for run configs and logs)."""
        c = self.config
        return {
            "optimizer": type(self.optimizer).__name__,
            "every": c.interval,
            "probes": c.probes,
            "curvature_batch_size": c.curvature_batch_size,
            "gn": c.gn,
            "strategy": c.strategy,
            "estimator": c.estimator,
            "curvature_dtype": c.curvature_dtype,
            "distributed_probes": c.distributed_probes,
            "inter_every": c.inter_every,
            "inter_probes": c.inter_probes,
            "spectrum_steps": c.spectrum_steps,
            "spectrum_starts": c.spectrum_starts,
            "world_size": dist_utils.world_size(self.process_group),
            "monitor": None if self.monitor is None else {"name": "cusum", **self.monitor.settings()},
            "lr_scaling": None if self.lr_policy is None else getattr(self.lr_policy, "name", repr(self.lr_policy)),
            "layers": [b.name for b in self.layer_blocks],
            "layer_types": {b.name: b.kind for b in self.layer_blocks},
        }

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Inner optimizer state plus everything needed to continue monitoring exactly."""
        runner = self.runner.state_dict()
        return {
            "optimizer": self.optimizer.state_dict(),
            "curvopt": {
                "step_count": self.step_count,
                "generator": runner["generator"],
                "inter_generator": self.diagnostics.generator.get_state(),
                "policy_generator": self.policy_generator.get_state(),
                "monitor": None if self.monitor is None else self.monitor.state_dict(),
                "lr_policy": None if self.lr_policy is None else self.lr_policy.state_dict(),
                "lr_scales": dict(self.lr_scales),
                "alarms": [a.to_dict() for a in self.alarms],
                "history": list(self.history),
                "skipped_estimates": self.skipped_estimates,
                "skips": dict(self.skips),
                "probe_tracker": runner["probe_tracker"],
            },
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if "optimizer" not in state_dict or "curvopt" not in state_dict:
            raise ValueError("not a CurvatureAwareOptimizer state_dict (expected 'optimizer' and 'curvopt' keys)")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.load_curvature_state(state_dict["curvopt"])

    def load_curvature_state(self, extra: Mapping[str, Any]) -> None:
        """The curvature part of a state dict (``state_dict()["curvopt"]``) alone: for a framework or FSDP that
        restores the optimizer's own state itself."""
        self.step_count = int(extra["step_count"])
        self.runner.load_state_dict({"generator": extra["generator"], "probe_tracker": extra["probe_tracker"]})
        if "inter_generator" in extra:
            self.diagnostics.generator.set_state(extra["inter_generator"])
        if "policy_generator" in extra:
            self.policy_generator.set_state(extra["policy_generator"])
        if self.monitor is not None and extra["monitor"] is not None:
            self.monitor.load_state_dict(extra["monitor"])
        if self.lr_policy is not None and extra["lr_policy"] is not None:
            self.lr_policy.load_state_dict(extra["lr_policy"])
        self.lr_scales = dict(extra["lr_scales"])
        self.alarms = [Alarm.from_dict(a) for a in extra["alarms"]]
        self.history = deque(extra["history"], maxlen=self.history.maxlen)
        self.skipped_estimates = int(extra["skipped_estimates"])
        self.skips = dict(extra.get("skips", {}))

    def __repr__(self) -> str:
        return (
            f"CurvatureAwareOptimizer({type(self.optimizer).__name__}, every={self.every}, probes={self.probes}, "
            f"monitor={type(self.monitor).__name__ if self.monitor else None}, "
            f"lr_scaling={getattr(self.lr_policy, 'name', self.lr_policy)})"
        )


class _BatchSlot:
    """The batch handed over for the upcoming step and whether one ever was. One object, so copies of the wrapper's
    ``__dict__`` (Lightning's ``LightningOptimizer``) share it."""

    def __init__(self) -> None:
        self.batch: tuple[Any, Any] | None = None
        self.ever = False

    def put(self, batch: tuple[Any, Any]) -> None:
        self.batch, self.ever = batch, True


def _replay_first(closure: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``closure`` now; the returned callable gives that result on its first call and runs ``closure`` on the
    later ones (optimizers that re-evaluate, e.g. LBFGS)."""
    with torch.enable_grad():
        first = [closure()]

    def replay() -> Any:
        return first.pop() if first else closure()

    return replay


def _check_ownership(optimizer: Optimizer, model: nn.Module) -> None:
    owned = {id(p) for p in unwrap_model(model).parameters()}
    foreign = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in owned]
    if foreign:
        raise ValueError(
            f"{len(foreign)} parameter tensor(s) of the optimizer do not belong to the model "
            f"{type(model).__name__}: pass the model whose parameters the optimizer updates"
        )


def _make_monitor(monitor: str | CusumMonitor | None) -> CusumMonitor | None:
    if monitor is None or isinstance(monitor, CusumMonitor):
        return monitor
    if monitor == "cusum":
        return CusumMonitor()
    raise ValueError(f"unknown monitor {monitor!r}; expected 'cusum', a CusumMonitor or None")
