"""Every estimator against dense float64 Hessian / GGN blocks, within the standard errors it reports.

One large estimate per model (module-scoped, shared by the checks of traces, row-block norms and
GN-Gap) keeps the suite fast; the products come from ``func-vmap`` in chunks of 500 probes, which
tests/estimators/test_estimate_state.py shows to equal the default strategy's on the same probes.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    LayerNormGELU,
    TiedMLP,
    TinyAttention,
    bn_cnn,
    dense_curvature,
    gaussian_variance,
    layer_params,
    mlp,
    rademacher_variance,
    variance_se,
)
from torch import nn

import curvopt
from curvopt import estimate_curvature, group_parameters

Z = 4.0  # tolerance in reported standard errors
FAST = {"strategy": "func-vmap", "chunk_size": 500}


def assert_within(estimate: float, se: float, exact: float, what: str):
    assert se > 0, f"{what}: standard error must be positive"
    assert abs(estimate - exact) < Z * se, f"{what}: {estimate:.6g} vs exact {exact:.6g} (se {se:.3g})"


def _mlp_problem():
    torch.manual_seed(0)
    return mlp(), nn.CrossEntropyLoss(), (torch.randn(10, 6), torch.randint(0, 3, (10,)))


def _cnn_problem():
    torch.manual_seed(1)
    model = bn_cnn()
    with torch.no_grad():  # BN running stats that differ from batch stats: the train/eval difference is real
        for _ in range(3):
            model(torch.randn(16, 2, 5, 5) * 2 + 1)
    return model, nn.CrossEntropyLoss(), (torch.randn(8, 2, 5, 5), torch.randint(0, 4, (8,)))


def _layernorm_problem():
    torch.manual_seed(2)
    model = LayerNormGELU()
    with torch.no_grad():  # a non-trivial affine LayerNorm
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.normal_(0, 0.3)
    return model, nn.CrossEntropyLoss(), (torch.randn(9, 5), torch.randint(0, 3, (9,)))


def _attention_problem():
    torch.manual_seed(3)
    return TinyAttention(), nn.CrossEntropyLoss(), (torch.randn(6, 3, 4), torch.randint(0, 3, (6,)))


PROBLEMS = {
    "mlp": _mlp_problem,
    "bn_cnn": _cnn_problem,
    "layernorm_gelu": _layernorm_problem,
    "attention": _attention_problem,
}


@pytest.fixture(scope="module", params=list(PROBLEMS))
def exact(request):
    """(estimate with K = 3000, dense reference) for one model."""
    model, loss_fn, batch = PROBLEMS[request.param]()
    dense = dense_curvature(model, loss_fn, batch, layer_params(model))
    est = estimate_curvature(model, loss_fn, batch, probes=3000, generator=torch.Generator().manual_seed(0), **FAST)
    return est, dense


def test_traces_match_dense_blocks(exact):
    est, dense = exact
    for name in est.layers:
        for label, mean, se, A in (
            ("tr H", est.trace, est.trace_se, dense.H),
            ("tr G", est.gn_trace, est.gn_trace_se, dense.G),
            ("tr T", est.tensor_trace, est.tensor_trace_se, dense.T),
        ):
            assert_within(mean[name], se[name], float(dense.block(A, name).trace()), f"{label} {name}")
    assert_within(est.total_trace, est.total_trace_se, float(dense.H.trace()), "total trace")


def test_row_block_frobenius_norms_and_gn_gap(exact):
    est, dense = exact
    k = est.probes
    for kind, A in (("hess_row_sq", dense.H), ("gn_row_sq", dense.G), ("tensor_row_sq", dense.T)):
        for i, name in enumerate(est.layers):
            s = est.samples[kind][:, i]
            exact_value = float(dense.rows(A, name).square().sum())
            assert_within(float(s.mean()), float(s.std() / math.sqrt(k)), exact_value, f"{kind} {name}")
    for i, name in enumerate(est.layers):
        t, g = est.samples["tensor_row_sq"][:, i], est.samples["gn_row_sq"][:, i]
        exact_value = float(dense.rows(dense.T, name).norm() / dense.rows(dense.G, name).norm())
        rel = 0.5 * (float(t.std()) / float(t.mean()) + float(g.std()) / float(g.mean())) / math.sqrt(k)
        assert abs(est.gn_gap[name] / exact_value - 1) < Z * rel, f"gn_gap {name}: {est.gn_gap[name]} vs {exact_value}"
    total = float(dense.T.norm() / dense.G.norm())
    assert abs(est.total_gn_gap / total - 1) < 0.05


def test_dense_reference_agrees_with_finite_differences():
    """The reference itself, once, on the model where torch.func.hessian goes wrong (affine LayerNorm)."""
    model, loss_fn, batch = _layernorm_problem()
    spec = layer_params(model)
    dense = dense_curvature(model, loss_fn, batch, spec)
    ref = model.double()
    params = [p for names in spec.values() for n in names for p in [dict(ref.named_parameters())[n]]]
    x, y = batch[0].double(), batch[1]

    def flat_grad() -> torch.Tensor:
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_fn(ref(x), y), params)])

    gen = torch.Generator().manual_seed(11)
    for _ in range(3):
        v = torch.randn(dense.H.shape[0], generator=gen, dtype=torch.float64)
        eps = 1e-5
        pieces = torch.split(v, [p.numel() for p in params])
        with torch.no_grad():
            for p, d in zip(params, pieces):
                p.add_(eps * d.view_as(p))
        plus = flat_grad()
        with torch.no_grad():
            for p, d in zip(params, pieces):
                p.sub_(2 * eps * d.view_as(p))
        minus = flat_grad()
        with torch.no_grad():
            for p, d in zip(params, pieces):
                p.add_(eps * d.view_as(p))
        fd = (plus - minus) / (2 * eps)
        torch.testing.assert_close(dense.H @ v, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_per_probe_variance_matches_closed_form(distribution):
    model, loss_fn, batch = _mlp_problem()
    dense = dense_curvature(model, loss_fn, batch, layer_params(model))
    est = estimate_curvature(
        model,
        loss_fn,
        batch,
        probes=4000,
        distribution=distribution,
        generator=torch.Generator().manual_seed(2),
        **FAST,
    )
    formula = rademacher_variance if distribution == "rademacher" else gaussian_variance
    for kind, A in (("trace", dense.H), ("gn_trace", dense.G)):
        for i, name in enumerate(est.layers):
            s2, se = variance_se(est.samples[kind][:, i])
            expected = formula(A, dense, name)
            what = f"{distribution} {kind} {name}: var {s2:.4g} vs {expected:.4g} (se {se:.3g})"
            assert abs(s2 - expected) < Z * se, what


def test_cross_layer_covariance_matches_block_norms():
    """Cov(T̂_l, T̂_m) = ‖H_lm‖_F² / K per probe pair with shared Rademacher probes."""
    model, loss_fn, batch = _mlp_problem()
    dense = dense_curvature(model, loss_fn, batch, layer_params(model))
    est = estimate_curvature(
        model, loss_fn, batch, probes=4000, gn=False, generator=torch.Generator().manual_seed(3), **FAST
    )
    s = est.samples["trace"]
    a, b = est.layers[0], est.layers[1]
    prod = (s[:, 0] - s[:, 0].mean()) * (s[:, 1] - s[:, 1].mean())
    cov, se = float(prod.mean()), float(prod.std() / math.sqrt(len(prod)))
    # the shared term z_aᵀ H_ab z_b appears once in each layer's value: Cov = Var(z_aᵀH_ab z_b) = ‖H_ab‖_F²
    expected = float(dense.block(dense.H, a, b).square().sum())
    assert abs(cov - expected) < Z * se


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
        model,
        loss_fn,
        (x, y),
        probes=3000,
        layers={"W": ["first.weight"]},
        generator=torch.Generator().manual_seed(5),
        **FAST,
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
        unrolled,
        loss_fn,
        (x, y),
        probes=20000,
        layers=spec,
        gn=False,
        generator=torch.Generator().manual_seed(6),
        **FAST,
    )
    per_probe = est_u.samples["trace"].sum(1)
    unrolled_mean = float(per_probe.mean())
    unrolled_se = float(per_probe.std() / math.sqrt(len(per_probe)))
    assert_within(unrolled_mean, unrolled_se, tr_aa + tr_bb, "unrolled trace")
    bias = unrolled_mean - exact_shared
    assert abs(2 * tr_ab) > 6 * unrolled_se, "test model must have a visible cross-instance block"
    assert math.copysign(1, bias) == -math.copysign(1, tr_ab)
    assert abs(bias - (-2 * tr_ab)) < Z * math.hypot(unrolled_se, est.trace_se["W"])


def test_custom_subset_grouping_matches_exact_block():
    model, loss_fn, batch = _cnn_problem()
    spec = {"conv": ["0.weight", "0.bias"], "head": [model[5]]}
    dense = dense_curvature(model, loss_fn, batch, {"conv": ["0.weight", "0.bias"], "head": ["5.weight", "5.bias"]})
    gen = torch.Generator().manual_seed(7)
    est = estimate_curvature(model, loss_fn, batch, probes=2000, layers=spec, generator=gen, **FAST)
    assert est.layers == ["conv", "head"]
    for name in est.layers:
        assert_within(est.trace[name], est.trace_se[name], float(dense.block(dense.H, name).trace()), name)


def test_standard_error_is_honest_across_repetitions():
    """Over 200 independent K=8 estimates (default strategy), |error| < 2·SE about 95 % of the time."""
    model, loss_fn, batch = _mlp_problem()
    dense = dense_curvature(model, loss_fn, batch, layer_params(model))
    exact_value = float(dense.H.trace())
    gen = torch.Generator().manual_seed(8)
    errors = []
    for _ in range(200):
        e = estimate_curvature(model, loss_fn, batch, probes=8, gn=False, generator=gen)
        errors.append(abs(e.total_trace - exact_value) / e.total_trace_se)
    coverage = sum(err < 2 for err in errors) / len(errors)
    assert 0.82 < coverage < 0.995, coverage


def test_the_public_operator_applies_h_and_g_as_the_dense_blocks_do():
    """``curvopt.curvature_operator``: H v, G v for one direction and H_ll x, G_ll x per layer, against float64."""
    torch.manual_seed(21)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    loss_fn, batch = nn.CrossEntropyLoss(), (torch.randn(12, 4), torch.randint(0, 3, (12,)))
    dense = dense_curvature(model, loss_fn, batch, layer_params(model))
    v = [torch.randn(p.shape) for p in model.parameters()]
    flat = torch.cat([t.reshape(-1) for t in v]).double()
    with curvopt.curvature_operator(model, loss_fn, batch, gn=True, strategy="autograd") as op:
        assert list(op.shapes) == ["0", "2"] and op.shapes["0"] == [torch.Size([6, 4]), torch.Size([6])]
        hv, gv = op.hvp(v), op.ggn_vp(v)
        x = torch.randn(op.numel["2"])
        block_h, block_g = op.layer_hvp("2", x), op.layer_ggn_vp("2", x)
        with pytest.raises(ValueError, match="one tensor per parameter"):
            op.hvp(v[:2])
        with pytest.raises(KeyError, match="the operator's layers are"):
            op.layer_hvp("head", x)
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in hv]).double(), dense.H @ flat, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in gv]).double(), dense.G @ flat, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(block_h.double(), dense.block(dense.H, "2") @ x.double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(block_g.double(), dense.block(dense.G, "2") @ x.double(), rtol=1e-4, atol=1e-6)
    with curvopt.curvature_operator(model, loss_fn, batch) as op, pytest.raises(ValueError, match="gn=True"):
        op.ggn_vp(v)
