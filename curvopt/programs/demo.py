"""``curvopt demo``: a small CNN memorises random labels, and the CUSUM monitor sees it.

Built-in learnable synthetic images (no download, no account, CPU is enough). The labels are
clean for the first half of training and replaced by random classes for the second half; the
wrapper estimates per-layer curvature every ``every`` steps and the CUSUM alarm fires once the
network starts fitting the noise.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..control.averaging import ROLLBACK_AVERAGE
from ..control.monitor import Alarm
from ..control.optimizer import CurvatureAwareOptimizer
from ..control.rollback import RollbackOnAlarm
from ..reporting.loggers import LOG_NAME, JsonlLogger
from ..reporting.report import make_report
from ..reporting.tables import format_table
from ..reporting.wandb_logger import WandbLogger
from .models import small_cnn
from .synthetic import corrupt_labels, make_synthetic_images

BATCH = 64


@dataclass
class _Demo:
    """What one demo run holds."""

    model: nn.Module
    opt: CurvatureAwareOptimizer
    images: torch.Tensor
    labels: torch.Tensor
    random_labels: torch.Tensor
    switch: int
    sinks: list[Any]
    wandb_logger: WandbLogger | None
    log_path: Path
    mode: str
    rollback: RollbackOnAlarm  # fed by the loop, not a sink: the run trains on, and the summary rolls back at the end
    test: tuple[torch.Tensor, torch.Tensor]  # held-out images with clean labels


def _start_wandb(out: Path, mode: str, config: dict[str, Any]) -> WandbLogger | None:
    """An offline (or ``mode``) W&B run under ``out/wandb``, quietly; ``None`` when disabled or failing."""
    if mode == "disabled":
        return None
    import wandb

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger = WandbLogger(
            project="curvopt-demo", dir=str(out), mode=mode, settings=wandb.Settings(silent=True), config=config
        )
    return logger if logger.active else None


def _clear_previous(out: Path) -> bool:
    """Remove what an earlier demo left in ``out`` (its JSONL, W&B runs and report), so the directory holds one run;
    returns whether there was one. Nothing else in ``out`` is touched."""
    previous = [out / LOG_NAME, out / "wandb", out / "report"]
    found = any(p.exists() for p in previous)
    for path in previous:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return found


def _set_up(
    steps: int, every: int, probes: int, seed: int, out: Path, lr_scaling: str | None, mode: str, stack: ExitStack
) -> _Demo:
    log_path = out / LOG_NAME
    torch.manual_seed(seed)
    images, labels = make_synthetic_images(2048, seed=seed, noise=1.0)
    random_labels = corrupt_labels(labels, 1.0, 10, seed=seed + 1)
    test = make_synthetic_images(1024, seed=seed + 10_000, noise=1.0)
    model = small_cnn()
    jsonl = stack.enter_context(JsonlLogger(log_path))
    config = {
        "steps": steps,
        "every": every,
        "probes": probes,
        "seed": seed,
        "model": "small_cnn",
        "dataset": "synthetic 16x16",
        "optimizer": "SGD(lr=0.05, momentum=0.9)",
        "batch_size": BATCH,
        "label_noise": f"random labels from step {steps // 2 + 1}",
    }
    wandb_logger = _start_wandb(out, mode, config)
    jsonl.log_run({**config, **(wandb_logger.describe() if wandb_logger is not None else {})})
    sinks: list[Any] = [jsonl] + ([wandb_logger] if wandb_logger is not None else [])
    opt = CurvatureAwareOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        model,
        nn.CrossEntropyLoss(),
        every=every,
        probes=probes,
        lr_scaling=lr_scaling,
        logger=sinks,
        seed=seed,
    )
    rollback = RollbackOnAlarm(
        model,
        opt,
        keep=64,
        average=ROLLBACK_AVERAGE * len(labels) / BATCH,
        batchnorm_inputs=lambda: images.split(BATCH),  # the training images (labels play no part)
    )
    return _Demo(
        model, opt, images, labels, random_labels, steps // 2, sinks, wandb_logger, log_path, mode, rollback, test
    )


def _train(demo: _Demo, steps: int, every: int, progress: bool) -> None:
    """The training loop: clean labels up to the switch, random labels after it."""
    loss_fn, opt, monitor = nn.CrossEntropyLoss(), demo.opt, demo.opt.monitor
    bar = tqdm(range(1, steps + 1), disable=not progress, unit="step", dynamic_ncols=True)
    correct = seen = 0
    try:
        for step in bar:
            y_all = demo.random_labels if step > demo.switch else demo.labels
            idx = torch.randint(0, demo.images.shape[0], (BATCH,))
            x, y = demo.images[idx], y_all[idx]
            opt.zero_grad()
            logits = demo.model(x)
            loss = loss_fn(logits, y)
            loss.backward()
            opt.step(batch=(x, y))
            if opt.estimated_last_step:  # the rollback's ring samples every estimate
                demo.rollback.log(step, opt.history[-1])
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            if step % every == 0:
                for sink in demo.sinks:
                    sink.log_training(step, {"train/loss": loss.item(), "train/acc": 100.0 * correct / seen})
                ready = monitor.ready
                cusum = f"{monitor.alarm_statistic():.1f}/{monitor.alarm_threshold:.1f}" if ready else "calibrating"
                bar.set_postfix(
                    loss=f"{loss.item():.3f}", acc=f"{correct / seen:.2f}", cusum=cusum, alarms=len(opt.alarms)
                )
                correct = seen = 0
            if step == demo.switch:
                bar.write(f"step {step}: labels switched to random")
                for sink in demo.sinks:
                    sink.log_event(step + 1, "label_noise_start", "labels random from here (p = 1)")
            for alarm in opt.alarms:
                if alarm.step == step:
                    bar.write(f"step {step}: ALARM: {alarm.describe()}")
    finally:
        bar.close()


def _print_summary(demo: _Demo, steps: int, elapsed: float, lr_scaling: str | None) -> None:
    opt = demo.opt
    print(f"\ntrained {steps} steps in {elapsed:.1f} s; {len(opt.history)} curvature estimates")
    if opt.last_estimate is not None:
        print("\nlast estimate, per layer:")
        print(format_table(opt.last_estimate, opt.lr_scales if lr_scaling else None, opt.monitor))
    print()
    for alarm in opt.alarms:
        print(f"alarm: {alarm.describe()}")
    if not opt.alarms:
        print("no alarm was raised")
    print(attribution(opt.monitor.crossings, opt.alarms, demo.switch))
    after = [a for a in opt.alarms if a.step > demo.switch]
    if after:
        print(rollback_line(demo, after[0]))
    print(f"JSONL log:  {demo.log_path}")
    if demo.wandb_logger is not None and demo.wandb_logger.local_dir is not None:
        print(f"W&B run:    {demo.wandb_logger.local_dir} ({demo.mode}; `wandb sync` uploads an offline run)")
    try:
        plots = make_report(demo.log_path, html_page=True)
        print(f"plots:      {plots[0].parent}/ ({', '.join(p.name for p in plots)})")
    except Exception as exc:  # a plotting problem must not hide the demo's result
        print(f"plots:      not written ({type(exc).__name__}: {exc})")


@torch.no_grad()
def _test_accuracy(model: nn.Module, test: tuple[torch.Tensor, torch.Tensor]) -> float:
    was_training = model.training
    model.eval()
    accuracy = float((model(test[0]).argmax(1) == test[1]).float().mean()) * 100
    model.train(was_training)
    return accuracy


def rollback_line(demo: _Demo, alarm: Alarm) -> str:
    """What ``on_alarm="rollback"`` would have restored at ``alarm``, with no validation split: held-out accuracy of
    the weight average from before its change point against the model the run ended with (the model is restored)."""
    end = _test_accuracy(demo.model, demo.test)
    demo.rollback.alert(alarm)
    if not demo.rollback.restored:
        return "rollback: no snapshot before the change point"
    snapshot_step = demo.rollback.restored[-1][1]
    restored = _test_accuracy(demo.model, demo.test)
    return (
        f"rollback (no validation split): the weight average of step {snapshot_step}, before the change point, "
        f"scores {restored:.1f} % on 1,024 held-out images with clean labels; the model the run ended with, "
        f"{end:.1f} %"
    )


def attribution(crossings: list[tuple[str, int]], alarms: list[Alarm], switch: int) -> str:
    """Which signal did the work: when each family first crossed its threshold after the label switch, which was
    first, and how far the first alarm's estimated change point is from the switch."""
    first = {}
    for family, step in crossings:
        if step > switch:
            first.setdefault(family, step)
    if not first:
        return "signals: neither curvature nor the gradient norm crossed its threshold after the switch"
    names = {
        "loss": "the training loss (a jump)",
        "curvature": "curvature (per layer)",
        "gradient": "the gradient norm",
    }
    order = sorted(first, key=first.get)
    lines = [f"signals: {names[order[0]]} crossed its threshold first, at step {first[order[0]]}"]
    for family in order[1:]:
        lines.append(f"{names[family]} at step {first[family]} ({first[family] - first[order[0]]} steps later)")
    missing = [names[f] for f in names if f not in first]
    text = "; ".join(lines) + "".join(f"; {name} never did" for name in missing)
    after = [a for a in alarms if a.step > switch and a.onset_step is not None]
    if after:
        alarm = after[0]
        source = {
            "gradient": "the gradient norm",
            "aggregate": "the model-wide curvature",
            "loss": "the training loss",
        }.get(alarm.onset_series or "", f"layer '{alarm.onset_series}' curvature")
        how = "a jump in" if alarm.onset_kind == "jump" else f"{alarm.onset_kind} change in"
        text += (
            f"\nchange point: step {alarm.onset_step}, {alarm.onset_step - switch:+d} steps from the switch at step "
            f"{switch} ({how} {source}): a rollback returns to the last snapshot before it"
        )
    return text


def run_demo(
    *,
    steps: int = 800,
    every: int = 20,
    probes: int = 8,
    seed: int = 0,
    out_dir: str | Path = "runs/demo",
    lr_scaling: str | None = None,
    progress: bool = True,
    wandb_mode: str | None = None,
) -> int:
    """Train, corrupt the labels half-way, report. Returns 0 when the alarm fired after the switch.

    Writes ``out_dir/curvature.jsonl``, the plots and page of ``curvopt report`` under
    ``out_dir/report`` and a W&B run under ``out_dir/wandb`` (``wandb_mode``, else ``WANDB_MODE``,
    else offline: the demo never needs an account or the network; ``"disabled"`` skips it).
    """
    if steps < 4 or every < 1:
        raise ValueError("--steps must be >= 4 and --every >= 1")
    if probes < 1:
        raise ValueError("--probes must be >= 1")
    began = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if _clear_previous(out):
        print(f"curvopt demo: replacing the previous demo run in {out}")
    mode = wandb_mode or os.environ.get("WANDB_MODE") or "offline"
    curvopt_log = logging.getLogger("curvopt")
    with ExitStack() as stack:
        demo = _set_up(steps, every, probes, seed, out, lr_scaling, mode, stack)
        if demo.wandb_logger is not None:
            stack.callback(_finish_quietly, demo.wandb_logger)
        calibrating = demo.opt.monitor.calibration_estimates
        print(
            f"curvopt demo: small CNN, synthetic 16x16 images, SGD; K={probes} probes every {every} steps.\n"
            f"Labels are clean until step {demo.switch}, then replaced by random classes (memorisation starts).\n"
            f"The monitor calibrates on its first {calibrating} estimates: the earliest alarm is at step "
            f"{(calibrating + 1) * every}."
        )
        stack.callback(curvopt_log.setLevel, curvopt_log.level)
        curvopt_log.setLevel(logging.ERROR)  # alarms are printed by the loop, not as log records mid-bar
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        _train(demo, steps, every, progress)
        elapsed = time.perf_counter() - start
    _print_summary(demo, steps, elapsed, lr_scaling)
    print(f"demo done in {time.perf_counter() - began:.0f} s (training, estimates, W&B and report)")
    return 0 if any(a.step > demo.switch for a in demo.opt.alarms) else 1


def _finish_quietly(logger: WandbLogger) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logger.finish()
