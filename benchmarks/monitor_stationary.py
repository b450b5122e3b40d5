"""False-alarm rate of the default CusumMonitor on long stationary series.

Each run feeds ``--horizon`` estimates of a stationary log-curvature (level −4, noise SD 0.75 in
log space; Gaussian, or Student t with 3 d.o.f. for heavy tails) to a fresh default monitor and
records whether it ever alarms.

    python benchmarks/monitor_stationary.py --runs 100 --horizon 2000
"""

from __future__ import annotations

import argparse
import math
import random

from curvopt import CusumMonitor
from curvopt.control.monitor import AGGREGATE


def draw(rng: random.Random, heavy: bool) -> float:
    z = rng.gauss(0, 1)
    if heavy:
        z /= math.sqrt(sum(rng.gauss(0, 1) ** 2 for _ in range(3)) / 3)
    return z


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--horizon", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("| noise | runs | runs with a false alarm | horizon (estimates) |")
    print("| --- | ---: | ---: | ---: |")
    for heavy in (False, True):
        rng = random.Random(args.seed)
        alarmed = 0
        for _ in range(args.runs):
            monitor = CusumMonitor()
            alarmed += any(
                monitor.update(t, {AGGREGATE: math.exp(-4.0 + 0.75 * draw(rng, heavy))}) for t in range(args.horizon)
            )
        print(f"| {'Student t, 3 d.o.f.' if heavy else 'Gaussian'} | {args.runs} | {alarmed} | {args.horizon} |")
