"""Inter-layer block norms, resonance/coupling/Φ and per-layer spectra against dense Hessians."""

from __future__ import annotations

import pytest
import torch
from helpers import dense_curvature
from torch import nn
from torch.func import functional_call, hessian

from curvopt import activation_block_norms, block_norms, group_parameters, layer_spectrum
from curvopt.estimators.spectra import MODEL

Z = 4.0  # tolerance in reported standard errors
K = 64


class ResidualMLP(nn.Module):
    """x → inp → [x + fc2(tanh(fc1(x)))] → head: one residual block."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.fc1 = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = h + self.fc2(torch.tanh(self.fc1(h)))
        return self.head(torch.tanh(h))


@pytest.fixture
def residual_problem():
    torch.manual_seed(2)
    return ResidualMLP(), nn.CrossEntropyLoss(), (torch.randn(12, 4), torch.randint(0, 3, (12,)))


def _dense(model, loss_fn, batch):
    layers = {layer.name: list(layer.param_names) for layer in group_parameters(model)}
    return dense_curvature(model, loss_fn, batch, layers), list(layers)


def _exact_maps(dense, names):
    maps = {}
    for kind, A in (("hess", dense.H), ("gn", dense.G), ("tensor", dense.T)):
        maps[kind] = torch.tensor([[float(dense.block(A, v, w).square().sum()) for w in names] for v in names])
    return maps


@pytest.mark.parametrize("problem", ["mlp_problem", "cnn_problem", "residual_problem"])
def test_block_norm_maps_match_dense_blocks(problem, request):
    model, loss_fn, batch = request.getfixturevalue(problem)
    dense, names = _dense(model, loss_fn, batch)
    exact = _exact_maps(dense, names)
    est = block_norms(model, loss_fn, batch, probes=K, gn=True, generator=torch.Generator().manual_seed(0))
    assert est.layers == names and est.probes == K
    for kind in ("hess", "gn", "tensor"):
        mean, se = est.squared(kind)
        for v in range(len(names)):
            for w in range(len(names)):
                tol = Z * float(se[v, w]) + 1e-6 * float(exact[kind].max())
                assert abs(float(mean[v, w]) - float(exact[kind][v, w])) <= tol, (kind, names[v], names[w])
    # the map is not block-diagonal and not trivially symmetric-by-construction per probe
    assert float(exact["hess"][0, -1]) > 0


@pytest.mark.parametrize("problem", ["mlp_problem", "residual_problem"])
def test_resonance_coupling_and_cross_block_mass(problem, request):
    model, loss_fn, batch = request.getfixturevalue(problem)
    dense, names = _dense(model, loss_fn, batch)
    sq = _exact_maps(dense, names)["hess"]
    exact_r = sq.sqrt()
    d = exact_r.diagonal().sqrt()
    exact_c = exact_r / (d[:, None] * d[None, :])
    exact_phi = 1 - float(sq.diagonal().sum() / sq.sum())
    assert 0 < exact_phi < 1
    est = block_norms(model, loss_fn, batch, probes=K, generator=torch.Generator().manual_seed(1))
    r, r_se = est.resonance()
    c, c_se = est.coupling()
    assert torch.all((r - exact_r).abs() <= Z * r_se + 1e-6)
    assert torch.all((c - exact_c).abs() <= Z * c_se + 1e-6)
    phi, phi_se = est.phi()
    assert phi_se > 0 and abs(phi - exact_phi) <= Z * phi_se
    out = est.to_dict()
    assert out["inter/layers"] == names and len(out["inter/coupling"]) == len(names)


@pytest.mark.parametrize("problem", ["mlp_problem", "cnn_problem", "residual_problem"])
def test_lanczos_top_eigenvalue_matches_eigvalsh_per_block_and_whole_model(problem, request):
    model, loss_fn, batch = request.getfixturevalue(problem)
    dense, names = _dense(model, loss_fn, batch)
    d_max = max(dense.block(dense.H, n).shape[0] for n in names)
    spectra = layer_spectrum(
        model,
        loss_fn,
        batch,
        steps=dense.H.shape[0],
        top_k=2,
        slq_probes=2,
        slq_steps=4,
        whole_model=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert d_max <= dense.H.shape[0]
    for name in [*names, MODEL]:
        block = dense.H if name == MODEL else dense.block(dense.H, name)
        eig = torch.linalg.eigvalsh(block)
        top = spectra[name].top
        assert len(top) == min(2, block.shape[0])
        assert abs(top[0] - float(eig[-1])) <= 1e-3 * float(eig.abs().max()), name
        assert abs(spectra[name].spectral_norm - float(eig.abs().max())) <= 1e-3 * float(eig.abs().max()), name


def test_slq_density_integrates_to_one_and_moments_match_traces(mlp_problem):
    model, loss_fn, batch = mlp_problem
    dense, names = _dense(model, loss_fn, batch)
    spectra = layer_spectrum(
        model,
        loss_fn,
        batch,
        steps=dense.H.shape[0],
        slq_probes=40,
        slq_steps=8,
        generator=torch.Generator().manual_seed(3),
    )
    for name in names:
        block = dense.block(dense.H, name)
        d = block.shape[0]
        s = spectra[name]
        torch.testing.assert_close(s.weights.sum(1), torch.ones(s.weights.shape[0], dtype=torch.float64))
        m1, m2 = float(torch.trace(block)) / d, float(block.square().sum()) / d
        assert abs(s.moment(1) - m1) <= Z * s.moment_se(1), (name, s.moment(1), m1)
        assert abs(s.moment(2) - m2) <= Z * s.moment_se(2), (name, s.moment(2), m2)
        grid = torch.linspace(float(s.nodes.min()) - 1, float(s.nodes.max()) + 1, 4001)
        mass = torch.trapezoid(s.density(grid), grid)
        assert abs(float(mass) - 1.0) < 1e-3
        eig = torch.linalg.eigvalsh(block)
        exact_rank = float(eig.square().sum() / eig.abs().max() ** 2)
        assert 1.0 <= exact_rank <= d
        # D = d·m2 / ‖H‖₂²: Lanczos is exact here (steps = d), so D's error is m2's, scaled
        scale = d / float(eig.abs().max()) ** 2
        assert abs(s.stable_rank - exact_rank) <= Z * scale * s.moment_se(2) + 1e-3 * exact_rank, name


def test_deterministic_under_a_generator_and_state_untouched(cnn_problem):
    model, loss_fn, batch = cnn_problem
    bn = model[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    a = block_norms(model, loss_fn, batch, probes=3, generator=torch.Generator().manual_seed(7))
    b = block_norms(model, loss_fn, batch, probes=3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.samples["hess"], b.samples["hess"])
    s1 = layer_spectrum(model, loss_fn, batch, steps=5, generator=torch.Generator().manual_seed(7))
    s2 = layer_spectrum(model, loss_fn, batch, steps=5, generator=torch.Generator().manual_seed(7))
    assert all(torch.equal(s1[n].ritz, s2[n].ritz) for n in s1)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2] and all(p.grad is None for p in model.parameters())


def test_activation_space_map_matches_the_dense_activation_hessian(mlp_problem):
    model, loss_fn, batch = mlp_problem
    x, y = batch
    names = ["0", "2", "4"]
    children = dict(model.named_children())
    ref = {n: m for n, m in model.double().named_children()}
    with torch.no_grad():
        acts = []
        h = x.double()
        for n, m in ref.items():
            h = m(h)
            if n in names:
                acts.append(h)
    shapes = [a.shape for a in acts]
    sizes = [a.numel() for a in acts]

    def loss_of(flat):
        deltas = dict(zip(names, (p.view(s) for p, s in zip(torch.split(flat, sizes), shapes))))
        h = x.double()
        for n, m in ref.items():
            h = functional_call(m, dict(m.named_parameters()), (h,))
            if n in deltas:
                h = h + deltas[n]
        return loss_fn(h, y)

    H = hessian(loss_of)(torch.zeros(sum(sizes), dtype=torch.float64)).detach()
    bounds = torch.cumsum(torch.tensor([0, *sizes]), 0).tolist()
    exact = torch.tensor(
        [
            [float(H[bounds[v] : bounds[v + 1], bounds[w] : bounds[w + 1]].square().sum()) for w in range(3)]
            for v in range(3)
        ]
    )
    est = activation_block_norms(model, loss_fn, (x.double(), y), probes=K, generator=torch.Generator().manual_seed(4))
    assert est.layers == names and list(children) == ["0", "1", "2", "3", "4"]
    mean, se = est.squared()
    assert torch.all((mean - exact).abs() <= Z * se + 1e-9 * exact.max())
    assert est.numel["0"] == 10 * 8  # batch × features: activation coordinates of this batch
    with pytest.raises(TypeError, match="Sequential"):
        activation_block_norms(ResidualMLP(), loss_fn, batch)


def test_activation_map_with_dropout_and_bn_is_deterministic_and_leaves_rng_and_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Dropout(0.3), nn.Linear(12, 3)).eval()
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    loss_fn = nn.CrossEntropyLoss()
    runs = [
        activation_block_norms(model, loss_fn, (x, y), probes=3, generator=torch.Generator().manual_seed(9))
        for _ in range(2)
    ]
    assert torch.equal(runs[0].samples["hess"], runs[1].samples["hess"])  # one private dropout mask per call
    assert torch.equal(torch.get_rng_state(), rng)  # the user's RNG stream is untouched
    assert not model.training  # mode restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, buffers[k]), k  # BN running statistics untouched
    other = activation_block_norms(model, loss_fn, (x, y), probes=3, generator=torch.Generator().manual_seed(10))
    assert not torch.equal(other.samples["hess"], runs[0].samples["hess"])


def test_wrapper_inter_every_logs_maps_and_spectra_without_touching_the_main_estimates(tmp_path):
    from helpers import mlp

    from curvopt import CurvatureAwareOptimizer, JsonlLogger, WandbLogger, read_jsonl
    from curvopt.reporting.report import make_report

    def run(inter_every, loggers):
        torch.manual_seed(0)
        model = mlp()
        opt = CurvatureAwareOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            model,
            nn.CrossEntropyLoss(),
            every=1,
            probes=2,
            inter_every=inter_every,
            inter_probes=3,
            spectrum_steps=4,
            spectrum_starts=3,
            logger=loggers,
        )
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            x, y = torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step(batch=(x, y))
        return opt, model

    jsonl = JsonlLogger(tmp_path / "curvature.jsonl")
    wandb_logger = WandbLogger(project="t", dir=str(tmp_path), mode="offline")
    with_inter, model_a = run(2, [jsonl, wandb_logger])
    jsonl.close()
    wandb_logger.finish()
    without, model_b = run(0, [])
    assert list(with_inter.history) == list(without.history)  # the main probe stream is untouched
    assert all(torch.equal(a, b) for a, b in zip(model_a.parameters(), model_b.parameters()))
    assert with_inter.last_block_norms is not None and set(with_inter.last_spectra) == {"0", "2", "4"}
    assert with_inter.last_spectra["0"].nodes.shape[0] == 3  # spectrum_starts SLQ starts
    assert with_inter.settings()["spectrum_starts"] == 3
    inter = [r for r in read_jsonl(tmp_path / "curvature.jsonl") if "curv/phi" in r]
    assert [r["step"] for r in inter] == [2, 4]
    assert len(inter[0]["curv/coupling"]) == 3 and "curv/top_eig/0" in inter[0] and "curv/stable_rank/4" in inter[0]
    names = {p.name for p in make_report(tmp_path)}
    assert {"coupling.png", "resonance.png", "inter_layer.png"} <= names
    images = {p.name.split("_")[0] for p in tmp_path.glob("wandb/offline-run-*/files/media/images/curv/*.png")}
    assert {"coupling", "resonance"} <= images
