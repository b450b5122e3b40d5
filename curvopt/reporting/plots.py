"""Figures of a run's curvature log (matplotlib, no display needed).

Pure functions from logged records (the dicts of :func:`curvopt.read_jsonl`: ``metrics``, ``alarm``,
``event``, ``train``, ``eval``, ``config``, ``run``) to ``matplotlib.figure.Figure`` objects;
:mod:`curvopt.reporting.report` saves them as PNG/HTML and :class:`curvopt.WandbLogger` sends some
to W&B. Conventions every figure follows:

* layers are labelled ``name · Type`` (``layer1.0.conv1 · Conv2d``, ``0 · Linear``) and kept in
  network order;
* with many layers a line plot shows the ``top`` layers by the plotted quantity, and the others
  as one grey band (their range at each step) — never 40 coloured lines;
* the run's events (label-noise start, alarms, resumes, LR restarts, setting changes) are marked
  on every time axis;
* a figure is drawn only for a quantity the run has, with its reference line where one carries
  meaning (s = 1, GN-Gap = 1, the CUSUM threshold).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib

from ..control import log_schema

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import LogNorm, SymLogNorm
from matplotlib.figure import Figure

AGGREGATE_KEY = "aggregate"
TOP = 8  # layers drawn as lines; the rest form a grey band
WIDE = (10.5, 4.6)

# How each kind of event is drawn: (colour, line style, legend text).
EVENT_STYLE = {
    "label_noise_start": ("purple", "-.", "label noise starts"),
    "alarm": ("crimson", "--", "memorisation alarm"),
    "change_point": ("crimson", ":", "change point (where the alarm's change began)"),
    "resume": ("0.45", ":", "resumed"),
    "rollback": ("teal", "--", "rolled back"),
    "lr_restart": ("darkorange", ":", "LR schedule restart"),
    "settings_changed": ("0.6", (0, (1, 3)), "settings changed"),
}


# ---------------------------------------------------------------------- reading the records
def layer_series(records: Sequence[Mapping[str, Any]], kind: str) -> tuple[list[int], dict[str, list[float]]]:
    """Steps and ``{layer: values}`` of ``curv/<kind>/<layer>`` over the ``metrics`` records (NaN where missing)."""
    prefix = log_schema.layer_prefix(kind)
    rows = [r for r in records if r.get("type") == "metrics" and any(k.startswith(prefix) for k in r)]
    steps = [int(r["step"]) for r in rows]
    names: list[str] = []
    for r in rows:
        for k in r:
            if k.startswith(prefix) and k[len(prefix) :] not in names:
                names.append(k[len(prefix) :])
    series = {n: [_num(r.get(prefix + n)) for r in rows] for n in names}
    return steps, series


def scalar_series(records: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    rows = [r for r in records if r.get("type") == "metrics" and r.get(key) is not None]
    return [int(r["step"]) for r in rows], [_num(r[key]) for r in rows]


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def layer_labels(records: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """``{name: "name · Type"}`` from the wrapper's ``config`` record (names alone when it has no types)."""
    for record in records:
        types = (record.get("curvopt") or {}).get("layer_types") if record.get("type") == "config" else None
        if types:
            return {name: f"{name} · {kind}" if kind else name for name, kind in types.items()}
    return {}


def label_of(name: str, labels: Mapping[str, str]) -> str:
    if name == AGGREGATE_KEY:
        return "model-wide"
    return labels.get(name, name)


@dataclass
class Event:
    step: int
    kind: str
    text: str = ""


def last_step(records: Sequence[Mapping[str, Any]]) -> int | None:
    """The last optimizer step the run reached (its last metrics, training or validation record)."""
    kinds = ("metrics", "train", "eval")
    steps = [int(r["step"]) for r in records if r.get("type") in kinds and r.get("step") is not None]
    return max(steps) if steps else None


def run_events(records: Sequence[Mapping[str, Any]]) -> list[Event]:
    """The run's events and alarms that happened (none after its last step: a label switch configured past the
    end of a short run never took place), in step order."""
    end = last_step(records)
    events = [
        Event(int(r["step"]), str(r.get("kind", "event")), str(r.get("text", "")))
        for r in records
        if r.get("type") == "event" and r.get("step") is not None and (end is None or int(r["step"]) <= end)
    ]
    events += [
        Event(int(r["step"]), "alarm", f"CUSUM {r.get('statistic', math.nan):.2f} > {r.get('threshold')}")
        for r in records
        if r.get("type") == "alarm"
    ]
    events += [
        Event(int(r["onset_step"]), "change_point", f"the rise of the alarm at step {r['step']} began here")
        for r in records
        if r.get("type") == "alarm" and r.get("onset_step") is not None and int(r["onset_step"]) < int(r["step"])
    ]
    return sorted(events, key=lambda e: e.step)


def mark_events(ax: Any, events: Sequence[Event], *, to_x: Any = None, halo: bool = False) -> None:
    """Vertical lines at the events (``to_x`` maps a step to the axis's x, e.g. a heatmap column); ``halo`` draws
    each over a white outline, so it shows on dark and bright cells of a heatmap alike."""
    from matplotlib import patheffects

    seen: set[str] = set()
    effects = [patheffects.withStroke(linewidth=4, foreground="white")] if halo else None
    for event in events:
        colour, style, text = EVENT_STYLE.get(event.kind, ("0.3", ":", event.kind.replace("_", " ")))
        x = event.step if to_x is None else to_x(event.step)
        if x is None:
            continue
        label = None if event.kind in seen else text
        ax.axvline(
            x,
            color=colour,
            linestyle=style,
            linewidth=2.0 if halo else 1.4,
            label=label,
            zorder=3,
            path_effects=effects,
        )
        seen.add(event.kind)


def top_layers(series: Mapping[str, Sequence[float]], count: int = TOP, *, by: str = "abs") -> list[str]:
    """The ``count`` layers with the largest typical value (median over the second half of the run)."""

    def size(values: Sequence[float]) -> float:
        tail = [
            abs(v) if by == "abs" else abs(math.log(v))
            for v in values[len(values) // 2 :]
            if math.isfinite(v) and (by == "abs" or v > 0)
        ]
        return float(np.median(tail)) if tail else -math.inf

    ranked = sorted(series, key=lambda n: size(series[n]), reverse=True)
    chosen = set(ranked[:count])
    return [n for n in series if n in chosen]  # network order


def _points(xs: Sequence[Any]) -> dict[str, Any]:
    """Markers for a series too short to show as a line (one or two points would be invisible or a bare segment)."""
    return {"marker": "o", "markersize": 4} if len(xs) <= 2 else {}


def _legend(ax: Any, **kwargs: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, **kwargs)


# ---------------------------------------------------------------------- figures
def layer_lines_figure(
    records: Sequence[Mapping[str, Any]],
    kind: str,
    *,
    title: str,
    ylabel: str,
    log_y: bool = False,
    reference: tuple[float, str] | None = None,
    rank_by: str = "abs",
    total_key: str | None = None,
) -> Figure | None:
    """The ``TOP`` layers of ``curv/<kind>/<layer>`` as lines, the rest as a grey band, the events, a
    reference line; ``None`` when the run has no such quantity."""
    steps, series = layer_series(records, kind)
    series.pop(AGGREGATE_KEY, None)
    series.pop("threshold", None)
    if not steps or not series:
        return None
    labels, events = layer_labels(records), run_events(records)
    shown = top_layers(series, by=rank_by)
    rest = [n for n in series if n not in shown]
    fig, ax = plt.subplots(figsize=WIDE, constrained_layout=True)
    if rest:
        block = np.array([series[n] for n in rest], dtype=float)
        with np.errstate(all="ignore"):
            low, high = np.nanmin(block, axis=0), np.nanmax(block, axis=0)
        ax.fill_between(steps, low, high, color="0.85", linewidth=0, label=f"other {len(rest)} layers (range)")
    colors = plt.cm.tab10(np.arange(len(shown)) % 10)
    for color, name in zip(colors, shown):
        ax.plot(steps, series[name], color=color, linewidth=1.3, label=label_of(name, labels), **_points(steps))
    if total_key is not None:
        total_steps, total = scalar_series(records, total_key)
        if total_steps:
            ax.plot(
                total_steps, total, color="black", linewidth=2.2, label="model (all layers)", **_points(total_steps)
            )
    if reference is not None:
        ax.axhline(reference[0], color="0.3", linewidth=1.0, linestyle="-", alpha=0.7, label=reference[1])
    if log_y and any(v > 0 for vs in series.values() for v in vs if math.isfinite(v)):
        ax.set_yscale("log")
    mark_events(ax, events)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    _legend(ax)
    return fig


def curvature_heatmap_figure(records: Sequence[Mapping[str, Any]]) -> Figure | None:
    """Layers (rows, network order) × estimates, colour = log of ‖H_l,:‖_F²/d_l (the monitor's per-layer
    signal: the layer's mean squared Hessian eigenvalue, never negative), events as vertical lines."""
    steps, series = layer_series(records, "frob")
    if not steps or not series:
        return None
    labels, events = layer_labels(records), run_events(records)
    names = list(series)
    grid = np.array([series[n] for n in names], dtype=float)
    positive = grid[np.isfinite(grid) & (grid > 0)]
    norm = LogNorm(vmin=float(np.percentile(positive, 1)), vmax=float(positive.max())) if positive.size else None
    height = min(13.0, 2.2 + 0.2 * len(names))
    fig, ax = plt.subplots(figsize=(10.5, height), constrained_layout=True)
    image = ax.imshow(
        np.ma.masked_less_equal(grid, 0), aspect="auto", interpolation="nearest", cmap="viridis", norm=norm
    )
    ticks = heatmap_rows(grid)
    ax.set_yticks(ticks, [label_of(names[i], labels) for i in ticks], fontsize=8 if len(names) <= 30 else 6.5)
    xticks = np.linspace(0, len(steps) - 1, num=min(len(steps), 8)).round().astype(int)
    ax.set_xticks(xticks, [str(steps[i]) for i in xticks])

    def column(step: int) -> float | None:
        if step < steps[0] or step > steps[-1]:
            return None
        return float(np.interp(step, steps, np.arange(len(steps))))

    mark_events(ax, events, to_x=column, halo=True)
    ax.set_xlabel("optimizer step")
    ax.set_title("Curvature per layer: mean squared Hessian eigenvalue ||H_l,:||_F^2 / d_l (log colour)", fontsize=11)
    fig.colorbar(image, ax=ax, label="||H_l,:||_F^2 / d_l", pad=0.01)
    _legend(ax)
    return fig


MAX_ROW_LABELS = 60


def heatmap_rows(grid: np.ndarray, limit: int = MAX_ROW_LABELS) -> list[int]:
    """Rows to label: all of them up to ``limit``; beyond, evenly spaced ones plus the ``TOP`` brightest (largest
    median), so a bright row is never the unlabelled one."""
    rows = grid.shape[0]
    if rows <= limit:
        return list(range(rows))
    with np.errstate(all="ignore"):
        level = np.nanmedian(np.where(grid > 0, grid, np.nan), axis=1)
    brightest = [int(i) for i in np.argsort(-np.nan_to_num(level, nan=-np.inf))[:TOP]]
    spaced = list(range(0, rows, math.ceil(rows / (limit - TOP))))
    return sorted(set(spaced) | set(brightest))


def trace_figure(records: Sequence[Mapping[str, Any]]) -> Figure | None:
    """Per-layer Hutchinson traces of the ``TOP`` layers with ± 1 SE bands (symmetric log axis: traces can be
    negative, and near convergence single estimates change sign within their noise)."""
    fig = layer_lines_figure(
        records,
        "trace",
        title="Hessian trace per layer tr(H_ll), ± 1 standard error (top layers; symlog axis)",
        ylabel="tr(H_ll)",
        total_key=log_schema.total("trace"),
    )
    if fig is None:
        return None
    ax = fig.axes[0]
    steps, traces = layer_series(records, "trace")
    _, errors = layer_series(records, "trace_se")
    labels = layer_labels(records)
    for line in ax.get_lines():
        name = next((n for n in traces if label_of(n, labels) == line.get_label()), None)
        if name is not None and name in errors:
            mean, se = np.array(traces[name]), np.nan_to_num(np.array(errors[name]))
            ax.fill_between(steps, mean - se, mean + se, color=line.get_color(), alpha=0.15, linewidth=0)
    values = [abs(v) for line in ax.get_lines() for v in line.get_ydata() if np.isfinite(v) and v != 0]
    linthresh = float(np.percentile(values, 10)) if values else 1.0
    ax.set_yscale("symlog", linthresh=linthresh)
    _sparse_symlog_ticks(ax, linthresh)
    return fig


def _sparse_symlog_ticks(ax: Any, linthresh: float, per_side: int = 4) -> None:
    """Decade ticks of a symlog axis, at most ``per_side`` on each side of 0 and none inside the linear band
    except 0, so the labels never overlap (matplotlib's default puts ±linthresh, 0 and every decade)."""
    from matplotlib import ticker

    low, high = ax.get_ylim()
    ticks = [0.0]
    for sign, bound in ((1.0, high), (-1.0, -low)):
        if bound <= linthresh:
            continue
        first, last = math.ceil(math.log10(linthresh * 1.0001)), math.floor(math.log10(bound))
        if last < first:
            continue
        stride = max(1, math.ceil((last - first + 1) / per_side))
        ticks += [sign * 10.0**e for e in range(last, first - 1, -stride)]
    ax.yaxis.set_major_locator(ticker.FixedLocator(sorted(ticks)))
    ax.yaxis.set_minor_locator(ticker.NullLocator())
    ax.yaxis.set_major_formatter(
        ticker.FuncFormatter(
            lambda v, _: "0" if v == 0 else f"{v:.0e}".replace("e+0", "e").replace("e-0", "e-").replace("e+", "e")
        )
    )


def cusum_figure(records: Sequence[Mapping[str, Any]]) -> Figure | None:
    """The top layers' CUSUM statistics, the model-wide one, the deciding threshold, the calibration period, events."""
    steps, series = layer_series(records, "cusum")
    if not steps:
        return None
    threshold = series.pop("threshold", None)
    aggregate = series.pop(AGGREGATE_KEY, None)
    gradient, gradient_threshold = series.pop("gradient", None), series.pop("gradient_threshold", None)
    labels, events = layer_labels(records), run_events(records)
    fig, ax = plt.subplots(figsize=WIDE, constrained_layout=True)
    ready_steps, ready = scalar_series(records, log_schema.MONITOR_READY)
    per_layer = bool(scalar_series(records, log_schema.MONITOR_PER_LAYER)[1][-1:] == [1.0])
    calibrating = [s for s, r in zip(ready_steps, ready) if r == 0]
    if calibrating:
        ax.axvspan(steps[0], max(calibrating), color="0.93", label="monitor calibrating (no alarm possible)")
    shown = top_layers(series) if series else []
    for color, name in zip(plt.cm.tab10(np.arange(len(shown)) % 10), shown):
        ax.plot(
            steps, series[name], color=color, linewidth=1.0, alpha=0.8, label=label_of(name, labels), **_points(steps)
        )
    if aggregate is not None:
        role = "for reference; layers raise the alarm" if per_layer else "raises the alarm"
        ax.plot(
            steps,
            aggregate,
            color="black",
            linewidth=1.4 if per_layer else 2.4,
            label=f"model-wide S ({role})",
            **_points(steps),
        )
    if threshold is not None:
        h = [v for v in threshold if math.isfinite(v)]
        if h:  # black dashes: no layer line is black (tab10), and the model-wide line is solid
            which = "per layer" if per_layer else "h"
            ax.axhline(h[-1], color="black", linestyle=(0, (6, 3)), lw=1.6, label=f"threshold {which} = {h[-1]:.3g}")
    if gradient is not None:  # the gradient norm's own series and threshold, in grey
        ax.plot(
            steps,
            gradient,
            color="0.45",
            linewidth=1.6,
            linestyle="-.",
            label="gradient norm S (its own series)",
            **_points(steps),
        )
        g = [v for v in gradient_threshold or [] if math.isfinite(v)]
        if g:
            ax.axhline(
                g[-1], color="0.45", linestyle=(0, (2, 2)), lw=1.4, label=f"threshold, gradient norm = {g[-1]:.3g}"
            )
    mark_events(ax, events)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("CUSUM statistic S")
    who = "a layer's S" if per_layer else "the model-wide S"
    also = " or the gradient norm's S > its own" if gradient is not None else ""
    sep = "\n" if also else " "  # two lines when the gradient norm joins, so the title fits the figure
    ax.set_title(
        f"Memorisation monitor: CUSUM of the rise in curvature{sep}(alarm when {who} > the threshold{also})",
        fontsize=11,
    )
    _legend(ax)
    return fig


def training_figure(records: Sequence[Mapping[str, Any]]) -> Figure | None:
    """Training loss (per logged step) and validation loss/accuracy (per epoch), events marked."""
    train = [r for r in records if r.get("type") == "train" and r.get("train/loss") is not None]
    evals = [r for r in records if r.get("type") == "eval"]
    curv = [r for r in records if r.get("type") == "metrics" and r.get(log_schema.LOSS) is not None]
    if not (train or evals or curv):
        return None
    events = run_events(records)
    has_acc = any("train/acc" in r for r in train) or any("eval/top1" in r for r in evals)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(12.5, 4.3), constrained_layout=True, squeeze=False)
    ax_loss = axes[0][0]
    if train:
        ax_loss.plot(
            [r["step"] for r in train],
            [r["train/loss"] for r in train],
            linewidth=1,
            label="training loss",
            **_points(train),
        )
    elif curv:
        ax_loss.plot(
            [r["step"] for r in curv],
            [r[log_schema.LOSS] for r in curv],
            label="loss on the curvature batch",
            **_points(curv),
        )
    if any("eval/loss" in r for r in evals):
        ax_loss.plot(
            [r["step"] for r in evals],
            [_num(r.get("eval/loss")) for r in evals],
            "o-",
            markersize=3,
            label="validation loss",
        )
    mark_events(ax_loss, events)
    ax_loss.set(xlabel="optimizer step", ylabel="loss", title="Loss")
    _legend(ax_loss)
    if has_acc:
        ax_acc = axes[0][1]
        curves = (
            ("train/acc", "training accuracy (batch)", "-"),
            ("eval/top1", "validation top-1", "o-"),
            ("eval/top1_ema", "validation top-1 (EMA weights)", "s--"),
        )
        for key, text, style in curves:
            rows = [r for r in train + evals if key in r]
            if rows:
                marker = {"markersize": 4, "marker": "o"} if len(rows) <= 2 and style == "-" else {"markersize": 3}
                ax_acc.plot(
                    [r["step"] for r in rows], [_num(r[key]) for r in rows], style, linewidth=1, label=text, **marker
                )
        mark_events(ax_acc, events)
        ax_acc.set(xlabel="optimizer step", ylabel="accuracy (%)", title="Accuracy")
        _legend(ax_acc)
    return fig


def matrix_heatmap_figure(
    matrix: Sequence[Sequence[float]],
    layers: Sequence[str],
    title: str,
    label: str,
    labels: Mapping[str, str] | None = None,
) -> Figure:
    """An L × L layer map (resonance, coupling) on a log colour scale, layers in network order."""
    grid = np.array(matrix, dtype=float)
    positive = grid[np.isfinite(grid) & (grid > 0)]
    size = min(11.0, 3.0 + 0.22 * len(layers))
    fig, ax = plt.subplots(figsize=(size + 2.5, size), constrained_layout=True)
    norm = LogNorm(vmin=float(positive.min()), vmax=float(positive.max())) if positive.size else None
    image = ax.imshow(np.ma.masked_less_equal(grid, 0), cmap="magma", norm=norm, interpolation="nearest")
    every = max(1, math.ceil(len(layers) / 30))
    ticks = list(range(0, len(layers), every))
    names = [label_of(layers[i], labels or {}) for i in ticks]
    fontsize = 7 if len(layers) > 20 else 9
    ax.set_xticks(ticks, names, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, names, fontsize=fontsize)
    ax.set_xlabel("source layer w")
    ax.set_ylabel("layer v")
    ax.set_title(title, fontsize=11)
    fig.colorbar(image, ax=ax, label=label)
    return fig


def inter_layer_figure(records: Sequence[Mapping[str, Any]]) -> Figure | None:
    """Cross-block mass Φ and each top layer's top Hessian eigenvalue over steps (inter-layer cadence)."""
    rows = [r for r in records if r.get("type") == "metrics" and r.get(log_schema.PHI) is not None]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    events = run_events(records)
    fig, (ax_phi, ax_eig) = plt.subplots(1, 2, figsize=(13.5, 4.3), constrained_layout=True)
    ax_phi.errorbar(
        steps, [r[log_schema.PHI] for r in rows], yerr=[_num(r.get(log_schema.PHI_SE)) for r in rows], fmt="o-"
    )
    ax_phi.set_ylim(0, 1)
    mark_events(ax_phi, events)
    ax_phi.set(xlabel="optimizer step", ylabel="Φ", title="Cross-block mass Φ (what block-diagonal methods drop)")
    _, tops = layer_series(rows, "top_eig")
    labels = layer_labels(records)
    shown = top_layers(tops) if tops else []
    for color, name in zip(plt.cm.tab10(np.arange(len(shown)) % 10), shown):
        ax_eig.plot(steps, tops[name], color=color, label=label_of(name, labels), linewidth=1.2)
    if any(v > 0 for vs in tops.values() for v in vs if math.isfinite(v)):
        ax_eig.set_yscale("symlog", linthresh=1e-3)
    mark_events(ax_eig, events)
    ax_eig.set(xlabel="optimizer step", ylabel="λ_max(H_ll)", title="Top Hessian eigenvalue per layer (Lanczos)")
    _legend(ax_eig)
    return fig


def trace_heatmap_figure(traces: Sequence[tuple[int, Mapping[str, float]]], title: str = "") -> Figure:
    """Layers × estimates of the per-layer trace (symmetric log colour), for W&B's running heatmap."""
    names: list[str] = []
    for _, row in traces:
        names.extend(n for n in row if n not in names)
    steps = [s for s, _ in traces]
    grid = np.array([[_num(row.get(n)) for _, row in traces] for n in names], dtype=float)
    finite = np.abs(grid[np.isfinite(grid)])
    vmax = float(finite.max()) if finite.size else 1.0
    positive = finite[finite > 0]
    linthresh = float(np.percentile(positive, 10)) if positive.size else 1e-6
    fig, ax = plt.subplots(figsize=(10, min(11.0, 1.8 + 0.2 * len(names))), constrained_layout=True)
    image = ax.imshow(
        np.ma.masked_invalid(grid),
        aspect="auto",
        interpolation="nearest",
        cmap="RdBu_r",
        norm=SymLogNorm(linthresh=max(linthresh, 1e-12), vmin=-vmax, vmax=vmax),
    )
    every = max(1, math.ceil(len(names) / 30))
    ticks = list(range(0, len(names), every))
    ax.set_yticks(ticks, [names[i] for i in ticks], fontsize=7 if len(names) > 20 else 9)
    xticks = np.linspace(0, len(steps) - 1, num=min(len(steps), 8)).round().astype(int) if steps else []
    ax.set_xticks(xticks, [str(steps[i]) for i in xticks])
    ax.set_xlabel("optimizer step")
    ax.set_title(title or "Hessian trace per layer (Hutchinson), symmetric log colour", fontsize=11)
    fig.colorbar(image, ax=ax, label="tr H_ll")
    return fig
