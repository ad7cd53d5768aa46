"""The weight average against hand-computed values (pure torch, no Ray)."""

import pytest
import torch

from llkd_ray.weight_average import WeightAverage, decay_at


def layer(weight: float, bias: float) -> torch.nn.Linear:
    module = torch.nn.Linear(1, 1)
    with torch.no_grad():
        module.weight.fill_(weight)
        module.bias.fill_(bias)
    return module


def test_the_decay_warms_up_then_holds():
    assert [decay_at(t, 0.99) for t in (0, 1, 8)] == pytest.approx([1 / 10, 2 / 11, 9 / 18])
    assert decay_at(10_000, 0.99) == 0.99


def test_the_average_follows_each_step_with_the_warmed_up_decay():
    module = layer(1.0, 0.0)
    average = WeightAverage(module, decay=0.5)
    with torch.no_grad():
        module.weight.fill_(3.0)
    average.update(module)  # d_0 = 0.1: 0.1·1 + 0.9·3 = 2.8
    with torch.no_grad():
        module.weight.fill_(5.0)
    average.update(module)  # d_1 = min(0.5, 2/11) = 2/11: (2/11)·2.8 + (9/11)·5 = 4.6
    assert float(average.average["weight"]) == pytest.approx(2 / 11 * 2.8 + 9 / 11 * 5)
    assert float(average.average["bias"]) == 0.0


def test_applied_swaps_the_average_in_and_the_live_weights_back():
    module = layer(1.0, 2.0)
    average = WeightAverage(module, decay=0.9)
    with torch.no_grad():
        module.weight.fill_(7.0)
    with average.applied(module):
        assert float(module.weight) == 1.0 and float(module(torch.ones(1, 1))) == 3.0
    assert float(module.weight) == 7.0  # training goes on from its own weights
    exported = average.state_dict_for(module.to(torch.bfloat16))
    assert exported["weight"].dtype == torch.bfloat16 and float(exported["weight"]) == 1.0


def test_a_saved_average_loads_back_and_refuses_another_network(tmp_path):
    module = layer(1.0, 0.0)
    average = WeightAverage(module, decay=0.9)
    with torch.no_grad():
        module.weight.fill_(4.0)
    average.update(module)
    average.save(str(tmp_path))
    restored = WeightAverage(layer(0.0, 0.0), decay=0.9)
    restored.load(str(tmp_path))
    assert restored.steps == 1 and torch.equal(restored.average["weight"], average.average["weight"])
    other = WeightAverage(torch.nn.Linear(1, 1, bias=False), decay=0.9)
    with pytest.raises(ValueError, match="does not average this student's weights"):
        other.load(str(tmp_path))
