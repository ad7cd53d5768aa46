"""From the teacher's token log-probs to a distribution over the task's labels (pure NumPy).

For a text x and label y with surface forms V(y) (case and leading-space variants, possibly several tokens):

    log s(y | x) = logsumexp_{v in V(y)}  sum_t log p(v_t | prompt(x), v_<t)
    p_raw(y | x) = s(y | x) / sum_y' s(y' | x)                     (restricted to the label set)
    mass(x)      = sum_y s(y | x)                                   (how much the teacher put on any label)

Calibration without gold labels (the teacher's bias towards one label is divided out):

    prior(y)     = mean_x p_raw(y | x)                              (over the whole corpus)
    p_cal(y | x) = (p_raw(y | x) / prior(y)) / sum_y' (p_raw(y' | x) / prior(y'))

The pseudo-label is argmax_y p(y | x) and the teacher's confidence is that maximum probability.
"""

from __future__ import annotations

import numpy as np

from llkd_ray.prompts import Verbalizer


def label_log_scores(
    verbalizer: Verbalizer,
    next_token_logprobs: np.ndarray,
    continuation_logprobs: np.ndarray,
) -> np.ndarray:
    """Per-label log s(y|x), shape [batch, labels].

    ``next_token_logprobs[b, j]`` is log p(verbalizer.single_token_ids[j] | prompt_b) and
    ``continuation_logprobs[b, k]`` the summed log-prob of verbalizer.multi_token_continuations[k].
    """
    batch = next_token_logprobs.shape[0]
    column_of_token = {token: j for j, token in enumerate(verbalizer.single_token_ids)}
    per_label: list[list[np.ndarray]] = [[] for _ in verbalizer.label_names]
    multi_index = 0
    for label, ids in verbalizer.variants:
        if len(ids) == 1:
            per_label[label].append(next_token_logprobs[:, column_of_token[ids[0]]])
        else:
            per_label[label].append(continuation_logprobs[:, multi_index])
            multi_index += 1
    scores = np.full((batch, len(per_label)), -np.inf)
    for label, columns in enumerate(per_label):
        if columns:
            scores[:, label] = _logsumexp(np.stack(columns, axis=1), axis=1)
    return scores


def normalize_scores(log_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Restrict to the label set: (p_raw [batch, labels], label mass [batch])."""
    total = _logsumexp(log_scores, axis=1)
    return np.exp(log_scores - total[:, None]), np.exp(total)


def label_prior(raw_probs: np.ndarray) -> np.ndarray:
    """The teacher's average distribution over the corpus, the bias that calibration divides out."""
    return raw_probs.mean(axis=0)


def calibrate(raw_probs: np.ndarray, prior: np.ndarray) -> np.ndarray:
    # A label the teacher never predicts has prior 0; flooring it avoids 0/0 while keeping its probability ~0.
    ratio = raw_probs / np.maximum(prior, 1e-12)[None, :]
    return ratio / ratio.sum(axis=1, keepdims=True)


def em_class_prior(posteriors: np.ndarray, iterations: int = 1000, tolerance: float = 1e-9):
    """(adjusted posteriors, estimated prior) by EM prior adaptation (Saerens, Latinne & Decaestecker 2002).

    ``posteriors`` assume every class equally common (what ``calibrate`` returns). EM finds the prior π that makes
    the corpus most likely: q_i(c) ∝ p_i(c) π(c), π(c) = mean_i q_i(c), from π uniform to a fixed point."""
    num_classes = posteriors.shape[1]
    prior = np.full(num_classes, 1.0 / num_classes)
    adjusted = posteriors
    for _ in range(iterations):
        weighted = posteriors * prior[None, :]
        adjusted = weighted / np.maximum(weighted.sum(axis=1, keepdims=True), 1e-300)
        new_prior = adjusted.mean(axis=0)
        converged = np.abs(new_prior - prior).max() < tolerance
        prior = new_prior
        if converged:
            break
    return adjusted, prior


def pick_labels(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(label index, confidence = probability of that label) for each row."""
    labels = probs.argmax(axis=1)
    return labels, probs[np.arange(len(probs)), labels]


def _logsumexp(values: np.ndarray, axis: int) -> np.ndarray:
    top = np.max(values, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(top, axis=axis) + np.log(np.sum(np.exp(values - top), axis=axis))
