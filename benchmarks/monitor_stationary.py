"""False-alarm rate of a CusumMonitor on long stationary series, by depth (layers) and length (estimates).

Each run feeds ``--horizon`` estimates of a stationary log-curvature (level −4, noise SD 0.75 in log space;
Gaussian, or Student t with 3 d.o.f. for heavy tails) to a fresh monitor and records whether it ever alarms.
With ``--layers L`` the monitor watches L stationary layers plus the model-wide series and alarms on any
layer (``alarm_on="layer"``): the multiple-testing case of per-layer alarms. Real layers move together, so
the layers' noise is correlated: each layer's standardised noise is √ρ·c_t + √(1−ρ)·e_{l,t} with a common
c_t (``--correlation`` ρ, default 0.5), and heavy tails share their scale across layers (one χ² draw per
estimate), as a bad batch would make every layer's estimate an outlier at once.

    python benchmarks/monitor_stationary.py --runs 100 --horizon 1000 --layers 1 10 43 161
    python benchmarks/monitor_stationary.py --layers 43 --horizon 5000 --runs 60

The statistic does not depend on the threshold (an alarm only reports a crossing), so ``--record FILE`` runs each
(layers, noise) case once with the monitor's default dynamics and saves, per run and estimate, the largest
per-layer statistic max_l S_l(t) and the model-wide S(t); ``--rules FILE`` then gives the false-alarm rate of any
threshold rule (h, ``tail_rate``, ``long_run``) at every horizon from those paths, without simulating again:

    python benchmarks/monitor_stationary.py --record benchmarks/runs/stationary.json --layers 1 10 43 161 \
        --horizon 5000 --runs 100
    python benchmarks/monitor_stationary.py --rules benchmarks/runs/stationary.json --horizon 1000 5000 \
        --monitor '{"tail_rate": 0.7}' '{"tail_rate": 0.5, "long_run": 1000}'
"""

from __future__ import annotations

import argparse
import json
import math
import random
from typing import Any

from curvopt import CusumMonitor
from curvopt.control.monitor import AGGREGATE


def draw(rng: random.Random, heavy: bool) -> float:
    z = rng.gauss(0, 1)
    if heavy:
        z /= math.sqrt(sum(rng.gauss(0, 1) ** 2 for _ in range(3)) / 3)
    return z


def _scale(rng: random.Random, heavy: bool) -> float:
    """The heavy-tailed case's shared scale: √(3/χ²₃) (Student t with 3 d.o.f. when it multiplies a Gaussian)."""
    return 1.0 / math.sqrt(sum(rng.gauss(0, 1) ** 2 for _ in range(3)) / 3) if heavy else 1.0


def estimates(rng: random.Random, layers: int, heavy: bool, correlation: float) -> dict[str, float]:
    """One estimate's values: ``layers`` correlated stationary layers and the model-wide series."""
    scale = _scale(rng, heavy)
    common = rng.gauss(0, 1)
    a, b = math.sqrt(correlation), math.sqrt(1.0 - correlation)
    values = {f"layer{i}": math.exp(-4.0 + 0.75 * scale * (a * common + b * rng.gauss(0, 1)))
              for i in range(layers if layers > 1 else 0)}  # fmt: skip
    values[AGGREGATE] = math.exp(-4.0 + 0.75 * scale * (a * common + b * rng.gauss(0, 1)))
    return values


def false_alarm_rate(
    settings: dict[str, Any], *, runs: int = 100, horizon: int = 2000, heavy: bool = False, layers: int = 1,
    seed: int = 0, correlation: float = 0.0,
) -> float:  # fmt: skip
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
    """Per run: ``max_layer`` = max_l S_l(t) and ``aggregate`` = S(t) per estimate (default dynamics, no alarm)."""
    from curvopt.control.monitor import AGGREGATE as AGG

    rng = random.Random(seed)
    paths = []
    for _ in range(runs):
        monitor = CusumMonitor(h=1e9, alarm_on="layer" if layers > 1 else AGG)
        top, agg = [], []
        for t in range(horizon):
            monitor.update(t, estimates(rng, layers, heavy, correlation))
            series = monitor.series
            top.append(max((s.s for n, s in series.items() if n != AGG), default=series[AGG].s))
            agg.append(series[AGG].s)
        paths.append({"max_layer": top, "aggregate": agg})
    return paths


def rule_rate(paths: list[dict], layers: int, horizon: int, settings: dict[str, Any]) -> float:
    """False-alarm rate within ``horizon`` estimates of a threshold rule, from recorded statistic paths (the
    monitor's own ``threshold`` for every estimate count)."""
    monitor = CusumMonitor(**settings)
    monitor.series = {f"layer{i}": None for i in range(layers if layers > 1 else 0)}  # only the count matters
    key = "max_layer" if layers > 1 and monitor.alarm_on == "layer" else "aggregate"
    name = "layer0" if key == "max_layer" else AGGREGATE
    thresholds = []
    for t in range(horizon):
        monitor.count = t + 1
        thresholds.append(monitor.threshold(name))
    return sum(any(v > h for v, h in zip(p[key][:horizon], thresholds)) for p in paths) / len(paths)


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
    args = parser.parse_args()
    if args.record:
        saved = {}
        for layers in args.layers:
            for heavy in (False, True):
                key = f"{layers}/{'heavy' if heavy else 'gaussian'}"
                saved[key] = record_paths(layers, heavy, args.runs, max(args.horizon), args.seed, args.correlation)
                print(f"recorded {key}", flush=True)
                with open(args.record, "w") as f:
                    json.dump({"correlation": args.correlation, "paths": saved}, f)
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
                    print(f"| {json.dumps(settings)} | {layers} | {noise} | {horizon} | {len(paths)} | "
                          f"{100 * rate:.0f} % |", flush=True)  # fmt: skip
        raise SystemExit(0)
    args.monitor = args.monitor[0]
    print(f"Monitor: {CusumMonitor(**args.monitor).settings()}; layer correlation {args.correlation}\n")
    print("| layers | noise | horizon (estimates) | runs | runs with a false alarm | rate |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for layers in args.layers:
        for horizon in args.horizon:
            for heavy in (False, True):
                rate = false_alarm_rate(args.monitor, runs=args.runs, horizon=horizon, heavy=heavy, layers=layers,
                                        seed=args.seed, correlation=args.correlation)  # fmt: skip
                noise = "Student t, 3 d.o.f." if heavy else "Gaussian"
                print(f"| {layers} | {noise} | {horizon} | {args.runs} | {round(rate * args.runs)} | "
                      f"{100 * rate:.0f} % |", flush=True)  # fmt: skip
