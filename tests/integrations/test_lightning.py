"""Lightning with curvopt: the callback (automatic and manual optimization), and a user-wrapped optimizer."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import FixedScale, alarm_on_estimate
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

import curvopt  # noqa: E402
from curvopt import Alarm, CurvatureAwareOptimizer, CusumMonitor, read_jsonl  # noqa: E402
from curvopt.integrations.lightning import CurvatureCallback  # noqa: E402


def _data(n: int = 24, seed: int = 0) -> torch.utils.data.DataLoader:
    """3 batches of 8: two epochs make the 6 steps (a checkpoint after a whole epoch resumes exactly)."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)


class Recording(nn.CrossEntropyLoss):
    """Cross-entropy that records the targets every call sees (training and estimates)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, out, y):
        self.seen.append(y.clone())
        return super().forward(out, y)


class Classifier(pl.LightningModule):
    def __init__(self, manual: bool = False, wrap: dict | None = None, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        self.loss = nn.CrossEntropyLoss()
        self.automatic_optimization = not manual
        self.wrap = wrap
        self.trained: list[torch.Tensor] = []

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.trained.append(y.clone())
        loss = self.loss(self(x), y)
        if self.wrap is not None:
            self.optimizers().observe(x, y)  # through Lightning's copy of the wrapper
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self):
        base = torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.wrap is None:
            return base
        return CurvatureAwareOptimizer(
            base, self, self.wrap["loss"], **{k: v for k, v in self.wrap.items() if k != "loss"}
        )


class Collect(pl.loggers.Logger):
    """An in-memory logger: every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict]] = []

    name = property(lambda self: "collect")
    version = property(lambda self: 0)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((step, dict(metrics)))


def _fit(module, callbacks, tmp_path, *, ckpt_path=None, datamodule=None, **overrides):
    settings = dict(
        max_steps=6,
        accelerator="cpu",
        logger=Collect(),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
        log_every_n_steps=1,
    )
    settings.update(overrides)
    trainer = pl.Trainer(callbacks=callbacks, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if datamodule is not None:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        else:
            trainer.fit(module, _data(), ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_estimates_use_the_current_batch(tmp_path, manual):
    loss = Recording()
    callback = CurvatureCallback(loss, every=2, probes=1, curvature_batch_size=4)
    module = Classifier(manual=manual)
    trainer = _fit(module, [callback], tmp_path)
    assert [int(h["step"]) for h in callback.wrapper.history] == [2, 4, 6]
    for k, step in enumerate((2, 4, 6)):  # the estimate's targets are the first 4 of that step's batch
        assert torch.equal(loss.seen[k], module.trained[step - 1][:4])
    logged = [(step, m) for step, m in trainer.logger.calls if "curv/total/trace" in m]
    assert len(logged) == 3  # once per estimate, not on every row
    assert [int(r["step"]) for r in read_jsonl(tmp_path / "curvature.jsonl") if r["type"] == "metrics"] == [2, 4, 6]


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    callback = CurvatureCallback(nn.CrossEntropyLoss(), every=2, probes=1, log_path=None)
    _fit(Classifier(), [callback], tmp_path, max_steps=4, accumulate_grad_batches=2)
    assert [int(h["step"]) for h in callback.wrapper.history] == [2, 4]


def test_checkpoint_and_resume_reproduce_the_uninterrupted_history(tmp_path):
    def callback():
        return CurvatureCallback(nn.CrossEntropyLoss(), every=1, probes=2, monitor=CusumMonitor(warmup=3))

    whole = callback()
    _fit(Classifier(), [whole], tmp_path / "whole", max_steps=-1, max_epochs=2)
    cut = callback()
    trainer = _fit(Classifier(), [cut], tmp_path / "cut", max_steps=-1, max_epochs=1)
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")  # the callback's state goes into Lightning's checkpoint
    resumed = callback()
    _fit(Classifier(), [resumed], tmp_path / "cut", max_steps=-1, max_epochs=2, ckpt_path=str(tmp_path / "epoch1.ckpt"))
    assert [h["step"] for h in resumed.wrapper.history] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert list(resumed.wrapper.history) == list(whole.wrapper.history)
    steps = [r["step"] for r in read_jsonl(tmp_path / "cut" / "curvature.jsonl") if r["type"] == "metrics"]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_on_alarm_stop(tmp_path, monkeypatch):
    def alarm_at_second(self, step, estimate):
        self.count += 1
        return [Alarm(step, ["net.0"], 11.0, 10.0)] if self.count == 2 else []

    monkeypatch.setattr(CusumMonitor, "update", alarm_at_second)
    callback = CurvatureCallback(nn.CrossEntropyLoss(), every=1, probes=1, on_alarm="stop", log_path=None)
    trainer = _fit(Classifier(), [callback], tmp_path)
    assert trainer.global_step == 2 and len(callback.wrapper.alarms) == 1


def test_on_alarm_rollback(tmp_path, monkeypatch):
    def alarm_at_third(self, step, estimate):  # estimates at steps 1, 2, 3; the change began at step 2
        self.count += 1
        return [Alarm(step, ["net.0"], 11.0, 10.0, onset_step=2)] if self.count == 3 else []

    monkeypatch.setattr(CusumMonitor, "update", alarm_at_third)
    module = Classifier()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    callback = CurvatureCallback(nn.CrossEntropyLoss(), every=1, probes=1, on_alarm="rollback", log_path=None)
    trainer = _fit(module, [callback], tmp_path)
    assert trainer.global_step == 3 and callback.session.rollback.restored == [(3, 1)]
    assert callback.session.rollback.average.halflife == 1.5  # half an epoch of 3 batches
    for key, value in module.state_dict().items():  # back to the state before step 1's update
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("average", [None, 0.5], ids=["weights", "average"])
def test_rollback_from_lightning_s_own_checkpoints(tmp_path, monkeypatch, average):
    monkeypatch.setattr(CusumMonitor, "update", alarm_on_estimate(5, onset=4, layer="net.0"))
    module = Classifier()
    callback = CurvatureCallback(
        nn.CrossEntropyLoss(),
        every=1,
        probes=1,
        on_alarm="rollback",
        rollback_from="checkpoints",
        rollback_average=average,
        log_path=None,
    )
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    trainer = _fit(module, [callback, saver], tmp_path, enable_checkpointing=True)
    assert trainer.global_step == 5 and callback.session.checkpoint_rollback.restored == [(5, 2)]
    saved = next(
        torch.load(p, weights_only=False) for p in (tmp_path / "ckpt").glob("*.ckpt") if "step=2" in p.name
    )  # the state before update 3: the last checkpoint before the change at 4
    if average is None:
        expected = saved["state_dict"]
    else:
        expected = saved["callbacks"][callback.state_key]["rollback_average"]["state"]
        assert callback.session.checkpoint_rollback.average.halflife == 1.5
    for key, value in module.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_a_rolled_back_weight_average_gets_batchnorm_statistics_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(CusumMonitor, "update", alarm_on_estimate(5, onset=4, layer="net.0"))
    module = Classifier()
    module.net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))
    callback = CurvatureCallback(nn.CrossEntropyLoss(), every=1, probes=1, on_alarm="rollback", log_path=None)
    trainer = _fit(module, [callback], tmp_path)
    assert trainer.global_step == 5 and callback.session.rollback.restored == [(5, 3)]
    with torch.no_grad():  # the training loader's 3 batches through the restored first layer
        means = torch.stack([module.net[0](x).mean(0) for x, _ in _data()])
    assert torch.allclose(module.net[1].running_mean, means.mean(0), atol=1e-6)
    assert module.training


def test_a_user_wrapped_optimizer_observes_through_lightning_s_copy_and_estimates_this_step_s_batch(tmp_path):
    """Before: the batch observed in training_step landed on LightningOptimizer's copy ("no batch was ever given"),
    and the wrapper estimated before Lightning's closure ran the training step (the previous step's batch)."""
    loss = Recording()
    module = Classifier(wrap={"loss": loss, "every": 2, "probes": 1, "curvature_batch_size": 4})
    _fit(module, [], tmp_path)
    wrapper = module.trainer.strategy.optimizers[0]
    assert [int(h["step"]) for h in wrapper.history] == [2, 4, 6] and wrapper.skipped_estimates == 0
    estimate_targets = [t for t in loss.seen if len(t) == 4]
    for k, step in enumerate((2, 4, 6)):
        assert torch.equal(estimate_targets[k], module.trained[step - 1][:4])


def test_bf16_mixed_precision(tmp_path):
    callback = CurvatureCallback(nn.CrossEntropyLoss(), every=2, probes=2, log_path=None)
    _fit(Classifier(), [callback], tmp_path, precision="bf16-mixed")
    last = callback.wrapper.last_estimate
    assert len(callback.wrapper.history) == 3 and all(v == v for v in last.trace.values())  # finite, no NaN


class DictImages(pl.LightningDataModule):
    """A DataModule yielding ``{"image", "label"}`` dicts, as most image DataModules and HF datasets do."""

    def __init__(self, n: int = 32) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)

    def train_dataloader(self):
        rows = [{"image": self.x[i], "label": self.y[i]} for i in range(len(self.y))]
        return torch.utils.data.DataLoader(rows, batch_size=8)


class DictClassifier(pl.LightningModule):
    """Trains on dict batches; its loss is reachable through the ``curvature_loss`` contract."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.Tanh(), nn.Linear(16, 3))
        self.dtypes: set[torch.dtype] = set()

    def forward(self, image):
        return self.net(image)

    def curvature_loss(self, outputs, targets):
        from curvopt.engine.context import is_probing

        if is_probing():
            self.dtypes.add(outputs.dtype)
        return nn.functional.cross_entropy(outputs, targets)

    def training_step(self, batch, batch_idx):
        loss = self.curvature_loss(self(batch["image"]), batch["label"])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _fit_data(module, callbacks, tmp_path, data, **overrides):
    """8 steps of a DataModule's dict batches."""
    return _fit(module, callbacks, tmp_path, datamodule=data, **{"max_steps": 8, **overrides})


def test_dict_batches_with_the_module_s_own_loss(tmp_path):
    callback = CurvatureCallback(every=2, probes=2, curvature_batch_size=4)
    module = DictClassifier()
    trainer = _fit_data(module, [callback], tmp_path, DictImages())
    assert [int(h["step"]) for h in callback.wrapper.history] == [2, 4, 6, 8]
    assert callback.wrapper.skipped_estimates == 0
    steps = [step for step, m in trainer.logger.calls if "curv/total/trace" in m]
    assert steps == [2, 4, 6, 8]  # the estimate's own step, as in the JSONL (global_step inside the step is one lower)
    assert all(m["curv/step"] == step for step, m in trainer.logger.calls if "curv/total/trace" in m)
    records = read_jsonl(tmp_path / "curvature.jsonl")
    assert [r["step"] for r in records if r["type"] == "metrics"] == [2, 4, 6, 8]
    train = {r["step"]: r["train/loss"] for r in records if r["type"] == "train"}
    assert sorted(train) == list(range(1, 9))  # the module's training loss, for reports


def test_a_batch_layout_the_defaults_do_not_read_names_split_batch(tmp_path):
    class Odd(DictImages):
        def train_dataloader(self):
            rows = [{"pixels": self.x[i], "class_id": self.y[i]} for i in range(len(self.y))]
            return torch.utils.data.DataLoader(rows, batch_size=8)

    class OddModule(DictClassifier):
        def training_step(self, batch, batch_idx):
            return self.curvature_loss(self(batch["pixels"]), batch["class_id"])

    with pytest.raises(curvopt.CurvatureInputError, match=r"split_batch=lambda batch: \(inputs, targets\)") as info:
        _fit_data(OddModule(), [CurvatureCallback(every=2, probes=1, log_path=None)], tmp_path, Odd())
    assert "observe" not in str(info.value) and "step(batch" not in str(info.value)  # no plain-wrapper advice
    callback = CurvatureCallback(every=2, probes=1, log_path=None, split_batch=lambda b: (b["pixels"], b["class_id"]))
    _fit_data(OddModule(), [callback], tmp_path, Odd())
    assert len(callback.wrapper.history) == 4


def test_a_module_without_a_loss_is_asked_for_one():
    class Plain(pl.LightningModule):
        pass

    from curvopt.integrations.lightning import module_loss

    with pytest.raises(ValueError, match=r"loss_fn=\.\.\..*curvature_loss\(self, outputs, targets\)"):
        module_loss(Plain())


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_keeps_the_curvature_in_float32(tmp_path, precision):
    module = DictClassifier()
    callback = CurvatureCallback(every=2, probes=2, curvature_batch_size=4, log_path=None)
    try:
        _fit_data(module, [callback], tmp_path, DictImages(), precision=precision)
    except (RuntimeError, ValueError, NotImplementedError) as exc:  # fp16 autocast needs a device that has it
        pytest.skip(f"{precision} is not available on this CPU: {exc}")
    assert len(callback.wrapper.history) == 4 and module.dtypes == {torch.float32}


def test_a_short_run_without_a_cadence_chooses_one_and_says_so(tmp_path, capsys):
    callback = CurvatureCallback(probes=1, curvature_batch_size=4, log_path=None)
    _fit_data(DictClassifier(), [callback], tmp_path, DictImages(), max_steps=40)
    assert len(callback.wrapper.history) == 20
    assert "20 estimates in this run (chosen for this 40-step run; every= sets it)" in capsys.readouterr().out


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
def test_lr_scaling_scales_lightning_s_own_update(tmp_path, manual):
    """SGD's update is linear in its rate: halving every layer's update is the run at half the rate."""
    options = dict(every=1, probes=1, curvature_batch_size=4, log_path=None)
    runs = {}
    for name, lr, policy in (("scaled", 0.2, FixedScale(0.5)), ("halved", 0.1, None), ("full", 0.2, None)):
        module = Classifier(manual=manual, lr=lr)
        _fit(module, [CurvatureCallback(nn.CrossEntropyLoss(), lr_scaling=policy, **options)], tmp_path / name)
        runs[name] = {k: v.detach().clone() for k, v in module.state_dict().items()}
    for name, value in runs["scaled"].items():
        torch.testing.assert_close(value, runs["halved"][name], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(value, runs["full"][name], atol=1e-3) for name, value in runs["scaled"].items())
