"""Batches and model calls: what a curvature batch is, checked where it is handed over.

A batch is a pair ``(inputs, targets)``. ``inputs`` is whatever the model takes: a tensor, a tuple
or list of tensors, or a dict of tensors (Hugging Face style). The model is called as
``model(inputs)``, or as ``forward(model, inputs)`` when a ``forward`` callable is given (e.g.
``lambda m, batch: m(**batch).logits``). Every tensor in ``inputs`` and ``targets`` carries the
samples along dimension 0, so a curvature sub-batch is the first N rows of each.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

Forward = Callable[[nn.Module, Any], torch.Tensor]
"""``forward(model, inputs) -> outputs``: how the model is called on a batch's inputs."""


class CurvatureInputError(ValueError):
    """The model, loss or batch cannot be probed as given (a configuration mistake, not bad luck)."""


def describe(obj: object) -> str:
    """A short description of a batch element for error messages."""
    if isinstance(obj, torch.Tensor):
        return f"tensor of shape {tuple(obj.shape)}, dtype {obj.dtype}"
    if isinstance(obj, Mapping):
        return "dict with keys " + ", ".join(repr(k) for k in list(obj)[:6])
    if isinstance(obj, (tuple, list)):
        return f"{type(obj).__name__} of {len(obj)}: " + ", ".join(describe(o) for o in obj[:4])
    return type(obj).__name__


def split_batch(batch: object) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch, or a :class:`CurvatureInputError` that names what was given.

    Only a tuple or list of exactly two elements is a batch: a tensor (which would unpack into its
    rows) and a dict (which would unpack into its keys) are rejected.
    """
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise CurvatureInputError(
            f"a curvature batch must be a pair (inputs, targets), got {describe(batch)}; pass "
            "step(batch=(x, y)) or observe(x, y) (for dict inputs: batch=(inputs_dict, targets))"
        )
    return batch[0], batch[1]


def slice_batch(obj: Any, n: int) -> Any:
    """The first ``n`` samples of every tensor in a (nested) tuple, list or dict; other values as they are."""
    if isinstance(obj, torch.Tensor):
        return obj[:n] if obj.ndim else obj
    if isinstance(obj, Mapping):  # a plain dict also for mapping types (a BatchEncoding): `**` unpacks either
        return {k: slice_batch(v, n) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(slice_batch(v, n) for v in obj)
    return obj


def batch_size(inputs: Any) -> int:
    """Samples in ``inputs``: dimension 0 of its first tensor (0 when there is none)."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0]) if inputs.ndim else 0
    values = inputs.values() if isinstance(inputs, Mapping) else inputs if isinstance(inputs, (tuple, list)) else ()
    for value in values:
        size = batch_size(value)
        if size:
            return size
    return 0


def call_model(model: nn.Module, inputs: Any, forward: Forward | None) -> torch.Tensor:
    """``forward(model, inputs)`` (default ``model(inputs)``); a failure names the inputs it got."""
    try:
        out = model(inputs) if forward is None else forward(model, inputs)
    except Exception as exc:  # the model cannot take the batch: say so, keep the cause
        if forward is None and isinstance(inputs, Mapping):  # the usual mistake: one line, no chained traceback
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CurvatureInputError(
                f"{type(model).__name__} was called as model(inputs) with a dict of inputs ({describe(inputs)}) and "
                f"failed ({type(exc).__name__}: {reason}); a model that takes keyword arguments needs "
                "forward=lambda m, x: m(**x) (with .logits if it returns an output object)"
            ) from None
        raise CurvatureInputError(
            f"{type(model).__name__} failed on the curvature batch inputs ({describe(inputs)}): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(out, torch.Tensor):
        raise CurvatureInputError(
            f"the model returned {type(out).__name__}, not a tensor; pass forward=lambda model, x: ... that "
            "returns the output tensor the loss takes (e.g. model(**x).logits)"
        )
    return out


def call_loss(loss_fn: Callable[[torch.Tensor, Any], torch.Tensor], out: torch.Tensor, targets: Any) -> torch.Tensor:
    """``loss_fn(out, targets)`` checked to be a finite scalar; a loss that cannot take them says so."""
    try:
        loss = loss_fn(out, targets)
    except Exception as exc:
        hint = ""
        if (
            isinstance(loss_fn, nn.CrossEntropyLoss)
            and out.ndim == 3
            and isinstance(targets, torch.Tensor)
            and targets.shape == out.shape[:2]
        ):
            hint = (
                "; for logits [B, T, V] (a language model) use loss_fn=curvopt.CausalLMLoss(shift=False) (or "
                "CausalLMLoss() for Hugging Face labels), which takes them as they come"
            )
        raise CurvatureInputError(
            f"loss_fn failed on the model outputs ({describe(out)}) and targets ({describe(targets)}): "
            f"{type(exc).__name__}: {exc}{hint}"
        ) from exc
    if not isinstance(loss, torch.Tensor):
        raise CurvatureInputError(f"loss_fn must return a tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise CurvatureInputError(
            f"loss_fn must return a scalar, got shape {tuple(loss.shape)} (use reduction='mean' or 'sum')"
        )
    return loss.reshape(())


def check_finite_loss(value: float) -> None:
    """Curvature of a non-finite loss is undefined: raise ``FloatingPointError`` naming the value."""
    if value != value or value in (float("inf"), float("-inf")):
        raise FloatingPointError(
            f"the loss on the curvature batch is {value}: curvature of a non-finite loss is undefined"
        )


def move_to(obj: Any, device: torch.device) -> Any:
    """``obj`` (a tensor, or a dict, tuple or list of them, nested) with every tensor on ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: move_to(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(move_to(v, device) for v in obj)
    return obj
