"""What the framework callbacks share: recording the training batch and tracking curvature beside the optimizer.

A framework steps its optimizer itself, so a callback cannot pass the batch to ``step(batch=...)``. Instead:

* :class:`BatchRecorder` keeps the inputs of the model's latest *training* forward (a forward pre-hook; forwards
  in eval mode and curvopt's own probing forwards are ignored), turned into an ``(inputs, targets)`` pair;
* :class:`TrackingSession` is a :class:`~curvopt.CurvatureAwareOptimizer` around the framework's optimizer that
  never steps it: right before the framework's ``optimizer.step()`` the callback calls :meth:`TrackingSession.step`,
  which counts the step and, when due, estimates on the recorded batch at the parameters the step starts from,
  exactly as the wrapper would. Metrics and alarms go to the session's sinks (JSONL, the framework's loggers), its
  state goes into the framework's checkpoints (``state_dict`` with the JSONL position, so a resume cuts the log back).

**Steps.** One convention everywhere: an estimate is stamped with the optimizer step it precedes, counted from 1
(``curv/step``; the 4th ``optimizer.step()`` is step 4), in the JSONL, in the frameworks' loggers and in reports.
The Hugging Face Trainer's ``global_step`` after that step is the same number; Lightning's ``trainer.global_step``
inside it is one lower (it counts finished steps), so the callbacks stamp the estimate's own step.

**Cadence.** ``every=None`` (the callbacks' default) chooses it from the run's length
(:mod:`curvopt.control.cadence`, the rule ``curvopt train`` uses) and says in one line at train start how many
estimates the run makes, when the monitor is ready and what it costs; an ``every`` that leaves the monitor no
verdict is warned about.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from ..control import log_schema
from ..control.averaging import ROLLBACK_AVERAGE, ModelAverage
from ..control.cadence import CadencePlan, describe_cadence, plan_cadence
from ..control.monitor import Alarm, CusumMonitor
from ..control.optimizer import CurvatureAwareOptimizer
from ..control.rollback import RollbackOnAlarm
from ..control.scaling import make_policy
from ..control.settings import CurvatureConfig
from ..control.update_scaling import ScaledLayer, scale_update, snapshot
from ..engine.context import is_probing
from ..reporting.loggers import JsonlLogger, truncate_log

ON_ALARM = ("warn", "stop", "rollback")
"""What a framework callback does at an alarm: log it; end training; or restore the model and optimizer state from
before the alarm's change point (an in-memory, log-spaced ring of ``rollback_keep`` snapshots,
:class:`~curvopt.RollbackOnAlarm`, or the framework's own checkpoints, :class:`CheckpointRollback`; no validation
split needed) and end training with it."""
ROLLBACK_KEEP = 8
"""Snapshots a callback's rollback keeps in host memory: each is a copy of the model's and the optimizer's state."""

Capture = Callable[[tuple[Any, ...], dict[str, Any]], Any]
"""Turns a forward's ``(args, kwargs)`` into the ``(inputs, targets)`` pair the estimate needs (or ``None``)."""

CALLBACK_OPTIONS = ("monitor", "layers", "callbacks", "lr_scaling")
"""The :class:`~curvopt.CurvatureAwareOptimizer` arguments besides the :class:`~curvopt.CurvatureConfig` record that
a framework callback takes under the same names."""


def callback_options(config: CurvatureConfig | None, settings: Mapping[str, Any], **arguments: Any) -> dict[str, Any]:
    """A callback's wrapper arguments: the record (``config`` with ``settings`` replacing its fields; TypeError for
    a keyword that is not a curvature option) and :data:`CALLBACK_OPTIONS`."""
    options: dict[str, Any] = {"config": CurvatureConfig.build(config, **settings)}
    options |= {name: arguments[name] for name in CALLBACK_OPTIONS}
    make_policy(options["lr_scaling"])  # an unknown policy name fails here, not at train start
    options["callbacks"] = list(options["callbacks"])
    return options


ROLLBACK_FROM = ("memory", "checkpoints")
"""Where a callback's rollback finds the state it restores: its own in-memory ring (single process), or the
framework's checkpoints (every rank; the framework must save them: HF ``save_steps``, Lightning ``ModelCheckpoint``)."""


@dataclass(frozen=True)
class AlarmResponse:
    """What a framework callback does at an alarm; the three callback arguments of the same names, checked here.

    Args:
        on_alarm: one of :data:`ON_ALARM`.
        rollback_keep: ``"rollback"``: snapshots kept in host memory (model + optimizer state each; at least 3).
        rollback_average: ``"rollback"``: the half-life, in epochs, of the weight average the snapshots hold and the
            rollback restores (:class:`~curvopt.RollbackOnAlarm`'s ``average``); ``None``: the weights themselves.
        rollback_from: ``"rollback"``: one of :data:`ROLLBACK_FROM`.
    """

    on_alarm: str = "warn"
    rollback_keep: int = ROLLBACK_KEEP
    rollback_average: float | None = ROLLBACK_AVERAGE
    rollback_from: str = "memory"

    def __post_init__(self) -> None:
        if self.on_alarm not in ON_ALARM:
            raise ValueError(f"on_alarm must be one of {ON_ALARM}, got {self.on_alarm!r}")
        if self.rollback_keep < 3:
            raise ValueError(
                f"rollback_keep must be >= 3 (the first, the latest and one between), got {self.rollback_keep}"
            )
        if self.rollback_from not in ROLLBACK_FROM:
            raise ValueError(f"rollback_from must be one of {ROLLBACK_FROM}, got {self.rollback_from!r}")
        average = self.rollback_average
        if average is not None and not (isinstance(average, (int, float)) and math.isfinite(average) and average > 0):
            raise ValueError(f"rollback_average must be a positive number of epochs or None, got {average!r}")

    def average_steps(self, steps_per_epoch: float | None) -> float | None:
        """The weight average's half-life in steps, from the epoch's length (``None``: no average; an unknown epoch
        length restores the weights themselves, with a warning)."""
        if self.rollback_average is None:
            return None
        if steps_per_epoch is None or not math.isfinite(steps_per_epoch) or steps_per_epoch <= 0:
            warnings.warn(
                "curvopt: the run's epoch length is unknown, so the rollback restores the weights themselves, "
                "not their average (rollback_average needs the steps per epoch)",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        return self.rollback_average * steps_per_epoch


SUMMARY_KEYS = (
    log_schema.STEP,
    *(log_schema.total(q) for q in ("trace", "trace_se", "gn_trace", "gn_gap", "frob")),
    log_schema.LOSS,
    log_schema.cusum("aggregate"),
    log_schema.cusum("threshold"),
    log_schema.MONITOR_READY,
    log_schema.ALARM,
    log_schema.SKIPPED,
)
"""The metrics a callback puts into the framework's own log rows by default (per-layer ones go to the JSONL)."""


class BatchRecorder:
    """The latest training batch of ``model``, from a forward pre-hook (removed by :meth:`remove`)."""

    def __init__(self, model: nn.Module, capture: Capture) -> None:
        self.capture = capture
        self.batch: Any = None
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if module.training and not is_probing() and torch.is_grad_enabled():
            self.batch = self.capture(args, kwargs)

    def remove(self) -> None:
        self.handle.remove()


def stamped_scalars(step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
    """An estimate's scalar metrics with its own optimizer step as ``curv/step``, for a framework's loggers."""
    return {log_schema.STEP: float(step), **{k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}}


class _Collector:
    """A sink keeping the latest estimate's metrics and the alarms raised since they were last taken."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.step = 0
        self.alarms: list[Alarm] = []

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if log_schema.LOSS in metrics or log_schema.SKIPPED in metrics:  # an estimate (or a skipped one)
            self.step = step
            self.metrics = stamped_scalars(step, metrics)

    def alert(self, alarm: Alarm) -> None:
        self.alarms.append(alarm)

    def take(self) -> tuple[dict[str, float], list[Alarm]]:
        metrics, alarms = self.metrics, self.alarms
        self.metrics, self.alarms = {}, []
        return metrics, alarms


RestoreCheckpoint = Callable[[int], "tuple[int, Mapping[str, Any] | None] | None"]
"""A framework's restore: load the model and optimizer of its latest checkpoint taken before optimizer step ``onset``
(every rank), and return ``(the checkpoint's step, curvopt's state saved with it or None)``; ``None``: none."""


class CheckpointRollback:
    """An alarm's rollback through the framework's own checkpoints, on every rank (run by the session, not a sink).

    At every estimate it folds the weights into its exponential average (``average``: half-life in steps; ``None``:
    none), which the session saves with the framework's checkpoints; at an alarm the framework restores its latest
    checkpoint before the change point (``restore``), then the average saved with that checkpoint replaces its
    weights, and the step's gradients are dropped so the framework's optimizer step changes nothing."""

    def __init__(
        self,
        model: nn.Module,
        restore: RestoreCheckpoint,
        average: float | None,
        batchnorm_inputs: Callable[[], Iterable[Any]] | None = None,
        forward: Any = None,
    ) -> None:
        self.model, self.restore = model, restore
        self.average = ModelAverage(model, average, batchnorm_inputs, forward) if average is not None else None
        self.restored: list[tuple[int, int]] = []  # (alarm step, checkpoint step)

    def sample(self, step: int) -> None:
        if self.average is not None:
            self.average.sample(step)

    def alert(self, alarm: Alarm) -> bool:
        """Restore; False (with a warning) when the framework has no checkpoint before the change point."""
        onset = alarm.onset_step if alarm.onset_step is not None else alarm.step
        found = self.restore(onset)
        if found is None:
            warnings.warn(
                f"curvopt: the alarm at step {alarm.step} found no framework checkpoint from before its change point "
                f"(step {onset}): the model is left as it is (save checkpoints more often, or rollback_from='memory')",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        step, saved = found
        average = (saved or {}).get("rollback_average")
        if self.average is not None and average is not None and average.get("state"):
            self.average.load_into_model(average["state"])
        for param in self.model.parameters():
            param.grad = None
        self.restored.append((alarm.step, step))
        return True


class TrackingSession:
    """A curvature wrapper beside a framework's optimizer (see the module docstring).

    Args:
        optimizer: the framework's optimizer (its ``param_groups`` are shared, nothing else is touched).
        model: the model the framework trains (parameters the optimizer does not hold are not probed).
        loss_fn, forward, options: as for :class:`~curvopt.CurvatureAwareOptimizer` (with ``lr_scaling`` the
            callback calls :meth:`after_optimizer_step` once the framework has stepped: the update is scaled then).
        log_path: the JSONL log (``None``: none), written by the reporting process only.
        sinks: further sinks (a framework's loggers).
        reports: whether this process writes logs (rank 0).
        total_steps: the run's optimizer steps, for a cadence chosen from them (``options["every"]`` is ``None``);
            ``None`` or ≤ 0 when the framework does not know (every :data:`~curvopt.control.cadence.DEFAULT_EVERY`).
        response: what to do at an alarm (:class:`AlarmResponse`; ``"rollback"``: single process only).
        steps_per_epoch: optimizer steps per epoch (``None``: unknown), for the rollback's weight average.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
        *,
        forward: Any = None,
        options: Mapping[str, Any],
        log_path: str | Path | None,
        sinks: list[Any],
        reports: bool,
        total_steps: int | None = None,
        response: AlarmResponse = AlarmResponse(),
        steps_per_epoch: float | None = None,
        restore_checkpoint: RestoreCheckpoint | None = None,
        batchnorm_inputs: Callable[[], Iterable[Any]] | None = None,
    ) -> None:
        on_alarm = response.on_alarm
        from_memory = on_alarm == "rollback" and response.rollback_from == "memory"
        if from_memory and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(
                "on_alarm='rollback' with rollback_from='memory' needs a single process (the snapshots are kept by "
                "the reporting process); under DDP use rollback_from='checkpoints' (every rank restores the "
                "framework's latest checkpoint before the change point) or on_alarm='stop'"
            )
        options = dict(options)
        self.cadence = choose_cadence(options, total_steps)
        self.collector = _Collector()
        self.jsonl = JsonlLogger(log_path) if log_path is not None and reports else None
        self.on_alarm = on_alarm
        average = response.average_steps(steps_per_epoch) if on_alarm == "rollback" else None
        self.rollback = None
        if from_memory:
            self.rollback = RollbackOnAlarm(
                model,
                optimizer,
                keep=response.rollback_keep,
                average=average,
                batchnorm_inputs=batchnorm_inputs,
                forward=forward,
            )
        self.checkpoint_rollback = None
        if on_alarm == "rollback" and not from_memory:
            if restore_checkpoint is None:
                raise ValueError("rollback_from='checkpoints' needs the framework's checkpoints (none given)")
            self.checkpoint_rollback = CheckpointRollback(model, restore_checkpoint, average, batchnorm_inputs, forward)
        loggers = [self.collector, *([self.jsonl] if self.jsonl is not None else []), *sinks]
        if self.rollback is not None:  # snapshots before the JSONL sees an alarm, restored before the framework steps
            loggers.insert(1, self.rollback)
        self.wrapper = CurvatureAwareOptimizer(optimizer, model, loss_fn, forward=forward, logger=loggers, **options)
        self._scaled: list[ScaledLayer] = []  # the layers whose update the framework's step in progress scales
        self._before: list[list[torch.Tensor]] = []
        if reports:
            self.cadence.announce()

    def step(self, batch: Any) -> tuple[dict[str, float], list[Alarm]]:
        """Count one optimizer step (estimating on ``batch`` when due, and keeping θ_old of the layers ``lr_scaling``
        scales at this step, for :meth:`after_optimizer_step`); returns the new metrics and alarms. With
        ``on_alarm="rollback"`` an alarm has already restored the state before its change point and dropped this
        step's gradients (the framework's optimizer step then changes nothing)."""
        before = len(self.wrapper.alarms)
        self.wrapper.record_step(batch)
        metrics, _ = self.collector.take()
        alarms = self.wrapper.alarms[before:]  # the same on every rank (the collector hears rank 0 only)
        if self.checkpoint_rollback is not None:
            if self.wrapper.estimated_last_step:  # record_step counted this step: sample the average at an estimate
                self.checkpoint_rollback.sample(self.wrapper.step_count)
            if alarms:
                self.checkpoint_rollback.alert(alarms[0])
        self._scaled = self.wrapper.scaled_layers()
        self._before = snapshot(self._scaled)
        return metrics, alarms

    def after_optimizer_step(self) -> None:
        """Scale the update the framework's step just made, layer by layer: θ ← θ_old + s_l (θ_new − θ_old) (the
        ``lr_scaling`` policy's scales for that step; nothing to do without one, or with every scale at 1). Exact
        for any optimizer; a step the framework skipped (an fp16 overflow) leaves θ_new = θ_old either way."""
        scale_update(self._scaled, self._before)
        self._scaled, self._before = [], []

    def should_stop(self, alarms: list[Alarm]) -> bool:
        """Whether the framework should end training after these alarms."""
        return bool(alarms) and self.on_alarm in ("stop", "rollback")

    def log_training(self, step: int, metrics: Mapping[str, float]) -> None:
        """The framework's own training metrics (``train/loss``, ``train/lr``) into the JSONL at ``step``, so reports
        show them beside the curvature."""
        if self.jsonl is not None and metrics:
            self.jsonl.log_training(step, metrics)

    def log_evaluation(self, epoch: float, step: int, metrics: Mapping[str, float]) -> None:
        """The framework's evaluation metrics (``eval/loss``) into the JSONL."""
        if self.jsonl is not None and metrics:
            self.jsonl.log_epoch(epoch, {"step": step, **metrics})

    def state_dict(self) -> dict[str, Any]:
        average = self.checkpoint_rollback.average if self.checkpoint_rollback is not None else None
        return {
            "wrapper": self.wrapper.state_dict()["curvopt"],
            "log_position": self.jsonl.position() if self.jsonl is not None else None,
            "rollback_average": average.state_dict() if average is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The wrapper's curvature state (the framework restores its optimizer itself); the JSONL cut back to the
        checkpoint, so no step is logged twice."""
        self.wrapper.load_curvature_state(state["wrapper"])
        average = self.checkpoint_rollback.average if self.checkpoint_rollback is not None else None
        if average is not None and state.get("rollback_average"):
            average.load_state_dict(state["rollback_average"])
        if self.jsonl is not None and state.get("log_position") is not None:
            path = self.jsonl.path
            self.jsonl.close()
            truncate_log(path, int(state["log_position"]))
            self.jsonl = JsonlLogger(path)
            self.wrapper.notifier.loggers[1] = self.jsonl

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()


@dataclass(frozen=True)
class RunCadence:
    """A callback run's cadence: the plan, and the products per estimate and batch (for its cost)."""

    plan: CadencePlan
    probes: int | str
    batch: int | None

    def line(self) -> str:
        return "curvopt: " + describe_cadence(self.plan, "every=", probes=self.probes, batch=self.batch)

    def announce(self) -> None:
        """Print the line; warn when a cadence the user chose leaves the monitor no verdict."""
        print(self.line(), flush=True)
        if self.plan.chosen and not self.plan.gives_verdict:
            warnings.warn(self.line(), RuntimeWarning, stacklevel=3)


def choose_cadence(options: dict[str, Any], total_steps: int | None) -> RunCadence:
    """Set the record's ``every`` when it is ``None`` (from ``total_steps``; ``None`` or ≤ 0: unknown) and return the
    run's cadence."""
    monitor = options.get("monitor", "cusum")
    if monitor == "cusum":
        monitor = CusumMonitor()
    calibration = monitor.calibration_estimates if isinstance(monitor, CusumMonitor) else None
    total = total_steps if total_steps and total_steps > 0 else None
    config = options.get("config") or CurvatureConfig()
    plan = plan_cadence(total, config.every, calibration)
    options["config"] = dataclasses.replace(config, every=plan.every)
    return RunCadence(plan, config.probes, config.curvature_batch_size)
