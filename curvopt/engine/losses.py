r"""Losses of language models, with the curvature engine's closed-form output Hessian.

:class:`CausalLMLoss` is next-token cross-entropy on logits ``[B, T, V]`` and targets ``[B, T]``:

    L = (1/n) Σ_{b,t ∈ valid} −log softmax(o_{b,t})[y_{b,t+1}]    (``shift=True``: Hugging Face ``labels``)
    L = (1/n) Σ_{b,t ∈ valid} −log softmax(o_{b,t})[y_{b,t}]      (``shift=False``: targets already aligned)

over the positions whose target is not ``ignore_index`` (−100, Hugging Face's padding label), n their
number — what a Hugging Face causal LM computes from ``labels``. Unlike ``nn.CrossEntropyLoss`` (which
wants ``[B, V, T]``) it takes the model's ``[B, T, V]`` as it comes, and keeps the batch dimension first,
so a curvature sub-batch is the first N sequences of both (:func:`curvopt.engine.batch.slice_batch`).

Its Hessian in the logits is block diagonal over positions, H_{b,t} = w_{b,t} (diag p − p pᵀ) with
p = softmax(o_{b,t}) and w = 1/n on valid positions (0 elsewhere): :mod:`curvopt.engine.output_hessian`
applies it in closed form, a chunk of positions at a time, recomputing p from the logits, so the
Gauss-Newton products at a real vocabulary (V = 50,257) hold no [B, T, V] tensor besides the logits
and the product itself.
"""

from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100


class CausalLMLoss(nn.Module):
    """Next-token cross-entropy of ``[B, T, V]`` logits against ``[B, T]`` labels (see the module docstring).

    Args:
        shift: the labels are the input tokens (Hugging Face ``labels``): position t predicts label t + 1.
            ``False`` when the targets are already aligned with the logits.
        ignore_index: label value excluded from the loss (and from its curvature).
    """

    def __init__(self, shift: bool = True, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.shift = shift
        self.ignore_index = ignore_index

    def aligned(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, targets)`` with position t scored against its own target: the last position dropped
        (it has no next token) when ``shift``."""
        if logits.ndim != 3 or targets.ndim != 2 or logits.shape[:2] != targets.shape:
            raise ValueError(
                f"CausalLMLoss takes logits [B, T, V] and targets [B, T], got {tuple(logits.shape)} and "
                f"{tuple(targets.shape)}"
            )
        if self.shift:
            return logits[:, :-1], targets[:, 1:]
        return logits, targets

    def position_weights(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``[B, T]``: 1/n at the positions that enter the loss, 0 elsewhere (ignored, or the last one when shifted)."""
        weights = torch.zeros(targets.shape, dtype=logits.dtype, device=logits.device)
        valid = targets != self.ignore_index
        if self.shift:
            valid = torch.cat([valid[:, 1:], torch.zeros_like(valid[:, :1])], dim=1)
        count = valid.sum()
        weights[valid] = 1.0 / count.clamp_min(1).to(logits.dtype)
        return weights

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        scores, labels = self.aligned(logits, targets)
        if scores.dtype in (torch.float16, torch.bfloat16):  # as Hugging Face does: the softmax in fp32
            scores = scores.float()
        return nn.functional.cross_entropy(
            scores.reshape(-1, scores.shape[-1]), labels.reshape(-1), ignore_index=self.ignore_index
        )

    def extra_repr(self) -> str:
        return f"shift={self.shift}, ignore_index={self.ignore_index}"


def causal_lm_loss(shift: bool = True, ignore_index: int = IGNORE_INDEX) -> CausalLMLoss:
    """``CausalLMLoss(shift, ignore_index)``: the loss of a Hugging Face causal LM, from its logits and labels."""
    return CausalLMLoss(shift=shift, ignore_index=ignore_index)
