"""LLKD thresholds, selection and weights against values worked out by hand; the baselines' budgets."""

import typing

import numpy as np
import pytest

from llkd_ray.config import SelectionConfig
from llkd_ray.selection import (
    SELECTORS,
    PoolScores,
    ThresholdState,
    llkd_weights,
    normalized_entropy,
    rows_to_score,
    select,
    teacher_gate,
)

# Six samples, two classes. Teacher confidence c = (.9, .8, .7, .8, .9, .6) for teacher labels (0, 0, 0, 1, 1, 1).
TEACHER = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.2, 0.8], [0.1, 0.9], [0.4, 0.6]])
LABELS = np.array([0, 0, 0, 1, 1, 1])
# Student uncertainty u = H(q)/ln 2 = (1, .46900, .97095, .88129, .28640, 1).
STUDENT = np.array([[0.5, 0.5], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.05, 0.95], [0.5, 0.5]])


def run(strategy="llkd", state=None, student=STUDENT, teacher=TEACHER, warmup=False, seed=0, **options):
    cfg = SelectionConfig(
        **({"strategy": strategy, "momentum": 0.5, "teacher_quantile": None, "student_quantile": None} | options)
    )
    state = state if state is not None else ThresholdState()
    labels = teacher.argmax(1)
    confident = teacher_gate(teacher, labels, state, cfg)
    scores = PoolScores(teacher, labels, student)
    return select(cfg, scores, state, confident, warmup=warmup, rng=np.random.default_rng(seed))


def test_normalized_entropy():
    np.testing.assert_allclose(normalized_entropy(STUDENT), [1.0, 0.46900, 0.97095, 0.88129, 0.28640, 1], atol=1e-5)
    np.testing.assert_allclose(
        normalized_entropy(np.array([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])), [0, 1], atol=1e-9
    )


def test_first_epoch_thresholds_selection_and_weights():
    selection = run(min_fraction=0, balance_classes=False)
    # τ^T = mean c = .78333; p̃ = (.51667, .48333) → MaxNorm (1, .93548) → τ^T(c) = (.78333, .73280)
    np.testing.assert_allclose(selection.teacher_thresholds, [0.78333, 0.73280], atol=1e-5)
    # K = {0, 1, 3, 4} (c = .9, .8 | .8, .9). τ^S is a statistic of K: mean(1, .469, .88129, .2864) = .65917;
    # ũ over K = (.73450, .58385) → learned 1 - ũ = (.26550, .41615) → MaxNorm (.63799, 1) → τ^S(c) =
    # (.42054, .65917): class 0, which the student has learned less, gets the lower bar.
    np.testing.assert_allclose(selection.student_thresholds, [0.42054, 0.65917], atol=1e-5)
    # in K: u = 1 ≥ .42, .469 ≥ .42 → in; .881 ≥ .659 → in; .286 < .659 → out
    assert selection.mask.tolist() == [True, True, False, True, False, False]
    assert selection.llkd_count == 3 and selection.per_class == [2, 1]
    # w = c·u / mean over S: c·u = (.9, .3752, .70503), mean .66008
    np.testing.assert_allclose(selection.weights, [1.36347, 0.56842, 0, 1.06810, 0, 0], atol=1e-4)


def test_a_less_learned_class_is_relaxed_not_tightened():
    """The per-class student bar moves FreeMatch's way: with MaxNorm(ũ) (before) sample 1 was out."""
    selection = run(min_fraction=0)
    uncertainty = normalized_entropy(STUDENT)
    less_learned = 0  # ũ(0) = .73450 > ũ(1) = .58385
    assert selection.student_thresholds[less_learned] < selection.student_thresholds[1]
    assert selection.mask[1] and uncertainty[1] < selection.student_thresholds[1]  # would fail class 1's bar


def test_class_balanced_weights():
    selection = run(min_fraction=0, balance_classes=True)
    # π over K = (2/4, 2/4); |S| = 3, |S_0| = 2, |S_1| = 1. Class 0: c·u = (.9, .3752), mean .6376 →
    # (1.41154, .58846) · .5 · 3/2 = (1.05866, .44134); class 1: 1 · .5 · 3/1 = 1.5
    np.testing.assert_allclose(selection.weights, [1.05866, 0.44134, 0, 1.5, 0, 0], atol=1e-5)
    assert selection.weights.sum() == pytest.approx(3.0)  # still mean 1 over the selection
    scores = PoolScores(TEACHER, LABELS, STUDENT)
    plain = llkd_weights(scores, selection.mask)
    np.testing.assert_allclose(plain[[0, 1, 3]], [1.36347, 0.56842, 1.06810], atol=1e-4)


def test_no_epoch_trains_on_a_handful_the_floor_tops_up_from_the_confident_set():
    # floor ceil(.6 · 6) = 4: the best of K \ S by c·u is sample 4 (the only one left)
    assert run(min_fraction=0.6).mask.tolist() == [True, True, False, True, True, False]
    # floor 6 > |K| = 4: all of K, never a sample the teacher is not confident about
    assert run(min_fraction=0.9).mask.tolist() == [True, True, False, True, True, False]
    assert run(min_fraction=0.5).mask.tolist() == [True, True, False, True, False, False]  # floor 3: no change


def test_thresholds_move_by_the_momentum():
    state = ThresholdState()
    run(state=state, min_fraction=0)
    # The student becomes unsure of everything (u = 1): τ^S = .5·.65917 + .5·1 = .82958,
    # ũ = .5·(.73450, .58385) + .5 = (.86725, .79193) → learned (.13275, .20807) → MaxNorm (.63801, 1)
    selection = run(state=state, student=np.full((6, 2), 0.5), min_fraction=0)
    assert state.student_global == pytest.approx(0.82958, abs=1e-5)
    np.testing.assert_allclose(state.student_class, [0.86725, 0.79193], atol=1e-5)
    np.testing.assert_allclose(selection.student_thresholds, [0.52928, 0.82958], atol=1e-4)
    np.testing.assert_allclose(selection.teacher_thresholds, [0.78333, 0.73280], atol=1e-5)  # the teacher's stay


def test_quantile_statistics_replace_the_global_means():
    selection = run(teacher_quantile=0.75, min_fraction=0)
    # c sorted = (.6, .7, .8, .8, .9, .9): the .75 quantile (linear) is .8 + .75·.1 = .875 → τ^T(c) =
    # (.875, .875·.93548 = .81855): K = {0, 4}
    np.testing.assert_allclose(selection.teacher_thresholds, [0.875, 0.81855], atol=1e-5)
    # u over K = (1, .2864): the .25 quantile would be .2864 + .25·.7136 = .4648
    quantile = run(teacher_quantile=0.75, student_quantile=0.25, min_fraction=0)
    np.testing.assert_allclose(quantile.student_thresholds.max(), 0.4648, atol=1e-4)


def test_per_class_teacher_threshold_follows_the_class_prior():
    teacher = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.45, 0.55]])
    selection = run(teacher=teacher, student=STUDENT[:4], momentum=0.9, warmup=True, min_fraction=0)
    # τ^T = mean(.9, .8, .7, .55) = .7375; p̃ = (.7125, .2875) → τ^T(c) = (.7375, .7375·.2875/.7125 = .29759)
    np.testing.assert_allclose(selection.teacher_thresholds, [0.7375, 0.29759], atol=1e-5)
    # warm-up: the teacher criterion alone → .9, .8 pass for class 0, .55 ≥ .298 passes for class 1
    assert selection.mask.tolist() == [True, True, False, True]


def test_warmup_ignores_the_student_and_keeps_it_out_of_the_averages():
    state = ThresholdState()
    unscored = np.full((6, 2), np.nan)  # in warm-up the loop does not score the pool at all
    warm = run(state=state, student=unscored, warmup=True)
    assert warm.mask.tolist() == [True, True, False, True, True, False]  # K
    assert state.student_global is None and warm.student_thresholds.tolist() == [0.0, 0.0]
    # The first epoch after warm-up initialises the student's averages from what it observes.
    after = run(state=state, min_fraction=0)
    np.testing.assert_allclose(after.student_thresholds, [0.42054, 0.65917], atol=1e-5)


def test_only_the_confident_rows_need_scores_for_llkd():
    state = ThresholdState()
    confident = teacher_gate(TEACHER, LABELS, state, SelectionConfig(teacher_quantile=None))
    assert rows_to_score("llkd", confident).tolist() == confident.tolist() == [True, True, False, True, True, False]
    assert rows_to_score("student_uncertainty", confident).all()
    student = np.where(confident[:, None], STUDENT, np.nan)  # what the loop hands over: NaN where not scored
    assert run(student=student, min_fraction=0).mask.tolist() == run(min_fraction=0).mask.tolist()


def test_soft_selector_keeps_the_confident_set_and_weights_it_by_need():
    selection = run("llkd_soft", balance_classes=False)
    assert selection.mask.tolist() == [True, True, False, True, True, False]  # all of K
    # μ = .65917, σ² = var(1, .469, .88129, .2864) = .08516; g = 1 above μ, exp(-(u-μ)²/2σ²) below:
    # g = (1, .80873, 1, .44224); raw c·g = (.9, .64698, .8, .39802), mean .68625
    np.testing.assert_allclose(selection.weights[[0, 1, 3, 4]], [1.31148, 0.94278, 1.16576, 0.57999], atol=1e-4)


def test_budget_matched_baselines_take_as_many_samples_as_llkd():
    assert run("all").mask.all() and (run("all").weights == 1).all()
    random_a, random_b = run("random", seed=3, min_fraction=0), run("random", seed=3, min_fraction=0)
    assert random_a.mask.sum() == 3 and random_a.mask.tolist() == random_b.mask.tolist()
    # c = .9, .9 and then a tie at .8 broken by index
    top_confident = run("teacher_confidence", min_fraction=0)
    assert top_confident.mask.tolist() == [True, True, False, False, True, False]
    threshold = run("teacher_confidence", teacher_confidence_threshold=0.75)
    assert threshold.mask.tolist() == [True, True, False, True, True, False]
    uncertain = run("student_uncertainty", min_fraction=0)  # u = 1, 1 and .971
    assert uncertain.mask.tolist() == [True, False, True, False, False, True]
    # fixed_ratio keeps round(1.5) = 2 of each class by c·u: class 0 → .9, .680 (not .375); class 1 → .705, .6
    assert run("fixed_ratio", fraction=0.5).mask.tolist() == [True, False, True, True, False, True]
    for strategy in SELECTORS:
        selection = run(strategy)
        assert set(selection.weights[~selection.mask]) <= {0.0}


def test_the_config_offers_exactly_the_registered_selectors():
    offered = typing.get_args(SelectionConfig.model_fields["strategy"].annotation)
    assert set(offered) == set(SELECTORS)


def test_unknown_strategy():
    from llkd_ray.selection import selector

    with pytest.raises(ValueError, match="unknown selection strategy 'best'"):
        selector("best")


def test_a_class_absent_from_the_pool_keeps_a_threshold():
    teacher = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0]])
    selection = run(teacher=teacher, student=np.array([[0.5, 0.3, 0.2], [0.6, 0.2, 0.2]]), momentum=0.9)
    assert np.isfinite(selection.student_thresholds).all() and np.isfinite(selection.teacher_thresholds).all()
