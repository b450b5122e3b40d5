"""CUSUM monitor: false-alarm budget on stationary signals, bounded delay after a change, state round-trips."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from helpers import mlp
from torch import nn

from curvopt import CusumMonitor, estimate_curvature
from curvopt.control.monitor import AGGREGATE, GRADIENT, LOSS, Alarm, signal_values

# Stated budget (README / monitor docstring): with default settings, at most 5 % of stationary
# runs raise an alarm within 1000 estimates (Gaussian log-noise) and at most 10 % with
# heavy-tailed (Student t, 3 d.o.f.) log-noise.
GAUSS_BUDGET, HEAVY_BUDGET, HORIZON = 0.05, 0.10, 1000


def _stationary_run(rng: random.Random, heavy: bool, level: float = -4.0, sd: float = 0.75) -> list[float]:
    values = []
    for _ in range(HORIZON):
        z = rng.gauss(0, 1)
        if heavy:
            z /= math.sqrt(sum(rng.gauss(0, 1) ** 2 for _ in range(3)) / 3)
        values.append(math.exp(level + sd * z))
    return values


@pytest.mark.parametrize("heavy, budget", [(False, GAUSS_BUDGET), (True, HEAVY_BUDGET)])
def test_false_alarm_rate_on_stationary_signal_within_budget(heavy, budget):
    rng = random.Random(0 if not heavy else 1)
    runs, alarmed = 60, 0
    for _ in range(runs):
        monitor = CusumMonitor()
        alarmed += any(monitor.update(t, {AGGREGATE: v}) for t, v in enumerate(_stationary_run(rng, heavy)))
    assert alarmed / runs <= budget, f"{alarmed}/{runs} stationary runs alarmed"


def test_slowly_falling_signal_never_alarms():
    rng = random.Random(2)
    monitor = CusumMonitor()
    for t in range(HORIZON):
        assert not monitor.update(t, {AGGREGATE: math.exp(-0.01 * t + rng.gauss(0, 0.75))})


@pytest.mark.parametrize("jump, within, share", [(3.0, 15, 1.0), (1.5, 40, 0.8)])
def test_alarm_within_bounded_delay_after_step_change(jump, within, share):
    """After 200 flat estimates the log-level jumps by 4σ (always caught within 15 estimates) or by
    2σ (caught within 40 in at least 80 % of runs: the leaky trough forgives small, slow changes)."""
    rng = random.Random(3)
    detected = 0
    for _ in range(20):
        monitor = CusumMonitor()
        first = None
        for t in range(300):
            level = -4.0 + (jump if t >= 200 else 0.0)
            alarms = monitor.update(t, {AGGREGATE: math.exp(level + rng.gauss(0, 0.75))})
            if alarms and first is None:
                first = t
        assert first is None or first >= 200, "false alarm before the change"
        detected += first is not None and first < 200 + within
    assert detected >= share * 20, f"only {detected}/20 changes of {jump} nats detected within {within} estimates"


def test_steady_rise_is_detected():
    rng = random.Random(4)
    monitor = CusumMonitor()
    firsts = []
    for t in range(200):
        if monitor.update(t, {AGGREGATE: math.exp(-4 + 0.05 * max(0, t - 50) + rng.gauss(0, 0.5))}):
            firsts.append(t)
    assert firsts and 50 < firsts[0] < 120


@pytest.mark.parametrize("alarm_on", ["layer", AGGREGATE])
def test_one_alarm_per_episode_and_alarm_fields(alarm_on):
    monitor = CusumMonitor(alarm_on=alarm_on)
    alarms = []
    for t in range(200):
        level = -4.0 + (3.0 if t >= 100 else 0.0) + 0.3 * math.sin(t)
        alarms += monitor.update(t, {AGGREGATE: math.exp(level), "conv": math.exp(level)})
    assert len(alarms) == 1
    alarm = alarms[0]
    assert alarm.kind == alarm_on and alarm.step >= 100 and alarm.statistic > alarm.threshold == monitor.h
    assert alarm.layers == ["conv"]
    assert "memorisation alarm" in alarm.describe()
    assert Alarm.from_dict(json.loads(json.dumps(alarm.to_dict()))) == alarm


def test_layers_rising_one_after_another_raise_one_alarm_naming_them():
    """Per layer, one model-level episode: layers that cross later join it instead of alarming again."""
    monitor = CusumMonitor()
    alarms = []
    for t in range(300):
        wiggle = 0.3 * math.sin(t)
        a = -4.0 + (3.0 if t >= 100 else 0.0) + wiggle
        b = -4.0 + (3.0 if t >= 130 else 0.0) + 0.3 * math.cos(t)
        alarms += monitor.update(t, {AGGREGATE: math.exp((a + b) / 2), "a": math.exp(a), "b": math.exp(b)})
    assert len(alarms) == 1 and alarms[0].layers[0] == "a" and 100 <= alarms[0].step < 130
    assert alarms[0].kind == "layer" and alarms[0].threshold == monitor.threshold("a")


def test_per_layer_threshold_grows_with_the_number_of_layers():
    """h_L = h + ln(L)/(0.3 k): L layers alarm no more often than one series (a union bound); after T = 1000
    estimates every threshold grows by 2 ln(n/T)/θ."""
    monitor = CusumMonitor(h=10, k=0.5)
    monitor.update(0, {AGGREGATE: 1.0, GRADIENT: 1.0, **{f"l{i}": 1.0 for i in range(4)}})
    assert monitor.threshold("l0") == pytest.approx(10 + math.log(4) / 0.15)  # the gradient series is no layer
    assert monitor.threshold(AGGREGATE) == 10 and monitor.alarm_threshold == monitor.threshold("l0")
    assert monitor.threshold(GRADIENT) == 12
    monitor.count = 4000
    grow = 2 * math.log(4) / 0.15
    assert monitor.threshold("l0") == pytest.approx(10 + math.log(4) / 0.15 + grow)
    assert monitor.threshold(GRADIENT) == pytest.approx(12 + grow)


def test_false_alarm_rate_of_three_stationary_layers_within_budget():
    """The default (per-layer) rule with L = 3 independent heavy-tailed layers stays within the budget."""
    rng = random.Random(5)
    runs, alarmed = 40, 0
    for _ in range(runs):
        monitor = CusumMonitor()
        layers = [_stationary_run(rng, heavy=True) for _ in range(3)]
        for t, values in enumerate(zip(*layers)):
            if monitor.update(t, {AGGREGATE: sum(values) / 3, **{f"l{i}": v for i, v in enumerate(values)}}):
                alarmed += 1
                break
    assert alarmed / runs <= HEAVY_BUDGET, f"{alarmed}/{runs} stationary 3-layer runs alarmed"


def test_signal_values_from_estimate():
    torch.manual_seed(0)
    est = estimate_curvature(
        mlp(), nn.CrossEntropyLoss(), (torch.randn(8, 6), torch.randint(0, 3, (8,))), probes=4, gn=False
    )
    frob = signal_values(est)
    assert set(frob) == {*est.layers, AGGREGATE} and all(v >= 0 for v in frob.values())
    total = float(est.samples["hess_row_sq"].mean(0).sum()) / sum(est.numel.values())
    assert frob[AGGREGATE] == pytest.approx(total)
    trace = signal_values(est, "trace")
    assert trace[est.layers[0]] == pytest.approx(est.mean_eigenvalue(est.layers[0]))


def test_state_dict_round_trip_continues_identically():
    rng = random.Random(5)
    series = [math.exp(-4 + 0.04 * max(0, t - 40) + rng.gauss(0, 0.6)) for t in range(150)]
    full = CusumMonitor()
    full_alarms = [a for t, v in enumerate(series) for a in full.update(t, {AGGREGATE: v})]
    first = CusumMonitor()
    part = [a for t, v in enumerate(series[:70]) for a in first.update(t, {AGGREGATE: v})]
    resumed = CusumMonitor()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    part += [a for t, v in enumerate(series[70:], start=70) for a in resumed.update(t, {AGGREGATE: v})]
    assert part == full_alarms and full_alarms
    assert resumed.statistics() == full.statistics()


def test_fit_on_reference_runs_save_and_load(tmp_path):
    rng = random.Random(6)
    clean = [[{AGGREGATE: math.exp(-4 + rng.gauss(0, 0.5))} for _ in range(60)] for _ in range(3)]
    monitor = CusumMonitor().fit(clean)
    assert monitor.reference[AGGREGATE]["sigma"] == pytest.approx(0.5, rel=0.3)
    path = tmp_path / "cusum.json"
    monitor.save(path)
    loaded = CusumMonitor.load(path)
    assert loaded.reference == monitor.reference and loaded.settings() == monitor.settings()
    # calibrated from the reference: decides from the start, no warm-up needed
    alarms = [a for t in range(40) for a in loaded.update(t, {AGGREGATE: math.exp(-4 + (3 if t >= 10 else 0))})]
    assert alarms and alarms[0].step < 25
    with pytest.raises(ValueError, match="at least"):
        CusumMonitor().fit([[{AGGREGATE: 1.0}]])


@pytest.mark.parametrize(
    "kwargs, match",
    [({"h": 0}, "h > 0"), ({"warmup": 1}, "warmup"), ({"signal": "x"}, "signal"), ({"alarm_on": "x"}, "alarm_on")],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CusumMonitor(**kwargs)


def test_nonpositive_and_nan_values_are_skipped():
    monitor = CusumMonitor()
    assert monitor.update(0, {AGGREGATE: -1.0}) == []
    assert monitor.update(1, {AGGREGATE: float("nan")}) == []
    assert monitor.series[AGGREGATE].floor is None  # nothing usable seen yet


def _loss_stream(switch: int | None, steps: int = 60, seed: int = 0):
    """Estimates of a flat curvature and a training loss that falls from 2.3 towards 0.05 (multiplicative noise);
    from ``switch`` on, the labels are wrong and the loss is back near 2.3."""
    rng = random.Random(seed)
    for step in range(1, steps + 1):
        loss = 2.3 if switch is not None and step >= switch else 0.05 + 2.25 * math.exp(-step / 4)
        yield step * 10, {AGGREGATE: rng.lognormvariate(0, 0.05), LOSS: loss * rng.lognormvariate(0, 0.3)}


def test_a_training_loss_that_jumps_back_up_raises_a_label_change_alarm_at_the_jump():
    monitor = CusumMonitor(gradient=False)
    alarms = [a for step, values in _loss_stream(switch=40) for a in monitor.update(step, values)]
    assert len(alarms) == 1, [a.describe() for a in alarms]  # one per episode: the loss stays up
    alarm = alarms[0]
    assert alarm.kind == LOSS and alarm.onset_series == LOSS and alarm.onset_kind == "jump"
    assert alarm.onset_step == 400 and alarm.step in (400, 410)  # the first estimate with the new labels
    assert alarm.statistic > 0.25 == alarm.threshold
    assert "label-change alarm" in alarm.describe() and "% of its first value" in alarm.describe()
    assert (LOSS, alarm.step) in monitor.crossings
    restored = CusumMonitor(gradient=False)
    restored.load_state_dict(monitor.state_dict())
    assert restored.loss_jumped and restored.loss_rise == pytest.approx(monitor.loss_rise)


@pytest.mark.parametrize("seed", range(5))
def test_a_falling_or_noisy_training_loss_raises_no_label_change_alarm(seed):
    monitor = CusumMonitor(gradient=False)
    assert not [a for step, values in _loss_stream(switch=None, seed=seed) for a in monitor.update(step, values)]
    assert monitor.loss_rise < 0.25


def test_the_loss_jump_alarm_can_be_turned_off_and_old_states_still_load():
    monitor = CusumMonitor(gradient=False, loss_jump=0)
    assert not [a for step, values in _loss_stream(switch=40) for a in monitor.update(step, values)]
    state = monitor.state_dict()
    state["loss"] = state["loss"][:2]  # a state saved before the loss jump existed
    old = CusumMonitor(gradient=False)
    old.load_state_dict(state)
    assert old.loss_low == old.loss_level and not old.loss_jumped
    with pytest.raises(ValueError, match="loss_jump must be a fraction >= 0"):
        CusumMonitor(loss_jump=-0.1)
