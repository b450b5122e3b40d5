"""False-alarm rate of a CusumMonitor on long stationary series.

Each run feeds ``--horizon`` estimates of a stationary log-curvature (level −4, noise SD 0.75 in
log space; Gaussian, or Student t with 3 d.o.f. for heavy tails) to a fresh monitor and records
whether it ever alarms. ``--layers L`` feeds L independent stationary layers to a monitor that
alarms on any layer (``alarm_on="layer"``), the multiple-testing case of per-layer alarms.

    python benchmarks/monitor_stationary.py --runs 100 --horizon 2000
    python benchmarks/monitor_stationary.py --monitor '{"alarm_on": "layer"}' --layers 8
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


def false_alarm_rate(
    settings: dict[str, Any], *, runs: int = 100, horizon: int = 2000, heavy: bool = False, layers: int = 1,
    seed: int = 0,
) -> float:  # fmt: skip
    """Fraction of ``runs`` stationary runs on which a monitor with ``settings`` ever alarms."""
    rng = random.Random(seed)
    alarmed = 0
    for _ in range(runs):
        monitor = CusumMonitor(**settings)
        for t in range(horizon):
            values = {f"layer{i}": math.exp(-4.0 + 0.75 * draw(rng, heavy)) for i in range(layers if layers > 1 else 0)}
            values[AGGREGATE] = math.exp(-4.0 + 0.75 * draw(rng, heavy))
            if monitor.update(t, values):
                alarmed += 1
                break
    return alarmed / runs


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--horizon", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--monitor", type=json.loads, default={}, help="CusumMonitor settings as JSON")
    args = parser.parse_args()
    print(f"Monitor: {CusumMonitor(**args.monitor).settings()}; {args.layers} layer(s)\n")
    print("| noise | runs | runs with a false alarm | horizon (estimates) |")
    print("| --- | ---: | ---: | ---: |")
    for heavy in (False, True):
        rate = false_alarm_rate(args.monitor, runs=args.runs, horizon=args.horizon, heavy=heavy, layers=args.layers,
                                seed=args.seed)  # fmt: skip
        print(f"| {'Student t, 3 d.o.f.' if heavy else 'Gaussian'} | {args.runs} | {round(rate * args.runs)} "
              f"| {args.horizon} |")  # fmt: skip
