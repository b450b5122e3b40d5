"""``curvopt train``: a timm training script with the curvature-aware optimizer.

Built from timm's own parts, in timm ``train.py``'s order: ``create_model`` →
``create_optimizer_v2`` → :class:`CurvatureAwareOptimizer` (wrapped *after* creation: timm's
factory only knows its own ``lookahead_`` prefix) → ``create_scheduler_v2`` (it rewrites
``group['lr']`` of the shared groups) → ``Mixup``/CutMix with ``SoftTargetCrossEntropy``, label
smoothing, AMP with ``NativeScaler`` (which calls a bare ``optimizer.step()``, so the batch
reaches the wrapper through ``observe``), model EMA, gradient accumulation, checkpoints and resume.

The run directory holds ``curvature.jsonl`` (curvature metrics, alarms, training and validation
metrics: what ``curvopt report`` reads), ``last.pth.tar`` / ``model_best.pth.tar``, ``args.yaml``
and, with ``--log-wandb``, the W&B run under ``wandb/``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
import warnings
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm import tqdm

from ...control.monitor import CusumMonitor
from ...control.optimizer import CurvatureAwareOptimizer
from ...reporting.loggers import JsonlLogger
from ...reporting.tables import format_table
from ...reporting.wandb_logger import WandbLogger
from ..data import DataSplits, NoisyLabels, build_datasets

CHECKPOINT = "last.pth.tar"
BEST = "model_best.pth.tar"


class TrainError(RuntimeError):
    """A setup problem reported as one line (unknown model, bad argument, unreadable checkpoint)."""


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
            fc1.in_channels, fc2.out_channels, 1, mlp_ratio=fc1.out_channels / fc2.out_channels,
            drop_rate=pre_logits.drop.p,
        )  # fmt: skip
        return "1x1 head (ConvMlp) instead of 7x7"
    raise TrainError(
        f"--cifar-stem does not know how to adapt {type(model).__name__}; supported: timm ResNets with a plain "
        "conv1 stem, and VGGs"
    )


def create_model(args: argparse.Namespace, num_classes: int) -> tuple[nn.Module, str]:
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
            args.model, pretrained=args.pretrained, num_classes=num_classes, drop_rate=args.drop, **kwargs
        )
    except TypeError as exc:
        raise TrainError(f"model '{args.model}' rejected its arguments: {exc}") from None
    except (OSError, RuntimeError) as exc:
        if args.pretrained:
            raise TrainError(f"pretrained weights for '{args.model}' could not be loaded (offline?): {exc}") from None
        raise
    note = adapt_to_small_inputs(model) if args.cifar_stem else ""
    return model, note


# ---------------------------------------------------------------------- helpers
def _device(args: argparse.Namespace) -> torch.device:
    """The device, after joining the process group when launched by torchrun (timm's own helper).

    Sets ``args.distributed``, ``args.rank``, ``args.world_size``, ``args.local_rank``.
    """
    from timm.utils import init_distributed_device

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {args.device}: CUDA is not available on this machine")
    return init_distributed_device(args)


def _check_args(args: argparse.Namespace) -> None:
    positive = {"epochs": args.epochs, "batch_size": args.batch_size, "grad_accum_steps": args.grad_accum_steps,
                "log_interval": args.log_interval, "curv_batch_size": args.curv_batch_size}  # fmt: skip
    for name, value in positive.items():
        if value < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.curv_every < 0:
        raise TrainError(f"--curv-every must be >= 0, got {args.curv_every}")
    if not 0.0 <= args.label_noise <= 1.0:
        raise TrainError(f"--label-noise must be in [0, 1], got {args.label_noise}")
    if args.lr <= 0:
        raise TrainError(f"--lr must be > 0, got {args.lr}")


def _run_dir(args: argparse.Namespace) -> Path:
    if args.experiment:
        return Path(args.output) / args.experiment
    if args.resume:
        return Path(args.resume).resolve().parent
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(args.output) / f"{args.dataset.replace('/', '_')}-{args.model}-{stamp}"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write to a temporary file and rename: an interruption never leaves a torn checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise TrainError(f"--resume {path}: no such checkpoint") from None
    except Exception as exc:
        raise TrainError(f"--resume {path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None


def _accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    hard = targets.argmax(-1) if targets.ndim == 2 else targets
    return float((logits.argmax(-1) == hard).float().mean()) * 100.0


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Any, device: torch.device, autocast: Any, distributed: bool = False
) -> dict[str, float]:
    """Validation loss and top-1 (model in eval mode for the pass, its mode restored after).

    Under DDP each rank evaluates its own shard (:func:`_rank_shard`) and the sums
    (Σ loss, Σ correct, n) are all-reduced, so every rank gets the metrics of the whole set.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, correct, count
    try:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            with autocast():
                logits = model(x)
            sums[0] += nn.functional.cross_entropy(logits.float(), y, reduction="sum").double()
            sums[1] += (logits.argmax(-1) == y).sum()
            sums[2] += len(y)
    finally:
        model.train(was_training)
    if distributed:
        torch.distributed.all_reduce(sums)
    loss_sum, correct, count = sums.tolist()
    return {"loss": loss_sum / max(count, 1), "top1": 100.0 * correct / max(count, 1)}


class BufferCheckpoint:
    """The model's buffers as they were before the current batch's forward.

    BatchNorm updates ``running_mean``/``running_var`` inside the forward, before the loss is
    known: a batch with a non-finite loss has already written NaN into them. Skipping such a
    batch therefore restores the buffers too (:meth:`restore`), so a NaN batch leaves the model
    exactly as it was. :meth:`save` is one in-place copy per buffer (a few thousand floats for a
    ResNet-18), made before every training forward.
    """

    def __init__(self, model: nn.Module) -> None:
        self.buffers = list(model.buffers())
        self.saved = [b.detach().clone() for b in self.buffers]

    @torch.no_grad()
    def save(self) -> None:
        for saved, buffer in zip(self.saved, self.buffers, strict=True):
            saved.copy_(buffer, non_blocking=True)

    @torch.no_grad()
    def restore(self) -> None:
        for saved, buffer in zip(self.saved, self.buffers, strict=True):
            buffer.copy_(saved, non_blocking=True)


def _rank_shard(dataset: Any, rank: int, world_size: int) -> Any:
    """Samples rank, rank + W, rank + 2W, ...: the shards cover the set exactly once (no padding,
    unlike ``DistributedSampler``), so all-reduced validation sums are those of the whole set."""
    return torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))


def _finite_on_every_rank(loss: torch.Tensor, distributed: bool) -> bool:
    """Whether the loss is finite here and, under DDP, on every rank.

    A rank that skipped its backward while the others ran theirs would leave DDP's gradient
    all-reduce waiting for it forever, so the ranks decide together: one one-element all-reduce
    (MIN) per batch.
    """
    flag = torch.isfinite(loss.detach()).all().to(torch.int32).reshape(1)
    if distributed:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def _silent(*args: Any, **kwargs: Any) -> None:
    """``print`` on ranks other than 0."""


# ---------------------------------------------------------------------- the run
def run_training(args: argparse.Namespace) -> int:
    """Train as ``args`` says; returns 0 on success. Setup errors raise :class:`TrainError`."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3, NativeScaler

    _check_args(args)
    device = _device(args)
    main_process = args.rank == 0
    say = print if main_process else _silent
    torch.manual_seed(args.seed)  # the same initial model on every rank (DDP also broadcasts rank 0's)
    resume = load_checkpoint(args.resume) if args.resume else None

    try:
        splits: DataSplits = build_datasets(
            args.dataset, data_dir=args.data_dir, download=args.dataset_download, hflip=args.hflip,
            crop_padding=args.crop_padding, synthetic_samples=args.synthetic_samples, img_size=args.img_size,
            num_classes=args.num_classes, seed=args.seed,
        )  # fmt: skip
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    train_set: Any = splits.train
    noisy: NoisyLabels | None = None
    if args.label_noise > 0:
        noisy = NoisyLabels(train_set, args.label_noise, splits.num_classes, seed=args.seed + 1,
                            active=args.label_noise_start_epoch <= 0)  # fmt: skip
        train_set = noisy
    loader_gen = torch.Generator().manual_seed(args.seed)
    sampler = None
    if args.distributed:
        sampler = torch.utils.data.distributed.DistributedSampler(train_set, seed=args.seed, drop_last=True)
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True,
        num_workers=args.workers, generator=loader_gen, pin_memory=device.type == "cuda",
    )  # fmt: skip
    if len(train_loader) == 0:
        raise TrainError(f"the training set ({len(train_set)} samples) is smaller than one batch ({args.batch_size})")
    val_set = _rank_shard(splits.val, args.rank, args.world_size) if args.distributed else splits.val
    val_loader = torch.utils.data.DataLoader(
        val_set, batch_size=args.validation_batch_size or args.batch_size, num_workers=args.workers
    )

    model, stem_note = create_model(args, splits.num_classes)
    if args.distributed and args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    model_ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    train_model: nn.Module = model
    if args.distributed:
        ids = [device.index if device.index is not None else args.local_rank] if device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)

    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                         switch_prob=args.mixup_switch_prob, mode=args.mixup_mode, label_smoothing=args.smoothing,
                         num_classes=splits.num_classes)  # fmt: skip
        train_loss_fn: nn.Module = SoftTargetCrossEntropy()
    elif args.smoothing > 0:
        train_loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        train_loss_fn = nn.CrossEntropyLoss()

    opt_kwargs: dict[str, Any] = {}
    if args.opt_eps is not None:
        opt_kwargs["eps"] = args.opt_eps
    if args.opt_betas is not None:
        opt_kwargs["betas"] = tuple(args.opt_betas)
    try:
        base = create_optimizer_v2(model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay,
                                   momentum=args.momentum, **opt_kwargs)  # fmt: skip
    except (ValueError, AssertionError) as exc:
        raise TrainError(f"optimizer '{args.opt}': {exc}") from None

    run_dir = _run_dir(args)
    jsonl: JsonlLogger | None = None
    wandb_logger = None
    if main_process:  # only rank 0 writes logs and checkpoints
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "args.yaml").write_text(yaml.safe_dump(vars(args), sort_keys=True), encoding="utf-8")
        jsonl = JsonlLogger(run_dir / "curvature.jsonl")
    if main_process and args.log_wandb:
        wandb_logger = WandbLogger(
            project=args.wandb_project, name=run_dir.name, dir=str(run_dir), config=vars(args),
            tags=list(args.wandb_tags) or None, id=(resume or {}).get("wandb_id"), resume="allow",
        )  # fmt: skip
    sinks: list[Any] = [s for s in (jsonl, wandb_logger) if s is not None]

    def announce(alarm: Any) -> None:
        tqdm.write(f"ALARM: {alarm.describe()}")

    monitor = None
    if args.cusum:
        monitor = CusumMonitor(h=args.cusum_threshold, k=args.cusum_k, warmup=args.cusum_warmup)
    try:
        opt = CurvatureAwareOptimizer(
            base, train_model, train_loss_fn, every=args.curv_every, probes=args.curv_probes,
            curvature_batch_size=args.curv_batch_size, gn=args.curv_gn, monitor=monitor,
            lr_scaling=args.lr_scaling, logger=sinks, callbacks=[announce], seed=args.seed,
            distributed_probes=args.curv_dist_probes, inter_every=args.curv_inter_every,
        )  # fmt: skip
    except (ValueError, TypeError) as exc:
        raise TrainError(str(exc)) from None

    updates_per_epoch = math.ceil(len(train_loader) / args.grad_accum_steps)
    scheduler, num_epochs = create_scheduler_v2(
        opt, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
        decay_milestones=args.decay_milestones, cooldown_epochs=args.cooldown_epochs, decay_rate=args.decay_rate,
        min_lr=args.min_lr, warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs,
        step_on_epochs=not args.sched_on_updates, updates_per_epoch=updates_per_epoch,
    )  # fmt: skip

    amp_dtype = torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16
    if args.amp:

        def autocast() -> Any:
            return torch.autocast(device.type, dtype=amp_dtype)
    else:
        autocast = nullcontext
    loss_scaler = NativeScaler(device=device.type) if args.amp and amp_dtype == torch.float16 else None

    start_epoch, num_updates, best_top1 = 0, 0, -math.inf
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        if model_ema is not None and resume.get("model_ema") is not None:
            model_ema.load_state_dict(resume["model_ema"])
        if loss_scaler is not None and resume.get("scaler") is not None:
            loss_scaler.load_state_dict(resume["scaler"])
        start_epoch = int(resume["epoch"]) + 1
        num_updates = int(resume["num_updates"])
        best_top1 = float(resume.get("best_top1", -math.inf))
        if start_epoch > 0:
            if args.sched_on_updates:
                scheduler.step_update(num_updates)
            else:
                scheduler.step(start_epoch)

    ranks = f" x {args.world_size} ranks (DDP)" if args.distributed else ""
    say(f"curvopt train: {args.model} on {args.dataset} ({len(splits.train)} train / {len(splits.val)} val, "
        f"{splits.num_classes} classes) on {device}{ranks}; run dir {run_dir}")  # fmt: skip
    if stem_note:
        say(f"  small-input adaptation: {stem_note}")
    say(f"  {opt!r}; {len(opt.layer_blocks)} layers; {updates_per_epoch} updates/epoch, {num_epochs} epochs"
          + (f"; resuming at epoch {start_epoch}, update {num_updates}" if resume else ""))  # fmt: skip
    if noisy is not None:
        say(f"  label noise p={args.label_noise} from epoch {args.label_noise_start_epoch}")
    if wandb_logger is not None:
        wandb_logger.update_config({"run_dir": str(run_dir)})

    skipped_batches = 0
    buffers = BufferCheckpoint(model)
    last_epoch_stats: dict[str, float] = {}
    curvopt_log = logging.getLogger("curvopt")
    log_level = curvopt_log.level
    curvopt_log.setLevel(logging.ERROR)  # alarms are printed by `announce`, other problems arrive as warnings
    quiet = ExitStack()
    quiet.enter_context(warnings.catch_warnings())
    warnings.filterwarnings("ignore", message="curvopt: memorisation alarm", category=RuntimeWarning)
    finished = False
    try:
        for epoch in range(start_epoch, num_epochs):
            if sampler is not None:
                sampler.set_epoch(epoch)
            if noisy is not None:
                noisy.active = epoch >= args.label_noise_start_epoch
            if mixup_fn is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
                mixup_fn.mixup_enabled = False
            epoch_start = time.perf_counter()
            model.train()
            loss_sum = acc_sum = 0.0
            batches = 0
            bar = tqdm(train_loader, desc=f"epoch {epoch}", unit="batch", leave=False, dynamic_ncols=True,
                       disable=args.no_progress or not main_process)  # fmt: skip
            last_index = len(train_loader) - 1
            opt.zero_grad()
            for batch_idx, (x, y) in enumerate(bar):
                update = (batch_idx + 1) % args.grad_accum_steps == 0 or batch_idx == last_index
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if mixup_fn is not None:
                    x, y = mixup_fn(x, y)
                # DDP all-reduces gradients only on the micro-batch that ends an accumulation window
                no_sync = train_model.no_sync() if args.distributed and not update else nullcontext()
                with no_sync:
                    buffers.save()
                    with autocast():
                        logits = train_model(x)
                        loss = train_loss_fn(logits, y)
                    if not _finite_on_every_rank(loss, args.distributed):
                        skipped_batches += 1
                        warnings.warn(f"curvopt train: non-finite loss at epoch {epoch} batch {batch_idx}; "
                                      "batch skipped (with the gradients accumulated so far)",
                                      RuntimeWarning, stacklevel=1)  # fmt: skip
                        buffers.restore()  # BN running statistics saw the bad batch in the forward
                        opt.zero_grad()
                        continue
                    scaled_loss = loss / args.grad_accum_steps
                    if update:
                        opt.observe(x, y)  # the curvature batch (a bare step() follows, e.g. from NativeScaler)
                    if loss_scaler is not None:
                        loss_scaler(scaled_loss, opt, clip_grad=args.clip_grad, parameters=model.parameters(),
                                    need_update=update)  # fmt: skip
                    else:
                        scaled_loss.backward()
                        if update:
                            if args.clip_grad is not None:
                                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
                            opt.step()
                loss_value = float(loss.detach())
                batch_acc = _accuracy(logits.detach(), y)
                loss_sum += loss_value
                acc_sum += batch_acc
                batches += 1
                if not update:
                    continue
                opt.zero_grad()
                num_updates += 1
                if model_ema is not None:
                    model_ema.update(model, step=num_updates)
                scheduler.step_update(num_updates=num_updates)
                if num_updates % args.log_interval == 0:
                    row = {"train/loss": loss_value, "train/acc": batch_acc,
                           "train/lr": opt.param_groups[0]["lr"], "epoch": epoch}  # fmt: skip
                    for sink in sinks:
                        sink.log_training(num_updates, row)
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{opt.param_groups[0]['lr']:.3g}",
                                alarms=len(opt.alarms))  # fmt: skip
            bar.close()
            val = evaluate(model, val_loader, device, autocast, args.distributed)
            stats = {"eval/loss": val["loss"], "eval/top1": val["top1"], "step": num_updates,
                     "train/loss_epoch": loss_sum / max(batches, 1), "train/acc_epoch": acc_sum / max(batches, 1),
                     "train/lr": opt.param_groups[0]["lr"]}  # fmt: skip
            if model_ema is not None:
                ema_val = evaluate(model_ema.module, val_loader, device, autocast, args.distributed)
                stats["eval/top1_ema"] = ema_val["top1"]
            scheduler.step(epoch + 1, val["top1"])
            best = val["top1"] > best_top1
            best_top1 = max(best_top1, val["top1"])
            state = {
                "epoch": epoch, "num_updates": num_updates, "arch": args.model, "args": vars(args),
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "model_ema": model_ema.state_dict() if model_ema is not None else None,
                "scaler": loss_scaler.state_dict() if loss_scaler is not None else None,
                "best_top1": best_top1, "wandb_id": getattr(getattr(wandb_logger, "run", None), "id", None),
            }  # fmt: skip
            if main_process:
                save_checkpoint(run_dir / CHECKPOINT, state)
                if best:
                    save_checkpoint(run_dir / BEST, state)
            for sink in sinks:
                sink.log_epoch(epoch, stats)
            last_epoch_stats = stats
            elapsed = time.perf_counter() - epoch_start
            curv = opt.last_estimate
            curv_text = f"tr H {curv.total_trace:.3g}" if curv is not None else "no estimate yet"
            say(f"epoch {epoch:>3}/{num_epochs - 1}  train loss {stats['train/loss_epoch']:.4f} "
                  f"acc {stats['train/acc_epoch']:5.1f}%  val loss {val['loss']:.4f} top1 {val['top1']:5.1f}%  "
                  f"lr {stats['train/lr']:.3g}  {curv_text}  alarms {len(opt.alarms)}  {elapsed:.1f}s")  # fmt: skip
        finished = True
    finally:
        quiet.close()
        curvopt_log.setLevel(log_level)
        if jsonl is not None:
            jsonl.close()
        if wandb_logger is not None:
            wandb_logger.finish()
        if args.distributed and torch.distributed.is_initialized():
            if finished:  # every rank is here: no rank tears the group down while a peer still uses it
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    if skipped_batches:
        say(f"{skipped_batches} batch(es) with a non-finite loss were skipped")
    if opt.last_estimate is not None:
        say("\nlast curvature estimate, per layer:")
        say(format_table(opt.last_estimate, opt.lr_scales if args.lr_scaling else None, opt.monitor))
    for alarm in opt.alarms:
        say(f"alarm: {alarm.describe()}")
    if not opt.alarms and opt.monitor is not None:
        say("no memorisation alarm")
    say(f"\nrun dir:     {run_dir}\ncheckpoint:  {run_dir / CHECKPOINT}\nJSONL log:   {run_dir / 'curvature.jsonl'}")
    if wandb_logger is not None and wandb_logger.local_dir is not None:
        say(f"W&B run:     {wandb_logger.local_dir}")
    say(f"report:      curvopt report {run_dir}")
    if last_epoch_stats:
        say(f"final val top1 {last_epoch_stats['eval/top1']:.2f}%")
    return 0
