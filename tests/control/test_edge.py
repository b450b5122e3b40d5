"""``lr_scaling="edge"``: the edge of stability read from the optimizer, λ_max(D H D) against a dense reference,
and the policy on a quadratic where the edge is known exactly."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from curvopt import CurvatureAwareOptimizer
from curvopt.control.edge import EdgeScaling, UnsupportedOptimizerError, momentum_threshold, step_geometry
from curvopt.engine.operator import curvature_operator
from curvopt.estimators.preconditioned import preconditioned_top_eigenpair


def _regression(seed: int = 0, n: int = 64, d: int = 5) -> tuple[nn.Module, nn.Module, tuple, float]:
    """Least squares: H = 2XᵀX/n exactly, so the edge of every optimizer is known in closed form."""
    torch.manual_seed(seed)
    model = nn.Linear(d, 1, bias=False)
    x, y = torch.randn(n, d), torch.randn(n, 1)
    lam = float(torch.linalg.eigvalsh(2 * x.T @ x / n)[-1])
    return model, nn.MSELoss(), (x, y), lam


def _dense_hessian(model: nn.Module, loss_fn, batch) -> torch.Tensor:
    params = [p.detach().double() for p in model.parameters()]
    shapes = [p.shape for p in params]

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        pieces, offset = [], 0
        for shape in shapes:
            n = math.prod(shape)
            pieces.append(flat[offset : offset + n].reshape(shape))
            offset += n
        names = [k for k, _ in model.named_parameters()]
        out = torch.func.functional_call(model.double(), dict(zip(names, pieces)), (batch[0].double(),))
        return loss_fn(out, batch[1])

    h = torch.autograd.functional.hessian(loss_of, torch.cat([p.reshape(-1) for p in params]))
    model.float()
    return h


@pytest.mark.parametrize(
    ("momentum", "dampening", "nesterov", "expected"),
    [(0.0, 0.0, False, 2.0), (0.9, 0.0, False, 3.8), (0.9, 0.9, False, 38.0), (0.9, 0.0, True, 3.8 / 2.8)],
)
def test_the_edge_of_heavy_ball_momentum(momentum, dampening, nesterov, expected):
    assert momentum_threshold(momentum, dampening, nesterov) == pytest.approx(expected)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_s_geometry_is_its_upcoming_step_s(amsgrad):
    torch.manual_seed(1)
    model = nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.8, 0.99), eps=1e-6, amsgrad=amsgrad)
    for step in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        geometry = step_geometry(opt, list(model.parameters()))
        for p, d in zip(model.parameters(), geometry.scale):
            state = opt.state.get(p, {})
            v = 0.99 * state.get("exp_avg_sq", torch.zeros_like(p)) + 0.01 * p.grad.square()
            if amsgrad and "max_exp_avg_sq" in state:
                v = torch.maximum(v, state["max_exp_avg_sq"])
            precondition = (v / (1 - 0.99 ** (step + 1))).sqrt() + 1e-6
            torch.testing.assert_close(d.square() * momentum_threshold(0.8, 0.8), 3e-3 / precondition)
        opt.step()


def test_an_optimizer_whose_preconditioner_it_cannot_read_is_named():
    model = nn.Linear(3, 1)
    model(torch.randn(2, 3)).sum().backward()
    with pytest.raises(UnsupportedOptimizerError, match=r"knows SGD, Adam, AdamW.*Adagrad.*lr_scaling='trust'"):
        step_geometry(torch.optim.Adagrad(model.parameters()), list(model.parameters()))


def test_lanczos_finds_the_top_eigenvalue_of_the_preconditioned_hessian():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    loss_fn, batch = nn.CrossEntropyLoss(), (torch.randn(16, 4), torch.randint(0, 3, (16,)))
    dense = _dense_hessian(model, loss_fn, batch)
    scale = [torch.rand_like(p) + 0.1 for p in model.parameters()]
    d = torch.cat([s.reshape(-1) for s in scale]).double()
    exact = float(torch.linalg.eigvalsh(d[:, None] * dense * d[None, :])[-1])
    with curvature_operator(model, loss_fn, batch, strategy="autograd") as op:
        full, vector = preconditioned_top_eigenpair(op, scale, iterations=op.dim)
        warm, _ = preconditioned_top_eigenpair(op, scale, start=vector, iterations=2)  # from the eigenvector
        cold, _ = preconditioned_top_eigenpair(op, scale, iterations=3)
    assert full == pytest.approx(exact, rel=1e-5) and warm == pytest.approx(exact, rel=1e-5)
    assert 0 < cold <= exact * (1 + 1e-6)  # a Ritz value approaches λ_max from below


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_twice_past_its_edge_is_held_at_it_and_converges(momentum):
    model, loss_fn, batch, lam = _regression()
    lr = 2.0 * momentum_threshold(momentum) / lam  # twice the edge: bare SGD diverges
    runs = {}
    for policy in (None, "edge"):  # margin 0.8: held at 0.8 of its edge (at the edge itself it would not converge)
        model_copy = nn.Linear(5, 1, bias=False)
        model_copy.load_state_dict(model.state_dict())
        opt = CurvatureAwareOptimizer(
            torch.optim.SGD(model_copy.parameters(), lr=lr, momentum=momentum),
            model_copy,
            loss_fn,
            every=10**6,
            monitor=None,
            curvature_batch_size=64,
            strategy="autograd",
            lr_scaling=EdgeScaling(margin=0.8) if policy else None,
        )
        for _ in range(60):
            opt.zero_grad()
            loss_fn(model_copy(batch[0]), batch[1]).backward()
            opt.step(batch=batch)
        runs[policy] = (float(loss_fn(model_copy(batch[0]), batch[1])), opt)
    first = float(loss_fn(model(batch[0]), batch[1]))
    assert not runs[None][0] < first  # past the edge: no progress (it diverges)
    edge = runs["edge"][1].lr_policy
    assert edge.ratio == pytest.approx(2.0, rel=1e-4) and edge.scale == pytest.approx(0.4, rel=1e-4)
    assert runs["edge"][0] < first


def test_below_the_edge_the_trajectory_is_the_bare_optimizer_s_and_the_cadence_backs_off():
    model, loss_fn, batch, _ = _regression()
    states = []
    for policy in (None, "edge"):
        m = nn.Linear(5, 1, bias=False)
        m.load_state_dict(model.state_dict())
        opt = CurvatureAwareOptimizer(
            torch.optim.AdamW(m.parameters(), lr=1e-3),
            m,
            loss_fn,
            every=10**6,
            monitor=None,
            lr_scaling=policy,
            curvature_batch_size=64,
        )
        for _ in range(200):
            opt.zero_grad()
            loss_fn(m(batch[0]), batch[1]).backward()
            opt.step(batch=batch)
        states.append(m.weight.detach().clone())
    assert torch.equal(states[0], states[1])  # scale 1 throughout: bit for bit the bare AdamW
    policy = opt.lr_policy
    assert policy.scale == 1.0 and policy.measurements <= 9  # 1, 2, 4, …, 128: geometric back-off
    restored = EdgeScaling()
    restored.load_state_dict(policy.state_dict())
    assert restored.ratio == policy.ratio and restored.next_step == 0  # a resumed run measures at its next step


@pytest.mark.parametrize(
    "make",
    [
        lambda p: torch.optim.SGD(p, lr=0.05),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.1),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
        lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.8, 0.99)),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0, amsgrad=True),
    ],
    ids=["sgd", "heavy-ball", "nesterov", "adam", "adamw", "amsgrad"],
)
def test_the_upcoming_update_is_the_step_the_optimizer_takes(make):
    from curvopt.control.edge import upcoming_update

    torch.manual_seed(3)
    model = nn.Linear(4, 2)
    opt = make(model.parameters())
    for _ in range(4):  # the first step (no state) and later ones (momentum buffers, moments)
        opt.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        predicted = upcoming_update(opt, list(model.parameters()))
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        for p, b, d in zip(model.parameters(), before, predicted):
            torch.testing.assert_close(p.detach() - b, d, rtol=1e-5, atol=1e-7)


def test_the_update_criterion_is_the_quadratic_model_s_optimal_step():
    """Least squares with plain SGD: Δ = −ηg, so s* = gᵀg / (η gᵀHg) exactly."""
    model, loss_fn, batch, lam = _regression()
    lr = 3.0 / lam
    opt = CurvatureAwareOptimizer(
        torch.optim.SGD(model.parameters(), lr=lr),
        model,
        loss_fn,
        every=10**6,
        monitor=None,
        lr_scaling=EdgeScaling(criterion="update"),
        curvature_batch_size=64,
        strategy="autograd",
    )
    opt.zero_grad()
    loss_fn(model(batch[0]), batch[1]).backward()
    g = model.weight.grad.reshape(-1).double()
    x = batch[0].double()
    h = 2 * x.T @ x / len(x)
    optimal = float(g @ g / (lr * g @ h @ g))
    opt.step(batch=batch)
    assert opt.lr_policy.ratio == pytest.approx(1 / optimal, rel=1e-5)
    assert opt.lr_policy.scale == pytest.approx(min(1.0, optimal), rel=1e-5)
