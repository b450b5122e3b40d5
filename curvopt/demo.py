"""``curvopt demo``: a small CNN memorises random labels, and the CUSUM monitor sees it.

Built-in learnable synthetic images (no download, no account, CPU is enough). The labels are
clean for the first half of training and replaced by random classes for the second half; the
wrapper estimates per-layer curvature every ``every`` steps and the CUSUM alarm fires once the
network starts fitting the noise.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .estimate import CurvatureEstimate
from .loggers import JsonlLogger
from .models import small_cnn
from .monitor import AGGREGATE, CusumMonitor
from .optimizer import CurvatureAwareOptimizer
from .synthetic import corrupt_labels, make_synthetic_images


def format_table(
    estimate: CurvatureEstimate, scales: dict[str, float] | None = None, monitor: CusumMonitor | None = None
) -> str:
    """Per layer: d_l, trace ± SE, GN trace, GN-Gap (Frobenius form), LR scale, CUSUM statistic."""
    header = (
        f"{'layer':<10}{'numel':>8}{'trace':>11}{'± se':>9}{'gn_trace':>11}{'gn_gap':>8}{'lr_scale':>10}{'cusum':>8}"
    )
    rows = [header, "-" * len(header)]
    for name in estimate.layers:
        scale = f"{scales[name]:.2f}" if scales is not None else "off"
        cusum = f"{monitor.series[name].s:.2f}" if monitor is not None and name in monitor.series else "–"
        rows.append(
            f"{name:<10}{estimate.numel[name]:>8}{estimate.trace[name]:>11.3g}{estimate.trace_se[name]:>9.2g}"
            f"{estimate.gn_trace.get(name, math.nan):>11.3g}{estimate.gn_gap.get(name, math.nan):>8.3g}"
            f"{scale:>10}{cusum:>8}"
        )
    if monitor is not None and AGGREGATE in monitor.series:
        rows.append(
            f"{'model':<10}{sum(estimate.numel.values()):>8}{estimate.total_trace:>11.3g}"
            f"{estimate.total_trace_se:>9.2g}{estimate.total_gn_trace:>11.3g}{estimate.total_gn_gap:>8.3g}"
            f"{'':>10}{monitor.series[AGGREGATE].s:>8.2f}"
        )
    return "\n".join(rows)


def run_demo(
    *,
    steps: int = 800,
    every: int = 20,
    probes: int = 8,
    seed: int = 0,
    out_dir: str | Path = "runs/demo",
    lr_scaling: str | None = None,
    progress: bool = True,
) -> int:
    """Train, corrupt the labels half-way, report. Returns 0 when the alarm fired after the switch."""
    if steps < 4 or every < 1:
        raise ValueError("--steps must be >= 4 and --every >= 1")
    if probes < 1:
        raise ValueError("--probes must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "curvature.jsonl"
    log_path.unlink(missing_ok=True)

    torch.manual_seed(seed)
    images, labels = make_synthetic_images(2048, seed=seed, noise=1.0)
    random_labels = corrupt_labels(labels, 1.0, 10, seed=seed + 1)
    switch = steps // 2
    model = small_cnn()
    loss_fn = nn.CrossEntropyLoss()
    with JsonlLogger(log_path) as jsonl:
        opt = CurvatureAwareOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
            model,
            loss_fn,
            every=every,
            probes=probes,
            lr_scaling=lr_scaling,
            logger=jsonl,
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
    print(f"JSONL log: {log_path}")
    fired_after_switch = any(a.step > switch for a in opt.alarms)
    return 0 if fired_after_switch else 1
