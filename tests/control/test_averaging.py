"""The weight average a rollback can restore: the exponential average against its closed form."""

import pytest
import torch

from curvopt.control.averaging import ExponentialAverage


def test_average_matches_the_closed_form_with_irregular_sampling():
    average = ExponentialAverage(halflife=10)
    steps, values = [0, 5, 25, 30], [1.0, 3.0, -2.0, 4.0]
    for step, value in zip(steps, values):
        average.update({"w": torch.full((2,), value), "count": torch.tensor(step)}, step)
    expected = values[0]
    for previous, step, value in zip(steps, steps[1:], values[1:]):
        keep = 0.5 ** ((step - previous) / 10)
        expected = keep * expected + (1 - keep) * value
    assert torch.allclose(average.state["w"], torch.full((2,), expected, dtype=torch.float32))
    assert int(average.state["count"]) == 30  # integer state is the latest, not averaged


def test_snapshot_is_a_copy_and_loads_into_the_model():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    average = ExponentialAverage(halflife=1)
    average.update(model.state_dict(), 0)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    average.update(model.state_dict(), 1)  # half of the way to the new weights
    snapshot = average.snapshot()
    snapshot["0.weight"].zero_()
    assert not torch.equal(average.state["0.weight"], snapshot["0.weight"])
    model.load_state_dict(average.snapshot())
    assert torch.allclose(model[0].weight, average.state["0.weight"])


@pytest.mark.parametrize("halflife", [0, -1.0, float("nan")])
def test_a_half_life_that_is_not_positive_is_refused(halflife):
    with pytest.raises(ValueError, match="half-life"):
        ExponentialAverage(halflife)
