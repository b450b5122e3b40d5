"""Resonance vs depth distance in plain and residual MLPs; block_norms / Lanczos / SLQ timings vs PyHessian.

    python -m benchmarks.resonance_depth --depth 8 --width 32 --probes 16 --seeds 3

Part 1 (the inter-layer Hessian paper's qualitative claim): for a plain deep tanh MLP and the same MLP with skip
connections (h ← h + f(h)), estimate the parameter-space map ‖H_vw‖_F² of the hidden layers at
initialisation on a synthetic teacher task and print the mean coupling C(v, w) by depth distance
|v − w|, relative to distance 1. The claim: it decays with distance in the plain MLP and is
preserved with skip connections.

Part 2: wall time at equal numbers of Hessian-vector products on the same model and batch:
curvopt's Lanczos top eigenvalue of the whole H (m steps) vs PyHessian's power iteration
(``eigenvalues(maxIter=m, tol=-inf)``); curvopt's SLQ density (n_v starts × m steps) vs
PyHessian's ``density(iter=m, n_v)``; and one ``block_norms`` call (K·L products) with its cost
per product.

The inter-layer Hessian paper: “Inter-Layer Hessian Analysis of Neural Networks with DAG Architectures” (arXiv, 2026).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from curvopt import activation_block_norms, block_norms, layer_spectrum
from curvopt.estimators.spectra import MODEL


class Block(nn.Module):
    """h ↦ tanh(W h + b), or h + tanh(W h + b) with a skip connection."""

    def __init__(self, width: int, residual: bool, std: float):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.residual = residual
        nn.init.normal_(self.lin.weight, std=std)
        nn.init.zeros_(self.lin.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.lin(h)) if self.residual else torch.tanh(self.lin(h))


def deep_mlp(depth: int, width: int, d_in: int, classes: int, residual: bool) -> nn.Sequential:
    """inp → tanh → depth blocks → head; blocks are children "2" … str(depth + 1)."""
    std = (1.0 / width) ** 0.5 * (depth**-0.5 if residual else 1.0)  # residual branches scaled by 1/sqrt(depth)
    blocks = [Block(width, residual, std) for _ in range(depth)]
    return nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), *blocks, nn.Linear(width, classes))


def teacher_batch(n: int, d_in: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    w = torch.randn(d_in, classes, generator=g)
    return x, (x @ w).argmax(1)


def coupling_by_distance(model: nn.Sequential, batch, probes: int, seed: int, space: str) -> dict[int, float]:
    blocks = [str(i) for i in range(2, len(model) - 1)]
    g = torch.Generator().manual_seed(seed)
    if space == "parameters":
        layers = {b: [f"{b}.lin.weight", f"{b}.lin.bias"] for b in blocks}
        norms = block_norms(model, nn.CrossEntropyLoss(), batch, probes=probes, layers=layers, generator=g)
    else:
        norms = activation_block_norms(model, nn.CrossEntropyLoss(), batch, probes=probes, modules=blocks, generator=g)
    c, _ = norms.coupling()
    n = c.shape[0]
    return {dist: float(torch.stack([c[i, i + dist] for i in range(n - dist)]).mean()) for dist in range(1, n)}


def part1(args: argparse.Namespace) -> None:
    print(
        f"Part 1: mean coupling C(v,w) of the hidden blocks by depth distance |v-w|, relative to distance 1; "
        f"depth {args.depth}, width {args.width}, K={args.probes}, batch {args.batch}, mean ± sd over "
        f"{args.seeds} seeds, at initialisation"
    )
    for space in ("activations", "parameters"):
        results = {}
        for residual in (False, True):
            per_seed = []
            for seed in range(args.seeds):
                torch.manual_seed(seed)
                model = deep_mlp(args.depth, args.width, 16, 10, residual)
                batch = teacher_batch(args.batch, 16, 10, seed)
                per_seed.append(coupling_by_distance(model, batch, args.probes, seed, space))
            results[residual] = {d: [s[d] / s[1] for s in per_seed] for d in per_seed[0]}
        print(f"\n{space} space\n{'distance':>8}  {'plain C/C(1)':>18}  {'residual C/C(1)':>18}")
        for dist in results[False]:
            plain, res = results[False][dist], results[True][dist]
            sd_p = statistics.stdev(plain) if len(plain) > 1 else 0.0
            sd_r = statistics.stdev(res) if len(res) > 1 else 0.0
            print(
                f"{dist:>8}  {statistics.mean(plain):>10.3f} ± {sd_p:<5.3f}  "
                f"{statistics.mean(res):>10.3f} ± {sd_r:<5.3f}"
            )


def _time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def part2(args: argparse.Namespace) -> None:
    from pyhessian import hessian as PyHessian

    torch.manual_seed(0)
    model = deep_mlp(args.depth, args.width, 16, 10, residual=True)
    loss_fn = nn.CrossEntropyLoss()
    batch = teacher_batch(args.batch, 16, 10, 0)
    m, n_v = args.steps, args.slq_probes
    whole = {MODEL: [n for n, _ in model.named_parameters()]}

    def ours_top() -> None:
        layer_spectrum(
            model,
            loss_fn,
            batch,
            layers=whole,
            steps=m,
            slq_probes=0,
            slq_steps=2,
            generator=torch.Generator().manual_seed(0),
        )

    def ours_density() -> None:
        layer_spectrum(
            model,
            loss_fn,
            batch,
            layers=whole,
            steps=1,
            slq_probes=n_v,
            slq_steps=m,
            generator=torch.Generator().manual_seed(0),
        )

    def theirs_top() -> None:
        model.zero_grad(set_to_none=True)
        PyHessian(model, loss_fn, data=batch, cuda=False).eigenvalues(maxIter=m, tol=float("-inf"), top_n=1)

    def theirs_density() -> None:
        model.zero_grad(set_to_none=True)
        PyHessian(model, loss_fn, data=batch, cuda=False).density(iter=m, n_v=n_v)

    n_layers = args.depth + 2
    rows = [
        (f"top eigenvalue, {m} products", ours_top, theirs_top),
        (f"density, {n_v}x{m} products", ours_density, theirs_density),
    ]
    print(
        f"\nPart 2: residual MLP depth {args.depth} width {args.width}, batch {args.batch}, CPU, "
        f"{torch.get_num_threads()} threads; median of {args.reps}"
    )
    print(f"{'task':<32}{'curvopt s':>11}{'PyHessian s':>13}{'ratio':>8}")
    for label, ours, theirs in rows:
        ours()
        t_ours = _time(ours, args.reps)
        try:
            theirs()  # warm-up
        except Exception as exc:  # PyHessian 0.1's density calls torch.eig, removed in torch 1.9+
            print(f"{label:<32}{t_ours:>11.3f}{'fails':>13}{'':>8}   (PyHessian: {str(exc).splitlines()[0][:60]})")
            continue
        t_theirs = _time(theirs, args.reps)
        print(f"{label:<32}{t_ours:>11.3f}{t_theirs:>13.3f}{t_ours / t_theirs:>7.2f}x")
    k = args.probes
    t_blocks = _time(
        lambda: block_norms(model, loss_fn, batch, probes=k, generator=torch.Generator().manual_seed(0)), args.reps
    )
    products = k * n_layers
    print(
        f"{'block_norms, K=' + str(k) + ' x L=' + str(n_layers):<32}{t_blocks:>11.3f}{'–':>13}{'':>8}"
        f"   ({1000 * t_blocks / products:.2f} ms per product; PyHessian has no block map)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--probes", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="Lanczos / power-iteration steps m")
    parser.add_argument("--slq-probes", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip-timings", action="store_true")
    args = parser.parse_args()
    part1(args)
    if not args.skip_timings:
        part2(args)


if __name__ == "__main__":
    main()
