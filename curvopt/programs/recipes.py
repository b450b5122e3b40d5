"""Arguments of ``curvopt train``: timm ``train.py`` flag names, YAML recipes as their defaults.

As with timm's ``--config``, a recipe (YAML mapping of argument names, ``drop_path`` or
``drop-path``) sets the defaults and flags on the command line override it. Unlike timm, an
unknown recipe key is an error (a typo must not silently train something else).
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml


class RecipeError(ValueError):
    """A recipe file that cannot be read, or a key that is not a ``curvopt train`` argument."""


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="curvopt train",
        description="Train a timm model with the curvature-aware optimizer (timm train.py flags, YAML recipes).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("-c", "--config", default="", metavar="FILE", help="YAML recipe; its keys set the defaults")

    g = p.add_argument_group("dataset")
    g.add_argument("--data-dir", default="data", help="where the dataset lives (or is downloaded to)")
    g.add_argument("--dataset", default="synthetic", help="cifar10, cifar100 (also torch/cifar10) or synthetic")
    g.add_argument("--dataset-download", type=_bool, default=False, nargs="?", const=True,
                   help="download the dataset when it is missing")  # fmt: skip
    g.add_argument("--num-classes", type=int, default=None, help="defaults to the dataset's")
    g.add_argument("--synthetic-samples", type=int, default=2048, help="training samples of the synthetic dataset")
    g.add_argument("--img-size", type=int, default=32, help="input size of the synthetic dataset")
    g.add_argument("-j", "--workers", type=int, default=0, help="data-loader worker processes")
    g.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability (CIFAR)")
    g.add_argument("--crop-padding", type=int, default=4, help="random-crop padding in pixels (CIFAR, 0: none)")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="resnet18", help="timm model name")
    g.add_argument("--pretrained", type=_bool, default=False, nargs="?", const=True)
    g.add_argument("--cifar-stem", type=_bool, default=False, nargs="?", const=True,
                   help="fit 32x32 inputs (ResNet: 3x3 stride-1 stem, no max-pool; VGG: 1x1 head)")  # fmt: skip
    g.add_argument("--drop", type=float, default=0.0, help="dropout rate")
    g.add_argument("--drop-path", type=float, default=None, help="drop-path rate")
    g.add_argument("--model-kwargs", type=yaml.safe_load, default=None, help="extra create_model kwargs (YAML)")

    g = p.add_argument_group("optimizer")
    g.add_argument("--opt", default="sgd", help="timm optimizer name (create_optimizer_v2)")
    g.add_argument("--opt-eps", type=float, default=None)
    g.add_argument("--opt-betas", type=float, nargs="+", default=None)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--clip-grad", type=float, default=None, help="gradient clipping (norm)")
    g.add_argument("--lr", type=float, default=0.1)

    g = p.add_argument_group("schedule")
    g.add_argument("--sched", default="cosine", help="timm scheduler name (create_scheduler_v2)")
    g.add_argument("--sched-on-updates", type=_bool, default=False, nargs="?", const=True)
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--warmup-epochs", type=int, default=0)
    g.add_argument("--warmup-lr", type=float, default=1e-5)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--decay-epochs", type=float, default=90)
    g.add_argument("--decay-milestones", type=int, nargs="+", default=[90, 180, 270])
    g.add_argument("--decay-rate", type=float, default=0.1)
    g.add_argument("--cooldown-epochs", type=int, default=0)

    g = p.add_argument_group("training")
    g.add_argument("-b", "--batch-size", type=int, default=128)
    g.add_argument("-vb", "--validation-batch-size", type=int, default=None)
    g.add_argument("--grad-accum-steps", type=int, default=1)
    g.add_argument("--amp", type=_bool, default=False, nargs="?", const=True, help="mixed precision (autocast)")
    g.add_argument("--amp-dtype", default="float16", choices=["float16", "bfloat16"])
    g.add_argument("--device", default=None, help="cuda, cpu, cuda:1 (default: cuda when available)")
    g.add_argument("--dist-backend", default=None, help="torch.distributed backend (default: nccl on CUDA, else gloo)")
    g.add_argument("--dist-url", default="env://", help="process-group init URL (torchrun sets env://)")
    g.add_argument("--sync-bn", type=_bool, default=False, nargs="?", const=True,
                   help="SyncBatchNorm across ranks (CUDA); curvature uses per-rank batch statistics")  # fmt: skip
    g.add_argument("--curv-dist-probes", default="independent", choices=["independent", "shared"],
                   help="torchrun: per-rank probes (effective K = world size x K) or shared")  # fmt: skip
    g.add_argument("--smoothing", type=float, default=0.0, help="label smoothing")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (> 0 enables)")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (> 0 enables)")
    g.add_argument("--mixup-prob", type=float, default=1.0)
    g.add_argument("--mixup-switch-prob", type=float, default=0.5)
    g.add_argument("--mixup-mode", default="batch", choices=["batch", "pair", "elem"])
    g.add_argument("--mixup-off-epoch", type=int, default=0, help="turn mixup off from this epoch (0: never)")
    g.add_argument("--model-ema", type=_bool, default=False, nargs="?", const=True)
    g.add_argument("--model-ema-decay", type=float, default=0.998)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--log-interval", type=int, default=50, help="log training metrics every N updates")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")

    g = p.add_argument_group("output and tracking")
    g.add_argument("--output", default="runs/train", help="parent directory of run directories")
    g.add_argument("--experiment", default="", help="run directory name (default: <dataset>-<model>-<time>)")
    g.add_argument("--resume", default="", metavar="CHECKPOINT", help="continue from a checkpoint (last.pth.tar)")
    g.add_argument("--log-wandb", type=_bool, default=False, nargs="?", const=True,
                   help="log to Weights & Biases (offline when there is no API key)")  # fmt: skip
    g.add_argument("--wandb-project", default="curvopt")
    g.add_argument("--wandb-tags", nargs="*", default=[])

    g = p.add_argument_group("curvature")
    g.add_argument("--curv-every", type=int, default=500, help="estimate every N optimizer steps (0: off)")
    g.add_argument("--curv-probes", default="8", help="Hutchinson probes K, or 'auto'")
    g.add_argument("--curv-batch-size", type=int, default=32, help="samples of the batch used for curvature")
    g.add_argument("--curv-gn", type=_bool, default=True, nargs="?", const=True, help="estimate GN traces and GN-Gap")
    g.add_argument("--curv-inter-every", type=int, default=0,
                   help="inter-layer map + per-layer spectra every N steps (0: off; costly)")  # fmt: skip
    g.add_argument("--lr-scaling", default=None, choices=["trace"], help="layer-wise LR scaling policy")
    g.add_argument("--cusum", type=_bool, default=True, nargs="?", const=True, help="run the CUSUM monitor")
    g.add_argument("--cusum-threshold", type=float, default=10.0, help="CUSUM threshold h")
    g.add_argument("--cusum-k", type=float, default=1.0, help="CUSUM reference value k (σ units)")
    g.add_argument("--cusum-warmup", type=int, default=8, help="estimates used to calibrate the monitor")
    g.add_argument("--label-noise", type=float, default=0.0, help="random-class label w.p. p")
    g.add_argument("--label-noise-start-epoch", type=int, default=0, help="first epoch with noisy labels")
    return p


def _argument_names(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if a.dest not in ("help", "config")}


def load_recipe(path: str | Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The recipe's mapping with keys normalised to argument names; unknown keys are an error."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping of argument names to values")
    known = _argument_names(parser)
    recipe: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise RecipeError(f"recipe {path}: unknown key '{key}'{hint}")
        recipe[name] = value
    return recipe


def parse_train_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Recipe defaults, then command-line flags; the recipe path is kept in ``args.config``."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**load_recipe(first.config, parser))
    args = parser.parse_args(argv)
    if args.curv_probes != "auto":
        try:
            args.curv_probes = int(args.curv_probes)
        except ValueError:
            parser.error(f"--curv-probes must be an integer or 'auto', got {args.curv_probes!r}")
    return args
