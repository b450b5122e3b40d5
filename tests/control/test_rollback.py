"""Alarms carry a change point, and a rollback returns to the last state before it (API, curvopt train, callbacks)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from torch import nn

from curvopt import Alarm, CurvatureAwareOptimizer, CusumMonitor, RollbackOnAlarm, estimate_curvature, read_jsonl
from curvopt.programs.cli import main as cli_main


def test_an_alarm_records_where_the_rise_began():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    estimate = estimate_curvature(
        model, nn.CrossEntropyLoss(), (torch.randn(16, 4), torch.randint(0, 3, (16,))), probes=4
    )
    g = torch.Generator().manual_seed(1)
    monitor, alarms = CusumMonitor(warmup=3), []
    for step in range(1, 60):  # noisy and flat, then rising by 1.5x per estimate from step 30
        scale = (1.0 if step < 30 else 1.5 ** (step - 29)) * float(1 + 0.1 * torch.rand(1, generator=g))
        samples = {k: v * scale for k, v in estimate.samples.items()}
        alarms += monitor.update(step, dataclasses.replace(estimate, samples=samples))
    assert alarms and alarms[0].step > 30 and alarms[0].onset_step == 30
    assert "since step 30" in alarms[0].describe()
    restored = CusumMonitor(warmup=3)
    restored.load_state_dict(monitor.state_dict())
    assert restored.series["aggregate"].rise_step == monitor.series["aggregate"].rise_step


def _alarm_at(at: int, onset: int):
    """A ``CusumMonitor.update`` that raises one alarm at step ``at`` with change point ``onset``."""

    def update(monitor, step, estimate):
        return [Alarm(step, ["0"], 11.0, 10.0, onset_step=onset)] if step == at else []

    return update


@pytest.mark.parametrize("then", ["stop", "lower-lr", "freeze"])
def test_rollback_on_alarm_restores_the_last_snapshot_before_the_change_point(then, monkeypatch):
    monkeypatch.setattr(CusumMonitor, "update", _alarm_at(8, onset=5))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rollback = RollbackOnAlarm(model, base, keep=4, then=then)
    opt = CurvatureAwareOptimizer(base, model, nn.CrossEntropyLoss(), every=2, probes=1, logger=rollback)
    states = {}
    g = torch.Generator().manual_seed(2)
    for step in range(1, 9):
        states[step] = {k: v.clone() for k, v in model.state_dict().items()}  # before step `step`'s update
        x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        nn.CrossEntropyLoss()(model(x), y).backward()
        opt.step(batch=(x, y))
        if rollback.stopped:
            break
    assert rollback.restored == [(8, 4)]  # snapshots at estimates 2, 4, 6, 8; the last before step 5 is step 4
    for key, value in model.state_dict().items():  # the step-8 update applied nothing (its gradients dropped)
        assert torch.equal(value, states[4][key]), key
    assert rollback.stopped == (then == "stop")
    assert base.param_groups[0]["lr"] == pytest.approx(0.01 if then == "lower-lr" else 0.1)
    assert [p.requires_grad for p in model[0].parameters()] == [then != "freeze"] * 2  # the alarm names layer '0'
    assert all(p.requires_grad for p in model[2].parameters())


def test_curvopt_train_rolls_back_to_the_epoch_checkpoint_before_the_change_point(tmp_path, capsys, monkeypatch):
    # 64 samples, batch 16: 4 updates per epoch; an estimate every update; alarm at update 11, change point at 7
    monkeypatch.setattr(CusumMonitor, "update", _alarm_at(11, onset=7))
    argv = [
        "train",
        "--dataset",
        "synthetic",
        "--synthetic-samples",
        "64",
        "-b",
        "16",
        "--model",
        "test_resnet",
        "--img-size",
        "16",
        "--curv-every",
        "1",
        "--curv-probes",
        "1",
        "--curv-batch-size",
        "4",
        "--no-progress",
        "--epochs",
        "5",
        "--on-alarm",
        "rollback",
        "--rollback-keep",
        "2",
        "--rollback-average",
        "0",
        "--output",
        str(tmp_path),
        "--experiment",
        "r",
    ]
    assert cli_main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    run_dir = tmp_path / "r"
    assert (
        "rolled back to the end of epoch 1 (update 4; the best validation top-1 of the epochs before the change "
        "point at update 7)"
    ) in out
    assert "rolled back at the alarm at update 11 to epoch 1" in out
    rings = sorted(p.name for p in run_dir.glob("ring-*.pth.tar"))
    assert rings == ["ring-2-u8.pth.tar", "ring-3-u11.pth.tar"]  # keep 2: the alarm's epoch ended with one more
    last = torch.load(run_dir / "last.pth.tar", weights_only=False)
    ring = torch.load(run_dir / "ring-3-u11.pth.tar", weights_only=False)
    assert last["epoch"] == 2 and last["stopped_at_alarm"] == 11  # the run ended in the alarm's epoch
    assert all(torch.equal(last["model"][k], v) for k, v in ring["model"].items())
    # ... with the weights of epoch 1's end (update 4), the last checkpoint before the change point at update 7
    monkeypatch.undo()
    capsys.readouterr()
    epoch1 = [*argv[:-6], "--epochs", "1", "--output", str(tmp_path), "--experiment", "one"]
    assert cli_main(epoch1) == 0
    reference = torch.load(tmp_path / "one" / "last.pth.tar", weights_only=False)
    for key, value in reference["model"].items():
        if value.is_floating_point():
            assert torch.equal(last["model"][key], value), key
    events = [r for r in read_jsonl(run_dir / "curvature.jsonl") if r["type"] == "event" and r["kind"] == "rollback"]
    assert len(events) == 1
    # the default restores the weight average (half-life half an epoch, sampled at every estimate) of epoch 1's end
    monkeypatch.setattr(CusumMonitor, "update", _alarm_at(11, onset=7))
    averaged = [*argv[:-6], "--output", str(tmp_path), "--experiment", "avg"]
    assert cli_main(averaged) == 0
    said = capsys.readouterr().out
    assert "rolled back to the weight average (half-life 0.5 epochs) at the end of epoch 1 (update 4" in said
    restored = torch.load(tmp_path / "avg" / "last.pth.tar", weights_only=False)["model"]
    average = reference["rollback_average"]
    assert average["step"] == 4 and set(average["state"]) == set(reference["model"])
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    for key, value in average["state"].items():
        if not key.endswith(statistics):  # the weights are the average's; BatchNorm's statistics are its own
            assert torch.equal(restored[key], value), key
    assert any(not torch.equal(average["state"][k], v) for k, v in reference["model"].items() if v.is_floating_point())
    assert not torch.equal(restored["conv1.1.running_mean"], average["state"]["conv1.1.running_mean"])


def test_rollback_can_choose_the_best_validated_state_before_the_change_point(tmp_path):
    from curvopt.control.rollback import Snapshot, best_before, last_before
    from curvopt.programs.train.checkpoint import CHECKPOINT, keep_in_ring, ring_before, save_checkpoint

    snaps = [Snapshot(step, {}, {}, score) for step, score in [(2, 0.5), (4, 0.9), (6, 0.7), (8, None), (10, 0.99)]]
    assert best_before(snaps, 9).step == 4  # the best score before the onset; step 10's better one is after it
    assert last_before(snaps, 9).step == 8
    assert best_before([Snapshot(2, {}, {}), Snapshot(4, {}, {})], 9).step == 4  # nothing scored: the latest
    assert best_before([*snaps[:1], Snapshot(4, {}, {}, 0.5)], 9).step == 4  # ties: the latest of them
    for epoch, (updates, top1) in enumerate([(4, 80.0), (8, 60.0), (12, 70.0), (16, 90.0)]):
        save_checkpoint(tmp_path / CHECKPOINT, {"epoch": epoch, "num_updates": updates, "model": {}, "optimizer": {}})
        keep_in_ring(tmp_path, epoch, updates, keep=3, score=top1)
    assert sorted(p.name for p in tmp_path.glob("ring-*.pth.tar")) == [  # log-spaced: the first one stays
        "ring-1-u4.pth.tar",
        "ring-3-u12.pth.tar",
        "ring-4-u16.pth.tar",
    ]
    path, state = ring_before(tmp_path, 14, "best-validated")
    assert path.name == "ring-1-u4.pth.tar" and state["num_updates"] == 4  # 80 % beats epoch 3's 70 %
    assert ring_before(tmp_path, 14, "onset")[0].name == "ring-3-u12.pth.tar"
    assert ring_before(tmp_path, 14, "latest")[0].name == "ring-3-u12.pth.tar"  # the older name, from old runs
    assert ring_before(tmp_path, 3, "best-validated")[0].name == "ring-1-u4.pth.tar"  # nothing before: the oldest
    model = nn.Linear(2, 1)
    rollback = RollbackOnAlarm(model, torch.optim.SGD(model.parameters(), lr=0.1), choose="best-validated")
    for step, score in [(2, 0.3), (4, 0.8), (6, 0.6)]:  # the API: score() tags the latest snapshot
        with torch.no_grad():
            model.weight.fill_(step)
        rollback.log(step, {"curv/loss": 1.0})
        rollback.score(score)
    rollback.alert(Alarm(8, ["(root)"], 11.0, 10.0, onset_step=7))
    assert rollback.restored == [(8, 4)] and float(model.weight.detach()[0, 0]) == 4.0
    with pytest.raises(ValueError, match="choose must be one of \\('onset', 'best-validated'\\), got 'oldest'"):
        RollbackOnAlarm(model, torch.optim.SGD(model.parameters(), lr=0.1), choose="oldest")
    with pytest.raises(ValueError, match="spacing must be one of"):
        RollbackOnAlarm(model, torch.optim.SGD(model.parameters(), lr=0.1), spacing="linear")


def test_a_log_spaced_ring_reaches_back_to_the_start_with_gaps_that_grow_with_age():
    from curvopt.control.rollback import thin_log_spaced

    steps: list[int] = []
    for now in range(0, 5000, 5):
        steps.append(now)
        while len(steps) > 16:
            del steps[thin_log_spaced(steps, now)]
    assert steps[0] == 0 and steps[-1] == 4995 and len(steps) == 16
    ages = [4995 - s for s in steps]
    gaps = [b - a for a, b in itertools.pairwise(steps)]
    assert gaps[-1] <= 10 and gaps[0] > 500  # dense at the end, sparse at the start
    # geometric spacing: 16 snapshots over 1,000 estimates is a ratio ≈ 1.58, a gap ≈ 0.58 × the newer one's age;
    # an onset is restored from a snapshot at most about that much of its age older (plus a few estimates)
    assert all(gap <= 0.75 * age + 15 for gap, age in zip(gaps, ages[1:]))
    model = nn.Linear(2, 1)
    rollback = RollbackOnAlarm(model, torch.optim.SGD(model.parameters(), lr=0.1), keep=4)
    for step in range(0, 100, 10):
        rollback.log(step, {"curv/loss": 1.0})
    assert rollback.snapshots[0].step == 0 and len(rollback.snapshots) == 4
    recent = RollbackOnAlarm(model, torch.optim.SGD(model.parameters(), lr=0.1), keep=4, spacing="recent")
    for step in range(0, 100, 10):
        recent.log(step, {"curv/loss": 1.0})
    assert [s.step for s in recent.snapshots] == [60, 70, 80, 90]


def test_estimates_carry_the_loss_gradient_per_layer_for_free():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    batch = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
    grads = torch.autograd.grad(nn.CrossEntropyLoss()(model(batch[0]), batch[1]), list(model.parameters()))
    exact = {
        "0": float(grads[0].pow(2).sum() + grads[1].pow(2).sum()),
        "2": float(grads[2].pow(2).sum() + grads[3].pow(2).sum()),
    }
    for strategy in ("autograd", "func", "finite-difference"):
        estimate = estimate_curvature(model, nn.CrossEntropyLoss(), batch, probes=2, strategy=strategy)
        assert estimate.gradient_sq == pytest.approx(exact, rel=1e-5), strategy
        assert estimate.to_dict()["total/grad_sq"] == pytest.approx(sum(exact.values()), rel=1e-5)


def test_the_monitor_can_watch_the_gradient_norm_as_its_own_series():
    from curvopt.control.monitor import AGGREGATE, GRADIENT

    monitor = CusumMonitor(warmup=3, gradient=True, gradient_h=5.0)
    alarms = []
    g = torch.Generator().manual_seed(0)
    for step in range(1, 40):  # flat curvature; the gradient norm jumps at step 20 (a label switch)
        noise = float(1 + 0.05 * torch.rand(1, generator=g))
        values = {
            "a": 1e-3 * noise,
            "b": 2e-3 * noise,
            AGGREGATE: 1.5e-3 * noise,
            GRADIENT: (1.0 if step < 20 else 30.0) * noise,
        }
        alarms += monitor.update(step, values)
    assert len(alarms) == 1 and alarms[0].kind == GRADIENT
    assert 15 <= alarms[0].onset_step <= 20  # Page's estimate: where S last left zero, at or just before the jump
    assert f"gradient norm rising since step {alarms[0].onset_step}" in alarms[0].describe()
    quiet = CusumMonitor(warmup=3, gradient=False)  # curvature only: the same values raise nothing
    assert not any(
        quiet.update(step, {"a": 1e-3, "b": 2e-3, AGGREGATE: 1.5e-3, GRADIENT: 30.0 if step > 20 else 1.0})
        for step in range(1, 40)
    )


def test_curvopt_train_watches_the_gradient_norm_unless_told_not_to():
    from curvopt.programs.recipes import parse_train_args
    from curvopt.programs.train.setup import build_optimizer

    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    for flags, expected in (([], True), (["--cusum-gradient", "false"], False)):
        args = parse_train_args(["--model", "resnet18", "--curv-every", "5", *flags])
        opt = build_optimizer(args, model, model, nn.CrossEntropyLoss(), [], [])
        assert opt.monitor.gradient is expected and opt.monitor.tail_rate == 0.3 and opt.monitor.long_run == 1000
    assert parse_train_args(["--model", "resnet18"]).rollback_to == "best-validated"  # curvopt train validates


def test_an_alarm_with_no_snapshot_warns_and_leaves_the_model():
    model = nn.Linear(2, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rollback = RollbackOnAlarm(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.warns(RuntimeWarning, match="found no snapshot to roll back to"):
        rollback.alert(Alarm(5, ["(root)"], 11.0, 10.0, onset_step=3))
    assert rollback.restored == [] and not rollback.stopped
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_rollback_can_restore_the_weight_average_from_before_the_change_point():
    model = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="BatchNorm layers, whose running statistics must be recomputed"):
        RollbackOnAlarm(model, base, average=4)
    inputs = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    rollback = RollbackOnAlarm(model, base, average=4, batchnorm_inputs=lambda: inputs.split(16))  # half-life 4
    expected = None
    for step, value in [(2, 1.0), (4, 3.0), (6, 5.0), (8, 7.0), (10, 9.0)]:
        with torch.no_grad():
            model[0].weight.fill_(value)
            model[1].running_mean.fill_(value)
        rollback.log(step, {"curv/loss": 1.0})
        keep = 0.5 ** (2 / 4)
        expected = value if expected is None else keep * expected + (1 - keep) * value
        if step == 6:
            at_six = expected
    rollback.alert(Alarm(10, ["(root)"], 11.0, 10.0, onset_step=7))
    assert rollback.restored == [(10, 6)]
    assert float(model[0].weight.detach()[0, 0]) == pytest.approx(at_six, rel=1e-6)  # the average at step 6
    with torch.no_grad():  # BatchNorm's statistics recomputed for those weights, over the 4 batches
        hidden = model[0](inputs)
    assert float(model[1].running_mean[0]) == pytest.approx(float(hidden.mean()), rel=1e-5)
    per_batch = torch.stack([h.var() for h in hidden.split(16)])  # each batch's unbiased variance, averaged
    assert float(model[1].running_var[0]) == pytest.approx(float(per_batch.mean()), rel=1e-5)
    assert at_six not in (5.0, 1.0) and model.training
    with pytest.raises(ValueError, match="half-life"):
        RollbackOnAlarm(model, base, average=0)
