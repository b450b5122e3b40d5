"""``curvopt report RUN_DIR``: PNG figures and one self-contained HTML page from a run's JSONL log.

The page tells the run's story: what was trained (model, data, optimizer, label noise, curvature
settings), the alarms (when, which layers, the statistic), a per-layer table at the last estimate
and at the first alarm, and every figure with a paragraph on how to read it; images are inline, so
the page is one file to send. Figures are drawn only for quantities the run logged.
"""

from __future__ import annotations

import base64
import html
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..control import log_schema
from ..control.monitor import distinct_numbers, no_layers_text
from .loggers import LOG_NAME, deduplicate, read_jsonl

MONITOR_KEYS = ("h", "k", "warmup", "signal", "alarm_on")


class ReportError(ValueError):
    """The run directory has no readable curvature log."""


@dataclass(frozen=True)
class Section:
    """One figure of the report: file stem, heading, builder and how to read it."""

    stem: str
    heading: str
    build: Callable[[Sequence[Mapping[str, Any]]], Any]
    how_to_read: str


def _sections() -> list[Section]:
    from . import plots

    return [
        Section(
            "curvature_heatmap",
            "Curvature per layer",
            plots.curvature_heatmap_figure,
            "Each row is a layer (in network order), each column an estimate; colour is the layer's mean squared "
            "Hessian eigenvalue on a log scale, the quantity the memorisation monitor watches. With clean labels "
            "it falls by orders of magnitude early in training and then flattens; when the run starts fitting "
            "noisy or random labels it rises again. Vertical lines mark the run's events.",
        ),
        Section(
            "trace",
            "Hessian trace per layer",
            plots.trace_figure,
            "Hutchinson estimates of tr(H_ll) for the layers with the largest traces (the others as a grey range; "
            "the model total in black). Traces can be negative (directions of negative curvature), and one "
            "estimate is noisy: the table's ± gives its standard error.",
        ),
        Section(
            "gn_gap",
            "GN-Gap per layer",
            lambda r: plots.layer_lines_figure(
                r,
                "gn_gap",
                title="GN-Gap ||H^T_l,:||_F / ||G_l,:||_F per layer (log scale)",
                ylabel="GN-Gap",
                log_y=True,
                reference=(1.0, "GN-Gap = 1: tensor part as large as Gauss-Newton"),
                rank_by="log",
                total_key=log_schema.total("gn_gap"),
            ),
            "How large the residual (non-Gauss-Newton) part of each layer's curvature is against its Gauss-Newton "
            "part. Below 1 the Gauss-Newton matrix carries most of the layer's curvature (GGN and K-FAC "
            "preconditioners see most of it); above 1 the residual dominates.",
        ),
        Section(
            "cusum",
            "Memorisation monitor",
            plots.cusum_figure,
            "The CUSUM statistic adds up how far each layer's smoothed curvature (the model-wide one in black) "
            "rises above its running trough, in units of its own noise. By default the alarm fires when any "
            "layer's line crosses the dotted threshold (h + ln L / θ for L layers, θ = 0.3k); with "
            "alarm_on='aggregate' when the black line crosses h. Grey shading is the calibration period, when no "
            "alarm is possible.",
        ),
        Section(
            "lr_scale",
            "Layer-wise learning-rate scale",
            lambda r: plots.layer_lines_figure(
                r,
                "lr_scale",
                title="Layer-wise learning-rate scale s_l (top layers)",
                ylabel="scale s_l",
                log_y=True,
                reference=(1.0, "s = 1: unchanged"),
                rank_by="log",
            ),
            "The multiplier of each layer's learning rate chosen by the LR-scaling policy (1: the base rate).",
        ),
        Section(
            "training",
            "Loss and accuracy",
            plots.training_figure,
            "Training loss per logged step, validation loss and accuracy per epoch. On noisy labels validation "
            "accuracy peaks and then falls while the training loss keeps falling: the model memorises.",
        ),
        Section(
            "inter_layer",
            "Cross-block mass and top eigenvalues",
            plots.inter_layer_figure,
            "Φ is the share of the Hessian's squared Frobenius mass outside the diagonal layer blocks (what any "
            "block-diagonal preconditioner ignores); the right panel follows each layer's largest eigenvalue "
            "(2/λ_max bounds a stable step for that layer).",
        ),
    ]


def find_log(run: str | Path) -> Path:
    """``run`` itself when it is a file, else ``run/curvature.jsonl``."""
    path = Path(run)
    if path.is_file():
        return path
    candidate = path / LOG_NAME
    if not candidate.is_file():
        raise ReportError(f"no {LOG_NAME} in {path} (is this a curvopt run directory?)")
    return candidate


def make_report(run: str | Path, out_dir: str | Path | None = None, *, html_page: bool = False) -> list[Path]:
    """Write a PNG for every quantity the run logged (``curvature_heatmap``, ``trace``, ``gn_gap``,
    ``cusum``, ``lr_scale``, ``training``, and with inter-layer records ``coupling``, ``resonance``,
    ``inter_layer``) into ``out_dir`` (default ``RUN_DIR/report``), and with ``html_page`` one
    ``report.html`` holding them all. Returns the files written."""
    import matplotlib.pyplot as plt

    log_path = find_log(run)
    unreadable: list[int] = []
    records = deduplicate(read_jsonl(log_path, unreadable=unreadable))
    if unreadable:
        lines = ", ".join(str(n) for n in unreadable[:8]) + (" …" if len(unreadable) > 8 else "")
        warnings.warn(
            f"curvopt report: {len(unreadable)} line(s) of {log_path} could not be read (torn or not a JSON "
            f"record: line {lines}); the report is drawn from the {len(records)} others",
            RuntimeWarning,
            stacklevel=2,
        )
    if not any(r.get("type") == "metrics" and log_schema.has_layers(r) for r in records):
        raise ReportError(f"{log_path} holds no curvature estimates yet")
    out = Path(out_dir) if out_dir is not None else log_path.parent / "report"
    out.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Section, Path]] = []
    for section in [*_sections(), *_map_sections(records)]:
        figure = section.build(records)
        if figure is None:  # the run has no such quantity: no placeholder figure
            continue
        path = out / f"{section.stem}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append((section, path))
    paths = [p for _, p in written]
    if html_page:
        paths.append(_write_html(out / "report.html", log_path, records, written))
    return paths


def _map_sections(records: Sequence[Mapping[str, Any]]) -> list[Section]:
    """The L × L coupling and resonance maps of the last inter-layer estimate, when the run has one."""
    from .plots import layer_labels, matrix_heatmap_figure

    inter = [r for r in records if r.get("type") == "metrics" and r.get(log_schema.COUPLING) is not None]
    if not inter:
        return []
    last, labels = inter[-1], layer_labels(records)
    layers = last[log_schema.INTER_LAYERS]
    return [
        Section(
            "coupling",
            "Inter-layer coupling",
            lambda _: matrix_heatmap_figure(
                last[log_schema.COUPLING],
                layers,
                f"Coupling C(v,w) = ||H_vw||_F / sqrt(||H_vv||_F ||H_ww||_F), step {last['step']}",
                "C",
                labels,
            ),
            "How strongly the loss couples two layers' parameters, relative to each layer's own curvature "
            "(1: as strong as within a layer). Bright off-diagonal entries are what block-diagonal methods miss.",
        ),
        Section(
            "resonance",
            "Inter-layer resonance",
            lambda _: matrix_heatmap_figure(
                last[log_schema.RESONANCE], layers, f"Resonance R(v,w) = ||H_vw||_F, step {last['step']}", "R", labels
            ),
            "The size of each block of the Hessian, ||H_vw||_F, on a log colour scale.",
        ),
    ]


# ---------------------------------------------------------------------- the HTML page
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–" if math.isnan(value) else ("∞" if value > 0 else "−∞")
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return "; ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return "–" if value is None else str(value)


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None, cls: str = "") -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<div class='scroll'><table class='{cls}'>{head}{body}</table></div>"


def _configuration(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for record in records:
        if record.get("type") == "run":
            rows += [(k.replace("_", " "), v) for k, v in record.items() if k not in ("type", "run_id")]
            break
    for record in records:
        if record.get("type") == "config":
            c = record.get("curvopt") or {}
            rows += [
                (
                    "curvature",
                    f"every {c.get('every')} steps, K = {c.get('probes')} probes on "
                    f"{c.get('curvature_batch_size')} samples, Gauss-Newton "
                    f"{'on' if c.get('gn') else 'off'}, strategy {c.get('strategy')}",
                ),
                ("monitor", c.get("monitor") and {k: c["monitor"].get(k) for k in MONITOR_KEYS}),
                ("LR scaling", c.get("lr_scaling") or "off"),
                ("layers", len(c.get("layers", []))),
            ]
            break
    return rows


def monitor_verdict(records: Sequence[Mapping[str, Any]]) -> str:
    """What the monitor can say of a run without alarms: off, no verdict (still calibrating), or no alarm."""
    config = next((r.get("curvopt") or {} for r in records if r.get("type") == "config"), {})
    if config and config.get("monitor") is None:
        return "Memorisation monitor off."
    estimates = [r for r in records if r.get("type") == "metrics" and log_schema.has_layers(r)]
    calibration = int((config.get("monitor") or {}).get("warmup", 8)) + 1
    ready = [r for r in estimates if r.get(log_schema.MONITOR_READY) == 1]
    if not ready:
        return (
            f"No verdict: the monitor calibrates on {calibration} estimates and this run made {len(estimates)}, "
            "so no alarm was possible."
        )
    return f"No memorisation alarm ({len(estimates)} estimates; the monitor calibrated on the first {calibration})."


def _onset_source(alarm: Mapping[str, Any]) -> str:
    """Which rule placed an alarm's change point, and in which series (alarms logged before the fit: Page's)."""
    if alarm.get("onset_step") is None:
        return "–"
    series = alarm.get("onset_series")
    where = f" in {'the gradient norm' if series == 'gradient' else series}" if series else ""
    return ("abrupt break" if alarm.get("onset_kind") == "abrupt" else "Page's estimate") + where


def _layer_rows(record: Mapping[str, Any], labels: Mapping[str, str]) -> tuple[list[str], list[list[Any]]]:
    names = list(log_schema.layer_values(record, "trace"))
    columns = [
        ("trace", "trace"),
        ("trace_se", "± se"),
        ("gn_trace", "GN trace"),
        ("gn_gap", "GN-Gap"),
        ("frob", "||H_l,:||²/d"),
        ("cusum", "CUSUM S"),
        ("lr_scale", "LR scale"),
    ]

    heads = {key: log_schema.layer_prefix(key) for key, _ in columns}
    present = [(key, title) for key, title in columns if any(heads[key] + n in record for n in names)]
    rows = [[labels.get(n, n), *[record.get(heads[key] + n) for key, _ in present]] for n in names]
    totals = {key: record.get(log_schema.total(key)) for key, _ in present if key in log_schema.TOTALS}
    totals["cusum"] = record.get(log_schema.cusum("aggregate"))
    rows.append(["model (all)", *[totals.get(key) for key, _ in present]])
    return ["layer", *[title for _, title in present]], rows


def _write_html(
    path: Path, log_path: Path, records: Sequence[Mapping[str, Any]], figures: Sequence[tuple[Section, Path]]
) -> Path:
    from .plots import label_of, layer_labels, run_events

    labels = layer_labels(records)
    metrics = [r for r in records if r.get("type") == "metrics" and log_schema.has_layers(r)]
    alarms = [r for r in records if r.get("type") == "alarm"]
    events = [e for e in run_events(records) if e.kind not in ("alarm", "change_point")]  # what happened, no alarms
    evals = [r for r in records if r.get("type") == "eval" and "eval/top1" in r]
    run = next((r for r in records if r.get("type") == "run"), {})
    title = f"curvopt report: {run.get('model', '')} on {run.get('dataset', '')}".rstrip(" on")
    relative_log = os.path.relpath(log_path, path.parent)
    links = [f"<a href='{html.escape(relative_log)}'>JSONL log</a> (<code>{html.escape(str(log_path))}</code>)"]
    if run.get("wandb_url"):
        links.append(f"<a href='{html.escape(run['wandb_url'])}'>W&amp;B run</a>")
    elif run.get("wandb_dir"):
        links.append(f"W&amp;B run (offline, <code>wandb sync {html.escape(run['wandb_dir'])}</code> uploads it)")
    skipped = max((r.get(log_schema.SKIPPED, 0) for r in records if r.get("type") == "metrics"), default=0)
    summary = [
        ("estimates", len(metrics)),
        ("last step", metrics[-1]["step"] if metrics else "–"),
        ("alarms", len(alarms)),
        ("skipped estimates", skipped),
    ]
    if evals:
        best = max(evals, key=lambda r: r["eval/top1"])
        summary += [
            ("last val top-1 (%)", evals[-1]["eval/top1"]),
            ("best val top-1 (%)", f"{best['eval/top1']:.2f} at epoch {best.get('epoch', 0) + 1}"),
        ]
    parts = [
        f"<!doctype html><html lang='en'><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1150px;margin:1.5em auto;padding:0 1em;color:#222;"
        "line-height:1.45}img{width:100%;height:auto;border:1px solid #ddd}table{border-collapse:collapse;"
        "font-size:.9em}td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left}th{background:#f6f6f6}"
        ".scroll{overflow-x:auto;max-width:100%}.how{color:#444;background:#f8f8fb;padding:.6em .9em;"
        "border-left:3px solid #99c}code{font-size:.9em;word-break:break-all}h2{margin-top:1.6em}</style>",
        f"<h1>{html.escape(title)}</h1><p>{' · '.join(links)}</p>",
        "<h2>Run</h2>",
        _table(_configuration(records) + summary, cls="config"),
        "<h2>Alarms</h2>",
    ]
    if alarms:
        rows = [
            [
                a["step"],
                a.get("onset_step"),
                _onset_source(a),
                a.get("kind"),
                *distinct_numbers(a.get("statistic", math.nan), a.get("threshold", 0.0)),
                ", ".join(label_of(n, labels) for n in a.get("layers", [])) or no_layers_text(a.get("kind", "")),
            ]
            for a in alarms
        ]
        headers = ["step", "change point (onset)", "placed by", "kind", "CUSUM S", "threshold", "layers"]
        parts.append(_table(rows, headers, "alarms"))
        parts.append(
            "<p class='how alarm-note'>The change point is where the change began, before the alarm: an abrupt "
            "break found by a two-phase fit over a series' history (either direction: a label switch first "
            "collapses the network, and its curvature and gradient norm fall before they rise), or else Page's "
            "estimate, the estimate at which the deciding CUSUM statistic left zero. <code>--on-alarm "
            "rollback</code> returns to a checkpoint before it. Kind <code>gradient</code>: the gradient norm's "
            "own CUSUM rose first (it jumps at once after a label switch).</p>"
        )
    else:
        parts.append(f"<p>{html.escape(monitor_verdict(records))}</p>")
    if events:
        parts += [
            "<h2>Events</h2>",
            _table([[e.step, e.kind.replace("_", " "), e.text] for e in events], ["step", "event", "detail"]),
        ]
    if metrics:
        header, rows = _layer_rows(metrics[-1], labels)
        heading = f"<h2>Per layer at the last estimate (step {metrics[-1]['step']})</h2>"
        parts += [heading, _table(rows, header, "layers")]
    if alarms and metrics:
        at = next((m for m in metrics if m["step"] >= alarms[0]["step"]), metrics[-1])
        header, rows = _layer_rows(at, labels)
        parts += [f"<h2>Per layer at the first alarm (step {at['step']})</h2>", _table(rows, header, "layers")]
    for section, image in figures:
        data = base64.b64encode(image.read_bytes()).decode("ascii")
        parts += [
            f"<h2>{html.escape(section.heading)}</h2>",
            f"<p class='how'>{html.escape(section.how_to_read)}</p>",
            f"<img alt='{html.escape(section.heading)}' src='data:image/png;base64,{data}'>",
        ]
    parts.append(RENDER_CHECK)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


RENDER_CHECK = """<script>
// Render self-check for headless browsers (benchmarks/report_screenshot.py): images loaded, no overflow.
window.addEventListener("load", () => {
  const images = [...document.images];
  const broken = images.filter((i) => !(i.complete && i.naturalWidth > 0)).length;
  const root = document.documentElement;
  document.body.dataset.renderCheck = JSON.stringify({images: images.length, broken,
    overflow: root.scrollWidth > root.clientWidth + 1});
});
</script>"""
