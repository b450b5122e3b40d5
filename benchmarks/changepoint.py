"""The alarm's change point: where it lands, what a rollback to it restores, and which signal leads.

Replays recorded runs (``benchmarks/memorisation.py record``; one gzip JSON per run) through ``curvopt.CusumMonitor``
with its default rule (per-layer curvature + the gradient norm) and the change point of each onset rule (``fit``:
the retrospective fit, the default; ``page``: where the CUSUM last left zero), and prints four tables:

1. **Onset and rollback**, per model, optimizer and condition, over the runs that memorised: the onset's error
   against the label switch (epochs), and the clean test accuracy of the model a rollback restores (the last
   end-of-epoch checkpoint before the onset, no validation) against the oracle (the best epoch by clean test
   accuracy) and against early stopping (patience 5 on the noisy 10 % split, restoring its best epoch).
2. **All the data vs a validation split**: the validation-free rollback of a run trained on 100 % of the training
   set (records marked ``_all``, ``record --holdout 0``) against early stopping of the same seed trained on 90 %
   with a noisy 10 % validation split, clean test accuracy, paired; clean runs: alarms (false) and how far past
   convergence they were trained.
3. **Lead and lag**: the first alarm of each signal alone through the same CUSUM (curvature per layer, the gradient
   norm, the training loss) and the monitor's training-loss jump alarm, in epochs after the memorisation onset (the
   first epoch whose fit of the corrupted labels exceeds 2× chance), median per model and condition.
4. **Clean runs**: false alarms (and the epoch of each), and the epoch their training loss stopped falling.
5. **Restoring a weight average** (runs that recorded them): the rollback restores the exponential average of the
   weights at the chosen checkpoint (half-life in epochs; ``avg``: every tensor of the state averaged, ``avg_bn``:
   BatchNorm's statistics recomputed for the averaged weights) instead of the checkpoint itself, against early
   stopping on the raw weights and on the same average (of the 90 % twin), and
   within the 90 % runs.

    python -m benchmarks.changepoint --runs benchmarks/records/memorisation-deep --seeds 1 --first-seed 0
    python -m benchmarks.changepoint --runs benchmarks/records/memorisation-deep --seeds 5 --first-seed 100
    python -m benchmarks.changepoint --runs benchmarks/records/memorisation-digits --seeds 3 --first-seed 100
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import memorisation as mem

RULE = "layer_frob+grad"
LOSS_JUMP = "loss_jump"
LEADERS = {
    "curvature": "layer_frob",
    "gradient norm": "grad_norm",
    "train loss (CUSUM)": "train_loss",
    "train loss jump": LOSS_JUMP,
}
CONVERGED = 0.02
"""A clean run's training loss has stopped falling at the first epoch whose mean training loss is within 0.02 nats
of the run's lowest epoch mean (cross-entropy keeps creeping towards 0; 0.02 nats is 98 % confidence)."""


def _median(values: Sequence[float]) -> str:
    return f"{statistics.median(values):+.1f}" if values else "–"


def _range(values: Sequence[float]) -> str:
    return f"[{min(values):+.1f}, {max(values):+.1f}]" if values else ""


def _accuracy(run: dict) -> dict[int, float]:
    return {row["epoch"]: row["val_acc"] for row in run["epochs_log"]}


def restored_accuracy(run: dict, onset: int, choose: str = "onset", keep: int = 10_000) -> float:
    """Clean test accuracy of the end-of-epoch checkpoint a rollback to ``onset`` restores (the first epoch's when
    none ends before it)."""
    epoch = mem.rollback_epoch(run, run["series"]["step"][-1] + 1, onset, keep=keep, choose=choose)
    return _accuracy(run)[epoch if epoch is not None else 0]


def early_stopping_accuracy(run: dict) -> float | None:
    if "noisy_val_acc" not in run["epochs_log"][0]:
        return None
    return _accuracy(run)[mem.early_stopping_epoch(run)[1]]


def alarm_and_onset(run: dict, settings: dict[str, Any]) -> tuple[int, int] | None:
    """The first alarm after the noise began and its change point, or ``None`` (no alarm, or a false one)."""
    found = mem.first_alarm_and_onset(run, RULE, settings)
    if found is None or found[0] <= run["noise_start_step"]:
        return None
    return found


def onset_table(runs: list[dict], settings: dict[str, Any]) -> str:
    """Table 1 (see the module docstring)."""
    lines = [
        "| task | optimizer | condition | memorised / alarmed | onset − switch, epochs: fit / page "
        "| rollback − oracle: fit / page | rollback − early stopping: fit / page | best-validated − early stopping |",
        "| --- | --- | --- | ---: | --- | --- | --- | ---: |",
    ]
    pooled: dict[str, dict[str, list[float]]] = {}
    groups = sorted({(r["task"], r["opt"], r["condition"]) for r in runs if r["condition"] != "clean"})
    for task, opt_name, condition in groups:
        chosen = [r for r in runs if (r["task"], r["opt"], r["condition"]) == (task, opt_name, condition)]
        memorised = [r for r in chosen if mem.memorisation_onset(r) is not None]
        cells: dict[str, list[float]] = {k: [] for k in ("err_fit", "err_page", "orc_fit", "orc_page")}
        cells |= {k: [] for k in ("es_fit", "es_page", "es_best")}
        alarmed = 0
        for run in memorised:
            fit, page = alarm_and_onset(run, settings), alarm_and_onset(run, {**settings, "onset": "page"})
            if fit is None or page is None:
                continue
            alarmed += 1
            oracle, es = max(_accuracy(run).values()), early_stopping_accuracy(run)
            spe = run["steps_per_epoch"]
            for name, (_, onset) in (("fit", fit), ("page", page)):
                if condition.startswith("switch"):
                    cells[f"err_{name}"].append((onset - run["noise_start_step"]) / spe)
                restored = restored_accuracy(run, onset)
                cells[f"orc_{name}"].append(restored - oracle)
                if es is not None:
                    cells[f"es_{name}"].append(restored - es)
            if es is not None:
                cells["es_best"].append(restored_accuracy(run, fit[1], "best-validated") - es)
        kind = "switch" if condition.startswith("switch") else "from the start"
        for key, values in cells.items():
            pooled.setdefault(kind, {}).setdefault(key, []).extend(values)
        lines.append(_onset_row(f"{task} | {opt_name} | {condition}", f"{len(memorised)} / {alarmed}", cells, False))
    for kind, cells in pooled.items():
        n = len(cells["orc_fit"])
        lines.append(_onset_row(f"**all** | | **{kind}**", f"{n}", cells, True))
    return "\n".join(lines)


def _onset_row(label: str, counts: str, cells: dict[str, list[float]], ranges: bool) -> str:
    def pair(a: str, b: str) -> str:
        if not ranges:
            return f"{_median(cells[a])} / {_median(cells[b])}"
        return f"{_median(cells[a])} {_range(cells[a])} / {_median(cells[b])} {_range(cells[b])}"

    err = pair("err_fit", "err_page") if cells["err_fit"] else "–"
    return (
        f"| {label} | {counts} | {err} | {pair('orc_fit', 'orc_page')} | {pair('es_fit', 'es_page')} "
        f"| {_median(cells['es_best'])} |"
    )


def _key(run: dict) -> tuple[str, str, str, int]:
    return run["task"], run["opt"], run["condition"], run["seed"]


def full_data_table(split: list[dict], whole: list[dict], settings: dict[str, Any]) -> str:
    """Table 2 (see the module docstring)."""
    by_key = {_key(r): r for r in split}
    lines = [
        "| condition | pairs | rollback (100 %) − early stopping (90 %): median [min, max] | worse by > 1 point "
        "| alarmed (100 %) | rollback (100 %) − oracle (100 %) | never stopping (100 %) − early stopping (90 %) |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for condition in [c for c in mem.CONDITIONS if any(r["condition"] == c for r in whole)]:
        diffs, vs_oracle, never, alarmed, pairs = [], [], [], 0, 0
        for run in (r for r in whole if r["condition"] == condition):
            twin = by_key.get(_key(run))
            if twin is None:
                continue
            pairs += 1
            es = early_stopping_accuracy(twin)
            acc = _accuracy(run)
            found = mem.first_alarm_and_onset(run, RULE, settings)
            if found is not None:
                alarmed += 1
            restored = acc[max(acc)] if found is None else restored_accuracy(run, found[1])
            diffs.append(restored - es)
            vs_oracle.append(restored - max(acc.values()))
            never.append(acc[max(acc)] - es)
        if not pairs:
            continue
        lines.append(
            f"| {condition} | {pairs} | {_median(diffs)} {_range(diffs)} | {sum(d < -1 for d in diffs)} | {alarmed} "
            f"| {_median(vs_oracle)} | {_median(never)} |"
        )
    return "\n".join(lines)


AVERAGED = ("avg", "avg_bn")
"""The weight averages' two readings: every tensor of the state averaged (BatchNorm's running statistics too, as
``curvopt.RollbackOnAlarm(average=...)`` restores them), and BatchNorm's statistics recomputed for the averaged
weights on 1,024 training inputs (as SWA does; recorded for models with BatchNorm only)."""


def averaged_accuracy(run: dict, epoch: int, variant: tuple[str, str], noisy: bool = False) -> float:
    """Accuracy of the weight average ``variant = (reading, half-life in epochs)`` at ``epoch``'s end: clean test, or
    the noisy validation split."""
    row = run["epochs_log"][epoch]
    reading, halflife = variant
    if f"{reading}_val_acc" not in row:  # no BatchNorm: nothing to recompute
        reading = "avg"
    return row[f"{reading}_noisy_val_acc" if noisy else f"{reading}_val_acc"][halflife]


def averaged_early_stopping(run: dict, variant: tuple[str, str]) -> float:
    """Early stopping (patience as :func:`benchmarks.memorisation.early_stopping_epoch`) on the weight average's
    noisy validation accuracy, restoring its best epoch's average: what early stopping gives with the same average."""
    _, best_epoch = mem.early_stopping_epoch(run, score=lambda row: averaged_accuracy(run, row["epoch"], variant, True))
    return averaged_accuracy(run, best_epoch, variant)


def averaged_table(split: list[dict], whole: list[dict], settings: dict[str, Any]) -> str:
    """Table 5 (see the module docstring)."""
    recorded = [r for r in split + whole if "avg_val_acc" in r["epochs_log"][-1]]
    if not recorded:
        return "(no run recorded the weight averages)"
    ids = {id(r) for r in recorded}
    halflives = sorted(recorded[0]["epochs_log"][-1]["avg_val_acc"], key=float)
    variants = [None, *((reading, h) for reading in AVERAGED for h in halflives)]
    by_key = {_key(r): r for r in split}
    lines = [
        "| condition | weights restored | pairs | rollback (100 %) − early stopping (90 %) | worse by > 1 | "
        "rollback (100 %) − early stopping on the average (90 %) | worse by > 1 | rollback (90 %) − early stopping "
        "(90 %) | rollback (100 %) − oracle checkpoint (100 %) |",
        "| --- | --- | ---: | --- | ---: | --- | ---: | --- | --- |",
    ]
    for condition in [c for c in mem.CONDITIONS if any(r["condition"] == c for r in recorded)]:
        for variant in variants:
            vs_es, vs_avg_es, within, vs_oracle = [], [], [], []
            for run in (r for r in whole if r["condition"] == condition and id(r) in ids):
                twin = by_key.get(_key(run))
                if twin is None or id(twin) not in ids:
                    continue
                restored = _restored(run, settings, variant)
                vs_es.append(restored - early_stopping_accuracy(twin))
                vs_oracle.append(restored - max(_accuracy(run).values()))
                if variant is not None:
                    vs_avg_es.append(restored - averaged_early_stopping(twin, variant))
            for run in (r for r in split if r["condition"] == condition and id(r) in ids):
                within.append(_restored(run, settings, variant) - early_stopping_accuracy(run))
            label = "the checkpoint" if variant is None else f"{variant[0]}, half-life {variant[1]} epochs"
            lines.append(
                f"| {condition} | {label} | {len(vs_es)} | {_median(vs_es)} {_range(vs_es)} "
                f"| {sum(d < -1 for d in vs_es)} | {_median(vs_avg_es)} {_range(vs_avg_es)} "
                f"| {sum(d < -1 for d in vs_avg_es) if vs_avg_es else '–'} | {_median(within)} {_range(within)} "
                f"| {_median(vs_oracle)} {_range(vs_oracle)} |"
            )
    return "\n".join(lines)


def _restored(run: dict, settings: dict[str, Any], variant: tuple[str, str] | None) -> float:
    """Clean test accuracy after a validation-free rollback (the model at the end when nothing alarmed): the last
    end-of-epoch checkpoint before the onset, or the weight average ``variant`` at that checkpoint."""
    found = mem.first_alarm_and_onset(run, RULE, settings)
    epoch = run["epochs_log"][-1]["epoch"]
    if found is not None:
        back = mem.rollback_epoch(run, run["series"]["step"][-1] + 1, found[1], keep=10_000)
        epoch = back if back is not None else 0
    return _accuracy(run)[epoch] if variant is None else averaged_accuracy(run, epoch, variant)


def lead_lag_table(runs: list[dict], settings: dict[str, Any]) -> str:
    """Table 3 (see the module docstring)."""
    names = list(LEADERS)
    lines = [
        "| task | condition | memorising runs | " + " | ".join(f"{n}: median, detected" for n in names) + " |",
        "| --- | --- | ---: | " + " | ".join("---" for _ in names) + " |",
    ]
    for task, condition in sorted({(r["task"], r["condition"]) for r in runs if r["condition"] != "clean"}):
        memorising = [
            r
            for r in runs
            if (r["task"], r["condition"]) == (task, condition) and mem.memorisation_onset(r) is not None
        ]
        if not memorising:
            continue
        cells = []
        for signal in LEADERS.values():
            delays = []
            for run in memorising:
                if signal == LOSS_JUMP:
                    step = loss_jump_alarm(run, settings)
                else:
                    step = mem.first_alarm(run, signal, settings if signal == "layer_frob" else {})
                if step is not None and step > run["noise_start_step"]:
                    delays.append(mem._epoch_of(run, step) - mem.memorisation_onset(run))
            cells.append(f"{_median(delays)}, {len(delays)}/{len(memorising)}")
        lines.append(f"| {task} | {condition} | {len(memorising)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def loss_jump_alarm(run: dict, settings: dict[str, Any]) -> int | None:
    """The step of the monitor's first training-loss jump alarm (``loss_jump``) in ``run``, or ``None``."""
    from curvopt import CusumMonitor
    from curvopt.control.monitor import AGGREGATE, LOSS

    monitor = CusumMonitor(**{**settings, "gradient": False, "alarm_on": AGGREGATE})
    for step, loss in zip(run["series"]["step"], run["series"]["train_loss"]):
        if any(a.kind == LOSS for a in monitor.update(step, {AGGREGATE: 1.0, LOSS: loss})):
            return step
    return None


def convergence_epoch(run: dict) -> int:
    """The first epoch whose mean training loss is within :data:`CONVERGED` nats of the run's lowest epoch mean."""
    spe, losses = run["steps_per_epoch"], run["series"]["train_loss"]
    per_epoch: dict[int, list[float]] = {}
    for step, loss in zip(run["series"]["step"], losses):
        per_epoch.setdefault((step - 1) // spe, []).append(loss)
    means = {e: statistics.fmean(v) for e, v in sorted(per_epoch.items())}
    lowest = min(means.values())
    return next(e for e, m in means.items() if m <= lowest + CONVERGED)


def clean_table(runs: list[dict], settings: dict[str, Any]) -> str:
    """Table 4 (see the module docstring)."""
    lines = [
        "| task | optimizer | data | clean runs | epochs | converged (median epoch) | false alarms (epochs) |",
        "| --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for task, opt_name, holdout in sorted({(r["task"], r["opt"], r.get("holdout", 0.1)) for r in runs}):
        clean = [
            r
            for r in runs
            if (r["task"], r["opt"], r.get("holdout", 0.1)) == (task, opt_name, holdout) and r["condition"] == "clean"
        ]
        if not clean:
            continue
        alarms = [mem.first_alarm(r, RULE, settings) for r in clean]
        epochs = [mem._epoch_of(r, a) for r, a in zip(clean, alarms) if a is not None]
        data = "100 %" if holdout == 0 else f"{100 - 100 * holdout:.0f} %"
        lines.append(
            f"| {task} | {opt_name} | {data} | {len(clean)} | {clean[0]['epochs']} "
            f"| {statistics.median(convergence_epoch(r) for r in clean):.0f} "
            f"| {len(epochs)}/{len(clean)} {epochs if epochs else ''} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="directories of recorded runs")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=100)
    parser.add_argument("--task", nargs="+", default=None, help="only these tasks")
    parser.add_argument("--monitor", type=json.loads, default={}, help="CusumMonitor settings as JSON")
    args = parser.parse_args(argv)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    runs = [r for d in args.runs for r in mem.load_runs(d, seeds) if args.task is None or r["task"] in args.task]
    split = [r for r in runs if r.get("holdout", 0.1) > 0]
    whole = [r for r in runs if r.get("holdout", 0.1) == 0]
    sections: list[tuple[str, Callable[[], str]]] = [
        ("Onset and rollback (runs with a validation split)", lambda: onset_table(split, args.monitor)),
        ("All the data vs a validation split", lambda: full_data_table(split, whole, args.monitor)),
        (
            "Lead and lag: first alarm of each signal alone, epochs after the memorisation onset",
            lambda: lead_lag_table(split, args.monitor),
        ),
        ("Clean runs", lambda: clean_table(runs, args.monitor)),
        ("Restoring a weight average", lambda: averaged_table(split, whole, args.monitor)),
    ]
    print(
        f"{len(split)} runs with a validation split, {len(whole)} on all the data; seeds {seeds.start}-{seeds.stop - 1}"
    )
    for title, table in sections:
        if title.startswith("All") and not whole:
            continue
        print(f"\n### {title}\n\n{table()}")


if __name__ == "__main__":
    main()
