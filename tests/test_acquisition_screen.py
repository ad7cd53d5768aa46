"""The acquisition screen's arms (benchmarks/acquisition_screen.py) buy what a budgeted run would: the budget's rows,
never the probe, never a row twice; its typicality and the ``typical`` candidate on hand-made geometry."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import acquisition_screen as screen  # noqa: E402

from llkd_ray import acquisition  # noqa: E402
from llkd_ray.config import load_config  # noqa: E402


def unit(rows):
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_typicality_is_the_mean_similarity_to_the_nearest_other_rows():
    x = unit([[1, 0], [1, 0.1], [1, -0.1], [0, 1]])
    similarity = x @ x.T
    expected = [np.sort(np.delete(similarity[i], i))[::-1][:2].mean() for i in range(4)]
    assert screen.typicality(x, neighbours=2) == pytest.approx(expected)
    assert screen.typicality(x, neighbours=2).argmax() == 0  # the middle of the dense group, not the outlier


def blobs(seed=0):
    """Four tight groups of 30 rows around the axes' directions, and 5 stray rows between them."""
    rng = np.random.default_rng(seed)
    centres = np.eye(4)
    groups = [centre + rng.normal(0, 0.05, (30, 4)) for centre in centres]
    stray = rng.normal(0, 1, (5, 4))
    return unit(np.concatenate(groups + [stray]))


def test_the_typical_candidate_takes_the_densest_row_of_each_group_first():
    x = blobs()
    bought = screen.typical_rounds(x, np.arange(len(x)), [4], seed=0)
    assert sorted(bought // 30) == [0, 1, 2, 3]  # one from each group, none of the stray rows (indices 120-124)
    typical = screen.typicality(x)
    for group in range(4):
        members = np.arange(group * 30, group * 30 + 30)
        assert set(bought) & set(members) == {members[np.argmax(typical[members])]}


@pytest.mark.parametrize("arm, share", [("random", 0.0), ("student", 0.0), ("student", 0.5), ("typical", 0.0)])
def test_every_arm_buys_the_budget_once_and_never_the_probe(arm, share):
    x = blobs(1)
    data = {"pool_x": x, "teacher_label": np.arange(len(x)) // 30 % 3, "num_classes": 3}
    labeling = load_config(None, ["labeling.budget=0.5", "labeling.rounds=3", "labeling.clusters=4"]).labeling
    probe, sizes = acquisition.round_sizes(acquisition.budget_rows(0.5, len(x)), 3, labeling.probe_fraction)
    bought = screen.bought_rows(data, labeling, arm, share, seed=3)
    probe_rows = np.random.default_rng([3, 0]).choice(len(x), size=probe, replace=False)
    assert len(bought) == len(set(bought.tolist())) == sum(sizes)
    assert not set(bought.tolist()) & set(probe_rows.tolist())
