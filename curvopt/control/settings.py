"""Every option in two records: :class:`CurvatureConfig` (what is estimated, how often) and :class:`MonitorConfig`
(the memorisation monitor's rule).

One field per option, with its default, its check and its meaning (``metadata["help"]``); where ``curvopt train``
has a flag for it, the flag's name (``metadata["flag"]``) and how the flag's text is read. The wrapper, both framework
callbacks and the command line all take the same records (or their fields as keywords), so a new option is one new
field here: the keywords, the CLI flag, its recipe key and its help text all follow from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..engine.context import CURVATURE_DTYPES, resolve_curvature_dtype
from ..engine.strategies import STRATEGIES
from ..estimators.deflation import ESTIMATORS, split_products
from ..estimators.distributed import PROBE_MODES
from .cadence import DEFAULT_EVERY
from .changepoint import MIN_SEGMENT

SIGNALS = ("frobenius", "trace")
"""The monitor's per-layer signal: the row block's squared Frobenius norm per parameter, or the mean eigenvalue."""
ONSETS = ("fit", "page")
"""How an alarm's change point is placed (:mod:`curvopt.control.monitor`)."""
TAIL_RATE_PER_K = 0.3
"""θ = 0.3 k in P(a stationary series alarms within 1000 estimates) ∝ exp(−θ h). A single series' measured θ is
≈ 0.3–0.4 at k = 0.5 (Gaussian and Student-t noise), but layers move together and a bad batch makes all of them
outliers at once: the union bound ln(L)/θ with θ = 0.7 k let 18 % of heavy-tailed runs with 161 correlated
layers alarm within 1000 estimates; 0.3 k keeps 1 ≤ L ≤ 161 within the budget (benchmarks/RESULTS.md §12)."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_probes(text: str) -> int | str:
    """A command line's K: an integer or ``"auto"``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def option(help: str, flag: str | None = None, parse: Any = None, choices: tuple[Any, ...] | None = None) -> Any:
    """A field's metadata: what it means; the ``curvopt train`` flag for it (``None``: none), how the flag's text is
    read (default: the field's type) and its choices."""
    return {"help": help, "flag": flag, "parse": parse, "choices": choices}


@dataclass
class CurvatureConfig:
    """How often and how curvature is estimated: the options of :class:`~curvopt.CurvatureAwareOptimizer`, of the
    framework callbacks and of ``curvopt train``'s curvature flags (see each field's ``metadata["help"]``, listed
    by :func:`describe_options`).

    Construction validates every field and raises ``ValueError`` naming the field and the value.
    """

    every: int | None = field(
        default=None,
        metadata=option(
            "estimate every N optimizer steps (only steps that reach the optimizer count; 0: never); None: chosen "
            f"from the run's length where it is known (curvopt train, the callbacks), else {DEFAULT_EVERY}",
            "--curv-every",
            int,
        ),
    )
    probes: int | str = field(
        default=8,
        metadata=option("Hutchinson probes K, or 'auto' (K adapted within auto_probes)", "--curv-probes", parse_probes),
    )
    curvature_batch_size: int = field(
        default=32, metadata=option("samples of the batch used for curvature (its first N)", "--curv-batch-size", int)
    )
    gn: bool = field(default=True, metadata=option("also estimate Gauss-Newton traces and the GN-Gap", "--curv-gn"))
    strategy: str = field(
        default="auto",
        metadata=option(
            "how the products are computed: auto (exact autograd where it runs, finite differences where it cannot: "
            "FSDP, reentrant checkpointing), an exact strategy, or finite-difference (smooth models only)",
            "--curv-strategy",
            choices=("auto", *STRATEGIES),
        ),
    )
    estimator: str = field(
        default="hutchinson",
        metadata=option(
            "how the K products become per-layer traces (hutch++ and xtrace deflate; xtrace needs an even K >= 6)",
            "--curv-estimator",
            choices=tuple(ESTIMATORS),
        ),
    )
    curvature_dtype: str | None = field(
        default=None,
        metadata=option(
            "precision of the products: None (the parameters' dtype under the global flags), float32 (no TF32), "
            "tf32 (CUDA) or bfloat16 (bf16 autocast inside the products; errors in benchmarks/RESULTS.md)",
            "--curv-dtype",
            choices=CURVATURE_DTYPES,
        ),
    )
    seed: int = field(default=0, metadata=option("seeds the probe generator (probes and dropout masks of estimates)"))
    history: int = field(default=256, metadata=option("past estimates kept (as flat dicts) in the wrapper's history"))
    auto_probes: tuple[int, int] = field(default=(4, 32), metadata=option("probes='auto': the (low, high) bounds of K"))
    distributed_probes: str = field(
        default="independent",
        metadata=option(
            "under a process group: per-rank probes (effective K = world size x K) or one shared set (exactly the "
            "single-process estimate on the concatenated batch)",
            "--curv-dist-probes",
            choices=tuple(PROBE_MODES),
        ),
    )
    inter_every: int = field(
        default=0,
        metadata=option(
            "inter-layer map and per-layer Lanczos spectra every N optimizer steps (0: off; costly, logged only)",
            "--curv-inter-every",
            int,
        ),
    )
    inter_probes: int = field(default=4, metadata=option("probes of the inter-layer block norms"))
    spectrum_steps: int = field(default=20, metadata=option("Lanczos steps of the per-layer spectra"))
    spectrum_starts: int = field(default=2, metadata=option("random starts averaged in the spectra's SLQ moments"))

    def __post_init__(self) -> None:
        if self.every is not None and (not _is_int(self.every) or self.every < 0):
            raise ValueError(f"every must be an integer >= 0 (0 turns monitoring off) or None, got {self.every!r}")
        if self.probes != "auto" and (not _is_int(self.probes) or self.probes < 1):
            raise ValueError(f"probes must be an integer >= 1 or 'auto', got {self.probes!r}")
        if not _is_int(self.curvature_batch_size) or self.curvature_batch_size < 1:
            raise ValueError(f"curvature_batch_size must be an integer >= 1, got {self.curvature_batch_size!r}")
        if not _is_int(self.history) or self.history < 1:
            raise ValueError(f"history must be an integer >= 1, got {self.history!r}")
        low, high = self.auto_probes
        if not (_is_int(low) and _is_int(high) and 1 <= low <= high):
            raise ValueError(f"auto_probes must be (low, high) with 1 <= low <= high, got {self.auto_probes!r}")
        if not _is_int(self.inter_every) or self.inter_every < 0:
            raise ValueError(f"inter_every must be an integer >= 0 (0: off), got {self.inter_every!r}")
        for name in ("inter_probes", "spectrum_steps", "spectrum_starts"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.strategy != "auto" and self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be 'auto' or one of {STRATEGIES}, got {self.strategy!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.estimator != "hutchinson" and self.probes != "auto":
            split_products(self.estimator, int(self.probes))  # raises ValueError for a K it cannot split
        self.auto_probes = tuple(self.auto_probes)
        self.curvature_dtype = resolve_curvature_dtype(self.curvature_dtype)  # ValueError names the choices
        if self.distributed_probes not in PROBE_MODES:
            raise ValueError(f"distributed_probes must be one of {PROBE_MODES}, got {self.distributed_probes!r}")

    def samples_per_estimate(self, products: int) -> int:
        """Rows of an estimate's samples for K = ``products`` (K for Hutchinson; fewer for deflated estimators)."""
        return products if self.estimator == "hutchinson" else split_products(self.estimator, products)[1]

    @property
    def interval(self) -> int:
        """Optimizer steps between estimates: ``every``, or :data:`DEFAULT_EVERY` when it was left to the run."""
        return DEFAULT_EVERY if self.every is None else self.every

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) is a curvature step."""
        return self.interval > 0 and step % self.interval == 0

    def inter_due(self, step: int) -> bool:
        """Whether step ``step`` runs the slower inter-layer diagnostics."""
        return self.inter_every > 0 and step % self.inter_every == 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def build(cls, config: CurvatureConfig | None = None, **options: Any) -> CurvatureConfig:
        """``config`` (default: the defaults) with ``options`` replacing its fields; TypeError naming the options
        for a keyword that is not one (a typo must not be ignored)."""
        return _build(cls, config, options, "curvature")


@dataclass
class MonitorConfig:
    """The memorisation monitor's rule (:class:`~curvopt.CusumMonitor` takes this record or its fields as keywords;
    ``curvopt train``'s ``--cusum-*`` flags are made from it). Defaults and their measurement: the monitor's module
    docstring and benchmarks/RESULTS.md §12 and §15."""

    k: float = field(default=0.5, metadata=option("CUSUM reference value k (σ units per estimate)", "--cusum-k", float))
    h: float = field(
        default=10.0,
        metadata=option("CUSUM threshold h (per layer: h + ln(L)/(0.3k) for L layers)", "--cusum-threshold", float),
    )
    warmup: int = field(
        default=8,
        metadata=option(
            "noise-scale increments the monitor calibrates on: it is ready after warmup + 1 estimates",
            "--cusum-warmup",
            int,
        ),
    )
    smoothing: float = field(default=0.3, metadata=option("EWMA weight a of the newest log value (1: no smoothing)"))
    trough_smoothing: float = field(default=0.1, metadata=option("EWMA weight of the slow series the trough follows"))
    leak: float = field(default=0.02, metadata=option("how fast (σ0 per estimate) the trough may rise"))
    clip: float = field(default=3.0, metadata=option("new log values are clipped to the fast level ± clip·σ0"))
    window: int = field(default=64, metadata=option("increments kept for the online σ0"))
    floor: float = field(default=1e-3, metadata=option("relative floor under the log (× the first positive value)"))
    signal: str = field(default="frobenius", metadata=option("the per-layer signal", choices=SIGNALS))
    alarm_on: str = field(
        default="layer",
        metadata=option(
            "which series raise the alarm: any layer's (each against h + ln(L)/θ) or the model-wide one (against h)",
            "--cusum-alarm-on",
            choices=("layer", "aggregate"),
        ),
    )
    min_sigma: float = field(default=1e-3, metadata=option("lower bound on σ0"))
    tail_rate: float = field(
        default=TAIL_RATE_PER_K, metadata=option("θ / k in the per-layer term ln(L)/θ and the long-run term")
    )
    long_run: int = field(
        default=1000, metadata=option("T: after T estimates every threshold grows by 2 ln(n/T)/θ (0: never)")
    )
    gradient: bool = field(
        default=True,
        metadata=option(
            "also watch the loss-gradient norm as its own CUSUM series (threshold gradient_h): it jumps at once after "
            "a label switch",
            "--cusum-gradient",
        ),
    )
    gradient_h: float = field(default=12.0, metadata=option("the gradient-norm series' threshold"))
    onset: str = field(
        default="fit",
        metadata=option(
            "an alarm's change point: fit (an abrupt two-phase break after calibration, else Page's) or page (where "
            "the CUSUM last left zero)",
            "--cusum-onset",
            choices=ONSETS,
        ),
    )
    history: int = field(default=512, metadata=option("log values kept per series for the fitted change point"))
    fitted_loss: float = field(
        default=0.02,
        metadata=option(
            "no alarm while the training loss (smoothed like the signals) is below this fraction of its first value: "
            "a network that fits all its labels has none left to memorise, though its curvature can still rise as "
            "it sharpens (0: off)",
            "--cusum-fitted-loss",
            float,
        ),
    )
    loss_jump: float = field(
        default=0.25,
        metadata=option(
            "alarm when the training loss (smoothed like the signals) climbs back above its lowest level by this "
            "fraction of its first value: labels that changed (a switch to wrong labels) make it jump at once, "
            "epochs before the network memorises them; the change point is the estimate at which the jump showed "
            "(0: off)",
            "--cusum-loss-jump",
            float,
        ),
    )

    def __post_init__(self) -> None:
        if self.k < 0 or self.h <= 0:
            raise ValueError(f"need k >= 0 and h > 0, got k={self.k}, h={self.h}")
        if self.warmup < 3:
            raise ValueError(f"warmup must be >= 3 estimates, got {self.warmup}")
        if not 0 < self.smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {self.smoothing}")
        if not 0 < self.trough_smoothing <= self.smoothing:
            raise ValueError(f"trough_smoothing must be in (0, smoothing], got {self.trough_smoothing}")
        if self.leak < 0 or self.clip <= 0 or self.window < 4:
            raise ValueError(f"need leak >= 0, clip > 0 and window >= 4, got {self.leak}, {self.clip}, {self.window}")
        if not 0 < self.floor < 1:
            raise ValueError(f"floor must be in (0, 1), got {self.floor}")
        if self.signal not in SIGNALS:
            raise ValueError(f"unknown signal {self.signal!r}; expected one of {SIGNALS}")
        if self.alarm_on not in ("aggregate", "layer"):
            raise ValueError(f"alarm_on must be 'aggregate' or 'layer', got {self.alarm_on!r}")
        if not self.tail_rate > 0 or self.long_run < 0:
            raise ValueError(f"need tail_rate > 0 and long_run >= 0, got {self.tail_rate}, {self.long_run}")
        if self.onset not in ONSETS:
            raise ValueError(f"unknown onset {self.onset!r}; expected one of {ONSETS}")
        if not (math.isfinite(self.loss_jump) and self.loss_jump >= 0):
            raise ValueError(f"loss_jump must be a fraction >= 0 (0: off), got {self.loss_jump}")
        if not 0 <= self.fitted_loss < 1:
            raise ValueError(f"fitted_loss must be in [0, 1), got {self.fitted_loss}")
        if self.history < 2 * MIN_SEGMENT:
            raise ValueError(f"history must be >= {2 * MIN_SEGMENT} estimates, got {self.history}")

    @classmethod
    def build(cls, config: MonitorConfig | None = None, **options: Any) -> MonitorConfig:
        """``config`` with ``options`` replacing its fields; TypeError naming the options for an unknown keyword."""
        return _build(cls, config, options, "monitor")


def _build(cls: Any, config: Any, options: Mapping[str, Any], what: str) -> Any:
    names = option_names(cls)
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise TypeError(f"unknown {what} option {unknown[0]!r}; the options are: {', '.join(names)}")
    if config is not None and not isinstance(config, cls):
        raise TypeError(f"config must be a curvopt.{cls.__name__}, got {type(config).__name__}")
    return dataclasses.replace(config if config is not None else cls(), **options)


def option_names(record: type = CurvatureConfig) -> tuple[str, ...]:
    """The names of a record's fields: the keywords the wrapper, the callbacks and the monitor take for them."""
    return tuple(f.name for f in dataclasses.fields(record))


def flagged_options(record: type = CurvatureConfig) -> Iterator[tuple[dataclasses.Field, Mapping[str, Any]]]:
    """A record's fields that have a ``curvopt train`` flag, with their metadata."""
    for f in dataclasses.fields(record):
        if f.metadata.get("flag"):
            yield f, f.metadata


def flag_dest(flag: str) -> str:
    """The ``argparse`` attribute (and recipe key) of a flag: ``--curv-every`` → ``curv_every``."""
    return flag.lstrip("-").replace("-", "_")


def describe_options(record: type = CurvatureConfig) -> str:
    """A record's options, their defaults and meanings, one per line (for docs and ``help``)."""
    return "\n".join(f"{f.name} = {f.default!r}: {f.metadata['help']}" for f in dataclasses.fields(record))
