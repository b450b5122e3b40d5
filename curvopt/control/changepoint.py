r"""Where a monitored series changed abruptly: a retrospective two-phase fit over its history.

A CUSUM alarm says *that* a series rose; Page's own estimate of *when* (the estimate at which the statistic last
left zero) is late after an abrupt change whose first effect is a *fall*: a network fed random labels collapses
towards uniform predictions, its curvature and gradient norm drop, and they rise only later, as it starts to fit
the new labels. A one-sided statistic starts climbing after the collapse, and a rollback to there restores the
collapsed model. Looking back over the history y_0 … y_n (log values) once the alarm has fired finds the break.

**Two-phase regression.** Fit y by one straight line on [0, τ) and another on [τ, n] and take the τ that minimises
the total residual sum of squares (Hinkley, "Inference in two-phase regression", JASA 1971; the least-squares break
estimate of Bai & Perron, Econometrica 1998). The jump at τ is the second line's value at τ minus the first line's
at τ − 1. With cumulative sums of t, t², y, ty and y² every τ costs O(1), the fit O(n). The change is *abrupt*
when |jump| > ``jump`` σ (σ: the per-estimate noise SD of y), in either direction, and lies at or after ``first``
(the monitor passes the estimate at which the series' CUSUM started: before it the network is still learning and
its curvature falls steeply, which a two-line fit also reads as a break).

Measured (benchmarks/RESULTS.md §15): after mid-run switches to random labels the fitted break lies a median 0.2
epochs after the switch (Page's estimate: 2 epochs, after the collapse) on MNIST fresh seeds and on held-out
digits. When noise is there from the start no rule tried placed the onset better than Page's estimate: the end of
the curvature trough (the latest estimate whose smoothed level is within 1 σ of its minimum) was as good on the
development seed and worse on fresh seeds and held-out digits, so the monitor keeps Page's estimate there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ABRUPT = "abrupt"
MIN_SEGMENT = 3
"""Estimates on each side of a two-phase break: a line through fewer points fits any noise."""


@dataclass(frozen=True)
class ChangePoint:
    """Where a series changed: ``index`` is the first value of the new regime; ``jump`` the two-phase fit's level
    jump there, in the series' units."""

    index: int
    jump: float


def _segment_fits(t: np.ndarray, y: np.ndarray, end: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares lines through the first ``end[j]`` points, for every j at once: (SSE, slope, intercept)."""
    n = end.astype(float)
    st, stt = np.cumsum(t)[end - 1], np.cumsum(t * t)[end - 1]
    sy, syy, sty = np.cumsum(y)[end - 1], np.cumsum(y * y)[end - 1], np.cumsum(t * y)[end - 1]
    sxx = stt - st * st / n
    sxy = sty - st * sy / n
    syy_c = syy - sy * sy / n
    slope = np.divide(sxy, sxx, out=np.zeros_like(sxy), where=sxx > 0)
    sse = np.maximum(syy_c - slope * sxy, 0.0)
    intercept = (sy - slope * st) / n
    return sse, slope, intercept


def two_phase_regression(values: Sequence[float], min_segment: int = MIN_SEGMENT) -> tuple[int, float] | None:
    """``(τ, jump)`` of the best two-line fit of ``values`` (see the module docstring); ``None`` when there are
    fewer than ``2 · min_segment`` values."""
    y = np.asarray(values, dtype=float)
    n = len(y)
    if n < 2 * min_segment:
        return None
    y = y - y.mean()  # the sums below lose less to cancellation
    t = np.arange(n, dtype=float)
    taus = np.arange(min_segment, n - min_segment + 1)
    sse_left, slope_left, icept_left = _segment_fits(t, y, taus)
    rt, ry = t[::-1].copy(), y[::-1].copy()  # the right segments are prefixes of the reversed series
    sse_right, slope_right, icept_right = _segment_fits(rt, ry, n - taus)
    best = int(np.argmin(sse_left + sse_right))
    tau = int(taus[best])
    jump = (icept_right[best] + slope_right[best] * tau) - (icept_left[best] + slope_left[best] * (tau - 1))
    return tau, float(jump)


def abrupt_change(values: Sequence[float], sigma: float, *, jump: float = 2.0, first: int = 0) -> ChangePoint | None:
    """The two-phase break of ``values`` when its jump exceeds ``jump`` · ``sigma`` (either sign) and it lies at or
    after index ``first``; ``None`` otherwise (see the module docstring)."""
    fit = two_phase_regression(values)
    if fit is None or abs(fit[1]) <= jump * sigma or fit[0] < first:
        return None
    return ChangePoint(fit[0], fit[1])
