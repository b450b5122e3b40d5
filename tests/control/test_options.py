"""One record for every curvature option: the wrapper, both framework callbacks and ``curvopt train`` take the
fields of :class:`curvopt.CurvatureConfig` and nothing declares them a second time."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from curvopt import CurvatureAwareOptimizer, CurvatureConfig
from curvopt.control.settings import flag_dest, flagged_options, option_names
from curvopt.programs.recipes import parse_train_args
from curvopt.programs.train.setup import config_from_args


def _wrapper(**options):
    model = nn.Linear(3, 2)
    return CurvatureAwareOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, nn.MSELoss(), **options)


def test_every_field_is_a_wrapper_keyword_and_a_config_field():
    for f in dataclasses.fields(CurvatureConfig):
        value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert getattr(_wrapper(**{f.name: value}).config, f.name) == value, f.name
    config = CurvatureConfig(every=7, probes=3)
    opt = _wrapper(config=config, probes=5)  # keywords replace the record's fields
    assert (opt.config.every, opt.config.probes, opt.every) == (7, 5, 7)
    assert _wrapper().every == 500  # every=None: the wrapper does not know the run's length


def test_an_unknown_option_is_refused_with_the_options_named():
    with pytest.raises(TypeError, match="unknown curvature option 'evrey'; the options are: every, probes"):
        _wrapper(evrey=3)
    with pytest.raises(TypeError, match=r"config must be a curvopt\.CurvatureConfig, got dict"):
        _wrapper(config={"every": 3})
    with pytest.raises(ValueError, match="probes must be an integer >= 1 or 'auto', got 0"):
        CurvatureConfig(probes=0)


def test_every_flag_comes_from_the_record_with_its_default_and_help():
    args = parse_train_args([])
    flagged = list(flagged_options())
    assert {f.name for f, _ in flagged} >= {"every", "probes", "curvature_batch_size", "gn", "strategy"}
    for f, meta in flagged:
        assert getattr(args, flag_dest(meta["flag"])) == f.default, meta["flag"]
        assert meta["help"]
    assert config_from_args(args) == CurvatureConfig(seed=args.seed)
    changed = parse_train_args(["--curv-probes", "auto", "--curv-gn", "false", "--curv-strategy", "func"])
    config = config_from_args(changed)
    assert (config.probes, config.gn, config.strategy) == ("auto", False, "func")


@pytest.mark.parametrize("framework", ["huggingface", "lightning"])
def test_the_callbacks_take_the_same_record(framework):
    module = pytest.importorskip("curvopt.integrations." + framework, reason=f"{framework} not installed")
    callback = module.CurvatureCallback(config=CurvatureConfig(probes=6), every=4, estimator="hutch++")
    config = callback.options["config"]
    assert (config.probes, config.every, config.estimator) == (6, 4, "hutch++")
    assert set(option_names()) == {f.name for f in dataclasses.fields(config)}
    with pytest.raises(TypeError, match="unknown curvature option 'prboes'"):
        module.CurvatureCallback(prboes=3)
    assert module.CurvatureCallback(lr_scaling="edge").options["lr_scaling"] == "edge"
    with pytest.raises(ValueError, match="unknown lr_scaling policy 'egde'"):
        module.CurvatureCallback(lr_scaling="egde")


def test_the_monitor_takes_its_own_record_and_its_flags_come_from_it():
    from curvopt import CusumMonitor, MonitorConfig
    from curvopt.programs.train.setup import record_from_args

    monitor = CusumMonitor(MonitorConfig(h=7.0), onset="page")
    assert (monitor.h, monitor.onset, monitor.config.k) == (7.0, "page", 0.5)
    assert CusumMonitor(**monitor.settings()).config == monitor.config  # settings round-trip through the record
    with pytest.raises(TypeError, match="unknown monitor option 'threshold'; the options are: k, h, warmup"):
        CusumMonitor(threshold=3.0)
    with pytest.raises(ValueError, match="need k >= 0 and h > 0"):
        monitor.update_settings(h=-1.0)
    args = parse_train_args([])
    for f, meta in flagged_options(MonitorConfig):
        assert getattr(args, flag_dest(meta["flag"])) == f.default, meta["flag"]
    assert record_from_args(args, MonitorConfig) == MonitorConfig()
    changed = parse_train_args(["--cusum-threshold", "6", "--cusum-onset", "page", "--cusum-gradient", "false"])
    assert record_from_args(changed, MonitorConfig) == MonitorConfig(h=6.0, onset="page", gradient=False)
