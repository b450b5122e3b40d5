"""``WandbLogger``: curvature metrics, alarms, events and layer × step heatmaps in Weights & Biases.

Keys, all against a monotone ``curv/step`` (``define_metric``, so they never fight the user's own
``wandb.log`` step). W&B groups panels into sections by the text before the first ``/``, so each
per-layer quantity gets a section of its own: ``curv.trace/<layer>``, ``curv.trace_se/<layer>``,
``curv.frob/<layer>``, ``curv.gn_trace/<layer>``, ``curv.gn_gap/<layer>``, ``curv.cusum/<layer>``,
``curv.lr_scale/<layer>`` (and ``curv.top_eig``, ``curv.stable_rank`` with the inter-layer cadence),
while the model-wide values share the ``curv`` section: ``curv/total/*``, ``curv/cusum_aggregate``,
``curv/cusum_threshold``, ``curv/monitor_ready``, ``curv/alarm``, ``curv/loss``, ``curv/skipped_estimates``,
``curv/phi``. Every ``heatmap_every`` estimates an image ``curv/trace_heatmap`` (layers × steps) over
the whole run so far, from at most ``heatmap_columns`` evenly spaced estimates (:class:`ThinnedHistory`:
memory does not grow with the run's length); with the inter-layer cadence images ``curv/coupling`` and
``curv/resonance``. Alarms are W&B alerts (one per episode); events (label-noise start, resume, ...)
and alarms form the ``curv/events`` table.

Mode: ``WANDB_MODE`` when set; otherwise online when credentials exist (``WANDB_API_KEY`` or a
netrc entry for the W&B host) and **offline** when there are none, so a run never prompts for a
login or needs the network. Anything that goes wrong on the W&B side (wandb not installed, init
failing, the network) warns once and turns this logger into a no-op: training never stops for it.
"""

from __future__ import annotations

import logging
import netrc
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import urlparse

from ..control import log_schema
from ..control.monitor import Alarm

log = logging.getLogger("curvopt")

SECTIONED = (*log_schema.PER_LAYER, "cusum")
"""The ``curv/<quantity>/<name>`` keys W&B shows as a panel section per quantity."""


def wandb_key(key: str) -> str:
    """The W&B name of a logged key: per-layer ``curv/<quantity>/<layer>`` → ``curv.<quantity>/<layer>`` (a panel
    section per quantity); the model-wide CUSUM and threshold → ``curv/cusum_aggregate``, ``curv/cusum_threshold``
    (the gradient norm's: ``curv/cusum_gradient``, ``curv/cusum_gradient_threshold``)."""
    parts = key.split("/", 2)
    if len(parts) == 3 and parts[0] == "curv" and parts[1] in SECTIONED:
        if parts[1] == "cusum" and parts[2] in ("aggregate", "threshold", "gradient", "gradient_threshold"):
            return f"curv/cusum_{parts[2]}"
        return f"curv.{parts[1]}/{parts[2]}"
    return key


TRAIN_STEP = "train/step"

T = TypeVar("T")


class ThinnedHistory(Generic[T]):
    """At most ``capacity`` evenly spaced items out of everything appended, plus the latest.

    The i-th append (i = 0, 1, ...) is kept when i ≡ 0 (mod s), the stride s starting at 1. When
    ``capacity`` items are kept and another is due, every other kept item is dropped and s doubles,
    so the kept items are always appends 0, s, 2s, ...: a uniform subsample of the whole run in
    O(capacity) memory, however long the run.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 2:
            raise ValueError(f"capacity must be >= 2, got {capacity}")
        self.capacity = capacity
        self.stride = 1
        self.count = 0
        self._kept: list[T] = []
        self._latest: list[T] = []

    def append(self, item: T) -> None:
        if self.count % self.stride == 0 and len(self._kept) == self.capacity:
            self._kept = self._kept[::2]
            self.stride *= 2
        if self.count % self.stride == 0:
            self._kept.append(item)
        self._latest = [item]
        self.count += 1

    def items(self) -> list[T]:
        """The kept items in order, ending with the latest append (kept or not)."""
        if self._kept and self._latest and self._kept[-1] is self._latest[0]:
            return list(self._kept)
        return self._kept + self._latest

    def __len__(self) -> int:
        return self.count


def has_wandb_credentials() -> bool:
    """``WANDB_API_KEY`` is set, or the netrc file has an entry for the W&B API host."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str | None = None) -> str:
    """Explicit ``mode`` > ``WANDB_MODE`` > online with credentials > offline."""
    if mode is not None:
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if has_wandb_credentials() else "offline"


class WandbLogger:
    """Logs to an existing ``wandb.run`` (``run=None`` and one is active) or starts a new one.

    Args:
        run: a ``wandb`` run to log into; by default the active ``wandb.run``, else a new run
            from ``init_kwargs`` (``project``, ``name``, ``dir``, ``config``, ``tags``, ``mode``, …).
        heatmap_every: log the layer × step trace heatmap every N estimates (0: never).
        heatmap_columns: the most estimates the heatmap shows (and the logger keeps); longer runs
            are subsampled evenly, so memory stays about ``heatmap_columns × layers`` floats.
        alerts: send ``run.alert`` once per alarm episode.
        **init_kwargs: passed to ``wandb.init`` when this logger starts the run.

    The optimizer calls :meth:`log_config` so the run's ``config`` gets the wrapper's settings
    under ``curvopt``; recipes add theirs with :meth:`update_config`. :meth:`finish` ends the run
    only if this logger started it.
    """

    def __init__(
        self,
        run: Any = None,
        *,
        heatmap_every: int = 10,
        heatmap_columns: int = 512,
        alerts: bool = True,
        **init_kwargs: Any,
    ) -> None:
        if heatmap_every < 0:
            raise ValueError(f"heatmap_every must be >= 0, got {heatmap_every}")
        if heatmap_columns < 2:
            raise ValueError(f"heatmap_columns must be >= 2, got {heatmap_columns}")
        self.heatmap_every = heatmap_every
        self.alerts = alerts
        self.run: Any = None
        self.local_dir: str | None = None
        self.owns_run = False
        self._warned: set[str] = set()
        self._traces: ThinnedHistory[tuple[int, dict[str, float]]] = ThinnedHistory(heatmap_columns)
        self._events: list[list[Any]] = []
        try:
            import wandb

            if os.environ.get("WANDB_MODE") == "":  # an empty WANDB_MODE makes wandb.Settings() fail validation
                del os.environ["WANDB_MODE"]
            self._wandb = wandb
            if run is None and wandb.run is not None:
                run = wandb.run
            if run is None:
                init_kwargs["mode"] = resolve_mode(init_kwargs.get("mode"))
                init_kwargs.setdefault("settings", wandb.Settings(quiet=True))  # no per-key history dump at exit
                if "dir" in init_kwargs:
                    Path(init_kwargs["dir"]).mkdir(parents=True, exist_ok=True)
                run = wandb.init(**init_kwargs)
                self.owns_run = True
            self.run = run
            # a disabled run (WANDB_MODE=disabled) writes nothing: it has no directory to point a report at
            self.local_dir = None if getattr(run, "disabled", False) else str(Path(run.dir).parent)
            run.define_metric(log_schema.STEP)
            run.define_metric("curv/*", step_metric=log_schema.STEP)
            run.define_metric("curv.*", step_metric=log_schema.STEP)
            run.define_metric(TRAIN_STEP)
            run.define_metric("train/*", step_metric=TRAIN_STEP)
            run.define_metric("epoch")
            run.define_metric("eval/*", step_metric="epoch")
        except Exception as exc:  # wandb missing, init error, network: warn, never stop training
            self._warn("init", f"W&B logging is off: {type(exc).__name__}: {exc}")
            self.run = None

    # ------------------------------------------------------------------ helpers
    @property
    def active(self) -> bool:
        return self.run is not None

    @property
    def url(self) -> str | None:
        """The run's page (``None`` offline or when W&B is off)."""
        try:
            return self.run.url if self.run is not None else None
        except Exception:
            return None

    def describe(self) -> dict[str, str]:
        """Where the run is, for a report: ``{"wandb_url": ...}`` online, ``{"wandb_dir": ...}`` offline."""
        if self.url:
            return {"wandb_url": self.url}
        return {"wandb_dir": self.local_dir} if self.local_dir else {}

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"curvopt: {message}", RuntimeWarning, stacklevel=3)
            log.warning("curvopt: %s", message)

    def _safely(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        if self.run is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as exc:
            self._warn(what, f"W&B {what} failed (further failures of this kind are silent): {exc}")

    # ------------------------------------------------------------------ the CurvatureSink protocol
    def log_config(self, settings: Mapping[str, Any]) -> None:
        """Record the wrapper's settings in the run's config under ``curvopt`` (called by the optimizer)."""
        self.update_config({"curvopt": dict(settings)})

    def update_config(self, config: Mapping[str, Any]) -> None:
        self._safely("config update", lambda: self.run.config.update(dict(config), allow_val_change=True))

    def _log(self, payload: Mapping[str, Any]) -> None:
        self._safely("log", lambda: self.run.log(dict(payload)))

    def _image(self, figure: Any) -> Any:
        """A ``wandb.Image`` of a matplotlib figure; the figure is closed."""
        import matplotlib.pyplot as plt

        try:
            return self._wandb.Image(figure)
        finally:
            plt.close(figure)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Curvature metrics of one estimate, against ``curv/step``."""
        if self.run is None:
            return
        maps = {k: v for k, v in metrics.items() if isinstance(v, (list, tuple))}
        self._log({log_schema.STEP: step, **{wandb_key(k): v for k, v in metrics.items() if k not in maps}})
        if log_schema.COUPLING in maps and log_schema.INTER_LAYERS in maps:
            self._safely("layer maps", self._log_maps, step, maps)
        traces = log_schema.layer_values(metrics, "trace")
        if not traces:
            return
        self._traces.append((step, traces))
        if self.heatmap_every and len(self._traces) % self.heatmap_every == 0:
            self._safely("heatmap", self._log_heatmap, step)

    def _log_maps(self, step: int, maps: Mapping[str, Any]) -> None:
        from .plots import matrix_heatmap_figure

        layers = maps[log_schema.INTER_LAYERS]
        images = {
            key: self._image(matrix_heatmap_figure(maps[key], layers, f"{key} at step {step}", label))
            for key, label in ((log_schema.COUPLING, "C"), (log_schema.RESONANCE, "R"))
            if key in maps
        }
        self.run.log({log_schema.STEP: step, **images})

    def _log_heatmap(self, step: int) -> None:
        from .plots import trace_heatmap_figure

        self.run.log(
            {log_schema.STEP: step, log_schema.TRACE_HEATMAP: self._image(trace_heatmap_figure(self._traces.items()))}
        )

    def alert(self, alarm: Alarm) -> None:
        """One W&B alert per alarm episode (the monitor raises one per episode), and a row of ``curv/events``."""
        if self.run is None:
            return
        self.log_event(alarm.step, "alarm", alarm.describe())
        if not self.alerts:
            return
        self._safely(
            "alert",
            self.run.alert,
            title=f"curvopt: memorisation alarm at step {alarm.step}",
            text=alarm.describe(),
            level=self._wandb.AlertLevel.WARN,
        )

    # ------------------------------------------------------------------ training-loop metrics
    def log_training(self, step: int, metrics: Mapping[str, float]) -> None:
        """Training metrics (``train/*``) against ``train/step`` (optimizer updates)."""
        self._log({TRAIN_STEP: step, **metrics})

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Per-epoch metrics (``eval/*``, summaries) against ``epoch``."""
        self._log({"epoch": epoch, **metrics})

    def log_run(self, config: Mapping[str, Any]) -> None:
        """What was trained, into the run's config."""
        self.update_config(dict(config))

    def log_event(self, step: int, kind: str, text: str = "") -> None:
        """A training event (label-noise start, resume, ...): the ``curv/events`` table, re-logged whole."""
        if self.run is None:
            return
        self._events.append([step, kind, text])
        self._safely(
            "events",
            lambda: self.run.log(
                {
                    log_schema.STEP: step,
                    log_schema.EVENTS: self._wandb.Table(
                        columns=["step", "kind", "text"], data=[list(e) for e in self._events]
                    ),
                }
            ),
        )

    def finish(self) -> None:
        """Finish the run if this logger started it (flushes an offline run to disk)."""
        if self.run is not None and self.owns_run:
            self._safely("finish", self.run.finish)
        self.run = None

    close = finish
