"""Training-throughput overhead of CurvatureAwareOptimizer vs the bare optimizer, side by side.

A timm model (resnet18 by default) on in-memory data (no loader to hide the cost), SGD+momentum. All
configurations train their own copy of the model *interleaved step by step* in one process, so
machine drift hits every configuration alike; each configuration's own step time (forward,
backward, wrapper step including any estimate) is accumulated, with a device synchronisation
around every timed step on CUDA.

The ``mechanism`` rows keep per-layer LR scales fixed at values ≠ 1 and never estimate: they
measure what applying layer-wise learning rates costs per step (through the learning rate for
SGD, through the update for a Lookahead-wrapped SGD, which is not linear in the rate).

    python -m benchmarks.overhead --steps 1000
    python -m benchmarks.overhead --device cuda --model resnet50 --img-size 224 --batch-size 64 --steps 500
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import timm
import timm.optim
import torch
from torch import nn

from curvopt import CurvatureAwareOptimizer

CONFIGS = {
    # name: (label, wrapper kwargs or None for the bare optimizer, share of --steps to run)
    "bare": ("bare SGD", None, 1.0),
    "default": ("wrapper, defaults (every=500, K=8, GN on, CUSUM)", {}, 1.0),
    "scaling": ("wrapper, defaults + lr_scaling='trace'", {"lr_scaling": "trace"}, 1.0),
    "mechanism_lr": ("per-layer LR mechanism only (SGD: through the learning rate)", {"every": 0}, 1.0),
    "bare_lookahead": ("bare Lookahead(SGD)", None, 1.0),
    "mechanism_lerp": ("per-layer LR mechanism only (Lookahead: through the update)", {"every": 0}, 1.0),
    "every100": ("wrapper, every=100", {"every": 100}, 1.0),
    "every10": ("wrapper, every=10", {"every": 10}, 0.2),
}
BASELINE = {"mechanism_lerp": "bare_lookahead"}  # compared with this row instead of bare SGD


def build(name: str, kwargs: dict | None, loss_fn: nn.Module, model_name: str, device: torch.device):
    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=10, pretrained=False).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    if "lookahead" in name or "lerp" in name:
        opt = timm.optim.Lookahead(opt)
    if kwargs is not None:
        mechanism = name.startswith("mechanism")
        opt = CurvatureAwareOptimizer(
            opt, model, loss_fn, **kwargs, lr_scaling="trace" if mechanism else kwargs.get("lr_scaling")
        )
        if mechanism:  # fixed scales 0.5 / 2 on alternating layers, never re-estimated
            opt.lr_scales = {b.name: (0.5, 2.0)[i % 2] for i, b in enumerate(opt.layer_blocks)}
    return model, opt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    loss_fn = nn.CrossEntropyLoss()
    names = set(args.only) | {"bare"} | {BASELINE[n] for n in args.only if n in BASELINE}
    runs = {n: build(n, CONFIGS[n][1], loss_fn, args.model, device) for n in CONFIGS if n in names}
    budget = {n: int(args.steps * CONFIGS[n][2]) for n in runs}
    spent = dict.fromkeys(runs, 0.0)
    at_step: dict[str, dict[int, float]] = {n: {} for n in runs}
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(1, args.steps + 1):
            x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=gen).to(device)
            y = torch.randint(0, 10, (args.batch_size,), generator=gen).to(device)
            for name, (model, opt) in runs.items():
                if step > budget[name]:
                    continue
                sync()
                start = time.perf_counter()
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                if isinstance(opt, CurvatureAwareOptimizer):
                    opt.step(batch=(x, y))
                else:
                    opt.step()
                sync()
                spent[name] += time.perf_counter() - start
                at_step[name][step] = spent[name]
    step_time = spent["bare"] / args.steps
    where = (
        f"{args.device} ({torch.cuda.get_device_name(device)})"
        if device.type == "cuda"
        else f"CPU, {args.threads} threads"
    )
    print(
        f"{args.model}, batch {args.batch_size}, {args.img_size}×{args.img_size}, {where}, configurations "
        f"interleaved; bare SGD step {1000 * step_time:.1f} ms\n"
    )
    print("| configuration | steps | time s | overhead vs bare (same steps) | estimates | one estimate, in steps |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (_, opt) in runs.items():
        label = CONFIGS[name][0]
        n = budget[name]
        bare = at_step[BASELINE.get(name, "bare")][n]
        estimates = len(opt.history) if isinstance(opt, CurvatureAwareOptimizer) else 0
        overhead = 100 * (spent[name] - bare) / bare
        per = f"{(spent[name] - bare) / estimates / step_time:.1f}" if estimates else "–"
        print(f"| {label} | {n} | {spent[name]:.1f} | {overhead:+.2f} % | {estimates} | {per} |")


if __name__ == "__main__":
    main()
