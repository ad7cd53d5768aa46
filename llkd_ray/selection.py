"""LLKD sample selection and weighting, and the baselines it is measured against (pure NumPy, no Ray).

Notation, for pool sample i: teacher label y_i, teacher distribution p_i, teacher confidence c_i = p_i(y_i),
student distribution q_i over L classes, student uncertainty (normalised entropy)

    u_i = -sum_c q_i(c) log q_i(c) / log L          in [0, 1]

Once per epoch, after the student has scored the whole pool, the statistics move by exponential moving
averages with momentum λ (FreeMatch-style self-adaptive thresholds; the first epoch initialises them):

    global teacher confidence   τ^T   <- λ τ^T   + (1-λ) mean_i c_i
    class teacher probability   p̃(c) <- λ p̃(c) + (1-λ) mean_i p_i(c)
    global student uncertainty  τ^S   <- λ τ^S   + (1-λ) mean_i u_i
    class student uncertainty   ũ(c)  <- λ ũ(c)  + (1-λ) mean_{i: y_i = c} u_i

(``teacher_quantile`` / ``student_quantile`` replace the global mean by that quantile of c_i / u_i: a stricter
gate than the mean when the pool is large and the budget small; None keeps the mean.)

and the per-class thresholds scale the global one by how far the class has come (MaxNorm(x)(c) = x(c)/max x):

    τ^T(c) = MaxNorm(p̃)(c) · τ^T          τ^S(c) = MaxNorm(ũ)(c) · τ^S

A sample is selected when the teacher is confident and the student still uncertain:

    selected_i = [c_i >= τ^T(y_i)] and [u_i >= τ^S(y_i)]

and its cross-entropy against y_i is weighted by both signals, normalised to mean 1 over the selection so the
learning rate keeps its meaning:

    w_i = c_i u_i / mean_{j selected} (c_j u_j)

With ``balance_classes`` (on by default in the config) the normalisation is per class, and each class then
carries the share of the loss it has among the teacher-confident samples (π(c), over [c_i >= τ^T(y_i)]), however
many of its samples the student still finds uncertain. S is the selection, S_c its members of class c:

    w_i = c_i u_i / mean_{j ∈ S_{y_i}} (c_j u_j) · π(y_i) |S| / |S_{y_i}|

Why: an epoch whose uncertain samples are mostly of one class would otherwise pull the student towards that
class (on Rotten Tomatoes, selections of 839 positive vs 195 negative samples occurred).

During ``warmup_epochs`` the student's scores are not yet informative: only the teacher criterion applies, and
the student's averages start at the first epoch after warm-up. The averages move once per epoch (FreeMatch moves
them every step), so the momentum is per epoch and much lower than FreeMatch's 0.999.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

STRATEGIES = ("llkd", "all", "random", "teacher_confidence", "student_uncertainty", "fixed_ratio")


def normalized_entropy(probs: np.ndarray) -> np.ndarray:
    """u = H(q) / log L for each row of a probability matrix [n, L]."""
    safe = np.clip(probs, 1e-12, 1.0)
    return -(probs * np.log(safe)).sum(axis=1) / np.log(probs.shape[1])


def max_norm(values: np.ndarray) -> np.ndarray:
    top = values.max()
    return values / top if top > 0 else np.ones_like(values)


def _global_statistic(values: np.ndarray, quantile: float | None) -> float:
    return float(values.mean() if quantile is None else np.quantile(values, quantile))


@dataclass
class ThresholdState:
    """The moving averages carried from epoch to epoch (saved in every checkpoint)."""

    teacher_global: float | None = None
    teacher_class: list[float] | None = None
    student_global: float | None = None
    student_class: list[float] | None = None

    def update(
        self,
        teacher_probs: np.ndarray,
        teacher_labels: np.ndarray,
        uncertainty: np.ndarray,
        momentum: float,
        student: bool = True,
        teacher_quantile: float | None = None,
        student_quantile: float | None = None,
    ):
        """Move the averages by this epoch's statistics; ``student=False`` (warm-up) leaves the student's alone:
        an untrained student is uniformly unsure, and averaging that in would hold τ^S near 1 for many epochs."""
        num_classes = teacher_probs.shape[1]
        confidence = teacher_probs[np.arange(len(teacher_labels)), teacher_labels]
        observed = {
            "teacher_global": _global_statistic(confidence, teacher_quantile),
            "teacher_class": teacher_probs.mean(axis=0),
        }
        if student:
            observed["student_global"] = _global_statistic(uncertainty, student_quantile)
            observed["student_class"] = np.array(
                [
                    uncertainty[teacher_labels == c].mean() if (teacher_labels == c).any() else np.nan
                    for c in range(num_classes)
                ]
            )
        for name, value in observed.items():
            previous = getattr(self, name)
            if previous is None:  # the first observation initialises the average, not an arbitrary prior
                new = value
            else:
                new = momentum * np.asarray(previous) + (1 - momentum) * value
            if name == "student_class":
                # A class absent from the pool keeps its previous average (or the global one).
                fallback = (
                    np.asarray(previous) if previous is not None else np.full(num_classes, observed["student_global"])
                )
                new = np.where(np.isnan(new), fallback, new)
            setattr(self, name, new.tolist() if isinstance(new, np.ndarray) else float(new))

    def thresholds(self) -> tuple[np.ndarray, np.ndarray]:
        """(τ^T(c), τ^S(c)) for every class; τ^S is 0 until the student's statistics exist (warm-up)."""
        teacher = max_norm(np.asarray(self.teacher_class)) * self.teacher_global
        if self.student_global is None:
            return teacher, np.zeros_like(teacher)
        student = max_norm(np.asarray(self.student_class)) * self.student_global
        return teacher, student


@dataclass
class PoolScores:
    """Everything selection looks at, for the whole pool, in one fixed order (global index)."""

    teacher_probs: np.ndarray  # [n, L]
    teacher_labels: np.ndarray  # [n]
    student_probs: np.ndarray  # [n, L]

    @property
    def teacher_confidence(self) -> np.ndarray:
        return self.teacher_probs[np.arange(len(self.teacher_labels)), self.teacher_labels]

    @property
    def student_uncertainty(self) -> np.ndarray:
        return normalized_entropy(self.student_probs)


@dataclass
class Selection:
    mask: np.ndarray  # [n] bool
    weights: np.ndarray  # [n] float, 0 where not selected
    teacher_thresholds: np.ndarray  # [L]
    student_thresholds: np.ndarray  # [L]
    llkd_count: int  # how many LLKD itself would select: the budget of the budget-matched baselines
    per_class: list[int] = field(default_factory=list)


def teacher_confident(scores: PoolScores, teacher_thr: np.ndarray) -> np.ndarray:
    return scores.teacher_confidence >= teacher_thr[scores.teacher_labels]


def llkd_mask(scores: PoolScores, confident: np.ndarray, student_thr: np.ndarray, warmup: bool) -> np.ndarray:
    """The LLKD selection, given the teacher-confident mask: during warm-up that mask alone."""
    if warmup:
        return confident
    return confident & (scores.student_uncertainty >= student_thr[scores.teacher_labels])


def _normalised(raw: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """raw / its mean over ``mask``, 0 elsewhere (1 on the mask when the mean is 0)."""
    mean = raw[mask].mean() if mask.any() else 0.0
    return np.where(mask, raw / mean, 0.0) if mean > 0 else mask.astype(float)


def llkd_weights(scores: PoolScores, mask: np.ndarray, confident: np.ndarray | None = None) -> np.ndarray:
    """The formulas in the module docstring; ``confident`` (the teacher-confident mask) turns on class balance."""
    raw = scores.teacher_confidence * scores.student_uncertainty
    if confident is None or not mask.any():
        return _normalised(raw, mask)
    labels, selected = scores.teacher_labels, int(mask.sum())
    weights = np.zeros(len(raw))
    for c in np.unique(labels[mask]):
        members = mask & (labels == c)
        share = (confident & (labels == c)).sum() / max(int(confident.sum()), 1)
        weights += _normalised(raw, members) * share * selected / members.sum()
    total = weights.sum()  # < |S| when a confident class has nothing selected: spread its share back
    return weights * selected / total if total > 0 else mask.astype(float)


def _top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Mask of the k largest values; ties broken by index, so the result never depends on the worker count."""
    order = np.lexsort((np.arange(len(values)), -values))
    mask = np.zeros(len(values), dtype=bool)
    mask[order[:k]] = True
    return mask


def select(
    strategy: str,
    scores: PoolScores,
    state: ThresholdState,
    *,
    momentum: float,
    warmup: bool,
    rng: np.random.Generator,
    fraction: float = 0.3,
    teacher_confidence_threshold: float | None = None,
    teacher_quantile: float | None = None,
    student_quantile: float | None = None,
    balance_classes: bool = False,
) -> Selection:
    """Update the moving averages with this epoch's scores and choose the samples to train on.

    Every strategy updates the same thresholds and reports the LLKD count, so budget-matched baselines
    (``random``, ``teacher_confidence`` without a threshold, ``student_uncertainty``) train on exactly as many
    samples as LLKD would have that epoch.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown selection strategy {strategy!r}; choose one of {STRATEGIES}")
    state.update(
        scores.teacher_probs,
        scores.teacher_labels,
        scores.student_uncertainty,
        momentum,
        student=not warmup,
        teacher_quantile=teacher_quantile,
        student_quantile=student_quantile,
    )
    teacher_thr, student_thr = state.thresholds()
    confident = teacher_confident(scores, teacher_thr)
    llkd = llkd_mask(scores, confident, student_thr, warmup)
    budget = int(llkd.sum())
    size = len(scores.teacher_labels)
    if strategy == "llkd":
        mask, weights = llkd, llkd_weights(scores, llkd, confident if balance_classes else None)
    else:
        if strategy == "all":
            mask = np.ones(size, dtype=bool)
        elif strategy == "random":
            mask = np.zeros(size, dtype=bool)
            mask[rng.choice(size, size=budget, replace=False)] = True
        elif strategy == "teacher_confidence":
            if teacher_confidence_threshold is not None:
                mask = scores.teacher_confidence >= teacher_confidence_threshold
            else:
                mask = _top_k(scores.teacher_confidence, budget)
        elif strategy == "student_uncertainty":
            mask = _top_k(scores.student_uncertainty, budget)
        else:  # fixed_ratio: the LLKD ranking (c·u) without adaptive thresholds, a fixed fraction per class
            mask = np.zeros(size, dtype=bool)
            ranking = scores.teacher_confidence * scores.student_uncertainty
            for c in range(scores.teacher_probs.shape[1]):
                members = np.flatnonzero(scores.teacher_labels == c)
                keep = int(round(fraction * len(members)))
                mask[members[_top_k(ranking[members], keep)]] = True
        weights = mask.astype(float)
    per_class = np.bincount(scores.teacher_labels[mask], minlength=scores.teacher_probs.shape[1]).tolist()
    return Selection(mask, weights, teacher_thr, student_thr, budget, per_class)
