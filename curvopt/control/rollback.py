"""Roll back to before memorisation began: snapshots at every estimate, restored at an alarm's change point.

An alarm comes after memorisation has begun: the CUSUM has to accumulate evidence. The alarm's change point
(``Alarm.onset_step``, fitted retrospectively by the monitor, :mod:`curvopt.control.changepoint`) says where it
began. Stopping at the alarm keeps weights that already fit some noise; going back to the last snapshot *before*
the onset does not, and needs no validation split: the model can train on all the data.

:class:`RollbackOnAlarm` is a curvopt sink (``logger=[...]``): at every estimate it takes a snapshot of the
model's and the optimizer's state (CPU copies, before the step's update); at an alarm it restores the latest
snapshot taken before ``onset_step`` (``choose="onset"``, the default), drops the gradients of the step in
progress (so the wrapper's pending inner step changes nothing), and then ``then="stop"`` (``stopped`` turns true:
the training loop ends), ``then="lower-lr"`` (every parameter group's learning rate × ``lr_factor``, training goes
on) or ``then="freeze"`` (the layers the alarm names stop training: ``requires_grad = False``; the rest goes on).

Choosing by validation, when there is a split. Weights at a constant learning rate jitter from epoch to epoch
(MNIST-5k, deep models: ±2–5 points of test accuracy between neighbouring epochs). With
``choose="best-validated"`` and :meth:`RollbackOnAlarm.score` called after each validation (the latest snapshot
gets the score), the rollback restores the best-scored snapshot before the onset: early stopping's "restore best",
limited to the states before memorisation began (benchmarks/RESULTS.md §12 and §15 measure both).

Restoring an average of the weights. At a constant learning rate the weights wander: neighbouring checkpoints
differ by points of test accuracy, so restoring one checkpoint inherits that jitter. With ``average=τ`` (a half-life
in optimizer steps) the rollback keeps an exponential average of the state, sampled at every estimate
(:class:`curvopt.control.averaging.ExponentialAverage`), and each snapshot holds the *average* as it stood then; an
alarm restores the average from before the change point (the optimizer state is the one of that step) and
recomputes BatchNorm's statistics for it on a few training batches (``batchnorm_inputs``; see
:mod:`curvopt.control.averaging`). benchmarks/RESULTS.md §15.6 measures it against the checkpoint itself and
against early stopping on a validation split.

Which snapshots are kept. Memory is ``keep`` × (model + optimizer state) in host memory. With ``spacing="log"``
(the default) the ring thins itself so that the gaps between kept snapshots grow in proportion to their age
(:func:`thin_log_spaced`): recent states are dense, old ones sparse, and the ring reaches back to the start of the
run. A change point's error grows with how far back it lies, so the restored state is at most a fixed fraction
of the distance to the onset older than it. ``spacing="recent"`` keeps the last ``keep`` snapshots. Sinks run on
the reporting process only, so under DDP use ``curvopt train --on-alarm rollback``, which rolls back on every rank
from an on-disk ring of epoch checkpoints thinned the same way.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from ..engine.batch import Forward
from . import log_schema
from .averaging import ModelAverage
from .monitor import Alarm

THEN = ("stop", "lower-lr", "freeze")
CHOOSE = ("onset", "best-validated")
LEGACY_CHOICES = {"latest": "onset", "best": "best-validated"}
"""The names ``choose`` had before the validation-free rollback became the default, still read from old runs."""
SPACINGS = ("log", "recent")


def choice(name: str) -> str:
    """``name`` as one of :data:`CHOOSE` (the older spellings mapped); ValueError naming the choices otherwise."""
    name = LEGACY_CHOICES.get(name, name)
    if name not in CHOOSE:
        raise ValueError(f"choose must be one of {CHOOSE}, got {name!r}")
    return name


def thin_log_spaced(steps: Sequence[int], now: int) -> int:
    """Which of the saved states (taken at ``steps``, oldest first; at least 3) to drop to keep them log-spaced: the
    one whose removal leaves the smallest gap relative to its age, min over 0 < i < n−1 of
    (steps[i+1] − steps[i−1]) / (now − steps[i−1] + 1). The oldest and the newest are never dropped."""
    if len(steps) < 3:
        raise ValueError("thinning needs at least 3 saved states")
    return min(range(1, len(steps) - 1), key=lambda i: (steps[i + 1] - steps[i - 1]) / (now - steps[i - 1] + 1))


@dataclass
class Snapshot:
    step: int  # the estimate's step: the state before that step's update
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    score: float | None = None  # a validation score given by RollbackOnAlarm.score (higher is better)


def pick_before(
    steps: Sequence[int], scores: Sequence[float | None], onset: int | None, choose: str = "onset"
) -> int | None:
    """Which of the saved states (taken at ``steps``, oldest first) a rollback restores: the latest one taken before
    ``onset`` (``choose="best-validated"``: the best-scored among those, the latest of equal scores, the latest when
    none of them is scored); the oldest when none is before ``onset``; ``None`` when there is none. The in-memory
    snapshots and ``curvopt train``'s ring of epoch checkpoints both choose with it."""
    choose = choice(choose)
    if not steps:
        return None
    before = [i for i, step in enumerate(steps) if onset is None or step < onset]
    if not before:
        return 0
    scored = [i for i in before if scores[i] is not None]
    if choose == "best-validated" and scored:
        return max(reversed(scored), key=lambda i: scores[i])
    return before[-1]


def last_before(snapshots: list[Snapshot], onset: int | None) -> Snapshot | None:
    """The latest snapshot taken before ``onset`` (the oldest when none is; ``None`` without snapshots)."""
    return _pick(snapshots, onset, "onset")


def best_before(snapshots: list[Snapshot], onset: int | None) -> Snapshot | None:
    """The best-scored snapshot taken before ``onset`` (the latest of equal scores; :func:`last_before` when none
    before it is scored)."""
    return _pick(snapshots, onset, "best-validated")


def _pick(snapshots: list[Snapshot], onset: int | None, choose: str) -> Snapshot | None:
    index = pick_before([s.step for s in snapshots], [s.score for s in snapshots], onset, choose)
    return None if index is None else snapshots[index]


class RollbackOnAlarm:
    """Snapshots at every estimate; at an alarm, back to the last one before its onset (see the module docstring).

    Args:
        model: the model (its ``state_dict`` is snapshotted and restored).
        optimizer: the optimizer whose state goes with the weights (the wrapped one or the wrapper).
        keep: snapshots kept.
        then: ``"stop"``, ``"lower-lr"`` or ``"freeze"``.
        lr_factor: the learning-rate factor of ``"lower-lr"``.
        choose: ``"onset"`` (the last snapshot before the change point; no validation needed) or
            ``"best-validated"`` (the best :meth:`score` before it).
        spacing: ``"log"`` (kept snapshots log-spaced back to the start) or ``"recent"`` (the last ``keep``).
        average: ``None`` (restore the weights as they were) or the half-life, in optimizer steps, of the weight
            average that the snapshots hold and an alarm restores (see the module docstring).
        batchnorm_inputs: with ``average`` and a model with BatchNorm layers (required then): a callable returning
            training inputs (an iterable of batches, as the model or ``forward`` takes them; a few are used) on
            which the restored average's BatchNorm statistics are recomputed.
        forward: ``forward(model, inputs)`` when the model is not called as ``model(inputs)``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        *,
        keep: int = 32,
        then: str = "stop",
        lr_factor: float = 0.1,
        choose: str = "onset",
        spacing: str = "log",
        average: float | None = None,
        batchnorm_inputs: Callable[[], Iterable[Any]] | None = None,
        forward: Forward | None = None,
    ) -> None:
        if then not in THEN:
            raise ValueError(f"then must be one of {THEN}, got {then!r}")
        if spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
        if keep < (3 if spacing == "log" else 1):
            raise ValueError(f"keep must be >= {3 if spacing == 'log' else 1} with spacing={spacing!r}, got {keep}")
        self.model, self.optimizer = model, getattr(optimizer, "optimizer", optimizer)
        self.then, self.lr_factor, self.choose, self.spacing, self.keep = then, lr_factor, choice(choose), spacing, keep
        self.average = ModelAverage(model, average, batchnorm_inputs, forward) if average is not None else None
        self.snapshots: list[Snapshot] = []
        self.stopped = False
        self.restored: list[tuple[int, int]] = []  # (alarm step, snapshot step)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """At every estimate: a snapshot of the state before this step's update."""
        if log_schema.LOSS not in metrics:
            return
        if self.average is not None:
            self.average.sample(step)
            state = self.average.snapshot()
        else:
            state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        self.snapshots.append(Snapshot(step, state, copy.deepcopy(self.optimizer.state_dict())))
        while len(self.snapshots) > self.keep:
            drop = 0 if self.spacing == "recent" else thin_log_spaced([s.step for s in self.snapshots], step)
            del self.snapshots[drop]

    def score(self, value: float) -> None:
        """A validation score (higher is better) for the latest snapshot, for ``choose="best"``."""
        if not self.snapshots:
            return
        self.snapshots[-1].score = float(value)

    def alert(self, alarm: Alarm) -> None:
        """Restore the last (or best-scored) snapshot before the alarm's onset, then stop, lower the LR or freeze."""
        snapshot = _pick(self.snapshots, alarm.onset_step, self.choose)
        if snapshot is None:
            warnings.warn(
                f"curvopt: the alarm at step {alarm.step} found no snapshot to roll back to (none taken yet in this "
                "process, e.g. right after a resume): the model is left as it is",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        if alarm.onset_step is not None and snapshot.step >= alarm.onset_step:
            warnings.warn(
                f"curvopt: the rollback ring reaches back to step {snapshot.step} only, not before the "
                f"onset at step {alarm.onset_step}: restored the oldest snapshot (raise keep)",
                RuntimeWarning,
                stacklevel=2,
            )
        if self.average is not None:
            self.average.load_into_model(snapshot.model)
        else:
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
