r"""Curvature-vector products by finite differences of gradients: only forward and backward passes.

``strategy="finite-difference"`` needs no double backward and no forward-mode AD, so it runs under
every engine and kernel that can train the model: FSDP2-sharded parameters, fused attention and
cross-entropy kernels, reentrant activation checkpointing, custom ``autograd.Function``\ s marked
``@once_differentiable``. Per probe z, with g(θ) = ∇_θ L(θ) on the curvature batch:

    H z ≈ d(ε) = (g(θ + εz) − g(θ)) / ε                       (one forward + backward at θ + εz)
    J z ≈ (f(θ + εz) − f(θ)) / ε                              (the outputs of the same forward)
    G z ≈ J(θ + εz)ᵀ H_out J z                                (one more backward of that forward)

g(θ) and f(θ) come from one shared pass at θ. Cost per probe: 1 forward + 1 backward for H z, one more
backward with G z (≈ 3 and 5 units for a linear/conv layer whose forward is 1 unit, against 3 for a
training step; the exact double backward costs ≈ 7–8). No graph is kept across probes, so peak memory
is that of one training step plus the stored gradient at θ, a copy of the probed parameters and the
products of one probe.

**Step.** ε = ρ · ‖θ‖ / ‖z‖ over the probed parameters, so the perturbation has norm ρ‖θ‖ whatever
the probe's distribution or support (block-restricted probes, Lanczos vectors): ρ is a *relative*
step, :data:`RELATIVE_STEP` per compute precision (fp32 ρ = 1e-3). One global ε, not one per layer:
a per-layer ε_l would turn the product into H D z with D = diag(ε_l)/ε, whose cross-layer part is
scaled by ε_m/ε_l; traces would survive (E z_lᵀH_lm z_m = 0 for l ≠ m) but the row-block norms
‖(Hz)_l‖² the monitor and the GN-Gap use would not.

**Error.** Taylor expansion with T = ∇³L, Q = ∇⁴L and ρ_g the rounding error of the two gradients:

    d(ε) = H z + (ε/2) T[z, z] + (ε²/6) Q[z, z, z] + ρ_g / ε.

*Truncation.* A per-layer trace sample is z_lᵀ d(ε)_l = z_lᵀ(Hz)_l + (ε/2) Σ T_{l··}[z_l, z, z] + O(ε²).
The O(ε) term is a cubic form in z: its expectation vanishes for every symmetric distribution
(Rademacher, Gaussian; all odd moments are 0), so the trace is biased only at O(ε²); the O(ε) term
adds variance ε²/4 · Var(T[z_l, z, z]), negligible next to the Hutchinson variance at small ε. The
squared norms ‖d(ε)_l‖² are biased at O(ε²) likewise (their O(ε) cross term is odd in z).
*Rounding.* Each fp gradient carries a relative error ≈ c·u (u the unit roundoff, c growing with
depth), so ‖ρ_g‖/ε ≈ c·u·‖g‖/ε: it falls with ε while the truncation grows, the balance lies near
ε ∝ √u. The perturbation itself is rounded (fl(θ + εz) − θ ≠ εz): a relative error ≤ u/ρ per
coordinate. Measured per parameter tensor (benchmarks/fd_error.py, benchmarks/RESULTS.md): the
difference from the exact products on the same probes in units of the Hutchinson SE.

**Kinks.** A piecewise-linear activation (ReLU, max-pooling, hard-tanh) has no Hessian at its kinks;
units that switch between θ and θ + εz add a term to d(ε) that does *not* vanish as ε → 0: the finite
difference estimates a smoothed curvature, not autograd's. Because a unit switches with probability
∝ ε but then contributes ∝ 1/ε, the error is heavy-tailed: most probes are exact, a few are far off.
On the first product a session may check itself (``check=True``): the same probe at ε/c, ε and cε
(c = :data:`CHECK_FACTOR`). For a smooth loss both differences are the truncation term, linear in the
step: z_lᵀ(d(cε) − d(ε))_l ≈ c · z_lᵀ(d(ε) − d(ε/c))_l up to O(ε²) (a Richardson test), so their
mismatch, in units of the probe's own scale ‖(Hz)_l‖ (:func:`layer_disagreement`), is ~1e-2 however
curved the model; units that switch within either interval break the relation at order 1 and more, and
so does rounding at low precision. The caller warns with :class:`FiniteDifferenceWarning` naming the
layers (and any piecewise-linear modules, :func:`kinked_modules`, since one probe can miss a rare switch).
Comparing ε with cε alone mistook a GPT-style LM's truncation (0.14–0.19) for kinks. The Gauss-Newton
part is not affected the same way: the outputs are continuous, so J z from output differences converges
(switching units change it by O(ε)); measured GN traces stay within 0.15 SE of the exact ones on ReLU
models.

**State.** Parameters are perturbed in place and restored from a copy (bit-exact: θ + εz − εz ≠ θ in
floating point), also on exceptions. Every forward rewinds the probing context's RNG (the same dropout
and drop-path masks at θ and θ + εz); batch-norm layers use batch statistics and leave their running
statistics alone (:mod:`curvopt.engine.context`). Gradients are taken with ``torch.autograd.grad``
(``.grad`` untouched); where that is refused, by ``backward()`` with every ``.grad`` of the model saved
before and put back after: sharded FSDP2 parameters (whose gradient only ``backward`` reduce-scatters)
and reentrant activation checkpointing (``use_reentrant=True`` refuses ``autograd.grad``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .batch import call_loss, call_model
from .output_hessian import OutputHessian
from .products import ProbeProblem, Tensors
from .sharding import all_reduce_sum, is_sharded, local

RELATIVE_STEP = {torch.float64: 1e-5, torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 3e-2}
"""ρ = ‖εz‖/‖θ‖ by the precision the passes compute in (the dtype of the model's outputs); ≈ √u for the
wider formats, larger for the 8-bit-mantissa ones where rounding dominates (benchmarks/RESULTS.md)."""
CHECK_FACTOR = 8.0
"""The self-check takes the first probe's products at ε/c, ε and c·ε (c = CHECK_FACTOR)."""
KINK_TOLERANCE = 0.5
"""Layers whose self-check statistic exceeds this (units of ‖(Hz)_l‖) are reported. Measured at the default fp32
step, 8 probes each (benchmarks/fd_error.py models): tanh MLP ≤ 0.025, ViT-tiny ≤ 0.034, a GPT-style LM ≤ 0.046;
ReLU MLP 15–82, ReLU CNN with max-pooling 6.8–29."""
PIECEWISE_LINEAR = ("relu", "maxpool", "hardtanh", "hardswish", "hardsigmoid", "threshold", "hardshrink",
                    "softshrink")  # fmt: skip
"""Module class names (lower case) containing these have kinks: ReLU, ReLU6, LeakyReLU, PReLU, MaxPool2d,
AdaptiveMaxPool2d, Hardtanh, Hardswish, … (GELU, SiLU, ELU, tanh and softmax are smooth enough)."""

_REENTRANT = "use_reentrant"


class FiniteDifferenceWarning(UserWarning):
    """Finite-difference curvature that does not estimate autograd's Hessian (kinks, rounding), or that ran
    instead of an exact strategy; the message names the layers and what to use instead."""


def relative_step(dtype: torch.dtype) -> float:
    """ρ for passes computed in ``dtype`` (:data:`RELATIVE_STEP`)."""
    return RELATIVE_STEP.get(dtype, RELATIVE_STEP[torch.float32])


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
    ) -> None:
        self.problem = problem
        self.params = list(problem.params)
        self.gn = gn
        self.check = check
        self.check_products: tuple[Tensors, Tensors, Tensors, Tensors] | None = None
        self.sharded = is_sharded(self.params)
        self.use_backward = self.sharded
        self._model_params = [p for p in problem.model.parameters() if p.requires_grad]
        self._saved = [local(p).detach().clone() for p in self.params]
        out, loss, self.g0 = self._gradient_pass()
        self.gradient = self.g0  # ∇L at θ (this rank's shards when sharded)
        self.loss = loss.detach()
        self.out0 = out.detach()
        self.out_hessian = (
            OutputHessian(problem.loss_fn, self.out0, problem.targets, closed_form=closed_form) if gn else None
        )
        self.compute_dtype = out.dtype
        self.relative_step = relative_step(out.dtype) if step is None else float(step)
        if not self.relative_step > 0:
            raise ValueError(f"the finite-difference step must be > 0, got {step!r}")
        theta_sq = torch.stack(torch._foreach_norm(self._saved)).double().pow(2).sum().reshape(1).cpu()
        theta_norm = math.sqrt(float(self._sum_over_ranks(theta_sq)[0]))
        self.scale = self.relative_step * (theta_norm if theta_norm > 0 else 1.0)

    # ------------------------------------------------------------------ passes
    def _sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(values) if self.sharded else values

    def _forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.problem.rewind_rng()  # the same dropout / drop-path masks in every pass
        out = call_model(self.problem.model, self.problem.inputs, self.problem.forward)
        return out, call_loss(self.problem.loss_fn, out, self.problem.targets)

    def _gradient_pass(self) -> tuple[torch.Tensor, torch.Tensor, Tensors]:
        """A forward and the gradient of its loss; switches to ``backward()`` where ``autograd.grad`` is refused."""
        out, loss = self._forward()
        try:
            return out, loss, self._grads(loss, None, retain=False)
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

    def _step(self, z: Tensors) -> float:
        """ε = ρ‖θ‖/‖z‖ (global norms when sharded)."""
        z_sq = torch.stack(torch._foreach_norm(z)).double().pow(2).sum().reshape(1).cpu()
        norm = math.sqrt(float(self._sum_over_ranks(z_sq)[0]))
        return self.scale / norm if norm > 0 else 0.0

    def _restore(self) -> None:
        with torch.no_grad():
            torch._foreach_copy_([local(p) for p in self.params], self._saved)

    def products(self, z: Tensors, eps: float, *, gn: bool) -> tuple[Tensors, Tensors | None]:
        """(d(ε), G z) for one probe, parameters restored afterwards."""
        if eps == 0.0:
            zeros = [torch.zeros_like(t) for t in z]
            return zeros, ([torch.zeros_like(t) for t in z] if gn else None)
        try:
            with torch.no_grad():
                torch._foreach_add_([local(p) for p in self.params], [t.to(p.dtype, copy=False) for t, p in
                                                                       zip(z, self.params)], alpha=eps)  # fmt: skip
            out, loss = self._forward()
            hz = self._grads(loss, None, retain=gn)  # fresh tensors: turned into (g(θ+εz) − g(θ))/ε in place
            with torch.no_grad():
                torch._foreach_sub_(hz, self.g0)
                torch._foreach_mul_(hz, 1.0 / eps)
            gz = None
            if gn:
                jz = (out.detach() - self.out0) / eps
                gz = self._grads(out, self.out_hessian(jz).to(out.dtype), retain=False)
            return hz, gz
        finally:
            self._restore()

    def __call__(self, probe: Tensors) -> tuple[Tensors, Tensors | None]:
        z = [t[0] for t in probe]
        eps = self._step(z)
        hz, gz = self.products(z, eps, gn=self.gn)
        if self.check and self.check_products is None:
            wide, _ = self.products(z, eps * CHECK_FACTOR, gn=False)
            narrow, _ = self.products(z, eps / CHECK_FACTOR, gn=False)
            self.check_products = (z, hz, wide, narrow)
        return [h.unsqueeze(0) for h in hz], None if gz is None else [g.unsqueeze(0) for g in gz]


def kinked_modules(model: torch.nn.Module) -> list[tuple[str, str]]:
    """``(name, class)`` of the modules with kinks (:data:`PIECEWISE_LINEAR`), in ``named_modules`` order."""
    return [(name, type(m).__name__) for name, m in model.named_modules()
            if any(token in type(m).__name__.lower() for token in PIECEWISE_LINEAR)]  # fmt: skip


def layer_disagreement(
    check: tuple[Tensors, Tensors, Tensors, Tensors], tensor_layers: Sequence[int], n_layers: int,
    sharded: bool = False,
) -> list[float]:
    """Per layer |z_lᵀ[(d(cε) − d(ε)) − c (d(ε) − d(ε/c))]_l| / ‖d(ε)_l‖ for the self-check's products
    ``(z, d(ε), d(cε), d(ε/c))``: ~0 when the finite difference is smooth in the step (0 for a layer whose
    product vanishes). ``tensor_layers[i]`` is the layer of tensor i."""
    z, at, wide, narrow = check
    c = CHECK_FACTOR
    values = torch.zeros(2, n_layers, dtype=torch.float64)
    for i, layer in enumerate(tensor_layers):
        mismatch = (wide[i].double() - at[i].double()) - c * (at[i].double() - narrow[i].double())
        values[0, layer] += torch.dot(z[i].reshape(-1).double(), mismatch.reshape(-1)).cpu()
        values[1, layer] += at[i].reshape(-1).double().pow(2).sum().cpu()
    if sharded:
        all_reduce_sum(values)
    return [abs(float(d)) / math.sqrt(float(s)) if s > 0 else 0.0 for d, s in zip(values[0], values[1])]
