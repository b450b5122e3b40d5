"""Plain-text per-layer tables for terminals (the demo and ``curvopt train`` summaries).

The estimate's own table (:func:`curvopt.estimators.summary.format_estimate`) plus what the
optimizer adds: each layer's LR scale and CUSUM statistic, and the monitor's state.
"""

from __future__ import annotations

from ..control.monitor import AGGREGATE, GRADIENT, CusumMonitor
from ..estimators.result import CurvatureEstimate
from ..estimators.summary import Column, format_estimate


def format_table(
    estimate: CurvatureEstimate, scales: dict[str, float] | None = None, monitor: CusumMonitor | None = None
) -> str:
    """Per layer: d_l, trace ± SE, GN trace, GN-Gap (Frobenius form), LR scale, CUSUM statistic, and a legend."""
    extra: list[Column] = []
    legend: list[str] = []
    if scales is not None:
        extra.append(("lr_scale", 10, {n: f"{scales.get(n, 1.0):.2f}" for n in estimate.layers}, ""))
    if monitor is not None:
        cells = {n: f"{s.s:.2f}" for n, s in monitor.series.items() if n != AGGREGATE}
        model_cell = f"{monitor.series[AGGREGATE].s:.2f}" if AGGREGATE in monitor.series else "–"
        extra.append(("cusum", 8, cells, model_cell))
        state = (
            (
                f"the monitor alarms when a layer's S > {monitor.alarm_threshold:.3g} (h = {monitor.h:g} + ln L / "
                f"{monitor.tail_rate:g}k)"
                if monitor.alarm_on == "layer"
                else f"the monitor alarms when the model-wide S > {monitor.alarm_threshold:.3g}"
            )
            + (f", or the gradient norm's S > {monitor.threshold(GRADIENT):.3g}" if monitor.gradient else "")
            if monitor.ready
            else f"the monitor is calibrating: {monitor.estimates_until_ready} more estimate(s) before it can alarm"
        )
        legend.append(f"cusum: CUSUM statistic S of each layer's curvature rise (0: no rise); {state}")
    if scales is not None:
        legend.append("lr_scale: the layer's learning-rate multiplier s_l (1: unchanged)")
    return format_estimate(estimate, extra, legend)
