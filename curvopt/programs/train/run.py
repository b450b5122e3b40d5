"""``curvopt train``: a timm training script with the curvature-aware optimizer.

Built from timm's own parts, in timm ``train.py``'s order (:mod:`.setup`): ``create_model`` →
``create_optimizer_v2`` → :class:`~curvopt.CurvatureAwareOptimizer` (wrapped *after* creation:
timm's factory only knows its own ``lookahead_`` prefix) → ``create_scheduler_v2`` (it rewrites
``group['lr']`` of the shared groups) → ``Mixup``/CutMix with ``SoftTargetCrossEntropy``, label
smoothing, AMP with ``NativeScaler`` (which calls a bare ``optimizer.step()``, so the batch
reaches the wrapper through ``observe``), model EMA, gradient accumulation (:mod:`.loop`),
checkpoints and resume (:mod:`.checkpoint`).

The run directory holds ``curvature.jsonl`` (curvature metrics, alarms, training and validation
metrics: what ``curvopt report`` reads), ``last.pth.tar`` / ``model_best.pth.tar``, ``args.yaml``
and, with ``--log-wandb``, the W&B run under ``wandb/``.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm import tqdm

from ...control.optimizer import CurvatureAwareOptimizer
from ...reporting.loggers import JsonlLogger
from ...reporting.tables import format_table
from ...reporting.wandb_logger import WandbLogger
from .checkpoint import BEST, CHECKPOINT, load_checkpoint, save_checkpoint
from .errors import TrainError
from .loop import BufferCheckpoint, EpochContext, evaluate, train_one_epoch
from .setup import (
    Data,
    adapt_to_small_inputs,
    build_data,
    build_loss,
    build_optimizer,
    build_precision,
    build_scheduler,
    check_args,
    create_model,
    place_model,
    resolve_device,
    updates_per_epoch,
)

__all__ = ["TrainError", "adapt_to_small_inputs", "run_training"]


def _silent(*args: Any, **kwargs: Any) -> None:
    """``print`` on ranks other than 0."""


@dataclass
class TrainingRun:
    """The parts of one run, built by :func:`set_up` and used by every later stage."""

    args: argparse.Namespace
    device: torch.device
    data: Data
    model: nn.Module
    train_model: nn.Module
    model_ema: Any
    opt: CurvatureAwareOptimizer
    scheduler: Any
    num_epochs: int
    autocast: Any
    loss_scaler: Any
    run_dir: Path
    jsonl: JsonlLogger | None
    wandb_logger: WandbLogger | None
    epoch_context: EpochContext
    say: Any = print
    start_epoch: int = 0
    num_updates: int = 0
    best_top1: float = -math.inf
    skipped_batches: int = 0
    last_epoch_stats: dict[str, float] = field(default_factory=dict)

    @property
    def main_process(self) -> bool:
        return self.args.rank == 0

    @property
    def sinks(self) -> list[Any]:
        return [s for s in (self.jsonl, self.wandb_logger) if s is not None]


# ---------------------------------------------------------------------- stages
DEFAULT_OUTPUT = "runs/train"


def run_dir_for(args: argparse.Namespace) -> Path:
    if args.experiment:
        return Path(args.output or DEFAULT_OUTPUT) / args.experiment
    if args.resume:
        return Path(args.resume).resolve().parent
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(args.output or DEFAULT_OUTPUT) / f"{args.dataset.replace('/', '_')}-{args.model}-{stamp}"


def open_logs(args: argparse.Namespace, run_dir: Path, resume: dict[str, Any] | None) -> tuple[Any, Any]:
    """Rank 0 writes ``args.yaml`` and the JSONL log and starts (or resumes) the W&B run."""
    if args.rank != 0:
        return None, None
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "args.yaml").write_text(yaml.safe_dump(vars(args), sort_keys=True), encoding="utf-8")
    jsonl = JsonlLogger(run_dir / "curvature.jsonl")
    wandb_logger = None
    if args.log_wandb:
        wandb_logger = WandbLogger(
            project=args.wandb_project, name=run_dir.name, dir=str(run_dir), config=vars(args),
            tags=list(args.wandb_tags) or None, id=(resume or {}).get("wandb_id"), resume="allow",
        )  # fmt: skip
    return jsonl, wandb_logger


def set_up(args: argparse.Namespace, resume: dict[str, Any] | None) -> TrainingRun:
    """Device, data, model, loss, logs, optimizer, schedule and precision, in timm's order."""
    check_args(args)
    device = resolve_device(args)
    torch.manual_seed(args.seed)  # the same initial model on every rank (DDP also broadcasts rank 0's)
    data = build_data(args, device)
    model, stem_note = create_model(args, data.splits.num_classes)
    model, train_model, model_ema = place_model(args, model, device)
    loss_fn, mixup_fn = build_loss(args, data.splits.num_classes)
    run_dir = run_dir_for(args)
    jsonl, wandb_logger = open_logs(args, run_dir, resume)
    sinks = [s for s in (jsonl, wandb_logger) if s is not None]

    def announce(alarm: Any) -> None:
        tqdm.write(f"ALARM: {alarm.describe()}")

    opt = build_optimizer(args, model, train_model, loss_fn, sinks, [announce])
    scheduler, num_epochs = build_scheduler(args, opt, updates_per_epoch(args, data.train_loader))
    autocast, loss_scaler = build_precision(args, device)

    def log_training(step: int, row: dict[str, float]) -> None:
        for sink in sinks:
            sink.log_training(step, row)

    ctx = EpochContext(
        args=args, model=model, train_model=train_model, model_ema=model_ema, opt=opt, scheduler=scheduler,
        loss_fn=loss_fn, mixup_fn=mixup_fn, autocast=autocast, loss_scaler=loss_scaler, device=device,
        buffers=BufferCheckpoint(model), log_training=log_training,
        show_progress=not args.no_progress and args.rank == 0, num_epochs=num_epochs,
    )  # fmt: skip
    say = print if args.rank == 0 else _silent
    run = TrainingRun(args, device, data, model, train_model, model_ema, opt, scheduler, num_epochs, autocast,
                      loss_scaler, run_dir, jsonl, wandb_logger, ctx, say=say)  # fmt: skip
    _announce_start(run, stem_note)
    return run


def restore(run: TrainingRun, state: dict[str, Any]) -> None:
    """Continue from a checkpoint: weights, optimizer and wrapper state, EMA, scaler, counters, schedule."""
    run.model.load_state_dict(state["model"])
    run.opt.load_state_dict(state["optimizer"])
    if run.model_ema is not None and state.get("model_ema") is not None:
        run.model_ema.load_state_dict(state["model_ema"])
    if run.loss_scaler is not None and state.get("scaler") is not None:
        run.loss_scaler.load_state_dict(state["scaler"])
    run.start_epoch = int(state["epoch"]) + 1
    run.num_updates = int(state["num_updates"])
    run.best_top1 = float(state.get("best_top1", -math.inf))
    if run.start_epoch > 0:
        if run.args.sched_on_updates:
            run.scheduler.step_update(run.num_updates)
        else:
            run.scheduler.step(run.start_epoch)


def _announce_start(run: TrainingRun, stem_note: str) -> None:
    args, splits = run.args, run.data.splits
    ranks = f" x {args.world_size} ranks (DDP)" if args.distributed else ""
    run.say(f"curvopt train: {args.model} on {args.dataset} ({len(splits.train)} train / {len(splits.val)} val, "
            f"{splits.num_classes} classes) on {run.device}{ranks}; run dir {run.run_dir}")  # fmt: skip
    if stem_note:
        run.say(f"  small-input adaptation: {stem_note}")
    if run.data.noisy is not None:
        run.say(f"  label noise p={args.label_noise} from epoch {args.label_noise_start_epoch + 1}")
    if run.wandb_logger is not None:
        run.wandb_logger.update_config({"run_dir": str(run.run_dir)})


def _announce_schedule(run: TrainingRun) -> None:
    upe = updates_per_epoch(run.args, run.data.train_loader)
    resuming = f"; resuming at epoch {run.start_epoch + 1}, update {run.num_updates}" if run.start_epoch else ""
    run.say(f"  {run.opt!r}; {len(run.opt.layer_blocks)} layers; {upe} updates/epoch, {run.num_epochs} epochs"
            + resuming)  # fmt: skip


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of every random stream in epoch ``epoch`` on rank ``rank`` (a fixed function of the three)."""
    return (seed * 1_000_003 + epoch * 7_919 + rank) % (2**63)


def seed_epoch(run: TrainingRun, epoch: int) -> None:
    """Reseed every source of randomness the loop uses from (seed, epoch, rank): the loader's shuffle,
    torch (dropout, drop-path, augmentation), NumPy (Mixup/CutMix) and Python's ``random``.

    An epoch then depends only on the state at its start, which the previous epoch's checkpoint holds,
    so a run resumed from a checkpoint replays the epoch exactly as the uninterrupted run did.
    """
    import random

    import numpy as np

    args = run.args
    value = epoch_seed(args.seed, epoch, args.rank)
    torch.manual_seed(value)  # also every CUDA device
    np.random.seed(value % 2**32)
    random.seed(value)
    run.data.train_loader.generator.manual_seed(value)
    if run.data.sampler is not None:
        run.data.sampler.set_epoch(epoch)


def run_epoch(run: TrainingRun, epoch: int) -> None:
    """Train one epoch, validate, step the epoch schedule, checkpoint and log."""
    args, data = run.args, run.data
    seed_epoch(run, epoch)
    if data.noisy is not None:
        data.noisy.active = epoch >= args.label_noise_start_epoch
    mixup_fn = run.epoch_context.mixup_fn
    if mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        mixup_fn.mixup_enabled = False
    start = time.perf_counter()
    result = train_one_epoch(run.epoch_context, data.train_loader, epoch, run.num_updates)
    run.num_updates = result.updates
    run.skipped_batches += result.skipped
    stats = _validate(run, result)
    run.scheduler.step(epoch + 1, stats["eval/top1"])
    best = stats["eval/top1"] > run.best_top1
    run.best_top1 = max(run.best_top1, stats["eval/top1"])
    _checkpoint(run, epoch, best)
    for sink in run.sinks:
        sink.log_epoch(epoch, stats)
    run.last_epoch_stats = stats
    _print_epoch(run, epoch, stats, time.perf_counter() - start)


def _validate(run: TrainingRun, result: Any) -> dict[str, float]:
    args = run.args
    val = evaluate(run.model, run.data.val_loader, run.device, run.autocast, args.distributed)
    stats = {"eval/loss": val["loss"], "eval/top1": val["top1"], "step": run.num_updates,
             "train/loss_epoch": result.loss, "train/acc_epoch": result.acc,
             "train/lr": run.opt.param_groups[0]["lr"]}  # fmt: skip
    if run.model_ema is not None:
        ema_val = evaluate(run.model_ema.module, run.data.val_loader, run.device, run.autocast, args.distributed)
        stats["eval/top1_ema"] = ema_val["top1"]
    return stats


def _checkpoint(run: TrainingRun, epoch: int, best: bool) -> None:
    """``last.pth.tar`` every epoch and ``model_best.pth.tar`` on a new best top-1 (rank 0 only)."""
    if not run.main_process:
        return
    state = {
        "epoch": epoch, "num_updates": run.num_updates, "arch": run.args.model, "args": vars(run.args),
        "model": run.model.state_dict(), "optimizer": run.opt.state_dict(),
        "model_ema": run.model_ema.state_dict() if run.model_ema is not None else None,
        "scaler": run.loss_scaler.state_dict() if run.loss_scaler is not None else None,
        "best_top1": run.best_top1, "wandb_id": getattr(getattr(run.wandb_logger, "run", None), "id", None),
    }  # fmt: skip
    save_checkpoint(run.run_dir / CHECKPOINT, state)
    if best:
        save_checkpoint(run.run_dir / BEST, state)


def _print_epoch(run: TrainingRun, epoch: int, stats: dict[str, float], elapsed: float) -> None:
    curv = run.opt.last_estimate
    curv_text = f"tr H {curv.total_trace:.3g}" if curv is not None else "no estimate yet"
    run.say(f"epoch {epoch + 1:>3}/{run.num_epochs}  train loss {stats['train/loss_epoch']:.4f} "
            f"acc {stats['train/acc_epoch']:5.1f}%  val loss {stats['eval/loss']:.4f} top1 {stats['eval/top1']:5.1f}%  "
            f"lr {stats['train/lr']:.3g}  {curv_text}  alarms {len(run.opt.alarms)}  {elapsed:.1f}s")  # fmt: skip


def close(run: TrainingRun, finished: bool) -> None:
    """Close the logs and, under DDP, leave the process group together."""
    if run.jsonl is not None:
        run.jsonl.close()
    if run.wandb_logger is not None:
        run.wandb_logger.finish()
    if run.args.distributed and torch.distributed.is_initialized():
        if finished:  # every rank is here: no rank tears the group down while a peer still uses it
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def summarise(run: TrainingRun) -> None:
    """The final per-layer table, the alarms and where everything was written."""
    say, opt = run.say, run.opt
    if run.skipped_batches:
        say(f"{run.skipped_batches} batch(es) with a non-finite loss were skipped")
    if opt.last_estimate is not None:
        say("\nlast curvature estimate, per layer:")
        say(format_table(opt.last_estimate, opt.lr_scales if run.args.lr_scaling else None, opt.monitor))
    for alarm in opt.alarms:
        say(f"alarm: {alarm.describe()}")
    if not opt.alarms and opt.monitor is not None:
        say("no memorisation alarm")
    run_dir = run.run_dir
    say(f"\nrun dir:     {run_dir}\ncheckpoint:  {run_dir / CHECKPOINT}\nJSONL log:   {run_dir / 'curvature.jsonl'}")
    if run.wandb_logger is not None and run.wandb_logger.local_dir is not None:
        say(f"W&B run:     {run.wandb_logger.local_dir}")
    say(f"report:      curvopt report {run_dir}")
    if run.last_epoch_stats:
        say(f"final val top1 {run.last_epoch_stats['eval/top1']:.2f}%")


# ---------------------------------------------------------------------- the run
def run_training(args: argparse.Namespace) -> int:
    """Train as ``args`` says; returns 0 on success. Setup errors raise :class:`TrainError`."""
    resume = load_checkpoint(args.resume) if args.resume else None
    run = set_up(args, resume)
    if resume is not None:
        restore(run, resume)
    _announce_schedule(run)
    finished = False
    with _quiet_alarms():
        try:
            for epoch in range(run.start_epoch, run.num_epochs):
                run_epoch(run, epoch)
            finished = True
        finally:
            close(run, finished)
    summarise(run)
    return 0


def _quiet_alarms() -> ExitStack:
    """Alarms are printed by the run's own callback: silence the wrapper's warning and log record for them."""
    stack = ExitStack()
    curvopt_log = logging.getLogger("curvopt")
    level = curvopt_log.level
    curvopt_log.setLevel(logging.ERROR)  # other problems arrive as warnings
    stack.callback(curvopt_log.setLevel, level)
    stack.enter_context(warnings.catch_warnings())
    warnings.filterwarnings("ignore", message="curvopt: memorisation alarm", category=RuntimeWarning)
    return stack
