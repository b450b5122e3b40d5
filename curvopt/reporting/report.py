"""``curvopt report RUN_DIR``: PNG (and optionally one self-contained HTML) report of a run's JSONL log."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .loggers import deduplicate, read_jsonl

LOG_NAME = "curvature.jsonl"


class ReportError(ValueError):
    """The run directory has no readable curvature log."""


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
    """Write ``trace_heatmap.png``, ``gn_gap.png``, ``cusum.png``, ``lr_scale.png``, ``training.png``,
    with inter-layer records also ``coupling.png``, ``resonance.png``, ``inter_layer.png`` (and
    ``report.html`` with all of them inline) into ``out_dir`` (default ``RUN_DIR/report``)."""
    import matplotlib.pyplot as plt

    from .plots import (
        cusum_figure,
        inter_layer_figure,
        layer_lines_figure,
        layer_series,
        matrix_heatmap_figure,
        trace_heatmap_figure,
        training_figure,
    )

    log_path = find_log(run)
    records = deduplicate(read_jsonl(log_path))
    steps, traces = layer_series(records, "trace")
    if not steps:
        raise ReportError(f"{log_path} holds no curvature estimates yet")
    out = Path(out_dir) if out_dir is not None else log_path.parent / "report"
    out.mkdir(parents=True, exist_ok=True)
    columns = [(s, {n: v[i] for n, v in traces.items()}) for i, s in enumerate(steps)]
    figures = {
        "trace_heatmap": trace_heatmap_figure(columns),
        "gn_gap": layer_lines_figure(
            records,
            "gn_gap",
            title="GN-Gap per layer: ||H^T_l,:||_F / ||G_l,:||_F (0 = Gauss-Newton exact)",
            ylabel="GN-Gap",
            log_y=True,
        ),
        "cusum": cusum_figure(records),
        "lr_scale": layer_lines_figure(records, "lr_scale", title="Layer-wise LR scale s_l", ylabel="scale"),
        "training": training_figure(records),
    }
    inter = [r for r in records if r.get("type") == "metrics" and r.get("curv/coupling") is not None]
    if inter:  # the slower inter-layer cadence (inter_every) was on
        last = inter[-1]
        figures["coupling"] = matrix_heatmap_figure(
            last["curv/coupling"], last["curv/inter_layers"],
            f"Coupling C(v,w) = ||H_vw||_F / sqrt(||H_vv||_F ||H_ww||_F), step {last['step']}", "C",
        )  # fmt: skip
        figures["resonance"] = matrix_heatmap_figure(
            last["curv/resonance"], last["curv/inter_layers"], f"Resonance R(v,w) = ||H_vw||_F, step {last['step']}",
            "R",
        )  # fmt: skip
        figures["inter_layer"] = inter_layer_figure(records)
    written = []
    for name, figure in figures.items():
        path = out / f"{name}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    if html_page:
        written.append(_write_html(out / "report.html", log_path, records, written))
    return written


def _summary_rows(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    metrics = [r for r in records if r.get("type") == "metrics"]
    alarms = [r for r in records if r.get("type") == "alarm"]
    rows = [("estimates", str(len(metrics))), ("last step", str(metrics[-1]["step"]) if metrics else "–")]
    rows.append(("alarms", ", ".join(f"step {a['step']}" for a in alarms) or "none"))
    evals = [r for r in records if r.get("type") == "eval"]
    if evals and "eval/top1" in evals[-1]:
        rows.append(("last val top-1", f"{evals[-1]['eval/top1']:.2f} %"))
    return rows


def _write_html(path: Path, log_path: Path, records: Sequence[Mapping[str, Any]], images: Sequence[Path]) -> Path:
    parts = [
        "<!doctype html><meta charset='utf-8'><title>curvopt report</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}img{max-width:100%}"
        "td{padding:2px 12px}</style>",
        f"<h1>curvopt report</h1><p>log: <code>{html.escape(str(log_path))}</code></p><table>",
    ]
    parts += [f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in _summary_rows(records)]
    parts.append("</table>")
    for image in images:
        data = base64.b64encode(image.read_bytes()).decode("ascii")
        parts.append(f"<h2>{html.escape(image.stem)}</h2><img src='data:image/png;base64,{data}'>")
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
