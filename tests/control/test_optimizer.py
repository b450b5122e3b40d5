"""CurvatureAwareOptimizer: transparency, schedulers, GradScaler, resume, faults, bad arguments."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import timm.optim
import timm.scheduler
import torch
from torch import nn

from curvopt import CallbackLogger, CurvatureAwareOptimizer, CurvatureInputError, JsonlLogger, read_jsonl
from curvopt.programs.models import small_cnn
from curvopt.programs.synthetic import corrupt_labels, make_synthetic_images


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = small_cnn(width=8)
    model.insert(9, nn.Dropout(0.2))  # exercise the RNG: dropout in training
    return model


def _batches(n: int, seed: int = 0, batch: int = 16):
    x, y = make_synthetic_images(n * batch, image_size=8, seed=seed)
    return [(x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]) for i in range(n)]


OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=1e-4),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.05),
    "timm_lamb": lambda p: timm.optim.Lamb(p, lr=1e-3),
    "lookahead_sgd": lambda p: timm.optim.Lookahead(torch.optim.SGD(p, lr=0.05, momentum=0.9), k=3),
}


def _train(model, opt, batches, *, wrapped: bool, scheduler=None):
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(123)  # the same dropout masks in both trajectories
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step(batch=(x, y)) if wrapped else opt.step()
        if scheduler is not None:
            scheduler.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("every", [0, 5])
def test_transparent_when_scaling_off(name, every):
    """every=0: a pass-through; every=5: estimates run, yet the trajectory is bit-identical."""
    batches = _batches(50)
    bare_model = _model()
    wrapped_model = copy.deepcopy(bare_model)
    bare = _train(bare_model, OPTIMIZERS[name](bare_model.parameters()), batches, wrapped=False)
    opt = CurvatureAwareOptimizer(
        OPTIMIZERS[name](wrapped_model.parameters()), wrapped_model, nn.CrossEntropyLoss(), every=every, probes=2
    )
    wrapped = _train(wrapped_model, opt, batches, wrapped=True)
    assert all(torch.equal(a, b) for a, b in zip(bare, wrapped))
    assert all(torch.equal(a, b) for a, b in zip(bare_model.buffers(), wrapped_model.buffers()))
    assert len(opt.history) == (10 if every else 0)


def test_shares_param_groups_and_state():
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = CurvatureAwareOptimizer(inner, model, nn.CrossEntropyLoss(), every=0)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    opt.param_groups[0]["lr"] = 0.3
    assert inner.param_groups[0]["lr"] == 0.3
    extra = nn.Parameter(torch.zeros(2))
    model.register_parameter("extra", extra)
    opt.add_param_group({"params": [extra], "lr": 0.01})
    assert len(inner.param_groups) == 2


class _FixedScales:
    """A policy object: fixed scales, to check the update-scaling identity exactly."""

    name = "fixed"

    def __init__(self, scales):
        self.scales = scales

    def update(self, estimate):
        return dict(self.scales)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@pytest.mark.parametrize("make", [OPTIMIZERS["sgd_momentum"], OPTIMIZERS["adamw"]])
def test_lr_scaling_scales_each_layers_update(make):
    """θ_new − θ_old = s_l · (bare update) per layer, for SGD+momentum and AdamW (where gradient scaling fails)."""
    batches = _batches(4)
    model = _model()
    scales = {"0": 0.5, "1": 2.0, "4": 1.0, "5": 1.0, "10": 0.25}
    opt = CurvatureAwareOptimizer(
        make(model.parameters()), model, nn.CrossEntropyLoss(), every=1, probes=2, lr_scaling=_FixedScales(scales)
    )
    _train(model, opt, batches[:1], wrapped=True)  # first step estimates, then scales apply
    reference = copy.deepcopy(model)
    ref_opt = make(reference.parameters())
    ref_opt.load_state_dict(copy.deepcopy(opt.optimizer.state_dict()))  # load_state_dict shares tensors
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, opt, batches[1:2], wrapped=True)
    _train(reference, ref_opt, batches[1:2], wrapped=False)
    for name, param in model.named_parameters():
        layer = name.rsplit(".", 1)[0]
        expected = before[name] + scales[layer] * (dict(reference.named_parameters())[name] - before[name])
        torch.testing.assert_close(param, expected, rtol=1e-5, atol=1e-7)


def test_trace_policy_scales_are_bounded_and_saved():
    batches = _batches(30)
    model = _model()
    opt = CurvatureAwareOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        model,
        nn.CrossEntropyLoss(),
        every=5,
        probes=4,
        lr_scaling="trace",
    )
    _train(model, opt, batches, wrapped=True)
    assert set(opt.lr_scales) == {"0", "1", "4", "5", "10"}
    assert all(0.25 <= s <= 4.0 for s in opt.lr_scales.values())
    assert any(s != 1.0 for s in opt.lr_scales.values())
    assert opt.state_dict()["curvopt"]["lr_scales"] == opt.lr_scales
    assert any(k.startswith("curv/lr_scale/") for k in opt.history[-1])


@pytest.mark.parametrize("scaling", [None, "trace"])
def test_schedulers_stay_in_charge_of_the_base_rate(scaling):
    batches = _batches(20)
    for make_sched in (
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=20),
        lambda o: timm.scheduler.CosineLRScheduler(o, t_initial=20, warmup_t=3, warmup_lr_init=1e-3),
    ):
        bare_model = _model()
        bare_opt = torch.optim.SGD(bare_model.parameters(), lr=0.1, momentum=0.9)
        bare_sched = make_sched(bare_opt)
        model = copy.deepcopy(bare_model)
        inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        opt = CurvatureAwareOptimizer(inner, model, nn.CrossEntropyLoss(), every=4, probes=2, lr_scaling=scaling)
        sched = make_sched(opt)
        for i, (x, y) in enumerate(batches):
            for o, m, s in ((bare_opt, bare_model, bare_sched), (opt, model, sched)):
                o.zero_grad()
                nn.CrossEntropyLoss()(m(x), y).backward()
                o.step(batch=(x, y)) if o is opt else o.step()
                s.step(i + 1) if isinstance(s, timm.scheduler.CosineLRScheduler) else s.step()
            assert opt.param_groups[0]["lr"] == bare_opt.param_groups[0]["lr"]


def test_timm_lr_scale_contract_reaches_inner_groups():
    model = _model()
    inner = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr_scale": 0.1}, {"params": model[4].parameters()}], lr=0.1
    )
    opt = CurvatureAwareOptimizer(inner, model, nn.CrossEntropyLoss(), every=0)
    timm.scheduler.StepLRScheduler(opt, decay_t=10).step(0)
    assert inner.param_groups[0]["lr"] == pytest.approx(0.01) and inner.param_groups[1]["lr"] == pytest.approx(0.1)


def test_grad_scaler_and_autocast_path_with_observe():
    """GradScaler.step(opt) calls a bare step(): observe() supplies the batch; bf16 autocast on CPU."""
    batches = _batches(12)
    bare_model = _model()
    model = copy.deepcopy(bare_model)
    results = []
    for m, wrap in ((bare_model, False), (model, True)):
        inner = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        opt = CurvatureAwareOptimizer(inner, m, nn.CrossEntropyLoss(), every=4, probes=2) if wrap else inner
        scaler = torch.amp.GradScaler("cpu")
        torch.manual_seed(7)
        for x, y in batches:
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.CrossEntropyLoss()(m(x), y)
            scaler.scale(loss).backward()
            if wrap:
                opt.observe(x, y)
            scaler.step(opt)
            scaler.update()
        results.append([p.detach().clone() for p in m.parameters()])
        if wrap:
            assert len(opt.history) == 3 and opt.last_estimate is not None
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_no_batch_ever_given_raises_at_the_first_curvature_step():
    model = _model()
    opt = CurvatureAwareOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, nn.CrossEntropyLoss(), every=2)
    x, y = _batches(1)[0]
    nn.CrossEntropyLoss()(model(x), y).backward()
    opt.step()  # step 1: not a curvature step
    with pytest.raises(CurvatureInputError, match="step 2 is a curvature step but no batch was ever given"):
        opt.step()
    assert opt.step_count == 1  # the failing step did not update the parameters


def test_a_batch_missing_at_one_curvature_step_warns_once_and_training_continues():
    model = _model()
    opt = CurvatureAwareOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05), model, nn.CrossEntropyLoss(), every=2, probes=2
    )
    x, y = _batches(1)[0]
    with pytest.warns(RuntimeWarning, match="no batch was given") as record:
        for step in range(1, 9):
            opt.zero_grad()
            nn.CrossEntropyLoss()(model(x), y).backward()
            opt.step(batch=(x, y) if step <= 2 else None)
    assert sum("no batch" in str(w.message) for w in record) == 1
    assert opt.step_count == 8 and len(opt.history) == 1 and opt.skipped_estimates == 3


def test_gradient_accumulation_counts_optimizer_steps():
    model = _model()
    opt = CurvatureAwareOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05), model, nn.CrossEntropyLoss(), every=2, probes=2
    )
    batches = _batches(12)
    for i in range(0, 12, 3):  # 3 micro-batches per optimizer step
        opt.zero_grad()
        for x, y in batches[i : i + 3]:
            (nn.CrossEntropyLoss()(model(x), y) / 3).backward()
            opt.observe(x, y)
        opt.step()
    assert opt.step_count == 4 and [int(r["step"]) for r in opt.history] == [2, 4]


def _make_memorising_run(seed=0):
    model = _model(seed)
    opt = CurvatureAwareOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        model,
        nn.CrossEntropyLoss(),
        every=3,
        probes=4,
        lr_scaling="trace",
        seed=seed,
    )
    return model, opt


def test_resume_reproduces_the_uninterrupted_run():
    batches = _batches(60, seed=1)
    model, opt = _make_memorising_run()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = _train(model, opt, batches, wrapped=True)
        full_history, full_alarms = list(opt.history), list(opt.alarms)

        model_a, opt_a = _make_memorising_run()
        loss_fn = nn.CrossEntropyLoss()
        torch.manual_seed(123)
        for x, y in batches[:25]:
            opt_a.zero_grad()
            loss_fn(model_a(x), y).backward()
            opt_a.step(batch=(x, y))
        buffer = io.BytesIO()
        torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict(), "rng": torch.get_rng_state()}, buffer)
        buffer.seek(0)
        checkpoint = torch.load(buffer, weights_only=False)
        model_b, opt_b = _make_memorising_run(
            seed=99
        )  # fresh objects, different seed: all must come from the checkpoint
        model_b.load_state_dict(checkpoint["model"])
        opt_b.load_state_dict(checkpoint["opt"])
        torch.set_rng_state(checkpoint["rng"])
        for x, y in batches[25:]:
            opt_b.zero_grad()
            loss_fn(model_b(x), y).backward()
            opt_b.step(batch=(x, y))
    assert all(torch.equal(a, b) for a, b in zip(full, model_b.parameters()))
    assert list(opt_b.history) == full_history and opt_b.alarms == full_alarms
    assert opt_b.step_count == 60


def test_nan_estimate_is_discarded_and_training_continues():
    batches = _batches(20)
    bare_model = _model()
    model = copy.deepcopy(bare_model)
    bare = _train(bare_model, torch.optim.SGD(bare_model.parameters(), lr=0.05), batches, wrapped=False)
    opt = CurvatureAwareOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        model,
        nn.CrossEntropyLoss(),
        every=2,
        probes=2,
        lr_scaling="trace",
    )
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(123)
    with pytest.warns(RuntimeWarning, match="non-finite") as record:
        for i, (x, y) in enumerate(batches):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            poisoned = x.clone()
            poisoned[0, 0, 0, 0] = float("nan")
            if i == 9:
                monitor_before = opt.monitor.state_dict()
                scales_before = dict(opt.lr_scales)
            opt.step(batch=(poisoned, y) if i in (9, 11) else (x, y))
            if i == 9:
                assert opt.monitor.state_dict() == monitor_before and opt.lr_scales == scales_before
    assert sum("non-finite" in str(w.message) for w in record) == 1
    assert opt.skipped_estimates == 2 and len(opt.history) == 8
    # lr scaling was on, so compare only that training ran and stayed finite
    assert all(torch.isfinite(p).all() for p in model.parameters()) and len(bare) == len(list(model.parameters()))


def test_logger_failure_warns_once_and_training_continues(tmp_path):
    batches = _batches(12)
    model = _model()
    seen = []

    class Broken:
        def log(self, step, metrics):
            raise OSError("disk full")

        def alert(self, alarm):
            raise OSError("disk full")

    jsonl = JsonlLogger(tmp_path / "curv.jsonl")
    opt = CurvatureAwareOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        model,
        nn.CrossEntropyLoss(),
        every=3,
        probes=2,
        logger=[Broken(), jsonl, CallbackLogger(on_metrics=lambda s, m: seen.append(s))],
    )
    with pytest.warns(RuntimeWarning, match="disk full") as record:
        _train(model, opt, batches, wrapped=True)
    jsonl.close()
    assert sum("disk full" in str(w.message) for w in record) == 1
    assert seen == [3, 6, 9, 12]
    records = read_jsonl(tmp_path / "curv.jsonl")
    assert records[0]["type"] == "config" and records[0]["curvopt"]["every"] == 3
    metrics = [r for r in records if r["type"] == "metrics"]
    assert [r["step"] for r in metrics] == [3, 6, 9, 12] and "curv/total/trace" in metrics[0]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"every": -1}, ValueError, "every"),
        ({"probes": 0}, ValueError, "probes"),
        ({"probes": "many"}, ValueError, "probes"),
        ({"monitor": "ewma"}, ValueError, "monitor"),
        ({"lr_scaling": "adam"}, ValueError, "lr_scaling"),
        ({"curvature_batch_size": 0}, ValueError, "curvature_batch_size"),
        ({"inter_every": -2}, ValueError, "inter_every"),
        ({"inter_probes": 0}, ValueError, "inter_probes"),
        ({"spectrum_steps": 2.5}, ValueError, "spectrum_steps"),
        ({"spectrum_starts": True}, ValueError, "spectrum_starts"),
        ({"distributed_probes": "ring"}, ValueError, "distributed_probes"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    model = _model()
    with pytest.raises(error, match=match):
        CurvatureAwareOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, nn.CrossEntropyLoss(), **kwargs)


def test_model_must_own_the_optimizer_parameters():
    model, other = _model(), _model(1)
    with pytest.raises(ValueError, match="do not belong to the model"):
        CurvatureAwareOptimizer(torch.optim.SGD(other.parameters(), lr=0.1), model, nn.CrossEntropyLoss())


def test_probes_auto_adapts_within_bounds():
    batches = _batches(40)
    model = _model()
    opt = CurvatureAwareOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        model,
        nn.CrossEntropyLoss(),
        every=2,
        probes="auto",
        auto_probes=(3, 12),
    )
    _train(model, opt, batches, wrapped=True)
    used = [int(r["curv/probes"]) for r in opt.history]
    assert all(3 <= k <= 12 for k in used) and len(used) == 20


@pytest.mark.slow
def test_end_to_end_alarm_only_with_random_labels():
    """A tiny CNN: clean labels raise no alarm; random labels switched on half-way raise one after the switch."""
    x, y = make_synthetic_images(1024, seed=3, noise=1.0)
    y_random = corrupt_labels(y, 1.0, 10, seed=4)
    firsts = {}
    for condition in ("clean", "switch"):
        torch.manual_seed(3)
        model = small_cnn()
        opt = CurvatureAwareOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
            model,
            nn.CrossEntropyLoss(),
            every=20,
            probes=8,
            gn=False,
            seed=3,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for step in range(800):
                labels = y_random if condition == "switch" and step >= 400 else y
                idx = torch.randint(0, 1024, (64,))
                opt.zero_grad()
                nn.CrossEntropyLoss()(model(x[idx]), labels[idx]).backward()
                opt.step(batch=(x[idx], labels[idx]))
        firsts[condition] = opt.alarms[0].step if opt.alarms else None
    assert firsts["clean"] is None
    assert firsts["switch"] is not None and firsts["switch"] > 400


def test_timm_native_scaler_calls_a_bare_step():
    from timm.utils import NativeScaler

    model = _model()
    opt = CurvatureAwareOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05), model, nn.CrossEntropyLoss(), every=2, probes=2
    )
    scaler = NativeScaler(device="cpu")
    for x, y in _batches(4):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.CrossEntropyLoss()(model(x), y)
        opt.observe(x, y)
        scaler(loss, opt, parameters=model.parameters())
    assert opt.step_count == 4 and len(opt.history) == 2


def test_step_with_closure_behaves_like_the_inner_optimizer():
    batches = _batches(5)
    results = []
    for wrap in (False, True):
        model = _model()
        inner = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        opt = CurvatureAwareOptimizer(inner, model, nn.CrossEntropyLoss(), every=2, probes=2) if wrap else inner
        losses = []
        torch.manual_seed(5)
        for x, y in batches:

            def closure(x=x, y=y, model=model, opt=opt):
                opt.zero_grad()
                loss = nn.CrossEntropyLoss()(model(x), y)
                loss.backward()
                return loss

            losses.append(float((opt.step(closure, batch=(x, y)) if wrap else opt.step(closure)).detach()))
        results.append((losses, [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_groups_and_state_stay_shared_after_the_wrapped_optimizer_loads_a_state():
    """torch's load_state_dict (and FSDP's set_optimizer_state_dict, a rollback) replace the wrapped optimizer's
    lists: a scheduler on the wrapper must still reach the real groups (a resumed run diverged when it did not)."""
    model = nn.Linear(3, 2)
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = CurvatureAwareOptimizer(base, model, nn.MSELoss(), every=0)
    base.load_state_dict(base.state_dict())
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    opt.zero_grad()
    nn.MSELoss()(model(torch.randn(4, 3)), torch.randn(4, 2)).backward()
    opt.step()
    scheduler.step()
    assert opt.param_groups is base.param_groups and opt.state is base.state
    assert base.param_groups[0]["lr"] == pytest.approx(0.05)


def test_the_wrapper_says_whether_its_latest_step_made_an_estimate():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = CurvatureAwareOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, nn.CrossEntropyLoss(), every=3)
    seen = []
    for _ in range(7):
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        opt.zero_grad()
        nn.CrossEntropyLoss()(model(x), y).backward()
        opt.step(batch=(x, y))
        seen.append(opt.estimated_last_step)
    assert seen == [False, False, True, False, False, True, False]
