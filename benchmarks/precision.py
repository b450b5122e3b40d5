"""Error and speed of reduced-precision curvature products (``curvature_dtype``) against fp32.

For each model, one fp32 estimate (``curvature_dtype="float32"``: IEEE fp32, no TF32) and one estimate
per cheaper precision on the *same* probes and batch. The error that matters is the one added to the
estimator's own noise, so it is reported per layer in units of the fp32 estimate's standard error
(|trace_low − trace_fp32| / SE_fp32; same for the GN trace), plus the relative error of the
whole-model trace and GN-Gap, and the time of one estimate (median of ``--reps``).

    python -m benchmarks.precision                                 # CPU: bfloat16 (tf32 is CUDA-only)
    python -m benchmarks.precision --device cuda --image-size 224 --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

import curvopt
from benchmarks.hvp_speed import build, machine, median_time, write_section


def estimate(model, loss_fn, batch, precision: str, probes: int, device: str):
    generator = torch.Generator(device).manual_seed(0)
    return curvopt.estimate_curvature(
        model, loss_fn, batch, probes=probes, generator=generator, curvature_dtype=precision
    )


def timed(fn, reps: int, cuda: bool) -> float:
    fn()  # warm-up
    return median_time(fn, reps, cuda)


def compare(model_name: str, args) -> list[str]:
    model, loss_fn, x, y = build(model_name, args.batch_size, args.device, args.image_size)
    cuda = args.device.startswith("cuda")
    exact = estimate(model, loss_fn, (x, y), "float32", args.probes, args.device)
    t_exact = timed(lambda: estimate(model, loss_fn, (x, y), "float32", args.probes, args.device), args.reps, cuda)
    rows = [f"| {model_name} | float32 | | | | | | {t_exact:.3f} | 1.00× |"]
    precisions = ["tf32", "bfloat16"] if cuda else ["bfloat16"]
    for precision in precisions:
        low = estimate(model, loss_fn, (x, y), precision, args.probes, args.device)
        t = timed(lambda p=precision: estimate(model, loss_fn, (x, y), p, args.probes, args.device), args.reps, cuda)
        tr = [abs(low.trace[n] - exact.trace[n]) / exact.trace_se[n] for n in exact.layers if exact.trace_se[n] > 0]
        gn = [
            abs(low.gn_trace[n] - exact.gn_trace[n]) / exact.gn_trace_se[n]
            for n in exact.layers
            if exact.gn_trace_se[n] > 0
        ]
        total = abs(low.total_trace - exact.total_trace) / abs(exact.total_trace)
        gap_exact, gap_low = exact.total_gn_gap, low.total_gn_gap
        gap = abs(gap_low - gap_exact) / abs(gap_exact)
        rows.append(
            f"| {model_name} | {precision} | {statistics.median(tr):.3f} | {max(tr):.3f} | {statistics.median(gn):.3f}"
            f" | {max(gn):.3f} | {100 * total:.2f} % / {100 * gap:.2f} % | {t:.3f} | {t / t_exact:.2f}× |"
        )
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,vit")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--probes", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--write", type=Path, default=None, help="update this Markdown file's section")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = [
        f"Machine: {machine()}, {args.threads} threads, {args.device}.",
        "",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        f"Batch {args.batch_size}, {args.image_size}×{args.image_size}, K = {args.probes}, same probes for every row.",
        "",
        "| model | curvature_dtype | trace err / SE (median) | (max) | GN err / SE (median) | (max) "
        "| whole-model trace / GN-Gap rel. err | s per estimate | time vs fp32 |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for model_name in args.models.split(","):
        lines += compare(model_name, args)
    body = "\n".join(lines)
    print(body)
    if args.write:
        write_section(args.write, body, f"precision_{args.device.split(':')[0]}")


if __name__ == "__main__":
    main()
