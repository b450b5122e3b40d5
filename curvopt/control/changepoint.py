r"""Where a monitored series changed: a retrospective change-point fit over its history.

A CUSUM alarm says *that* a series rose; Page's own estimate of *when* (the estimate at which the statistic last
left zero) is biased in the two cases that matter for a rollback. After an abrupt change the level often moves
*down* first (a network fed random labels collapses towards uniform predictions, and its curvature and gradient
norm fall) and rises only later, as it starts to fit the new labels: a one-sided statistic starts climbing after
the collapse, and a rollback to there restores the collapsed model. When noise is there from the start, the
statistic cannot leave zero before the monitor is calibrated, so Page's estimate sits at the first monitored
estimate whatever the data say. Both are fixed by looking back over the whole history y_0 … y_n (log values) once
the alarm has fired.

**Abrupt changes: two-phase regression.** Fit y by one straight line on [0, τ) and another on [τ, n] and take the τ
that minimises the total residual sum of squares (Hinkley, "Inference in two-phase regression", JASA 1971; the
least-squares break estimate of Bai & Perron, Econometrica 1998). The jump at τ is the second line's value at τ
minus the first line's at τ − 1. With cumulative sums of t, t², y, ty and y² every τ costs O(1), the fit O(n).
A change is *abrupt* when |jump| > ``jump`` σ (σ: the per-estimate noise SD of y), in either direction.

**Gradual changes: the end of the trough.** When memorisation begins slowly, the level falls while the network
learns, bottoms out and rises as it starts fitting noise; no single break fits. The onset is the latest estimate at
which the smoothed level m_t (a centred running median over ``2 · half_width + 1`` estimates) is still within
``band`` σ of its minimum over the history: where the rise begins to stand out from the trough's noise.

Both rules, their thresholds (``jump`` = 2, ``band`` = 1, ``half_width`` = 2) and the choice of the earliest credible
series were fixed on development seeds of benchmarks/memorisation.py (deep networks on MNIST digits, label noise
from the start and mid-run switches) and checked on fresh seeds and on other digits (benchmarks/RESULTS.md §15).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ABRUPT = "abrupt"
GRADUAL = "gradual"
MIN_SEGMENT = 3
"""Estimates on each side of a two-phase break: a line through fewer points fits any noise."""


@dataclass(frozen=True)
class ChangePoint:
    """Where a series changed: ``index`` is the first value of the new regime; ``jump`` the two-phase fit's level
    jump there, in the series' units; ``kind`` says which rule placed it (``"abrupt"`` or ``"gradual"``)."""

    index: int
    kind: str
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


def trough_end(values: Sequence[float], sigma: float, band: float = 1.0, half_width: int = 2) -> int:
    """The latest index whose centred running median (``2 · half_width + 1`` values, fewer at the ends) is within
    ``band`` · ``sigma`` of the smallest such median (see the module docstring)."""
    y = np.asarray(values, dtype=float)
    if len(y) == 0:
        raise ValueError("trough_end needs at least one value")
    smooth = np.array([np.median(y[max(0, i - half_width) : i + half_width + 1]) for i in range(len(y))])
    return int(np.flatnonzero(smooth <= smooth.min() + band * sigma)[-1])


def locate_change(
    values: Sequence[float], sigma: float, *, jump: float = 2.0, band: float = 1.0, half_width: int = 2
) -> ChangePoint:
    """The change point of a series that has just alarmed: the two-phase break when its jump exceeds ``jump`` ·
    ``sigma`` (either sign), otherwise the end of the trough (see the module docstring)."""
    fit = two_phase_regression(values)
    if fit is not None and abs(fit[1]) > jump * sigma:
        return ChangePoint(fit[0], ABRUPT, fit[1])
    return ChangePoint(trough_end(values, sigma, band, half_width), GRADUAL, fit[1] if fit is not None else 0.0)
