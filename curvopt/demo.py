"""``curvopt demo``: per-layer curvature of a small CNN while it trains, on built-in data."""

from __future__ import annotations

import time

import torch
from torch import nn

from .estimate import CurvatureEstimate, estimate_curvature
from .models import small_cnn
from .synthetic import make_synthetic_images


def format_table(estimate: CurvatureEstimate) -> str:
    """A per-layer table: d_l, trace ± SE, GN trace, tensor trace, GN-Gap (Frobenius form)."""
    header = f"{'layer':<12}{'numel':>8}{'trace':>12}{'± se':>10}{'gn_trace':>12}{'tensor':>12}{'gn_gap':>9}"
    rows = [header, "-" * len(header)]
    for name in estimate.layers:
        rows.append(
            f"{name:<12}{estimate.numel[name]:>8}{estimate.trace[name]:>12.4g}{estimate.trace_se[name]:>10.2g}"
            f"{estimate.gn_trace.get(name, float('nan')):>12.4g}"
            f"{estimate.tensor_trace.get(name, float('nan')):>12.4g}{estimate.gn_gap.get(name, float('nan')):>9.3g}"
        )
    return "\n".join(rows)


def run_demo(*, steps: int = 300, every: int = 25, probes: int = 8, seed: int = 0, batch_size: int = 64) -> int:
    if steps < 1 or every < 1:
        raise ValueError("--steps and --every must be >= 1")
    torch.manual_seed(seed)
    images, labels = make_synthetic_images(4096, seed=seed)
    model = small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    print(f"curvopt demo: small CNN on synthetic 16x16 images, K={probes} probes every {every} steps")
    last = None
    for step in range(1, steps + 1):
        idx = torch.randint(0, images.shape[0], (batch_size,))
        x, y = images[idx], labels[idx]
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        if step % every == 0:
            start = time.perf_counter()
            last = estimate_curvature(model, loss_fn, (x[:32], y[:32]), probes=probes, generator=generator)
            ms = 1000 * (time.perf_counter() - start)
            acc = (model(x).argmax(1) == y).float().mean().item()
            print(
                f"step {step:>4}  loss {loss.item():.3f}  acc {acc:.2f}  "
                f"tr(H) {last.total_trace:10.4g} ± {last.total_trace_se:.2g}  "
                f"GN-Gap {last.total_gn_gap:.3f}  ({ms:.0f} ms)"
            )
    if last is not None:
        print("\nlast estimate, per layer:")
        print(format_table(last))
    return 0
