"""WandbLogger: offline runs, keys, alerts, heatmaps, mode resolution and failure handling."""

from __future__ import annotations

import warnings

import pytest
import torch
import wandb
from helpers import wandb_offline as wb
from torch import nn

from curvopt import Alarm, CurvatureAwareOptimizer, WandbLogger
from curvopt.reporting.wandb_logger import ThinnedHistory, resolve_mode


@pytest.fixture(autouse=True)
def no_active_run():
    """Each test starts without an active W&B run (a logger would otherwise join it)."""
    assert wandb.run is None, f"a W&B run leaked from an earlier test: {wandb.run}"
    yield
    if wandb.run is not None:
        wandb.run.finish()


def _alarm(step: int) -> Alarm:
    return Alarm(step=step, kind="aggregate", statistic=12.0, threshold=10.0, layers=["fc"])


def test_a_disabled_run_points_nowhere(tmp_path):
    """WANDB_MODE=disabled writes no run directory, so the logger names none (the CLI prints no "W&B run:" path)."""
    logger = WandbLogger(project="t", dir=str(tmp_path), mode="disabled")
    logger.log(10, {"curv/trace/a": 1.0})
    assert logger.local_dir is None and logger.describe() == {}
    logger.finish()
    assert not (tmp_path / "wandb").exists()


def test_offline_run_keys_alerts_and_heatmap(tmp_path):
    logger = WandbLogger(project="t", dir=str(tmp_path), mode="offline", heatmap_every=2)
    assert logger.active and logger.owns_run
    for step in (10, 20, 30, 40):
        logger.log(step, {"curv/trace/a": float(step), "curv/trace/b": -1.0, "curv/alarm": 0.0})
    logger.alert(_alarm(30))
    logger.alert(_alarm(40))
    logger.log_training(40, {"train/loss": 0.5})
    logger.log_epoch(1, {"eval/top1": 50.0})
    run_dir = logger.local_dir
    logger.finish()
    assert not logger.active
    records = wb.read_records(wb.run_file(run_dir))
    summary = wb.summary(records)
    assert summary["curv/step"] == 40 and summary["curv.trace/a"] == 40.0 and summary["train/loss"] == 0.5
    assert summary["eval/top1"] == 50.0 and summary["curv/trace_heatmap/_type"] == "image-file"
    assert [a.title for a in wb.alerts(records)] == [
        "curvopt: memorisation alarm at step 30",
        "curvopt: memorisation alarm at step 40",
    ]
    images = list((tmp_path / "wandb").glob("offline-run-*/files/media/images/curv/*.png"))
    assert len(images) == 2  # after the 2nd and 4th estimate


def test_uses_the_active_run_and_leaves_it_open(tmp_path):
    run = wandb.init(project="t", dir=str(tmp_path), mode="offline")
    try:
        logger = WandbLogger()
        assert logger.run is run and not logger.owns_run
        logger.log(1, {"curv/trace/a": 1.0})
        logger.finish()
        assert wandb.run is run  # not finished by the logger
    finally:
        run.finish()


def test_mode_resolution(monkeypatch, tmp_path):
    empty_netrc = tmp_path / "netrc"
    empty_netrc.write_text("")
    monkeypatch.setenv("NETRC", str(empty_netrc))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert resolve_mode() == "offline"  # no credentials: never prompt, never touch the network
    empty_netrc.write_text("machine api.wandb.ai login user password k" + "0" * 39 + "\n")
    empty_netrc.chmod(0o600)
    assert resolve_mode() == "online"
    empty_netrc.write_text("")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode() == "disabled"  # WANDB_MODE is respected
    assert resolve_mode("offline") == "offline"  # an explicit mode wins


def test_init_failure_warns_once_and_training_continues(monkeypatch):
    def broken_init(**kwargs):
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setattr(wandb, "init", broken_init)
    monkeypatch.setattr(wandb, "run", None)
    with pytest.warns(RuntimeWarning, match="W&B logging is off: ConnectionError"):
        logger = WandbLogger(project="t")
    assert not logger.active

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = CurvatureAwareOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, nn.CrossEntropyLoss(), every=1, probes=2, logger=logger
    )
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a no-op logger must not warn again
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step(batch=(x, y))
        logger.alert(_alarm(3))
        logger.finish()
    assert len(opt.history) == 3


def test_failures_while_logging_warn_once(tmp_path):
    logger = WandbLogger(project="t", dir=str(tmp_path), mode="offline")

    class Broken:
        def log(self, *args, **kwargs):
            raise OSError("disk full")

        def __getattr__(self, name):
            return getattr(run, name)

    run = logger.run
    logger.run = Broken()
    with pytest.warns(RuntimeWarning, match="W&B log failed") as caught:
        for step in range(3):
            logger.log(step, {"curv/trace/a": 1.0})
    assert len([w for w in caught if "W&B log failed" in str(w.message)]) == 1
    logger.run = run
    logger.finish()


def test_optimizer_settings_reach_the_config(tmp_path):
    logger = WandbLogger(project="t", dir=str(tmp_path), mode="offline", config={"recipe": "x"})
    model = nn.Sequential(nn.Linear(4, 3))
    CurvatureAwareOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, nn.CrossEntropyLoss(), every=7, logger=logger
    )
    assert logger.owns_run
    run_dir = logger.local_dir
    logger.finish()
    records = wb.read_records(wb.run_file(run_dir))
    config = wb.config(records)
    seen = [(kind, r.run.config if kind == "run" else "") for r in records for kind in [r.WhichOneof("record_type")]]
    assert config.get("recipe") == "x", seen
    assert config["curvopt"]["every"] == 7 and config["curvopt"]["layers"] == ["0"]


@pytest.mark.parametrize("capacity", [2, 3, 5, 8])
def test_thinned_history_keeps_an_even_subsample_of_the_whole_run_within_capacity(capacity):
    history: ThinnedHistory[int] = ThinnedHistory(capacity)
    for n in range(1, 300):
        history.append(n - 1)
        stride = 1  # the reference: the smallest power of two that fits ceil(n / stride) items
        while -(-n // stride) > capacity:
            stride *= 2
        expected = list(range(0, n, stride))
        if expected[-1] != n - 1:
            expected.append(n - 1)  # the latest estimate always ends the heatmap
        assert history.items() == expected, (capacity, n)
        assert len(history) == n and len(history.items()) <= capacity + 1


def test_the_heatmap_history_is_bounded_by_heatmap_columns(tmp_path):
    logger = WandbLogger(project="t", dir=str(tmp_path), mode="offline", heatmap_every=0, heatmap_columns=4)
    for step in range(1, 101):
        logger.log(step, {"curv/trace/a": float(step)})
    kept = [step for step, _ in logger._traces.items()]
    logger.finish()
    assert kept == [1, 33, 65, 97, 100]
    with pytest.raises(ValueError, match="heatmap_columns"):
        WandbLogger(project="t", dir=str(tmp_path), mode="disabled", heatmap_columns=1)
