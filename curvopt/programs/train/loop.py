"""One epoch of ``curvopt train`` and one validation pass, DDP-aware.

:func:`train_one_epoch` runs the micro-batches of an epoch: autocast, Mixup/CutMix, gradient
accumulation (DDP ``no_sync`` inside a window), the curvature batch handed to the wrapper through
``observe`` (timm's ``NativeScaler`` calls a bare ``step()``), a collective skip of non-finite
losses that restores the BatchNorm buffers the bad forward touched, EMA and the per-update
scheduler. :func:`evaluate` computes validation loss and top-1 over disjoint per-rank shards.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm import tqdm


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 in percent; soft (Mixup) targets count their arg-max class."""
    hard = targets.argmax(-1) if targets.ndim == 2 else targets
    return float((logits.argmax(-1) == hard).float().mean()) * 100.0


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


def rank_shard(dataset: Any, rank: int, world_size: int) -> Any:
    """Samples rank, rank + W, rank + 2W, ...: the shards cover the set exactly once (no padding,
    unlike ``DistributedSampler``), so all-reduced validation sums are those of the whole set."""
    return torch.utils.data.Subset(dataset, range(rank, len(dataset), world_size))


def finite_on_every_rank(loss: torch.Tensor, distributed: bool) -> bool:
    """Whether the loss is finite here and, under DDP, on every rank.

    A rank that skipped its backward while the others ran theirs would leave DDP's gradient
    all-reduce waiting for it forever, so the ranks decide together: one one-element all-reduce
    (MIN) per batch.
    """
    flag = torch.isfinite(loss.detach()).all().to(torch.int32).reshape(1)
    if distributed:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Any, device: torch.device, autocast: Any, distributed: bool = False
) -> dict[str, float]:
    """Validation loss and top-1 (model in eval mode for the pass, its mode restored after).

    Under DDP each rank evaluates its own shard (:func:`rank_shard`) and the sums
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


@dataclass
class EpochResult:
    """What one epoch's training pass reports."""

    loss: float  # mean training loss over the batches that were not skipped
    acc: float  # mean batch top-1 (%)
    updates: int  # optimizer updates so far (the running count after this epoch)
    skipped: int  # batches skipped for a non-finite loss in this epoch


@dataclass
class EpochContext:
    """Everything one epoch needs (built once by the run's set-up)."""

    args: Any
    model: nn.Module
    train_model: nn.Module
    model_ema: Any
    opt: Any
    scheduler: Any
    loss_fn: nn.Module
    mixup_fn: Any
    autocast: Callable[[], Any]
    loss_scaler: Any
    device: torch.device
    buffers: BufferCheckpoint
    log_training: Callable[[int, dict[str, float]], None]
    show_progress: bool
    num_epochs: int = 0
    should_stop: Callable[[], bool] = lambda: False  # after every update, on every rank: new alarms, --on-alarm
    on_lr: Callable[[int, float], None] = lambda step, lr: None  # the LR after every update (restart detection)


def train_one_epoch(ctx: EpochContext, loader: Any, epoch: int, num_updates: int) -> EpochResult:
    """One pass over ``loader``; returns the epoch's means and the running update count."""
    args, opt = ctx.args, ctx.opt
    ctx.model.train()
    loss_sum = acc_sum = 0.0
    batches = skipped = 0
    bar = tqdm(
        loader,
        desc=f"epoch {epoch + 1}/{ctx.num_epochs}",
        unit="batch",
        leave=False,
        dynamic_ncols=True,
        disable=not ctx.show_progress,
    )
    last_index = len(loader) - 1
    opt.zero_grad()
    for batch_idx, (x, y) in enumerate(bar):
        update = (batch_idx + 1) % args.grad_accum_steps == 0 or batch_idx == last_index
        x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
        if ctx.mixup_fn is not None:
            x, y = ctx.mixup_fn(x, y)
        step = _micro_batch(ctx, x, y, update, epoch, batch_idx)
        if step is None:
            skipped += 1
            continue
        loss_value, batch_acc = step
        loss_sum += loss_value
        acc_sum += batch_acc
        batches += 1
        if not update:
            continue
        num_updates = _after_update(ctx, num_updates, epoch, loss_value, batch_acc)
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{opt.param_groups[0]['lr']:.3g}", alarms=len(opt.alarms))
        if ctx.should_stop():
            break
    bar.close()
    return EpochResult(loss_sum / max(batches, 1), acc_sum / max(batches, 1), num_updates, skipped)


def _micro_batch(
    ctx: EpochContext, x: torch.Tensor, y: torch.Tensor, update: bool, epoch: int, batch_idx: int
) -> tuple[float, float] | None:
    """Forward, backward and (on the last micro-batch of a window) the optimizer step.

    Returns (loss, batch accuracy), or ``None`` when the loss was not finite on some rank: the
    batch is skipped with the gradients accumulated so far, and the BN buffers are restored.
    """
    args, opt = ctx.args, ctx.opt
    # DDP all-reduces (FSDP reduce-scatters) gradients only on the micro-batch that ends an accumulation window
    no_sync = nullcontext()
    if getattr(args, "fsdp", False):
        ctx.train_model.set_requires_gradient_sync(update)
    elif args.distributed and not update:
        no_sync = ctx.train_model.no_sync()
    with no_sync:
        ctx.buffers.save()
        with ctx.autocast():
            logits = ctx.train_model(x)
            loss = ctx.loss_fn(logits, y)
        if not finite_on_every_rank(loss, args.distributed):
            message = (
                f"curvopt train: non-finite loss at epoch {epoch} batch {batch_idx}; "
                "batch skipped (with the gradients accumulated so far)"
            )
            warnings.warn(message, RuntimeWarning, stacklevel=1)
            ctx.buffers.restore()  # BN running statistics saw the bad batch in the forward
            opt.zero_grad()
            return None
        scaled_loss = loss / args.grad_accum_steps
        if update:
            opt.observe(x, y)  # the curvature batch (a bare step() follows, e.g. from NativeScaler)
        if ctx.loss_scaler is not None:
            ctx.loss_scaler(
                scaled_loss, opt, clip_grad=args.clip_grad, parameters=ctx.model.parameters(), need_update=update
            )
        else:
            scaled_loss.backward()
            if update:
                if args.clip_grad is not None:
                    nn.utils.clip_grad_norm_(ctx.model.parameters(), args.clip_grad)
                opt.step()
    return float(loss.detach()), accuracy(logits.detach(), y)


def _after_update(ctx: EpochContext, num_updates: int, epoch: int, loss_value: float, batch_acc: float) -> int:
    """Zero the gradients, update EMA and the per-update schedule, log training metrics."""
    opt = ctx.opt
    opt.zero_grad()
    num_updates += 1
    if ctx.model_ema is not None:
        ctx.model_ema.update(ctx.model, step=num_updates)
    ctx.scheduler.step_update(num_updates=num_updates)
    ctx.on_lr(num_updates, opt.param_groups[0]["lr"])
    if num_updates % ctx.args.log_interval == 0:
        ctx.log_training(
            num_updates,
            {"train/loss": loss_value, "train/acc": batch_acc, "train/lr": opt.param_groups[0]["lr"], "epoch": epoch},
        )
    return num_updates
