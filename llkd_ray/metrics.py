"""Classification metrics (pure NumPy): accuracy, macro-F1, per-class F1, confusion matrix, AUROC."""

from __future__ import annotations

import numpy as np


def confusion_matrix(gold: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """matrix[g, p] = how many rows of gold class g were predicted as p."""
    matrix = np.zeros((num_classes, num_classes), dtype=int)
    np.add.at(matrix, (gold, predicted), 1)
    return matrix


def per_class_f1(matrix: np.ndarray) -> np.ndarray:
    true_positive = np.diag(matrix).astype(float)
    predicted = matrix.sum(axis=0)
    actual = matrix.sum(axis=1)
    precision = np.divide(true_positive, predicted, out=np.zeros_like(true_positive), where=predicted > 0)
    recall = np.divide(true_positive, actual, out=np.zeros_like(true_positive), where=actual > 0)
    total = precision + recall
    return np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)


def classification_report(gold: np.ndarray, predicted: np.ndarray, label_names: list[str]) -> dict:
    """Accuracy, macro-F1 (over classes present in gold or predictions), per-class F1 and the confusion matrix."""
    matrix = confusion_matrix(gold, predicted, len(label_names))
    f1 = per_class_f1(matrix)
    present = (matrix.sum(axis=0) + matrix.sum(axis=1)) > 0
    return {
        "count": int(len(gold)),
        "accuracy": float((gold == predicted).mean()) if len(gold) else float("nan"),
        "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
        "per_class_f1": dict(zip(label_names, f1.round(4).tolist())),
        "confusion_matrix": matrix.tolist(),
    }


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for telling ``positives`` apart (ties count one half)."""
    positives = positives.astype(bool)
    n_pos, n_neg = positives.sum(), (~positives).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average ranks over ties (1-based), the Mann-Whitney U formulation.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for start, count in zip(first, counts):
        ranks[order[start : start + count]] = start + (count + 1) / 2
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
