"""Memorisation-detection benchmark: CUSUM alarms on clean vs noisy/random-label runs.

A small CNN (``curvopt.programs.models.small_cnn``) trained with SGD on the learnable synthetic image task
(``curvopt.programs.synthetic``, 2048 training images, 10 classes), wrapped in ``CurvatureAwareOptimizer``
with the *default* ``CusumMonitor`` settings, K = 8 probes on 32 samples every 20 steps, 800 steps
of batch 64. Conditions, each over ``--seeds`` seeds:

* ``clean``   clean labels (any alarm is a false alarm);
* ``p0.5``    each label replaced by a random class with probability 0.5 from the start;
* ``p1``      random labels from the start;
* ``switch``  clean labels, switched to random labels at step 400 (an alarm before the switch is a
              false alarm; a detection counts only after it).

Prints detections/runs, false alarms/clean runs and median detection delay (steps after the
onset of memorisation), like the source paper's 179/180 at 16/120.

    python benchmarks/memorisation.py --seeds 10 --first-seed 100
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from multiprocessing import Pool

import torch
from torch import nn

CONDITIONS = ("clean", "p0.5", "p1", "switch")


def run(args: tuple[str, int, int, int]) -> tuple[str, int, int | None]:
    """Train one run; return (condition, seed, step of the first alarm or None)."""
    from curvopt import CurvatureAwareOptimizer
    from curvopt.programs.models import small_cnn
    from curvopt.programs.synthetic import corrupt_labels, make_synthetic_images

    condition, seed, steps, every = args
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    images, labels = make_synthetic_images(2048, seed=seed, noise=1.0)
    if condition == "p0.5":
        labels = corrupt_labels(labels, 0.5, 10, seed=seed)
    elif condition == "p1":
        labels = corrupt_labels(labels, 1.0, 10, seed=seed)
    switched = corrupt_labels(labels, 1.0, 10, seed=seed + 10_000)
    model = small_cnn()
    loss_fn = nn.CrossEntropyLoss()
    opt = CurvatureAwareOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        model,
        loss_fn,
        every=every,
        probes=8,
        gn=False,
        seed=seed,
    )
    first = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(1, steps + 1):
            y_all = switched if condition == "switch" and step > steps // 2 else labels
            idx = torch.randint(0, images.shape[0], (64,))
            x, y = images[idx], y_all[idx]
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step(batch=(x, y))
            if opt.alarms and first is None:
                first = opt.alarms[0].step
    return condition, seed, first


def summarise(results: list[tuple[str, int, int | None]], steps: int) -> str:
    onset = {"p0.5": 0, "p1": 0, "switch": steps // 2}
    lines = [
        "| condition | runs | detections | false alarms | median delay (steps) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    totals = {"det": 0, "det_runs": 0, "fa": 0, "clean_runs": 0}
    for condition in CONDITIONS:
        firsts = [f for c, _, f in results if c == condition]
        if condition == "clean":
            fa = sum(f is not None for f in firsts)
            totals["fa"] += fa
            totals["clean_runs"] += len(firsts)
            lines.append(f"| clean | {len(firsts)} | – | {fa}/{len(firsts)} | – |")
            continue
        early = [f for f in firsts if f is not None and f <= onset[condition]] if condition == "switch" else []
        detected = [f - onset[condition] for f in firsts if f is not None and f > onset[condition]]
        totals["det"] += len(detected)
        totals["det_runs"] += len(firsts)
        if condition == "switch":  # a pre-switch alarm happened on clean labels
            totals["fa"] += len(early)
            totals["clean_runs"] += len(firsts)
        delay = f"{statistics.median(detected):.0f}" if detected else "–"
        fa_cell = f"{len(early)}/{len(firsts)} (before switch)" if condition == "switch" else "–"
        lines.append(f"| {condition} | {len(firsts)} | {len(detected)}/{len(firsts)} | {fa_cell} | {delay} |")
    lines.append(
        f"\n**Detections {totals['det']}/{totals['det_runs']}, false alarms {totals['fa']}/{totals['clean_runs']}** "
        "(clean runs plus the clean halves of the switch runs)."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=100)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    jobs = [
        (c, s, args.steps, args.every) for c in CONDITIONS for s in range(args.first_seed, args.first_seed + args.seeds)
    ]
    start = time.perf_counter()
    with Pool(args.workers) as pool:
        results = pool.map(run, jobs)
    print(summarise(results, args.steps))
    print(f"\n{len(jobs)} runs in {time.perf_counter() - start:.0f} s with {args.workers} workers")
    for condition in CONDITIONS:
        print(condition, [f for c, _, f in results if c == condition])
