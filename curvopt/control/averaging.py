"""An exponential moving average of a model's weights, sampled at the estimates.

At a constant learning rate the weights wander around the region they settled in: neighbouring checkpoints of the
same run differ by several points of test accuracy, so a rollback that restores *one* checkpoint inherits that
jitter. An average of the recent weights sits nearer the centre of the region, which generalises better and
varies less (Izmailov et al., "Averaging Weights Leads to Wider Optima and Better Generalization", UAI 2018;
timm's ``ModelEmaV2`` keeps such an average of every tensor of the state).

:class:`ExponentialAverage` keeps

    ā ← a + d (ā − a),   d = 2^(−Δ/τ),

for every floating-point tensor of the state (weights and BatchNorm's running statistics alike, as timm does), with
Δ the steps since the previous update and τ the half-life in steps: irregular sampling (the estimates' cadence)
weights each sample by the time it stood for. Integer tensors (BatchNorm's batch counter) are copied. The first
update copies the state. The average lives on the CPU, as the rollback's snapshots do.

BatchNorm. Running statistics averaged along with the weights belong to none of the averaged networks; late in a
run they are close enough, but an average restored from early in training (weights still moving fast) can be far
off: measured on held-out digits, a BatchNorm ResNet-20 restored at epoch 1 scored 10–24 % with averaged statistics
and 77–89 % with statistics recomputed for the averaged weights (benchmarks/RESULTS.md §15.6). So a rollback that
restores an average recomputes them (:func:`recompute_batchnorm`: a cumulative average over a few training
batches, in training mode, without gradients; SWA does the same, Izmailov et al. 2018).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..engine.batch import Forward, call_model

ROLLBACK_AVERAGE = 0.5
"""Half-life, in epochs, of the weight average a rollback restores by default (``curvopt train --rollback-average``,
the callbacks' ``rollback_average``; benchmarks/RESULTS.md §15.6)."""
BATCHNORM_BATCHES = 16
"""Training batches over which a restored average's BatchNorm statistics are recomputed (at most)."""
BATCHNORM_NEEDS_INPUTS = (
    "RollbackOnAlarm(average=...): the model has BatchNorm layers, whose running statistics must be recomputed for "
    "averaged weights; pass batchnorm_inputs=lambda: <a few training input batches> (and forward= if the model is "
    "not called as model(inputs)), or average=None to restore the weights themselves"
)


class ExponentialAverage:
    """A running exponential average of a state dict, with a half-life in steps (see the module docstring)."""

    def __init__(self, halflife: float) -> None:
        if not halflife > 0:
            raise ValueError(f"the average's half-life must be a positive number of steps, got {halflife!r}")
        self.halflife = float(halflife)
        self.state: dict[str, torch.Tensor] = {}
        self.step: int | None = None

    def update(self, state: Mapping[str, torch.Tensor], step: int) -> None:
        """Fold ``state`` (taken at ``step``) into the average."""
        current = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        if self.step is None or not self.state:
            self.state, self.step = current, step
            return
        keep = 0.5 ** (max(step - self.step, 0) / self.halflife)
        for name, value in current.items():
            held = self.state.get(name)
            if held is None or not value.is_floating_point() or held.shape != value.shape:
                self.state[name] = value
            else:
                held.mul_(keep).add_(value.to(held.dtype), alpha=1.0 - keep)
        self.step = step

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A copy of the average, ready for ``model.load_state_dict``."""
        return {k: v.clone() for k, v in self.state.items()}

    def state_dict(self) -> dict[str, Any]:
        """The average and the step of its last sample (the half-life is a setting, not state)."""
        return {"state": self.snapshot(), "step": self.step}

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in saved["state"].items()}
        self.step = None if saved["step"] is None else int(saved["step"])


class ModelAverage(ExponentialAverage):
    """The exponential average of one model's state that a rollback keeps and restores: :meth:`sample` folds the
    model in, :meth:`load_into_model` puts an average back (this one, or one saved earlier) and recomputes BatchNorm
    statistics for it on ``batchnorm_inputs()`` (required when the model has BatchNorm layers).

    Args:
        model: the model averaged and restored.
        halflife: in optimizer steps.
        batchnorm_inputs: a callable returning training inputs (an iterable of batches, as the model or ``forward``
            takes them; :data:`BATCHNORM_BATCHES` are used).
        forward: ``forward(model, inputs)`` when the model is not called as ``model(inputs)``.
    """

    def __init__(
        self,
        model: nn.Module,
        halflife: float,
        batchnorm_inputs: Callable[[], Iterable[Any]] | None = None,
        forward: Forward | None = None,
    ) -> None:
        super().__init__(halflife)
        if batchnorm_layers(model) and batchnorm_inputs is None:
            raise ValueError(BATCHNORM_NEEDS_INPUTS)
        self.model, self.batchnorm_inputs, self.forward = model, batchnorm_inputs, forward

    def sample(self, step: int) -> None:
        """Fold the model's current state (at ``step``) into the average."""
        self.update(self.model.state_dict(), step)

    def load_into_model(self, state: Mapping[str, torch.Tensor] | None = None) -> None:
        """Load ``state`` (default: this average) into the model, then recompute its BatchNorm statistics."""
        self.model.load_state_dict(self.state if state is None else state)
        if self.batchnorm_inputs is not None:
            recompute_batchnorm(self.model, self.batchnorm_inputs(), self.forward)


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers (any dimension, SyncBatchNorm included) that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_batchnorm(
    model: nn.Module, inputs: Iterable[Any], forward: Forward | None = None, limit: int = BATCHNORM_BATCHES
) -> int:
    """Replace every BatchNorm layer's running statistics by their cumulative average over up to ``limit`` batches of
    ``inputs`` (forwards in training mode, no gradients; the model's modes and the layers' momenta are put back).
    Returns the batches used (0: the model has no BatchNorm layer, or ``inputs`` none)."""
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    momenta = [layer.momentum for layer in layers]
    modes = {m: m.training for m in model.modules()}
    saved = [(layer.running_mean.clone(), layer.running_var.clone()) for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative moving average: every batch counts the same
    used = 0
    try:
        model.train()
        for batch in inputs:
            if used >= limit:
                break
            call_model(model, batch, forward)
            used += 1
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        for module, mode in modes.items():
            module.training = mode
    if used == 0:  # nothing to recompute from: keep what there was
        for layer, (mean, var) in zip(layers, saved):
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
    return used
