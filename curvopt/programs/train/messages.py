"""What ``curvopt train`` tells its user: the opening lines, a line per epoch, the cost of an estimate, and the
closing summary with the monitor's verdict."""

from __future__ import annotations

from ...control.optimizer import CurvatureAwareOptimizer
from ...reporting.loggers import LOG_NAME
from ...reporting.tables import format_table
from .checkpoint import BEST, CHECKPOINT
from .setup import updates_per_epoch
from .state import TrainingRun


def estimate_cost_line(seconds: float, step_seconds: float, every: int) -> str:
    """What one estimate costs in training steps, and the overhead at this cadence (with the cadence that keeps it
    under 10 %)."""
    steps = seconds / max(step_seconds, 1e-9)
    overhead = steps / max(every, 1)
    line = (
        f"  one curvature estimate took {seconds:.1f} s, about {steps:.0f} training steps: "
        f"{100 * overhead:.0f} % overhead at every {every} updates"
    )
    if overhead > 0.1:
        line += f" (--curv-every {int(steps * 10) + 1} keeps it under 10 %)"
    return line


def print_epoch(run: TrainingRun, epoch: int, stats: dict[str, float], elapsed: float) -> None:
    curv = run.opt.last_estimate
    curv_text = f"tr H {curv.total_trace:.3g}" if curv is not None else "no estimate yet"
    run.say(
        f"epoch {epoch + 1:>3}/{run.num_epochs}  train loss {stats['train/loss_epoch']:.4f} "
        f"acc {stats['train/acc_epoch']:5.1f}%  val loss {stats['eval/loss']:.4f} top1 {stats['eval/top1']:5.1f}%  "
        f"lr {stats['train/lr']:.3g}  {curv_text}  alarms {len(run.opt.alarms)}  {elapsed:.1f}s"
    )


def announce(run: TrainingRun) -> None:
    args, splits = run.args, run.data.splits
    ranks = f" x {args.world_size} ranks ({'FSDP2' if args.fsdp else 'DDP'})" if args.distributed else ""
    run.say(
        f"curvopt train: {args.model} on {args.dataset} ({len(splits.train)} train / {len(splits.val)} val, "
        f"{splits.num_classes} classes) on {run.device}{ranks}; run dir {run.run_dir}"
    )
    if run.stem_note:
        run.say(f"  small-input adaptation: {run.stem_note}")
    if run.data.noisy is not None:
        run.say(f"  label noise p={args.label_noise} from epoch {args.label_noise_start_epoch + 1}")
        if args.label_noise_start_epoch >= run.num_epochs:
            run.say(
                f"  warning: the label noise starts at epoch {args.label_noise_start_epoch + 1}, after the last "
                f"epoch ({run.num_epochs}): this run trains on clean labels only (--epochs, "
                "--label-noise-start-epoch)"
            )
    upe = updates_per_epoch(args, run.data.train_loader)
    resuming = f"; resuming at epoch {run.start_epoch + 1}, update {run.num_updates}" if run.start_epoch else ""
    run.say(
        f"  {run.opt!r}; {len(run.opt.layer_blocks)} layers; {upe} updates/epoch, {run.num_epochs} epochs" + resuming
    )
    run.say(f"  {run.cadence_note}")


def summarise(run: TrainingRun) -> None:
    """The final per-layer table, the alarms, what the monitor could not see, and where everything is."""
    say, opt = run.say, run.opt
    if run.skipped_batches:
        say(f"{run.skipped_batches} batch(es) with a non-finite loss were skipped")
    if opt.last_estimate is not None:
        say("\nlast curvature estimate, per layer:")
        say(format_table(opt.last_estimate, opt.lr_scales if run.args.lr_scaling else None, opt.monitor))
    for alarm in opt.alarms:
        say(f"alarm: {alarm.describe()}")
    say(monitor_verdict(opt))
    run_dir = run.run_dir
    if run.rolled_back is not None:
        r = run.rolled_back
        say(
            f"rolled back at the alarm at update {r['alarm']} to epoch {r['epoch']} (update {r['update']}, "
            f"{r['checkpoint']}), before the change point at update {r['onset']}"
        )
    if run.stop_alarm is not None:
        best = f"{run_dir / BEST} (epoch {run.best_epoch + 1}, val top-1 {run.best_top1:.2f}%)"
        how = "--on-alarm rollback, --rollback-then stop" if run.rolled_back is not None else "--on-alarm stop"
        say(f"stopped at the alarm at update {run.stop_alarm.step} ({how}); best checkpoint: {best}")
    say(f"\nrun dir:     {run_dir}\ncheckpoint:  {run_dir / CHECKPOINT}\nJSONL log:   {run_dir / LOG_NAME}")
    if run.wandb_logger is not None and run.wandb_logger.local_dir is not None:
        say(f"W&B run:     {run.wandb_logger.local_dir}")
    say(f"report:      curvopt report {run_dir}")
    if run.last_epoch_stats:
        say(f"final val top1 {run.last_epoch_stats['eval/top1']:.2f}%")


def monitor_verdict(opt: CurvatureAwareOptimizer) -> str:
    """What the monitor saw; a monitor that saw nothing must not read like a clean run."""
    if opt.monitor is None:
        return "memorisation monitor off"
    skipped, skips = opt.skipped_estimates, opt.skips
    total = skipped + len(opt.history)
    if skipped and not opt.history:
        return (
            f"no memorisation verdict: the monitor saw nothing, all {skipped} curvature estimates were skipped "
            f"(since update {skips.get('first_step')}; last reason: {skips.get('last_reason')})"
        )
    note = f" ({skipped} of {total} estimates skipped, first at update {skips.get('first_step')})" if skipped else ""
    if not opt.monitor.ready:
        return f"no memorisation verdict: the monitor was still calibrating{note}"
    return ("memorisation alarm(s) raised" if opt.alarms else "no memorisation alarm") + note
