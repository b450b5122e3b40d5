"""False-alarm rate of a CusumMonitor on long stationary series, by depth (layers) and length (estimates).

Each run feeds ``--horizon`` estimates of a stationary log-curvature (level −4, noise SD 0.75 in log space;
Gaussian, or Student t with 3 d.o.f. for heavy tails) to a fresh monitor and records whether it ever alarms.
With ``--layers L`` the monitor watches L stationary layers plus the model-wide series and alarms on any
layer (``alarm_on="layer"``): the multiple-testing case of per-layer alarms. Real layers move together, so
the layers' noise is correlated: each layer's standardised noise is √ρ·c_t + √(1−ρ)·e_{l,t} with a common
c_t (``--correlation`` ρ, default 0.5), and heavy tails share their scale across layers (one χ² draw per
estimate), as a bad batch would make every layer's estimate an outlier at once.

    python -m benchmarks.monitor_stationary --runs 100 --horizon 1000 --layers 1 10 43 161
    python -m benchmarks.monitor_stationary --layers 43 --horizon 5000 --runs 60

The statistic does not depend on the threshold (an alarm only reports a crossing), so ``--record FILE`` runs each
(layers, noise) case once with the monitor's default dynamics and saves, per run and estimate, the largest
per-layer statistic max_l S_l(t) and the model-wide S(t); ``--rules FILE`` then gives the false-alarm rate of any
threshold rule (h, ``tail_rate``, ``long_run``) at every horizon from those paths, without simulating again:

    python -m benchmarks.monitor_stationary --record benchmarks/runs/stationary.json --layers 1 10 43 161 \
        --horizon 5000 --runs 100
    python -m benchmarks.monitor_stationary --rules benchmarks/runs/stationary.json --horizon 1000 5000 \
        --monitor '{"tail_rate": 0.7}' '{"tail_rate": 0.5, "long_run": 1000}'
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
from typing import Any

from curvopt import CusumMonitor
from curvopt.control.monitor import _MAD_TO_SD, AGGREGATE, GRADIENT, SIGMA_UCB


def draw(rng: random.Random, heavy: bool) -> float:
    z = rng.gauss(0, 1)
    if heavy:
        z /= math.sqrt(sum(rng.gauss(0, 1) ** 2 for _ in range(3)) / 3)
    return z


def _scale(rng: random.Random, heavy: bool) -> float:
    """The heavy-tailed case's shared scale: √(3/χ²₃) (Student t with 3 d.o.f. when it multiplies a Gaussian)."""
    return 1.0 / math.sqrt(sum(rng.gauss(0, 1) ** 2 for _ in range(3)) / 3) if heavy else 1.0


def estimates(rng: random.Random, layers: int, heavy: bool, correlation: float) -> dict[str, float]:
    """One estimate's values: ``layers`` correlated stationary layers, the model-wide series and the gradient norm
    (``GRADIENT``, as correlated with the layers as they are with each other; monitored with ``gradient=True``)."""
    scale = _scale(rng, heavy)
    common = rng.gauss(0, 1)
    a, b = math.sqrt(correlation), math.sqrt(1.0 - correlation)
    values = {
        f"layer{i}": math.exp(-4.0 + 0.75 * scale * (a * common + b * rng.gauss(0, 1)))
        for i in range(layers if layers > 1 else 0)
    }
    values[AGGREGATE] = math.exp(-4.0 + 0.75 * scale * (a * common + b * rng.gauss(0, 1)))
    values[GRADIENT] = math.exp(-4.0 + 0.75 * scale * (a * common + b * rng.gauss(0, 1)))
    return values


def false_alarm_rate(
    settings: dict[str, Any],
    *,
    runs: int = 100,
    horizon: int = 2000,
    heavy: bool = False,
    layers: int = 1,
    seed: int = 0,
    correlation: float = 0.0,
) -> float:
    """Fraction of ``runs`` stationary runs on which a monitor with ``settings`` ever alarms."""
    rng = random.Random(seed)
    alarmed = 0
    for _ in range(runs):
        monitor = CusumMonitor(**settings)
        for t in range(horizon):
            if monitor.update(t, estimates(rng, layers, heavy, correlation)):
                alarmed += 1
                break
    return alarmed / runs


def record_paths(layers: int, heavy: bool, runs: int, horizon: int, seed: int, correlation: float) -> list[dict]:
    """Per run: ``max_layer`` = max_l S_l(t), ``aggregate`` = S(t) and ``gradient`` = the gradient norm's S(t) per
    estimate (default dynamics, no alarm)."""
    rng = random.Random(seed)
    paths = []
    for _ in range(runs):
        monitor = CusumMonitor(h=1e9, gradient=True, gradient_h=1e9, alarm_on="layer" if layers > 1 else AGGREGATE)
        top, agg, grad = [], [], []
        for t in range(horizon):
            monitor.update(t, estimates(rng, layers, heavy, correlation))
            series = monitor.series
            top.append(
                max((s.s for n, s in series.items() if n not in (AGGREGATE, GRADIENT)), default=series[AGGREGATE].s)
            )
            agg.append(series[AGGREGATE].s)
            grad.append(series[GRADIENT].s)
        paths.append({"max_layer": top, "aggregate": agg, "gradient": grad})
    return paths


def record_paths_vectorised(
    layers: int,
    heavy: bool,
    runs: int,
    horizon: int,
    seed: int,
    correlation: float,
) -> list[dict]:
    """:func:`record_paths` with the monitor's statistic computed for all runs and layers at once (numpy).

    The same draws (one ``random.Random(seed)`` stream, run after run, through :func:`estimates`) and the same
    dynamics as ``CusumMonitor()``'s per-series ``_observe``/``_advance`` at default settings (log with floor,
    robust σ0 over the last ``window`` increments with its UCB factor, clip, fast/slow EWMAs, leaky trough, Page's
    CUSUM), only vectorised: L = 161 over 5,000 estimates takes minutes instead of hours. ``--check`` compares it
    with the monitor itself, path by path.
    """
    import numpy as np

    ref = CusumMonitor()
    rng = random.Random(seed)
    names = [f"layer{i}" for i in range(layers if layers > 1 else 0)] + [AGGREGATE, GRADIENT]
    values = np.empty((runs, horizon, len(names)))
    for r in range(runs):
        for t in range(horizon):
            drawn = estimates(rng, layers, heavy, correlation)
            values[r, t] = [drawn[n] for n in names]
    shape = (runs, len(names))
    floor = ref.floor * values[:, 0]  # every value is positive: the floor is set by the first one
    window = np.zeros((*shape, ref.window))
    fast = slow = last = np.log(np.maximum(values[:, 0], floor))
    sigma = trough = None
    s = np.zeros(shape)
    top = np.zeros((runs, horizon))
    agg = np.zeros((runs, horizon))
    grad = np.zeros((runs, horizon))
    for t in range(1, horizon):
        y = np.log(np.maximum(values[:, t], floor))
        window[..., (t - 1) % ref.window] = y - last
        last = y
        seen = t
        if seen >= ref.warmup:
            n = min(seen, ref.window)
            incs = window[..., :n]
            centre = np.median(incs, axis=-1, keepdims=True)
            mad = np.median(np.abs(incs - centre), axis=-1)
            sigma = np.maximum((1 + SIGMA_UCB / math.sqrt(n)) * _MAD_TO_SD * mad / math.sqrt(2), ref.min_sigma)
        if sigma is not None and trough is not None:
            y = np.minimum(np.maximum(y, fast - ref.clip * sigma), fast + ref.clip * sigma)
        fast = fast + ref.smoothing * (y - fast)
        slow = slow + ref.trough_smoothing * (y - slow)
        if sigma is not None:
            if trough is None:
                trough = slow
            else:
                x = (fast - trough) / sigma
                trough = np.minimum(slow, trough + ref.leak * sigma)
                s = np.maximum(0.0, s + x - ref.k)
        agg[:, t], grad[:, t] = s[:, -2], s[:, -1]
        top[:, t] = s[:, :-2].max(axis=1) if layers > 1 else s[:, -2]
    return [
        {"max_layer": top[r].tolist(), "aggregate": agg[r].tolist(), "gradient": grad[r].tolist()} for r in range(runs)
    ]


def rule_rate(paths: list[dict], layers: int, horizon: int, settings: dict[str, Any]) -> float:
    """False-alarm rate within ``horizon`` estimates of a threshold rule, from recorded statistic paths (the
    monitor's own ``threshold`` for every estimate count); with ``gradient=True`` a run alarms when either the
    curvature statistic or the gradient norm's crosses its threshold."""
    monitor = CusumMonitor(**settings)
    monitor.series = {f"layer{i}": None for i in range(layers if layers > 1 else 0)}  # only the count matters
    key = "max_layer" if layers > 1 and monitor.alarm_on == "layer" else "aggregate"
    name = "layer0" if key == "max_layer" else AGGREGATE
    watched = [(key, name)] + ([("gradient", GRADIENT)] if monitor.gradient else [])
    thresholds: dict[str, list[float]] = {k: [] for k, _ in watched}
    for t in range(horizon):
        monitor.count = t + 1
        for k, series in watched:
            thresholds[k].append(monitor.threshold(series))

    def alarms(path: dict) -> bool:
        return any(v > h for k, _ in watched for v, h in zip(path[k][:horizon], thresholds[k]))

    return sum(alarms(p) for p in paths) / len(paths)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--horizon", type=int, nargs="+", default=[1000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, nargs="+", default=[1])
    parser.add_argument("--correlation", type=float, default=0.5)
    parser.add_argument("--monitor", type=json.loads, nargs="+", default=[{}], help="CusumMonitor settings as JSON")
    parser.add_argument("--record", default=None, help="save statistic paths to this JSON file")
    parser.add_argument("--rules", default=None, help="rates of the --monitor rules from this file of paths")
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare the vectorised statistic with the monitor's own, path by path, and exit",
    )
    args = parser.parse_args()
    if args.check:
        for layers in args.layers:
            for heavy in (False, True):
                fast = record_paths_vectorised(layers, heavy, args.runs, max(args.horizon), args.seed, args.correlation)
                slow = record_paths(layers, heavy, args.runs, max(args.horizon), args.seed, args.correlation)
                worst = max(abs(a - b) for f, g in zip(fast, slow) for key in f for a, b in zip(f[key], g[key]))
                print(f"layers {layers}, {'heavy' if heavy else 'gaussian'}: largest |ΔS| = {worst:.2e}", flush=True)
        raise SystemExit(0)
    if args.record:
        saved = {}
        for layers in args.layers:
            for heavy in (False, True):
                key = f"{layers}/{'heavy' if heavy else 'gaussian'}"
                saved[key] = record_paths_vectorised(
                    layers, heavy, args.runs, max(args.horizon), args.seed, args.correlation
                )
                print(f"recorded {key}", flush=True)
                tmp = f"{args.record}.tmp"
                with open(tmp, "w") as f:  # written whole, then renamed: a reader never sees half a file
                    json.dump({"correlation": args.correlation, "paths": saved}, f)
                os.replace(tmp, args.record)
        raise SystemExit(0)
    if args.rules:
        with open(args.rules) as f:
            data = json.load(f)
        print(f"Paths: {args.rules} (layer correlation {data['correlation']})\n")
        print("| rule | layers | noise | horizon | runs | false-alarm rate |")
        print("| --- | ---: | --- | ---: | ---: | ---: |")
        for settings in args.monitor:
            for key, paths in data["paths"].items():
                layers, noise = key.split("/")
                for horizon in args.horizon:
                    rate = rule_rate(paths, int(layers), horizon, settings)
                    print(
                        f"| {json.dumps(settings)} | {layers} | {noise} | {horizon} | {len(paths)} | "
                        f"{100 * rate:.0f} % |",
                        flush=True,
                    )
        raise SystemExit(0)
    args.monitor = args.monitor[0]
    print(f"Monitor: {CusumMonitor(**args.monitor).settings()}; layer correlation {args.correlation}\n")
    print("| layers | noise | horizon (estimates) | runs | runs with a false alarm | rate |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for layers in args.layers:
        for horizon in args.horizon:
            for heavy in (False, True):
                rate = false_alarm_rate(
                    args.monitor,
                    runs=args.runs,
                    horizon=horizon,
                    heavy=heavy,
                    layers=layers,
                    seed=args.seed,
                    correlation=args.correlation,
                )
                noise = "Student t, 3 d.o.f." if heavy else "Gaussian"
                print(
                    f"| {layers} | {noise} | {horizon} | {args.runs} | {round(rate * args.runs)} | "
                    f"{100 * rate:.0f} % |",
                    flush=True,
                )
