"""Retrospective change points: the two-phase fit against brute-force least squares, the two regimes on series
with a known change, and the monitor's alarms placing their onset (and naming the signal that fired) with them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from curvopt import CusumMonitor
from curvopt.control.changepoint import ABRUPT, abrupt_change, two_phase_regression
from curvopt.control.monitor import AGGREGATE, GRADIENT


def _brute_two_phase(y: np.ndarray, min_segment: int = 3) -> tuple[int, float]:
    """Every break, each side fitted by ``numpy.linalg.lstsq``: the reference for the O(n) cumulative-sum fit."""
    t = np.arange(len(y), dtype=float)
    best = (math.inf, 0, 0.0)
    for tau in range(min_segment, len(y) - min_segment + 1):
        sse, lines = 0.0, []
        for ts, ys in ((t[:tau], y[:tau]), (t[tau:], y[tau:])):
            design = np.stack([ts, np.ones_like(ts)], axis=1)
            coef = np.linalg.lstsq(design, ys, rcond=None)[0]
            sse += float(((design @ coef - ys) ** 2).sum())
            lines.append(coef)
        if sse < best[0]:
            jump = (lines[1][0] * tau + lines[1][1]) - (lines[0][0] * (tau - 1) + lines[0][1])
            best = (sse, tau, float(jump))
    return best[1], best[2]


@pytest.mark.parametrize("n", [6, 7, 31, 200])
def test_two_phase_fit_equals_brute_force_least_squares(n):
    rng = np.random.default_rng(n)
    for _ in range(10):
        y = np.cumsum(rng.normal(size=n)) + 3 * rng.normal(size=n) + 1e4  # an offset the fit must not lose to
        tau, jump = two_phase_regression(y)
        ref_tau, ref_jump = _brute_two_phase(y)
        assert tau == ref_tau
        assert jump == pytest.approx(ref_jump, rel=1e-6, abs=1e-6)
    assert two_phase_regression([1.0] * 5) is None  # fewer than two segments of 3


def test_a_drop_before_a_rise_is_placed_at_the_drop():
    # A label switch: the clean level falls slowly, collapses at 40 (uniform predictions), then rises as the
    # network fits the new labels: the change began at the collapse, not where the rise stands out.
    rng = np.random.default_rng(0)
    t = np.arange(80)
    y = np.where(t < 40, -0.01 * t, -3.0 + 0.08 * (t - 40)) + 0.1 * rng.normal(size=80)
    change = abrupt_change(y, sigma=0.1)
    assert change is not None and change.index == 40 and change.jump < -2
    assert abrupt_change(y, sigma=0.1, first=41) is None  # before the CUSUM started: not counted


def test_a_slow_turn_or_the_initial_fall_is_not_an_abrupt_change():
    # Noise from the start: the level falls while the clean structure is learnt, bottoms out at 20, then rises.
    rng = np.random.default_rng(1)
    t = np.arange(60)
    v_shape = np.where(t < 20, -0.1 * t, -2.0 + 0.05 * (t - 20)) + 0.05 * rng.normal(size=60)
    assert abrupt_change(v_shape, sigma=0.05) is None  # two lines meet at the turn: no jump
    learning = np.where(t < 4, 0.0, -5.0 - 0.01 * (t - 4)) + 0.05 * rng.normal(size=60)  # the first estimates' fall
    assert abrupt_change(learning, sigma=0.05) is not None  # the steep first fall reads as a break...
    assert abrupt_change(learning, sigma=0.05, first=10) is None  # ...which the monitor does not count


def _switch_run(monitor: CusumMonitor, switch: int = 40, steps: int = 120) -> list:
    """Gradient norm and curvature fall slowly, collapse at ``switch``, then climb: the alarm comes late."""
    rng = np.random.default_rng(2)
    alarms = []
    for step in range(steps):
        level = -0.005 * step if step < switch else -1.5 + 0.05 * (step - switch)
        noise = 0.05 * rng.normal()
        values = {"a": math.exp(level + noise), "b": math.exp(level + 0.5 + noise)}
        values[AGGREGATE] = math.exp(level + 0.3 + noise)
        values[GRADIENT] = math.exp(2 * level + noise)
        alarms += monitor.update(step, values)
    return alarms


def test_the_monitor_places_a_switch_at_the_collapse_where_page_places_it_after():
    fitted = _switch_run(CusumMonitor())
    page = _switch_run(CusumMonitor(onset="page"))
    assert len(fitted) == 1 and len(page) == 1 and fitted[0].step == page[0].step > 45
    assert fitted[0].onset_kind == ABRUPT and abs(fitted[0].onset_step - 40) <= 1
    assert page[0].onset_kind == "page" and page[0].onset_step > 45  # after the collapse: the wrong model


def test_without_an_abrupt_break_the_onset_is_page_s():
    # Noise from the start: a slow rise from a trough; no abrupt break, so Page's estimate (never before calibration).
    rng = np.random.default_rng(3)
    monitor = CusumMonitor()
    alarms = []
    for step in range(80):
        level = -0.3 * step if step < 6 else -1.8 + 0.06 * (step - 6)
        noise = 0.05 * rng.normal()
        alarms += monitor.update(step, {"a": math.exp(level + noise), AGGREGATE: math.exp(level + noise)})
    assert alarms and alarms[0].onset_kind == "page"
    assert monitor.calibration_estimates <= alarms[0].onset_step < alarms[0].step


def test_alarms_say_which_signal_fired_and_when_the_other_crossed():
    # The gradient norm jumps at the switch; the layers' curvature climbs slowly after it and crosses later.
    rng = np.random.default_rng(4)
    monitor = CusumMonitor()
    alarms = []
    for step in range(160):
        rise = max(step - 40, 0)
        noise = 0.05 * rng.normal()
        values = {"a": math.exp(0.03 * rise + noise), "b": math.exp(0.5 + 0.03 * rise + noise)}
        values[AGGREGATE] = math.exp(0.3 + 0.03 * rise + noise)
        values[GRADIENT] = math.exp((1.5 if step >= 40 else 0.0) + noise)
        alarms += monitor.update(step, values)
    assert alarms[0].kind == GRADIENT and "curvature" not in alarms[0].crossings
    assert alarms[0].crossings[GRADIENT] == alarms[0].step
    assert "curvature not above its threshold yet" in alarms[0].describe()
    families = [family for family, _ in monitor.crossings]
    assert families[0] == GRADIENT and "curvature" in families  # the layers crossed later, recorded
    curvature_step = dict((f, s) for f, s in reversed(monitor.crossings))["curvature"]
    assert curvature_step > alarms[0].step
    state = monitor.state_dict()
    restored = CusumMonitor()
    restored.load_state_dict(state)
    assert restored.crossings == monitor.crossings


def test_bad_onset_and_history_settings():
    with pytest.raises(ValueError, match="unknown onset 'latest'; expected one of \\('fit', 'page'\\)"):
        CusumMonitor(onset="latest")
    with pytest.raises(ValueError, match="history must be >= 6"):
        CusumMonitor(history=5)


def test_history_is_bounded():
    monitor = CusumMonitor(history=10)
    for step in range(50):
        monitor.update(step, {AGGREGATE: 1.0 + 0.01 * (step % 3)})
    series = monitor.series[AGGREGATE]
    assert len(series.levels) == len(series.level_steps) == 10 and series.level_steps[-1] == 49


def _sharpening_run(loss_after: float) -> tuple[CusumMonitor, list]:
    """Flat curvature for 40 estimates, then a steady rise; the training loss falls from 2.3 to ``loss_after``."""
    rng = np.random.default_rng(6)
    monitor, alarms = CusumMonitor(), []
    for step in range(120):
        level = 0.0 if step < 40 else 0.05 * (step - 40)
        noise = 0.05 * rng.normal()
        loss = 2.3 if step < 10 else loss_after
        alarms += monitor.update(step, {"a": math.exp(level + noise), AGGREGATE: math.exp(level + noise), "loss": loss})
    return monitor, alarms


def test_a_network_that_fits_every_label_is_not_alarmed_for_sharpening():
    converged, alarms = _sharpening_run(loss_after=0.001)  # 0.04 % of the first loss: every label fitted
    assert alarms == [] and converged.held_back and converged.fits_its_labels
    memorising, alarms = _sharpening_run(loss_after=0.8)  # labels still unfitted: the same rise is an alarm
    assert len(alarms) == 1 and not memorising.held_back
    off = CusumMonitor(fitted_loss=0.0)
    assert not off.fits_its_labels
    with pytest.raises(ValueError, match=r"fitted_loss must be in \[0, 1\)"):
        CusumMonitor(fitted_loss=1.5)
    state = converged.state_dict()
    restored = CusumMonitor()
    restored.load_state_dict(state)
    assert restored.held_back == converged.held_back and restored.loss_level == converged.loss_level
