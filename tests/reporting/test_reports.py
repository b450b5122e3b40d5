"""Reports a person reads: labelled layers, the run's events on every time plot, no placeholder figures,
an HTML page with the run's story that renders in a real browser, W&B sections by quantity."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from torch import nn

from curvopt import Alarm, CurvatureAwareOptimizer, CusumMonitor, JsonlLogger, estimate_curvature, read_jsonl
from curvopt.programs.models import small_cnn
from curvopt.programs.synthetic import corrupt_labels, make_synthetic_images
from curvopt.reporting import plots
from curvopt.reporting.report import make_report
from curvopt.reporting.wandb_logger import wandb_key

PNG = b"\x89PNG\r\n\x1a\n"
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _run(tmp_path: Path, lr_scaling: str | None = None) -> Path:
    """A short run with a label switch and an alarm, logged like the demo logs it."""
    torch.manual_seed(0)
    x, y = make_synthetic_images(256, image_size=8, seed=0)
    y_random = corrupt_labels(y, 1.0, 10, seed=1)
    model = small_cnn(width=8)
    log = tmp_path / "curvature.jsonl"
    with JsonlLogger(log) as jsonl:
        jsonl.log_run({"model": "small_cnn", "dataset": "synthetic 8x8", "label_noise": "random from step 31"})
        opt = CurvatureAwareOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
            model,
            nn.CrossEntropyLoss(),
            every=2,
            probes=2,
            logger=jsonl,
            lr_scaling=lr_scaling,
            monitor=CusumMonitor(warmup=3),
        )
        for step in range(1, 61):
            idx = torch.randint(0, 256, (32,))
            labels = (y_random if step > 30 else y)[idx]
            opt.zero_grad()
            loss = nn.CrossEntropyLoss()(model(x[idx]), labels)
            loss.backward()
            opt.step(batch=(x[idx], labels))
            if step % 5 == 0:
                jsonl.log_training(step, {"train/loss": loss.item(), "train/acc": 50.0})
            if step == 30:
                jsonl.log_event(31, "label_noise_start", "labels random from here")
        jsonl.alert(Alarm(step=48, layers=["5", "9"], statistic=10.0004, threshold=10.0))
    return log


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    log = _run(root)
    return log, make_report(log, html_page=True)


def test_each_figure_is_written_and_no_placeholder(report):
    _, paths = report
    names = {p.name for p in paths}
    assert names == {"curvature_heatmap.png", "trace.png", "gn_gap.png", "cusum.png", "training.png", "report.html"}
    for path in paths:
        if path.suffix == ".png":
            assert path.read_bytes().startswith(PNG) and path.stat().st_size > 10_000, path
    assert "lr_scale.png" not in names  # scaling was off: no empty figure


def test_lr_scale_figure_only_with_scaling_and_with_its_reference_line(tmp_path):
    records = read_jsonl(_run(tmp_path, lr_scaling="trace"))
    fig = plots.layer_lines_figure(records, "lr_scale", title="t", ylabel="s", reference=(1.0, "s = 1"))
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "s = 1" in labels and "0 · Conv2d" in labels
    plt.close(fig)
    assert {p.name for p in make_report(tmp_path)} >= {"lr_scale.png"}


def test_every_time_plot_marks_the_label_switch_and_the_alarm(report):
    log, _ = report
    records = read_jsonl(log)
    builders = [
        plots.curvature_heatmap_figure,
        plots.trace_figure,
        plots.cusum_figure,
        plots.training_figure,
        lambda r: plots.layer_lines_figure(r, "gn_gap", title="t", ylabel="g", log_y=True),
    ]
    for build in builders:
        fig = build(records)
        labels = {label for ax in fig.axes for label in ax.get_legend_handles_labels()[1]}
        assert {"label noise starts", "memorisation alarm"} <= labels, (build, labels)
        plt.close(fig)


def test_the_cusum_figure_shows_the_gradient_norm_with_its_own_threshold(report):
    log, _ = report
    fig = plots.cusum_figure(read_jsonl(log))  # the default monitor watches the gradient norm too
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert "gradient norm S (its own series)" in labels and "threshold, gradient norm = 12" in labels
    assert "gradient" not in labels  # not drawn as if it were a layer
    plt.close(fig)


def test_layers_carry_their_type_and_many_layers_stay_legible():
    names = [f"layer{i // 4}.{i % 4}.conv" for i in range(41)]
    records = [{"type": "config", "curvopt": {"layer_types": {n: "Conv2d" for n in names}}}]
    for step in range(1, 21):
        record = {"type": "metrics", "step": step}
        for i, name in enumerate(names):
            record[f"curv/gn_gap/{name}"] = 1.0 + i + 0.01 * step
            record[f"curv/frob/{name}"] = 10.0 ** (-(i % 7)) * step
        records.append(record)
    fig = plots.layer_lines_figure(records, "gn_gap", title="t", ylabel="g", log_y=True)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert len([label for label in labels if "· Conv2d" in label]) == plots.TOP
    assert "other 33 layers (range)" in labels and "layer10.0.conv · Conv2d" in labels  # the largest GN-Gaps
    plt.close(fig)
    fig = plots.curvature_heatmap_figure(records)
    ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert len(ticks) == 41 and ticks[0] == "layer0.0.conv · Conv2d"  # every row named (was every other one)
    plt.close(fig)
    many = np.abs(np.random.default_rng(0).normal(size=(161, 20))) + 1e-3
    many[[7, 100, 151]] *= 1e3  # the brightest rows
    rows = plots.heatmap_rows(many)
    assert len(rows) <= plots.MAX_ROW_LABELS + plots.TOP and {7, 100, 151} <= set(rows)


def test_the_html_page_tells_the_run_s_story(report):
    _, paths = report
    page = next(p for p in paths if p.name == "report.html").read_text()
    assert "<h2>Run</h2>" in page and "small_cnn" in page and "random from step 31" in page
    digits_that_differ = r"<td>48</td><td>–</td><td>–</td><td>aggregate</td><td>10\.0004</td><td>10\.0000</td>"
    assert re.search(digits_that_differ, page)
    assert "5 · BatchNorm2d, 9 · Linear" in page  # the alarm's layers, labelled
    assert "label noise start" in page and "Per layer at the last estimate" in page
    assert "Per layer at the first alarm" in page
    assert page.count("class='how'") == 5 and page.count("data:image/png;base64,") == 5
    assert "href='curvature.jsonl'" not in page and "curvature.jsonl'>JSONL log" in page


def test_the_alarm_table_says_which_rule_placed_the_change_point():
    from curvopt.reporting.report import _onset_source

    assert _onset_source({"onset_step": 420, "onset_kind": "abrupt", "onset_series": "gradient"}) == (
        "abrupt break in the gradient norm"
    )
    assert _onset_source({"onset_step": 420, "onset_kind": "page", "onset_series": "4"}) == "Page's estimate in 4"
    assert _onset_source({"onset_step": 420}) == "Page's estimate"  # an alarm logged before the fit existed
    assert _onset_source({"onset_step": None}) == "–"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_the_html_page_renders_in_headless_chromium(report, tmp_path):
    from benchmarks import report_screenshot

    _, paths = report
    page = next(p for p in paths if p.name == "report.html")
    assert report_screenshot.render_check(page) == {"images": 5, "broken": 0, "overflow": False}
    shot = report_screenshot.screenshot(page, tmp_path / "page.png")
    assert shot.read_bytes().startswith(PNG)


def test_wandb_sections_by_quantity():
    assert wandb_key("curv/trace/layer1.0.conv1") == "curv.trace/layer1.0.conv1"
    assert wandb_key("curv/gn_gap/fc") == "curv.gn_gap/fc"
    assert wandb_key("curv/cusum/aggregate") == "curv/cusum_aggregate"
    assert wandb_key("curv/cusum/gradient_threshold") == "curv/cusum_gradient_threshold"
    assert wandb_key("curv/total/trace") == "curv/total/trace" and wandb_key("train/loss") == "train/loss"


def test_an_estimate_prints_compactly_and_summarises_as_a_table():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    est = estimate_curvature(model, nn.CrossEntropyLoss(), (torch.randn(8, 4), torch.randint(0, 3, (8,))), probes=3)
    pattern = r"CurvatureEstimate\(2 layers, K=3, tr H = \S+ ± \S+, GN-Gap \S+, loss \S+, batch 8\)"
    assert re.fullmatch(pattern, repr(est))
    table = est.summary()
    assert "0 · Linear" in table and "model (all)" in table and "gn_gap:" in table.splitlines()[-1]


def test_curvopt_train_records_resumes_and_lr_restarts_as_events(tmp_path):
    from curvopt.programs.cli import main as cli_main

    small = [
        "train",
        "--dataset",
        "synthetic",
        "--synthetic-samples",
        "48",
        "-b",
        "16",
        "--img-size",
        "16",
        "--model",
        "test_resnet",
        "--curv-every",
        "1",
        "--curv-probes",
        "2",
        "--curv-batch-size",
        "8",
        "--no-progress",
        "--output",
        str(tmp_path),
        "--experiment",
        "run",
        "--sched",
        "step",
        "--decay-epochs",
        "1",
        "--decay-rate",
        "3.0",
    ]  # each epoch's LR 3x the last
    assert cli_main([*small, "--epochs", "2"]) == 0
    assert cli_main([*small, "--epochs", "3", "--resume", str(tmp_path / "run" / "last.pth.tar")]) == 0
    events = [r for r in read_jsonl(tmp_path / "run" / "curvature.jsonl") if r["type"] == "event"]
    kinds = [e["kind"] for e in events]
    assert kinds.count("lr_restart") == 2 and kinds.count("resume") == 1
    records = read_jsonl(tmp_path / "run" / "curvature.jsonl")
    fig = plots.cusum_figure(records)
    assert {"LR schedule restart", "resumed"} <= set(fig.axes[0].get_legend_handles_labels()[1])
    plt.close(fig)


def test_a_report_says_which_lines_of_a_damaged_log_it_could_not_read(tmp_path):
    log = _run(tmp_path)
    lines = log.read_text().splitlines()
    damaged = [*lines[:5], '{"type": "metrics", "step": 3, "curv/tr', "garbage", "[1, 2]", *lines[5:]]
    log.write_text("\n".join(damaged) + "\n")
    unreadable: list[int] = []
    assert len(read_jsonl(log, unreadable=unreadable)) == len(lines)
    assert unreadable == [6, 7, 8]
    with pytest.warns(RuntimeWarning, match=r"3 line\(s\) of .* could not be read .*line 6, 7, 8"):
        make_report(tmp_path, tmp_path / "out")
