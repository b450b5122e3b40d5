"""Plain-text per-layer tables for terminals (the demo and ``curvopt train`` summaries)."""

from __future__ import annotations

import math

from ..control.monitor import AGGREGATE, CusumMonitor
from ..estimators.trace import CurvatureEstimate


def format_table(
    estimate: CurvatureEstimate, scales: dict[str, float] | None = None, monitor: CusumMonitor | None = None
) -> str:
    """Per layer: d_l, trace ± SE, GN trace, GN-Gap (Frobenius form), LR scale, CUSUM statistic."""
    w = max([10, *(len(n) + 2 for n in estimate.layers)])
    header = (
        f"{'layer':<{w}}{'numel':>9}{'trace':>11}{'± se':>9}{'gn_trace':>11}{'gn_gap':>8}{'lr_scale':>10}{'cusum':>8}"
    )
    rows = [header, "-" * len(header)]
    for name in estimate.layers:
        scale = f"{scales[name]:.2f}" if scales is not None else "off"
        cusum = f"{monitor.series[name].s:.2f}" if monitor is not None and name in monitor.series else "–"
        rows.append(
            f"{name:<{w}}{estimate.numel[name]:>9}{estimate.trace[name]:>11.3g}{estimate.trace_se[name]:>9.2g}"
            f"{estimate.gn_trace.get(name, math.nan):>11.3g}{estimate.gn_gap.get(name, math.nan):>8.3g}"
            f"{scale:>10}{cusum:>8}"
        )
    if monitor is not None and not monitor.ready:
        rows.append(f"monitor: calibrating ({monitor.estimates_until_ready} more estimate(s) before it can alarm)")
    elif monitor is not None and AGGREGATE in monitor.series:
        rows.append(
            f"{'model':<{w}}{sum(estimate.numel.values()):>9}{estimate.total_trace:>11.3g}"
            f"{estimate.total_trace_se:>9.2g}{estimate.total_gn_trace:>11.3g}{estimate.total_gn_gap:>8.3g}"
            f"{'':>10}{monitor.series[AGGREGATE].s:>8.2f}"
        )
    return "\n".join(rows)
