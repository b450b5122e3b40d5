"""Estimate time against world size on CPU (gloo): one process vs two DDP ranks.

    python -m benchmarks.ddp_scaling --reps 5

Per configuration: the wall time of one full wrapper estimate (probes, products, the one
all-reduce, monitor update), median over ``--reps`` after one warm-up, the time of the all-reduce
alone, and the effective number of probes. Threads are split so every configuration uses the same
cores (world 1: all threads; world 2: threads / 2 per rank). Two local-batch settings:
the same *global* curvature batch split over the ranks, and the same *local* batch per rank.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


def _model() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=10)


def _worker(rank: int, world: int, init: str, out: str, threads: int, local_batch: int, probes: int, reps: int) -> None:
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        from curvopt import CurvatureAwareOptimizer
        from curvopt.estimators import distributed as dist_utils

        model = _model()
        if world > 1:
            model = nn.parallel.DistributedDataParallel(model)
        opt = CurvatureAwareOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.0),
            model,
            nn.CrossEntropyLoss(),
            every=1,
            probes=probes,
            curvature_batch_size=local_batch,
            monitor=None,
        )
        g = torch.Generator().manual_seed(rank)
        x, y = torch.randn(local_batch, 3, 32, 32, generator=g), torch.randint(0, 10, (local_batch,), generator=g)
        times = []
        for _ in range(reps + 1):
            opt.observe(x, y)
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
            opt._estimate_and_update()
            times.append(time.perf_counter() - start)
        reduce_times = []
        if world > 1:
            est = opt.last_estimate
            per_rank = est.samples["trace"].shape[0] // world
            layout = dist_utils.Layout(est.layers, est.numel, list(est.samples), per_rank)
            local = type(est)(est.layers, est.numel, {k: v[:per_rank] for k, v in est.samples.items()}, est.loss)
            for _ in range(20):
                dist.barrier()
                start = time.perf_counter()
                dist_utils.all_gather_estimate(local, layout)
                reduce_times.append(time.perf_counter() - start)
        if rank == 0:
            torch.save(
                {"times": times[1:], "reduce": reduce_times, "probes": opt.last_estimate.probes},
                Path(out) / "result.pt",
            )
    finally:
        if world > 1:
            dist.destroy_process_group()


def run(world: int, threads: int, local_batch: int, probes: int, reps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ctx = multiprocessing.get_context("spawn")
        args = (world, str(Path(tmp) / "init"), tmp, max(1, threads // world), local_batch, probes, reps)
        procs = [ctx.Process(target=_worker, args=(r, *args)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(900)
            if p.exitcode != 0:
                raise RuntimeError(f"a rank failed (exit {p.exitcode})")
        return torch.load(Path(tmp) / "result.pt", weights_only=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32, help="global curvature batch of the 1-process run")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    rows = []
    configs = [
        ("1 process", 1, args.batch),
        ("2 ranks, same global batch", 2, args.batch // 2),
        ("2 ranks, same local batch", 2, args.batch),
    ]
    for label, world, local in configs:
        result = run(world, args.threads, local, args.probes, args.reps)
        rows.append((label, world, local, result))
    base = statistics.median(rows[0][3]["times"])
    print(
        f"resnet18 32x32, K={args.probes} per rank, GN on, {args.threads} threads in all, CPU, gloo; "
        f"median of {args.reps}"
    )
    print(
        f"{'configuration':<30}{'ranks':>6}{'local B':>9}{'eff. K':>8}{'estimate s':>12}{'vs 1 proc':>11}"
        f"{'s / eff. probe':>16}{'all-reduce ms':>15}"
    )
    for label, world, local, result in rows:
        t = statistics.median(result["times"])
        reduce_ms = f"{1000 * statistics.median(result['reduce']):.2f}" if result["reduce"] else "–"
        per_probe = t / result["probes"]
        print(
            f"{label:<30}{world:>6}{local:>9}{result['probes']:>8}{t:>12.2f}{t / base:>10.2f}x{per_probe:>16.3f}"
            f"{reduce_ms:>15}"
        )


if __name__ == "__main__":
    main()
