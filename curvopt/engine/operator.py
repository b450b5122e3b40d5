"""The curvature of one batch as a linear operator on parameter vectors, with layer restriction.

:func:`curvature_operator` is the one place a probing session opens: it checks the batch, resolves
the blocks and the strategy, enters the probing context of :mod:`curvopt.engine.context` once and
yields a :class:`CurvatureOperator` whose ``engine`` / ``matvec`` apply H (and, with ``gn``, G) to
stacked vectors. Every estimator is built on it (:mod:`curvopt.estimators`):

* ``matvec(v)`` — v: list of per-tensor ``[k, *shape]`` tensors → (H v, G v or None).
* ``embed(l, x)`` — a flat vector of layer l's coordinates as a full, zero-padded direction.
* ``restrict(l, u)`` — layer l's coordinates of a full direction, flattened.

so ``restrict(l, H embed(l, x))`` is the diagonal block H_ll x. On exit the loss is checked: a
non-finite loss raises ``FloatingPointError`` (curvature of a NaN loss is undefined), and a
finite-difference session that ran its self-check warns about the layers where finite differences do
not estimate autograd's Hessian (:class:`~curvopt.engine.finite_difference.FiniteDifferenceWarning`).

**FSDP2.** On a model sharded by ``fully_shard`` (``strategy="finite-difference"`` or ``"auto"``) the
engine works on this rank's shards: ``localize`` turns full directions (drawn identically on every rank)
into shards, products come back as shards of the *global*-batch products (FSDP reduce-scatters the
gradients), and ``sum_over_ranks`` completes any sum over coordinates. Only the per-probe estimators of
:func:`~curvopt.estimate_curvature` (Hutchinson) run there; ``matvec`` refuses.
"""

from __future__ import annotations

import contextlib
import secrets
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .batch import Forward, batch_size, check_finite_loss, split_batch
from .context import probing_context, resolve_curvature_dtype
from .finite_difference import (
    LINEARITY_TOLERANCE,
    TRUNCATION_TOLERANCE,
    FiniteDifferenceWarning,
    StepCheck,
)
from .layers import Layer, LayerSpec, flat_params, resolve_blocks
from .probes import derive_seed
from .products import CurvatureStrategyError, ProbeProblem
from .sharding import all_reduce_sum, is_sharded, localize, world_size
from .strategies import FINITE_DIFFERENCE, STRATEGIES, AutoEngine, exact_strategy_runs, make_engine

Tensors = list[torch.Tensor]


@dataclass
class CurvatureOperator:
    """H (and G) of one batch at fixed parameters; see the module docstring."""

    blocks: list[Layer]
    params: list[torch.Tensor]
    engine: Callable[[Tensors], tuple[Tensors, Tensors | None]]
    chunk_size: int
    strategy: str = "autograd"
    batch_size: int = 0
    loss: float = float("nan")  # set when the session closes
    gradient_sq: list[float] | None = None  # ‖∇_l L‖² per layer, set when the session closes (None: not computed)
    matvecs: int = 0
    sharded: bool = False

    def localize(self, directions: Tensors) -> Tensors:
        """Full ``[k, *shape]`` directions → this rank's shards (as they are when the model is not sharded)."""
        return localize(directions, self.params) if self.sharded else directions

    def _local_gradient_sq(self) -> torch.Tensor | None:
        """``[L]`` float64 on the gradient's device: ‖∇_l L‖² per layer (this rank's shards) of the loss gradient the
        engine computed at θ on the way (no extra pass, no host sync; ``None`` for an engine that has none, e.g.
        ``func-vmap``). The session's close carries it to the host with the loss."""
        gradient = getattr(self.engine, "gradient", None)
        if gradient is None:
            return None
        return torch.stack(
            [sum(gradient[i].double().pow(2).sum() for i in tensors) for tensors in self._tensor_ranges()]
        )

    def sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        """Complete a sum over coordinates whose per-rank parts ``values`` hold (identity when not sharded)."""
        return all_reduce_sum(values) if self.sharded else values

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
        if self.sharded:
            raise CurvatureStrategyError(
                "on an FSDP-sharded model only estimate_curvature's per-layer Hutchinson estimates run (block "
                "norms, spectra and the deflated estimators need whole product vectors); estimate those on an "
                "unsharded replica"
            )
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

    def flatten(self, vectors: Tensors) -> torch.Tensor:
        """Per-tensor ``[k, *shape]`` directions as one ``[k, P]`` float32 matrix (layer order)."""
        k = vectors[0].shape[0]
        return torch.cat([v.reshape(k, -1).to(torch.float32) for v in vectors], dim=1)

    def unflatten(self, flat: torch.Tensor) -> Tensors:
        """A ``[k, P]`` matrix as per-tensor ``[k, *shape]`` directions (the inverse of :meth:`flatten`)."""
        pieces = torch.split(flat, [p.numel() for p in self.params], dim=1)
        return [x.reshape(flat.shape[0], *p.shape).to(p.dtype) for x, p in zip(pieces, self.params)]

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

    # ------------------------------------------------------------------ one direction, as users write it
    @property
    def shapes(self) -> dict[str, list[torch.Size]]:
        """The shapes of each layer's tensors, in the order ``hvp`` takes and returns them."""
        return {b.name: [p.shape for p in b.params] for b in self.blocks}

    def _one(self, vector: Sequence[torch.Tensor]) -> tuple[Tensors, Tensors | None]:
        if len(vector) != len(self.params) or any(v.shape != p.shape for v, p in zip(vector, self.params)):
            expected = ", ".join(str(tuple(p.shape)) for p in self.params[:4]) + (", …" if len(self.params) > 4 else "")
            raise ValueError(
                f"a direction is one tensor per parameter of the operator ({len(self.params)}: {expected}), in layer "
                "order (see .shapes)"
            )
        h, g = self.matvec([v.to(p.dtype).unsqueeze(0) for v, p in zip(vector, self.params)])
        return [t[0] for t in h], None if g is None else [t[0] for t in g]

    def hvp(self, vector: Sequence[torch.Tensor]) -> Tensors:
        """H v for one direction ``v`` given as one tensor per parameter (layer order, :attr:`shapes`)."""
        return self._one(vector)[0]

    def ggn_vp(self, vector: Sequence[torch.Tensor]) -> Tensors:
        """G v, the Gauss-Newton product, for one direction (the operator must be opened with ``gn=True``)."""
        _, g = self._one(vector)
        if g is None:
            raise ValueError("ggn_vp needs the Gauss-Newton products: open the operator with gn=True")
        return g

    def layer_hvp(self, layer: str, x: torch.Tensor) -> torch.Tensor:
        """H_ll x, the diagonal block of layer ``layer`` (a name of :attr:`layers`) on its flat coordinates."""
        index = self._layer_index(layer)
        return self.block_matvec(index, x.reshape(1, -1))[0]

    def layer_ggn_vp(self, layer: str, x: torch.Tensor) -> torch.Tensor:
        """G_ll x for layer ``layer`` on its flat coordinates (``gn=True``)."""
        index = self._layer_index(layer)
        _, g = self.matvec(self.embed(index, x.reshape(1, -1)))
        if g is None:
            raise ValueError("layer_ggn_vp needs the Gauss-Newton products: open the operator with gn=True")
        return self.restrict(index, g)[0]

    def _layer_index(self, layer: str) -> int:
        names = self.layers
        if layer not in names:
            raise KeyError(f"no layer {layer!r}; the operator's layers are {names[:8]}{' …' if len(names) > 8 else ''}")
        return names.index(layer)


_warned: set[str] = set()


def _warn_zero_gauss_newton(loss_fn: Callable) -> None:
    name = type(loss_fn).__name__
    if name in _warned:
        return
    _warned.add(name)
    warnings.warn(
        f"curvopt: {name} is (piecewise) linear in the model's outputs, so its output Hessian is 0: the "
        "Gauss-Newton part G = Jᵀ H_out J is exactly 0 and every GN-Gap is inf. The split H = G + Hᵀ depends on "
        "where the model's output ends: for NLLLoss/KLDivLoss after log_softmax, return the logits and use "
        "CrossEntropyLoss, so the softmax curvature lands in G.",
        RuntimeWarning,
        stacklevel=4,
    )


def _warn_no_tf32(device: torch.device) -> None:
    warnings.warn(
        f"curvature_dtype='tf32' has no effect on {device.type}: TensorFloat-32 is a CUDA format, "
        "so the products are computed in float32",
        UserWarning,
        stacklevel=4,
    )


def _layer_list(operator: CurvatureOperator, layers: list[int], values: list[float]) -> str:
    ranked = sorted(layers, key=lambda i: -values[i])
    names = ", ".join(
        f"'{operator.blocks[i].name}' ({operator.blocks[i].kind or 'layer'}, {values[i]:.2g})" for i in ranked[:6]
    )
    return names + (f" and {len(ranked) - 6} more" if len(ranked) > 6 else "")


def _warn_finite_difference_check(
    operator: CurvatureOperator,
    check: StepCheck | None,
    kinked: list[tuple[str, str]],
    dtype: torch.dtype,
    exact_runs: bool,
) -> None:
    """Say once what a finite-difference session's self-check found (:mod:`curvopt.engine.finite_difference`),
    by cause: a low-precision model (always: the difference of two bf16/fp16 gradients is mostly rounding, even
    where one probe's samples happen to agree); kinks (the model's piecewise-linear modules named, with a strategy
    advised only where ``exact_runs``: it was tried on this model); a smooth model still off after the step
    settled (truncation at an explicit step, or rounding); or a step that shrank and now fits."""
    over = sorted(set().union(*check.layers_over())) if check is not None else []
    worst = [max(t, m) for t, m in zip(check.truncation, check.nonlinearity)] if check is not None else []
    where = (
        (
            f" in layer(s) {_layer_list(operator, over, worst)} (units of the per-probe scale, tolerances "
            f"{TRUNCATION_TOLERANCE:g} off and {LINEARITY_TOLERANCE:g} from step-linear)"
        )
        if over
        else ""
    )
    if dtype in (torch.bfloat16, torch.float16):  # said whatever one probe shows: measured up to 4 SEs off
        disagree = f"its samples at steps ε, 2ε and 4ε disagree{where}: " if over else ""
        message = (
            f"{disagree}the passes compute in "
            f"{str(dtype).removeprefix('torch.')}, where the difference of two gradients is mostly rounding; "
            "run the curvature passes in float32 (fp32 parameters, no bf16 param_dtype)"
        )
    elif kinked:
        modules = ", ".join(f"'{n}' ({kind})" for n, kind in kinked[:4])
        more = f" and {len(kinked) - 4} more" if len(kinked) > 4 else ""
        kinds = ", ".join(sorted({kind for _, kind in kinked}))
        message = (
            f"the model has piecewise-linear modules {modules}{more}"
            f"{f'; its samples at steps ε, 2ε and 4ε disagree{where}' if over else ''}. Units of {kinds} "
            "that switch between θ and θ+εz make the finite difference a smoothed curvature, not autograd's "
            "Hessian (GN traces are not affected): "
        )
        if exact_runs:
            message += "use strategy='autograd' (exact; it runs on this model)"
        else:
            message += (
                "no exact strategy can run this model, so read the traces as smoothed curvature, or use "
                "smooth activations (GELU, SiLU, tanh)"
            )
    elif over:
        tried = ", ".join(f"{s:g}" for s in check.steps)
        if check.rounding_limited:
            cause = f"rounding limits it (a smaller step raised the error; relative steps tried: {tried}): run the "
            cause += "model in float64 for finer products"
        elif len(check.steps) == 1:  # an explicit fd_step: the check reports, it does not change the step
            cause = "pass a smaller fd_step"
        else:
            cause = f"the step could shrink no further (relative steps tried: {tried})"
        message = f"at relative step {check.step:g} its samples at steps ε, 2ε and 4ε disagree{where}: {cause}"
    elif check is not None and check.shrunk:
        message = (
            f"the relative step shrank from {check.steps[0]:g} to {check.step:g} to keep each layer's "
            f"truncation below {TRUNCATION_TOLERANCE:g} of its per-probe scale; later estimates of this model "
            "use it"
        )
    else:
        return
    warnings.warn(f"curvopt: finite-difference curvature: {message}", FiniteDifferenceWarning, stacklevel=4)


def _finite_difference_findings(
    engine: object, problem: ProbeProblem, gn: bool
) -> tuple[StepCheck | None, list[tuple[str, str]], torch.dtype, bool] | None:
    """What the warning about a finite-difference session needs, gathered inside the probing context: the
    self-check, the model's piecewise-linear modules, the compute precision, and whether an exact strategy runs
    on this model (tried only when there is something to advise)."""
    fd = engine.engine if isinstance(engine, AutoEngine) else engine
    if getattr(fd, "strategy", None) != FINITE_DIFFERENCE or not fd.check:
        return None
    kinked = fd.kinked  # scanned by the engine when it checks
    check = fd.step_check
    nonlinear = bool(check is not None and check.layers_over()[1])
    exact = False
    if (kinked or nonlinear) and not isinstance(engine, AutoEngine) and not fd.sharded:
        exact = exact_strategy_runs(problem, gn)
    return check, kinked, fd.compute_dtype, exact


def draw_mask_seed(generator: torch.Generator) -> int:
    """The seed of one estimate's dropout masks, drawn from the probe generator (no device sync)."""
    return derive_seed(generator)


@contextlib.contextmanager
def curvature_operator(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    batch: tuple[object, object],
    *,
    gn: bool = False,
    layers: LayerSpec | Sequence[Layer] | None = None,
    generator: torch.Generator | None = None,
    strategy: str = "auto",
    chunk_size: int = 4,
    forward: Forward | None = None,
    curvature_dtype: str | torch.dtype | None = None,
    fd_step: float | None = None,
    fd_check: bool = True,
) -> Iterator[CurvatureOperator]:
    """The operator of ``loss_fn(forward(model, x), y)`` on ``batch`` in the probing context (train
    mode, batch statistics, one dropout mask drawn from ``generator``, everything restored on exit).

    ``curvature_dtype`` (``None``, ``"float32"``, ``"tf32"``, ``"bfloat16"``) sets the products'
    precision (:mod:`curvopt.engine.context`; the error of each is measured in benchmarks/RESULTS.md).
    ``strategy``: ``"auto"`` or one of :data:`~curvopt.engine.strategies.STRATEGIES`; ``fd_step`` the
    finite-difference relative step (``None``: the step settled for this model, else by precision),
    ``fd_check`` its self-check on the first product of a model not yet checked (two extra gradients per round,
    see :mod:`curvopt.engine.finite_difference`; ``"auto"`` checks whenever it falls back to finite differences).

    Raises ``ValueError`` for bad arguments and :class:`~curvopt.CurvatureInputError` for a batch,
    model or loss that cannot be probed (a configuration mistake); ``FloatingPointError`` on exit
    for a non-finite loss.
    """
    if strategy != "auto" and strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected 'auto' or one of {STRATEGIES}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be callable as forward(model, inputs), got {type(forward).__name__}")
    precision = resolve_curvature_dtype(curvature_dtype)
    inputs, targets = split_batch(batch)
    core, blocks = resolve_blocks(model, layers)
    params = flat_params(blocks)
    if generator is None:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    names = [n for block in blocks for n in block.param_names]
    if precision == "bfloat16" and strategy == "func-vmap":
        raise ValueError(
            "curvature_dtype='bfloat16' cannot run strategy 'func-vmap': torch's batched backward of norm layers "
            "rejects the mixed bf16/fp32 tensors autocast produces; use strategy 'autograd' (or 'auto') or 'func'"
        )
    if precision == "bfloat16" and strategy == FINITE_DIFFERENCE:
        raise ValueError(
            "curvature_dtype='bfloat16' cannot run strategy 'finite-difference': the difference of two bf16 "
            "gradients is mostly rounding; finite differences run in the parameters' precision (use None or 'float32')"
        )
    if precision == "tf32" and params[0].device.type != "cuda":
        _warn_no_tf32(params[0].device)
    sharded = is_sharded(params)
    with probing_context(core, mask_seed=draw_mask_seed(generator), curvature_dtype=precision) as rewind:
        problem = ProbeProblem(core, loss_fn, inputs, targets, params, names, rewind, forward)
        owners = [i for i, block in enumerate(blocks) for _ in block.params]
        engine = make_engine(
            strategy, problem, gn=gn, chunk_size=chunk_size, fd_step=fd_step, fd_check=fd_check, tensor_layers=owners
        )
        if engine.out_hessian is not None and engine.out_hessian.is_zero:
            _warn_zero_gauss_newton(loss_fn)
        samples = batch_size(inputs) * (world_size() if sharded else 1)
        operator = CurvatureOperator(
            blocks, params, engine, engine.chunk_size, engine.strategy, samples, sharded=sharded
        )
        try:
            yield operator
        finally:
            gradient_sq = operator._local_gradient_sq()
            loss = engine.loss.detach().reshape(1).double()
            host = torch.cat([loss, gradient_sq.to(loss.device)]) if gradient_sq is not None else loss
            host = operator.sum_over_ranks(host.cpu())  # one transfer and one collective for both
            operator.loss = float(host[0]) / (world_size() if sharded else 1)
            operator.gradient_sq = host[1:].tolist() if gradient_sq is not None else None
            operator.strategy = engine.strategy
            check = _finite_difference_findings(engine, problem, gn)
            operator.engine = None  # type: ignore[assignment]  # release the kept graph
            del engine, problem
    if check is not None:
        _warn_finite_difference_check(operator, *check)
        del check
    check_finite_loss(operator.loss)
