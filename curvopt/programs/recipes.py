"""Arguments of ``curvopt train``: timm ``train.py`` flag names, YAML recipes as their defaults.

As with timm's ``--config``, a recipe (YAML mapping of argument names, ``drop_path`` or
``drop-path``) sets the defaults and flags on the command line override it. Unlike timm, a recipe
is checked before anything runs: an unknown key is an error that suggests the closest flag, and a
value of the wrong type (``epochs: 1.5``, ``lr: [0.1]``) is an error that names the key.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ..control.averaging import ROLLBACK_AVERAGE
from ..control.rollback import CHOOSE
from ..control.scaling import LR_SCALING_POLICIES
from ..control.settings import CurvatureConfig, MonitorConfig, flagged_options, parse_probes
from .arguments import OneLineParser
from .data import DATASETS

ON_ALARM = ("warn", "checkpoint", "stop", "rollback")

# Keys people write in recipes that are spelled differently here (PyTorch Lightning, HF, Keras, timm habits).
SYNONYMS = {
    "learning_rate": "lr",
    "base_lr": "lr",
    "optimizer": "opt",
    "optim": "opt",
    "scheduler": "sched",
    "lr_scheduler": "sched",
    "num_epochs": "epochs",
    "n_epochs": "epochs",
    "max_epochs": "epochs",
    "batch": "batch_size",
    "bs": "batch_size",
    "train_batch_size": "batch_size",
    "wd": "weight_decay",
    "arch": "model",
    "architecture": "model",
    "model_name": "model",
    "data": "data_dir",
    "data_path": "data_dir",
    "root": "data_dir",
    "output_dir": "output",
    "out_dir": "output",
    "label_smoothing": "smoothing",
    "ema": "model_ema",
    "ema_decay": "model_ema_decay",
    "warmup": "warmup_epochs",
    "num_workers": "workers",
    "mixed_precision": "amp",
    "precision": "amp_dtype",
    "grad_clip": "clip_grad",
    "gradient_clipping": "clip_grad",
    "accumulate_grad_batches": "grad_accum_steps",
    "gradient_accumulation_steps": "grad_accum_steps",
    "wandb": "log_wandb",
    "project": "wandb_project",
    "name": "experiment",
    "run_name": "experiment",
}


class RecipeError(ValueError):
    """A recipe file that cannot be read, a key that is not a ``curvopt train`` argument, or a wrong value."""


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


class _HelpFormatter(argparse.HelpFormatter):
    """Adds ``(default: …)`` once, only where the help text does not already speak of a default and the
    default says something (not ``None``, empty, or an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, "", [], argparse.SUPPRESS):
            return text
        if not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def _flag(group: Any, *names: str, **kwargs: Any) -> None:
    if "help" not in kwargs:  # every flag says what it does (tested)
        raise TypeError(f"{names[0]} needs help text")
    group.add_argument(*names, **kwargs)


def _switch(group: Any, name: str, default: bool, help: str) -> None:
    group.add_argument(name, type=_bool, default=default, nargs="?", const=True, metavar="BOOL", help=help)


def _dataset_flags(g: Any) -> None:
    """The ``dataset`` flags."""
    _flag(g, "--data-dir", default="data", help="where the dataset lives (or is downloaded to)")
    _flag(g, "--dataset", default="synthetic", help=f"one of {', '.join(DATASETS)} (timm's torch/cifar10 too)")
    _switch(g, "--dataset-download", False, "download the dataset when it is missing")
    _flag(g, "--num-classes", type=int, default=None, help="number of classes (default: the dataset's)")
    _flag(g, "--synthetic-samples", type=int, default=2048, help="training samples of the synthetic dataset")
    _flag(g, "--img-size", type=int, default=32, help="input size of the synthetic dataset")
    _flag(g, "-j", "--workers", type=int, default=0, help="data-loader worker processes")
    _flag(g, "--hflip", type=float, default=0.5, help="horizontal flip probability (CIFAR)")
    _flag(g, "--crop-padding", type=int, default=4, help="random-crop padding in pixels (CIFAR; 0: none)")


def _model_flags(g: Any) -> None:
    """The ``model`` flags."""
    _flag(g, "--model", default="resnet18", help="timm model name (timm.list_models())")
    _switch(g, "--pretrained", False, "start from timm's pretrained weights (needs them cached or a network)")
    _switch(g, "--cifar-stem", False, "fit 32x32 inputs (ResNet: 3x3 stride-1 stem, no max-pool; VGG: 1x1 head)")
    _flag(g, "--drop", type=float, default=0.0, help="dropout rate of the classifier")
    _flag(g, "--drop-path", type=float, default=None, help="stochastic-depth rate (default: the model's)")
    _flag(g, "--model-kwargs", type=yaml.safe_load, default=None, help="extra timm.create_model kwargs, as YAML")


def _optimizer_flags(g: Any) -> None:
    """The ``optimizer`` flags."""
    _flag(g, "--opt", default="sgd", help="timm optimizer name (create_optimizer_v2: sgd, adamw, lamb, ...)")
    _flag(g, "--opt-eps", type=float, default=None, help="optimizer epsilon (default: the optimizer's)")
    _flag(g, "--opt-betas", type=float, nargs="+", default=None, help="optimizer betas (default: the optimizer's)")
    _flag(g, "--momentum", type=float, default=0.9, help="SGD momentum")
    _flag(g, "--weight-decay", type=float, default=5e-4, help="weight decay")
    _flag(g, "--clip-grad", type=float, default=None, help="clip the gradient norm to this value (default: off)")
    _flag(g, "--lr", type=float, default=0.1, help="base learning rate")


def _schedule_flags(g: Any) -> None:
    """The ``schedule`` flags."""
    _flag(g, "--sched", default="cosine", help="timm scheduler name (create_scheduler_v2: cosine, step, ...)")
    _switch(g, "--sched-on-updates", False, "step the schedule every update instead of every epoch")
    _flag(g, "--epochs", type=int, default=10, help="epochs to train")
    _flag(g, "--warmup-epochs", type=int, default=0, help="linear warm-up epochs")
    _flag(g, "--warmup-lr", type=float, default=1e-5, help="learning rate at the start of warm-up")
    _flag(g, "--min-lr", type=float, default=0.0, help="lowest learning rate of the schedule")
    _flag(g, "--decay-epochs", type=float, default=90, help="step schedule: epochs between decays")
    _flag(g, "--decay-milestones", type=int, nargs="+", default=[90, 180, 270], help="multistep schedule: epochs")
    _flag(g, "--decay-rate", type=float, default=0.1, help="step schedules: factor per decay")
    _flag(g, "--cooldown-epochs", type=int, default=0, help="epochs at the lowest rate after the schedule")


def _training_flags(g: Any) -> None:
    """The ``training`` flags."""
    _flag(g, "-b", "--batch-size", type=int, default=128, help="training batch size (per process)")
    _flag(
        g,
        "-vb",
        "--validation-batch-size",
        type=int,
        default=None,
        help="validation batch size (default: the training batch size)",
    )
    _flag(g, "--grad-accum-steps", type=int, default=1, help="micro-batches per optimizer update")
    _switch(g, "--amp", False, "mixed precision (autocast); curvature stays fp32 unless --curv-dtype says otherwise")
    _flag(g, "--amp-dtype", default="float16", choices=["float16", "bfloat16"], help="autocast dtype")
    _flag(g, "--device", default=None, help="cuda, cpu, cuda:1 (default: cuda when available)")
    _flag(g, "--dist-backend", default=None, help="torch.distributed backend (default: nccl on CUDA, else gloo)")
    _flag(g, "--dist-url", default="env://", help="process-group init URL (torchrun sets env://)")
    _switch(g, "--sync-bn", False, "SyncBatchNorm across ranks; curvature uses per-rank batch statistics")
    _switch(
        g,
        "--fsdp",
        False,
        "torchrun: shard the model with FSDP2 (fully_shard) instead of DDP; curvature by "
        "finite differences on the shards",
    )
    _flag(g, "--smoothing", type=float, default=0.0, help="label smoothing")
    _flag(g, "--mixup", type=float, default=0.0, help="mixup alpha (> 0 enables)")
    _flag(g, "--cutmix", type=float, default=0.0, help="cutmix alpha (> 0 enables)")
    _flag(g, "--mixup-prob", type=float, default=1.0, help="probability of mixing a batch")
    _flag(g, "--mixup-switch-prob", type=float, default=0.5, help="probability of cutmix when both are on")
    _flag(g, "--mixup-mode", default="batch", choices=["batch", "pair", "elem"], help="how mixup pairs samples")
    _flag(g, "--mixup-off-epoch", type=int, default=0, help="turn mixup off from this epoch (0: never)")
    _switch(g, "--model-ema", False, "keep an exponential moving average of the weights (validated too)")
    _flag(g, "--model-ema-decay", type=float, default=0.998, help="EMA decay per update")
    _flag(g, "--seed", type=int, default=42, help="seed of the model, the data order and the probes")
    _flag(g, "--log-interval", type=int, default=50, help="log training metrics every N updates")
    _flag(g, "--no-progress", action="store_true", help="no progress bars")


def _output_tracking_flags(g: Any) -> None:
    """The ``output and tracking`` flags."""
    _flag(
        g,
        "--output",
        default=None,
        help="parent directory of run directories (default: runs/train; on --resume, the checkpoint's run directory)",
    )
    _flag(g, "--experiment", default="", help="run directory name (default: <dataset>-<model>-<time>)")
    _flag(
        g,
        "--resume",
        default="",
        metavar="CHECKPOINT",
        help="continue from a checkpoint (last.pth.tar) or a run directory (its last.pth.tar)",
    )
    _switch(g, "--log-wandb", False, "log to Weights & Biases (offline when there is no API key)")
    _flag(g, "--wandb-project", default="curvopt", help="W&B project")
    _flag(g, "--wandb-tags", nargs="*", default=[], help="W&B tags")


def _record_flags(g: Any, record: type) -> None:
    """A flag for every field of ``record`` that names one (``CurvatureConfig``, ``MonitorConfig``)."""
    for option, meta in flagged_options(record):
        if option.type in (bool, "bool"):
            _switch(g, meta["flag"], option.default, meta["help"])
            continue
        kind = meta["parse"] if meta["choices"] is None else None
        _flag(g, meta["flag"], type=kind, default=option.default, choices=meta["choices"], help=meta["help"])


def _curvature_flags(g: Any) -> None:
    """The ``curvature`` flags."""
    _record_flags(g, CurvatureConfig)
    _flag(
        g,
        "--lr-scaling",
        default=None,
        choices=list(LR_SCALING_POLICIES),
        help="layer-wise LR scaling policy (default: off)",
    )
    _switch(g, "--cusum", True, "run the CUSUM memorisation monitor")
    _record_flags(g, MonitorConfig)
    _flag(
        g,
        "--on-alarm",
        default="warn",
        choices=list(ON_ALARM),
        help="on a memorisation alarm: warn; also "
        "checkpoint alarm-<update>.pth.tar; stop the run cleanly; or roll back to the last epoch checkpoint before "
        "the alarm's change point (then --rollback-then)",
    )
    _flag(
        g,
        "--rollback-keep",
        type=int,
        default=20,
        help="--on-alarm rollback: epoch checkpoints kept on disk "
        "(ring-<epoch>-u<updates>.pth.tar), log-spaced back to the first: recent epochs dense, old ones sparse",
    )
    _flag(
        g,
        "--rollback-to",
        default="best-validated",
        choices=list(CHOOSE),
        help="--on-alarm rollback: among the ring checkpoints before the alarm's change point, the one with the best "
        "validation top-1 (best-validated), or the last one (onset: no validation used; measured in "
        "benchmarks/RESULTS.md §15)",
    )
    _flag(
        g,
        "--rollback-average",
        type=float,
        default=ROLLBACK_AVERAGE,
        help="--on-alarm rollback: restore the exponential average of the weights (this half-life in epochs, "
        "sampled at the curvature estimates; BatchNorm statistics recomputed for it) as it stood at the chosen "
        "checkpoint, instead of the checkpoint's weights; 0: the weights themselves (measured in "
        "benchmarks/RESULTS.md §15.6; the checkpoints carry the average, twice the model's size)",
    )
    _flag(
        g,
        "--rollback-then",
        default="stop",
        choices=["stop", "lower-lr"],
        help="after a rollback: end the run "
        "with the restored model, or continue from it at the learning rate x --rollback-lr-factor",
    )
    _flag(g, "--rollback-lr-factor", type=float, default=0.1, help="--rollback-then lower-lr: the LR factor")
    _flag(g, "--label-noise", type=float, default=0.0, help="replace each training label by a random class w.p. p")
    _flag(g, "--label-noise-start-epoch", type=int, default=0, help="first epoch with noisy labels (0-based)")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="curvopt train",
        description="Train a timm model with the curvature-aware optimizer (timm train.py flags, YAML recipes). "
        "A recipe's keys set the defaults; flags override them. Switches take an optional true/false.",
        formatter_class=_HelpFormatter,
    )
    _flag(p, "-c", "--config", default="", metavar="FILE", help="YAML recipe whose keys set the defaults")
    _dataset_flags(p.add_argument_group("dataset"))
    _model_flags(p.add_argument_group("model"))
    _optimizer_flags(p.add_argument_group("optimizer"))
    _schedule_flags(p.add_argument_group("schedule"))
    _training_flags(p.add_argument_group("training"))
    _output_tracking_flags(p.add_argument_group("output and tracking"))
    _curvature_flags(p.add_argument_group("curvature"))
    return p


def _argument_names(parser: argparse.ArgumentParser) -> set[str]:
    return {a.dest for a in parser._actions if a.dest not in ("help", "config")}


def suggest_flag(key: str, known: Sequence[str]) -> str | None:
    """The argument a mistyped recipe key most likely means: a known synonym, the key's initials
    (``learning_rate`` → ``lr``), or the closest spelling."""
    if key in SYNONYMS and SYNONYMS[key] in known:
        return SYNONYMS[key]
    initials = "".join(part[0] for part in key.split("_") if part)
    if len(initials) > 1 and initials in known:
        return initials
    squashed = {name.replace("_", ""): name for name in known}
    if key.replace("_", "") in squashed:
        return squashed[key.replace("_", "")]
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.7)
    return close[0] if close else None


def _check_value(key: str, value: Any, action: argparse.Action, where: str) -> Any:
    """The recipe value converted as argparse would convert the flag, or a :class:`RecipeError` naming the key."""
    if action.nargs in ("+", "*"):
        if not isinstance(value, list):
            value = [value]
        return [_check_scalar(key, v, action, where) for v in value]
    if action.type is yaml.safe_load:
        return value
    return _check_scalar(key, value, action, where)


def _check_scalar(key: str, value: Any, action: argparse.Action, where: str) -> Any:
    kind = action.type
    if isinstance(action, argparse._StoreTrueAction) or kind is _bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return _bool(value)
            except argparse.ArgumentTypeError:
                pass
        raise RecipeError(f"{where}: '{key}' must be true or false, got {value!r}")
    if isinstance(value, (list, dict)) or (value is None and action.default is not None):
        raise RecipeError(f"{where}: '{key}' must be a single value, got {value!r}")
    if value is None:
        return None
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: '{key}' must be an integer, got {value!r}")
    elif kind is float:
        if isinstance(value, bool):
            raise RecipeError(f"{where}: '{key}' must be a number, got {value!r}")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise RecipeError(f"{where}: '{key}' must be a number, got {value!r}") from None
    elif kind is parse_probes:
        value = value if isinstance(value, int) and not isinstance(value, bool) else str(value)
        if isinstance(value, str):
            try:
                value = parse_probes(value)
            except argparse.ArgumentTypeError as exc:
                raise RecipeError(f"{where}: '{key}' {exc}") from None
    elif kind is None:
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise RecipeError(f"{where}: '{key}' must be one of {', '.join(map(str, action.choices))}, got {value!r}")
    return value


def load_recipe(path: str | Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The recipe's mapping with keys normalised to argument names and values checked against their flags."""
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
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    recipe: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in actions:
            close = suggest_flag(name, sorted(actions))
            hint = f" (did you mean '{close}'?)" if close else ""
            raise RecipeError(f"recipe {path}: unknown key '{key}'{hint}")
        recipe[name] = _check_value(str(key), value, actions[name], f"recipe {path}")
    return recipe


def explicit_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """The argument names given on the command line (not defaults, not the recipe)."""
    quiet = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs: dict[str, Any] = {"dest": action.dest, "nargs": action.nargs}
            if isinstance(action, argparse._StoreTrueAction):
                kwargs = {"dest": action.dest, "action": "store_true"}
            elif action.const is not None:
                kwargs["const"] = action.const
            quiet.add_argument(*action.option_strings, **kwargs)
    given, _ = quiet.parse_known_args(argv)
    return set(vars(given))


def parse_train_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Recipe defaults, then command-line flags; ``args.config`` keeps the recipe path, ``args.explicit``
    the names given on the command line and ``args.from_recipe`` those the recipe set."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    recipe = load_recipe(first.config, parser) if first.config else {}
    parser.set_defaults(**recipe)
    args = parser.parse_args(argv)
    args.explicit = sorted(explicit_flags(parser, argv))
    args.from_recipe = sorted(recipe)
    return args
