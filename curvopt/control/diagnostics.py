"""The wrapper's second, slower cadence: the inter-layer map and per-layer spectra, logged only.

Block norms (resonance, coupling, cross-block mass Φ) and per-layer Lanczos spectra (top
eigenvalue, stable rank) on the curvature batch, from a probe stream of their own, so the main
estimates, the monitor and the LR scales are the same with or without them. A failure warns and
skips; it never stops training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..engine.layers import Layer
from ..estimators.blocks import block_norms
from ..estimators.result import BlockNorms, Spectrum
from ..estimators.spectra import layer_spectrum
from . import log_schema
from .settings import CurvatureConfig


class InterLayerDiagnostics:
    """Runs :func:`~curvopt.block_norms` and :func:`~curvopt.layer_spectrum` every ``inter_every`` steps."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        blocks: Sequence[Layer],
        settings: CurvatureConfig,
        forward: Any = None,
    ) -> None:
        self.model = model
        self.forward = forward
        self.loss_fn = loss_fn
        self.blocks = list(blocks)
        self.settings = settings
        self.generator = torch.Generator().manual_seed(settings.seed + 1)  # never touches the main probe stream
        self.last_block_norms: BlockNorms | None = None
        self.last_spectra: dict[str, Spectrum] | None = None

    def run(self, batch: tuple[Any, Any]) -> dict[str, Any]:
        """Compute both on ``batch``; return the metrics to log (exceptions propagate to the caller)."""
        s = self.settings
        norms = block_norms(
            self.model,
            self.loss_fn,
            batch,
            probes=s.inter_probes,
            layers=self.blocks,
            generator=self.generator,
            strategy=s.strategy,
            forward=self.forward,
        )
        spectra = layer_spectrum(
            self.model,
            self.loss_fn,
            batch,
            layers=self.blocks,
            steps=s.spectrum_steps,
            slq_probes=s.spectrum_starts,
            slq_steps=max(2, s.spectrum_steps),
            generator=self.generator,
            strategy=s.strategy,
            forward=self.forward,
        )
        self.last_block_norms, self.last_spectra = norms, spectra
        phi, phi_se = norms.phi()
        metrics: dict[str, Any] = {
            log_schema.PHI: phi,
            log_schema.PHI_SE: phi_se,
            log_schema.INTER_LAYERS: list(norms.layers),
            log_schema.RESONANCE: norms.resonance()[0].tolist(),
            log_schema.COUPLING: norms.coupling()[0].tolist(),
        }
        for name, spectrum in spectra.items():
            metrics[log_schema.per_layer("top_eig", name)] = spectrum.top[0]
            metrics[log_schema.per_layer("stable_rank", name)] = spectrum.stable_rank
        return metrics
