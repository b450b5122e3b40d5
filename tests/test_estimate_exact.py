"""Every estimator against dense Hessian / GGN blocks from torch.func, within reported standard errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    TiedMLP,
    dense_curvature,
    gaussian_variance,
    rademacher_variance,
    variance_se,
)
from torch import nn

from curvopt import estimate_curvature, group_parameters

Z = 4.0  # tolerance in reported standard errors


def layer_params(model):
    return {layer.name: list(layer.param_names) for layer in group_parameters(model)}


def assert_within(estimate: float, se: float, exact: float, what: str):
    assert se > 0, f"{what}: standard error must be positive"
    assert abs(estimate - exact) < Z * se, f"{what}: {estimate:.6g} vs exact {exact:.6g} (se {se:.3g})"


@pytest.mark.parametrize("problem", ["mlp_problem", "cnn_problem"])
def test_traces_match_dense_blocks(problem, request):
    model, loss_fn, batch = request.getfixturevalue(problem)
    dense = dense_curvature(model, loss_fn, batch, layer_params(model))
    est = estimate_curvature(model, loss_fn, batch, probes=3000, generator=torch.Generator().manual_seed(0))
    T = dense.T
    for name in est.layers:
        for label, mean, se, A in (
            ("tr H", est.trace, est.trace_se, dense.H),
            ("tr G", est.gn_trace, est.gn_trace_se, dense.G),
            ("tr T", est.tensor_trace, est.tensor_trace_se, T),
        ):
            assert_within(mean[name], se[name], float(dense.block(A, name).trace()), f"{label} {name}")
    assert_within(est.total_trace, est.total_trace_se, float(dense.H.trace()), "total trace")


@pytest.mark.parametrize("problem", ["mlp_problem", "cnn_problem"])
def test_row_block_frobenius_norms_and_gn_gap(problem, request):
    model, loss_fn, batch = request.getfixturevalue(problem)
    dense = dense_curvature(model, loss_fn, batch, layer_params(model))
    est = estimate_curvature(model, loss_fn, batch, probes=3000, generator=torch.Generator().manual_seed(1))
    k = est.probes
    for kind, A in (("hess_row_sq", dense.H), ("gn_row_sq", dense.G), ("tensor_row_sq", dense.T)):
        for i, name in enumerate(est.layers):
            s = est.samples[kind][:, i]
            exact = float(dense.rows(A, name).square().sum())
            assert_within(float(s.mean()), float(s.std() / math.sqrt(k)), exact, f"{kind} {name}")
    for i, name in enumerate(est.layers):
        t, g = est.samples["tensor_row_sq"][:, i], est.samples["gn_row_sq"][:, i]
        exact = float(dense.rows(dense.T, name).norm() / dense.rows(dense.G, name).norm())
        rel = 0.5 * (float(t.std()) / float(t.mean()) + float(g.std()) / float(g.mean())) / math.sqrt(k)
        assert abs(est.gn_gap[name] / exact - 1) < Z * rel, f"gn_gap {name}: {est.gn_gap[name]} vs {exact}"
    total = float(dense.T.norm() / dense.G.norm())
    assert abs(est.total_gn_gap / total - 1) < 0.05


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_per_probe_variance_matches_closed_form(mlp_problem, distribution):
    model, loss_fn, batch = mlp_problem
    dense = dense_curvature(model, loss_fn, batch, layer_params(model))
    est = estimate_curvature(
        model, loss_fn, batch, probes=4000, distribution=distribution, generator=torch.Generator().manual_seed(2)
    )
    formula = rademacher_variance if distribution == "rademacher" else gaussian_variance
    for kind, A in (("trace", dense.H), ("gn_trace", dense.G)):
        for i, name in enumerate(est.layers):
            s2, se = variance_se(est.samples[kind][:, i])
            exact = formula(A, dense, name)
            assert abs(s2 - exact) < Z * se, f"{distribution} {kind} {name}: var {s2:.4g} vs {exact:.4g} (se {se:.3g})"


def test_cross_layer_covariance_matches_block_norms(mlp_problem):
    """Cov(T̂_l, T̂_m) = ‖H_lm‖_F² / K per probe pair with shared Rademacher probes (DESIGN §2)."""
    model, loss_fn, batch = mlp_problem
    dense = dense_curvature(model, loss_fn, batch, layer_params(model))
    est = estimate_curvature(model, loss_fn, batch, probes=4000, gn=False, generator=torch.Generator().manual_seed(3))
    s = est.samples["trace"]
    a, b = est.layers[0], est.layers[1]
    prod = (s[:, 0] - s[:, 0].mean()) * (s[:, 1] - s[:, 1].mean())
    cov, se = float(prod.mean()), float(prod.std() / math.sqrt(len(prod)))
    # the shared term z_aᵀ H_ab z_b appears once in each layer's value: Cov = Var(z_aᵀH_ab z_b) = ‖H_ab‖_F²
    exact = float(dense.block(dense.H, a, b).square().sum())
    assert abs(cov - exact) < Z * se


def test_tied_weight_uses_shared_tensor_and_unrolling_is_biased():
    torch.manual_seed(4)
    model = TiedMLP()
    x, y = torch.randn(12, 5) * 1.5, torch.randint(0, 3, (12,))
    loss_fn = nn.CrossEntropyLoss()
    layers = group_parameters(model)
    assert [layer.name for layer in layers] == ["first", "second", "head"]
    assert layers[0].param_names == ("first.weight", "first.bias")
    assert layers[1].param_names == ("second.bias",)  # the tied weight is counted once, under "first"

    # exact Hessian w.r.t. the shared weight W
    dense = dense_curvature(model, loss_fn, (x, y), {"W": ["first.weight"]})
    exact_shared = float(dense.H.trace())
    est = estimate_curvature(
        model, loss_fn, (x, y), probes=3000, layers={"W": ["first.weight"]}, generator=torch.Generator().manual_seed(5)
    )
    assert_within(est.trace["W"], est.trace_se["W"], exact_shared, "shared-tensor trace")

    # unrolled: two independent copies W_a, W_b with equal values
    unrolled = TiedMLP()
    unrolled.load_state_dict(model.state_dict())
    unrolled.second.weight = nn.Parameter(model.first.weight.detach().clone())
    spec = {"Wa": ["first.weight"], "Wb": ["second.weight"]}
    dense_u = dense_curvature(unrolled, loss_fn, (x, y), spec)
    tr_aa = float(dense_u.block(dense_u.H, "Wa").trace())
    tr_bb = float(dense_u.block(dense_u.H, "Wb").trace())
    tr_ab = float(dense_u.block(dense_u.H, "Wa", "Wb").trace())
    # the true block is Σ_ab H̃_ab, so the exact shared trace = tr H̃_aa + tr H̃_bb + 2 tr H̃_ab
    assert exact_shared == pytest.approx(tr_aa + tr_bb + 2 * tr_ab, rel=1e-9, abs=1e-9)
    est_u = estimate_curvature(
        unrolled, loss_fn, (x, y), probes=20000, layers=spec, gn=False, generator=torch.Generator().manual_seed(6)
    )
    per_probe = est_u.samples["trace"].sum(1)
    unrolled_mean = float(per_probe.mean())
    unrolled_se = float(per_probe.std() / math.sqrt(len(per_probe)))
    assert_within(unrolled_mean, unrolled_se, tr_aa + tr_bb, "unrolled trace")
    bias = unrolled_mean - exact_shared
    assert abs(2 * tr_ab) > 6 * unrolled_se, "test model must have a visible cross-instance block"
    assert math.copysign(1, bias) == -math.copysign(1, tr_ab)
    assert abs(bias - (-2 * tr_ab)) < Z * math.hypot(unrolled_se, est.trace_se["W"])


def test_custom_subset_grouping_matches_exact_block(cnn_problem):
    model, loss_fn, batch = cnn_problem
    spec = {"conv": ["0.weight", "0.bias"], "head": [model[5]]}
    dense = dense_curvature(model, loss_fn, batch, {"conv": ["0.weight", "0.bias"], "head": ["5.weight", "5.bias"]})
    gen = torch.Generator().manual_seed(7)
    est = estimate_curvature(model, loss_fn, batch, probes=2000, layers=spec, generator=gen)
    assert est.layers == ["conv", "head"]
    for name in est.layers:
        assert_within(est.trace[name], est.trace_se[name], float(dense.block(dense.H, name).trace()), name)


def test_standard_error_is_honest_across_repetitions(mlp_problem):
    """Over 200 independent K=8 estimates, |error| < 2·SE about 95 % of the time (not 50 %, not 100 %)."""
    model, loss_fn, batch = mlp_problem
    dense = dense_curvature(model, loss_fn, batch, layer_params(model))
    exact = float(dense.H.trace())
    gen = torch.Generator().manual_seed(8)
    errors = []
    for _ in range(200):
        e = estimate_curvature(model, loss_fn, batch, probes=8, gn=False, generator=gen)
        errors.append(abs(e.total_trace - exact) / e.total_trace_se)
    coverage = sum(err < 2 for err in errors) / len(errors)
    assert 0.82 < coverage < 0.995, coverage
