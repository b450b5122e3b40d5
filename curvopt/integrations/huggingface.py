"""Curvature inside the Hugging Face ``Trainer``: ``Trainer(..., callbacks=[CurvatureCallback()])``, nothing else.

The callback takes the Trainer's own model and optimizer (no subclass, no hand-made optimizer):

* **Batch.** A forward pre-hook records the inputs of the latest training forward (the Trainer calls
  ``model(**inputs)``); the curvature batch is ``(inputs without "labels", labels)``. With gradient
  accumulation it is the last micro-batch of the optimizer step.
* **When.** ``on_pre_optimizer_step`` (after gradient clipping, before ``optimizer.step()``): the step is
  counted in optimizer steps, and when due the estimate runs on that step's batch at the parameters the step
  starts from, exactly as :class:`~curvopt.CurvatureAwareOptimizer` would.
* **Loss.** By default the model's own: a causal LM's shifted next-token cross-entropy with ``-100`` ignored
  (:class:`~curvopt.CausalLMLoss`, closed-form output Hessian), a sequence classifier's cross-entropy, MSE or
  BCE-with-logits by ``config.problem_type``; the outputs are ``model(**inputs).logits``. Any other model needs
  ``loss_fn=`` (and ``forward=`` when its outputs are not ``.logits``).
* **Cadence.** ``every=None`` (default): chosen from ``max_steps`` as ``curvopt train`` does (≥ 20 estimates
  where the run allows, at most every 500 steps), said in one line at train start
  (:mod:`curvopt.integrations.session`).
* **Metrics.** Every estimate gets a log row of its own at its own step: the callback sets
  ``control.should_log`` at the estimate's optimizer step, so the Trainer writes a row there (with its training
  loss since the previous row) and the curvature summary (:data:`~curvopt.integrations.session.SUMMARY_KEYS`,
  ``curv/step`` included; ``trainer_metrics="all"`` for every per-layer value) joins it. ``state.log_history`` and
  ``report_to`` (W&B, TensorBoard, ...) get every estimate at ``global_step`` = ``curv/step``: the callback moves
  itself ahead of the reporting callbacks. Every estimate and alarm also goes to ``<output_dir>/curvature.jsonl``
  (what ``curvopt report`` reads), with the Trainer's logged training loss and evaluation loss, so reports show
  them beside the curvature.
* **Precision.** Under ``bf16=True``/``fp16=True`` accelerate wraps ``model.forward`` in autocast; the probing
  context calls the original forward, so the products run in float32 unless ``curvature_dtype`` asks otherwise.
* **Checkpoints.** ``curvopt_state.pt`` in each ``checkpoint-N`` folder; ``trainer.train(resume_from_checkpoint=…)``
  restores it (probe stream, monitor, history) and cuts the JSONL back, so a resumed run continues the
  uninterrupted run's curvature history.
* **Alarms.** ``on_alarm="stop"`` ends training through ``control.should_training_stop``; ``on_alarm="rollback"``
  first restores the model and optimizer from before the alarm's change point (an in-memory, log-spaced ring of
  ``rollback_keep`` snapshots taken at the estimates; no validation split needed), drops the step's gradients so
  the Trainer's optimizer step changes nothing, and ends training: the Trainer's final save holds the restored
  model. What it restores is the exponential average of the weights (``rollback_average`` = 0.5 epochs' half-life,
  sampled at the estimates; ``None``: the weights themselves). ``rollback_from="checkpoints"`` restores instead, on
  every rank (so under DDP too), the Trainer's own latest ``checkpoint-N`` from before the change point (weights and
  optimizer; its ``curvopt_state.pt`` carries the average): save often enough (``save_steps``) that one exists.
"""

from __future__ import annotations

import gc
import json
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..control.monitor import Alarm
from ..control.notify import as_sinks
from ..control.settings import CurvatureConfig
from ..engine.batch import move_to
from ..engine.losses import CausalLMLoss
from ..reporting.loggers import LOG_NAME
from .session import (
    ROLLBACK_AVERAGE,
    ROLLBACK_KEEP,
    SUMMARY_KEYS,
    AlarmResponse,
    BatchRecorder,
    TrackingSession,
    callback_options,
)

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise ImportError('curvopt.integrations.huggingface needs transformers: pip install -e ".[huggingface]"') from exc

STATE_FILE = "curvopt_state.pt"


def logits_of(model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    """``model(**inputs).logits``: how a Hugging Face model is called on a curvature batch."""
    return model(**inputs).logits


def _squeezed_logits(model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    return model(**inputs).logits.squeeze(-1)


def _class_names(mapping_name: str) -> set[str]:
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for value in getattr(modeling_auto, mapping_name, {}).values():
        names.update([value] if isinstance(value, str) else value)
    return names


def model_loss(model: nn.Module) -> tuple[Callable[[torch.Tensor, Any], torch.Tensor], Callable[..., torch.Tensor]]:
    """``(loss_fn, forward)`` equal to the loss a Hugging Face model computes from its ``labels``.

    Raises ``ValueError`` naming ``loss_fn=`` for a model whose loss is not one of these.
    """
    name = type(model).__name__
    if name in _class_names("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES") or name.endswith(("ForCausalLM", "LMHeadModel")):
        return CausalLMLoss(shift=True, ignore_index=-100), logits_of
    if name in _class_names("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES") or name.endswith(
        "ForSequenceClassification"
    ):
        config = model.config
        problem = config.problem_type or ("regression" if config.num_labels == 1 else "single_label_classification")
        if problem == "regression":
            return nn.MSELoss(), _squeezed_logits if config.num_labels == 1 else logits_of
        if problem == "multi_label_classification":
            return nn.BCEWithLogitsLoss(), logits_of
        return nn.CrossEntropyLoss(), logits_of
    raise ValueError(
        f"curvopt does not know the loss {name} computes from its labels: pass CurvatureCallback(loss_fn=...) (called "
        "as loss_fn(outputs, labels)) and forward= when the outputs are not model(**inputs).logits"
    )


TRAINER_KWARGS = ("labels", "num_items_in_batch", "return_dict", "use_cache")
"""What the Trainer passes besides the model's inputs: kept out of the curvature batch's inputs."""


def _inputs_and_labels(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[dict[str, Any], Any] | None:
    """The Trainer's ``model(**inputs)`` as ``(input tensors without labels, labels)``; ``None`` without labels."""
    if args or "labels" not in kwargs:
        return None
    return _model_inputs(kwargs), kwargs["labels"]


def _model_inputs(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """A Trainer batch's input tensors: everything but the labels and the Trainer's own keywords."""
    return {k: v for k, v in batch.items() if k not in TRAINER_KWARGS and isinstance(v, torch.Tensor)}


def _training_inputs(loader: Any, model: nn.Module) -> Callable[[], Iterable[dict[str, Any]]] | None:
    """The Trainer's training batches as model inputs (labels left out) on the model's device, for recomputing
    BatchNorm statistics of a restored weight average; ``None`` without a loader."""
    if loader is None:
        return None
    device = next(model.parameters()).device

    def inputs() -> Iterable[dict[str, Any]]:
        for batch in loader:
            yield move_to(_model_inputs(batch), device)

    return inputs


def _checkpoint_restorer(output_dir: Path, model: nn.Module, optimizer: Any) -> Callable[[int], Any]:
    """``rollback_from="checkpoints"``: the Trainer's latest ``checkpoint-N`` folder with N + 1 < ``onset`` (its
    state is the one before update N + 1), loaded into the model and the optimizer, with curvopt's state saved in it
    (its weight average)."""

    def restore(onset: int) -> tuple[int, Any] | None:
        folders = sorted(
            (int(p.name.removeprefix("checkpoint-")), p)
            for p in output_dir.glob("checkpoint-*")
            if p.name.removeprefix("checkpoint-").isdigit()
        )
        before = [(step, folder) for step, folder in folders if step + 1 < onset]
        if not before:
            return None
        step, folder = before[-1]
        weights = _trainer_weights(folder)
        unexpected = model.load_state_dict(weights, strict=False).unexpected_keys
        if unexpected:
            raise ValueError(f"curvopt: {folder} holds weights this model does not have: {unexpected[:3]}")
        if (folder / "optimizer.pt").is_file():
            optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False))
        saved = folder / STATE_FILE
        return step, torch.load(saved, map_location="cpu", weights_only=False) if saved.is_file() else None

    return restore


def _trainer_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The model weights of a Trainer checkpoint folder (safetensors or ``pytorch_model.bin``, whole or sharded)."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return _read_weights(folder / name)
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / name).is_file():
            weights: dict[str, torch.Tensor] = {}
            for shard in sorted(set(json.loads((folder / name).read_text())["weight_map"].values())):
                weights.update(_read_weights(folder / shard))
            return weights
    raise ValueError(f"curvopt: {folder} holds no model weights the rollback can read (model.safetensors, ...)")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu", weights_only=True)


def _steps_per_epoch(args: Any, loader: Any) -> float | None:
    """Optimizer steps per epoch: the Trainer's batches per epoch over its gradient accumulation (``None`` for a
    loader without a length, e.g. a streamed dataset)."""
    try:
        batches = len(loader)
    except TypeError:
        return None
    return batches / max(int(getattr(args, "gradient_accumulation_steps", 1)), 1)


class CurvatureCallback(TrainerCallback):
    """Per-layer curvature, the memorisation monitor and its alarms inside ``transformers.Trainer``.

    Args:
        loss_fn: ``loss_fn(outputs, labels)``; default: the model's own loss (see the module docstring).
        forward: ``forward(model, inputs) -> outputs``; default ``model(**inputs).logits``.
        config, **settings: the curvature options, a :class:`~curvopt.CurvatureConfig` and/or its fields by name
            (``every``, ``probes``, ``curvature_batch_size``, ``gn``, ``strategy``, ...); ``every`` counts optimizer
            steps (gradient accumulation's micro-batches do not count), ``None`` (default): chosen from the run's
            ``max_steps`` (module docstring).
        monitor, layers, lr_scaling: as for :class:`~curvopt.CurvatureAwareOptimizer` (``lr_scaling``: the
            policy's scales multiply the framework's update right after its step, layer by layer).
        on_alarm: ``"warn"`` (default: a log record and the JSONL), ``"stop"`` (end training) or ``"rollback"``
            (restore the state before the change point, then end training; single process).
        rollback_keep: ``on_alarm="rollback"``: snapshots kept in host memory (model + optimizer state each).
        rollback_average: ``on_alarm="rollback"``: the half-life, in epochs, of the weight average restored
            (default 0.5; ``None``: the weights themselves; :class:`~curvopt.RollbackOnAlarm`).
        rollback_from: ``on_alarm="rollback"``: ``"memory"`` (an in-memory ring of snapshots; single process) or
            ``"checkpoints"`` (the framework's own checkpoints, on every rank; module docstring).
        log_path: the JSONL log; default ``<output_dir>/curvature.jsonl``; ``None`` for none.
        trainer_metrics: ``"summary"`` (default: totals, monitor, alarm) or ``"all"`` (every ``curv/*`` value)
            into the Trainer's log rows.
        logger: further curvopt sinks (e.g. :class:`~curvopt.WandbLogger` for per-layer panels).
        callbacks: called with every :class:`~curvopt.Alarm`.
    """

    def __init__(
        self,
        loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
        *,
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
        trainer_metrics: str = "summary",
        logger: Any = None,
        callbacks: Iterable[Callable[[Alarm], None]] = (),
        **settings: Any,
    ) -> None:
        self.response = AlarmResponse(on_alarm, rollback_keep, rollback_average, rollback_from)
        if trainer_metrics not in ("summary", "all"):
            raise ValueError(f"trainer_metrics must be 'summary' or 'all', got {trainer_metrics!r}")
        self.loss_fn, self.forward = loss_fn, forward
        self.options = callback_options(
            config, settings, monitor=monitor, layers=layers, callbacks=callbacks, lr_scaling=lr_scaling
        )
        self.log_path, self.trainer_metrics = log_path, trainer_metrics
        self.extra_sinks = as_sinks(logger)
        self.session: TrackingSession | None = None
        self.recorder: BatchRecorder | None = None
        self.pending: dict[str, float] = {}
        self.seen_batch = False

    # ------------------------------------------------------------------ the run
    @property
    def wrapper(self) -> Any:
        """The :class:`~curvopt.CurvatureAwareOptimizer` tracking the run (``alarms``, ``history``, ...)."""
        return None if self.session is None else self.session.wrapper

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: nn.Module = None, optimizer: Any = None, **kwargs: Any
    ) -> None:
        if model is None or optimizer is None:
            raise ValueError("CurvatureCallback needs the Trainer's model and optimizer (transformers >= 4.40)")
        self._close()
        loss_fn, forward = self.loss_fn, self.forward
        if loss_fn is None:
            loss_fn, default_forward = model_loss(model)
            forward = forward or default_forward
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
        log_path = Path(args.output_dir) / LOG_NAME if self.log_path == "auto" else self.log_path
        self.session = TrackingSession(
            inner,
            model,
            loss_fn,
            forward=forward or logits_of,
            options=self.options,
            log_path=log_path,
            sinks=self.extra_sinks,
            reports=state.is_world_process_zero,
            total_steps=state.max_steps,
            response=self.response,
            steps_per_epoch=_steps_per_epoch(args, kwargs.get("train_dataloader")),
            restore_checkpoint=_checkpoint_restorer(Path(args.output_dir), model, inner),
            batchnorm_inputs=_training_inputs(kwargs.get("train_dataloader"), model),
        )
        self.recorder = BatchRecorder(model, _inputs_and_labels)
        self.seen_batch = False
        if state.global_step > 0:
            self._resume(Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE)
        self._run_before_reporting_callbacks()

    def _resume(self, path: Path) -> None:
        if not path.is_file():
            warnings.warn(
                f"curvopt: resuming at a step whose checkpoint has no {STATE_FILE} ({path}): the curvature "
                "monitor starts afresh",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        self.session.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))

    def _run_before_reporting_callbacks(self) -> None:
        """Move this callback to the front of the Trainer's callback list, so the metrics it adds to a log row reach
        the reporting callbacks (W&B, TensorBoard) that run after it; the list is found through the garbage
        collector, since callbacks are not handed the Trainer."""
        for holder in gc.get_referrers(self):
            if (
                isinstance(holder, list)
                and self in holder
                and any(type(c).__name__ == "DefaultFlowCallback" for c in holder)
            ):
                holder.remove(self)
                holder.insert(0, self)
                return

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.session is None:
            return control
        batch = self.recorder.batch if self.recorder is not None else None
        self.seen_batch = self.seen_batch or batch is not None
        if not self.seen_batch:
            raise ValueError(
                "CurvatureCallback saw no training batch with 'labels': the Trainer's inputs must carry labels (the "
                "targets of the curvature loss), e.g. a data collator that sets them"
            )
        metrics, alarms = self.session.step(batch)
        if metrics:
            self.pending = metrics
            control.should_log = True  # a log row of its own at this step (global_step = curv/step after the step)
        if self.session.should_stop(alarms):
            control.should_training_stop = True
        return control

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Right after ``optimizer.step()``, before the scheduler's: ``lr_scaling``'s scales reach the update."""
        if self.session is not None:
            self.session.after_optimizer_step()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is None:
            return
        if self.session is not None:
            self._record_trainer_metrics(state, logs)
        if not self.pending:
            return
        keys = self.pending if self.trainer_metrics == "all" else [k for k in SUMMARY_KEYS if k in self.pending]
        row = {k: self.pending[k] for k in keys}
        logs.update(row)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(row)  # the Trainer copied the row into the history before calling us
        self.pending = {}

    def _record_trainer_metrics(self, state: Any, logs: Mapping[str, Any]) -> None:
        """The Trainer's training and evaluation losses into the JSONL, for reports."""
        if isinstance(logs.get("loss"), (int, float)):
            train = {"train/loss": float(logs["loss"])}
            if isinstance(logs.get("learning_rate"), (int, float)):
                train["train/lr"] = float(logs["learning_rate"])
            self.session.log_training(state.global_step, train)
        if isinstance(logs.get("eval_loss"), (int, float)):
            self.session.log_evaluation(float(state.epoch or 0.0), state.global_step, {"eval/loss": logs["eval_loss"]})

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.session is not None and state.is_world_process_zero and folder.is_dir():
            torch.save(self.session.state_dict(), folder / STATE_FILE)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close(keep_session=True)

    def _close(self, keep_session: bool = False) -> None:
        if self.recorder is not None:
            self.recorder.remove()
            self.recorder = None
        if self.session is not None:
            self.session.close()
            if not keep_session:
                self.session = None
