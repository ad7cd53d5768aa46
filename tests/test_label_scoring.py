"""The label-distribution math against values worked out by hand (fractions in the comments)."""

import numpy as np
import pytest

from llkd_ray.label_scoring import calibrate, label_log_scores, label_prior, normalize_scores, pick_labels
from llkd_ray.prompts import Verbalizer

# Label "a" has two one-token forms (ids 10, 11); label "b" one one-token form (20) and a two-token form (30, 31).
VERBALIZER = Verbalizer(("a", "b"), ((0, (10,)), (0, (11,)), (1, (20,)), (1, (30, 31))))


def test_verbalizer_splits_single_and_multi_token_forms():
    assert VERBALIZER.single_token_ids == [10, 11, 20]
    assert VERBALIZER.multi_token_continuations == [(30, 31)]


def test_forms_are_summed_per_label_and_restricted_to_the_label_set():
    # row 0: p(10)=.2 p(11)=.1 p(20)=.3, p(30 31)=.5*.2=.1 → s(a)=.3, s(b)=.4, mass .7, p=(3/7, 4/7)
    # row 1: p(10)=.6 p(11)=.05 p(20)=.1, p(30 31)=.05       → s(a)=.65, s(b)=.15, mass .8, p=(13/16, 3/16)
    first = np.log([[0.2, 0.1, 0.3], [0.6, 0.05, 0.1]])
    rest = np.array([[np.log(0.5) + np.log(0.2)], [np.log(0.05)]])
    scores = label_log_scores(VERBALIZER, first, rest)
    np.testing.assert_allclose(np.exp(scores), [[0.3, 0.4], [0.65, 0.15]], rtol=1e-12)
    probs, mass = normalize_scores(scores)
    np.testing.assert_allclose(probs, [[3 / 7, 4 / 7], [13 / 16, 3 / 16]], rtol=1e-12)
    np.testing.assert_allclose(mass, [0.7, 0.8], rtol=1e-12)


def test_calibration_divides_out_the_corpus_prior():
    raw = np.array([[3 / 7, 4 / 7], [13 / 16, 3 / 16]])
    prior = label_prior(raw)
    np.testing.assert_allclose(prior, [139 / 224, 85 / 224], rtol=1e-12)
    calibrated = calibrate(raw, prior)
    # row 0: (3/7)/(139/224) : (4/7)/(85/224) normalised = 255/811 : 556/811
    np.testing.assert_allclose(calibrated, [[255 / 811, 556 / 811], [1105 / 1522, 417 / 1522]], rtol=1e-12)
    labels, confidence = pick_labels(calibrated)
    assert labels.tolist() == [1, 0]
    np.testing.assert_allclose(confidence, [556 / 811, 1105 / 1522], rtol=1e-12)


def test_calibration_of_a_teacher_that_always_says_the_same_label():
    raw = np.array([[0.9, 0.1], [0.7, 0.3], [0.8, 0.2]])  # prior (0.8, 0.2): every raw label is "a"
    labels, _ = pick_labels(raw)
    assert labels.tolist() == [0, 0, 0]
    labels, _ = pick_labels(calibrate(raw, label_prior(raw)))
    # 0.9/0.8 = 1.125 vs 0.1/0.2 = .5 → a;  0.7/0.8 = .875 vs .3/.2 = 1.5 → b;  0.8/0.8 = 1 vs .2/.2 = 1 → tie (a)
    assert labels.tolist() == [0, 1, 0]


def test_a_label_with_no_probability_keeps_none_after_calibration():
    raw = np.array([[1.0, 0.0], [0.6, 0.4]])
    calibrated = calibrate(raw, np.array([0.8, 0.0]))
    assert np.isfinite(calibrated).all()
    assert calibrated[0].tolist() == pytest.approx([1.0, 0.0])


def test_a_label_whose_forms_all_have_zero_probability():
    verbalizer = Verbalizer(("a", "b"), ((0, (10,)), (1, (20,))))
    with np.errstate(divide="ignore"):
        first = np.log(np.array([[0.5, 0.0]]))
    scores = label_log_scores(verbalizer, first, np.zeros((1, 0)))
    probs, mass = normalize_scores(scores)
    np.testing.assert_allclose(probs, [[1.0, 0.0]])
    np.testing.assert_allclose(mass, [0.5])


def test_unlikely_multi_token_prefixes_are_not_followed_within_a_total_tolerance():
    """Hand-computed: one single-token variant (p .5); continuations (20, 21) and (30, 31) with first-token
    probabilities .2 and 1e-7. What may be left unfollowed in all is tolerance x the mass scored exactly (.5)."""
    from math import log

    from llkd_ray.teacher_backends import prefix_logprob, prefixes_worth_following

    scored = {(): {10: log(0.5), 20: log(0.2), 30: log(1e-7)}}
    continuations = [(20, 21), (30, 31)]
    depth_one = [(20,), (30,)]
    assert prefixes_worth_following(depth_one, scored, [10], continuations, 1e-5) == ([(20,)], pytest.approx(1e-7))
    assert prefixes_worth_following(depth_one, scored, [10], continuations, 1e-7) == (depth_one, 0.0)  # 1e-7 > 5e-8
    assert prefixes_worth_following(depth_one, scored, [10], continuations, 0) == (depth_one, 0.0)
    # What earlier depths left unfollowed counts against the same budget (5e-6): 4.95e-6 + 1e-7 is over it.
    assert prefixes_worth_following(depth_one, scored, [10], continuations, 1e-5, 4.95e-6)[0] == depth_one
    scored[(20,)] = {21: log(0.5)}
    assert prefix_logprob(scored, (20, 21)) == pytest.approx(log(0.1))
    assert prefix_logprob(scored, (30, 31)) == float("-inf")  # not followed: its variant scores nothing

    # The budget is a total: prefixes of 3.4e-6, 3.4e-6 and 2.8e-6 under a budget of 6e-6 lose only one, the unlikeliest
    # first. A completed continuation counts in the exact mass (.5 + .1 = .6).
    scored[(20,)].update({22: log(1.7e-5), 24: log(1.7e-5), 26: log(1.4e-5)})  # (20, 26): 2.8e-6
    deep = [(20, 22, 23), (20, 24, 25), (20, 26, 27)]
    kept, dropped = prefixes_worth_following([(20, 22), (20, 24), (20, 26)], scored, [10], [(20, 21), *deep], 1e-5)
    assert kept == [(20, 22), (20, 24)] and dropped == pytest.approx(2.8e-6)  # 2.8e-6 + 3.4e-6 > 6e-6
    # A prefix two continuations share may lose both: it costs twice its probability. Budget 9e-6 x .6 = 5.4e-6.
    one, two = [(20, 22, 23)], [(20, 22, 23), (20, 22, 29)]
    assert prefixes_worth_following([(20, 22)], scored, [10], [(20, 21), *one], 9e-6)[0] == []  # 3.4e-6
    assert prefixes_worth_following([(20, 22)], scored, [10], [(20, 21), *two], 9e-6)[0] == [(20, 22)]  # 6.8e-6


def test_em_recovers_the_class_prior_that_makes_the_corpus_most_likely():
    from llkd_ray.label_scoring import em_class_prior

    # 60 rows with (.9, .1) and 40 with (.2, .8), posteriors under a uniform prior. The likelihood
    # 60·log(.1 + .8π) + 40·log(.8 - .6π) is largest where 48/(.1 + .8π) = 24/(.8 - .6π): π = 36/48 = .75.
    posteriors = np.array([[0.9, 0.1]] * 60 + [[0.2, 0.8]] * 40)
    adjusted, prior = em_class_prior(posteriors)
    np.testing.assert_allclose(prior, [0.75, 0.25], atol=1e-6)
    # each row's posterior under that prior: (.9·.75, .1·.25) and (.2·.75, .8·.25), renormalised
    np.testing.assert_allclose(adjusted[0], [0.675 / 0.7, 0.025 / 0.7], atol=1e-6)
    np.testing.assert_allclose(adjusted[-1], [0.15 / 0.35, 0.2 / 0.35], atol=1e-6)
    # a corpus that is balanced already keeps the uniform prior
    _, balanced = em_class_prior(np.array([[0.9, 0.1], [0.1, 0.9]] * 10))
    np.testing.assert_allclose(balanced, [0.5, 0.5], atol=1e-9)
