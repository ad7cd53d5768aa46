"""The budget's choices (llkd_ray/acquisition.py) against hand-computed values, and its ledger's guards."""

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_config

from llkd_ray import acquisition
from llkd_ray.budget import LEDGER_SCHEMA, AcquisitionLedger, budget_identity
from llkd_ray.config import ConfigError, load_config
from llkd_ray.errors import UserError
from llkd_ray.pseudo_label_store import PseudoLabelStore


def test_budget_rows_reads_a_fraction_or_a_count():
    assert acquisition.budget_rows(0.3, 2000) == 600
    assert acquisition.budget_rows(450, 2000) == 450
    assert acquisition.budget_rows(5000, 2000) == 2000  # a count over the corpus buys the corpus
    assert acquisition.budget_rows(1e-9, 2000) == 1


def test_round_sizes_take_the_probe_off_the_top_and_split_the_rest():
    # 600 rows, 10% probe = 60; 540 over 3 rounds = 180 each
    assert acquisition.round_sizes(600, 3, 0.1) == (60, [180, 180, 180])
    # 101 rows, probe 10; 91 = 31 + 30 + 30 (the remainder goes to round 0)
    assert acquisition.round_sizes(101, 3, 0.1) == (10, [31, 30, 30])
    assert acquisition.round_sizes(600, 1, 0.0) == (0, [600])


@pytest.mark.parametrize(
    "value, message",
    [(1, "ambiguous"), (0, "row count must be >= 2"), (1.5, "fraction must be in"), (True, "expected a fraction")],
)
def test_a_budget_that_means_nothing_is_refused(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"labeling.budget={str(value).lower()}"])


def test_the_seed_covers_every_cluster_then_follows_cluster_sizes():
    # clusters of 10, 6, 3 and 1 rows; a seed of 8: one each, then the 4 left by room (9, 5, 2, 0 rows left):
    # ideal 4*9/16 = 2.25, 4*5/16 = 1.25, 4*2/16 = 0.5, 0 → floors 2, 1, 0, 0 and the largest remainder (0.5) +1
    clusters = np.array([0] * 10 + [1] * 6 + [2] * 3 + [3])
    picked = acquisition.stratified_seed(clusters, 8, np.random.default_rng(0))
    assert len(set(picked)) == 8
    assert np.bincount(clusters[picked], minlength=4).tolist() == [3, 2, 2, 1]


def test_a_seed_smaller_than_the_clusters_takes_the_largest_ones():
    clusters = np.array([0] * 2 + [1] * 5 + [2] * 3)
    picked = acquisition.stratified_seed(clusters, 2, np.random.default_rng(0))
    assert sorted(clusters[picked].tolist()) == [1, 2]


def test_uncertain_and_diverse_balances_classes_and_spreads_over_clusters():
    # class 0: rows 0-5 in clusters a (0, 1, 2) and b (3, 4, 5); class 1: rows 6, 7 only
    uncertainty = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.1, 0.2])
    predicted = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    clusters = np.array([0, 0, 0, 1, 1, 1, 0, 0])
    # 6 rows: quotas 3 and 3, but class 1 has only 2 rows, so class 0 takes 4; inside class 0 the clusters take
    # turns, the one holding the most uncertain row first: 0 (a), 3 (b), 1 (a), 4 (b)
    picked = acquisition.uncertain_and_diverse(uncertainty, predicted, clusters, 6, 2)
    assert picked.tolist() == [0, 1, 3, 4, 6, 7]
    # 2 rows: one per class, the most uncertain of each
    assert acquisition.uncertain_and_diverse(uncertainty, predicted, clusters, 2, 2).tolist() == [0, 7]


def test_a_random_share_of_the_round_is_drawn_from_what_the_student_left():
    uncertainty = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.1, 0.2])
    predicted = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    clusters = np.array([0, 0, 0, 1, 1, 1, 0, 0])
    # share 0 is the student's choice alone; share 1 the whole round at random
    chosen, drawn = acquisition.student_and_random(
        uncertainty, predicted, clusters, 6, 2, 0.0, np.random.default_rng(0)
    )
    assert chosen.tolist() == [0, 1, 3, 4, 6, 7] and drawn.tolist() == []
    chosen, drawn = acquisition.student_and_random(
        uncertainty, predicted, clusters, 6, 2, 1.0, np.random.default_rng(0)
    )
    assert chosen.tolist() == [] and len(drawn) == len(set(drawn.tolist())) == 6
    # share 0.5 of 6 rows: the student picks 3 (quotas 2 and 1: rows 0 and 3 from the two clusters of class 0, 7),
    # 3 are drawn from the rest
    draws = set()
    for seed in range(40):
        chosen, drawn = acquisition.student_and_random(
            uncertainty, predicted, clusters, 6, 2, 0.5, np.random.default_rng(seed)
        )
        assert chosen.tolist() == [0, 3, 7] and len(drawn) == 3 and not set(drawn.tolist()) & {0, 3, 7}
        draws |= set(drawn.tolist())
    assert draws == {1, 2, 4, 5, 6}  # uniform over what is left, not the next most uncertain rows
    # a round bigger than the rows left buys them all, once
    chosen, drawn = acquisition.student_and_random(
        uncertainty, predicted, clusters, 20, 2, 0.5, np.random.default_rng(0)
    )
    assert sorted(chosen.tolist() + drawn.tolist()) == list(range(8))


def test_normalized_entropy_is_zero_when_sure_and_one_when_uniform():
    values = acquisition.normalized_entropy(np.array([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0]]))
    assert values == pytest.approx([0.0, 1.0, math.log(2) / math.log(3)], abs=1e-6)


def test_kmeans_finds_separated_groups_and_assigns_each_point_to_its_own():
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(center, 0.05, size=(20, 2)) for center in ((0, 0), (5, 5), (0, 5))])
    centroids = acquisition.kmeans(points, 3, np.random.default_rng(1))
    assigned = acquisition.nearest_centroid(points, centroids)
    assert all(len(set(assigned[i * 20 : (i + 1) * 20])) == 1 for i in range(3))
    assert len(set(assigned)) == 3
    # fewer distinct points than clusters asked for: no empty clusters
    assert len(acquisition.kmeans(np.ones((5, 2)), 3, np.random.default_rng(0))) == 1


def test_the_stopping_rule_stops_only_when_even_the_gains_upper_bound_is_under_the_margin():
    before = np.array([1, 1, 0, 0, 1, 0, 1, 0, 1, 0])
    assert not acquisition.agreement_stalled(None, before, 0.005)  # one round measured: nothing to compare
    assert acquisition.agreement_stalled(before, before, 0.005)  # no row changed: gain 0, spread 0
    assert not acquisition.agreement_stalled(before, before, None)
    # two rows gained, one lost: gain 0.1; changes (+1, +1, -1, 0 x7): std (ddof 1) = sqrt((3 - 0.1) / 9)
    after = np.array([1, 1, 1, 1, 0, 0, 1, 0, 1, 0])
    upper = 0.1 + math.sqrt((3 - 10 * 0.01) / 9) / math.sqrt(10)
    assert upper == pytest.approx(0.2795, abs=1e-4)
    assert acquisition.agreement_stalled(before, after, upper + 1e-6)
    assert not acquisition.agreement_stalled(before, after, upper - 1e-6)
    # one row lost and nothing gained: the upper bound (-0.1 + 0.1) is 0, under any positive margin
    worse = before.copy()
    worse[0] = 0
    assert acquisition.agreement_stalled(before, worse, 0.005)


def test_a_ledger_of_another_budget_is_refused_and_a_corrupt_plan_named(tmp_path):

    cfg = make_config(store={"path": str(tmp_path / "store")}, labeling={"budget": 0.3})
    store = PseudoLabelStore(cfg)
    identity = budget_identity(cfg, ["a", "b", "c"], {"h"})
    ledger = AcquisitionLedger(store, "run", identity)
    AcquisitionLedger(store, "run", identity)  # the same budget resumes
    # Where the scorers run and the stopping margin do not change which rows a round picks
    moved = make_config(
        store={"path": str(tmp_path / "store")},
        labeling={"budget": 0.3, "stop_margin": None, "scorer": {"num_actors": 4}},
    )
    assert budget_identity(moved, ["c", "b", "a"], {"h"}) == identity
    for other in (
        budget_identity(make_config(labeling={"budget": 0.4}), ["a", "b", "c"], {"h"}),  # another budget
        budget_identity(cfg, ["a", "b", "d"], {"h"}),  # another corpus
        budget_identity(make_config(labeling={"budget": 0.3}, training={"epochs": 2}), ["a", "b", "c"], {"h"}),
    ):
        assert other != identity
        with pytest.raises(UserError, match="with another budget, corpus or training recipe"):
            AcquisitionLedger(store, "run", other)

    plan = f"{ledger.root}/round-00.parquet"
    with open(plan, "wb") as file:
        file.write(b"not parquet")
    with pytest.raises(UserError, match="round-00.parquet is not a readable round plan"):
        ledger.plan(0)
    ledger.record_plan(0, LEDGER_SCHEMA.empty_table())
    assert ledger.plan(0).num_rows == 0
    pq.write_table(pa.table({"key": ["a"]}), plan)
    with pytest.raises(UserError, match="is not a round plan"):
        ledger.plan(0)
