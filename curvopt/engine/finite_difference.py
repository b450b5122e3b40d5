r"""Curvature-vector products by finite differences of gradients: only forward and backward passes.

``strategy="finite-difference"`` needs no double backward and no forward-mode AD, so it runs under
every engine and kernel that can train the model: FSDP2-sharded parameters, fused attention and
cross-entropy kernels, reentrant activation checkpointing, custom ``autograd.Function``\ s marked
``@once_differentiable``. Per probe z, with g(θ) = ∇_θ L(θ) on the curvature batch:

    H z ≈ d(ε) = (g(θ + εz) − g(θ)) / ε                       (one forward + backward at θ + εz)
    J z ≈ (f(θ + εz) − f(θ)) / ε                              (the outputs of the same forward)
    G z ≈ J(θ)ᵀ H_out J z                                     (one backward through the graph kept at θ)

g(θ), f(θ) and the graph of f at θ come from one shared pass at θ. The Gauss-Newton product takes the
Jacobian *at θ*, the exact operator's G: a layer whose Jacobian vanishes at θ (a zero-initialised last
layer, zero-initialised residual norms) has G's rows exactly 0, as the exact strategies report, and a
parameter the step moves by many times its own size (ConvNeXt's layer scale γ = 1e-6, which scales the
Jacobian of its branch) does not distort J. Cost per probe: 1 forward + 1 backward for H z, one more
backward with G z (≈ 3 and 5 units for a linear/conv layer whose forward is 1 unit, against 3 for a
training step; the exact double backward costs ≈ 7–8). Memory: the graph at θ (one training step's
activations) is kept for the session when ``gn``, next to one probe's pass. Where ``autograd.grad`` is
refused (FSDP2, reentrant checkpointing: ``backward()`` mode) the graph at θ cannot be reused, and G z
takes one more forward at θ per probe.

**Step.** ε = ρ · ‖θ‖ / ‖z‖ over the probed parameters, so the perturbation has norm ρ‖θ‖ whatever
the probe's distribution or support (block-restricted probes, Lanczos vectors): ρ is a *relative*
step. One global ε, not one per tensor: a per-tensor ε_t would turn the product into H D z with
D = diag(ε_t)/ε, whose cross-layer part is scaled by ε_m/ε_l; traces would survive
(E z_lᵀH_lm z_m = 0 for l ≠ m) but the row-block norms ‖(Hz)_l‖² the monitor and the GN-Gap use would
not. Instead the step is fitted to the model: the self-check (below) starts from :data:`RELATIVE_STEP`
(fp32 ρ = 1e-4) and shrinks it where truncation is too large for some layer, and the step it settles
on is kept for the model's later estimates.

**Error.** Taylor expansion with T = ∇³L, Q = ∇⁴L and ρ_g the rounding error of the two gradients:

    d(ε) = H z + (ε/2) T[z, z] + (ε²/6) Q[z, z, z] + ρ_g / ε.

*Truncation.* A per-layer trace sample is z_lᵀ d(ε)_l = z_lᵀ(Hz)_l + (ε/2) Σ T_{l··}[z_l, z, z] + O(ε²).
The O(ε) term is a cubic form in z: its expectation vanishes for every symmetric distribution
(Rademacher, Gaussian; all odd moments are 0), so the trace is biased only at O(ε²); but the O(ε) term
adds variance ε²/4 · Var(T[z_l, z, z]) to every sample, and on the same probes the estimate differs
from the exact one by about (that term's spread / the sample's spread) standard errors: EfficientNet-B0
(SiLU, squeeze-excite) is ~1 SE off at ρ = 1e-3 in some layers, 0.1 at 1e-4.
*Rounding.* Each fp gradient carries a relative error ≈ c·u (u the unit roundoff, c growing with
depth), so ‖ρ_g‖/ε ≈ c·u·‖g‖/ε: it falls with ε while the truncation grows, the balance lies near
ε ∝ √u. The perturbation itself is rounded (fl(θ + εz) − θ ≠ εz): a relative error ≤ u/ρ per
coordinate. Measured per model family (benchmarks/fd_families.py) and per step (benchmarks/fd_error.py).

**Self-check.** On the first probe of a model (``check=True``) the products are taken at ε, 2ε and 4ε,
never below the step that is reported. For each layer and each reported sample s (the trace sample
z_lᵀ(Hz)_l and, with ``gn``, the GN sample z_lᵀ(Gz)_l), in units of the probe's own scale ‖(Hz)_l‖
(‖(Gz)_l‖), :func:`step_statistics` forms

    truncation  |s(2ε) − s(ε)|                  the O(ε) error of s(ε) itself when the error is linear in ε
    linearity   |s(4ε) − 3s(2ε) + 2s(ε)|         0 when the error is linear in ε

Truncation is linear in the step, so the first is the error of what is reported and the second ~0;
rounding (∝ 1/ε) and units that switch between the steps (kinks) make the second order 1. The verdict:
*truncation* (a statistic over :data:`TRUNCATION_TOLERANCE` / :data:`LINEARITY_TOLERANCE` on a model
without piecewise-linear modules) shrinks the step by :data:`SHRINK` and checks again, up to
:data:`MAX_SHRINKS` times, keeping the step with the smallest error — a shrink that raises it has met
*rounding*, and the previous step is kept; *kinks* are reported with the model's piecewise-linear
modules (:func:`kinked_modules`), since shrinking cannot remove them (a unit switches with probability
∝ ε but then contributes ∝ 1/ε: most probes are exact, a few far off, so one probe may miss them while
the module scan does not). The caller says what was found once (:class:`FiniteDifferenceWarning`), naming
layers and modules, and advises a strategy only after trying it on the model. Cost: 2 more forward +
backward passes per round (and 2 backward with ``gn``), once per model: the settled step is remembered
per model, precision and probed size (:func:`settled_step`), so later sessions start there unchecked.

**State.** Parameters are perturbed in place through ``.data`` (their autograd version counters stay, so
the graph kept at θ is valid again once they are restored) and restored from a copy (bit-exact:
θ + εz − εz ≠ θ in floating point), also on exceptions. Every forward rewinds the probing context's RNG
(the same dropout and drop-path masks at θ and θ + εz); batch-norm layers use batch statistics and leave
their running statistics alone (:mod:`curvopt.engine.context`). Gradients are taken with
``torch.autograd.grad`` (``.grad`` untouched); where that is refused, by ``backward()`` with every
``.grad`` of the model saved before and put back after: sharded FSDP2 parameters (whose gradient only
``backward`` reduce-scatters) and reentrant activation checkpointing (``use_reentrant=True`` refuses
``autograd.grad``).
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .batch import call_loss, call_model
from .output_hessian import OutputHessian
from .products import ProbeProblem, Tensors
from .sharding import all_reduce_sum, is_sharded, local

RELATIVE_STEP = {torch.float64: 1e-6, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}
"""ρ = ‖εz‖/‖θ‖ by the precision the passes compute in (the dtype of the model's outputs): the step the
self-check starts from; ≈ √u for the wider formats, larger for the 8-bit-mantissa ones where rounding
dominates (benchmarks/RESULTS.md)."""
CHECK_STEPS = (1.0, 2.0, 4.0)
"""The self-check's products: the same probe at ε, 2ε and 4ε (never below the step that is reported)."""
TRUNCATION_TOLERANCE = 0.15
"""Largest accepted truncation of one probe's reported samples (trace and GN trace), per layer, in units of the
probe's own scale ‖(Hz)_l‖ (‖(Gz)_l‖ for the GN part). The error of a K-probe mean over the Hutchinson SE is
about this ratio, so the worst of ~100 layers stays near 3× it."""
LINEARITY_TOLERANCE = 0.25
"""Largest accepted departure from a step-linear error, |s(4ε) − 3s(2ε) + 2s(ε)|, in the same units: 0 for
truncation (s(kε) = s + kεa), order 1 and more for units switching between the steps (kinks) or rounding."""
SHRINK = 4.0
"""Truncation above tolerance: the step shrinks by this factor and the check runs again."""
MAX_SHRINKS = 3
"""At most this many shrinks (ρ ÷ 64 in all) before the self-check reports what it found."""
PIECEWISE_LINEAR = ("relu", "maxpool", "hardtanh", "hardswish", "hardsigmoid", "threshold", "hardshrink", "softshrink")
"""Module class names (lower case) containing these have kinks: ReLU, ReLU6, LeakyReLU, PReLU, MaxPool2d,
AdaptiveMaxPool2d, Hardtanh, Hardswish, … (GELU, SiLU, ELU, tanh and softmax are smooth enough)."""

_REENTRANT = "use_reentrant"


class FiniteDifferenceWarning(UserWarning):
    """Finite-difference curvature that does not estimate autograd's Hessian (kinks, rounding), or that ran
    instead of an exact strategy; the message names the layers and what to use instead."""


def relative_step(dtype: torch.dtype) -> float:
    """ρ for passes computed in ``dtype`` (:data:`RELATIVE_STEP`)."""
    return RELATIVE_STEP.get(dtype, RELATIVE_STEP[torch.float32])


@dataclass
class StepCheck:
    """The self-check's findings on one probe: per layer, the truncation and the departure from step-linearity
    of the reported samples (the larger of trace and GN trace), the steps tried and where it settled."""

    truncation: list[float]
    nonlinearity: list[float]
    steps: list[float] = field(default_factory=list)  # relative steps ρ tried, in order
    rounding_limited: bool = False  # the last shrink raised the error: rounding, not truncation, dominates there

    @property
    def step(self) -> float:
        """The relative step in use: the last one tried, or the one before when that shrink raised the error."""
        return self.steps[-2] if self.rounding_limited else self.steps[-1]

    @property
    def shrunk(self) -> bool:
        return self.step != self.steps[0]

    @property
    def worst(self) -> float:
        """The largest per-layer statistic, each in units of its tolerance."""
        return max(
            [t / TRUNCATION_TOLERANCE for t in self.truncation] + [m / LINEARITY_TOLERANCE for m in self.nonlinearity],
            default=0.0,
        )

    @property
    def within_tolerance(self) -> bool:
        return self.worst <= 1.0

    def layers_over(self) -> tuple[list[int], list[int]]:
        """(layers whose truncation exceeds its tolerance, layers that are not step-linear)."""
        trunc = [i for i, t in enumerate(self.truncation) if t > TRUNCATION_TOLERANCE]
        kinked = [i for i, m in enumerate(self.nonlinearity) if m > LINEARITY_TOLERANCE]
        return trunc, kinked


# The step a model's self-check settled on, per (compute dtype, probed size): later sessions on the same model
# start there without checking again (the wrapper's later estimates, repeated estimate_curvature calls).
_settled_steps: weakref.WeakKeyDictionary[nn.Module, dict[tuple[torch.dtype, int], float]] = weakref.WeakKeyDictionary()


def settled_step(model: nn.Module, dtype: torch.dtype, numel: int) -> float | None:
    """The relative step a previous self-check chose for ``model`` at this precision and size, or ``None``."""
    return _settled_steps.get(model, {}).get((dtype, numel))


class FiniteDifference:
    """``"finite-difference"`` strategy: H z (and G z) from differences of gradients and outputs."""

    chunk_size = 1
    strategy = "finite-difference"

    def __init__(
        self,
        problem: ProbeProblem,
        *,
        gn: bool,
        closed_form: bool = True,
        step: float | None = None,
        check: bool = False,
        tensor_layers: Sequence[int] | None = None,
    ) -> None:
        self.problem = problem
        self.params = list(problem.params)
        self.gn = gn
        self.sharded = is_sharded(self.params)
        self.use_backward = self.sharded
        self.tensor_layers = list(tensor_layers) if tensor_layers is not None else list(range(len(self.params)))
        self.step_check: StepCheck | None = None
        self._model_params = [p for p in problem.model.parameters() if p.requires_grad]
        self._saved = [local(p).detach().clone() for p in self.params]
        out, loss, self.g0 = self._gradient_pass(keep_graph=gn)
        # The graph at θ, kept for G z = J(θ)ᵀ H_out J z; without it (backward() mode) a forward at θ per probe.
        self._theta_out = out if gn and not self.use_backward else None
        self.gradient = self.g0  # ∇L at θ (this rank's shards when sharded)
        self.loss = loss.detach()
        self.out0 = out.detach()
        self.out_hessian = (
            OutputHessian(problem.loss_fn, self.out0, problem.targets, closed_form=closed_form) if gn else None
        )
        self.compute_dtype = out.dtype
        # ‖θ‖² and the probed size in one sum over ranks
        theta_sq = torch.stack(torch._foreach_norm(self._saved)).double().pow(2).sum().cpu()
        sizes = torch.stack([theta_sq, torch.tensor(float(sum(t.numel() for t in self._saved)), dtype=torch.float64)])
        theta_sq, numel = self._sum_over_ranks(sizes).tolist()
        self._key = (out.dtype, int(numel))
        settled = settled_step(problem.model, *self._key)
        self.explicit_step = step is not None
        if step is not None:
            self.relative_step = float(step)
        elif settled is not None:
            self.relative_step = settled
        else:
            self.relative_step = relative_step(out.dtype)
        if not self.relative_step > 0:
            raise ValueError(f"the finite-difference step must be > 0, got {step!r}")
        self.check = check and (step is not None or settled is None)
        self.kinked = kinked_modules(problem.model) if self.check else []
        theta_norm = math.sqrt(theta_sq)
        self._theta_norm = theta_norm if theta_norm > 0 else 1.0

    # ------------------------------------------------------------------ passes
    @property
    def scale(self) -> float:
        """‖εz‖ = ρ‖θ‖."""
        return self.relative_step * self._theta_norm

    def _sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(values) if self.sharded else values

    def _forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.problem.rewind_rng()  # the same dropout / drop-path masks in every pass
        out = call_model(self.problem.model, self.problem.inputs, self.problem.forward)
        return out, call_loss(self.problem.loss_fn, out, self.problem.targets)

    def _gradient_pass(self, keep_graph: bool) -> tuple[torch.Tensor, torch.Tensor, Tensors]:
        """A forward and the gradient of its loss; switches to ``backward()`` where ``autograd.grad`` is refused."""
        out, loss = self._forward()
        try:
            return out, loss, self._grads(loss, None, retain=keep_graph and not self.use_backward)
        except RuntimeError as exc:
            if self.use_backward or _REENTRANT not in str(exc):
                raise
        self.use_backward = True  # reentrant checkpointing: only backward() without `inputs` may run it
        out, loss = self._forward()
        return out, loss, self._grads(loss, None, retain=False)

    def _grads(self, output: torch.Tensor, cotangent: torch.Tensor | None, *, retain: bool) -> Tensors:
        """∂⟨output, cotangent⟩/∂θ for the probed tensors (local shards when sharded), zeros where unused."""
        if not self.use_backward:
            grads = torch.autograd.grad(output, self.params, cotangent, retain_graph=retain, allow_unused=True)
            return [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, self.params)]
        saved = [p.grad for p in self._model_params]
        try:
            for p in self._model_params:
                p.grad = None
            output.backward(cotangent, retain_graph=retain)
            return [torch.zeros_like(local(p)) if p.grad is None else local(p.grad).detach() for p in self.params]
        finally:
            for p, g in zip(self._model_params, saved):
                p.grad = g

    def _storage(self) -> Tensors:
        """The tensors perturbed in place: the parameters' ``.data`` (their autograd version stays, so the graph
        kept at θ remains valid once they are restored), or this rank's shards under FSDP2."""
        return [local(p) for p in self.params] if self.sharded else [p.data for p in self.params]

    def _step(self, z: Tensors) -> float:
        """ε = ρ‖θ‖/‖z‖ (global norms when sharded)."""
        z_sq = torch.stack(torch._foreach_norm(z)).double().pow(2).sum().reshape(1).cpu()
        norm = math.sqrt(float(self._sum_over_ranks(z_sq)[0]))
        return self.scale / norm if norm > 0 else 0.0

    def _restore(self) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self._storage(), self._saved)

    def _gauss_newton(self, jz: torch.Tensor, dtype: torch.dtype) -> Tensors:
        """J(θ)ᵀ H_out J z with the Jacobian at θ: through the kept graph, or a fresh forward at θ."""
        assert self.out_hessian is not None
        cotangent = self.out_hessian(jz).to(dtype)
        if self._theta_out is not None:
            return self._grads(self._theta_out, cotangent, retain=True)
        out, _ = self._forward()
        return self._grads(out, cotangent, retain=False)

    def products(self, z: Tensors, eps: float, *, gn: bool) -> tuple[Tensors, Tensors | None]:
        """(d(ε), G z) for one probe, parameters restored afterwards."""
        if eps == 0.0:
            zeros = [torch.zeros_like(t) for t in z]
            return zeros, ([torch.zeros_like(t) for t in z] if gn else None)
        try:
            with torch.no_grad():
                storage = self._storage()
                torch._foreach_add_(storage, [t.to(s.dtype, copy=False) for t, s in zip(z, storage)], alpha=eps)
            out, loss = self._forward()
            hz = self._grads(loss, None, retain=False)  # fresh tensors: turned into (g(θ+εz) − g(θ))/ε in place
            jz = (out.detach() - self.out0) / eps if gn else None
            dtype = out.dtype
            del out, loss
        finally:
            self._restore()
        with torch.no_grad():
            torch._foreach_sub_(hz, self.g0)
            torch._foreach_mul_(hz, 1.0 / eps)
        gz = self._gauss_newton(jz, dtype) if jz is not None else None
        return hz, gz

    def _checked_products(self, z: Tensors) -> tuple[Tensors, Tensors | None]:
        """The first probe's products after the self-check settled the step (see the module docstring): while a
        layer's samples are off by more than the tolerances and the model has no kinks, the step shrinks by
        :data:`SHRINK`, keeping the step with the smallest error (a shrink that does not lower it is rounding)."""
        n_layers = max(self.tensor_layers, default=-1) + 1
        tried: list[float] = []
        best: tuple[StepCheck, list, float] | None = None  # the smallest error so far: check, products, step
        rounding_limited = False
        for _ in range(MAX_SHRINKS + 1):
            tried.append(self.relative_step)
            eps = self._step(z)
            runs = [self.products(z, k * eps, gn=self.gn) for k in CHECK_STEPS]
            check = StepCheck(*step_statistics(z, runs, self.tensor_layers, n_layers, self.sharded))
            if best is not None and check.worst >= best[0].worst:
                rounding_limited = True
                break
            best = (check, runs, self.relative_step)
            if self.explicit_step or self.kinked or check.within_tolerance:
                break
            self.relative_step /= SHRINK
        assert best is not None
        check, runs, self.relative_step = best
        self.step_check = dataclasses.replace(check, steps=tried, rounding_limited=rounding_limited)
        if not self.explicit_step:
            _settled_steps.setdefault(self.problem.model, {})[self._key] = self.relative_step
        return runs[0]

    def __call__(self, probe: Tensors) -> tuple[Tensors, Tensors | None]:
        z = [t[0] for t in probe]
        if self.check and self.step_check is None:
            hz, gz = self._checked_products(z)
        else:
            hz, gz = self.products(z, self._step(z), gn=self.gn)
        return [h.unsqueeze(0) for h in hz], None if gz is None else [g.unsqueeze(0) for g in gz]


def step_statistics(
    z: Tensors,
    runs: Sequence[tuple[Tensors, Tensors | None]],
    tensor_layers: Sequence[int],
    n_layers: int,
    sharded: bool = False,
) -> tuple[list[float], list[float]]:
    """Per layer (truncation, departure from step-linearity) of one probe's reported samples from its products at
    ε, 2ε and 4ε (``runs``, :data:`CHECK_STEPS`), each the larger over the trace sample z_lᵀ(Hz)_l and the GN
    sample z_lᵀ(Gz)_l, in units of ‖(Hz)_l‖ resp. ‖(Gz)_l‖ at ε:

        truncation  |s(2ε) − s(ε)|                  (= the O(ε) error of s(ε) when the error is linear in the step)
        linearity   |s(4ε) − 3 s(2ε) + 2 s(ε)|       (0 for an error linear in the step)

    A layer whose product at ε vanishes has both 0. ``tensor_layers[i]`` is the layer of tensor i."""
    kinds = 2 if runs[0][1] is not None else 1
    # rows: sample at ε, 2ε, 4ε, then the squared scale; per kind
    values = torch.zeros(kinds, 4, n_layers, dtype=torch.float64)
    for kind in range(kinds):
        for i, layer in enumerate(tensor_layers):
            zi = z[i].reshape(-1).double()
            for r, run in enumerate(runs):
                product = run[kind][i].reshape(-1).double()
                values[kind, r, layer] += torch.dot(zi, product).cpu()
            values[kind, 3, layer] += runs[0][kind][i].double().pow(2).sum().cpu()
    if sharded:
        all_reduce_sum(values)
    truncation, nonlinearity = [0.0] * n_layers, [0.0] * n_layers
    for kind in range(kinds):
        s1, s2, s4, sq = values[kind]
        for layer in range(n_layers):
            scale = math.sqrt(float(sq[layer]))
            if scale == 0:
                continue
            truncation[layer] = max(truncation[layer], abs(float(s2[layer] - s1[layer])) / scale)
            linear = float(s4[layer] - 3 * s2[layer] + 2 * s1[layer])
            nonlinearity[layer] = max(nonlinearity[layer], abs(linear) / scale)
    return truncation, nonlinearity


def kinked_modules(model: torch.nn.Module) -> list[tuple[str, str]]:
    """``(name, class)`` of the modules with kinks (:data:`PIECEWISE_LINEAR`), in ``named_modules`` order."""
    return [
        (name, type(m).__name__)
        for name, m in model.named_modules()
        if any(token in type(m).__name__.lower() for token in PIECEWISE_LINEAR)
    ]
