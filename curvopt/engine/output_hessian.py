r"""v ↦ H_out v: the Hessian of the loss with respect to the network outputs, at fixed outputs.

The Gauss-Newton product is G z = Jᵀ H_out J z. H_out is applied in closed form where one exists
(cheap, no graph), and otherwise by reverse-over-reverse differentiation at the outputs,
v ↦ ∂/∂o ⟨∇_o ℓ(o, y), v⟩, which needs only reverse mode: losses whose backward has no forward-mode
rule in torch (``huber_loss``, ``mse_loss`` under ``jvp``) work like any other. All forms work on
a batch of stacked vectors under ``vmap``.

Closed forms, per sample i (rows of o, p_i = softmax(o_i)), n the reduction's divisor:

* **cross-entropy** on ``[B, C]`` logits with target distribution a_i (one-hot, smoothed, soft,
  class-weighted): ℓ_i = −Σ_c a_ic log p_ic, so H_i = s_i (diag p_i − p_i p_iᵀ) with the row sum
  s_i = Σ_c a_ic. Hard targets: a_ic = (1−ε) w_{y_i} [c = y_i] + (ε/C) w_c and n = Σ_i w_{y_i} over
  non-ignored rows (rows with ``ignore_index`` contribute 0); probability targets t_i:
  a_ic = w_c ((1−ε) t_ic + ε/C) and n = B. Rows of t need not sum to 1 (multi-label or
  unnormalised targets): s_i carries their sum. timm's ``SoftTargetCrossEntropy`` (s_i = Σ_c t_ic)
  and ``LabelSmoothingCrossEntropy`` (s_i = 1) likewise.
* **MSE**: H_out = (2/n) I, n = number of elements (mean) or 1 (sum).
* **BCE with logits**: diagonal, σ(o)(1 − σ(o)) · w · (p_w t + 1 − t) / n, p_w the ``pos_weight``.
* **Zero**: ``NLLLoss``, ``KLDivLoss`` and ``L1Loss`` are (piecewise) linear in their input, so
  H_out = 0 and the Gauss-Newton part vanishes identically (:attr:`OutputHessian.is_zero`).
* **causal LM** (:class:`~curvopt.engine.losses.CausalLMLoss`, logits ``[B, T, V]``): per position,
  w_{b,t} (diag p − p pᵀ) with w = 1/n on the n positions in the loss; applied :data:`CHUNK_ELEMENTS`
  logits at a time with p recomputed from the logits, so no ``[B, T, V]`` probability tensor is kept.

A model whose output is a single number (``forward=lambda m, x: m(**x).loss`` with an identity loss) has
no output Hessian to split off: the Gauss-Newton part of such a "loss as output" would be 0 by
construction and the GN-Gap infinite, so it is refused with the fix (:class:`CurvatureInputError`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import grad, vjp

from .batch import CurvatureInputError
from .losses import CausalLMLoss

CHUNK_ELEMENTS = 2**22
"""Logits per chunk of the causal-LM closed form (16 MB in fp32): at V = 50,257, 83 positions at a time."""

_TIMM_SOFT_CE = "SoftTargetCrossEntropy"
_TIMM_SMOOTH_CE = "LabelSmoothingCrossEntropy"
ZERO_HESSIAN_LOSSES = (nn.NLLLoss, nn.KLDivLoss, nn.L1Loss)


def _divisor(reduction: str, mean_divisor: torch.Tensor | float) -> torch.Tensor | float | None:
    if reduction == "mean":
        return mean_divisor
    if reduction == "sum":
        return 1.0
    return None  # reduction="none": not a scalar loss, rejected before this point


def _cross_entropy_row_weights(loss_fn: Callable, out: torch.Tensor, targets: Any) -> torch.Tensor | None:
    """s_i / n per row for the cross-entropy family, or ``None`` when the closed form does not apply."""
    if out.ndim != 2 or not isinstance(targets, torch.Tensor):
        return None
    batch, classes = out.shape
    name = type(loss_fn).__name__
    if name == _TIMM_SOFT_CE and targets.shape == out.shape:
        return targets.detach().to(out.dtype).sum(-1) / batch
    if name == _TIMM_SMOOTH_CE and targets.ndim == 1:
        return torch.full((batch,), 1.0 / batch, dtype=out.dtype, device=out.device)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        weight, reduction = loss_fn.weight, loss_fn.reduction
        smoothing, ignore = loss_fn.label_smoothing, loss_fn.ignore_index
    elif loss_fn is nn.functional.cross_entropy:
        weight, reduction, smoothing, ignore = None, "mean", 0.0, -100
    else:
        return None
    w = torch.ones(classes, dtype=out.dtype, device=out.device) if weight is None else weight.detach().to(out.dtype)
    if targets.ndim == 1 and not targets.is_floating_point():  # class indices
        keep = targets != ignore
        safe = torch.where(keep, targets, torch.zeros_like(targets))
        w_y = w[safe] * keep
        rows = (1 - smoothing) * w_y + keep * (smoothing / classes) * w.sum()
        divisor = _divisor(reduction, w_y.sum())
    elif targets.shape == out.shape and targets.is_floating_point():  # class probabilities
        rows = (((1 - smoothing) * targets.detach().to(out.dtype) + smoothing / classes) * w).sum(-1)
        divisor = _divisor(reduction, float(batch))
    else:
        return None
    return None if divisor is None else rows / divisor


def _bce_with_logits_diagonal(loss_fn: nn.BCEWithLogitsLoss, out: torch.Tensor, targets: Any) -> torch.Tensor | None:
    if not isinstance(targets, torch.Tensor) or targets.shape != out.shape:
        return None
    t = targets.detach().to(out.dtype)
    sig = torch.sigmoid(out)
    curv = sig * (1 - sig)
    if loss_fn.pos_weight is not None:
        curv = curv * (loss_fn.pos_weight.to(out.dtype) * t + 1 - t)
    if loss_fn.weight is not None:
        curv = curv * loss_fn.weight.to(out.dtype)
    divisor = _divisor(loss_fn.reduction, float(out.numel()))
    return None if divisor is None else torch.broadcast_to(curv, out.shape) / divisor


class OutputHessian:
    """v ↦ H_out v at the outputs ``out`` (see the module docstring for the forms used).

    Attributes:
        kind: ``"cross-entropy"``, ``"mse"``, ``"bce-with-logits"``, ``"zero"`` (closed forms) or
            ``"generic"`` (reverse-over-reverse at the outputs).
    """

    def __init__(self, loss_fn: Callable, out: torch.Tensor, targets: Any, *, closed_form: bool = True) -> None:
        if out.ndim == 0:
            raise CurvatureInputError(
                "the model's output is a single number (the loss itself, e.g. forward=lambda m, x: m(**x).loss): the "
                "Gauss-Newton part needs the outputs the loss is computed from and would be 0 by construction. Return "
                "the logits (forward=lambda m, x: m(**x).logits) with loss_fn=curvopt.CausalLMLoss() for Hugging Face "
                "labels, or pass gn=False"
            )
        self.loss_fn = loss_fn
        self.out = out.detach()
        self.targets = targets
        self.kind = "generic"
        self._scale: torch.Tensor | float | None = None
        self._hvp: Callable[[torch.Tensor], tuple[torch.Tensor]] | None = None
        if closed_form:
            self._closed_form()
        if self.kind == "generic":  # built once, reused by every probe, vmappable
            _, self._hvp = vjp(grad(lambda o: self.loss_fn(o, self.targets)), self.out)

    def _closed_form(self) -> None:
        loss_fn, out, targets = self.loss_fn, self.out, self.targets
        if isinstance(loss_fn, ZERO_HESSIAN_LOSSES):
            self.kind = "zero"
        elif isinstance(loss_fn, CausalLMLoss) and isinstance(targets, torch.Tensor):
            self.kind, self._scale = "causal-lm", loss_fn.position_weights(out, targets)
        elif (rows := _cross_entropy_row_weights(loss_fn, out, targets)) is not None:
            self.kind, self.probs, self._scale = "cross-entropy", torch.softmax(out, dim=-1), rows[:, None]
        elif isinstance(loss_fn, nn.MSELoss) and isinstance(targets, torch.Tensor) and targets.shape == out.shape:
            divisor = _divisor(loss_fn.reduction, float(out.numel()))
            if divisor is not None:
                self.kind, self._scale = "mse", 2.0 / divisor
        elif isinstance(loss_fn, nn.BCEWithLogitsLoss):
            diag = _bce_with_logits_diagonal(loss_fn, out, targets)
            if diag is not None:
                self.kind, self._scale = "bce-with-logits", diag

    @property
    def closed_form(self) -> bool:
        return self.kind != "generic"

    @property
    def is_zero(self) -> bool:
        """H_out ≡ 0: the loss is (piecewise) linear in the outputs, so the Gauss-Newton part is 0."""
        return self.kind == "zero"

    def _causal_lm(self, v: torch.Tensor) -> torch.Tensor:
        """w (diag p − p pᵀ) v per position, in chunks of positions; p recomputed per chunk (no [B, T, V] kept)."""
        vocab = self.out.shape[-1]
        logits = self.out.reshape(-1, vocab)
        weights = self._scale.reshape(-1, 1)
        flat = v.reshape(-1, vocab)
        rows = max(1, CHUNK_ELEMENTS // vocab)
        parts = []
        for start in range(0, logits.shape[0], rows):
            p = torch.softmax(logits[start : start + rows].float(), dim=-1).to(flat.dtype)
            pv = p * flat[start : start + rows]
            parts.append((pv - p * pv.sum(-1, keepdim=True)) * weights[start : start + rows].to(flat.dtype))
        return torch.cat(parts).reshape(v.shape)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        if self.kind == "causal-lm":
            return self._causal_lm(v)
        if self.kind == "cross-entropy":
            p = self.probs
            return (p * v - p * (p * v).sum(-1, keepdim=True)) * self._scale
        if self.kind in ("mse", "bce-with-logits"):
            return v * self._scale
        if self.kind == "zero":
            return torch.zeros_like(v)
        return self._hvp(v)[0]
