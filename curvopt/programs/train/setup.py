"""Set-up stages of ``curvopt train``: device, data, model, loss, optimizer, schedule, precision.

Each function builds one part from the parsed arguments, in timm ``train.py``'s order, and turns
a user mistake into a one-line :class:`TrainError`.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...control.cadence import describe_cadence, plan_cadence
from ...control.monitor import CusumMonitor
from ...control.optimizer import CurvatureAwareOptimizer
from ...control.settings import CurvatureConfig, MonitorConfig, flag_dest, flagged_options
from ..data import DataSplits, NoisyLabels, build_datasets
from .errors import TrainError
from .loop import rank_shard

# ---------------------------------------------------------------------- arguments and device
INSTALL_HINT = 'pip install -e ".[dev]" in a fresh virtualenv, which installs torch and torchvision together (README)'


def check_vision_stack() -> None:
    """timm needs torchvision, and a torchvision built for another torch fails deep inside timm's import (a CPU
    torch beside a CUDA torchvision: ``operator torchvision::nms does not exist``): say so in one line."""
    try:
        import torchvision  # noqa: F401
    except Exception as exc:
        from importlib.metadata import PackageNotFoundError, version

        try:
            vision = f"torchvision {version('torchvision')}"
        except PackageNotFoundError:
            raise TrainError(f"curvopt train needs torchvision (for timm): {INSTALL_HINT}") from None
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TrainError(
            f"torch {torch.__version__} and {vision} are builds that do not match ({reason}); "
            f"reinstall them together: {INSTALL_HINT}"
        ) from None


def check_args(args: argparse.Namespace) -> None:
    positive = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "grad_accum_steps": args.grad_accum_steps,
        "log_interval": args.log_interval,
        "curv_batch_size": args.curv_batch_size,
    }
    for name, value in positive.items():
        if value < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.curv_every is not None and args.curv_every < 0:
        raise TrainError(f"--curv-every must be >= 0, got {args.curv_every}")
    if not 0.0 <= args.label_noise <= 1.0:
        raise TrainError(f"--label-noise must be in [0, 1], got {args.label_noise}")
    if args.lr <= 0:
        raise TrainError(f"--lr must be > 0, got {args.lr}")


def resolve_device(args: argparse.Namespace) -> torch.device:
    """The device, after joining the process group when launched by torchrun (timm's own helper).

    Sets ``args.distributed``, ``args.rank``, ``args.world_size``, ``args.local_rank``.
    """
    from timm.utils import init_distributed_device

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {args.device}: CUDA is not available on this machine")
    return init_distributed_device(args)


# ---------------------------------------------------------------------- data
@dataclass
class Data:
    """The splits, the (possibly label-noised) training set and the loaders."""

    splits: DataSplits
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    sampler: Any
    noisy: NoisyLabels | None


def build_data(args: argparse.Namespace, device: torch.device) -> Data:
    try:
        splits = build_datasets(
            args.dataset,
            data_dir=args.data_dir,
            download=args.dataset_download,
            hflip=args.hflip,
            crop_padding=args.crop_padding,
            synthetic_samples=args.synthetic_samples,
            img_size=args.img_size,
            num_classes=args.num_classes,
            seed=args.seed,
        )
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    train_set: Any = splits.train
    noisy: NoisyLabels | None = None
    if args.label_noise > 0:
        noisy = NoisyLabels(
            train_set,
            args.label_noise,
            splits.num_classes,
            seed=args.seed + 1,
            active=args.label_noise_start_epoch <= 0,
        )
        train_set = noisy
    sampler = None
    if args.distributed:
        sampler = torch.utils.data.distributed.DistributedSampler(train_set, seed=args.seed, drop_last=True)
    train_loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=args.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=True,
        num_workers=args.workers,
        generator=torch.Generator().manual_seed(args.seed),
        pin_memory=device.type == "cuda",
    )
    if len(train_loader) == 0:
        raise TrainError(f"the training set ({len(train_set)} samples) is smaller than one batch ({args.batch_size})")
    val_set = rank_shard(splits.val, args.rank, args.world_size) if args.distributed else splits.val
    val_loader = torch.utils.data.DataLoader(
        val_set, batch_size=args.validation_batch_size or args.batch_size, num_workers=args.workers
    )
    return Data(splits, train_loader, val_loader, sampler, noisy)


# ---------------------------------------------------------------------- model
def adapt_to_small_inputs(model: nn.Module) -> str:
    """Make an ImageNet-shaped timm model fit 32×32 inputs; returns what was changed.

    * ResNet family (``conv1`` a strided 7×7 conv and a ``maxpool``): a 3×3 stride-1 stem and no
      max-pool, so stage 1 sees 32×32 rather than 8×8 (the usual CIFAR ResNet).
    * VGG (``pre_logits`` a 7×7 ``ConvMlp``): the 1×1 feature map would be pooled up to 7×7 and
      convolved by a 7×7 kernel, the same function class as a 1×1 kernel with 49× the
      parameters; it becomes a 1×1 ``ConvMlp`` of the same widths.
    """
    conv1 = getattr(model, "conv1", None)
    if isinstance(conv1, nn.Conv2d) and hasattr(model, "maxpool"):
        model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
        return "3x3 stride-1 stem, no max-pool"
    pre_logits = getattr(model, "pre_logits", None)
    if pre_logits is not None and type(pre_logits).__name__ == "ConvMlp" and hasattr(pre_logits, "fc1"):
        fc1, fc2 = pre_logits.fc1, pre_logits.fc2
        model.pre_logits = type(pre_logits)(
            fc1.in_channels,
            fc2.out_channels,
            1,
            mlp_ratio=fc1.out_channels / fc2.out_channels,
            drop_rate=pre_logits.drop.p,
        )
        return "1x1 head (ConvMlp) instead of 7x7"
    raise TrainError(
        f"--cifar-stem does not know how to adapt {type(model).__name__}; supported: timm ResNets with a plain "
        "conv1 stem, and VGGs"
    )


def create_model(args: argparse.Namespace, num_classes: int, in_chans: int = 3) -> tuple[nn.Module, str]:
    """The timm model (and what the small-input adaptation changed, or ``""``)."""
    import timm

    if not timm.is_model(args.model):
        close = timm.list_models(f"*{args.model}*")[:5]
        hint = f"; similar: {', '.join(close)}" if close else "; see timm.list_models()"
        raise TrainError(f"unknown model '{args.model}'{hint}")
    kwargs: dict[str, Any] = dict(args.model_kwargs or {})
    if args.drop_path is not None:
        kwargs["drop_path_rate"] = args.drop_path
    try:
        model = timm.create_model(
            args.model,
            pretrained=args.pretrained,
            num_classes=num_classes,
            drop_rate=args.drop,
            in_chans=in_chans,
            **kwargs,
        )
    except TypeError as exc:
        raise TrainError(f"model '{args.model}' rejected its arguments: {exc}") from None
    except (OSError, RuntimeError) as exc:
        if args.pretrained:
            raise TrainError(f"pretrained weights for '{args.model}' could not be loaded (offline?): {exc}") from None
        raise
    note = adapt_to_small_inputs(model) if args.cifar_stem else ""
    return model, note


def check_fsdp(args: argparse.Namespace) -> None:
    """``--fsdp`` needs torchrun and excludes what assumes whole parameters on every rank."""
    if not args.fsdp:
        return
    if not args.distributed:
        raise TrainError("--fsdp shards the model across processes: launch with torchrun --nproc_per_node=N")
    for flag, on in (("--sync-bn", args.sync_bn), ("--model-ema", args.model_ema)):
        if on:
            raise TrainError(f"{flag} is not supported with --fsdp (it needs whole parameters on every rank)")
    if args.on_alarm == "rollback" and args.rollback_average > 0:
        if "rollback_average" in set(getattr(args, "explicit", ())):
            raise TrainError(
                "--rollback-average is not supported with --fsdp (the average needs whole parameters on every "
                "rank): pass --rollback-average 0"
            )
        args.rollback_average = 0.0
        if args.rank == 0:
            print("  --fsdp: --rollback-average off (it needs whole parameters); a rollback restores the weights")
    if args.curv_strategy not in ("auto", "finite-difference"):
        raise TrainError(
            f"--curv-strategy {args.curv_strategy} cannot run a sharded model (no double backward "
            "through FSDP's sharded parameters): use auto or finite-difference"
        )


def place_model(args: argparse.Namespace, model: nn.Module, device: torch.device) -> tuple[nn.Module, nn.Module, Any]:
    """``(model on device, the module the loop trains (DDP-wrapped under torchrun), EMA or None)``; with ``--fsdp``
    both are the FSDP2-sharded model (:mod:`.sharding`)."""
    from timm.utils import ModelEmaV3

    if args.fsdp:
        from .sharding import shard_model

        model = shard_model(model.to(device))
        return model, model, None
    if args.distributed and args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    train_model: nn.Module = model
    if args.distributed:
        ids = [device.index if device.index is not None else args.local_rank] if device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model, train_model, model_ema


# ---------------------------------------------------------------------- loss, optimizer, schedule, precision
def build_loss(args: argparse.Namespace, num_classes: int) -> tuple[nn.Module, Any]:
    """The training loss and the Mixup/CutMix transform (``None`` when off), as timm pairs them."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if args.mixup > 0 or args.cutmix > 0:
        mixup_fn = Mixup(
            mixup_alpha=args.mixup,
            cutmix_alpha=args.cutmix,
            prob=args.mixup_prob,
            switch_prob=args.mixup_switch_prob,
            mode=args.mixup_mode,
            label_smoothing=args.smoothing,
            num_classes=num_classes,
        )
        return SoftTargetCrossEntropy(), mixup_fn
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing), None
    return nn.CrossEntropyLoss(), None


def build_optimizer(
    args: argparse.Namespace,
    model: nn.Module,
    train_model: nn.Module,
    loss_fn: nn.Module,
    sinks: list[Any],
    callbacks: list[Callable[[Any], None]],
) -> CurvatureAwareOptimizer:
    """timm's ``create_optimizer_v2``, then the curvature wrapper around it (timm only knows ``lookahead_``)."""
    from timm.optim import create_optimizer_v2

    opt_kwargs: dict[str, Any] = {}
    if args.opt_eps is not None:
        opt_kwargs["eps"] = args.opt_eps
    if args.opt_betas is not None:
        opt_kwargs["betas"] = tuple(args.opt_betas)
    try:
        base = create_optimizer_v2(
            model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum, **opt_kwargs
        )
    except (ValueError, AssertionError) as exc:
        raise TrainError(f"optimizer '{args.opt}': {exc}") from None
    monitor = CusumMonitor(record_from_args(args, MonitorConfig)) if args.cusum else None
    try:
        return CurvatureAwareOptimizer(
            base,
            train_model,
            loss_fn,
            config_from_args(args),
            monitor=monitor,
            lr_scaling=args.lr_scaling,
            logger=sinks,
            callbacks=callbacks,
        )
    except (ValueError, TypeError) as exc:
        raise TrainError(str(exc)) from None


def record_from_args(args: argparse.Namespace, record: type, **fixed: Any) -> Any:
    """A record (:class:`~curvopt.MonitorConfig`, ...) with every option that has a flag taken from its flag, and
    the ``fixed`` fields as given."""
    return record(**{f.name: getattr(args, flag_dest(meta["flag"])) for f, meta in flagged_options(record)}, **fixed)


def config_from_args(args: argparse.Namespace) -> CurvatureConfig:
    """The run's :class:`~curvopt.CurvatureConfig`: every option with a flag from its flag, the probe seed from
    ``--seed``."""
    return record_from_args(args, CurvatureConfig, seed=args.seed)


def build_scheduler(args: argparse.Namespace, opt: CurvatureAwareOptimizer, updates_per_epoch: int) -> tuple[Any, int]:
    """timm's ``create_scheduler_v2`` on the wrapper (it rewrites ``group['lr']`` of the shared groups)."""
    from timm.scheduler import create_scheduler_v2

    return create_scheduler_v2(
        opt,
        sched=args.sched,
        num_epochs=args.epochs,
        decay_epochs=args.decay_epochs,
        decay_milestones=args.decay_milestones,
        cooldown_epochs=args.cooldown_epochs,
        decay_rate=args.decay_rate,
        min_lr=args.min_lr,
        warmup_lr=args.warmup_lr,
        warmup_epochs=args.warmup_epochs,
        step_on_epochs=not args.sched_on_updates,
        updates_per_epoch=updates_per_epoch,
    )


def choose_cadence(args: argparse.Namespace, updates_per_epoch: int, start_epoch: int = 0) -> str:
    """Set ``args.curv_every`` when nobody chose it, and return the line that says what this run will measure
    (:mod:`curvopt.control.cadence`: the rule the framework callbacks follow too)."""
    updates = updates_per_epoch * max(args.epochs - start_epoch, 0)
    plan = plan_cadence(updates, args.curv_every, args.cusum_warmup + 1 if args.cusum else None)
    args.curv_every = plan.every
    return describe_cadence(plan, "--curv-every", unit=("update", "updates"))


def updates_per_epoch(args: argparse.Namespace, train_loader: torch.utils.data.DataLoader) -> int:
    return math.ceil(len(train_loader) / args.grad_accum_steps)


def build_precision(args: argparse.Namespace, device: torch.device) -> tuple[Callable[[], Any], Any]:
    """``(autocast context factory, loss scaler or None)``: fp16 gets timm's ``NativeScaler``, bf16 none."""
    from timm.utils import NativeScaler

    if not args.amp:
        return nullcontext, None
    amp_dtype = torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=amp_dtype)

    scaler = NativeScaler(device=device.type) if amp_dtype == torch.float16 else None
    return autocast, scaler
