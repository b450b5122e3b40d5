"""Roll back to before memorisation began: snapshots at every estimate, restored at an alarm's change point.

An alarm comes after memorisation has begun: the CUSUM has to accumulate evidence. Page's change-point estimate
(``Alarm.onset_step``: the estimate at which the deciding statistic left zero) says where it began. Stopping at
the alarm therefore keeps weights that already fit some noise; going back to the last snapshot *before* the
onset does not.

:class:`RollbackOnAlarm` is a curvopt sink (``logger=[...]``): at every estimate it takes a snapshot of the
model's and the optimizer's state (CPU copies, before the step's update), keeping the last ``keep``; at an alarm
it restores the latest snapshot taken before ``onset_step``, drops the gradients of the step in progress (so the
wrapper's pending inner step changes nothing), and then ``then="stop"`` (``stopped`` turns true: the training
loop ends), ``then="lower-lr"`` (every parameter group's learning rate × ``lr_factor``, training goes on) or
``then="freeze"`` (the layers the alarm names stop training: ``requires_grad = False``; the rest goes on).
Memory: ``keep`` × (model + optimizer state) in host memory; the ring must reach back past the onset, i.e.
``keep`` estimates cover ``keep × every`` steps (an onset older than the oldest snapshot restores the oldest and
says so). Sinks run on the reporting process only, so under DDP use ``curvopt train --on-alarm rollback``,
which rolls back on every rank from an on-disk ring of epoch checkpoints.
"""

from __future__ import annotations

import copy
import warnings
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .monitor import Alarm

THEN = ("stop", "lower-lr", "freeze")


@dataclass
class Snapshot:
    step: int  # the estimate's step: the state before that step's update
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]


def last_before(snapshots: list[Snapshot], onset: int | None) -> Snapshot | None:
    """The latest snapshot taken before ``onset`` (the oldest when none is; ``None`` without snapshots)."""
    if not snapshots:
        return None
    if onset is None:
        return snapshots[-1]
    earlier = [s for s in snapshots if s.step < onset]
    return earlier[-1] if earlier else snapshots[0]


class RollbackOnAlarm:
    """Snapshots at every estimate; at an alarm, back to the last one before its onset (see the module docstring).

    Args:
        model: the model (its ``state_dict`` is snapshotted and restored).
        optimizer: the optimizer whose state goes with the weights (the wrapped one or the wrapper).
        keep: snapshots kept (a ring).
        then: ``"stop"`` or ``"lower-lr"``.
        lr_factor: the learning-rate factor of ``"lower-lr"``.
    """

    def __init__(self, model: nn.Module, optimizer: Optimizer, *, keep: int = 32, then: str = "stop",
                 lr_factor: float = 0.1) -> None:  # fmt: skip
        if then not in THEN:
            raise ValueError(f"then must be one of {THEN}, got {then!r}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.model, self.optimizer = model, getattr(optimizer, "optimizer", optimizer)
        self.then, self.lr_factor = then, lr_factor
        self.snapshots: deque[Snapshot] = deque(maxlen=keep)
        self.stopped = False
        self.restored: list[tuple[int, int]] = []  # (alarm step, snapshot step)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """At every estimate: a snapshot of the state before this step's update."""
        if "curv/loss" not in metrics:
            return
        state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        self.snapshots.append(Snapshot(step, state, copy.deepcopy(self.optimizer.state_dict())))

    def alert(self, alarm: Alarm) -> None:
        """Restore the last snapshot before the alarm's onset, then stop or lower the learning rate."""
        snapshot = last_before(list(self.snapshots), alarm.onset_step)
        if snapshot is None:
            return
        if alarm.onset_step is not None and snapshot.step >= alarm.onset_step:
            warnings.warn(f"curvopt: the rollback ring reaches back to step {snapshot.step} only, not before the "
                          f"onset at step {alarm.onset_step}: restored the oldest snapshot (raise keep)",
                          RuntimeWarning, stacklevel=2)  # fmt: skip
        self.model.load_state_dict(snapshot.model)
        self.optimizer.load_state_dict(snapshot.optimizer)
        for param in self.model.parameters():
            param.grad = None  # the update of the step in progress has nothing to apply
        self.restored.append((alarm.step, snapshot.step))
        if self.then == "stop":
            self.stopped = True
        elif self.then == "lower-lr":
            for group in self.optimizer.param_groups:
                group["lr"] *= self.lr_factor
        else:
            modules = dict(self.model.named_modules())
            for name in alarm.layers:
                module = modules.get("" if name == "(root)" else name)
                for param in module.parameters(recurse=False) if module is not None else ():
                    param.requires_grad_(False)
