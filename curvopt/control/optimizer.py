"""``CurvatureAwareOptimizer``: any torch optimizer, plus periodic per-layer curvature.

The wrapper *is* a ``torch.optim.Optimizer`` that shares ``param_groups`` and ``state`` with
the optimizer it wraps (as timm's Lookahead does), so torch and timm LR schedulers,
``torch.amp.GradScaler`` and timm's ``NativeScaler`` reach the real groups unchanged.

Every ``every`` optimizer steps it estimates per-layer curvature on a slice of the current
batch (``step(batch=...)`` or an earlier ``observe(x, y)``), feeds the CUSUM monitor and the
LR-scaling policy, and hands metrics and alarms to the loggers and callbacks.

**LR scaling mechanism.** Scales act on the *update*: θ ← θ_old + s_l (θ_new − θ_old) after
the inner step. For SGD (with torch's momentum convention) and Adam/AdamW (weight decay
included) this is exactly a per-layer learning rate lr·s_l, for any optimizer it is a
per-layer step-size multiplier, it works where gradient scaling does not (Adam is invariant
to gradient scale), leaves the inner optimizer's groups, state and fused/foreach kernels as
they are, and leaves schedulers in charge of the base rate. Its cost is one copy of the
scaled parameters per step, paid only while some scale differs from 1 (measured in
``benchmarks/overhead.py``).
"""

from __future__ import annotations

import logging
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import torch
from torch import nn
from torch.optim import Optimizer

from ..engine.layers import group_parameters, unwrap_model
from ..estimators import distributed as dist_utils
from ..estimators.blocks import BlockNorms, block_norms
from ..estimators.budget import ProbeBudgetTracker
from ..estimators.spectra import Spectrum, layer_spectrum
from ..estimators.trace import SAMPLE_KINDS, CurvatureEstimate, estimate_curvature
from .monitor import Alarm, CusumMonitor
from .scaling import make_policy

log = logging.getLogger("curvopt")


class CurvatureSink(Protocol):
    """What a logger gives the optimizer: metrics by step, and alarms."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def alert(self, alarm: Alarm) -> None: ...

    # optional: ``log_config(settings)`` receives :meth:`CurvatureAwareOptimizer.settings` once


class CurvatureAwareOptimizer(Optimizer):
    """Wraps ``optimizer``; estimates curvature every ``every`` steps (0: never).

    Args:
        optimizer: any ``torch.optim.Optimizer`` (SGD, AdamW, timm optimizers, Lookahead).
        model: the model owning the optimizer's parameters (DDP/compile wrappers allowed).
        loss_fn: ``loss_fn(model(x), y)`` is the training loss.
        every: estimate every N optimizer steps (gradient-accumulation micro-batches do not
            count: only ``step()`` calls that reach the optimizer do); 0 turns monitoring off.
            The default 500 keeps the cost under 3 % of training time: on CPU one estimate
            (K = 8, GN on, 32 samples) costs about 12 resnet18 training steps at batch 128
            (benchmarks/RESULTS.md). Monitoring works in units of estimates (the CUSUM warm-up
            is 8 estimates), so short runs want a smaller ``every``.
        probes: K, or ``"auto"`` to adapt K from the mini-batch variance decomposition within
            ``auto_probes`` bounds.
        curvature_batch_size: the curvature sub-batch is the first N samples of the batch.
        gn: also estimate Gauss-Newton traces and GN-Gap.
        monitor: ``"cusum"`` (default settings), a ``CusumMonitor``, or ``None``.
        lr_scaling: ``None``, ``"trace"`` or a policy object (see :mod:`curvopt.control.scaling`).
        logger: a sink (``log``/``alert``) or a list of them; failures warn once, never raise.
        callbacks: called as ``callback(alarm)`` for every alarm.
        seed: seeds the probe generator (probes and dropout masks of estimates).
        history: how many past estimates (as flat dicts) to keep in ``opt.history``.
        layers: custom grouping, as for :func:`curvopt.estimate_curvature`.
        strategy: product strategy, as for :func:`curvopt.estimate_curvature`.
        distributed_probes: under an initialised process group, ``"independent"`` (each rank draws
            its own probes: effective K = world size × K) or ``"shared"`` (one set of probes:
            exactly the single-process estimate on the concatenated batch). See
            :mod:`curvopt.estimators.distributed`; estimates, alarms and LR scales are identical on all ranks,
            and only rank 0 logs, warns and calls the alarm callbacks.
        process_group: the group to reduce over (default: the default group, when initialised).
        inter_every: a second, slower cadence (0: off) for the inter-layer map (block norms with
            ``inter_probes`` probes: resonance, coupling, cross-block mass Φ) and per-layer
            Lanczos spectra (``spectrum_steps`` steps: top eigenvalue, stable rank; the SLQ
            moments behind the stable rank average ``spectrum_starts`` random starts). Cost per
            run: L·(inter_probes + (1 + spectrum_starts)·spectrum_steps) products, so keep it rare.
            Logged only (no effect on training); under DDP only rank 0 computes it.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        *,
        every: int = 500,
        probes: int | str = 8,
        curvature_batch_size: int = 32,
        gn: bool = True,
        monitor: str | CusumMonitor | None = "cusum",
        lr_scaling: object = None,
        logger: CurvatureSink | Iterable[CurvatureSink] | None = None,
        callbacks: Iterable[Callable[[Alarm], None]] = (),
        seed: int = 0,
        history: int = 256,
        auto_probes: tuple[int, int] = (4, 32),
        layers: Any = None,
        strategy: str = "auto",
        distributed_probes: str = "independent",
        process_group: Any = None,
        inter_every: int = 0,
        inter_probes: int = 4,
        spectrum_steps: int = 20,
        spectrum_starts: int = 2,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"every must be an integer >= 0 (0 turns monitoring off), got {every!r}")
        if probes != "auto" and (isinstance(probes, bool) or not isinstance(probes, int) or probes < 1):
            raise ValueError(f"probes must be an integer >= 1 or 'auto', got {probes!r}")
        if not isinstance(curvature_batch_size, int) or curvature_batch_size < 1:
            raise ValueError(f"curvature_batch_size must be an integer >= 1, got {curvature_batch_size!r}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable")
        if history < 1:
            raise ValueError("history must be >= 1")
        if isinstance(inter_every, bool) or not isinstance(inter_every, int) or inter_every < 0:
            raise ValueError(f"inter_every must be an integer >= 0 (0: off), got {inter_every!r}")
        for name, value in (("inter_probes", inter_probes), ("spectrum_steps", spectrum_steps),
                            ("spectrum_starts", spectrum_starts)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if distributed_probes not in dist_utils.PROBE_MODES:
            raise ValueError(f"distributed_probes must be one of {dist_utils.PROBE_MODES}, got {distributed_probes!r}")
        self._check_ownership(optimizer, model)
        # Optimizer.__init__ sets up hooks and step patching; then share the real groups/state.
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.defaults = optimizer.defaults

        self.model = model
        self.loss_fn = loss_fn
        self.every = every
        self.probes = probes
        self.auto_probes = auto_probes
        self.curvature_batch_size = curvature_batch_size
        self.gn = gn
        self.strategy = strategy
        self.distributed_probes = distributed_probes
        self.process_group = process_group
        self.inter_every = inter_every
        self.inter_probes = inter_probes
        self.spectrum_steps = spectrum_steps
        self.spectrum_starts = spectrum_starts
        self.inter_generator = torch.Generator().manual_seed(seed + 1)  # never touches the main probe stream
        self.last_block_norms: BlockNorms | None = None
        self.last_spectra: dict[str, Spectrum] | None = None
        self.monitor = self._make_monitor(monitor)
        self.lr_policy = make_policy(lr_scaling)
        self.loggers: list[CurvatureSink] = (
            [] if logger is None else list(logger) if isinstance(logger, (list, tuple)) else [logger]
        )
        self.callbacks = list(callbacks)
        self.layer_blocks = group_parameters(unwrap_model(model), layers)
        self.generator = torch.Generator().manual_seed(seed)
        self.probe_tracker = ProbeBudgetTracker(window=20)

        self.step_count = 0
        self.history: deque[dict[str, float]] = deque(maxlen=history)
        self.alarms: list[Alarm] = []
        self.lr_scales: dict[str, float] = {b.name: 1.0 for b in self.layer_blocks}
        self.last_estimate: CurvatureEstimate | None = None
        self.skipped_estimates = 0
        self._pending_batch: tuple[Any, Any] | None = None
        self._warned: set[str] = set()
        for sink in self.loggers if self._reports() else []:
            log_config = getattr(sink, "log_config", None)  # optional part of the sink protocol
            if callable(log_config):
                self._call_safely(log_config, self.settings(), what=f"logger {type(sink).__name__} log_config")

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _check_ownership(optimizer: Optimizer, model: nn.Module) -> None:
        owned = {id(p) for p in unwrap_model(model).parameters()}
        foreign = [p for g in optimizer.param_groups for p in g["params"] if id(p) not in owned]
        if foreign:
            raise ValueError(
                f"{len(foreign)} parameter tensor(s) of the optimizer do not belong to the model "
                f"{type(model).__name__}: pass the model whose parameters the optimizer updates"
            )

    @staticmethod
    def _make_monitor(monitor: str | CusumMonitor | None) -> CusumMonitor | None:
        if monitor is None or isinstance(monitor, CusumMonitor):
            return monitor
        if monitor == "cusum":
            return CusumMonitor()
        raise ValueError(f"unknown monitor {monitor!r}; expected 'cusum', a CusumMonitor or None")

    # ------------------------------------------------------------------ torch.optim interface
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Called once by Optimizer.__init__ (before self.optimizer exists) for each group.
        if "optimizer" not in self.__dict__:
            super().add_param_group(param_group)
            return
        self.optimizer.add_param_group(param_group)

    def observe(self, inputs: Any, targets: Any) -> None:
        """Hand the wrapper this step's batch, for code that calls a bare ``step()``."""
        self._pending_batch = (inputs, targets)

    @property
    def monitoring(self) -> bool:
        return self.every > 0

    def _due(self) -> bool:
        return self.monitoring and (self.step_count + 1) % self.every == 0

    def step(self, closure: Callable[[], Any] | None = None, *, batch: tuple[Any, Any] | None = None) -> Any:
        """Inner ``step(closure)``; on every ``every``-th step, estimate curvature first."""
        if batch is not None:
            self._pending_batch = batch
        if self._due():
            self._estimate_and_update()
        if self.inter_every and (self.step_count + 1) % self.inter_every == 0 and self._reports():
            self._inter_layer_diagnostics()
        self._pending_batch = None
        scaled = self._scaled_layers()
        if not scaled:
            result = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        else:
            with torch.no_grad():
                before = [torch._foreach_mul(list(params), 1.0) for _, params in scaled]  # snapshot θ_old
            result = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
            with torch.no_grad():
                for (scale, params), old in zip(scaled, before):
                    # θ ← θ_new + (1 − s)(θ_old − θ_new) = θ_old + s (θ_new − θ_old), in place
                    torch._foreach_lerp_(list(params), old, 1.0 - scale)
        self.step_count += 1
        return result

    def _scaled_layers(self) -> list[tuple[float, tuple[torch.Tensor, ...]]]:
        if self.lr_policy is None:
            return []
        return [(self.lr_scales[b.name], b.params) for b in self.layer_blocks if self.lr_scales.get(b.name, 1.0) != 1.0]

    # ------------------------------------------------------------------ estimation
    def _curvature_batch(self) -> tuple[Any, Any] | None:
        if self._pending_batch is None:
            return None
        n = self.curvature_batch_size
        x, y = (t[:n] if isinstance(t, torch.Tensor) else t for t in self._pending_batch)
        return x, y

    def _current_probes(self) -> int:
        if self.probes != "auto":
            return int(self.probes)
        low, high = self.auto_probes
        if self.probe_tracker.count < 3:
            return max(low, min(high, 8))
        return self.probe_tracker.suggest_probes(low, high)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned and self._reports():
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            log.warning(message)

    def _estimate_and_update(self) -> None:
        step = self.step_count + 1
        distributed = dist_utils.is_active(self.process_group)
        estimate, problem = self._local_estimate(step, distributed)
        if distributed:
            estimate, problem = self._combine_ranks(estimate, problem)
        if estimate is None:
            self.skipped_estimates += 1
            if problem is not None:
                key, message = problem
                self._warn_once(key, message)
            self._emit({"curv/skipped_estimates": float(self.skipped_estimates)}, step)
            return
        self.last_estimate = estimate
        if estimate.probes >= 2:
            self.probe_tracker.update(estimate)
        metrics = {f"curv/{k}": v for k, v in estimate.to_dict().items()}
        metrics["curv/probes"] = float(estimate.probes)
        new_alarms: list[Alarm] = []
        if self.monitor is not None:
            new_alarms = self.monitor.update(step, estimate)
            metrics |= {f"curv/{k}": v for k, v in self.monitor.statistics().items()}
        if self.lr_policy is not None:
            self.lr_scales |= self.lr_policy.update(estimate)
            metrics |= {f"curv/lr_scale/{k}": v for k, v in self.lr_scales.items()}
        metrics["curv/alarm"] = float(bool(new_alarms))
        record = {"step": float(step), **metrics}
        self.history.append(record)
        self._emit(metrics, step)
        for alarm in new_alarms:
            self.alarms.append(alarm)
            self._announce(alarm)

    def _inter_layer_diagnostics(self) -> None:
        """Block norms and per-layer spectra on the curvature batch; logged, never applied."""
        step = self.step_count + 1
        batch = self._curvature_batch()
        if batch is None:
            return
        try:
            norms = block_norms(self.model, self.loss_fn, batch, probes=self.inter_probes, layers=self.layer_blocks,
                                generator=self.inter_generator, strategy=self.strategy)  # fmt: skip
            spectra = layer_spectrum(
                self.model, self.loss_fn, batch, layers=self.layer_blocks, steps=self.spectrum_steps,
                slq_probes=self.spectrum_starts, slq_steps=max(2, self.spectrum_steps), generator=self.inter_generator,
                strategy=self.strategy,
            )  # fmt: skip
        except Exception as exc:  # diagnostics must never stop training
            self._warn_once(f"inter-{type(exc).__name__}", f"curvopt: inter-layer diagnostics at step {step} "
                            f"failed and were skipped: {type(exc).__name__}: {exc}")  # fmt: skip
            return
        self.last_block_norms, self.last_spectra = norms, spectra
        phi, phi_se = norms.phi()
        metrics: dict[str, Any] = {
            "curv/phi": phi,
            "curv/phi_se": phi_se,
            "curv/inter_layers": list(norms.layers),
            "curv/resonance": norms.resonance()[0].tolist(),
            "curv/coupling": norms.coupling()[0].tolist(),
        }
        for name, spectrum in spectra.items():
            metrics[f"curv/top_eig/{name}"] = spectrum.top[0]
            metrics[f"curv/stable_rank/{name}"] = spectrum.stable_rank
        self._emit(metrics, step)

    def _local_estimate(self, step: int, distributed: bool) -> tuple[CurvatureEstimate | None, tuple[str, str] | None]:
        """This process's estimate, or ``None`` and a (warning key, message) saying why not."""
        generator = (
            dist_utils.rank_generator(self.generator, self.distributed_probes, self.process_group)
            if distributed
            else self.generator
        )
        batch = self._curvature_batch()
        if batch is None:
            return None, (
                "no-batch",
                f"curvopt: step {step} is a curvature step but no batch was given; pass "
                "step(batch=(x, y)) or call observe(x, y) before step(). Estimate skipped.",
            )
        try:
            estimate = estimate_curvature(
                self.model,
                self.loss_fn,
                batch,
                probes=self._current_probes(),
                gn=self.gn,
                generator=generator,
                layers=self.layer_blocks,
                strategy=self.strategy,
            )
        except FloatingPointError as exc:
            return None, ("nonfinite", f"curvopt: non-finite curvature at step {step} discarded ({exc})")
        except Exception as exc:  # estimation must never stop training
            return None, (
                f"error-{type(exc).__name__}",
                f"curvopt: curvature estimate at step {step} failed and was skipped: {type(exc).__name__}: {exc}",
            )
        return estimate, None

    def _combine_ranks(
        self, estimate: CurvatureEstimate | None, problem: tuple[str, str] | None
    ) -> tuple[CurvatureEstimate | None, tuple[str, str] | None]:
        """The one collective of an estimate; every rank joins it, also when its own estimate failed."""
        kinds = [k for k in SAMPLE_KINDS if self.gn or k in ("trace", "hess_row_sq")]
        names = [b.name for b in self.layer_blocks]
        layout = dist_utils.Layout(
            layers=names, numel={b.name: b.numel for b in self.layer_blocks}, kinds=kinds, probes=self._current_probes()
        )
        if estimate is not None and (estimate.layers != names or sorted(estimate.samples) != sorted(kinds)):
            estimate, problem = None, ("layout", "curvopt: the estimate's layers or kinds differ from the wrapper's")
        combined, failed = dist_utils.all_gather_estimate(
            estimate,
            layout,
            mode=self.distributed_probes,
            group=self.process_group,
            device=dist_utils.collective_device(self.process_group),
        )
        if combined is None and problem is None:
            message = f"curvopt: rank(s) {failed} could not estimate; the estimate is skipped on all ranks"
            problem = ("rank-failed", message)
        return combined, problem

    def _call_safely(self, fn: Callable[..., None], *args: Any, what: str) -> None:
        """Run a logger or callback; a failure warns once per ``what`` and never stops training."""
        try:
            fn(*args)
        except Exception as exc:
            self._warn_once(what, f"curvopt: {what} failed: {exc}")

    def _reports(self) -> bool:
        """Loggers, warnings and alarm callbacks run on one process only (rank 0 of the group)."""
        return dist_utils.rank(self.process_group) == 0

    def _emit(self, metrics: Mapping[str, float], step: int) -> None:
        if not self._reports():
            return
        for sink in self.loggers:
            self._call_safely(sink.log, step, metrics, what=f"logger {type(sink).__name__} ({id(sink):x})")

    def _announce(self, alarm: Alarm) -> None:
        if not self._reports():
            return
        message = f"curvopt: {alarm.describe()}"
        warnings.warn(message, RuntimeWarning, stacklevel=4)
        log.warning(message)
        for sink in self.loggers:
            self._call_safely(sink.alert, alarm, what=f"logger {type(sink).__name__} alert ({id(sink):x})")
        for callback in self.callbacks:
            self._call_safely(
                callback, alarm, what=f"alarm callback {getattr(callback, '__name__', '')} ({id(callback):x})"
            )

    def settings(self) -> dict[str, Any]:
        """The wrapper's configuration as plain values (for run configs and logs)."""
        return {
            "optimizer": type(self.optimizer).__name__,
            "every": self.every,
            "probes": self.probes,
            "curvature_batch_size": self.curvature_batch_size,
            "gn": self.gn,
            "strategy": self.strategy,
            "distributed_probes": self.distributed_probes,
            "inter_every": self.inter_every,
            "inter_probes": self.inter_probes,
            "spectrum_steps": self.spectrum_steps,
            "spectrum_starts": self.spectrum_starts,
            "world_size": dist_utils.world_size(self.process_group),
            "monitor": None if self.monitor is None else {"name": "cusum", **self.monitor.settings()},
            "lr_scaling": None if self.lr_policy is None else getattr(self.lr_policy, "name", repr(self.lr_policy)),
            "layers": [b.name for b in self.layer_blocks],
        }

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Inner optimizer state plus everything needed to continue monitoring exactly."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "curvopt": {
                "step_count": self.step_count,
                "generator": self.generator.get_state(),
                "inter_generator": self.inter_generator.get_state(),
                "monitor": None if self.monitor is None else self.monitor.state_dict(),
                "lr_policy": None if self.lr_policy is None else self.lr_policy.state_dict(),
                "lr_scales": dict(self.lr_scales),
                "alarms": [a.to_dict() for a in self.alarms],
                "history": list(self.history),
                "skipped_estimates": self.skipped_estimates,
                "probe_tracker": self.probe_tracker.state_dict(),
            },
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if "optimizer" not in state_dict or "curvopt" not in state_dict:
            raise ValueError("not a CurvatureAwareOptimizer state_dict (expected 'optimizer' and 'curvopt' keys)")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.param_groups = self.optimizer.param_groups
        self.state = self.optimizer.state
        extra = state_dict["curvopt"]
        self.step_count = int(extra["step_count"])
        self.generator.set_state(extra["generator"])
        if "inter_generator" in extra:
            self.inter_generator.set_state(extra["inter_generator"])
        if self.monitor is not None and extra["monitor"] is not None:
            self.monitor.load_state_dict(extra["monitor"])
        if self.lr_policy is not None and extra["lr_policy"] is not None:
            self.lr_policy.load_state_dict(extra["lr_policy"])
        self.lr_scales = dict(extra["lr_scales"])
        self.alarms = [Alarm.from_dict(a) for a in extra["alarms"]]
        self.history = deque(extra["history"], maxlen=self.history.maxlen)
        self.skipped_estimates = int(extra["skipped_estimates"])
        self.probe_tracker.load_state_dict(extra["probe_tracker"])

    def __repr__(self) -> str:
        return (
            f"CurvatureAwareOptimizer({type(self.optimizer).__name__}, every={self.every}, probes={self.probes}, "
            f"monitor={type(self.monitor).__name__ if self.monitor else None}, "
            f"lr_scaling={getattr(self.lr_policy, 'name', self.lr_policy)})"
        )
