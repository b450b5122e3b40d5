"""A user's first hour: batches checked where they are handed over, configuration mistakes raised at
the first curvature step, dict inputs through ``forward=``, one console line per warning or alarm,
the monitor saying when it is still calibrating, and a ``curvopt train --help`` that explains itself."""

from __future__ import annotations

import logging
import math
import re
import warnings

import pytest
import torch
from torch import nn

from curvopt import Alarm, CurvatureAwareOptimizer, CurvatureInputError, CusumMonitor, estimate_curvature
from curvopt.programs.recipes import RecipeError, build_parser, load_recipe, suggest_flag


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def _opt(model: nn.Module, loss_fn=None, **kwargs) -> CurvatureAwareOptimizer:
    kwargs.setdefault("every", 2)
    kwargs.setdefault("probes", 2)
    return CurvatureAwareOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01), model, loss_fn or nn.CrossEntropyLoss(), **kwargs
    )


def _train_step(opt, model, data, loss_fn=None, **step_kwargs):
    opt.zero_grad()
    (loss_fn or nn.CrossEntropyLoss())(model(data[0]), data[1]).backward()
    return opt.step(**step_kwargs)


# ---------------------------------------------------------------------- batches, checked at the hand-over
@pytest.mark.parametrize(
    "bad, says",
    [
        (torch.randn(2, 4), r"got tensor of shape \(2, 4\)"),  # would unpack into its two rows
        ({"x": torch.randn(8, 4), "y": torch.zeros(8)}, "got dict with keys 'x', 'y'"),  # would unpack into keys
        ((torch.randn(8, 4),), "got tuple of 1"),
    ],
)
def test_a_batch_that_is_not_a_pair_raises_at_step_one(bad, says):
    model = _mlp()
    opt = _opt(model, every=50)
    with pytest.raises(CurvatureInputError, match=says):
        _train_step(opt, model, _batch(), batch=bad)
    assert opt.step_count == 0


def test_configuration_errors_raise_at_the_first_curvature_step():
    model = _mlp()
    x, y = _batch()
    opt = _opt(model, loss_fn=nn.CrossEntropyLoss(reduction="none"))
    _train_step(opt, model, (x, y), batch=(x, y))  # step 1: no estimate
    with pytest.raises(CurvatureInputError, match="must return a scalar"):
        _train_step(opt, model, (x, y), batch=(x, y))
    opt = _opt(model, loss_fn=nn.MSELoss())  # MSE cannot take integer class targets
    with pytest.raises(CurvatureInputError, match="loss_fn failed on the model outputs"):
        for _ in range(2):
            opt.zero_grad()
            opt.step(batch=(x, y))


def test_after_a_first_success_a_failing_estimate_is_skipped_with_one_warning():
    model = _mlp()
    x, y = _batch()
    opt = _opt(model)
    for _ in range(2):
        _train_step(opt, model, (x, y), batch=(x, y))
    assert len(opt.history) == 1
    wrong = (torch.randn(8, 5), y)  # the model cannot take 5 features
    with pytest.warns(RuntimeWarning, match="failed and was skipped") as record:
        for _ in range(4):
            opt.zero_grad()
            nn.CrossEntropyLoss()(model(x), y).backward()
            opt.step(batch=wrong)
    assert sum("skipped" in str(w.message) for w in record) == 1
    assert opt.skipped_estimates == 2 and opt.step_count == 6


class DictModel(nn.Module):
    """Called as model(**inputs), returning an object with .logits (Hugging Face style)."""

    def __init__(self):
        super().__init__()
        self.body = _mlp()

    def forward(self, features, scale):
        return type("Output", (), {"logits": self.body(features) * scale})()


def test_dict_inputs_through_forward_give_the_plain_model_s_numbers():
    model = DictModel()
    x, y = _batch()
    inputs = {"features": x, "scale": torch.full((8, 1), 2.0)}

    def forward(m, batch):
        return m(**batch).logits

    def plain_loss(out, target):  # the same function written on the plain Sequential
        return nn.functional.cross_entropy(out * 2.0, target)

    for strategy in ("autograd", "func", "func-vmap"):
        got = estimate_curvature(
            model,
            nn.CrossEntropyLoss(),
            (inputs, y),
            probes=3,
            forward=forward,
            strategy=strategy,
            generator=torch.Generator().manual_seed(1),
        )
        ref = estimate_curvature(
            model.body, plain_loss, (x, y), probes=3, strategy=strategy, generator=torch.Generator().manual_seed(1)
        )
        assert [n.removeprefix("body.") for n in got.layers] == ref.layers
        for kind in ref.samples:
            torch.testing.assert_close(got.samples[kind], ref.samples[kind], rtol=1e-5, atol=1e-7)
    with pytest.raises(CurvatureInputError, match="forward=lambda"):
        estimate_curvature(model, nn.CrossEntropyLoss(), (inputs, y), forward=lambda m, b: m(**b))


def test_the_wrapper_slices_dict_inputs_to_the_curvature_batch_and_uses_forward():
    model = DictModel()
    x, y = _batch(n=12)
    inputs = {"features": x, "scale": torch.ones(12, 1)}
    opt = _opt(model, curvature_batch_size=5, forward=lambda m, b: m(**b).logits)
    for _ in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(**inputs).logits, y).backward()
        opt.step(batch=(inputs, y))
    assert len(opt.history) == 2 and opt.last_estimate.batch_size == 5


# ---------------------------------------------------------------------- one console line each
def test_a_problem_is_one_warning_and_an_alarm_is_one_log_record(caplog):
    model = _mlp()
    x, y = _batch()

    class Broken:
        def log(self, step, metrics):
            raise OSError("disk full")

        def alert(self, alarm):
            pass

    opt = _opt(model, logger=Broken(), callbacks=[])
    caplog.set_level(logging.WARNING, logger="curvopt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(4):
            _train_step(opt, model, (x, y), batch=(x, y))
        opt.notifier.alarm(Alarm(step=4, layers=["0"], statistic=11.0, threshold=10.0))
    problems = [w for w in caught if "disk full" in str(w.message)]
    assert len(problems) == 1 and not any("disk full" in r.getMessage() for r in caplog.records)
    alarm_records = [r for r in caplog.records if "memorisation alarm" in r.getMessage()]
    assert len(alarm_records) == 1 and not any("memorisation alarm" in str(w.message) for w in caught)


def test_the_alarm_line_never_reads_equal_numbers():
    text = Alarm(step=3, layers=[], statistic=10.0004, threshold=10.0).describe()
    statistic, threshold = re.search(r"CUSUM ([\d.]+) > ([\d.]+)", text).groups()
    assert statistic != threshold and float(statistic) > float(threshold)
    assert "12.50 > 10.00" in Alarm(step=3, layers=[], statistic=12.5, threshold=10.0).describe()


def test_the_monitor_says_when_it_is_calibrated_and_logs_it():
    monitor = CusumMonitor(warmup=4)
    assert not monitor.ready and monitor.estimates_until_ready == 5
    model = _mlp()
    x, y = _batch()
    opt = _opt(model, every=1, monitor=monitor)
    for _ in range(7):
        _train_step(opt, model, (x, y), batch=(x, y))
    readiness = [r["curv/monitor_ready"] for r in opt.history]
    assert readiness == [0.0] * 4 + [1.0] * 3  # warm-up 4: ready after the 5th estimate, the 6th can alarm
    assert monitor.ready and monitor.estimates_until_ready == 0


# ---------------------------------------------------------------------- curvopt train --help and recipes
def test_every_train_flag_has_help_and_its_default_once():
    parser = build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{action.option_strings[0]} has no help text"
        text = formatter._expand_help(action)
        assert text.lower().count("default") <= 1, f"{action.option_strings[0]}: {text}"
        assert "(default: None)" not in text, f"{action.option_strings[0]}: {text}"


@pytest.mark.parametrize(
    "key, flag",
    [
        ("learning_rate", "lr"),
        ("lrr", "lr"),
        ("optimizer", "opt"),
        ("num_epochs", "epochs"),
        ("batchsize", "batch_size"),
        ("weight_decy", "weight_decay"),
        ("label_smoothing", "smoothing"),
    ],
)
def test_an_unknown_recipe_key_suggests_the_flag_it_means(key, flag):
    known = sorted(a.dest for a in build_parser()._actions)
    assert suggest_flag(key, known) == flag


@pytest.mark.parametrize(
    "entry, says",
    [
        ("epochs: 1.5", "'epochs' must be an integer, got 1.5"),
        ("lr: [0.1]", "'lr' must be a single value"),
        ("seed: 1.5", "'seed' must be an integer"),
        ("batch_size: 31.5", "'batch_size' must be an integer"),
        ("amp: maybe", "'amp' must be true or false"),
        ("opt_betas: [0.9, fast]", "'opt_betas' must be a number"),
        ("lr_scaling: magic", "'lr_scaling' must be one of"),
        ("curv_probes: some", "'curv_probes' expected an integer or 'auto'"),
    ],
)
def test_a_wrongly_typed_recipe_value_names_the_key(tmp_path, entry, says):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(entry + "\n")
    with pytest.raises(RecipeError, match=re.escape(says)):
        load_recipe(recipe, build_parser())


def test_well_typed_recipe_values_are_converted(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 1\nweight_decay: 5e-4\ncurv_probes: auto\namp: 'yes'\nopt_betas: 0.9\n")
    values = load_recipe(recipe, build_parser())
    assert values == {"lr": 1.0, "weight_decay": 5e-4, "curv_probes": "auto", "amp": True, "opt_betas": [0.9]}
    assert math.isclose(values["weight_decay"], 0.0005)
