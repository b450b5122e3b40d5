"""Finite differences against the exact products on many model families, at the defaults.

For each family (timm models at 32 px, HF models built from config objects; train mode, batch 8, K = 16 Rademacher
probes, ``gn=True``), ``strategy="finite-difference"`` and ``strategy="autograd"`` run on the *same* probes and
batch. Columns: the largest per-layer |FD − exact| in units of the exact estimate's Hutchinson standard error, for
Hessian traces and GN traces; the range of the per-layer GN-Gap ratio FD / exact over layers whose exact GN-Gap is
finite, and the count of layers whose exact GN part is exactly zero (GN-Gap inf) against those FD reports as inf;
the self-check's verdict (the step it settled on, warnings); the per-probe cost of the estimate at steady state
(second call: the self-check is cached per model) in units of one forward+backward of the same batch.

Families with piecewise-linear activations (ReLU and max-pooling in the timm ResNet-18, Hardswish/Hardsigmoid in
MobileNetV3) are not expected to match: their rows show the warning and what it advises (MobileNetV3 has no exact
reference: autograd cannot differentiate its Hardsigmoid twice).

    python -m benchmarks.fd_families                       # every family (≈ 5 min on 2 cores)
    python -m benchmarks.fd_families --models convnext,vit
    python -m benchmarks.fd_families --write benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import curvopt
from curvopt.engine.losses import CausalLMLoss

BATCH = 8
PIXELS = 32
PROBES = 16


def images(channels: int = 3, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, channels, PIXELS, PIXELS, generator=g), torch.randint(0, classes, (BATCH,), generator=g)


def tokens(vocab: int, length: int = 32, seed: int = 0) -> torch.Tensor:
    """Bytes of Python's own documentation (``pydoc_data.topics``) as token ids below ``vocab``."""
    from pydoc_data.topics import topics

    data = torch.tensor(list(" ".join(topics.values()).encode("utf-8")), dtype=torch.long) % vocab
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - length, (BATCH,), generator=g)
    return torch.stack([data[s : s + length] for s in starts.tolist()])


def timm_family(name: str, **kwargs) -> Callable[[], tuple]:
    def build() -> tuple:
        import timm

        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
        return model, nn.CrossEntropyLoss(), images(), None

    return build


def mixer() -> tuple:
    from timm.models.mlp_mixer import MlpMixer

    torch.manual_seed(0)
    model = MlpMixer(num_classes=10, img_size=PIXELS, patch_size=4, num_blocks=4, embed_dim=128)
    return model, nn.CrossEntropyLoss(), images(), None


def gpt2() -> tuple:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1
    )
    ids = tokens(256)
    return GPT2LMHeadModel(config), CausalLMLoss(), (ids, ids), lambda m, x: m(input_ids=x).logits


def bert() -> tuple:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=256,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        num_labels=3,
    )
    ids = tokens(256)
    labels = torch.arange(BATCH) % 3
    model = BertForSequenceClassification(config)
    return model, nn.CrossEntropyLoss(), (ids, labels), lambda m, x: m(input_ids=x).logits


FAMILIES: dict[str, Callable[[], tuple]] = {
    "resnet-silu": timm_family("resnet18", act_layer="silu", replace_stem_pool=True, zero_init_last=False),
    "resnet-silu-zero-init": timm_family("resnet18", act_layer="silu", replace_stem_pool=True, zero_init_last=True),
    "convnext": timm_family("convnext_atto"),
    "efficientnet": timm_family("efficientnet_b0"),
    "mobilenetv3": timm_family("mobilenetv3_small_050"),
    "resnet-relu": timm_family("resnet18"),
    "vit": timm_family("vit_tiny_patch16_224", img_size=PIXELS, patch_size=4, depth=4),
    "mixer": mixer,
    "mobilevit": timm_family("mobilevit_xxs"),
    "gpt2": gpt2,
    "bert": bert,
}


def run(model, loss_fn, batch, forward, strategy: str) -> tuple[curvopt.CurvatureEstimate | None, list[str], str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            est = curvopt.estimate_curvature(
                model,
                loss_fn,
                batch,
                probes=PROBES,
                strategy=strategy,
                forward=forward,
                generator=torch.Generator().manual_seed(1),
            )
            error = ""
        except curvopt.DoubleBackwardError as exc:
            est, error = None, type(exc).__name__
    texts = [str(w.message) for w in caught if issubclass(w.category, curvopt.FiniteDifferenceWarning)]
    return est, texts, error


def summary(text: str) -> str:
    """A warning in a table cell: what it blames and what it advises."""
    if "piecewise-linear modules" in text:
        kinds = sorted({k for k in ("ReLU", "MaxPool2d", "Hardswish", "Hardsigmoid") if f"({k})" in text})
        advice = "strategy='autograd'" if "strategy='autograd'" in text else "no exact strategy can run"
        return f"kinks ({', '.join(kinds)}…): {advice}"
    if "shrank" in text:
        return "step shrank"
    return text[:120]


def cost_ratio(model, loss_fn, batch, forward) -> tuple[float, float]:
    """Per-probe seconds of FD traces (gn=False) and traces+GN at steady state, ÷ one forward+backward."""
    inputs, targets = batch

    def fwd_bwd() -> None:
        out = forward(model, inputs) if forward else model(inputs)
        loss_fn(out, targets).backward()

    def timed(fn: Callable[[], None], repeat: int = 3) -> float:
        fn()
        best = math.inf
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best

    unit = timed(fwd_bwd)
    model.zero_grad(set_to_none=True)
    ratios = []
    for gn in (False, True):

        def estimate(k: int, gn: bool = gn) -> Callable[[], None]:
            return lambda: curvopt.estimate_curvature(
                model, loss_fn, batch, probes=k, gn=gn, forward=forward, strategy="finite-difference"
            )

        per_probe = (timed(estimate(2 + PROBES)) - timed(estimate(2))) / PROBES
        ratios.append(per_probe / unit)
    return ratios[0], ratios[1]


def compare(name: str) -> str:
    model, loss_fn, batch, forward = FAMILIES[name]()
    model.train()
    exact, _, exact_error = run(model, loss_fn, batch, forward, "autograd")
    fd, fd_warn, _ = run(model, loss_fn, batch, forward, "finite-difference")
    warned = "; ".join(summary(w) for w in fd_warn) or "no"
    if exact is None:
        return f"| {name} | {exact_error} | – | – | – | – | {warned} | – | – |"
    trace = max(abs(fd.trace[n] - exact.trace[n]) / exact.trace_se[n] for n in exact.layers if exact.trace_se[n] > 0)
    gn = max(
        (
            abs(fd.gn_trace[n] - exact.gn_trace[n]) / exact.gn_trace_se[n]
            for n in exact.layers
            if exact.gn_trace_se[n] > 0
        ),
        default=0.0,
    )
    ratios = [
        fd.gn_gap[n] / exact.gn_gap[n] for n in exact.layers if math.isfinite(exact.gn_gap[n]) and exact.gn_gap[n] > 0
    ]
    inf_exact = sum(1 for n in exact.layers if math.isinf(exact.gn_gap[n]))
    inf_fd = sum(1 for n in exact.layers if math.isinf(exact.gn_gap[n]) and math.isinf(fd.gn_gap[n]))
    traces_cost, gn_cost = cost_ratio(model, loss_fn, batch, forward)
    return (
        f"| {name} | {len(exact.layers)} | {trace:.3f} | {gn:.3f} | {min(ratios):.3f}–{max(ratios):.3f} | "
        f"{inf_fd}/{inf_exact} | {warned} | {traces_cost:.2f} | {gn_cost:.2f} |"
    )


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(FAMILIES), help="comma-separated families: " + ", ".join(FAMILIES))
    parser.add_argument("--write", type=Path, default=None, help="replace this section of a RESULTS.md")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = [
        "| family | layers | trace max Δ/SE | GN trace max Δ/SE | GN-Gap ratio FD/exact | GN-Gap inf (FD/exact) "
        "| FD warning | traces cost ÷ fwd+bwd | traces+GN cost ÷ fwd+bwd |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for name in args.models.split(","):
        rows.append(compare(name))
        print(rows[-1], flush=True)
    body = "\n".join([f"Machine: {machine()}.", f"Command: `python {' '.join(sys.argv)}`", "", *rows])
    if args.write:
        text = args.write.read_text()
        start, end = "<!-- fd_families:begin -->", "<!-- fd_families:end -->"
        head, _, rest = text.partition(start)
        _, _, tail = rest.partition(end)
        args.write.write_text(f"{head}{start}\n{body}\n{end}{tail}")


if __name__ == "__main__":
    main()
