"""Which engine computes the products: the exact strategies, finite differences, and what ``"auto"`` picks.

* ``"autograd"``, ``"func"``, ``"func-vmap"`` — exact (:mod:`curvopt.engine.products`);
* ``"finite-difference"`` — first derivatives only (:mod:`curvopt.engine.finite_difference`);
* ``"auto"`` — the exact ``"autograd"`` wherever it runs (the fastest exact strategy measured,
  benchmarks/RESULTS.md §1), and finite differences where no exact strategy can: an FSDP2-sharded model,
  or a model whose first product meets an operation without a double-backward rule
  (:class:`~curvopt.engine.products.DoubleBackwardError`: reentrant checkpointing, ``@once_differentiable``
  functions, fused kernels). It says so once with :class:`~curvopt.engine.finite_difference.FiniteDifferenceWarning`,
  and the finite-difference engine runs its kink self-check on that session.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from .finite_difference import FiniteDifference, FiniteDifferenceWarning
from .products import (
    EXACT_STRATEGIES,
    DoubleBackwardError,
    ForwardOverReverse,
    ProbeProblem,
    ReverseOverReverse,
    Tensors,
    double_backward_error,
    is_double_backward_failure,
)
from .sharding import is_sharded

FINITE_DIFFERENCE = "finite-difference"
STRATEGIES = (*EXACT_STRATEGIES, FINITE_DIFFERENCE)
AUTO_EXACT = "autograd"

Engine = ReverseOverReverse | ForwardOverReverse | FiniteDifference


def _say_fallback(reason: str) -> None:
    warnings.warn(
        f"curvopt: strategy 'auto' uses finite differences for this model: {reason}. Exact second derivatives "
        "are not available; a self-check at the first estimate settles the step and reports layers where finite "
        "differences do not estimate the Hessian (kinks such as ReLU).",
        FiniteDifferenceWarning,
        stacklevel=5,
    )


class AutoEngine:
    """``"auto"``: the exact engine until the model turns out to have no double backward, then finite differences.

    The switch happens at construction or at the first product, before any product was returned, so every
    product of a session comes from one engine; ``strategy`` names the one in use.
    """

    def __init__(self, build_exact: Callable[[], Engine], build_fd: Callable[[], FiniteDifference]) -> None:
        self._build_fd = build_fd
        self._products = 0
        try:
            self.engine: Engine = build_exact()
        except DoubleBackwardError as exc:
            self.engine = self._fall_back(exc)

    def _fall_back(self, exc: DoubleBackwardError) -> FiniteDifference:
        reason = str(exc).split(": ", 1)[-1].split(". Use strategy", 1)[0]
        _say_fallback(reason)
        return self._build_fd()

    def __getattr__(self, name: str) -> object:  # loss, out_hessian, chunk_size, strategy, step_check
        engine = self.__dict__.get("engine")
        if engine is None:
            raise AttributeError(name)
        return getattr(engine, name)

    def __call__(self, probe: Tensors) -> tuple[Tensors, Tensors | None]:
        if self._products == 0 and not isinstance(self.engine, FiniteDifference):
            try:
                result = self.engine(probe)
            except DoubleBackwardError as exc:
                self.engine = self._fall_back(exc)
                result = self.engine(probe)
        else:
            result = self.engine(probe)
        self._products += 1
        return result


def exact_strategy_runs(problem: ProbeProblem, gn: bool) -> bool:
    """Whether the exact ``"autograd"`` strategy can take a product on this problem (tried once: a model with an
    operation that has no double backward, e.g. Hardswish, fails here). Used before advising it."""
    try:
        engine = ReverseOverReverse(problem, gn=gn)
        probe = [torch.ones_like(p).unsqueeze(0) for p in problem.params]
        engine(probe)
    except DoubleBackwardError:
        return False
    except (RuntimeError, NotImplementedError) as exc:
        if is_double_backward_failure(exc):
            return False
        raise
    return True


def make_engine(
    strategy: str,
    problem: ProbeProblem,
    *,
    gn: bool,
    chunk_size: int = 4,
    closed_form: bool = True,
    fd_step: float | None = None,
    fd_check: bool = False,
    tensor_layers: list[int] | None = None,
) -> Engine | AutoEngine:
    """Build the product engine named ``strategy`` (``"auto"`` or one of :data:`STRATEGIES`; see the module docstring).

    ``fd_step`` is the finite-difference relative step (``None``: by precision), ``fd_check`` runs the
    finite-difference self-check on the first product (explicit ``"finite-difference"``; ``"auto"`` always
    checks when it falls back), per layer as ``tensor_layers[i]`` groups the tensors.
    """
    sharded = is_sharded(problem.params)

    def finite_difference(check: bool) -> FiniteDifference:
        return FiniteDifference(
            problem, gn=gn, closed_form=closed_form, step=fd_step, check=check, tensor_layers=tensor_layers
        )

    if strategy == FINITE_DIFFERENCE:
        return finite_difference(fd_check)
    if strategy == "auto":
        if sharded:
            _say_fallback("its parameters are sharded by FSDP (no double backward through sharded parameters)")
            return finite_difference(True)
        return AutoEngine(
            lambda: ReverseOverReverse(problem, gn=gn, closed_form=closed_form), lambda: finite_difference(True)
        )
    if strategy not in EXACT_STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected 'auto' or one of {STRATEGIES}")
    if sharded:
        raise double_backward_error(
            strategy,
            "its parameters are sharded by FSDP (autograd.grad cannot "
            "differentiate the sharded parameters; only backward() reaches them)",
        )
    if strategy == "autograd":
        return ReverseOverReverse(problem, gn=gn, closed_form=closed_form)
    return ForwardOverReverse(
        problem,
        gn=gn,
        chunk_size=chunk_size if strategy == "func-vmap" else 1,
        closed_form=closed_form,
        strategy=strategy,
    )
