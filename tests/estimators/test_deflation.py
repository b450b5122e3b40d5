"""Hutch++ and XTrace per layer (curvopt.estimators.deflation): unbiased against dense blocks, exact on a
Hessian the sketch captures, honest standard errors, and usable from the wrapper."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import TiedMLP, bn_cnn, dense_curvature, layer_params, mlp
from torch import nn

from curvopt import CurvatureAwareOptimizer, estimate_curvature

DEFLATED = ("hutch++", "xtrace")
REPS = 100


def _problems():
    torch.manual_seed(0)
    yield "mlp", mlp(), (torch.randn(10, 6), torch.randint(0, 3, (10,))), None
    torch.manual_seed(1)
    yield "bn_cnn", bn_cnn(), (torch.randn(8, 2, 5, 5), torch.randint(0, 4, (8,))), None
    torch.manual_seed(4)
    yield (
        "tied",
        TiedMLP(),
        (torch.randn(12, 5) * 1.5, torch.randint(0, 3, (12,))),
        {"W": ["first.weight"], "head": ["head.weight"]},
    )


@pytest.fixture(scope="module", params=list(DEFLATED))
def repeated(request):
    """Per problem: REPS estimates with K = 12 and the dense reference."""
    out = {}
    for name, model, batch, spec in _problems():
        loss_fn = nn.CrossEntropyLoss()
        dense = dense_curvature(model, loss_fn, batch, spec or layer_params(model))
        estimates = [
            estimate_curvature(
                model,
                loss_fn,
                batch,
                probes=12,
                estimator=request.param,
                layers=spec,
                strategy="func-vmap",
                chunk_size=12,
                generator=torch.Generator().manual_seed(r),
            )
            for r in range(REPS)
        ]
        out[name] = (estimates, dense)
    return request.param, out


def test_unbiased_against_dense_blocks(repeated):
    estimator, problems = repeated
    for name, (estimates, dense) in problems.items():
        layers = estimates[0].layers
        assert estimates[0].estimator == estimator and estimates[0].products == 12
        for kind, A, pick in (("trace", dense.H, lambda e, n: e.trace[n]), ("gn", dense.G, lambda e, n: e.gn_trace[n])):
            for n in layers:
                values = torch.tensor([pick(e, n) for e in estimates], dtype=torch.float64)
                exact = float(dense.block(A, n).trace())
                se = float(values.std() / math.sqrt(len(values)))
                assert abs(float(values.mean()) - exact) < 4 * se + 1e-9, f"{estimator} {name} {kind} {n}"
        for i, n in enumerate(layers):  # squared row-block norms, the GN-Gap's ingredients
            values = torch.tensor([float(e.samples["hess_row_sq"][:, i].mean()) for e in estimates])
            exact = float(dense.rows(dense.H, n).square().sum())
            assert abs(float(values.mean()) - exact) < 4 * float(values.std() / math.sqrt(len(values))), n


def test_reported_standard_errors_are_about_right(repeated):
    """Mean reported SE against the spread over repetitions; 2-SE coverage of the exact trace."""
    estimator, problems = repeated
    estimates, dense = problems["mlp"]
    exact = {n: float(dense.block(dense.H, n).trace()) for n in estimates[0].layers}
    covered = [abs(e.trace[n] - exact[n]) < 2 * e.trace_se[n] for e in estimates for n in exact]
    coverage = sum(covered) / len(covered)
    for n in exact:
        spread = float(torch.tensor([e.trace[n] for e in estimates]).std())
        mean_se = sum(e.trace_se[n] for e in estimates) / len(estimates)
        assert 0.6 < mean_se / spread < 1.4, (estimator, n, mean_se, spread)
    # Hutch++: 4 independent deflated values (t with 3 d.o.f.: P(|t| < 2) = 0.86); XTrace's 6 terms share products
    assert 0.75 < coverage < 0.99, (estimator, coverage)


@pytest.mark.parametrize("estimator", DEFLATED)
def test_exact_when_the_sketch_spans_the_hessian(estimator):
    """Linear least squares with 6 parameters: a sketch of rank 6 captures H, the deflated part vanishes.
    (Gaussian probes: 7 Rademacher vectors in R^6 are often linearly dependent.)"""
    torch.manual_seed(5)
    model = nn.Linear(2, 3, bias=False)
    batch = (torch.randn(16, 2), torch.randn(16, 3))
    exact = torch.autograd.functional.hessian(
        lambda w: nn.functional.mse_loss(batch[0] @ w.view(3, 2).T, batch[1]), model.weight.detach().reshape(-1)
    )
    products = 18 if estimator == "hutch++" else 14  # sketch 6 (hutch++) / 6 of m = 7 (xtrace, leave-one-out)
    sketch = 6 if estimator == "hutch++" else None
    est = estimate_curvature(
        model,
        nn.MSELoss(),
        batch,
        probes=products,
        estimator=estimator,
        sketch=sketch,
        distribution="gaussian",
        generator=torch.Generator().manual_seed(0),
    )
    (name,) = est.layers
    assert est.trace[name] == pytest.approx(float(exact.trace()), rel=1e-5)
    assert est.trace_se[name] < 1e-5 * abs(est.trace[name])


def test_bad_splits_are_refused_before_any_product():
    model, batch = mlp(), (torch.randn(4, 6), torch.randint(0, 3, (4,)))
    with pytest.raises(ValueError, match="hutch\\+\\+ with 3 products"):
        estimate_curvature(model, nn.CrossEntropyLoss(), batch, probes=3, estimator="hutch++")
    with pytest.raises(ValueError, match="xtrace needs an even number"):
        estimate_curvature(model, nn.CrossEntropyLoss(), batch, probes=9, estimator="xtrace")
    with pytest.raises(ValueError, match="unknown estimator"):
        estimate_curvature(model, nn.CrossEntropyLoss(), batch, estimator="hutch")
    with pytest.raises(ValueError, match="xtrace needs"):
        CurvatureAwareOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), model, nn.CrossEntropyLoss(), probes=7, estimator="xtrace"
        )


@pytest.mark.parametrize("estimator", DEFLATED)
def test_the_wrapper_estimates_with_a_deflated_estimator(estimator):
    torch.manual_seed(6)
    model = mlp()
    opt = CurvatureAwareOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        model,
        nn.CrossEntropyLoss(),
        every=2,
        probes=8,
        estimator=estimator,
        lr_scaling="trace",
    )
    for _ in range(8):
        x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
        opt.zero_grad()
        nn.CrossEntropyLoss()(model(x), y).backward()
        opt.step(batch=(x, y))
    assert len(opt.history) == 4 and opt.last_estimate.estimator == estimator
    assert opt.settings()["estimator"] == estimator and opt.last_estimate.probes == 4  # h = 8 - 2*2; m = 8 / 2
