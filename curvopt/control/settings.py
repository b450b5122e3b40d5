"""Every curvature option in one record: :class:`CurvatureConfig`.

One field per option, with its default, its check and its meaning (``metadata["help"]``); where ``curvopt train``
has a flag for it, the flag's name (``metadata["flag"]``) and how the flag's text is read. The wrapper, both framework
callbacks and the command line all take the same record (or its fields as keywords), so a new option is one new
field here: the wrapper's keywords, the callbacks' keywords, the CLI flag, its recipe key and its help text all
follow from it.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from ..engine.context import CURVATURE_DTYPES, resolve_curvature_dtype
from ..engine.strategies import STRATEGIES
from ..estimators.deflation import ESTIMATORS, split_products
from ..estimators.distributed import PROBE_MODES
from .cadence import DEFAULT_EVERY


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
        unknown = sorted(set(options) - set(option_names()))
        if unknown:
            raise TypeError(f"unknown curvature option {unknown[0]!r}; the options are: {', '.join(option_names())}")
        if config is not None and not isinstance(config, cls):
            raise TypeError(f"config must be a curvopt.CurvatureConfig, got {type(config).__name__}")
        return dataclasses.replace(config if config is not None else cls(), **options)


def option_names() -> tuple[str, ...]:
    """The names of :class:`CurvatureConfig`'s fields: the keywords the wrapper and the callbacks take for them."""
    return tuple(f.name for f in dataclasses.fields(CurvatureConfig))


def flagged_options() -> Iterator[tuple[dataclasses.Field, Mapping[str, Any]]]:
    """The fields that have a ``curvopt train`` flag, with their metadata."""
    for f in dataclasses.fields(CurvatureConfig):
        if f.metadata.get("flag"):
            yield f, f.metadata


def flag_dest(flag: str) -> str:
    """The ``argparse`` attribute (and recipe key) of a flag: ``--curv-every`` → ``curv_every``."""
    return flag.lstrip("-").replace("-", "_")


def describe_options() -> str:
    """Every option, its default and its meaning, one per line (for docs and ``help``)."""
    return "\n".join(f"{f.name} = {f.default!r}: {f.metadata['help']}" for f in dataclasses.fields(CurvatureConfig))
