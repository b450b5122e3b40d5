"""Cost of per-layer curvature estimates vs one forward+backward, side by side with PyHessian and curvlinops.

Same model, same batch, K probes for every row. Each row runs in its own subprocess so that
its peak memory can be measured (CPU: peak RSS above the post-set-up RSS; CUDA: peak
allocated). Times are medians over ``--reps`` repetitions after one warm-up.

    python -m benchmarks.hvp_speed                      # resnet18 + small ViT, K=8, batch 32
    python -m benchmarks.hvp_speed --models resnet18 --reps 3 --write benchmarks/RESULTS.md
    python -m benchmarks.hvp_speed --device cuda --models resnet18,resnet50,vit_s --image-size 224 \
        --batch-size 128 --write benchmarks/RESULTS.md     # GPU rows (+ the tf32/bf16 product rows)

Models: ``resnet18``, ``resnet50`` (timm, 10 classes), ``vit`` (ViT-Tiny, depth 6, patch 4 at 32×32,
patch 16 at 224×224), ``vit_s`` (ViT-S/16; patch 4 at 32×32) and ``gpt`` (a GPT-2-style causal LM: 4 pre-LN
blocks, width 128, 4 heads, GELU, causal SDPA, tied embedding, byte vocabulary 256, ``--image-size`` tokens
per sequence; the loss is next-token cross-entropy over all positions as a plain function, so its output
Hessian goes through double backward at the logits — ``curvopt.CausalLMLoss`` would apply it in closed form,
about 25 % faster with GN, §11 —; curvlinops takes only torch's own losses on ``[N, C]`` outputs).

``fd`` / ``fd+gn`` are ``strategy="finite-difference"`` (one forward+backward per probe, one more backward for
the GN part) without the once-per-run self-check. ResNets have ReLUs: their finite-difference rows measure
speed only (the estimate is a smoothed curvature there; benchmarks/fd_error.py measures the bias).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROWS = [
    # name, description, BN mode
    ("fwd_bwd", "one forward+backward (training step without optimizer)", "train"),
    ("autograd", "curvopt traces, strategy=autograd (default)", "train (batch stats)"),
    ("autograd+gn", "curvopt traces + GN-Gap, strategy=autograd", "train (batch stats)"),
    ("func", "curvopt traces, strategy=func (jvp over grad)", "train (batch stats)"),
    ("func+gn", "curvopt traces + GN-Gap, strategy=func", "train (batch stats)"),
    ("vmap4", "curvopt traces, strategy=func-vmap, chunk 4", "train (batch stats)"),
    ("fd", "curvopt traces, strategy=finite-difference", "train (batch stats)"),
    ("fd+gn", "curvopt traces + GN-Gap, strategy=finite-difference", "train (batch stats)"),
    ("autograd+gn-tf32", "curvopt traces + GN-Gap, curvature_dtype=tf32 (CUDA)", "train (batch stats)"),
    ("autograd+gn-bf16", "curvopt traces + GN-Gap, curvature_dtype=bfloat16", "train (batch stats)"),
    ("pyhessian", "PyHessian hessian(...).trace(), set-up included", "eval (forced)"),
    ("curvlinops", "curvlinops HessianLinearOperator + hutchinson_trace", "train (batch stats)"),
]


DEFAULT_ROWS = [
    "fwd_bwd",
    "autograd",
    "autograd+gn",
    "func",
    "func+gn",
    "vmap4",
    "fd",
    "fd+gn",
    "pyhessian",
    "curvlinops",
]
"""Rows run by default on CPU; CUDA adds the reduced-precision rows (or ask for them with ``--rows``)."""


def build(model_name: str, batch_size: int, device: str, image_size: int = 32):
    import timm

    torch.manual_seed(0)
    patch = 4 if image_size <= 64 else 16
    if model_name in ("resnet18", "resnet50"):
        model = timm.create_model(model_name, num_classes=10, pretrained=False)
    elif model_name == "vit":
        model = timm.create_model(
            "vit_tiny_patch16_224", num_classes=10, pretrained=False, img_size=image_size, patch_size=patch, depth=6
        )
    elif model_name == "vit_s":
        model = timm.create_model(
            "vit_small_patch16_224", num_classes=10, pretrained=False, img_size=image_size, patch_size=patch
        )
    elif model_name == "gpt":
        model = TinyCausalLM().to(device).train()
        tokens = torch.randint(0, 256, (batch_size, image_size + 1), device=device)
        return model, next_token_loss, tokens[:, :-1], tokens[:, 1:]
    else:
        raise SystemExit(f"unknown model {model_name!r}; expected resnet18, resnet50, vit, vit_s or gpt")
    model = model.to(device).train()
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    return model, nn.CrossEntropyLoss(), x, y


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, w = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, w)
        h = h + self.proj(a)
        return h + self.mlp(self.ln2(h))


class TinyCausalLM(nn.Module):
    """A GPT-2-style decoder (pre-LN, GELU, learned positions, tied input/output embedding)."""

    def __init__(self, vocab: int = 256, width: int = 128, depth: int = 4, heads: int = 4, context: int = 512):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(depth))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln(h))


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def math_attention_copy(model):
    """A copy whose attention uses the math path: fused SDPA kernels have no double backward on CPU."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(getattr(m, "fused_attn", None), bool):
            m.fused_attn = False
    return ref


def make_row(row: str, model, loss_fn, x, y, probes: int):
    """Return a zero-argument callable that runs the row once, plus a check on its result."""
    import curvopt

    if row == "fwd_bwd":

        def run():
            model.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()

        return run
    if row.split("-")[0] in {"autograd", "autograd+gn", "func", "func+gn", "vmap4", "fd", "fd+gn"}:
        base, _, precision = row.partition("-")
        strategy = {"vmap4": "func-vmap", "fd": "finite-difference"}.get(base.split("+")[0], base.split("+")[0])
        gn = base.endswith("+gn")
        dtype = {"": None, "tf32": "tf32", "bf16": "bfloat16"}[precision]
        gen = torch.Generator(x.device).manual_seed(0)  # probes drawn on the model's device

        def run():
            est = curvopt.estimate_curvature(
                model,
                loss_fn,
                (x, y),
                probes=probes,
                gn=gn,
                strategy=strategy,
                chunk_size=4,
                generator=gen,
                curvature_dtype=dtype,
                fd_check=False,
            )
            assert est.probes == probes
            return est.total_trace

        return run
    if row == "pyhessian":
        from pyhessian import hessian

        ref = math_attention_copy(model)

        def run():
            from torch.nn.attention import SDPBackend, sdpa_kernel

            ref.zero_grad(set_to_none=True)  # PyHessian accumulates into .grad otherwise
            with sdpa_kernel([SDPBackend.MATH]):  # F.scaled_dot_product_attention's fused kernels: no double backward
                h = hessian(ref, loss_fn, data=(x, y), cuda=x.is_cuda)
                # tol=-inf: its relative-tolerance test divides by the running mean and stops early
                # whenever that mean is negative; -inf makes it run exactly `probes` probes.
                values = h.trace(maxIter=probes, tol=-math.inf)
            assert len(values) == probes, f"PyHessian ran {len(values)} probes, not {probes}"
            return sum(values) / len(values)

        return run
    if row == "curvlinops":
        from curvlinops import HessianLinearOperator
        from curvlinops.trace.hutchinson import hutchinson_trace

        ref = math_attention_copy(model)
        for m in ref.modules():  # batch statistics without touching running buffers, as curvopt does
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.track_running_stats = False
        params = [p for p in ref.parameters() if p.requires_grad]

        def run():
            op = HessianLinearOperator(ref, loss_fn, params, [(x, y)], check_deterministic=False)
            return float(hutchinson_trace(op, probes))

        return run
    raise SystemExit(f"unknown row {row!r}")


def run_row(args) -> dict:
    torch.set_num_threads(args.threads)
    model, loss_fn, x, y = build(args.model, args.batch_size, args.device, args.image_size)
    cuda = args.device.startswith("cuda")
    fn = make_row(args.row, model, loss_fn, x, y, args.probes)
    base = torch.cuda.memory_allocated() if cuda else rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    fn()  # warm-up (and first-touch allocations)
    # the forward+backward baseline divides every ratio: give it more repetitions
    reps = max(5 * args.reps, 15) if args.row == "fwd_bwd" else args.reps
    time_s = median_time(fn, reps, cuda)
    peak = (torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()) - base
    return {"row": args.row, "time_s": time_s, "peak_mb": max(peak, 0) / 2**20}


def median_time(fn, reps: int, cuda: bool) -> float:
    """Median wall time of ``reps`` calls of ``fn`` (synchronising the device around each on CUDA)."""
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def table(model_name: str, results: list[dict], probes: int, device: str) -> str:
    fb = next(r for r in results if r["row"] == "fwd_bwd")
    ph = next((r for r in results if r["row"] == "pyhessian"), None)
    shape = f"{args.image_size} tokens" if model_name == "gpt" else f"{args.image_size}×{args.image_size}"
    lines = [
        f"**{model_name}**, batch {args.batch_size}, {shape}, K = {probes}, {device}",
        "",
        "| row | BN mode | total s | per probe s | per probe / fwd+bwd | vs PyHessian total | peak MB"
        " | peak / fwd+bwd |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    modes = {name: mode for name, _, mode in ROWS}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | {modes[r['row']]} | failed: {r['error']} | | | | | |")
            continue
        per_probe = r["time_s"] / (1 if r["row"] == "fwd_bwd" else probes)
        vs_ph = f"{r['time_s'] / ph['time_s']:.2f}×" if ph and r["row"] != "fwd_bwd" and "error" not in ph else ""
        lines.append(
            f"| {r['row']} | {modes[r['row']]} | {r['time_s']:.3f} | {per_probe:.3f} | "
            f"{per_probe / fb['time_s']:.2f}× | {vs_ph} | {r['peak_mb']:.0f} | "
            f"{r['peak_mb'] / max(fb['peak_mb'], 1e-9):.2f}× |"
        )
    return "\n".join(lines)


def write_section(path: Path, body: str, key: str = "hvp_speed") -> None:
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    section = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="resnet18,vit")
    parser.add_argument(
        "--rows",
        default=None,
        help=f"comma-separated, from {[r for r, _, _ in ROWS]} "
        "(default: all but the reduced-precision rows on CPU, all on CUDA)",
    )
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--write",
        type=Path,
        default=None,
        help="update this Markdown file's section for the device, shape and batch size",
    )
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.row:  # child process: one row
        print(json.dumps(run_row(args)))
        raise SystemExit(0)

    command = "python " + " ".join([sys.argv[0], *sys.argv[1:]])
    sections = []
    for model_name in args.models.split(","):
        results = []
        rows = (
            args.rows.split(",")
            if args.rows
            else DEFAULT_ROWS + (["autograd+gn-tf32", "autograd+gn-bf16"] if args.device.startswith("cuda") else [])
        )
        for row in rows:
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.hvp_speed",
                "--row",
                row,
                "--model",
                model_name,
                "--batch-size",
                str(args.batch_size),
                "--probes",
                str(args.probes),
                "--reps",
                str(args.reps),
                "--threads",
                str(args.threads),
                "--device",
                args.device,
                "--image-size",
                str(args.image_size),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                err = (proc.stderr.strip().splitlines() or ["?"])[-1][:120]
                results.append({"row": row, "error": err})
            else:
                results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  {model_name:>8} {row:<12} {results[-1]}", file=sys.stderr, flush=True)
        sections.append(table(model_name, results, args.probes, args.device))
    body = "\n\n".join([f"Machine: {machine()}, {args.threads} threads.", f"Command: `{command}`", *sections])
    print(body)
    if args.write:
        device_type = args.device.split(":")[0]
        default_shape = device_type == "cpu" and args.image_size == 32 and args.batch_size == 32
        key = "hvp_speed" if default_shape else f"hvp_speed_{device_type}_{args.image_size}_b{args.batch_size}"
        write_section(args.write, body, key)
