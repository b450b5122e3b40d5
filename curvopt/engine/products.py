"""Curvature-vector products of a mini-batch training loss: Hz and Gz for a probe z.

For L(θ) = ℓ(f(x; θ), y) with network outputs o = f(x; θ), Jacobian J = ∂o/∂θ and output
Hessian H_out = ∇²_o ℓ:

* Hessian-vector product:        H z = ∇_θ (∇_θ L · z)
* Gauss-Newton-vector product:   G z = Jᵀ H_out J z
* tensor (residual) part:        Hᵀ z = H z − G z   (exact, same probe)

Two exact strategies produce both products from the same probe:

``"autograd"`` (reverse-over-reverse, the CPU default)
    One forward and one ``create_graph`` backward build g = Jᵀ r(o), r = ∂ℓ/∂o, kept alive
    for all K probes. Per probe a single double-backward of g·z returns H z (w.r.t. θ) *and*
    J z (w.r.t. the intermediate r, because ∂(zᵀJᵀr)/∂r = Jz), then G z is one plain
    backward of Jᵀ(H_out J z) through the kept forward graph.

``"func"`` (forward-over-reverse with ``torch.func``)
    ``jvp(grad(L))`` gives H z and, as the tangent of the outputs, J z in one pass per probe;
    G z reuses one ``vjp`` of the forward. ``"func-vmap"`` runs the same products for a chunk
    of probes at once under ``vmap(randomness="same")``.

H_out v has a closed form for cross-entropy on logits (per sample
(diag(p) − p pᵀ) v, divided by the batch size for mean reduction; label smoothing and soft
targets do not change it); any other loss uses ``jvp(grad(ℓ))`` at the outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

Tensors = list[torch.Tensor]
STRATEGIES = ("autograd", "func", "func-vmap")

_CE_CLASS_NAMES = {"SoftTargetCrossEntropy", "LabelSmoothingCrossEntropy"}  # timm, mean reduction


class CurvatureInputError(ValueError):
    """The model, loss or batch cannot be probed as given."""


def split_batch(batch: object) -> tuple[object, object]:
    """``(inputs, targets)`` of a batch, or a clear error for anything else."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise CurvatureInputError(
            f"batch must be a pair (inputs, targets), got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        )
    return batch[0], batch[1]


@dataclass
class ProbeProblem:
    """Everything a product engine needs: the unwrapped model, loss, batch and tensors."""

    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    inputs: object
    targets: object
    params: Sequence[torch.Tensor]
    param_names: Sequence[str]
    rewind_rng: Callable[[], None]


def _call_model(model: nn.Module, inputs: object) -> torch.Tensor:
    try:
        return model(inputs)
    except Exception as exc:  # the model cannot take the batch: say so, keep the cause
        raise CurvatureInputError(
            f"{type(model).__name__} failed on the curvature batch inputs "
            f"({_describe(inputs)}): {type(exc).__name__}: {exc}"
        ) from exc


def _describe(obj: object) -> str:
    if isinstance(obj, torch.Tensor):
        return f"tensor of shape {tuple(obj.shape)}, dtype {obj.dtype}"
    return type(obj).__name__


def checked_loss(loss: object, out: torch.Tensor) -> torch.Tensor:
    """Validate that the loss is a finite scalar tensor that depends on the outputs."""
    if not isinstance(loss, torch.Tensor):
        raise CurvatureInputError(f"loss_fn must return a tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise CurvatureInputError(
            f"loss_fn must return a scalar, got shape {tuple(loss.shape)} (use reduction='mean' or 'sum')"
        )
    if not torch.isfinite(loss).all():
        raise FloatingPointError(
            f"the loss on the curvature batch is {loss.item()}: curvature of a non-finite loss is undefined"
        )
    return loss.reshape(())


def _is_cross_entropy(loss_fn: Callable) -> bool:
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return loss_fn.weight is None and loss_fn.reduction in ("mean", "sum")
    return type(loss_fn).__name__ in _CE_CLASS_NAMES or loss_fn is nn.functional.cross_entropy


class OutputHessian:
    """v ↦ H_out v, the Hessian of the loss w.r.t. the network outputs, at fixed outputs.

    Closed form for cross-entropy on ``[B, C]`` logits,
    H_out v = (p ⊙ v − p (pᵀ v)) / n per row, p = softmax(o), n = B (mean) or 1 (sum);
    otherwise ``jvp(grad(ℓ(·, y)))`` at o. ``closed_form=False`` forces the generic path.
    """

    def __init__(self, loss_fn: Callable, out: torch.Tensor, targets: object, *, closed_form: bool = True):
        self.loss_fn = loss_fn
        self.out = out.detach()
        self.targets = targets
        self.scale = None
        if closed_form and _is_cross_entropy(loss_fn) and self.out.ndim == 2:
            ignore = getattr(loss_fn, "ignore_index", -100)
            hard = isinstance(targets, torch.Tensor) and targets.ndim == 1
            if not (hard and bool((targets == ignore).any())):
                self.probs = torch.softmax(self.out, dim=-1)
                mean = getattr(loss_fn, "reduction", "mean") == "mean"
                self.scale = 1.0 / self.out.shape[0] if mean else 1.0

    @property
    def closed_form(self) -> bool:
        return self.scale is not None

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            p = self.probs
            return (p * v - p * (p * v).sum(-1, keepdim=True)) * self.scale
        grad_fn = grad(lambda o: self.loss_fn(o, self.targets))
        return jvp(grad_fn, (self.out,), (v,))[1]


def _zeros_for_none(values: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> Tensors:
    return [torch.zeros_like(r) if v is None else v for v, r in zip(values, like)]


class ReverseOverReverse:
    """``"autograd"`` strategy: the gradient graph is built once and kept across probes."""

    chunk_size = 1

    def __init__(self, problem: ProbeProblem, *, gn: bool, closed_form_ce: bool = True):
        self.params = list(problem.params)
        self.gn = gn
        problem.rewind_rng()
        out = _call_model(problem.model, problem.inputs)
        self.loss = checked_loss(problem.loss_fn(out, problem.targets), out)
        if gn:
            (self.out_grad,) = torch.autograd.grad(self.loss, out, create_graph=True)
            grads = torch.autograd.grad(out, self.params, self.out_grad, create_graph=True, allow_unused=True)
            self.out = out
            self.out_hessian = OutputHessian(problem.loss_fn, out, problem.targets, closed_form=closed_form_ce)
        else:
            grads = torch.autograd.grad(self.loss, self.params, create_graph=True, allow_unused=True)
        self.live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self.grads = [grads[i] for i in self.live]

    def __call__(self, probe: Tensors) -> tuple[Tensors, Tensors | None]:
        z = [t[0] for t in probe]
        hz: list[torch.Tensor | None] = [None] * len(self.params)
        jz = None
        if self.live:
            inputs = self.params + ([self.out_grad] if self.gn else [])
            result = torch.autograd.grad(
                self.grads, inputs, [z[i] for i in self.live], retain_graph=True, allow_unused=True
            )
            hz = list(result[: len(self.params)])
            if self.gn:
                jz = result[-1]
        hz_full = _zeros_for_none(hz, self.params)
        if not self.gn:
            return [h.unsqueeze(0) for h in hz_full], None
        if jz is None:
            jz = torch.zeros_like(self.out)
        gz = torch.autograd.grad(self.out, self.params, self.out_hessian(jz), retain_graph=True, allow_unused=True)
        gz_full = _zeros_for_none(gz, self.params)
        return [h.unsqueeze(0) for h in hz_full], [g.unsqueeze(0) for g in gz_full]


class ForwardOverReverse:
    """``"func"`` / ``"func-vmap"`` strategies: ``jvp(grad(L))`` per probe or per chunk."""

    def __init__(
        self,
        problem: ProbeProblem,
        *,
        gn: bool,
        chunk_size: int = 1,
        closed_form_ce: bool = True,
    ):
        self.gn = gn
        self.chunk_size = max(1, chunk_size)
        self.problem = problem
        self.names = list(problem.param_names)
        self.primals = {n: p.detach() for n, p in zip(self.names, problem.params)}
        model, inputs, targets = problem.model, problem.inputs, problem.targets

        def forward(params: dict[str, torch.Tensor]) -> torch.Tensor:
            problem.rewind_rng()
            return functional_call(model, params, (inputs,))

        def loss_and_out(params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            out = forward(params)
            return problem.loss_fn(out, targets), out

        self._grad_fn = grad(loss_and_out, has_aux=True)
        problem.rewind_rng()
        with torch.no_grad():
            out = _call_model(model, inputs)
            self.loss = checked_loss(problem.loss_fn(out, targets), out)
        if gn:
            out, self._vjp_fn = vjp(forward, self.primals)
            self.out_hessian = OutputHessian(problem.loss_fn, out, targets, closed_form=closed_form_ce)

    def _single(self, z: Tensors) -> tuple[Tensors, Tensors | None]:
        tangents = dict(zip(self.names, z))
        _, (hz, jz) = jvp(self._grad_fn, (self.primals,), (tangents,))
        hz_list = [hz[n] for n in self.names]
        if not self.gn:
            return hz_list, None
        (gz,) = self._vjp_fn(self.out_hessian(jz))
        return hz_list, [gz[n] for n in self.names]

    def __call__(self, probe: Tensors) -> tuple[Tensors, Tensors | None]:
        if self.chunk_size == 1 and probe[0].shape[0] == 1:
            hz, gz = self._single([t[0] for t in probe])
            return [h.unsqueeze(0) for h in hz], None if gz is None else [g.unsqueeze(0) for g in gz]
        self.problem.rewind_rng()
        if self.gn:
            return vmap(self._single, randomness="same")(probe)
        hz = vmap(lambda z: self._single(z)[0], randomness="same")(probe)
        return hz, None


def make_engine(
    strategy: str, problem: ProbeProblem, *, gn: bool, chunk_size: int = 4, closed_form_ce: bool = True
) -> ReverseOverReverse | ForwardOverReverse:
    """Build the product engine named ``strategy`` (see the module docstring)."""
    if strategy == "autograd":
        return ReverseOverReverse(problem, gn=gn, closed_form_ce=closed_form_ce)
    if strategy == "func":
        return ForwardOverReverse(problem, gn=gn, closed_form_ce=closed_form_ce)
    if strategy == "func-vmap":
        return ForwardOverReverse(problem, gn=gn, chunk_size=chunk_size, closed_form_ce=closed_form_ce)
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES} or 'auto'")


def default_strategy(device: torch.device) -> str:
    """Fastest exact strategy per device, from benchmarks/RESULTS.md (CPU: autograd)."""
    return "autograd"
