"""``curvopt train``: a timm training script with the curvature-aware optimizer.

Built from timm's own parts, in timm ``train.py``'s order (:mod:`.setup`): ``create_model`` →
``create_optimizer_v2`` → :class:`~curvopt.CurvatureAwareOptimizer` (wrapped *after* creation:
timm's factory only knows its own ``lookahead_`` prefix) → ``create_scheduler_v2`` (it rewrites
``group['lr']`` of the shared groups) → ``Mixup``/CutMix with ``SoftTargetCrossEntropy``, label
smoothing, AMP with ``NativeScaler`` (which calls a bare ``optimizer.step()``, so the batch
reaches the wrapper through ``observe``), model EMA, gradient accumulation (:mod:`.loop`).

Runs survive (:mod:`.rundir`, :mod:`.checkpoint`, :mod:`.resume`): everything is built and checked
before anything is written; one live run owns a run directory; every random stream is reseeded
per epoch, so a resume replays the interrupted epoch exactly; on resume the JSONL is cut back to
the checkpoint, so no step is logged twice; checkpoints are atomic and verified.

The run directory holds ``curvature.jsonl`` (curvature metrics, alarms, training and validation
metrics, run configuration and events: what ``curvopt report`` reads), ``last.pth.tar`` /
``model_best.pth.tar`` (and ``alarm-<update>.pth.tar`` with ``--on-alarm checkpoint``),
``args.yaml`` and, with ``--log-wandb``, the W&B run under ``wandb/``.
"""

from __future__ import annotations

import argparse
import logging
import math
import secrets
import time
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from ...control.averaging import ModelAverage, batchnorm_layers
from ...control.monitor import Alarm
from ...control.rollback import choice
from ...control.settings import MonitorConfig, flag_dest, flagged_options
from ...reporting.loggers import LOG_NAME, JsonlLogger, truncate_log
from ...reporting.wandb_logger import WandbLogger
from .checkpoint import (
    BEST,
    CHECKPOINT,
    checkpoint_path,
    keep_in_ring,
    load_checkpoint,
    remove_stale_temporaries,
    ring_before,
    save_checkpoint,
)
from .errors import TrainError
from .loop import BufferCheckpoint, EpochContext, evaluate, train_one_epoch
from .messages import announce, estimate_cost_line, print_epoch, summarise
from .resume import merge_resume_args
from .rundir import RunDirLock, claim_fresh_dir, make_dir, remove_unstarted
from .setup import (
    adapt_to_small_inputs,
    build_data,
    build_loss,
    build_optimizer,
    build_precision,
    build_scheduler,
    check_args,
    check_fsdp,
    check_vision_stack,
    choose_cadence,
    create_model,
    place_model,
    resolve_device,
    updates_per_epoch,
)
from .sharding import full_state, load_full_state
from .state import TrainingRun, silent

__all__ = ["TrainError", "adapt_to_small_inputs", "run_training"]

DEFAULT_OUTPUT = "runs/train"


# ---------------------------------------------------------------------- set-up: nothing written yet
def set_up(args: argparse.Namespace, start_epoch: int = 0) -> TrainingRun:
    """Device, data, model, loss, optimizer, schedule and precision, in timm's order; writes nothing.
    ``start_epoch``: where a resumed run continues (the curvature cadence counts the epochs still to run)."""
    check_args(args)
    device = resolve_device(args)
    check_fsdp(args)
    torch.manual_seed(args.seed)  # the same initial model on every rank (DDP also broadcasts rank 0's)
    data = build_data(args, device)
    cadence_note = choose_cadence(args, updates_per_epoch(args, data.train_loader), start_epoch)
    model, stem_note = create_model(args, data.splits.num_classes, data.splits.input_size[0])
    model, train_model, model_ema = place_model(args, model, device)
    loss_fn, mixup_fn = build_loss(args, data.splits.num_classes)
    run_box: list[TrainingRun] = []  # the callbacks below see the run once it exists
    opt = build_optimizer(args, model, train_model, loss_fn, [], [])
    scheduler, num_epochs = build_scheduler(args, opt, updates_per_epoch(args, data.train_loader))
    autocast, loss_scaler = build_precision(args, device)

    def log_training(step: int, row: dict[str, float]) -> None:
        for sink in run_box[0].sinks:
            sink.log_training(step, row)

    ctx = EpochContext(
        args=args,
        model=model,
        train_model=train_model,
        model_ema=model_ema,
        opt=opt,
        scheduler=scheduler,
        loss_fn=loss_fn,
        mixup_fn=mixup_fn,
        autocast=autocast,
        loss_scaler=loss_scaler,
        device=device,
        buffers=BufferCheckpoint(model),
        log_training=log_training,
        show_progress=not args.no_progress and args.rank == 0,
        num_epochs=num_epochs,
        should_stop=lambda: after_update(run_box[0]),
        on_lr=lambda step, lr: note_lr(run_box[0], step, lr),
    )
    say = print if args.rank == 0 else silent
    run = TrainingRun(
        args,
        device,
        data,
        model,
        train_model,
        model_ema,
        opt,
        scheduler,
        num_epochs,
        autocast,
        loss_scaler,
        ctx,
        stem_note=stem_note,
        cadence_note=cadence_note,
        say=say,
    )
    run_box.append(run)
    if args.on_alarm == "rollback" and args.rollback_average > 0:
        run.rollback_average = ModelAverage(
            model,
            args.rollback_average * updates_per_epoch(args, data.train_loader),
            batchnorm_inputs=lambda: (x.to(device, non_blocking=True) for x, _ in data.train_loader),
        )
    return run


def load_training_state(run: TrainingRun, state: dict[str, Any], *, curvature: bool = True) -> None:
    """A checkpoint's weights, optimizer, EMA, scaler and schedule (with ``curvature``, the wrapper's state too)."""
    if run.args.fsdp:  # full state dicts into the shards; then the wrapper's own state
        load_full_state(run.model, run.opt.optimizer, state["model"], state["optimizer"]["optimizer"])
    else:
        run.model.load_state_dict(state["model"])
        run.opt.optimizer.load_state_dict(state["optimizer"]["optimizer"])
    if curvature:
        run.opt.load_curvature_state(state["optimizer"]["curvopt"])
    if run.model_ema is not None and state.get("model_ema") is not None:
        run.model_ema.load_state_dict(state["model_ema"])
    if run.rollback_average is not None and state.get("rollback_average") is not None:
        run.rollback_average.load_state_dict(state["rollback_average"])
    if run.loss_scaler is not None and state.get("scaler") is not None:
        run.loss_scaler.load_state_dict(state["scaler"])
    if state.get("scheduler") is not None:
        run.scheduler.load_state_dict(state["scheduler"])


def restore(run: TrainingRun, state: dict[str, Any], changes: dict[str, tuple[Any, Any]]) -> None:
    """Continue from a checkpoint: weights, optimizer and wrapper state, EMA, scaler, schedule, counters;
    then the changed settings that concern the wrapper's monitor (the others were applied at set-up)."""
    load_training_state(run, state)
    run.alarms_handled = len(run.opt.alarms)
    run.start_epoch = int(state["epoch"]) + 1
    run.num_updates = int(state["num_updates"])
    run.best_top1 = float(state.get("best_top1", -math.inf))
    run.best_epoch = int(state.get("best_epoch", -1))
    flags = {f.name: flag_dest(meta["flag"]) for f, meta in flagged_options(MonitorConfig)}
    monitor_changes = {name: changes[dest][1] for name, dest in flags.items() if dest in changes}
    if monitor_changes and run.opt.monitor is not None:
        run.opt.monitor.update_settings(**monitor_changes)  # the checkpoint's monitor state, the new thresholds
    if run.start_epoch > 0:
        if run.args.sched_on_updates:
            run.scheduler.step_update(run.num_updates)
        else:
            run.scheduler.step(run.start_epoch)


# ---------------------------------------------------------------------- the run directory and the logs
def choose_run_dir(args: argparse.Namespace) -> Path:
    """The directory asked for: ``--output/--experiment``; on resume the checkpoint's unless ``--output``
    or ``--experiment`` was given on the command line; else ``<output>/<dataset>-<model>-<time>``."""
    explicit = set(getattr(args, "explicit", ()))
    if args.resume and not ({"output", "experiment"} & explicit):
        return Path(args.resume).resolve().parent
    if args.experiment:
        return Path(args.output or DEFAULT_OUTPUT) / args.experiment
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(args.output or DEFAULT_OUTPUT) / f"{args.dataset.replace('/', '_')}-{args.model}-{stamp}"


def claim_run_dir(run: TrainingRun, resume: dict[str, Any] | None, stack: ExitStack) -> None:
    """Rank 0 takes its directory (a fresh run never reuses another run's) and holds its lock to the end."""
    wanted = choose_run_dir(run.args)
    if not run.main_process:
        run.run_dir = wanted
        return
    if resume is None:
        run.run_dir, renamed = claim_fresh_dir(wanted)
        if renamed:
            run.say(f"  {wanted} already holds a run: this run writes to {run.run_dir}")
    else:
        run.run_dir = wanted
        make_dir(run.run_dir)
    lock = RunDirLock(run.run_dir)
    lock.acquire()
    stack.callback(lock.release)
    remove_stale_temporaries(run.run_dir)


def open_logs(run: TrainingRun, resume: dict[str, Any] | None, changes: dict[str, tuple[Any, Any]]) -> None:
    """``args.yaml``, the JSONL log (cut back to the checkpoint on resume) and W&B (the same run id on resume)."""
    if not run.main_process:
        return
    args = run.args
    run.run_id = (resume or {}).get("run_id") or (resume or {}).get("wandb_id") or secrets.token_hex(4)
    log_path = run.run_dir / LOG_NAME
    if resume is not None and resume.get("log_position") is not None:
        note = truncate_log(log_path, int(resume["log_position"]))
        if note:
            run.say(f"  {LOG_NAME}: {note}")
    saved = {k: v for k, v in vars(args).items() if k not in ("explicit", "from_recipe")}
    (run.run_dir / "args.yaml").write_text(yaml.safe_dump(saved, sort_keys=True), encoding="utf-8")
    run.jsonl = JsonlLogger(log_path, run_id=run.run_id)
    if args.log_wandb:
        run.wandb_logger = WandbLogger(
            project=args.wandb_project,
            name=run.run_dir.name,
            dir=str(run.run_dir),
            config=saved,
            tags=list(args.wandb_tags) or None,
            id=run.run_id,
            resume="allow",
        )
    config = _run_config(run) | (run.wandb_logger.describe() if run.wandb_logger is not None else {})
    for sink in run.sinks:
        run.opt.add_logger(sink)
        sink.log_run(config)
    if resume is not None:
        run.log_event(run.num_updates + 1, "resume", f"resumed from epoch {run.start_epoch} (update {run.num_updates})")
    if changes:
        text = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
        run.log_event(run.num_updates + 1, "settings_changed", text)
        run.say(f"  settings changed on resume: {text}")
    if args.label_noise > 0 and args.label_noise_start_epoch < run.num_epochs:  # only a switch that will happen
        start = args.label_noise_start_epoch * updates_per_epoch(args, run.data.train_loader)
        run.log_event(start + 1, "label_noise_start", f"label noise p={args.label_noise}")


def _run_config(run: TrainingRun) -> dict[str, Any]:
    args, splits = run.args, run.data.splits
    noise = f"p={args.label_noise} from epoch {args.label_noise_start_epoch + 1}" if args.label_noise else "none"
    return {
        "model": args.model,
        "dataset": args.dataset,
        "train_samples": len(splits.train),
        "val_samples": len(splits.val),
        "classes": splits.num_classes,
        "optimizer": f"{args.opt} (lr {args.lr}, weight decay {args.weight_decay})",
        "schedule": f"{args.sched}, {run.num_epochs} epochs, batch {args.batch_size}",
        "label_noise": noise,
        "lr_scaling": args.lr_scaling or "off",
        "on_alarm": args.on_alarm,
        "run_dir": str(run.run_dir),
    }


# ---------------------------------------------------------------------- epochs
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
    """Train one epoch (or up to a stopping alarm), validate, step the epoch schedule, log, checkpoint."""
    args, data = run.args, run.data
    run.epoch = epoch
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
    note_lr(run, run.num_updates, run.opt.param_groups[0]["lr"])
    best = stats["eval/top1"] > run.best_top1
    if best:
        run.best_top1, run.best_epoch = stats["eval/top1"], epoch
    for sink in run.sinks:  # the epoch's log first, then its checkpoint: a kill in between loses neither
        sink.log_epoch(epoch, stats)
    _checkpoint(run, epoch, best, stats["eval/top1"])
    run.last_epoch_stats = stats
    print_epoch(run, epoch, stats, time.perf_counter() - start)


def _validate(run: TrainingRun, result: Any) -> dict[str, float]:
    args = run.args
    val = evaluate(run.model, run.data.val_loader, run.device, run.autocast, args.distributed)
    stats = {
        "eval/loss": val["loss"],
        "eval/top1": val["top1"],
        "step": run.num_updates,
        "train/loss_epoch": result.loss,
        "train/acc_epoch": result.acc,
        "train/lr": run.opt.param_groups[0]["lr"],
    }
    if run.model_ema is not None:
        ema_val = evaluate(run.model_ema.module, run.data.val_loader, run.device, run.autocast, args.distributed)
        stats["eval/top1_ema"] = ema_val["top1"]
    return stats


def _state(run: TrainingRun, epoch: int) -> dict[str, Any]:
    """The checkpoint's contents (under ``--fsdp`` a collective that gathers the full state on rank 0)."""
    model_state, optimizer_state = run.model.state_dict(), run.opt.state_dict()
    if run.args.fsdp:
        model_state, inner_state = full_state(run.model, run.opt.optimizer)
        optimizer_state = {"optimizer": inner_state, "curvopt": optimizer_state["curvopt"]}
    return {
        "epoch": epoch,
        "num_updates": run.num_updates,
        "arch": run.args.model,
        "args": {k: v for k, v in vars(run.args).items() if k not in ("explicit", "from_recipe")},
        "model": model_state,
        "optimizer": optimizer_state,
        "model_ema": run.model_ema.state_dict() if run.model_ema is not None else None,
        "rollback_average": run.rollback_average.state_dict() if run.rollback_average is not None else None,
        "scaler": run.loss_scaler.state_dict() if run.loss_scaler is not None else None,
        "scheduler": run.scheduler.state_dict(),
        "best_top1": run.best_top1,
        "best_epoch": run.best_epoch,
        "run_id": run.run_id,
        "wandb_id": run.run_id if run.wandb_logger is not None else None,
        "log_position": run.jsonl.position() if run.jsonl is not None else None,
        "stopped_at_alarm": run.stop_alarm.step if run.stop_alarm is not None else None,
    }


def _checkpoint(run: TrainingRun, epoch: int, best: bool, top1: float | None = None) -> None:
    """``last.pth.tar`` every epoch and ``model_best.pth.tar`` on a new best top-1 (written by rank 0)."""
    if not run.main_process and not run.args.fsdp:
        return
    state = _state(run, epoch)  # every rank takes part in gathering FSDP's shards
    if not run.main_process:
        return
    save_checkpoint(run.run_dir / CHECKPOINT, state)
    if best:
        save_checkpoint(run.run_dir / BEST, state)
    if run.args.on_alarm == "rollback":
        keep_in_ring(run.run_dir, epoch, run.num_updates, run.args.rollback_keep, top1)


def note_lr(run: TrainingRun, step: int, lr: float) -> None:
    """Record an ``lr_restart`` event when the schedule jumps the LR up (≥ 2×) after warm-up (cosine restarts)."""
    previous, run.last_lr = run.last_lr, lr
    warming_up = run.epoch < run.args.warmup_epochs + 1
    if previous is not None and lr >= 2 * previous and not warming_up:
        run.log_event(step + 1, "lr_restart", f"learning rate {previous:.3g} -> {lr:.3g}")


def after_update(run: TrainingRun) -> bool:
    """After every update, on every rank: the cost line after the first estimate, then the new alarms; returns
    whether the run stops."""
    now = time.perf_counter()
    estimated = run.opt.estimated_last_step
    if estimated and run.rollback_average is not None:
        run.rollback_average.sample(run.opt.step_count)
    if run.last_update_at is not None and not estimated:
        run.update_times.append(now - run.last_update_at)
    run.last_update_at = now
    if not run.cost_said and run.opt.estimate_seconds and len(run.update_times) >= 3:
        run.cost_said = True
        median_update = sorted(run.update_times)[len(run.update_times) // 2]
        if run.main_process:
            tqdm.write(estimate_cost_line(run.opt.estimate_seconds[0], median_update, run.args.curv_every))
    return handle_new_alarms(run)


def handle_new_alarms(run: TrainingRun) -> bool:
    """After every update, on every rank (the wrapper's alarms are the same on all): ``--on-alarm`` for the alarms
    raised since the last call — print them, save ``alarm-<update>.pth.tar`` (checkpoint), or end the run (stop).
    Returns whether the run stops."""
    for alarm in run.opt.alarms[run.alarms_handled :]:
        _handle_alarm(run, alarm)
    run.alarms_handled = len(run.opt.alarms)
    return run.stop_alarm is not None


def _handle_alarm(run: TrainingRun, alarm: Alarm) -> None:
    write = tqdm.write if run.main_process else silent
    write(f"ALARM: {alarm.describe()}")
    action = run.args.on_alarm
    if action == "rollback" and run.stop_alarm is None:
        _roll_back(run, alarm, write)
        return
    if action == "checkpoint":
        path = run.run_dir / f"alarm-{alarm.step}.pth.tar"
        state = _state(run, run.epoch - 1)  # a resume from it restarts the alarm's epoch from these weights
        state.update(alarm=alarm.to_dict(), mid_epoch=True)  # the state after the alarm's update
        if run.main_process:
            save_checkpoint(path, state)
            write(f"  saved {path}")
    elif action == "stop" and run.stop_alarm is None:
        run.stop_alarm = alarm
        write("  --on-alarm stop: the run ends after this update")


def _roll_back(run: TrainingRun, alarm: Alarm, write: Any) -> None:
    """``--on-alarm rollback`` on every rank: the last ring checkpoint before the alarm's change point
    (``--rollback-to best-validated``: the one with the best validation top-1 among them; weights, optimizer, EMA,
    scaler, schedule; the curvature monitor keeps its own history), then stop or continue at a lower LR."""
    onset = alarm.onset_step if alarm.onset_step is not None else alarm.step
    found = ring_before(run.run_dir, onset, run.args.rollback_to)
    if found is None:
        write("  --on-alarm rollback: no epoch checkpoint yet (the alarm came in the first epoch); the run goes on")
        return
    path, state = found
    load_training_state(run, state, curvature=False)
    averaged = run.rollback_average is not None and bool(run.rollback_average.state)
    if averaged:  # the average as it stood at that checkpoint, in place of its weights
        run.rollback_average.load_into_model()
        if run.args.distributed:  # BatchNorm statistics from rank 0's batches, so that all ranks hold one model
            for layer in batchnorm_layers(run.model):
                torch.distributed.broadcast(layer.running_mean, 0)
                torch.distributed.broadcast(layer.running_var, 0)
    validated = choice(run.args.rollback_to) == "best-validated"
    how = "the best validation top-1 of the epochs" if validated else "the last epoch"
    weights = f"the weight average (half-life {run.args.rollback_average:g} epochs) at the" if averaged else "the"
    text = (
        f"rolled back to {weights} end of epoch {int(state['epoch']) + 1} (update {state['num_updates']}; "
        f"{how} before the change point at update {onset})"
    )
    if run.args.rollback_then == "stop":
        run.stop_alarm = alarm
        write(f"  {text}; the run ends with that model (--rollback-then stop)")
    else:
        factor = run.args.rollback_lr_factor
        run.scheduler.base_values = [v * factor for v in run.scheduler.base_values]
        for group in run.opt.param_groups:
            group["lr"] *= factor
        write(f"  {text}; training goes on at {factor:g}x the learning rate (--rollback-then lower-lr)")
    for param in run.model.parameters():
        param.grad = None
    run.rolled_back = {
        "alarm": alarm.step,
        "onset": onset,
        "epoch": int(state["epoch"]) + 1,
        "update": int(state["num_updates"]),
        "checkpoint": path.name,
    }
    run.log_event(run.num_updates, "rollback", text)


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


# ---------------------------------------------------------------------- the run
def run_training(args: argparse.Namespace) -> int:
    """Train as ``args`` says; returns 0 on success. Problems before the start raise :class:`TrainError`."""
    check_vision_stack()
    if args.resume:  # a run directory stands for its last.pth.tar (the run directory is the checkpoint's)
        args.resume = str(checkpoint_path(args.resume))
    resume = load_checkpoint(args.resume) if args.resume else None
    changes = merge_resume_args(args, resume) if resume is not None else {}
    run = set_up(args, int(resume["epoch"]) + 1 if resume is not None else 0)
    if resume is not None:
        restore(run, resume, changes)
    finished = False
    with ExitStack() as stack:
        claim_run_dir(run, resume, stack)
        try:
            open_logs(run, resume, changes)
        except BaseException:
            if resume is None and run.main_process:
                remove_unstarted(run.run_dir)
            raise
        announce(run)
        stack.enter_context(_quiet_alarms())
        try:
            for epoch in range(run.start_epoch, run.num_epochs):
                run_epoch(run, epoch)
                if run.stop_alarm is not None:
                    break
            finished = True
        finally:
            close(run, finished)
    summarise(run)
    return 0


def _quiet_alarms() -> ExitStack:
    """Alarms are printed by the run's own callback: silence the wrapper's log record for them."""
    stack = ExitStack()
    curvopt_log = logging.getLogger("curvopt")
    level = curvopt_log.level
    curvopt_log.setLevel(logging.ERROR)  # other problems arrive as warnings
    stack.callback(curvopt_log.setLevel, level)
    stack.enter_context(warnings.catch_warnings())
    return stack
