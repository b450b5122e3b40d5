"""Roll back to before memorisation began: snapshots at every estimate, restored at an alarm's change point.

An alarm comes after memorisation has begun: the CUSUM has to accumulate evidence. Page's change-point estimate
(``Alarm.onset_step``: the estimate at which the deciding statistic left zero) says where it began. Stopping at
the alarm therefore keeps weights that already fit some noise; going back to the last snapshot *before* the
onset does not.

:class:`RollbackOnAlarm` is a curvopt sink (``logger=[...]``): at every estimate it takes a snapshot of the
model's and the optimizer's state (CPU copies, before the step's update), keeping the last ``keep``; at an alarm
it restores the latest snapshot taken before ``onset_step`` (``choose="best"``: the best-scored one before it, see
below), drops the gradients of the step in progress (so the
wrapper's pending inner step changes nothing), and then ``then="stop"`` (``stopped`` turns true: the training
loop ends), ``then="lower-lr"`` (every parameter group's learning rate × ``lr_factor``, training goes on) or
``then="freeze"`` (the layers the alarm names stop training: ``requires_grad = False``; the rest goes on).
Choosing by validation. Which state before the onset is best is not the curvature's to say: weights at a constant
learning rate jitter from epoch to epoch (MNIST-5k, deep models: ±2–5 points of test accuracy between neighbouring
epochs). With ``choose="best"`` and :meth:`RollbackOnAlarm.score` called after each validation (the latest snapshot
gets the score), the rollback restores the best-scored snapshot before the onset (the latest one when none is
scored): early stopping's "restore best", limited to the states before memorisation began
(benchmarks/RESULTS.md §12 measures both).
Memory: ``keep`` × (model + optimizer state) in host memory; the ring must reach back past the onset, i.e.
``keep`` estimates cover ``keep × every`` steps (an onset older than the oldest snapshot restores the oldest and
says so). Sinks run on the reporting process only, so under DDP use ``curvopt train --on-alarm rollback``,
which rolls back on every rank from an on-disk ring of epoch checkpoints.
"""

from __future__ import annotations

import copy
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .monitor import Alarm

THEN = ("stop", "lower-lr", "freeze")
CHOOSE = ("latest", "best")


@dataclass
class Snapshot:
    step: int  # the estimate's step: the state before that step's update
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    score: float | None = None  # a validation score given by RollbackOnAlarm.score (higher is better)


def pick_before(
    steps: Sequence[int], scores: Sequence[float | None], onset: int | None, choose: str = "latest"
) -> int | None:
    """Which of the saved states (taken at ``steps``, oldest first) a rollback restores: the latest one taken before
    ``onset`` (``choose="best"``: the best-scored among those, the latest of equal scores, the latest when none of
    them is scored); the oldest when none is before ``onset``; ``None`` when there is none. The in-memory snapshots
    and ``curvopt train``'s ring of epoch checkpoints both choose with it."""
    if not steps:
        return None
    before = [i for i, step in enumerate(steps) if onset is None or step < onset]
    if not before:
        return 0
    scored = [i for i in before if scores[i] is not None]
    if choose == "best" and scored:
        return max(reversed(scored), key=lambda i: scores[i])
    return before[-1]


def last_before(snapshots: list[Snapshot], onset: int | None) -> Snapshot | None:
    """The latest snapshot taken before ``onset`` (the oldest when none is; ``None`` without snapshots)."""
    return _pick(snapshots, onset, "latest")


def best_before(snapshots: list[Snapshot], onset: int | None) -> Snapshot | None:
    """The best-scored snapshot taken before ``onset`` (the latest of equal scores; :func:`last_before` when none
    before it is scored)."""
    return _pick(snapshots, onset, "best")


def _pick(snapshots: list[Snapshot], onset: int | None, choose: str) -> Snapshot | None:
    index = pick_before([s.step for s in snapshots], [s.score for s in snapshots], onset, choose)
    return None if index is None else snapshots[index]


class RollbackOnAlarm:
    """Snapshots at every estimate; at an alarm, back to the last one before its onset (see the module docstring).

    Args:
        model: the model (its ``state_dict`` is snapshotted and restored).
        optimizer: the optimizer whose state goes with the weights (the wrapped one or the wrapper).
        keep: snapshots kept (a ring).
        then: ``"stop"``, ``"lower-lr"`` or ``"freeze"``.
        lr_factor: the learning-rate factor of ``"lower-lr"``.
        choose: ``"latest"`` (the last snapshot before the onset) or ``"best"`` (the best :meth:`score` before it).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        *,
        keep: int = 32,
        then: str = "stop",
        lr_factor: float = 0.1,
        choose: str = "latest",
    ) -> None:
        if then not in THEN:
            raise ValueError(f"then must be one of {THEN}, got {then!r}")
        if choose not in CHOOSE:
            raise ValueError(f"choose must be one of {CHOOSE}, got {choose!r}")
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.model, self.optimizer = model, getattr(optimizer, "optimizer", optimizer)
        self.then, self.lr_factor, self.choose = then, lr_factor, choose
        self.snapshots: deque[Snapshot] = deque(maxlen=keep)
        self.stopped = False
        self.restored: list[tuple[int, int]] = []  # (alarm step, snapshot step)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """At every estimate: a snapshot of the state before this step's update."""
        if "curv/loss" not in metrics:
            return
        state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        self.snapshots.append(Snapshot(step, state, copy.deepcopy(self.optimizer.state_dict())))

    def score(self, value: float) -> None:
        """A validation score (higher is better) for the latest snapshot, for ``choose="best"``."""
        if not self.snapshots:
            return
        self.snapshots[-1].score = float(value)

    def alert(self, alarm: Alarm) -> None:
        """Restore the last (or best-scored) snapshot before the alarm's onset, then stop, lower the LR or freeze."""
        snapshot = _pick(list(self.snapshots), alarm.onset_step, self.choose)
        if snapshot is None:
            return
        if alarm.onset_step is not None and snapshot.step >= alarm.onset_step:
            warnings.warn(
                f"curvopt: the rollback ring reaches back to step {snapshot.step} only, not before the "
                f"onset at step {alarm.onset_step}: restored the oldest snapshot (raise keep)",
                RuntimeWarning,
                stacklevel=2,
            )
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
