"""The curvature of one batch as a linear operator on parameter vectors, with layer restriction.

:func:`curvature_operator` opens the probing context of :mod:`curvopt.engine.context` once and yields a
:class:`CurvatureOperator` whose ``matvec`` applies H (and, with ``gn``, G) to stacked vectors
through the same product engines as :func:`curvopt.estimate_curvature`. The inter-layer
estimators (:mod:`curvopt.estimators.blocks`) and the spectra (:mod:`curvopt.estimators.spectra`) are built on it:

* ``matvec(v)`` — v: list of per-tensor ``[k, *shape]`` tensors → (H v, G v or None).
* ``embed(l, x)`` — a flat vector of layer l's coordinates as a full, zero-padded direction.
* ``restrict(l, u)`` — layer l's coordinates of a full direction, flattened.

so ``restrict(l, H embed(l, x))`` is the diagonal block H_ll x.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .context import probing_context
from .layers import Layer, LayerSpec, flat_params, resolve_blocks
from .products import STRATEGIES, ProbeProblem, default_strategy, make_engine, split_batch

Tensors = list[torch.Tensor]


@dataclass
class CurvatureOperator:
    """H (and G) of one batch at fixed parameters; see the module docstring."""

    blocks: list[Layer]
    params: list[torch.Tensor]
    engine: Callable[[Tensors], tuple[Tensors, Tensors | None]]
    chunk_size: int
    loss: float
    matvecs: int = 0

    @property
    def layers(self) -> list[str]:
        return [b.name for b in self.blocks]

    @property
    def numel(self) -> dict[str, int]:
        return {b.name: b.numel for b in self.blocks}

    @property
    def dim(self) -> int:
        return sum(b.numel for b in self.blocks)

    def _tensor_ranges(self) -> list[range]:
        out, start = [], 0
        for block in self.blocks:
            out.append(range(start, start + len(block.params)))
            start += len(block.params)
        return out

    def matvec(self, v: Tensors) -> tuple[Tensors, Tensors | None]:
        """Apply the operator to ``k`` stacked directions (``k`` ≤ ``chunk_size`` per engine call)."""
        k = v[0].shape[0]
        hs: list[Tensors] = []
        gs: list[Tensors] = []
        for start in range(0, k, self.chunk_size):
            part = [t[start : start + self.chunk_size] for t in v]
            hz, gz = self.engine(part)
            hs.append([h.detach() for h in hz])
            if gz is not None:
                gs.append([g.detach() for g in gz])
        self.matvecs += k
        h = [torch.cat([c[i] for c in hs]) for i in range(len(self.params))]
        g = [torch.cat([c[i] for c in gs]) for i in range(len(self.params))] if gs else None
        return h, g

    def embed(self, layer: int, x: torch.Tensor) -> Tensors:
        """``[k, d_l]`` coordinates of layer ``layer`` → full ``[k, *shape]`` directions, zero elsewhere."""
        k = x.shape[0]
        out = [torch.zeros((k, *p.shape), dtype=p.dtype, device=p.device) for p in self.params]
        offset = 0
        for i in self._tensor_ranges()[layer]:
            n = self.params[i].numel()
            out[i] = x[:, offset : offset + n].reshape(k, *self.params[i].shape).to(self.params[i].dtype)
            offset += n
        return out

    def restrict(self, layer: int, u: Tensors) -> torch.Tensor:
        """Layer ``layer``'s coordinates of ``[k, *shape]`` directions, as ``[k, d_l]``."""
        k = u[0].shape[0]
        return torch.cat([u[i].reshape(k, -1) for i in self._tensor_ranges()[layer]], dim=1)

    def layer_sq_norms(self, u: Tensors) -> torch.Tensor:
        """``[k, L]`` float64: ‖u_v‖² per direction and layer."""
        k = u[0].shape[0]
        out = torch.zeros(k, len(self.blocks), dtype=torch.float64)
        for v, tensors in enumerate(self._tensor_ranges()):
            for i in tensors:
                out[:, v] += u[i].reshape(k, -1).double().pow(2).sum(1).cpu()
        return out

    def block_matvec(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """H_ll x for ``[k, d_l]`` coordinates x (one full product per direction)."""
        h, _ = self.matvec(self.embed(layer, x))
        return self.restrict(layer, h)


@contextlib.contextmanager
def curvature_operator(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch: tuple[object, object],
    *,
    gn: bool = False,
    layers: LayerSpec | Sequence[Layer] | None = None,
    generator: torch.Generator | None = None,
    strategy: str = "auto",
    chunk_size: int = 4,
) -> Iterator[CurvatureOperator]:
    """The operator of ``loss_fn(model(x), y)`` on ``batch``, in the probing context (train mode,
    batch statistics, one dropout mask drawn from ``generator``, everything restored on exit)."""
    inputs, targets = split_batch(batch)
    if strategy != "auto" and strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected 'auto' or one of {STRATEGIES}")
    core, blocks = resolve_blocks(model, layers)
    params = flat_params(blocks)
    if strategy == "auto":
        strategy = default_strategy(params[0].device)
    if generator is None:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    mask_seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    names = [n for block in blocks for n in block.param_names]
    with probing_context(core, mask_seed=mask_seed) as rewind:
        problem = ProbeProblem(core, loss_fn, inputs, targets, params, names, rewind)
        engine = make_engine(strategy, problem, gn=gn, chunk_size=chunk_size)
        operator = CurvatureOperator(blocks, params, engine, engine.chunk_size, float(engine.loss.detach()))
        try:
            yield operator
        finally:
            operator.engine = None  # type: ignore[assignment]  # release the kept graph
            del engine, problem
