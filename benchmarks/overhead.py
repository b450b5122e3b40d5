"""Training-throughput overhead of CurvatureAwareOptimizer vs the bare optimizer, side by side.

timm resnet18, 32×32 inputs, batch 128, SGD+momentum, data already in memory (no loader to hide
the cost). All configurations train their own copy of the model *interleaved step by step* in one
process, so machine drift hits every configuration alike; each configuration's own step time
(forward, backward, wrapper step including any estimate) is accumulated.

    python benchmarks/overhead.py --steps 1000
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import timm
import torch
from torch import nn

from curvopt import CurvatureAwareOptimizer

CONFIGS = {
    # name: (label, wrapper kwargs or None for the bare optimizer, share of --steps to run)
    "bare": ("bare SGD", None, 1.0),
    "default": ("wrapper, defaults (every=500, K=8, GN on, CUSUM)", {}, 1.0),
    "scaling": ("wrapper, defaults + lr_scaling='trace'", {"lr_scaling": "trace"}, 1.0),
    "every100": ("wrapper, every=100", {"every": 100}, 1.0),
    "every10": ("wrapper, every=10", {"every": 10}, 0.2),
}


def build(kwargs: dict | None, loss_fn: nn.Module):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10, pretrained=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    if kwargs is not None:
        opt = CurvatureAwareOptimizer(opt, model, loss_fn, **kwargs)
    return model, opt


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loss_fn = nn.CrossEntropyLoss()
    runs = {name: build(kwargs, loss_fn) for name, (_, kwargs, _) in CONFIGS.items()}
    budget = {name: int(args.steps * share) for name, (_, _, share) in CONFIGS.items()}
    spent = dict.fromkeys(CONFIGS, 0.0)
    bare_at = {}  # bare time after n steps, for configurations that stop early
    gen = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(1, args.steps + 1):
            x = torch.randn(args.batch_size, 3, 32, 32, generator=gen)
            y = torch.randint(0, 10, (args.batch_size,), generator=gen)
            for name, (model, opt) in runs.items():
                if step > budget[name]:
                    continue
                start = time.perf_counter()
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                if isinstance(opt, CurvatureAwareOptimizer):
                    opt.step(batch=(x, y))
                else:
                    opt.step()
                spent[name] += time.perf_counter() - start
            bare_at[step] = spent["bare"]
    step_time = spent["bare"] / args.steps
    print(f"resnet18, batch {args.batch_size}, 32×32, {args.threads} threads, CPU, configurations interleaved\n")
    print("| configuration | steps | time s | overhead vs bare (same steps) | estimates | one estimate, in steps |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (label, _, _) in CONFIGS.items():
        model, opt = runs[name]
        n = budget[name]
        bare = bare_at[n]
        estimates = len(opt.history) if isinstance(opt, CurvatureAwareOptimizer) else 0
        overhead = 100 * (spent[name] - bare) / bare
        per = f"{(spent[name] - bare) / estimates / step_time:.1f}" if estimates else "–"
        print(f"| {label} | {n} | {spent[name]:.1f} | {overhead:+.1f} % | {estimates} | {per} |")
