"""Curvature inside Lightning: ``lightning.Trainer(callbacks=[CurvatureCallback(loss_fn)])``.

* **Batch.** ``on_train_batch_start`` keeps the batch, an ``(inputs, targets)`` pair (``forward=`` says how the
  module is called on the inputs, as for :class:`~curvopt.CurvatureAwareOptimizer`). With gradient accumulation
  it is the last micro-batch of the optimizer step.
* **When.** ``on_before_optimizer_step``, which Lightning calls under automatic *and* manual optimization after
  the training step's backward and before ``optimizer.step()``: the step is counted, and when due the estimate
  runs on the current batch at the parameters the step starts from. (A user-wrapped optimizer would estimate
  *before* Lightning's closure runs the training step, on the previous step's batch: the wrapper now runs the
  closure first, but the callback needs no wrapper at all.) With several optimizers, the first is tracked.
* **Metrics** go to every ``trainer.loggers`` once per estimate (at ``trainer.global_step``) and to
  ``<default_root_dir>/curvature.jsonl``; only rank 0 logs.
* **Checkpoints.** The callback's state (probe stream, monitor, history, the JSONL position) is in Lightning's
  checkpoints (``state_dict``/``load_state_dict``), so ``trainer.fit(..., ckpt_path=…)`` resumes it exactly.
* **Alarms.** ``on_alarm="stop"`` sets ``trainer.should_stop``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ..control.monitor import Alarm
from ..control.notify import as_sinks
from ..engine.batch import split_batch
from .session import TrackingSession, wrapper_options

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError('curvopt.integrations.lightning needs lightning: pip install -e ".[lightning]"') from exc

ON_ALARM = ("warn", "stop")


class _TrainerLoggers:
    """A curvopt sink that sends each estimate's scalar metrics to the Lightning trainer's loggers, once."""

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        for logger in self.trainer.loggers:
            logger.log_metrics(scalars, step=self.trainer.global_step)

    def alert(self, alarm: Alarm) -> None:
        """Alarms reach the loggers as ``curv/alarm`` = 1 in the estimate's metrics."""


class CurvatureCallback(pl.Callback):
    """Per-layer curvature, the memorisation monitor and its alarms inside ``lightning.Trainer``.

    Args:
        loss_fn: ``loss_fn(outputs, targets)``, the module's training loss.
        forward: ``forward(module, inputs) -> outputs``; default ``module(inputs)``.
        every, probes, curvature_batch_size, gn, monitor, strategy, estimator, curvature_dtype, seed, layers,
            inter_every, distributed_probes: as for :class:`~curvopt.CurvatureAwareOptimizer` (``every`` counts
            optimizer steps).
        on_alarm: ``"warn"`` (default) or ``"stop"`` (``trainer.should_stop``).
        log_path: the JSONL log; default ``<default_root_dir>/curvature.jsonl``; ``None`` for none.
        logger: further curvopt sinks; callbacks: called with every :class:`~curvopt.Alarm`.
    """

    def __init__(
        self,
        loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
        *,
        forward: Callable[..., torch.Tensor] | None = None,
        every: int = 500,
        probes: int | str = 8,
        curvature_batch_size: int = 32,
        gn: bool = True,
        monitor: Any = "cusum",
        strategy: str = "auto",
        estimator: str = "hutchinson",
        curvature_dtype: Any = None,
        seed: int = 0,
        layers: Any = None,
        inter_every: int = 0,
        distributed_probes: str = "independent",
        on_alarm: str = "warn",
        log_path: str | Path | None = "auto",
        logger: Any = None,
        callbacks: Iterable[Callable[[Alarm], None]] = (),
    ) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(outputs, targets), got {type(loss_fn).__name__}")
        if on_alarm not in ON_ALARM:
            raise ValueError(f"on_alarm must be one of {ON_ALARM}, got {on_alarm!r}")
        self.loss_fn, self.forward, self.on_alarm, self.log_path = loss_fn, forward, on_alarm, log_path
        self.options = wrapper_options(locals())
        self.extra_sinks = as_sinks(logger)
        self.session: TrackingSession | None = None
        self.batch: Any = None
        self._restored: dict[str, Any] | None = None

    @property
    def wrapper(self) -> Any:
        """The :class:`~curvopt.CurvatureAwareOptimizer` tracking the run (``alarms``, ``history``, ...)."""
        return None if self.session is None else self.session.wrapper

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.optimizers:
            raise ValueError("CurvatureCallback needs an optimizer (configure_optimizers returned none)")
        log_path = Path(trainer.default_root_dir) / "curvature.jsonl" if self.log_path == "auto" else self.log_path
        self.session = TrackingSession(trainer.optimizers[0], pl_module, self.loss_fn, forward=self.forward,
                                       options=self.options, log_path=log_path,
                                       sinks=[_TrainerLoggers(trainer), *self.extra_sinks],
                                       reports=trainer.is_global_zero)  # fmt: skip
        if self._restored is not None:
            self.session.load_state_dict(self._restored)
            self._restored = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:  # fmt: skip
        split_batch(batch)  # an (inputs, targets) pair, or one clear error now
        self.batch = batch

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.session is None or getattr(optimizer, "_optimizer", optimizer) is not self.session.wrapper.optimizer:
            return
        _, alarms = self.session.step(self.batch)
        if alarms and self.on_alarm == "stop":
            trainer.should_stop = True

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.session is not None:
            self.session.close()

    def state_dict(self) -> dict[str, Any]:
        return self.session.state_dict() if self.session is not None else dict(self._restored or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if self.session is not None:
            self.session.load_state_dict(state_dict)
        else:  # Lightning restores callbacks before the optimizers exist: applied at on_fit_start
            self._restored = dict(state_dict)
