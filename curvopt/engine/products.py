r"""Curvature-vector products of a mini-batch training loss: Hz and Gz for a probe z.

For L(θ) = ℓ(f(x; θ), y) with network outputs o = f(x; θ), Jacobian J = ∂o/∂θ, output gradient
r = ∇_o ℓ and output Hessian H_out = ∇²_o ℓ (:mod:`curvopt.engine.output_hessian`):

* Hessian-vector product:        H z = ∇_θ (∇_θ L · z) = Gz + Σ_k r_k ∇²_θ f_k z
* Gauss-Newton-vector product:   G z = Jᵀ H_out J z
* tensor (residual) part:        Hᵀ z = H z − G z   (exact, same probe)

Three exact strategies produce both products from the same probe:

``"autograd"`` (reverse-over-reverse; the default on every device)
    One forward and one ``create_graph`` backward build g = Jᵀ r(o), kept alive for all K probes.
    Per probe a single double backward of g·z returns H z (w.r.t. θ) *and* J z (w.r.t. the
    intermediate r, because ∂(zᵀJᵀr)/∂r = Jz); G z is one plain backward of Jᵀ(H_out J z) through
    the kept forward graph. Needs only reverse mode, so it runs every model torch can train.

``"func"`` (forward-over-reverse with ``torch.func``)
    With r fixed at the outputs, ``jvp`` of θ ↦ ∇_θ ⟨f(θ), r⟩ along z gives Σ_k r_k ∇²f_k z and, as
    the tangent of the outputs, J z in one pass; G z is a ``vjp`` of the kept forward, and
    H z = Σ_k r_k ∇²f_k z + G z. The loss itself never goes through forward mode (torch lacks
    forward-mode rules for some losses' backward: ``huber_loss``, ``mse_loss``). Without ``gn``,
    when the loss supports forward mode, ``jvp(∇_θ L)`` gives H z directly and saves the vjp.
    ``"func-vmap"`` runs the same products for a chunk of probes at once under
    ``vmap(randomness="same")``. A model with a layer that has no forward-mode rule (``nn.LSTM``
    on CPU) gets a :class:`CurvatureStrategyError` naming the module and ``"autograd"``.

A model with an operation that has no double-backward rule (a custom ``autograd.Function`` marked
``@once_differentiable``, a fused kernel whose backward has no derivative, reentrant activation
checkpointing, FSDP2-sharded parameters) cannot be probed by any of them: they raise
:class:`DoubleBackwardError`, which names ``"finite-difference"`` (:mod:`curvopt.engine.finite_difference`),
the strategy that needs only first derivatives. Such graphs are found, not trusted: torch's double
backward through a ``@once_differentiable`` function *silently* returns no second derivative.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from .batch import CurvatureInputError, Forward, call_loss, call_model
from .output_hessian import OutputHessian

Tensors = list[torch.Tensor]
EXACT_STRATEGIES = ("autograd", "func", "func-vmap")


class CurvatureStrategyError(CurvatureInputError):
    """The chosen product strategy cannot run this model; the message names the module and an alternative."""


class DoubleBackwardError(CurvatureStrategyError):
    """The model has an operation without a double-backward rule: no exact strategy can probe it, finite
    differences can (``strategy="finite-difference"``, or ``"auto"``, which falls back to it)."""


_NO_SECOND_DERIVATIVE_NODES = ("Error", "DelayedError", "NotImplemented")
_REENTRANT_HINT = "use_reentrant"


def double_backward_error(strategy: str, why: str) -> DoubleBackwardError:
    """The one-line error for a model an exact ``strategy`` cannot differentiate twice (``why`` says what)."""
    extra = ""
    if _REENTRANT_HINT in why:
        why = "reentrant activation checkpointing (use_reentrant=True) refuses torch.autograd.grad"
        extra = ", or checkpoint with use_reentrant=False (the exact strategies then work)"
    return DoubleBackwardError(
        f"strategy '{strategy}' cannot run this model: {why}. Use strategy='finite-difference' (or 'auto', which "
        f"falls back to it; first derivatives only){extra}"
    )


def is_double_backward_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is torch refusing a second derivative (not a bug in the model or the batch)."""
    text = str(exc)
    return isinstance(exc, (RuntimeError, NotImplementedError)) and (
        _REENTRANT_HINT in text
        or "once_differentiable" in text
        or ("derivative for" in text and "not implemented" in text)
        or "double backward" in text.lower()
        or "double backwards" in text.lower()
    )


def _first_order_only_node(roots: Sequence[torch.Tensor]) -> str | None:
    """The name of a node in the graph of ``roots`` that cannot be differentiated (``@once_differentiable``'s
    error node, an op whose backward has no derivative), or ``None``."""
    stack = [t.grad_fn for t in roots if t.grad_fn is not None]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if type(node).__name__ in _NO_SECOND_DERIVATIVE_NODES:
            return node.name()
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return None


@dataclass
class ProbeProblem:
    """Everything a product engine needs: the unwrapped model, loss, batch and tensors."""

    model: nn.Module
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor]
    inputs: Any
    targets: Any
    params: Sequence[torch.Tensor]
    param_names: Sequence[str]
    rewind_rng: Callable[[], None]
    forward: Forward | None = None


def _zeros_for_none(values: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> Tensors:
    return [torch.zeros_like(r) if v is None else v for v, r in zip(values, like)]


class ReverseOverReverse:
    """``"autograd"`` strategy: the gradient graph is built once and kept across probes."""

    chunk_size = 1
    strategy = "autograd"

    def __init__(self, problem: ProbeProblem, *, gn: bool, closed_form: bool = True):
        self.params = list(problem.params)
        self.gn = gn
        problem.rewind_rng()
        out = call_model(problem.model, problem.inputs, problem.forward)
        self.loss = call_loss(problem.loss_fn, out, problem.targets)
        self.out_hessian: OutputHessian | None = None
        try:
            if gn:
                (self.out_grad,) = torch.autograd.grad(self.loss, out, create_graph=True)
                if not self.out_grad.requires_grad:  # a loss linear in the outputs: r is constant, H_out = 0
                    self.out_grad = self.out_grad.detach().requires_grad_()
                grads = torch.autograd.grad(out, self.params, self.out_grad, create_graph=True, allow_unused=True)
                self.out = out
                self.out_hessian = OutputHessian(problem.loss_fn, out, problem.targets, closed_form=closed_form)
            else:
                grads = torch.autograd.grad(self.loss, self.params, create_graph=True, allow_unused=True)
        except (RuntimeError, NotImplementedError) as exc:
            if is_double_backward_failure(exc):
                raise double_backward_error(self.strategy, str(exc).splitlines()[0]) from exc
            raise
        self.live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self.grads = [grads[i] for i in self.live]
        self.gradient = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, self.params)]
        blocked = _first_order_only_node(self.grads)
        if blocked is not None:
            raise double_backward_error(
                self.strategy,
                f"its gradient passes through {blocked}, which has no "
                "second derivative (a @once_differentiable autograd.Function or a fused "
                "kernel): double backward would silently drop its curvature",
            )

    def __call__(self, probe: Tensors) -> tuple[Tensors, Tensors | None]:
        z = [t[0] for t in probe]
        hz: list[torch.Tensor | None] = [None] * len(self.params)
        jz = None
        if self.live:
            inputs = self.params + ([self.out_grad] if self.gn else [])
            try:
                result = torch.autograd.grad(
                    self.grads, inputs, [z[i] for i in self.live], retain_graph=True, allow_unused=True
                )
            except (RuntimeError, NotImplementedError) as exc:
                if is_double_backward_failure(exc):
                    raise double_backward_error(self.strategy, str(exc).splitlines()[0]) from exc
                raise
            hz = list(result[: len(self.params)])
            if self.gn:
                jz = result[-1]
        hz_full = _zeros_for_none(hz, self.params)
        if self.out_hessian is None:
            return [h.unsqueeze(0) for h in hz_full], None
        if jz is None:
            jz = torch.zeros_like(self.out)
        gz = torch.autograd.grad(self.out, self.params, self.out_hessian(jz), retain_graph=True, allow_unused=True)
        gz_full = _zeros_for_none(gz, self.params)
        return [h.unsqueeze(0) for h in hz_full], [g.unsqueeze(0) for g in gz_full]


class _Adapter(nn.Module):
    """Calls ``forward(model, inputs)`` as a module, so ``functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, forward: Forward) -> None:
        super().__init__()
        self.model = model
        self.fn = forward

    def forward(self, inputs: Any) -> torch.Tensor:
        return self.fn(self.model, inputs)


def _loss_has_forward_mode(loss_fn: Callable, out: torch.Tensor, targets: Any) -> bool:
    """Whether ``jvp(∇_o ℓ)`` runs at the outputs (torch lacks forward-mode rules for some losses)."""
    try:
        jvp(grad(lambda o: loss_fn(o, targets)), (out,), (torch.ones_like(out),))
    except (NotImplementedError, RuntimeError):
        return False
    return True


class _ModuleTracker:
    """Records which modules are mid-forward, to name the one a forward-mode failure came from."""

    def __init__(self, model: nn.Module) -> None:
        self.stack: list[str] = []
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(lambda m, a, n=name: self.stack.append(n)))
            self.handles.append(module.register_forward_hook(lambda m, a, o, n=name: self._leave(n)))

    def _leave(self, name: str) -> None:
        if self.stack and self.stack[-1] == name:
            self.stack.pop()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class ForwardOverReverse:
    """``"func"`` / ``"func-vmap"`` strategies: forward-over-reverse per probe or per chunk."""

    def __init__(
        self, problem: ProbeProblem, *, gn: bool, chunk_size: int = 1, closed_form: bool = True, strategy: str = "func"
    ):
        self.gn = gn
        self.chunk_size = max(1, chunk_size)
        self.problem = problem
        self.strategy = strategy
        self.names = list(problem.param_names)
        self.primals = {n: p.detach() for n, p in zip(self.names, problem.params)}
        module = problem.model if problem.forward is None else _Adapter(problem.model, problem.forward)
        prefix = "" if problem.forward is None else "model."
        loss_fn, targets = problem.loss_fn, problem.targets

        def forward(params: dict[str, torch.Tensor]) -> torch.Tensor:
            problem.rewind_rng()
            return functional_call(module, {prefix + n: p for n, p in params.items()}, (problem.inputs,))

        problem.rewind_rng()
        with torch.no_grad():
            out = call_model(problem.model, problem.inputs, problem.forward)
            self.loss = call_loss(loss_fn, out, targets)
        self.gradient: Tensors | None = None  # ∇L at θ, from the first single-probe product's primal output
        self.split = gn or not _loss_has_forward_mode(loss_fn, out, targets)
        self.out_hessian: OutputHessian | None = None
        if self.split:
            with torch.no_grad():  # the transforms differentiate; no tape to parameters outside the blocks
                out, self._vjp_fn = vjp(forward, self.primals)
            self.out_hessian = OutputHessian(loss_fn, out, targets, closed_form=closed_form)
            r = grad(lambda o: loss_fn(o, targets))(out.detach())  # ∇_o ℓ, fixed

            def tensor_part_and_out(params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
                o = forward(params)
                return (o * r).sum(), o

            self._grad_fn = grad(tensor_part_and_out, has_aux=True)
        else:

            def loss_and_out(params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
                o = forward(params)
                return loss_fn(o, targets), o

            self._grad_fn = grad(loss_and_out, has_aux=True)
        self._checked = False

    def _single(self, z: Tensors, keep_gradient: bool = False) -> tuple[Tensors, Tensors | None]:
        tangents = dict(zip(self.names, z))
        (primal, _), (first, jz) = jvp(self._grad_fn, (self.primals,), (tangents,))
        if keep_gradient:  # Jᵀr = ∇L (split) or ∇L itself: the loss gradient at θ, for free
            self.gradient = [primal[n].detach() for n in self.names]
        first_list = [first[n] for n in self.names]
        if self.out_hessian is None:  # direct: first = H z
            return first_list, None
        (gz,) = self._vjp_fn(self.out_hessian(jz).to(jz.dtype))  # bf16 outputs under curvature_dtype
        gz_list = [gz[n] for n in self.names]
        hz = [a + b for a, b in zip(first_list, gz_list)]  # H z = Σ_k r_k ∇²f_k z + G z
        return hz, gz_list if self.gn else None

    @torch.no_grad()  # the transforms differentiate; no tape to parameters outside the blocks
    def _products(self, probe: Tensors) -> tuple[Tensors, Tensors | None]:
        if self.chunk_size == 1 and probe[0].shape[0] == 1:
            hz, gz = self._single([t[0] for t in probe], keep_gradient=self.gradient is None)
            return [h.unsqueeze(0) for h in hz], None if gz is None else [g.unsqueeze(0) for g in gz]
        self.problem.rewind_rng()
        if self.gn:
            return vmap(self._single, randomness="same")(probe)
        return vmap(lambda z: self._single(z)[0], randomness="same")(probe), None

    def __call__(self, probe: Tensors) -> tuple[Tensors, Tensors | None]:
        if self._checked:
            return self._products(probe)
        tracker = _ModuleTracker(self.problem.model)
        try:
            result = self._products(probe)
        except (NotImplementedError, RuntimeError) as exc:
            if "forward AD" not in str(exc) and "forward-mode" not in str(exc) and "jvp" not in str(exc):
                raise
            raise self._strategy_error(tracker.stack, exc) from exc
        finally:
            tracker.remove()
        self._checked = True
        return result

    def _strategy_error(self, stack: list[str], exc: Exception) -> CurvatureStrategyError:
        modules = dict(self.problem.model.named_modules())
        where = next((n for n in reversed(stack) if n in modules), None)
        if where is None:
            culprit = "the model"
        else:
            culprit = f"module '{where or '(root)'}' ({type(modules[where]).__name__})"
        reason = str(exc).splitlines()[0]
        return CurvatureStrategyError(
            f"strategy '{self.strategy}' cannot run {culprit}: torch has no forward-mode rule it needs ({reason}). "
            "Use strategy='autograd' (or 'auto'), which needs only reverse mode."
        )
