"""Curvature inside Lightning: ``lightning.Trainer(callbacks=[CurvatureCallback()])``.

* **Batch.** ``on_train_batch_start`` keeps the batch as an ``(inputs, targets)`` pair. A tuple or list of two is
  taken as it is; a dict is split on its target key: ``"labels"`` (the Hugging Face convention: the other tensors
  stay a dict, and the module is called as ``module(**inputs)``), or ``"label"``, ``"target"``, ``"targets"``,
  ``"y"`` (a single other tensor, e.g. ``"image"``, is passed as ``module(image)``; several stay a dict). Any other
  layout: ``split_batch=lambda batch: (inputs, targets)``. With gradient accumulation the pair is the last
  micro-batch of the optimizer step.
* **Outputs.** ``forward(module, inputs)`` when given, else ``module(inputs)`` (``module(**inputs)`` for a dict),
  taking ``.logits`` from a Hugging Face style output.
* **Loss.** ``loss_fn(outputs, targets)`` when given. Without it, the module's own, by this contract: a method
  ``curvature_loss(self, outputs, targets)`` on the LightningModule returning the scalar loss its training step
  computes from those outputs; or, for a module holding a Hugging Face model (trained on ``{"labels": …}`` dicts),
  that model's own loss (:func:`curvopt.integrations.huggingface.model_loss`).
* **When.** ``on_before_optimizer_step``, which Lightning calls under automatic *and* manual optimization after
  the training step's backward and before ``optimizer.step()``: the step is counted, and when due the estimate
  runs on the current batch at the parameters the step starts from. With several optimizers, the first is tracked.
* **Cadence.** ``every=None`` (default): chosen from ``trainer.estimated_stepping_batches`` as ``curvopt train``
  does, said in one line at fit start (:mod:`curvopt.integrations.session`).
* **Metrics** go to every ``trainer.loggers`` once per estimate, at the estimate's own optimizer step (``curv/step``,
  counted from 1 as in the JSONL; ``trainer.global_step`` inside the step is one lower), and to
  ``<default_root_dir>/curvature.jsonl`` with the module's training loss (the training step's returned loss) and
  validation loss (a logged metric named like ``val_loss``), so reports show them; only rank 0 logs.
* **Precision.** Curvature runs in float32 under ``bf16-mixed``/``16-mixed`` (the probing context turns autocast
  off) unless ``curvature_dtype`` asks otherwise.
* **Checkpoints.** The callback's state (probe stream, monitor, history, the JSONL position) is in Lightning's
  checkpoints (``state_dict``/``load_state_dict``), so ``trainer.fit(..., ckpt_path=…)`` resumes it exactly.
* **Alarms.** ``on_alarm="stop"`` sets ``trainer.should_stop``; ``on_alarm="rollback"`` first restores the module and
  optimizer from before the alarm's change point (an in-memory, log-spaced ring of ``rollback_keep`` snapshots taken
  at the estimates; no validation split needed) and drops the step's gradients, so the optimizer step changes
  nothing, then stops: checkpoints saved after it hold the restored model. What it restores is the exponential
  average of the weights (``rollback_average`` = 0.5 epochs' half-life, sampled at the estimates; ``None``: the
  weights themselves). ``rollback_from="checkpoints"`` restores instead, on every rank (so under DDP too), the latest
  ``.ckpt`` of the Trainer's ``ModelCheckpoint`` callbacks from before the change point (module and optimizer; the
  callback's state in it carries the average): save often enough (``every_n_train_steps``) that one exists.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..control.monitor import Alarm
from ..control.notify import as_sinks
from ..control.settings import CurvatureConfig
from ..engine.batch import CurvatureInputError, describe, move_to
from ..reporting.loggers import LOG_NAME
from .session import (
    ROLLBACK_AVERAGE,
    ROLLBACK_KEEP,
    AlarmResponse,
    TrackingSession,
    callback_options,
    stamped_scalars,
)

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError('curvopt.integrations.lightning needs lightning: pip install -e ".[lightning]"') from exc

TARGET_KEYS = ("labels", "label", "targets", "target", "y")
"""The keys a dict batch's targets are found under, in this order (``"labels"``: the Hugging Face convention)."""


def default_split(batch: Any) -> tuple[Any, Any] | None:
    """``(inputs, targets)`` of a training batch by the conventions of the module docstring, or ``None``."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if not isinstance(batch, Mapping):
        return None
    key = next((k for k in TARGET_KEYS if k in batch), None)
    if key is None:
        return None
    rest = {k: v for k, v in batch.items() if k != key and isinstance(v, torch.Tensor)}
    if not rest:
        return None
    if key != "labels" and len(rest) == 1:
        return next(iter(rest.values())), batch[key]
    return rest, batch[key]


def module_outputs(module: torch.nn.Module, inputs: Any) -> torch.Tensor:
    """``module(**inputs)`` for a dict, else ``module(inputs)``; a Hugging Face style output's ``.logits``."""
    out = module(**inputs) if isinstance(inputs, Mapping) else module(inputs)
    if isinstance(out, torch.Tensor):
        return out
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise CurvatureInputError(
        f"the LightningModule returned {describe(out)}, not a tensor of outputs: pass "
        "CurvatureCallback(forward=lambda module, inputs: ...) returning the outputs the loss takes"
    )


def module_loss(module: torch.nn.Module) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """The LightningModule's own curvature loss (module docstring), or a ``ValueError`` naming the options."""
    own = getattr(module, "curvature_loss", None)
    if callable(own):
        return own
    hf = next(
        (
            m
            for m in module.modules()
            if type(m).__module__.startswith("transformers.") and hasattr(m, "config") and hasattr(m, "can_generate")
        ),
        None,
    )
    if hf is not None:
        from .huggingface import model_loss

        return model_loss(hf)[0]
    raise ValueError(
        f"CurvatureCallback needs the training loss of {type(module).__name__}: pass CurvatureCallback(loss_fn=...) "
        "(called as loss_fn(outputs, targets)), or define curvature_loss(self, outputs, targets) on the module"
    )


class _TrainerLoggers:
    """A curvopt sink that sends each estimate's scalar metrics to the Lightning trainer's loggers, once."""

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        scalars = stamped_scalars(step, metrics)
        for logger in self.trainer.loggers:
            logger.log_metrics(scalars, step=step)  # the estimate's optimizer step, as in the JSONL

    def alert(self, alarm: Alarm) -> None:
        """Alarms reach the loggers as ``curv/alarm`` = 1 in the estimate's metrics."""


def _checkpoint_restorer(
    trainer: pl.Trainer, module: pl.LightningModule, optimizer: Any, state_key: str
) -> Callable[[int], Any]:
    """``rollback_from="checkpoints"``: the latest ``.ckpt`` of the Trainer's ``ModelCheckpoint`` callbacks whose
    ``global_step`` N has N + 1 < ``onset`` (its state is the one before update N + 1), loaded into the module and the
    optimizer, with this callback's state saved in it (its weight average)."""

    def restore(onset: int) -> tuple[int, Any] | None:
        paths = {p for cb in trainer.checkpoint_callbacks if cb.dirpath for p in Path(cb.dirpath).glob("*.ckpt")}
        best: tuple[int, dict[str, Any]] | None = None
        for path in sorted(paths):
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
            step = int(checkpoint.get("global_step", -1))
            if step + 1 < onset and (best is None or step > best[0]):
                best = (step, checkpoint)
        if best is None:
            return None
        step, checkpoint = best
        module.load_state_dict(checkpoint["state_dict"])
        if checkpoint.get("optimizer_states"):
            optimizer.load_state_dict(checkpoint["optimizer_states"][0])
        return step, checkpoint.get("callbacks", {}).get(state_key)

    return restore


def _steps_per_epoch(trainer: pl.Trainer) -> float | None:
    """Optimizer steps per epoch (``None`` for a loader without a length). The training loader is set up first if
    the Trainer has not yet, as its own ``estimated_stepping_batches`` does."""
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()
    batches = trainer.num_training_batches
    return batches / trainer.accumulate_grad_batches if math.isfinite(batches) else None


class CurvatureCallback(pl.Callback):
    """Per-layer curvature, the memorisation monitor and its alarms inside ``lightning.Trainer``.

    Args:
        loss_fn: ``loss_fn(outputs, targets)``, the module's training loss; default: the module's own
            (``curvature_loss``, or a Hugging Face model's loss; see the module docstring).
        split_batch: ``split_batch(batch) -> (inputs, targets)`` for a training batch the defaults do not read.
        forward: ``forward(module, inputs) -> outputs``; default ``module(inputs)`` (``module(**inputs)`` for a dict,
            ``.logits`` of a Hugging Face style output).
        config, **settings: the curvature options, a :class:`~curvopt.CurvatureConfig` and/or its fields by name
            (``every``, ``probes``, ``curvature_batch_size``, ``gn``, ``strategy``, ...); ``every=None`` (default):
            chosen from the run's length.
        monitor, layers, lr_scaling: as for :class:`~curvopt.CurvatureAwareOptimizer` (``lr_scaling``: the
            policy's scales multiply the framework's update right after its step, layer by layer).
        on_alarm: ``"warn"`` (default), ``"stop"`` (``trainer.should_stop``) or ``"rollback"`` (restore the state before
            the change point, then stop; single process).
        rollback_keep: ``on_alarm="rollback"``: snapshots kept in host memory (model + optimizer state each).
        rollback_average: ``on_alarm="rollback"``: the half-life, in epochs, of the weight average restored
            (default 0.5; ``None``: the weights themselves; :class:`~curvopt.RollbackOnAlarm`).
        rollback_from: ``on_alarm="rollback"``: ``"memory"`` (an in-memory ring of snapshots; single process) or
            ``"checkpoints"`` (the framework's own checkpoints, on every rank; module docstring).
        log_path: the JSONL log; default ``<default_root_dir>/curvature.jsonl``; ``None`` for none.
        logger: further curvopt sinks; callbacks: called with every :class:`~curvopt.Alarm`.
    """

    def __init__(
        self,
        loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
        *,
        split_batch: Callable[[Any], tuple[Any, Any]] | None = None,
        forward: Callable[..., torch.Tensor] | None = None,
        config: CurvatureConfig | None = None,
        monitor: Any = "cusum",
        layers: Any = None,
        lr_scaling: Any = None,
        on_alarm: str = "warn",
        rollback_keep: int = ROLLBACK_KEEP,
        rollback_average: float | None = ROLLBACK_AVERAGE,
        rollback_from: str = "memory",
        log_path: str | Path | None = "auto",
        logger: Any = None,
        callbacks: Iterable[Callable[[Alarm], None]] = (),
        **settings: Any,
    ) -> None:
        for name, value in (("loss_fn", loss_fn), ("split_batch", split_batch), ("forward", forward)):
            if value is not None and not callable(value):
                raise TypeError(f"{name} must be callable, got {type(value).__name__}")
        self.response = AlarmResponse(on_alarm, rollback_keep, rollback_average, rollback_from)
        self.loss_fn, self.split_batch, self.forward = loss_fn, split_batch, forward
        self.log_path = log_path
        self.options = callback_options(
            config, settings, monitor=monitor, layers=layers, callbacks=callbacks, lr_scaling=lr_scaling
        )
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
        log_path = Path(trainer.default_root_dir) / LOG_NAME if self.log_path == "auto" else self.log_path
        loss_fn = self.loss_fn if self.loss_fn is not None else module_loss(pl_module)
        total = trainer.estimated_stepping_batches
        total = int(total) if isinstance(total, (int, float)) and math.isfinite(total) else None
        forward = self.forward or module_outputs
        self.session = TrackingSession(
            trainer.optimizers[0],
            pl_module,
            loss_fn,
            forward=forward,
            options=self.options,
            log_path=log_path,
            sinks=[_TrainerLoggers(trainer), *self.extra_sinks],
            reports=trainer.is_global_zero,
            total_steps=total,
            response=self.response,
            steps_per_epoch=_steps_per_epoch(trainer),
            restore_checkpoint=_checkpoint_restorer(trainer, pl_module, trainer.optimizers[0], self.state_key),
            batchnorm_inputs=self._training_inputs(trainer, pl_module),
        )
        if self._restored is not None:
            self.session.load_state_dict(self._restored)
            self._restored = None

    def _training_inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Callable[[], Iterable[Any]]:
        """The training loader's batches as module inputs on its device, for recomputing BatchNorm statistics of a
        restored weight average."""
        split = self.split_batch if self.split_batch is not None else default_split

        def inputs() -> Iterable[Any]:
            for batch in trainer.train_dataloader:
                yield move_to(split(batch)[0], pl_module.device)

        return inputs

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        pair = self.split_batch(batch) if self.split_batch is not None else default_split(batch)
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            given = "split_batch returned " + describe(pair) if self.split_batch is not None else describe(batch)
            raise CurvatureInputError(
                f"CurvatureCallback cannot read a training batch as (inputs, targets): {given}. Dict batches are read "
                f"by their target key ({', '.join(repr(k) for k in TARGET_KEYS)}); for any other layout pass "
                "CurvatureCallback(split_batch=lambda batch: (inputs, targets))"
            )
        self.batch = tuple(pair)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """``lr_scaling``'s scales reach the update of the optimizer step this batch ended with (the first hook after
        it: Lightning has none between the step and its scheduler); the training step's loss into the JSONL at the
        optimizer step it belongs to (for reports)."""
        if self.session is not None:
            self.session.after_optimizer_step()
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if self.session is not None and isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self.session.log_training(self.session.wrapper.step_count, {"train/loss": float(loss.detach())})

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The logged validation loss (a metric named like ``val_loss``) into the JSONL (for reports)."""
        if self.session is None or trainer.sanity_checking:
            return
        name = next((k for k in trainer.callback_metrics if "val" in k.lower() and "loss" in k.lower()), None)
        if name is not None:
            value = float(trainer.callback_metrics[name])
            self.session.log_evaluation(
                float(trainer.current_epoch), self.session.wrapper.step_count, {"eval/loss": value}
            )

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.session is None or getattr(optimizer, "_optimizer", optimizer) is not self.session.wrapper.optimizer:
            return
        _, alarms = self.session.step(self.batch)
        if self.session.should_stop(alarms):
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
