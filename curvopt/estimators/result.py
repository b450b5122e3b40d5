"""The estimators' result types, in one module: :class:`CurvatureEstimate` (per-layer traces, Gauss-Newton parts,
GN-Gap and row-block norms of one estimate), :class:`LayerEstimate` (a per-layer value and its standard error),
:class:`Spectrum` (a block's Lanczos/SLQ spectrum) and :class:`BlockNorms` (the inter-layer map), with the small
statistics they share. GN-Gap is the Frobenius ratio of “Inter-Layer Hessian Analysis of Neural Networks with DAG
Architectures” (arXiv, 2026), restricted to a layer's row block (:mod:`curvopt.estimators.trace`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .summary import format_estimate

# Rows of CurvatureEstimate.samples, per probe and layer.
SAMPLE_KINDS = ("trace", "gn_trace", "hess_row_sq", "gn_row_sq", "tensor_row_sq")


class NonFiniteCurvatureError(FloatingPointError):
    """A curvature product came out NaN/Inf; ``layers`` names where."""

    def __init__(self, message: str, layers: Sequence[str]):
        super().__init__(message)
        self.layers = list(layers)


def mean_and_se(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Column means and standard errors s/√K of ``[K, L]`` samples (NaN SE when K = 1)."""
    k = values.shape[0]
    mean = values.mean(0)
    if k < 2:
        return mean, torch.full_like(mean, float("nan"))
    return mean, values.std(0, unbiased=True) / math.sqrt(k)


def safe_ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return float("nan") if num == 0 else float("inf")


@dataclass
class CurvatureEstimate:
    """Per-layer curvature estimates from K shared probes.

    Attributes:
        layers: layer names (one per parameter-owning module, or the caller's grouping).
        numel: coordinates d_l per layer.
        samples: kind -> ``[K, L]`` float64 per-probe values, kinds in ``SAMPLE_KINDS``
            (``gn_trace`` and the row norms of G and Hᵀ only when ``gn``).
        loss: the mini-batch loss the curvature belongs to.
        distribution, strategy, batch_size: how it was computed.
        layer_types: the owning module's class per layer (``Conv2d``), for labels.
        estimator: ``"hutchinson"``, ``"hutch++"`` or ``"xtrace"`` (:mod:`curvopt.estimators.deflation`; then
            ``samples`` hold one deflated value per row, each plus its exact low-rank part, and ``products``
            is K).
    """

    layers: list[str]
    numel: dict[str, int]
    samples: dict[str, torch.Tensor]
    loss: float = float("nan")
    distribution: str = "rademacher"
    strategy: str = "autograd"
    batch_size: int = 0
    layer_types: dict[str, str] = field(default_factory=dict)
    estimator: str = "hutchinson"
    products: int = 0  # Hessian-vector products spent (0: one per probe)
    curvature_dtype: str | None = None  # the products' precision (None: the parameters' dtype)
    gradient_sq: dict[str, float] = field(default_factory=dict)  # ‖∇_l L‖² on the curvature batch (empty: unknown)
    trace: dict[str, float] = field(init=False)
    trace_se: dict[str, float] = field(init=False)
    gn_trace: dict[str, float] = field(init=False, default_factory=dict)
    gn_trace_se: dict[str, float] = field(init=False, default_factory=dict)
    tensor_trace: dict[str, float] = field(init=False, default_factory=dict)
    tensor_trace_se: dict[str, float] = field(init=False, default_factory=dict)
    gn_gap: dict[str, float] = field(init=False, default_factory=dict)
    gn_gap_trace: dict[str, float] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.trace, self.trace_se = self._per_layer(self.samples["trace"])
        if not self.has_gn:
            return
        self.gn_trace, self.gn_trace_se = self._per_layer(self.samples["gn_trace"])
        tensor = self.samples["trace"] - self.samples["gn_trace"]
        self.tensor_trace, self.tensor_trace_se = self._per_layer(tensor)
        t_sq = self.samples["tensor_row_sq"].mean(0)
        g_sq = self.samples["gn_row_sq"].mean(0)
        for i, name in enumerate(self.layers):
            self.gn_gap[name] = math.sqrt(safe_ratio(float(t_sq[i]), float(g_sq[i])))
            self.gn_gap_trace[name] = safe_ratio(self.tensor_trace[name], self.gn_trace[name])

    def _per_layer(self, values: torch.Tensor) -> tuple[dict[str, float], dict[str, float]]:
        mean, se = mean_and_se(values)
        return (
            {n: float(mean[i]) for i, n in enumerate(self.layers)},
            {n: float(se[i]) for i, n in enumerate(self.layers)},
        )

    @property
    def has_gn(self) -> bool:
        return "gn_trace" in self.samples

    def label(self, name: str) -> str:
        """``layer1.0.conv1 · Conv2d`` (the name alone when the type is unknown)."""
        kind = self.layer_types.get(name, "")
        return f"{name} · {kind}" if kind else name

    def summary(self) -> str:
        """The per-layer table: trace ± SE, GN trace and GN-Gap per layer, the model total and a legend."""
        return format_estimate(self)

    def __repr__(self) -> str:
        gap = f", GN-Gap {self.total_gn_gap:.3g}" if self.has_gn else ""
        return (
            f"CurvatureEstimate({len(self.layers)} layers, K={self.probes}, tr H = {self.total_trace:.4g} ± "
            f"{self.total_trace_se:.2g}{gap}, loss {self.loss:.4g}, batch {self.batch_size})"
        )

    @property
    def probes(self) -> int:
        return int(self.samples["trace"].shape[0])

    def mean_eigenvalue(self, name: str) -> float:
        """τ_l = tr(H_ll) / d_l, the block's mean eigenvalue."""
        return self.trace[name] / self.numel[name]

    @property
    def frobenius(self) -> dict[str, float]:
        """‖H_{l,:}‖_F² / d_l per layer: the mean squared Hessian eigenvalue of the row block (never negative)."""
        sums = self.samples["hess_row_sq"].mean(0)
        return {name: float(sums[i]) / self.numel[name] for i, name in enumerate(self.layers)}

    @property
    def total_frobenius(self) -> float:
        """‖H‖_F² / P over the probed parameters."""
        return float(self.samples["hess_row_sq"].mean(0).sum()) / sum(self.numel.values())

    def _total(self, values: torch.Tensor) -> tuple[float, float]:
        mean, se = mean_and_se(values.sum(1, keepdim=True))
        return float(mean[0]), float(se[0])

    @property
    def total_trace(self) -> float:
        """Σ_l T̂_l, an unbiased estimate of tr H over the probed blocks."""
        return self._total(self.samples["trace"])[0]

    @property
    def total_trace_se(self) -> float:
        """Standard error of the total, from per-probe totals (covariances included)."""
        return self._total(self.samples["trace"])[1]

    @property
    def total_gradient_sq(self) -> float:
        """‖∇L‖² over the probed parameters, on the curvature batch (NaN when the engine did not compute it)."""
        return sum(self.gradient_sq.values()) if self.gradient_sq else float("nan")

    @property
    def total_gn_trace(self) -> float:
        return self._total(self.samples["gn_trace"])[0]

    @property
    def total_gn_gap(self) -> float:
        """‖Hᵀ‖_F / ‖G‖_F over the probed parameters (the GN-Gap of the paper cited in the module docstring)."""
        return math.sqrt(
            safe_ratio(
                float(self.samples["tensor_row_sq"].sum(1).mean()), float(self.samples["gn_row_sq"].sum(1).mean())
            )
        )

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat ``{"trace/<layer>": …, "trace_se/<layer>": …, …, "total/trace": …}`` for loggers."""
        flat: dict[str, float] = {}
        groups = {"trace": self.trace, "trace_se": self.trace_se, "frob": self.frobenius, "grad_sq": self.gradient_sq}
        if self.has_gn:
            groups |= {
                "gn_trace": self.gn_trace,
                "tensor_trace": self.tensor_trace,
                "gn_gap": self.gn_gap,
                "gn_gap_trace": self.gn_gap_trace,
            }
        for kind, values in groups.items():
            for name, value in values.items():
                flat[f"{prefix}{kind}/{name}"] = value
        flat[f"{prefix}total/trace"] = self.total_trace
        flat[f"{prefix}total/trace_se"] = self.total_trace_se
        flat[f"{prefix}total/frob"] = self.total_frobenius
        if self.gradient_sq:
            flat[f"{prefix}total/grad_sq"] = self.total_gradient_sq
        if self.has_gn:
            flat[f"{prefix}total/gn_trace"] = self.total_gn_trace
            flat[f"{prefix}total/gn_gap"] = self.total_gn_gap
        flat[f"{prefix}loss"] = self.loss
        return flat


@dataclass(frozen=True)
class LayerEstimate:
    """Per-layer estimates and their standard errors over the ``probes`` probes (``se`` is NaN for one probe)."""

    value: dict[str, torch.Tensor | float]
    se: dict[str, torch.Tensor | float]
    probes: int


@dataclass
class Spectrum:
    """Spectral summary of one symmetric block (a layer's H_ll or the whole H)."""

    name: str
    numel: int
    ritz: torch.Tensor  # Lanczos Ritz values, ascending
    nodes: torch.Tensor  # SLQ nodes [n_v, m]
    weights: torch.Tensor  # SLQ weights [n_v, m], rows sum to 1
    top: list[float] = field(init=False)
    top_k: int = 1

    def __post_init__(self) -> None:
        self.top = self.ritz.flip(0)[: self.top_k].tolist()

    @property
    def spectral_norm(self) -> float:
        """‖H‖₂ ≈ max |Ritz value|."""
        return float(self.ritz.abs().max())

    def moment(self, power: int) -> float:
        """∫ λ^p dφ(λ) from the SLQ measure (p = 1: tr(H)/d, p = 2: tr(H²)/d)."""
        if self.nodes.numel() == 0:
            return math.nan
        return float((self.weights * self.nodes.pow(power)).sum(1).mean())

    def moment_se(self, power: int) -> float:
        """Standard error of :meth:`moment` over the SLQ starts."""
        per_start = (self.weights * self.nodes.pow(power)).sum(1)
        if per_start.numel() < 2:
            return math.nan
        return float(per_start.std(unbiased=True) / math.sqrt(per_start.numel()))

    @property
    def frobenius_sq(self) -> float:
        """‖H‖_F² = tr(H²) ≈ d · ∫λ² dφ."""
        return self.numel * self.moment(2)

    @property
    def stable_rank(self) -> float:
        """D = ‖H‖_F² / ‖H‖₂² (1 for rank one, d for H ∝ I)."""
        return self.frobenius_sq / self.spectral_norm**2

    def density(self, grid: torch.Tensor, sigma: float | None = None) -> torch.Tensor:
        """The SLQ measure smoothed by a Gaussian of width ``sigma`` (default: 1 % of the node range)."""
        nodes, weights = self.nodes.reshape(-1), self.weights.reshape(-1) / self.nodes.shape[0]
        if sigma is None:
            sigma = max(float(nodes.max() - nodes.min()) / 100, 1e-12)
        g = grid.double()[:, None]
        kernel = torch.exp(-0.5 * ((g - nodes[None, :]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        return (kernel * weights[None, :]).sum(1)


@dataclass
class BlockNorms:
    """Per-probe squared block norms and the quantities derived from them.

    Attributes:
        layers: layer names (rows/columns of every map).
        numel: coordinates per layer.
        samples: kind ("hess", and with GN "gn", "tensor") → ``[K, L, L]`` float64 with
            ``samples[kind][k, v, w] = ‖(A z^{(k)}_w)_v‖²`` (source layer w, receiving layer v).
    """

    layers: list[str]
    numel: dict[str, int]
    samples: dict[str, torch.Tensor]
    loss: float = float("nan")
    sq: torch.Tensor = field(init=False)
    sq_se: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.sq, self.sq_se = self.squared("hess")

    @property
    def probes(self) -> int:
        return int(self.samples["hess"].shape[0])

    def squared(self, kind: str = "hess") -> tuple[torch.Tensor, torch.Tensor]:
        """``(‖A_vw‖_F², SE)`` as L × L tensors, symmetrised (the mean of both directions)."""
        s = self.samples[kind]
        pairs = torch.cat([s, s.transpose(1, 2)])  # 2K samples per entry (K on the diagonal, counted twice)
        mean = pairs.mean(0)
        k = s.shape[0]
        if k < 2:
            return mean, torch.full_like(mean, float("nan"))
        # SE of the mean of (s_vw + s_wv)/2 over the K probes (the two directions share a probe)
        sym = 0.5 * (s + s.transpose(1, 2))
        return mean, sym.std(0, unbiased=True) / math.sqrt(k)

    # ------------------------------------------------------------------ derived quantities
    @staticmethod
    def _resonance(sq: torch.Tensor) -> torch.Tensor:
        return sq.clamp_min(0).sqrt()

    @staticmethod
    def _coupling(sq: torch.Tensor) -> torch.Tensor:
        r = sq.clamp_min(0).sqrt()
        d = r.diagonal().sqrt()
        return r / (d[:, None] * d[None, :])

    @staticmethod
    def _phi(sq: torch.Tensor) -> torch.Tensor:
        return 1.0 - sq.diagonal().sum() / sq.sum()

    def _jackknife(self, fn: Callable[[torch.Tensor], torch.Tensor], kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.samples[kind]
        k = s.shape[0]
        full = fn(0.5 * (s + s.transpose(1, 2)).mean(0))
        if k < 2:
            return full, torch.full_like(full, float("nan"))
        sym = 0.5 * (s + s.transpose(1, 2))
        total = sym.sum(0)
        loo = torch.stack([fn((total - sym[i]) / (k - 1)) for i in range(k)])
        se = ((k - 1) / k * (loo - loo.mean(0)).pow(2).sum(0)).sqrt()
        return full, se

    def resonance(self, kind: str = "hess") -> tuple[torch.Tensor, torch.Tensor]:
        """R(v, w) = ‖A_vw‖_F and its jackknife SE."""
        return self._jackknife(self._resonance, kind)

    def coupling(self, kind: str = "hess") -> tuple[torch.Tensor, torch.Tensor]:
        """C(v, w) = ‖A_vw‖_F / sqrt(‖A_vv‖_F ‖A_ww‖_F) and its jackknife SE."""
        return self._jackknife(self._coupling, kind)

    def phi(self, kind: str = "hess") -> tuple[float, float]:
        """Φ = 1 − Σ_v ‖A_vv‖_F² / ‖A‖_F² and its jackknife SE."""
        value, se = self._jackknife(self._phi, kind)
        return float(value), float(se)

    def gn_gap(self) -> torch.Tensor:
        """‖Hᵀ_vw‖_F / ‖G_vw‖_F per block (needs ``gn``)."""
        if "gn" not in self.samples:
            raise ValueError("block GN-Gap needs block_norms(..., gn=True)")
        return (self.squared("tensor")[0] / self.squared("gn")[0]).clamp_min(0).sqrt()

    def to_dict(self) -> dict[str, object]:
        """For loggers: ``inter/phi`` (float) and the L × L maps as nested lists."""
        phi, phi_se = self.phi()
        return {
            "inter/phi": phi,
            "inter/phi_se": phi_se,
            "inter/layers": list(self.layers),
            "inter/resonance": self.resonance()[0].tolist(),
            "inter/coupling": self.coupling()[0].tolist(),
        }
