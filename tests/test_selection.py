"""LLKD thresholds, selection and weights against values worked out by hand; the baselines' budgets."""

import numpy as np
import pytest

from llkd_ray.selection import PoolScores, ThresholdState, llkd_weights, normalized_entropy, select

# Four samples, two classes. Teacher confidence c = (.9, .6, .8, .7) for teacher labels (0, 0, 1, 1).
TEACHER = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.3, 0.7]])
LABELS = np.array([0, 0, 1, 1])
# Student uncertainty u = H(q)/ln 2 = (1, .46900, .97095, .72193).
STUDENT = np.array([[0.5, 0.5], [0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])


def run(strategy="llkd", state=None, student=STUDENT, **kwargs):
    options = {"momentum": 0.5, "warmup": False, "rng": np.random.default_rng(0)} | kwargs
    return select(strategy, PoolScores(TEACHER, LABELS, student), state or ThresholdState(), **options)


def test_normalized_entropy():
    np.testing.assert_allclose(normalized_entropy(STUDENT), [1.0, 0.46900, 0.97095, 0.72193], atol=1e-5)
    np.testing.assert_allclose(
        normalized_entropy(np.array([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])), [0, 1], atol=1e-9
    )


def test_first_epoch_thresholds_selection_and_weights():
    state = ThresholdState()
    selection = run(state=state)
    # τ^T = mean c = .75; p̃ = mean teacher probs = (.5, .5) → τ^T(c) = (.75, .75)
    np.testing.assert_allclose(selection.teacher_thresholds, [0.75, 0.75])
    # τ^S = mean u = .79047; ũ = (.73450, .84644) → MaxNorm = (.86775, 1) → τ^S(c) = (.68593, .79047)
    np.testing.assert_allclose(selection.student_thresholds, [0.68593, 0.79047], atol=1e-5)
    # sample 0: .9 ≥ .75 and 1 ≥ .686 → in;  1: .6 < .75 → out;  2: .8 ≥ .75 and .971 ≥ .790 → in;  3: .7 < .75 → out
    assert selection.mask.tolist() == [True, False, True, False]
    assert selection.llkd_count == 2 and selection.per_class == [1, 1]
    # w = c·u / mean over selected: .9 and .77676, mean .83838
    np.testing.assert_allclose(selection.weights, [1.07350, 0.0, 0.92650, 0.0], atol=1e-5)


def test_class_balanced_weights():
    # Six samples: teacher-confident are 0-4 (classes 0,0,0,1,1 → π = (.6, .4)); selected are 0, 1 (class 0) and
    # 3 (class 1), so |S| = 3, |S_0| = 2, |S_1| = 1.
    teacher = np.array([[0.9, 0.1], [0.8, 0.2], [0.95, 0.05], [0.1, 0.9], [0.2, 0.8], [0.6, 0.4]])
    scores = PoolScores(
        teacher,
        teacher.argmax(1),
        np.array([[0.5, 0.5], [0.7, 0.3], [0.99, 0.01], [0.6, 0.4], [0.98, 0.02], [0.5, 0.5]]),
    )
    mask = np.array([True, True, False, True, False, False])
    confident = np.array([True, True, True, True, True, False])
    weights = llkd_weights(scores, mask, confident)
    # c·u: sample 0 = .9·1 = .9, sample 1 = .8·.88129 = .70503 → class-0 mean .80252;
    # w = (.9/.80252, .70503/.80252) · .6 · 3/2 and w_3 = 1 · .4 · 3/1
    np.testing.assert_allclose(weights, [1.00933, 0.79067, 0, 1.2, 0, 0], atol=1e-5)
    assert weights.sum() == pytest.approx(3.0)  # still mean 1 over the selection
    # Without balance: c·u / its mean over all three selected
    plain = llkd_weights(scores, mask)
    raw = np.array([0.9, 0.70503, 0.9 * 0.97095])
    np.testing.assert_allclose(plain[[0, 1, 3]], raw / raw.mean(), atol=1e-4)


def test_thresholds_move_by_the_momentum():
    state = ThresholdState()
    run(state=state)
    # The student becomes unsure of everything (u = 1): τ^S = .5·.79047 + .5·1, ũ = .5·(.73450, .84644) + .5
    selection = run(state=state, student=np.full((4, 2), 0.5))
    assert state.student_global == pytest.approx(0.89524, abs=1e-5)
    np.testing.assert_allclose(state.student_class, [0.86725, 0.92322], atol=1e-5)
    np.testing.assert_allclose(selection.student_thresholds, [0.86725 / 0.92322 * 0.89524, 0.89524], atol=1e-5)
    np.testing.assert_allclose(selection.teacher_thresholds, [0.75, 0.75])  # the teacher does not change


def test_quantile_statistics_replace_the_global_means():
    selection = run(teacher_quantile=0.75, student_quantile=0.25)
    # c sorted = (.6, .7, .8, .9): the .75 quantile (linear) is .825; p̃ = (.5, .5) → τ^T(c) = (.825, .825)
    np.testing.assert_allclose(selection.teacher_thresholds, [0.825, 0.825])
    # u sorted = (.46900, .72193, .97095, 1): the .25 quantile is .46900 + .75·(.72193 - .46900) = .65870;
    # MaxNorm(ũ) = (.86775, 1) as before → τ^S(c) = (.57159, .65870)
    np.testing.assert_allclose(selection.student_thresholds, [0.57159, 0.65870], atol=1e-5)
    # only sample 0 (c = .9) clears .825, and its u = 1 clears .572
    assert selection.mask.tolist() == [True, False, False, False]


def test_per_class_teacher_threshold_follows_the_class_prior():
    teacher = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.45, 0.55]])
    state = ThresholdState()
    selection = select(
        "llkd",
        PoolScores(teacher, teacher.argmax(1), STUDENT),
        state,
        momentum=0.9,
        warmup=True,
        rng=np.random.default_rng(0),
    )
    # τ^T = mean(.9, .8, .7, .55) = .7375; p̃ = (.7125, .2875) → τ^T(c) = (.7375, .7375·.2875/.7125 = .29759)
    np.testing.assert_allclose(selection.teacher_thresholds, [0.7375, 0.29759], atol=1e-5)
    # warm-up: the teacher criterion alone → .9, .8 pass for class 0, .55 ≥ .298 passes for class 1
    assert selection.mask.tolist() == [True, True, False, True]


def test_warmup_ignores_the_student_and_keeps_it_out_of_the_averages():
    uncertain_only_where_teacher_is_not = np.array([[0.99, 0.01], [0.5, 0.5], [0.99, 0.01], [0.5, 0.5]])
    assert run(student=uncertain_only_where_teacher_is_not).mask.sum() == 0
    state = ThresholdState()
    warm = run(state=state, student=uncertain_only_where_teacher_is_not, warmup=True)
    assert warm.mask.tolist() == [True, False, True, False]
    assert state.student_global is None and warm.student_thresholds.tolist() == [0.0, 0.0]
    # The first epoch after warm-up initialises the student's averages from what it observes (τ^S = .79047).
    after = run(state=state)
    np.testing.assert_allclose(after.student_thresholds, [0.68593, 0.79047], atol=1e-5)


def test_budget_matched_baselines_take_as_many_samples_as_llkd():
    assert run("all").mask.all() and (run("all").weights == 1).all()
    random_a, random_b = run("random", rng=np.random.default_rng(3)), run("random", rng=np.random.default_rng(3))
    assert random_a.mask.sum() == 2 and random_a.mask.tolist() == random_b.mask.tolist()
    assert run("teacher_confidence").mask.tolist() == [True, False, True, False]  # c = .9 and .8 are the top 2
    assert run("teacher_confidence", teacher_confidence_threshold=0.65).mask.tolist() == [True, False, True, True]
    assert run("student_uncertainty").mask.tolist() == [True, False, True, False]  # u = 1 and .971
    # fixed_ratio keeps half of each class by c·u: class 0 → sample 0 (.9 vs .281), class 1 → sample 2 (.777 vs .505)
    assert run("fixed_ratio", fraction=0.5).mask.tolist() == [True, False, True, False]
    for strategy in ("random", "teacher_confidence", "student_uncertainty", "fixed_ratio", "all"):
        assert set(run(strategy).weights[~run(strategy).mask]) <= {0.0}


def test_unknown_strategy():
    with pytest.raises(ValueError, match="unknown selection strategy 'best'"):
        run("best")


def test_a_class_absent_from_the_pool_keeps_a_threshold():
    teacher = np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0]])
    state = ThresholdState()
    selection = select(
        "llkd",
        PoolScores(teacher, np.array([0, 0]), np.array([[0.5, 0.3, 0.2], [0.6, 0.2, 0.2]])),
        state,
        momentum=0.9,
        warmup=False,
        rng=np.random.default_rng(0),
    )
    assert np.isfinite(selection.student_thresholds).all() and np.isfinite(selection.teacher_thresholds).all()
