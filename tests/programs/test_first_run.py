"""A first run that measures something and reports that say only what happened (each case failed before)."""

from __future__ import annotations

import builtins
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.colors import to_rgba
from torch import nn

from curvopt import Alarm, CurvatureAwareOptimizer, CurvatureInputError, estimate_curvature, read_jsonl
from curvopt.programs.cli import main as cli_main
from curvopt.reporting import plots
from curvopt.reporting.report import make_report, monitor_verdict

# 64 samples, batch 16: 4 updates per epoch.
TINY = [
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
    "--curv-probes",
    "1",
    "--curv-batch-size",
    "4",
    "--no-progress",
    "--workers",
    "0",
]


def _train(tmp_path: Path, *extra: str, name: str = "run") -> tuple[int, Path]:
    return cli_main(["train", *TINY, "--output", str(tmp_path), "--experiment", name, *extra]), tmp_path / name


def _estimates(run_dir: Path) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "curvature.jsonl") if r["type"] == "metrics" and "curv/loss" in r]


def test_a_short_run_without_a_cadence_makes_enough_estimates_for_a_verdict(tmp_path, capsys):
    code, run_dir = _train(tmp_path, "--epochs", "10")  # 40 updates: every 500 would make none
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "curvature every 2 updates: 20 estimates in this run (chosen for this 40-update run" in out
    assert len(_estimates(run_dir)) == 20
    assert "no memorisation verdict" not in out


def test_a_chosen_cadence_too_slow_for_a_verdict_is_said_before_the_first_epoch(tmp_path, capsys):
    code, run_dir = _train(tmp_path, "--epochs", "2", "--curv-every", "2")  # 8 updates: 4 estimates
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    notice = next(line for line in out.splitlines() if line.strip().startswith("curvature every"))
    assert "4 estimates in this run" in notice and "needs 9 to calibrate" in notice and "--curv-every" in notice
    assert out.index(notice) < out.index("epoch   1/2")
    page = next(p for p in make_report(run_dir, html_page=True) if p.name == "report.html").read_text()
    assert "No verdict: the monitor calibrates on 9 estimates and this run made 4" in page


def test_a_label_switch_past_the_last_epoch_is_warned_and_never_shown(tmp_path, capsys):
    code, run_dir = _train(
        tmp_path, "--epochs", "1", "--curv-every", "1", "--label-noise", "1.0", "--label-noise-start-epoch", "3"
    )
    assert code == 0, capsys.readouterr().err
    assert "after the last epoch (1): this run trains on clean labels only" in capsys.readouterr().out
    records = read_jsonl(run_dir / "curvature.jsonl")
    assert not [r for r in records if r["type"] == "event" and r["kind"] == "label_noise_start"]
    # an older log that recorded the switch anyway: the report leaves it out of the table and the plots
    records.append({"type": "event", "step": 97, "kind": "label_noise_start", "text": "label noise p=1.0"})
    assert plots.run_events(records) == []
    fig = plots.trace_figure(records)
    assert fig.axes[0].get_xlim()[1] < 97 and "label noise starts" not in fig.axes[0].get_legend_handles_labels()[1]
    plt.close(fig)


def test_a_report_of_an_uncalibrated_run_gives_no_verdict_not_a_clean_bill():
    config = {"type": "config", "curvopt": {"monitor": {"warmup": 8}, "layer_types": {}}}
    estimates = [{"type": "metrics", "step": s, "curv/trace/fc": 1.0, "curv/monitor_ready": 0.0} for s in (1, 2, 3)]
    assert monitor_verdict([config, *estimates]).startswith(
        "No verdict: the monitor calibrates on 9 estimates and this run made 3"
    )
    ready = [{**e, "curv/monitor_ready": 1.0} for e in estimates]
    assert monitor_verdict([config, *ready]).startswith("No memorisation alarm")
    assert monitor_verdict([{"type": "config", "curvopt": {"monitor": None}}, *estimates]) == (
        "Memorisation monitor off."
    )


def test_an_alarm_quotes_layer_names_with_their_types():
    alarm = Alarm(
        step=7,
        layers=["5", "fc"],
        statistic=12.0,
        threshold=10.0,
        kind="layer",
        layer_types={"5": "BatchNorm2d", "fc": "Linear"},
    )
    assert "layers: '5' (BatchNorm2d), 'fc' (Linear))" in alarm.describe()
    assert (
        Alarm.from_dict({"step": 1, "layers": ["5"], "statistic": 11.0, "threshold": 10.0})
        .describe()
        .endswith("layers: '5')")
    )  # an alarm saved before types were recorded


def test_the_monitor_records_the_layer_types_in_its_alarms():
    import dataclasses

    from curvopt import CusumMonitor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    estimate = estimate_curvature(model, nn.CrossEntropyLoss(), (x, y), probes=2)
    monitor, alarms = CusumMonitor(warmup=3), []
    for step in range(1, 30):  # flat, then rising by a factor of 3 per estimate
        scale = 1.0 if step < 10 else 3.0 ** (step - 9)
        samples = {kind: values * scale for kind, values in estimate.samples.items()}
        alarms += monitor.update(step, dataclasses.replace(estimate, samples=samples))
    assert alarms and alarms[0].layer_types == {n: estimate.layer_types[n] for n in alarms[0].layers}
    assert "(BatchNorm1d)" in alarms[0].describe() or "(Linear)" in alarms[0].describe()


def test_resume_takes_a_run_directory(tmp_path, capsys):
    code, run_dir = _train(tmp_path, "--epochs", "1", "--curv-every", "2")
    assert code == 0
    capsys.readouterr()
    assert cli_main(["train", *TINY, "--epochs", "2", "--resume", str(run_dir)]) == 0
    assert "resuming at epoch 2, update 4" in capsys.readouterr().out
    assert cli_main(["train", *TINY, "--resume", str(tmp_path)]) == 2  # a directory without last.pth.tar
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "a directory without last.pth.tar" in err


@pytest.mark.parametrize(
    "argv, hint",
    [
        (["train", "--lr-rate", "0.1"], "did you mean --lr?"),
        (["train", "--curv-evry", "3"], "did you mean --curv-every?"),
        (["demo", "--stepz", "3"], "did you mean --steps?"),
    ],
)
def test_a_mistyped_flag_is_one_line_naming_the_closest_flag(argv, hint, capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and hint in err and "usage:" not in err


def test_a_dict_batch_without_forward_is_one_line_naming_forward():
    class KeywordModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, input_ids=None, mask=None):
            return self.fc(input_ids * mask)

    batch = ({"input_ids": torch.randn(8, 4), "mask": torch.ones(8, 4)}, torch.randint(0, 3, (8,)))
    with pytest.raises(CurvatureInputError) as info:
        estimate_curvature(KeywordModel(), nn.CrossEntropyLoss(), batch, probes=1)
    text = str(info.value)
    assert "\n" not in text and "forward=lambda m, x: m(**x)" in text
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained traceback


def test_a_torchvision_of_another_torch_is_one_line(tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "torchvision":
            raise RuntimeError("operator torchvision::nms does not exist")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", broken)
    assert _train(tmp_path, "--epochs", "1")[0] == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "do not match (operator torchvision::nms does not exist)" in err
    assert 'pip install -e ".[dev]"' in err


def test_the_demo_replaces_its_previous_run_and_says_how_long_it_took(tmp_path, capsys):
    from curvopt.programs.demo import run_demo

    out = tmp_path / "demo"
    for _ in range(2):
        run_demo(steps=8, every=2, probes=1, out_dir=out, progress=False, wandb_mode="offline")
    text = capsys.readouterr().out
    assert text.count("replacing the previous demo run") == 1 and "demo done in" in text
    assert len(list((out / "wandb").glob("offline-run-*"))) == 1  # one run in the directory, not one per rerun


def test_plots_threshold_colour_single_records_and_symlog_ticks():
    names = [f"l{i}" for i in range(12)]
    records = [{"type": "config", "curvopt": {"layer_types": {n: "Linear" for n in names}}}]
    for step in range(1, 6):
        record = {
            "type": "metrics",
            "step": step,
            "curv/cusum/threshold": 12.5,
            "curv/cusum/aggregate": 0.1 * step,
            "curv/monitor_ready": 1.0,
            "curv/monitor_per_layer": 1.0,
        }
        for i, n in enumerate(names):
            record[f"curv/cusum/{n}"] = 0.5 * i + step
            record[f"curv/trace/{n}"] = (-1) ** i * 10.0 ** (i % 9) * step
            record[f"curv/trace_se/{n}"] = 0.1
        records.append(record)
    fig = plots.cusum_figure(records)
    ax = fig.axes[0]
    threshold = next(line for line in ax.get_lines() if line.get_label().startswith("threshold"))
    layer_colours = {to_rgba(line.get_color()) for line in ax.get_lines() if "· Linear" in line.get_label()}
    assert to_rgba(threshold.get_color()) not in layer_colours
    plt.close(fig)
    fig = plots.trace_figure(records)
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels() if t.get_text()]
    assert 3 <= len(labels) <= 9 and "0" in labels  # at most 4 decades a side: no overlapping labels
    plt.close(fig)
    one = [records[0], {**records[1], "type": "train", "train/loss": 1.0, "train/acc": 50.0}]
    fig = plots.training_figure(one)
    assert all(
        line.get_marker() not in (None, "None", "")
        for ax in fig.axes
        for line in ax.get_lines()
        if line.get_label() in ("training loss", "training accuracy (batch)")
    )
    plt.close(fig)


def test_the_report_of_a_short_run_draws_its_events_where_they_happened(tmp_path, capsys):
    code, run_dir = _train(
        tmp_path, "--epochs", "2", "--curv-every", "1", "--label-noise", "1.0", "--label-noise-start-epoch", "1"
    )
    assert code == 0, capsys.readouterr().err
    page = next(p for p in make_report(run_dir, html_page=True) if p.name == "report.html").read_text()
    assert "label noise start" in page  # the switch at update 5 happened


def test_a_model_through_the_wrapper_alarm_names_quoted_layers(caplog):
    from curvopt import CusumMonitor

    class Always(CusumMonitor):
        def update(self, step, estimate):
            return [Alarm(step, ["0"], 11.0, 10.0, "layer", {"0": "Linear"})] if step == 2 else []

    model = nn.Sequential(nn.Linear(4, 3))
    opt = CurvatureAwareOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model, nn.CrossEntropyLoss(), every=1, probes=1, monitor=Always()
    )
    for _ in range(2):
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        opt.zero_grad()
        nn.CrossEntropyLoss()(model(x), y).backward()
        opt.step(batch=(x, y))
    assert "layers: '0' (Linear))" in caplog.text


def test_the_first_estimate_s_cost_is_said_in_training_steps(tmp_path, capsys):
    from curvopt.programs.train.messages import estimate_cost_line

    assert estimate_cost_line(4.0, 0.1, 8) == (
        "  one curvature estimate took 4.0 s, about 40 training steps: 500 % "
        "overhead at every 8 updates (--curv-every 401 keeps it under 10 %)"
    )
    assert "keeps it" not in estimate_cost_line(1.0, 0.1, 500)
    code, _ = _train(tmp_path, "--epochs", "3", "--curv-every", "2")
    assert code == 0
    assert capsys.readouterr().out.count("one curvature estimate took") == 1
