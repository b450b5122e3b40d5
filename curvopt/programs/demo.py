"""``curvopt demo``: a small CNN memorises random labels, and the CUSUM monitor sees it.

Built-in learnable synthetic images (no download, no account, CPU is enough). The labels are
clean for the first half of training and replaced by random classes for the second half; the
wrapper estimates per-layer curvature every ``every`` steps and the CUSUM alarm fires once the
network starts fitting the noise.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ..control.monitor import AGGREGATE
from ..control.optimizer import CurvatureAwareOptimizer
from ..reporting.loggers import JsonlLogger
from ..reporting.report import make_report
from ..reporting.tables import format_table
from ..reporting.wandb_logger import WandbLogger
from .models import small_cnn
from .synthetic import corrupt_labels, make_synthetic_images


def _quiet_wandb() -> object:
    """W&B settings without console chatter (the demo prints where the run went)."""
    import wandb

    return wandb.Settings(silent=True)


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

    Writes ``out_dir/curvature.jsonl``, the plots of ``curvopt report`` under ``out_dir/report`` and a
    W&B run under ``out_dir/wandb`` (``wandb_mode``, else ``WANDB_MODE``, else offline: the demo never
    needs an account or the network; ``"disabled"`` skips it).
    """
    if steps < 4 or every < 1:
        raise ValueError("--steps must be >= 4 and --every >= 1")
    if probes < 1:
        raise ValueError("--probes must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "curvature.jsonl"
    log_path.unlink(missing_ok=True)
    mode = wandb_mode or os.environ.get("WANDB_MODE") or "offline"

    torch.manual_seed(seed)
    images, labels = make_synthetic_images(2048, seed=seed, noise=1.0)
    random_labels = corrupt_labels(labels, 1.0, 10, seed=seed + 1)
    switch = steps // 2
    model = small_cnn()
    loss_fn = nn.CrossEntropyLoss()
    with JsonlLogger(log_path) as jsonl:
        sinks: list = [jsonl]
        wandb_logger = None
        if mode != "disabled":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = {"steps": steps, "every": every, "probes": probes, "seed": seed}
                wandb_logger = WandbLogger(
                    project="curvopt-demo", dir=str(out), mode=mode, settings=_quiet_wandb(), config=config
                )
            if wandb_logger.active:
                sinks.append(wandb_logger)
        opt = CurvatureAwareOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
            model,
            loss_fn,
            every=every,
            probes=probes,
            lr_scaling=lr_scaling,
            logger=sinks,
            seed=seed,
        )
        print(
            f"curvopt demo: small CNN, synthetic 16x16 images, SGD; K={probes} probes every {every} steps.\n"
            f"Labels are clean until step {switch}, then replaced by random classes (memorisation starts)."
        )
        start = time.perf_counter()
        bar = tqdm(range(1, steps + 1), disable=not progress, unit="step", dynamic_ncols=True)
        correct = seen = 0
        quiet = logging.getLogger("curvopt")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # alarms are printed below, not as log records mid-bar
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for step in bar:
                    y_all = random_labels if step > switch else labels
                    idx = torch.randint(0, images.shape[0], (64,))
                    x, y = images[idx], y_all[idx]
                    opt.zero_grad()
                    logits = model(x)
                    loss = loss_fn(logits, y)
                    loss.backward()
                    opt.step(batch=(x, y))
                    correct += int((logits.argmax(1) == y).sum())
                    seen += len(y)
                    if step % every == 0:
                        for sink in sinks:
                            sink.log_training(step, {"train/loss": loss.item(), "train/acc": 100.0 * correct / seen})
                        stat = opt.monitor.series.get(AGGREGATE)
                        bar.set_postfix(
                            loss=f"{loss.item():.3f}", acc=f"{correct / seen:.2f}",
                            cusum=f"{stat.s:.1f}" if stat else "warm-up", alarms=len(opt.alarms),
                        )  # fmt: skip
                        correct = seen = 0
                    if step == switch:
                        bar.write(f"step {step}: labels switched to random")
                    for alarm in opt.alarms:
                        if alarm.step == step:
                            bar.write(f"step {step}: ALARM: {alarm.describe()}")
        finally:
            bar.close()
            quiet.setLevel(level)
            if wandb_logger is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    wandb_logger.finish()
    elapsed = time.perf_counter() - start
    print(f"\ntrained {steps} steps in {elapsed:.1f} s; {len(opt.history)} curvature estimates")
    if opt.last_estimate is not None:
        print("\nlast estimate, per layer (trace = Hutchinson tr H_ll; gn_gap = ||H^T_l,:||_F / ||G_l,:||_F):")
        print(format_table(opt.last_estimate, opt.lr_scales if lr_scaling else None, opt.monitor))
    print()
    if opt.alarms:
        for alarm in opt.alarms:
            print(f"alarm: {alarm.describe()}")
    else:
        print("no alarm was raised")
    print(f"JSONL log:  {log_path}")
    if wandb_logger is not None and wandb_logger.local_dir is not None:
        print(f"W&B run:    {wandb_logger.local_dir} ({mode}; `wandb sync` uploads an offline run)")
    try:
        plots = make_report(log_path)
        print(f"plots:      {plots[0].parent}/ ({', '.join(p.name for p in plots)})")
    except Exception as exc:  # a plotting problem must not hide the demo's result
        print(f"plots:      not written ({type(exc).__name__}: {exc})")
    fired_after_switch = any(a.step > switch for a in opt.alarms)
    return 0 if fired_after_switch else 1
