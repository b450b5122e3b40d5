"""Per-layer traces at equal products: Hutchinson vs Hutch++ vs XTrace (``curvopt.estimators.deflation``).

For each model and training stage, every estimator gets the same K products (K = 8, 16, 32) on the
same batch, ``--reps`` times with fresh probes. Reported per estimator, as ratios to Hutchinson at
the same K (median over layers): the reported per-layer standard error, the empirical spread of the
per-layer traces over the repetitions, and the wall time of one estimate. Below 1 is better.

Models: timm resnet18 (32×32, batch 32) at initialisation, after ``--mid`` and after ``--late`` SGD
steps of the synthetic task (the late stage is near convergence: ~100 % training accuracy), and the
inter-layer Hessian paper's plain tanh MLP (depth 12, width 32, a teacher task) at initialisation and after training.

    python -m benchmarks.deflation --reps 8 --mlp-reps 50

The inter-layer Hessian paper: “Inter-Layer Hessian Analysis of Neural Networks with DAG Architectures” (arXiv, 2026).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn

ESTIMATORS = ("hutchinson", "hutch++", "xtrace")


def resnet18_stages(mid: int, late: int) -> list[tuple[str, nn.Module, tuple[torch.Tensor, torch.Tensor], float]]:
    import timm

    from curvopt.programs.synthetic import make_synthetic_images

    torch.manual_seed(0)
    x, y = make_synthetic_images(2048, image_size=32, seed=0, noise=1.0)
    model = timm.create_model("resnet18", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batch = (x[:32], y[:32])
    stages, done = [], 0
    for name, steps in (("init", 0), (f"step {mid}", mid), (f"step {late}", late)):
        for _ in range(steps - done):
            idx = torch.randint(0, len(y), (64,))
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        done = steps
        with torch.no_grad():
            model.eval()
            acc = float((model(x[:512]).argmax(1) == y[:512]).float().mean()) * 100
            model.train()
        stages.append((f"resnet18 {name}", _frozen(model), batch, acc))
    return stages


def _frozen(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def mlp_stages(steps: int) -> list[tuple[str, nn.Module, tuple[torch.Tensor, torch.Tensor], float]]:
    from benchmarks import resonance_depth as module

    torch.manual_seed(0)
    model = module.deep_mlp(12, 32, 16, 10, residual=False)
    x, y = module.teacher_batch(2048, 16, 10, seed=0)
    batch = (x[:128], y[:128])
    stages = [("DAG MLP init", _frozen(model), batch, float("nan"))]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (128,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean()) * 100
    stages.append((f"DAG MLP step {steps}", _frozen(model), batch, acc))
    return stages


def measure(model: nn.Module, batch, products: int, reps: int) -> dict[str, dict[str, float]]:
    """Per estimator: median-over-layers ratios to Hutchinson of SE and spread, and the time ratio."""
    from curvopt import estimate_curvature

    loss_fn = nn.CrossEntropyLoss()
    values: dict[str, list[list[float]]] = {e: [] for e in ESTIMATORS}
    ses: dict[str, list[list[float]]] = {e: [] for e in ESTIMATORS}
    seconds: dict[str, list[float]] = {e: [] for e in ESTIMATORS}
    for rep in range(reps):
        for estimator in ESTIMATORS:  # interleaved: machine drift hits all alike
            start = time.perf_counter()
            est = estimate_curvature(
                model,
                loss_fn,
                batch,
                probes=products,
                gn=True,
                estimator=estimator,
                generator=torch.Generator().manual_seed(1000 * rep + 7),
            )
            seconds[estimator].append(time.perf_counter() - start)
            values[estimator].append([est.trace[n] for n in est.layers])
            ses[estimator].append([est.trace_se[n] for n in est.layers])
    base_se = torch.tensor(ses["hutchinson"]).mean(0)
    base_spread = torch.tensor(values["hutchinson"]).std(0) if reps > 1 else None
    out = {}
    for estimator in ESTIMATORS:
        se_ratio = torch.tensor(ses[estimator]).mean(0) / base_se
        row = {
            "se": float(se_ratio.median()),
            "time": statistics.median(seconds[estimator]) / statistics.median(seconds["hutchinson"]),
            "seconds": statistics.median(seconds[estimator]),
        }
        if base_spread is not None:
            row["spread"] = float((torch.tensor(values[estimator]).std(0) / base_spread).median())
        out[estimator] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--products", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--reps", type=int, default=8, help="repetitions per resnet18 stage and K")
    parser.add_argument("--mlp-reps", type=int, default=50, help="repetitions per MLP stage and K")
    parser.add_argument("--mid", type=int, default=60)
    parser.add_argument("--late", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-resnet", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    stages = [(s, args.mlp_reps) for s in mlp_stages(2000)]
    if not args.skip_resnet:
        stages += [(s, args.reps) for s in resnet18_stages(args.mid, args.late)]
    print(
        "| model, stage | train acc % | K | estimator | SE / Hutchinson | spread / Hutchinson | time / Hutchinson "
        "| s per estimate |"
    )
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |")
    for (name, model, batch, acc), reps in stages:
        for products in args.products:
            result = measure(model, batch, products, reps)
            for estimator, row in result.items():
                spread = f"{row['spread']:.2f}" if "spread" in row else "–"
                print(
                    f"| {name} | {acc:.1f} | {products} | {estimator} | {row['se']:.2f} | {spread} | "
                    f"{row['time']:.2f} | {row['seconds']:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
