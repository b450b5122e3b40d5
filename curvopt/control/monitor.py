r"""CUSUM memorisation monitor on per-layer curvature.

Signal (``signal="frobenius"``, the default). From the row-block products every estimate
already has, v_l = mean_k ‖(Hz)_l‖² / d_l, an unbiased, never-negative estimate of
‖H_{l,:}‖_F² / d_l; the model-wide series is v = Σ_l mean_k ‖(Hz)_l‖² / P = ‖H‖_F² / P, the
mean *squared* Hessian eigenvalue. ``signal="trace"`` uses the mean eigenvalue τ_l = tr(H_ll)/d_l
instead (it can be ≤ 0 at small K, hence the floor below). Each series is logged with a floor
f = ``floor`` × its first positive value and smoothed:

    y_t = log max(v_t, f),     ȳ_t = ȳ_{t−1} + a (y_t − ȳ_{t−1}).

Why this signal and rule (measured, benchmarks/RESULTS.md): with clean labels curvature falls by
orders of magnitude and then stays flat or keeps drifting down; when a run fits noisy or random
labels it rises steadily from its trough, and a switch to random labels makes it jump from the
low clean level. The level is therefore compared with the run's own *trough*, not with its
warm-up level (a clean phase lowers the level first); the model-wide Frobenius series is far
less noisy than per-layer traces, which change sign near convergence.

Decision. With a fast EWMA ȳ (weight a = 0.3), a slow EWMA ỹ (weight 0.1) and a leaky trough
b_t = min(ỹ_t, b_{t−1} + λ σ0) that follows the slow level down at once but up only λ σ0 per
estimate, Page's one-sided CUSUM runs on the standardised rise above the trough:

    x_t = (ȳ_t − b_{t−1} − μ0) / σ0,   S_t = max(0, S_{t−1} + x_t − k),   alarm when S_t > h.

A plain running minimum would keep sinking on a stationary series (≈ σ √(2 ln n)) and alarm
on every long run; the leak bounds that, so on a stationary series x_t has mean ≈ 0, while a
sustained rise faster than λ σ0 per estimate accumulates. Each new log value is clipped to
ȳ ± c σ0 (c = 3) before smoothing, against heavy-tailed estimates.

Calibration. σ0 is robust, 1.4826 · MAD(y_t − y_{t−1}) / √2 (the per-estimate noise of y) over
the last 64 increments, available after ``warmup`` estimates; μ0 = 0. ``fit`` instead fixes σ0
and μ0 (the median excess over the trough) from clean reference runs' histories, saved and
loaded as JSON.

Change point. With every alarm the monitor estimates when the change began (``Alarm.onset_step``), where a rollback
should return to (:mod:`curvopt.control.rollback`). Page's estimate is the estimate at which the deciding statistic
last left zero (per layer, the earliest among the layers above their thresholds). It is late after an abrupt change
that first makes the series *fall* (a switch to random labels collapses the network, and its curvature and
gradient norm drop before they rise), so by default (``onset="fit"``) each credible series (the one that alarmed
and every series above its own threshold) is also fitted retrospectively over its stored log history
(:func:`curvopt.control.changepoint.abrupt_change`: a two-phase regression, either sign, at or after the estimate
at which its CUSUM started) and the earliest abrupt break is the onset (``onset_kind="abrupt"``); without one,
Page's estimate (``onset_kind="page"``). ``onset="page"`` always uses Page's.

A network that fits its labels. Memorisation is fitting labels the network does not yet fit; once the training loss
(smoothed like the signals) is below ``fitted_loss`` = 2 % of its first value, every label is fitted and nothing is
left to memorise, while curvature can still rise as a converged network sharpens. Alarms are then held back
(``held_back`` lists their steps). Measured: clean runs trained far past convergence alarmed at a training loss of
0.0004–0.008 nats (3 clean ResNet-20 runs on held-out digits, 1 clean ViT on MNIST); every alarm on a memorising run
came at ≥ 0.27 nats, 12 % of the initial 2.3 (benchmarks/RESULTS.md §15.5). The fraction makes the gate free of the
loss's scale; a loss that cannot approach 0 (label smoothing) never triggers it.

Labels that changed. A switch to wrong labels collapses the network at once; memorisation, and with it the
curvature and gradient alarms, comes epochs later (benchmarks/RESULTS.md §15.6: a VGG-11 fed random labels from
epoch 15 was at chance from epoch 15 and had not memorised by epoch 30, so it never alarmed). The training loss
shows the switch at the next estimate: it jumps back to about its initial value. So the monitor also raises a
``kind="loss"`` alarm when the smoothed training loss climbs above its lowest level by more than ``loss_jump`` =
25 % of its first value (one per episode, after calibration; the episode ends when the rise is back under half of
that); its change point is the first estimate since the rise was last under 20 % of ``loss_jump``
(``onset_kind="jump"``), the estimate at which the jump showed. Measured on the recorded runs: the largest rise on any
clean run, run with label noise from the start, or before a switch was 11 % of the first loss (306 runs); every
switch rose by 54–127 % within three estimates (80 runs), and by ≥ 19 % at the first. The first value is the loss
at the monitor's first estimate; a run whose loss rises for another reason (a learning-rate restart, a spike that
lasts) also alarms, and says so.

Which signal fired. Every alarm carries ``crossings``: the step at which each signal family (``"curvature"``: any
layer's series, or the model-wide one with ``alarm_on="aggregate"``; ``"gradient"``; ``"loss"``, a jump) crossed its
threshold in this episode, so far; :attr:`CusumMonitor.crossings` keeps every crossing of the run, including those
after the alarm.

Which series decide. By default (``alarm_on="layer"``) every layer's series decides on its own,
against h_L = h + ln(L) / θ with θ = ``tail_rate`` · k = 0.3 k (:data:`TAIL_RATE_PER_K`): a stationary series
crosses h within 1000 estimates with probability ∝ exp(−θ h), so L layers together alarm no more often than
one series would (a union bound). ``alarm_on="aggregate"`` lets only the model-wide series decide,
against h. Either way the alarm names every layer whose own S exceeds its threshold, largest first.
An episode lasts until the deciding statistic is back at 0 (per layer: until no layer is in an
episode) and raises one alarm. Long runs: after ``long_run`` = T estimates every threshold grows by
2 ln(n/T)/θ (n estimates so far), so the chance of a false alarm per stretch of estimates falls as the run
goes on and the rate over 5,000 estimates stays near that over 1,000.

The gradient norm. With ``gradient=True`` (the default) the squared loss-gradient norm ‖∇L‖² that every
estimate carries at no cost (:attr:`CurvatureEstimate.total_gradient_sq`) is a series of its own, through
the same smoothing and CUSUM, against ``gradient_h``; whichever crosses first raises the episode's one alarm
(``kind="gradient"`` or ``"layer"``). After an abrupt label switch the gradient norm jumps at once, while
curvature needs a few estimates to rise; on gradual noise the curvature is usually first.

Defaults (k = 0.5, h = 10, θ = 0.3 k, T = 1000, gradient_h = 12, a = 0.3, λ = 0.02, warm-up 8) were chosen
on development seeds of the detection benchmark (benchmarks/memorisation.py ``thresholds``: ResNet-20,
VGG-11 and a ViT on real MNIST digits, SGD and AdamW, 20–100 % label noise and mid-run switches) under
≥ 95 % detection in every condition, ≤ 5 % false alarms on clean runs, and the stationary budget ≤ 5 %
(Gaussian) / ≤ 10 % (Student t, 3 d.o.f., a shock shared by all layers) of runs alarming within 1,000
estimates at L = 1, 10, 43 and 161 correlated layers (benchmarks/monitor_stationary.py; the previous
θ = 0.7 k without the long-run term reached 18 % at L = 161, 29 % over 5,000 estimates), then checked on
fresh seeds (benchmarks/RESULTS.md §12). Estimates are autocorrelated and heavy-tailed, so Gaussian ARL
tables do not apply.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..estimators.result import CurvatureEstimate
from .changepoint import ABRUPT, MIN_SEGMENT, abrupt_change
from .settings import SIGNALS, MonitorConfig, option_names

AGGREGATE = "aggregate"
GRADIENT = "gradient"
LOSS = "loss"
"""The key of the training loss in a mapping of precomputed values (not a monitored series)."""
CALM = 0.2
"""The training loss is calm while its rise above its lowest level is at most this fraction of ``loss_jump``; a
loss-jump alarm's change point is the first estimate since the last calm one (the jump happened between the two:
a rollback restores the last state before it)."""
_MAD_TO_SD = 1.4826
SIGMA_UCB = 2.0
"""σ0 is the robust estimate times (1 + SIGMA_UCB/√n) for n increments (1.7× after the 8-estimate warm-up,
1.25× with a full 64-increment window): early σ0 estimates from a few heavy-tailed increments came out low
and caused most stationary false alarms, one chance per monitored layer."""


@dataclass
class Alarm:
    """One alarm: when, which layers drive it, the statistic and the threshold it crossed."""

    step: int
    layers: list[str]
    statistic: float
    threshold: float
    kind: str = AGGREGATE
    layer_types: dict[str, str] = field(default_factory=dict)  # the layers' module classes, for people
    onset_step: int | None = None  # the estimated change point: where a rollback should return to
    onset_kind: str = "page"  # which rule placed it: "abrupt" (a two-phase break; onset="fit") or "page"
    onset_series: str | None = None  # the series whose change placed it (a layer, "aggregate" or "gradient")
    crossings: dict[str, int] = field(default_factory=dict)  # signal family -> step it crossed its threshold

    def describe(self, max_layers: int = 5) -> str:
        """One line; the ``max_layers`` layers with the largest CUSUM statistics are named, quoted, with their type
        (``'5' (BatchNorm2d)``: a layer named ``5`` must not read as a count)."""
        named = [f"'{n}' ({self.layer_types[n]})" if self.layer_types.get(n) else f"'{n}'" for n in self.layers]
        where = ", ".join(named[:max_layers]) if self.layers else no_layers_text(self.kind)
        if len(self.layers) > max_layers:
            where += f" and {len(self.layers) - max_layers} more"
        statistic, threshold = distinct_numbers(self.statistic, self.threshold)
        since = f" since step {self.onset_step}" if self.onset_step is not None and self.onset_step < self.step else ""
        change = f" ({self.onset_kind} change)" if since and self.onset_kind != "page" else ""
        if self.kind == LOSS:
            return (
                f"label-change alarm at step {self.step}: the training loss jumped back up{since}, "
                f"{100 * self.statistic:.0f} % of its first value above its lowest level (> "
                f"{100 * self.threshold:.0f} %): the labels or the data changed, or training destabilised; "
                f"{describe_crossings(self)}"
            )
        what = "gradient norm" if self.kind == GRADIENT else "curvature"
        return (
            f"memorisation alarm at step {self.step}: {what} rising{since}{change}; {describe_crossings(self)} "
            f"({self.kind} CUSUM {statistic} > {threshold}; layers: {where})"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Alarm:
        return cls(**dict(data))


SIGNAL_NAMES = {"curvature": "curvature", GRADIENT: "the gradient norm"}


def describe_crossings(alarm: Alarm) -> str:
    """What the other signal family did by the alarm: ``"the gradient norm not above its threshold yet"`` or
    ``"curvature crossed too, at step 660"`` (the alarm's own family is the one that fired)."""
    fired = alarm.kind if alarm.kind in (GRADIENT, LOSS) else "curvature"
    parts = []
    for family, name in SIGNAL_NAMES.items():
        if family != fired:
            step = alarm.crossings.get(family)
            parts.append(
                f"{name} crossed too, at step {step}" if step is not None else f"{name} not above its threshold yet"
            )
    return "; ".join(parts)


def no_layers_text(kind: str) -> str:
    """What an alarm naming no layer says in place of the layers: a gradient-norm alarm came before any layer crossed
    its threshold; an aggregate one is the model-wide series'."""
    return "none above its threshold yet" if kind == GRADIENT else "model-wide only"


def distinct_numbers(a: float, b: float, digits: int = 2) -> tuple[str, str]:
    """``a`` and ``b`` with the fewest decimals (at least ``digits``, at most 12) that tell them apart."""
    for d in range(digits, 13):
        text_a, text_b = f"{a:.{d}f}", f"{b:.{d}f}"
        if text_a != text_b:
            return text_a, text_b
    return f"{a!r}", f"{b!r}"


@dataclass
class _Series:
    """Smoothing, calibration and CUSUM state of one monitored series."""

    floor: float | None = None
    last_raw: float | None = None
    fast: float | None = None
    slow: float | None = None
    trough: float | None = None
    increments: list[float] = field(default_factory=list)
    seen: int = 0
    mu: float = 0.0
    sigma: float | None = None
    fixed_sigma: bool = False
    s: float = 0.0
    in_episode: bool = False
    rise_step: int | None = None  # the estimate at which s last left zero (Page's change-point estimate)
    levels: list[float] = field(default_factory=list)  # log values y_t, for the retrospective change-point fit
    level_steps: list[int] = field(default_factory=list)  # their steps
    armed_step: int | None = None  # the estimate at which the CUSUM started (calibrated)


def _median(ordered: Sequence[float]) -> float:
    """The median of an already sorted sequence (``statistics.median`` without its per-call overhead)."""
    n = len(ordered)
    return ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])


def _robust_noise_sd(increments: Sequence[float], minimum: float) -> float:
    """(1 + 2/√n) · 1.4826 · MAD(Δy) / √2: an upper confidence bound on the per-estimate noise SD of y
    from its n increments (a noise scale underestimated from few increments would alarm at once)."""
    if len(increments) < 2:
        return minimum
    centre = _median(sorted(increments))
    mad = _median(sorted([abs(v - centre) for v in increments]))
    return max((1 + SIGMA_UCB / math.sqrt(len(increments))) * _MAD_TO_SD * mad / math.sqrt(2), minimum)


def signal_values(estimate: CurvatureEstimate, signal: str = "frobenius") -> dict[str, float]:
    """Per-layer values v_l and the model-wide value under ``AGGREGATE`` (see module docstring)."""
    if signal not in SIGNALS:
        raise ValueError(f"unknown signal {signal!r}; expected one of {SIGNALS}")
    if signal == "frobenius":
        return {**estimate.frobenius, AGGREGATE: estimate.total_frobenius}
    values = {name: estimate.mean_eigenvalue(name) for name in estimate.layers}
    values[AGGREGATE] = estimate.total_trace / sum(estimate.numel.values())
    return values


class CusumMonitor:
    """Page's CUSUM on the rise of smoothed log curvature above its running minimum.

    Args:
        config: a :class:`~curvopt.MonitorConfig` (default: its defaults); ``**settings`` replace its fields.
        **settings: any :class:`~curvopt.MonitorConfig` field by name: ``k`` (reference value in σ0 units), ``h``
            (threshold), ``warmup``, ``smoothing``, ``trough_smoothing``, ``leak``, ``clip``, ``window``, ``floor``,
            ``signal``, ``alarm_on`` (``"layer"``: any layer's series, each against h + ln(L)/θ; ``"aggregate"``:
            the model-wide series against h), ``min_sigma``, ``tail_rate``, ``long_run``, ``gradient``,
            ``gradient_h``, ``onset`` (``"fit"`` or ``"page"``, module docstring), ``history``; each field's
            ``metadata["help"]`` says what it is. The record's values are the monitor's attributes.
    """

    def __init__(self, config: MonitorConfig | None = None, **settings: Any) -> None:
        config = MonitorConfig.build(config, **settings)  # ValueError / TypeError name the problem
        for name in option_names(MonitorConfig):
            setattr(self, name, getattr(config, name))
        self.reference: dict[str, dict[str, float]] | None = None
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the run (keeps settings and any ``fit`` reference)."""
        self.count = 0
        self.series: dict[str, _Series] = {}
        self.crossings: list[tuple[str, int]] = []  # (signal family, step) each time one crossed its threshold
        self._above: dict[str, bool] = {}
        self.loss_first: float | None = None  # the first training loss seen, and its smoothed level since
        self.loss_level: float | None = None
        self.loss_low: float | None = None  # the lowest smoothed level
        self.loss_stir_step: int | None = None  # the first step since the level was last near it (the jump's start)
        self.loss_jumped = False  # a loss-jump alarm's episode is on (until the loss falls back)
        self.held_back: list[int] = []  # steps whose alarm was held back: the network fitted all its labels

    def _new_series(self, name: str) -> _Series:
        ref = (self.reference or {}).get(name)
        if ref is not None:
            return _Series(mu=ref["mu"], sigma=ref["sigma"], fixed_sigma=True)
        return _Series()

    def _values(self, estimate: CurvatureEstimate | Mapping[str, float]) -> Mapping[str, float]:
        if not isinstance(estimate, CurvatureEstimate):
            return {k: v for k, v in estimate.items() if k != LOSS and (self.gradient or k != GRADIENT)}
        values = signal_values(estimate, self.signal)
        if self.gradient and math.isfinite(estimate.total_gradient_sq) and estimate.total_gradient_sq > 0:
            values[GRADIENT] = estimate.total_gradient_sq
        return values

    def _observe_loss(self, loss: float | None, step: int) -> None:
        """Follow the training loss (the estimate's batch loss, or a mapping's ``"loss"``), smoothed like them, and
        its lowest level."""
        if loss is None or not math.isfinite(loss) or loss < 0:
            return
        if self.loss_first is None:
            self.loss_first = self.loss_level = self.loss_low = float(loss)
            return
        self.loss_level += self.smoothing * (float(loss) - self.loss_level)
        self.loss_low = min(self.loss_level, self.loss_low if self.loss_low is not None else self.loss_level)
        if self.loss_rise <= CALM * self.loss_jump:
            self.loss_stir_step = None
        elif self.loss_stir_step is None:
            self.loss_stir_step = step

    @property
    def loss_rise(self) -> float:
        """How far the smoothed training loss is above its lowest level, as a fraction of its first value."""
        first, level, low = self.loss_first, self.loss_level, self.loss_low
        if first is None or level is None or low is None or first <= 0:
            return 0.0
        return (level - low) / first

    def _loss_jump_alarm(self, step: int) -> Alarm | None:
        """An alarm when the training loss jumped back up (``loss_jump``; one per episode, after calibration)."""
        rise = self.loss_rise
        if self.loss_jumped and rise < self.loss_jump / 2:
            self.loss_jumped = False
        if not self.loss_jump or self.loss_jumped or rise <= self.loss_jump or self.count <= self.warmup:
            return None
        self.loss_jumped = True
        self.crossings.append((LOSS, step))
        onset = self.loss_stir_step
        return Alarm(step, [], rise, self.loss_jump, LOSS, onset_step=onset, onset_kind="jump", onset_series=LOSS)

    @property
    def fits_its_labels(self) -> bool:
        """Whether the smoothed training loss is below ``fitted_loss`` × its first value (alarms are held back)."""
        first, level = self.loss_first, self.loss_level
        return bool(self.fitted_loss) and first is not None and first > 0 and level < self.fitted_loss * first

    # ------------------------------------------------------------------ the decision rule
    def _observe(self, series: _Series, value: float, step: int | None = None) -> float | None:
        """Fold one value into ``series``; return x_t once calibrated (None before)."""
        if not math.isfinite(value):
            return None
        if series.floor is None:
            if value <= 0:
                return None
            series.floor = self.floor * value
        y = math.log(max(value, series.floor))
        if step is not None:
            series.levels.append(y)
            series.level_steps.append(step)
            if len(series.levels) > self.history:
                del series.levels[0], series.level_steps[0]
        if series.fast is None:
            series.fast = series.slow = series.last_raw = y
            return None
        series.increments.append(y - series.last_raw)
        del series.increments[: -self.window]
        series.last_raw = y
        series.seen += 1
        if not series.fixed_sigma and series.seen >= self.warmup:
            series.sigma = _robust_noise_sd(series.increments, self.min_sigma)
        if series.sigma is not None and series.trough is not None:
            y = min(max(y, series.fast - self.clip * series.sigma), series.fast + self.clip * series.sigma)
        series.fast += self.smoothing * (y - series.fast)
        series.slow += self.trough_smoothing * (y - series.slow)
        if series.sigma is None:
            return None
        if series.trough is None:
            series.trough = series.slow
            return None
        x = (series.fast - series.trough - series.mu) / series.sigma
        series.trough = min(series.slow, series.trough + self.leak * series.sigma)
        return x

    def _layer_names(self) -> list[str]:
        return [n for n in self.series if n not in (AGGREGATE, GRADIENT)]

    def threshold(self, name: str) -> float:
        """h for the model-wide series; h + ln(L)/θ for each of the L per-layer series (θ = ``tail_rate`` · k); with
        ``long_run`` = T, both grow by 2 ln(n/T)/θ once n > T estimates have been monitored."""
        layers = len(self.series) - (AGGREGATE in self.series) - (GRADIENT in self.series)  # O(1): L per-layer series
        theta = self.tail_rate * max(self.k, 0.1)
        late = self.long_run and self.count > self.long_run
        grow = 2.0 * math.log(self.count / self.long_run) / theta if late else 0.0
        if name == GRADIENT:
            return self.gradient_h + grow
        if name == AGGREGATE or layers <= 1:
            return self.h + grow
        return self.h + math.log(layers) / theta + grow

    def _advance(self, name: str, series: _Series, x: float, step: int) -> bool:
        """One CUSUM step; True when this step starts an episode above the series' threshold."""
        if series.armed_step is None:
            series.armed_step = step
        if series.s == 0.0:
            series.rise_step = step  # if s rises now, the change began here (the last time s was 0 was before)
        series.s = max(0.0, series.s + x - self.k)
        if series.s > self.threshold(name) and not series.in_episode:
            series.in_episode = True
            return True
        if series.s == 0.0:
            series.in_episode = False
        return False

    def update(self, step: int, estimate: CurvatureEstimate | Mapping[str, float]) -> list[Alarm]:
        """Fold in one estimate (or precomputed ``{series: v}`` values); return new alarms."""
        values = self._values(estimate)
        self._observe_loss(estimate.loss if isinstance(estimate, CurvatureEstimate) else estimate.get(LOSS), step)
        self.count += 1
        started: list[str] = []
        ongoing = any(self.series[n].in_episode for n in self._layer_names())  # a per-layer episode already alarmed
        gradient_ongoing = GRADIENT in self.series and self.series[GRADIENT].in_episode
        for name, value in values.items():
            series = self.series.get(name)
            if series is None:
                series = self.series[name] = self._new_series(name)
            x = self._observe(series, float(value), step)
            if x is not None and self._advance(name, series, x, step):
                started.append(name)
        layers_above = sorted(
            (n for n in self._layer_names() if self.series[n].s > self.threshold(n)), key=lambda n: -self.series[n].s
        )
        self._note_crossings(step, layers_above)
        kinds = getattr(estimate, "layer_types", {})
        types = {n: kinds[n] for n in layers_above if kinds.get(n)}
        jumped = self._loss_jump_alarm(step)
        if jumped is not None:  # the labels changed: this alarm comes first, with the loss's own change point
            jumped.crossings = self._episode_crossings()
            return [jumped]
        if gradient_ongoing:  # one alarm per episode, whichever series raised it
            return []
        alarms = self._curvature_alarm(step, started, ongoing, layers_above, types)
        if not alarms and GRADIENT in started and not ongoing:  # the gradient norm rose first: its own alarm
            deciding = self.series[GRADIENT]
            alarms = [Alarm(step, layers_above, deciding.s, self.threshold(GRADIENT), GRADIENT, types)]
        if alarms and self.fits_its_labels:  # converged on every label: a rise is sharpening, not memorisation
            self.held_back.append(step)
            return []
        for alarm in alarms:
            deciding_name = GRADIENT if alarm.kind == GRADIENT else AGGREGATE if alarm.kind == AGGREGATE else None
            alarm.onset_step, alarm.onset_kind, alarm.onset_series = self._onset(deciding_name, layers_above)
            alarm.crossings = self._episode_crossings()
        return alarms

    def _family_above(self, layers_above: list[str]) -> dict[str, bool]:
        per_layer = self.alarm_on == "layer" and bool(self._layer_names())
        curvature = bool(layers_above) if per_layer else AGGREGATE in self.series and self._over(AGGREGATE)
        return {"curvature": curvature, GRADIENT: GRADIENT in self.series and self._over(GRADIENT)}

    def _note_crossings(self, step: int, layers_above: list[str]) -> None:
        """Record each signal family's upward crossing of its threshold (for attribution)."""
        for family, above in self._family_above(layers_above).items():
            if above and not self._above.get(family, False):
                self.crossings.append((family, step))
            self._above[family] = above

    def _episode_crossings(self) -> dict[str, int]:
        """The step at which each family now above its threshold crossed it."""
        latest = {family: step for family, step in self.crossings}
        return {family: latest[family] for family, above in self._above.items() if above and family in latest}

    def _onset(self, deciding: str | None, layers_above: list[str]) -> tuple[int | None, str, str | None]:
        """The alarm's change point, the rule that placed it and the series it came from (see the module
        docstring)."""
        if self.onset == "fit":
            credible = [n for n in self.series if n in layers_above or (n in (AGGREGATE, GRADIENT) and self._over(n))]
            if deciding is not None and deciding not in credible:
                credible.append(deciding)
            breaks = []
            for name in credible:
                series = self.series[name]
                if len(series.levels) < 2 * MIN_SEGMENT or series.sigma is None or series.armed_step is None:
                    continue
                first = next((i for i, s in enumerate(series.level_steps) if s >= series.armed_step), 0)
                change = abrupt_change(series.levels, series.sigma, first=first)
                if change is not None:
                    breaks.append((series.level_steps[change.index], name))
            if breaks:
                step, name = min(breaks)
                return step, ABRUPT, name
        names = [deciding] if deciding is not None else layers_above
        steps = [(self.series[n].rise_step, n) for n in names if self.series[n].rise_step is not None]
        if not steps:
            return None, "page", None
        step, name = min(steps)
        return step, "page", name

    def _over(self, name: str) -> bool:
        return self.series[name].s > self.threshold(name)

    def _curvature_alarm(
        self, step: int, started: list[str], ongoing: bool, layers_above: list[str], types: dict[str, str]
    ) -> list[Alarm]:
        """The curvature series' alarm of this estimate (aggregate or per layer), if one starts."""
        if self.alarm_on == AGGREGATE or not self._layer_names():
            if AGGREGATE not in started:
                return []
            deciding = self.series[AGGREGATE]
            return [Alarm(step, layers_above, deciding.s, self.h, AGGREGATE, types)]
        if ongoing or not any(n not in (AGGREGATE, GRADIENT) for n in started):
            return []
        top = layers_above[0]
        return [Alarm(step, layers_above, self.series[top].s, self.threshold(top), "layer", types)]

    def statistics(self) -> dict[str, float]:
        """``{"cusum/<layer>": S, …, "cusum/aggregate": S, "cusum/threshold": the deciding threshold,
        "monitor_ready": 0|1, "monitor_per_layer": 0|1}``, and with the gradient series ``"cusum/gradient"`` and
        ``"cusum/gradient_threshold"``."""
        stats = {f"cusum/{name}": s.s for name, s in self.series.items()}
        stats["cusum/threshold"] = self.alarm_threshold
        if GRADIENT in self.series:
            stats["cusum/gradient_threshold"] = self.threshold(GRADIENT)
        stats["monitor_ready"] = float(self.ready)
        stats["monitor_per_layer"] = float(self.alarm_on == "layer")
        return stats

    @property
    def alarm_threshold(self) -> float:
        """The threshold the deciding series cross: h (aggregate) or h + ln(L)/θ (per layer), + the long-run term."""
        layers = self._layer_names()
        return self.h if self.alarm_on == AGGREGATE or not layers else self.threshold(layers[0])

    def alarm_statistic(self) -> float:
        """The statistic compared with :attr:`alarm_threshold`: the model-wide S, or the largest layer S."""
        layers = self._layer_names()
        if self.alarm_on == AGGREGATE or not layers:
            series = self.series.get(AGGREGATE)
            return series.s if series is not None else 0.0
        return max(self.series[n].s for n in layers)

    @property
    def ready(self) -> bool:
        """Calibrated: the model-wide series has its noise scale and trough, so the next estimate can alarm."""
        series = self.series.get(AGGREGATE)
        return series is not None and series.sigma is not None and series.trough is not None

    @property
    def calibration_estimates(self) -> int:
        """Estimates a fresh run needs before the monitor is calibrated (``warmup + 1``; 2 with a :meth:`fit`
        reference): the first alarm can come at the estimate after them."""
        return 2 if (self.reference or {}).get(AGGREGATE) is not None else self.warmup + 1

    @property
    def estimates_until_ready(self) -> int:
        """How many more estimates before the monitor is calibrated (0 when :attr:`ready`).

        Self-calibrated: the first estimate starts the series, σ0 needs ``warmup`` increments and the
        trough one more estimate, so the first alarm can come at estimate ``warmup + 2``. With a
        :meth:`fit` reference: at the third estimate.
        """
        if self.ready:
            return 0
        return max(self.calibration_estimates - self.count, 1)

    # ------------------------------------------------------------------ reference calibration
    def fit(self, histories: Iterable[Sequence[CurvatureEstimate | Mapping[str, float]]]) -> CusumMonitor:
        """Calibrate σ0 and μ0 per series from clean reference runs (one sequence of estimates each).

        σ0 pools the robust per-estimate noise of all runs; μ0 is the median excess of the
        fast level over the trough after each run's warm-up, so a monitored run is alarmed by
        a rise beyond what clean runs show. The monitored run then starts deciding from its
        third estimate, with no warm-up.
        """
        increments: dict[str, list[float]] = {}
        excess: dict[str, list[float]] = {}
        for history in histories:
            probe = CusumMonitor(**{**self.settings(), "alarm_on": AGGREGATE})
            for estimate in history:
                for name, value in self._values(estimate).items():
                    series = probe.series.setdefault(name, _Series())
                    seen = series.seen
                    x = probe._observe(series, float(value))
                    if series.seen > seen:
                        increments.setdefault(name, []).append(series.increments[-1])
                    if x is not None:
                        excess.setdefault(name, []).append(x * series.sigma)
        if not increments or min(len(v) for v in increments.values()) < 3:
            raise ValueError("fit needs reference histories with at least 4 usable estimates")
        self.reference = {
            name: {
                "sigma": _robust_noise_sd(incs, self.min_sigma),
                "mu": statistics.median(excess[name]) if excess.get(name) else 0.0,
            }
            for name, incs in increments.items()
        }
        self.reset()
        return self

    def update_settings(self, **changes: Any) -> None:
        """Change settings mid-run (``h``, ``k``, ``warmup``, ...), keeping the state; validated as in ``__init__``."""
        MonitorConfig.build(self.config, **changes)  # raises ValueError for a bad value
        for key, value in changes.items():
            setattr(self, key, value)

    @property
    def config(self) -> MonitorConfig:
        """The monitor's current rule as a record."""
        return MonitorConfig(**{name: getattr(self, name) for name in option_names(MonitorConfig)})

    def settings(self) -> dict[str, Any]:
        return asdict(self.config)

    def save(self, path: str | Path) -> None:
        """Write settings and the ``fit`` reference as JSON."""
        Path(path).write_text(json.dumps({"settings": self.settings(), "reference": self.reference}, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> CusumMonitor:
        data = json.loads(Path(path).read_text())
        monitor = cls(**data["settings"])
        monitor.reference = data["reference"]
        monitor.reset()
        return monitor

    def state_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings(),
            "reference": self.reference,
            "count": self.count,
            "series": {n: asdict(s) for n, s in self.series.items()},
            "crossings": [list(c) for c in self.crossings],
            "above": dict(self._above),
            "loss": [self.loss_first, self.loss_level, self.loss_low, self.loss_stir_step, self.loss_jumped],
            "held_back": list(self.held_back),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, value in state["settings"].items():  # (a state saved before tail_rate/long_run keeps this
            setattr(self, key, value)  # monitor's values for them)
        self.reference = state["reference"]
        self.count = int(state["count"])
        self.series = {n: _Series(**s) for n, s in state["series"].items()}
        self.crossings = [(str(f), int(step)) for f, step in state.get("crossings", [])]
        self._above = dict(state.get("above", {}))
        loss = [*state.get("loss", []), None, None, None, None, None][:5]  # states before the loss jump hold two
        self.loss_first, self.loss_level, self.loss_low, self.loss_stir_step = loss[:4]
        self.loss_jumped = bool(loss[4])
        if self.loss_low is None:
            self.loss_low = self.loss_level
        self.held_back = [int(s) for s in state.get("held_back", [])]
