"""Figures of a run's curvature log (matplotlib, no display needed).

Pure functions from logged records to ``matplotlib.figure.Figure`` objects; :mod:`curvopt.reporting.report`
saves them as PNG/HTML and :class:`curvopt.WandbLogger` sends the trace heatmap to W&B.
Records are the dicts of :func:`curvopt.read_jsonl` (``type`` = ``metrics``, ``alarm``,
``train``, ``eval``, ``config``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import SymLogNorm
from matplotlib.figure import Figure

AGGREGATE_KEY = "aggregate"


def layer_series(records: Sequence[Mapping[str, Any]], kind: str) -> tuple[list[int], dict[str, list[float]]]:
    """Steps and ``{layer: values}`` of ``curv/<kind>/<layer>`` over the ``metrics`` records (NaN where missing)."""
    prefix = f"curv/{kind}/"
    rows = [r for r in records if r.get("type") == "metrics" and any(k.startswith(prefix) for k in r)]
    steps = [int(r["step"]) for r in rows]
    names: list[str] = []
    for r in rows:
        for k in r:
            if k.startswith(prefix) and k[len(prefix) :] not in names:
                names.append(k[len(prefix) :])
    series = {n: [_num(r.get(prefix + n)) for r in rows] for n in names}
    return steps, series


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def trace_heatmap_figure(traces: Sequence[tuple[int, Mapping[str, float]]], title: str = "") -> Figure:
    """Layers (rows, in network order) × estimates (columns), colour = Hutchinson trace of H_ll.

    A symmetric-log colour scale keeps the sign (negative traces in blue) and shows layers whose
    traces differ by orders of magnitude on one picture.
    """
    names: list[str] = []
    for _, row in traces:
        names.extend(n for n in row if n not in names)
    steps = [s for s, _ in traces]
    grid = np.array([[_num(row.get(n)) for _, row in traces] for n in names], dtype=float)
    finite = np.abs(grid[np.isfinite(grid)])
    vmax = float(finite.max()) if finite.size else 1.0
    positive = finite[finite > 0]
    linthresh = float(np.percentile(positive, 10)) if positive.size else 1e-6
    height = min(12.0, 1.5 + 0.22 * len(names))
    fig, ax = plt.subplots(figsize=(10, height), constrained_layout=True)
    image = ax.imshow(
        np.ma.masked_invalid(grid),
        aspect="auto",
        interpolation="nearest",
        cmap="RdBu_r",
        norm=SymLogNorm(linthresh=max(linthresh, 1e-12), vmin=-vmax, vmax=vmax),
    )
    ax.set_yticks(range(len(names)), names, fontsize=7 if len(names) > 20 else 9)
    ticks = np.linspace(0, len(steps) - 1, num=min(len(steps), 8)).round().astype(int) if steps else []
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks])
    ax.set_xlabel("optimizer step")
    ax.set_title(title or "Hessian trace per layer (Hutchinson), symmetric log scale")
    fig.colorbar(image, ax=ax, label="tr H_ll")
    return fig


def _alarm_lines(ax: Any, records: Sequence[Mapping[str, Any]]) -> None:
    alarms = [r for r in records if r.get("type") == "alarm"]
    for i, alarm in enumerate(alarms):
        ax.axvline(alarm["step"], color="crimson", linestyle="--", linewidth=1.2, label="alarm" if i == 0 else None)


def layer_lines_figure(
    records: Sequence[Mapping[str, Any]], kind: str, *, title: str, ylabel: str, log_y: bool = False
) -> Figure:
    """One line per layer of ``curv/<kind>/<layer>`` over steps; alarms as dashed red lines."""
    steps, series = layer_series(records, kind)
    fig, ax = plt.subplots(figsize=(10, 4.5), constrained_layout=True)
    colors = plt.cm.viridis(np.linspace(0, 1, max(len(series), 1)))
    for color, (name, values) in zip(colors, series.items()):
        ax.plot(steps, values, color=color, linewidth=1.2, label=name)
    if log_y and any(v > 0 for vs in series.values() for v in vs if math.isfinite(v)):
        ax.set_yscale("log")
    _alarm_lines(ax, records)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if series:
        ax.legend(fontsize=7, ncol=max(1, len(series) // 12), loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.text(0.5, 0.5, f"no {kind} in this log", ha="center", va="center", transform=ax.transAxes)
    return fig


def cusum_figure(records: Sequence[Mapping[str, Any]]) -> Figure:
    """The model-wide CUSUM statistic (thick) and per-layer ones (thin) with threshold h and alarms."""
    steps, series = layer_series(records, "cusum")
    threshold = series.pop("threshold", None)
    aggregate = series.pop(AGGREGATE_KEY, None)
    fig, ax = plt.subplots(figsize=(10, 4.5), constrained_layout=True)
    for values in series.values():
        ax.plot(steps, values, color="0.75", linewidth=0.8)
    if series:
        ax.plot([], [], color="0.75", linewidth=0.8, label="per layer")
    if aggregate is not None:
        ax.plot(steps, aggregate, color="black", linewidth=2.0, label="model-wide S")
    if threshold is not None and steps:
        ax.plot(steps, threshold, color="darkorange", linestyle=":", linewidth=1.5, label="threshold h")
    _alarm_lines(ax, records)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("CUSUM statistic S")
    ax.set_title("Memorisation monitor: CUSUM of the rise in curvature (alarm when S > h)")
    if steps:
        ax.legend(loc="upper left")
    else:
        ax.text(0.5, 0.5, "no CUSUM statistics in this log (monitor off?)", ha="center", va="center",
                transform=ax.transAxes)  # fmt: skip
    return fig


def training_figure(records: Sequence[Mapping[str, Any]]) -> Figure:
    """Training loss (per logged step) and validation loss/accuracy (per epoch) when logged."""
    train = [r for r in records if r.get("type") == "train" and r.get("train/loss") is not None]
    evals = [r for r in records if r.get("type") == "eval"]
    curv = [r for r in records if r.get("type") == "metrics" and r.get("curv/loss") is not None]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    if train:
        ax_loss.plot([r["step"] for r in train], [r["train/loss"] for r in train], label="train loss", linewidth=1)
    elif curv:
        ax_loss.plot([r["step"] for r in curv], [r["curv/loss"] for r in curv], label="loss (curvature batch)")
    if evals and any("eval/loss" in r for r in evals):
        ax_loss.plot([r["step"] for r in evals], [_num(r.get("eval/loss")) for r in evals], "o-", label="val loss")
    _alarm_lines(ax_loss, records)
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("Loss")
    ax_loss.legend()
    acc_keys = [k for k in ("train/acc", "eval/top1", "eval/top1_ema") if any(k in r for r in train + evals)]
    for key in acc_keys:
        rows = [r for r in train + evals if key in r]
        ax_acc.plot([r["step"] for r in rows], [_num(r[key]) for r in rows], "o-" if key.startswith("eval") else "-",
                    label=key, linewidth=1)  # fmt: skip
    _alarm_lines(ax_acc, records)
    ax_acc.set_xlabel("optimizer step")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("Accuracy")
    if acc_keys:
        ax_acc.legend()
    else:
        ax_acc.text(0.5, 0.5, "no accuracy in this log", ha="center", va="center", transform=ax_acc.transAxes)
    return fig


def matrix_heatmap_figure(matrix: Sequence[Sequence[float]], layers: Sequence[str], title: str, label: str) -> Figure:
    """An L × L layer map (resonance, coupling) on a log colour scale, layers in network order."""
    from matplotlib.colors import LogNorm

    grid = np.array(matrix, dtype=float)
    positive = grid[np.isfinite(grid) & (grid > 0)]
    size = min(11.0, 2.5 + 0.25 * len(layers))
    fig, ax = plt.subplots(figsize=(size + 1.5, size), constrained_layout=True)
    norm = LogNorm(vmin=float(positive.min()), vmax=float(positive.max())) if positive.size else None
    image = ax.imshow(np.ma.masked_less_equal(grid, 0), cmap="magma", norm=norm, interpolation="nearest")
    fontsize = 6 if len(layers) > 20 else 9
    ax.set_xticks(range(len(layers)), layers, rotation=90, fontsize=fontsize)
    ax.set_yticks(range(len(layers)), layers, fontsize=fontsize)
    ax.set_xlabel("source layer w")
    ax.set_ylabel("layer v")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=label)
    return fig


def inter_layer_figure(records: Sequence[Mapping[str, Any]]) -> Figure:
    """Cross-block mass Φ and each layer's top Hessian eigenvalue over steps (inter-layer cadence)."""
    rows = [r for r in records if r.get("type") == "metrics" and r.get("curv/phi") is not None]
    steps = [r["step"] for r in rows]
    fig, (ax_phi, ax_eig) = plt.subplots(1, 2, figsize=(13, 4.2), constrained_layout=True)
    ax_phi.errorbar(steps, [r["curv/phi"] for r in rows], yerr=[_num(r.get("curv/phi_se")) for r in rows], fmt="o-")
    ax_phi.set_ylim(0, 1)
    ax_phi.set_xlabel("optimizer step")
    ax_phi.set_ylabel("Φ")
    ax_phi.set_title("Cross-block mass Φ = 1 − Σ‖H_vv‖² / ‖H‖² (what block-diagonal methods drop)")
    _, tops = layer_series(rows, "top_eig")
    colors = plt.cm.viridis(np.linspace(0, 1, max(len(tops), 1)))
    for color, (name, values) in zip(colors, tops.items()):
        ax_eig.plot(steps, values, color=color, label=name, linewidth=1.2)
    if any(v > 0 for vs in tops.values() for v in vs if math.isfinite(v)):
        ax_eig.set_yscale("symlog", linthresh=1e-3)
    _alarm_lines(ax_eig, records)
    ax_eig.set_xlabel("optimizer step")
    ax_eig.set_ylabel("λ_max(H_ll)")
    ax_eig.set_title("Top Hessian eigenvalue per layer (Lanczos); 2/λ_max bounds a stable step")
    if tops:
        ax_eig.legend(fontsize=7, ncol=max(1, len(tops) // 12), loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig
