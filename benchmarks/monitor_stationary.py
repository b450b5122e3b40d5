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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--horizon", type=int, nargs="+", default=[1000])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, nargs="+", default=[1])
    parser.add_argument("--correlation", type=float, default=0.5)
    parser.add_argument("--monitor", type=json.loads, default={}, help="CusumMonitor settings as JSON")
    args = parser.parse_args()
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
