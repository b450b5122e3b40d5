"""Memory and time of curvature estimates on a causal LM at GPT-2's vocabulary (V = 50,257).

A GPT-2 built from a config (no weights fetched): ``--width`` wide, ``--layers`` deep, eager attention, batch
``--batch-size`` × ``--seq`` tokens of Python's own documentation (bytes), labels = input ids (Hugging Face's
convention: shifted inside the loss, -100 ignored). Each row runs in its own process; peak memory is the
peak RSS above the RSS after set-up (CPU) or the peak allocated (CUDA). Rows:

* ``fwd_bwd`` — one training forward+backward (``model(**inputs, labels=...).loss``);
* ``gn=False`` / ``gn=True`` — ``estimate_curvature`` with :class:`curvopt.CausalLMLoss` (closed-form output
  Hessian, applied in chunks of positions);
* ``gn=True, generic`` — the same loss as a plain function, so the output Hessian goes through double
  backward at the logits (what users got before ``CausalLMLoss``);
* ``fd`` rows — the same with ``strategy="finite-difference"``.

    python -m benchmarks.causal_lm_memory --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.hvp_speed import machine, median_time, peak_rss_bytes, rss_bytes, write_section

ROWS = ["fwd_bwd", "gn=False", "gn=True", "gn=True, generic", "fd, gn=False", "fd, gn=True"]


def build(args: argparse.Namespace):
    from pydoc_data.topics import topics

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50257,
        n_positions=args.seq,
        n_embd=args.width,
        n_layer=args.layers,
        n_head=4,
        attn_implementation="eager",
    )
    model = GPT2LMHeadModel(config).to(args.device).train()
    data = torch.tensor(list(" ".join(topics.values()).encode("utf-8")[: args.batch_size * args.seq]))
    tokens = data.reshape(args.batch_size, args.seq).to(args.device)
    return model, {"input_ids": tokens}, tokens.clone()


def row(args: argparse.Namespace) -> dict:
    import curvopt

    torch.set_num_threads(args.threads)
    model, inputs, labels = build(args)
    from curvopt.integrations.huggingface import logits_of as forward

    closed = curvopt.CausalLMLoss()

    def generic(logits, targets):  # the same loss, not recognised: H_out by double backward
        return closed(logits, targets)

    if args.row == "fwd_bwd":

        def run():
            model.zero_grad(set_to_none=True)
            model(**inputs, labels=labels).loss.backward()
    else:
        loss = generic if "generic" in args.row else closed
        strategy = "finite-difference" if args.row.startswith("fd") else "autograd"

        def run():
            curvopt.estimate_curvature(
                model,
                loss,
                (inputs, labels),
                probes=args.probes,
                gn="gn=True" in args.row,
                forward=forward,
                strategy=strategy,
                fd_check=False,
                generator=torch.Generator().manual_seed(0),
            )

    cuda = args.device.startswith("cuda")
    base = torch.cuda.memory_allocated() if cuda else rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    run()
    time_s = median_time(run, args.reps, cuda)
    peak = (torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()) - base
    return {"row": args.row, "time_s": time_s, "peak_mb": max(peak, 0) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--probes", type=int, default=4)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--write", type=Path, default=None)
    parser.add_argument("--row", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        print(json.dumps(row(args)))
        return
    results = []
    for name in ROWS:
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.causal_lm_memory",
            "--row",
            name,
            *[
                f"--{k.replace('_', '-')}={v}"
                for k, v in vars(args).items()
                if k not in ("row", "write") and v is not None
            ],
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            results.append({"row": name, "error": (done.stderr.strip().splitlines() or ["?"])[-1][:120]})
        else:
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(results[-1], file=sys.stderr, flush=True)
    by_row = {r["row"]: r for r in results}
    fb, lean = by_row["fwd_bwd"], by_row["gn=False"]
    lines = [
        f"Machine: {machine()}, {args.threads} threads, {args.device}.",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        f"GPT-2 from a config: V = 50,257, width {args.width}, {args.layers} layers, batch {args.batch_size} × "
        f"{args.seq} tokens, K = {args.probes}.",
        "",
        "| row | total s | peak MB | peak / fwd+bwd | peak / (gn=False) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | failed: {r['error']} | | | |")
            continue
        lines.append(
            f"| {r['row']} | {r['time_s']:.2f} | {r['peak_mb']:.0f} | {r['peak_mb'] / fb['peak_mb']:.2f}× | "
            f"{r['peak_mb'] / lean['peak_mb']:.2f}× |"
        )
    body = "\n".join(lines)
    print(body)
    if args.write:
        write_section(args.write, body, f"causal_lm_memory_{args.device.split(':')[0]}")


if __name__ == "__main__":
    main()
