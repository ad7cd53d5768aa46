"""metrics.py against scikit-learn, the reference implementation, on random inputs (ties and absent classes
included)."""

import numpy as np
import pytest
from sklearn import metrics as reference

from llkd_ray.metrics import auroc, classification_report, confusion_matrix


@pytest.mark.parametrize("seed", range(20))
def test_classification_report_matches_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    classes = int(rng.integers(2, 7))
    gold = rng.integers(0, classes, size=int(rng.integers(5, 200)))
    predicted = np.where(rng.uniform(size=len(gold)) < 0.6, gold, rng.integers(0, classes, size=len(gold)))
    if seed % 4 == 0:  # a class that neither gold nor the predictions contain
        gold, predicted = np.minimum(gold, classes - 2), np.minimum(predicted, classes - 2)
    names = [f"c{i}" for i in range(classes)]
    report = classification_report(gold, predicted, names)
    assert report["accuracy"] == pytest.approx(reference.accuracy_score(gold, predicted))
    assert report["macro_f1"] == pytest.approx(reference.f1_score(gold, predicted, average="macro", zero_division=0))
    per_class = reference.f1_score(gold, predicted, labels=range(classes), average=None, zero_division=0)
    np.testing.assert_allclose(list(report["per_class_f1"].values()), per_class.round(4))
    np.testing.assert_array_equal(
        confusion_matrix(gold, predicted, classes), reference.confusion_matrix(gold, predicted, labels=range(classes))
    )


@pytest.mark.parametrize("seed", range(20))
def test_auroc_matches_scikit_learn(seed):
    rng = np.random.default_rng(100 + seed)
    size = int(rng.integers(4, 300))
    positives = rng.uniform(size=size) < rng.uniform(0.1, 0.9)
    if positives.all() or not positives.any():
        positives[0] = not positives[0]
    scores = rng.uniform(size=size) + positives * rng.uniform(0, 1)
    if seed % 2:
        scores = np.round(scores, 1)  # many ties
    assert auroc(scores, positives) == pytest.approx(reference.roc_auc_score(positives, scores))


def test_auroc_is_undefined_with_one_class():
    assert np.isnan(auroc(np.array([0.1, 0.9]), np.array([True, True])))
