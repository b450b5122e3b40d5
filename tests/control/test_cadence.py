"""The cadence a run chooses when nobody said, and the line that says what it will measure."""

from __future__ import annotations

import pytest

from curvopt import CurvatureConfig
from curvopt.control.cadence import describe_cadence, plan_cadence
from curvopt.integrations.session import choose_cadence


def test_a_short_run_chooses_twenty_estimates_and_a_chosen_cadence_is_kept():
    plan = plan_cadence(40, None, 9)
    assert (plan.every, plan.estimates, plan.chosen, plan.ready_at_step) == (2, 20, False, 18)
    assert plan_cadence(100_000, None, 9).every == 500
    kept = plan_cadence(40, 10, 9)
    assert kept.chosen and kept.estimates == 4 and not kept.gives_verdict
    assert "no memorisation verdict: every 4 or less makes 10" in describe_cadence(kept, "every=")
    with pytest.raises(ValueError, match="every must be >= 0"):
        plan_cadence(40, -1, 9)


def test_a_run_of_unknown_length_gets_the_default_and_no_false_verdict():
    """A framework that cannot say how long the run is (an infinite iterable): every 500, and no claim about the
    number of estimates or the verdict."""
    options = {"config": CurvatureConfig(every=None, probes=4, curvature_batch_size=16), "monitor": "cusum"}
    cadence = choose_cadence(options, None)
    assert options["config"].every == 500 and not cadence.plan.chosen and cadence.plan.gives_verdict
    line = cadence.line()
    assert "curvature every 500 optimizer steps (the run's length is unknown, so the default; every= sets it)" in line
    assert "ready at step 4500" in line and "estimates in this run" not in line and "no memorisation" not in line
    assert choose_cadence({"config": CurvatureConfig(every=7), "monitor": None}, None).plan.every == 7
