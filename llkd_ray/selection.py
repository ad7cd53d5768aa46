"""LLKD sample selection and weighting, and the baselines it is measured against (pure NumPy, no Ray).

Notation, for pool sample i: teacher label y_i, teacher distribution p_i, teacher confidence c_i = p_i(y_i),
student distribution q_i over L classes, student uncertainty (normalised entropy)

    u_i = -sum_c q_i(c) log q_i(c) / log L          in [0, 1]

Each epoch runs two steps, in this order, with exponential moving averages of momentum λ (FreeMatch-style
self-adaptive thresholds; the first observation initialises an average):

1. The teacher gate (``teacher_gate``), over the whole pool, which it gates:

       τ^T   <- λ τ^T   + (1-λ) Q_qT(c_i)              global teacher confidence
       p̃(c) <- λ p̃(c) + (1-λ) mean_i p_i(c)            how much of the pool the teacher gives class c
       τ^T(c) = MaxNorm(p̃)(c) · τ^T                     MaxNorm(x)(c) = x(c) / max x

   K = {i : c_i >= τ^T(y_i)} is the teacher-confident set. A class the teacher assigns less often gets a lower
   bar, as FreeMatch relaxes the classes its model has learned less. The teacher's scores never change, so after
   the first epoch K is fixed: it is known before the student scores anything, and only K is scored.

2. The student gate (``select``), over K, which it gates (the paper's τ^S is a statistic of the samples it is
   compared with; over the whole pool it sat far above K's entropies and starved the selection):

       τ^S   <- λ τ^S   + (1-λ) Q_qS(u_i : i ∈ K)       global student uncertainty on K
       ũ(c)  <- λ ũ(c)  + (1-λ) mean(u_i : i ∈ K, y_i = c)
       τ^S(c) = MaxNorm(1 - ũ)(c) · τ^S

   1 - ũ(c) is how well the student has learned class c. The class it has learned best gets the full bar and
   a class it has learned less a lower one, so more of that class's samples count as informative (FreeMatch's
   direction; MaxNorm(ũ), used before, gave the best-learned class the lowest bar).

   Q_q is the q-quantile (``teacher_quantile``/``student_quantile``; None means the mean, as in FreeMatch).

A sample is selected when the teacher is confident and the student still uncertain:

    S = {i ∈ K : u_i >= τ^S(y_i)}

and no epoch trains on a handful of samples: when |S| < ``min_fraction`` · n, S is topped up from K \\ S by
the highest c_i u_i (all of K when K itself is that small). The cross-entropy of a selected sample against y_i
is weighted by both signals, normalised to mean 1 over S so the learning rate keeps its meaning:

    w_i = c_i u_i / mean_{j ∈ S} (c_j u_j)

With ``balance_classes`` the normalisation is per class, and each class carries the share of the loss it has in
K (π(c)), however many of its samples the student still finds uncertain (S_c: members of S of class c):

    w_i = c_i u_i / mean_{j ∈ S_{y_i}} (c_j u_j) · π(y_i) |S| / |S_{y_i}|

The ``llkd_soft`` selector (SoftMatch-style) keeps all of K and weights each sample by the student's need
instead of cutting at τ^S: with μ, σ² the moving mean and variance of u over K,

    w_i ∝ c_i · g(u_i),     g(u) = 1 if u >= μ, else exp(-(u - μ)² / (2σ²))

(normalised and class-balanced as above).

During ``warmup_epochs`` the student's scores are not yet informative: S = K, and the student's averages start
at the first epoch after warm-up. The averages move once per epoch, not per step as in FreeMatch and the paper's
τ_t: the selection is recomputed once per epoch from a full scoring pass, so the momentum is per epoch (0.5,
not FreeMatch's 0.999 per step). With 0.5 the student bar lags a student that grows more certain every epoch,
and S shrinks to the ``min_fraction`` floor after two or three epochs; 0 (this epoch's statistics alone) kept S
at about half of K, but was 1.3 macro-F1 points lower on the benchmark's dev split (3 seeds), so the lag stays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from llkd_ray.config import SelectionConfig


def normalized_entropy(probs: np.ndarray) -> np.ndarray:
    """u = H(q) / log L for each row of a probability matrix [n, L]."""
    safe = np.clip(probs, 1e-12, 1.0)
    return -(probs * np.log(safe)).sum(axis=1) / np.log(probs.shape[1])


def max_norm(values: np.ndarray) -> np.ndarray:
    top = values.max()
    return values / top if top > 0 else np.ones_like(values)


def _global_statistic(values: np.ndarray, quantile: float | None) -> float:
    return float(values.mean() if quantile is None else np.quantile(values, quantile))


def _moved(previous, observed, momentum: float):
    """The moving average; the first observation initialises it."""
    if previous is None:
        return observed
    return momentum * np.asarray(previous) + (1 - momentum) * np.asarray(observed)


def _stored(value):
    return np.asarray(value).tolist() if np.ndim(value) else float(value)


@dataclass
class ThresholdState:
    """The moving averages carried from epoch to epoch (saved in every checkpoint)."""

    teacher_global: float | None = None
    teacher_class: list[float] | None = None
    student_global: float | None = None
    student_class: list[float] | None = None
    student_mean: float | None = None  # llkd_soft: μ and σ² of u over K
    student_var: float | None = None

    def update_teacher(self, teacher_probs: np.ndarray, confidence: np.ndarray, momentum: float, quantile) -> None:
        self.teacher_global = _stored(_moved(self.teacher_global, _global_statistic(confidence, quantile), momentum))
        self.teacher_class = _stored(_moved(self.teacher_class, teacher_probs.mean(axis=0), momentum))

    def update_student(
        self, uncertainty: np.ndarray, labels: np.ndarray, num_classes: int, momentum: float, quantile
    ) -> None:
        """``uncertainty`` and ``labels`` of the samples the student gate applies to (K)."""
        if len(uncertainty) == 0:
            return  # nothing to observe: the averages stay where they were
        per_class = np.array(
            [uncertainty[labels == c].mean() if (labels == c).any() else np.nan for c in range(num_classes)]
        )
        observed_global = _global_statistic(uncertainty, quantile)
        previous_class = self.student_class
        self.student_global = _stored(_moved(self.student_global, observed_global, momentum))
        moved = _moved(previous_class, per_class, momentum)
        # A class with no sample in K keeps its previous average (or the global one).
        fallback = np.asarray(previous_class) if previous_class is not None else np.full(num_classes, observed_global)
        self.student_class = _stored(np.where(np.isnan(moved), fallback, moved))
        self.student_mean = _stored(_moved(self.student_mean, uncertainty.mean(), momentum))
        self.student_var = _stored(_moved(self.student_var, uncertainty.var(), momentum))

    def thresholds(self) -> tuple[np.ndarray, np.ndarray]:
        """(τ^T(c), τ^S(c)) for every class; τ^S is 0 until the student's statistics exist (warm-up)."""
        teacher = max_norm(np.asarray(self.teacher_class)) * self.teacher_global
        if self.student_global is None:
            return teacher, np.zeros_like(teacher)
        learned = 1.0 - np.asarray(self.student_class)
        return teacher, max_norm(learned) * self.student_global


@dataclass
class PoolScores:
    """Everything selection looks at, for the whole pool, in one fixed order (global index). Rows the student
    did not score (outside K, for selectors that look only at K) hold NaN in ``student_probs``."""

    teacher_probs: np.ndarray  # [n, L]
    teacher_labels: np.ndarray  # [n]
    student_probs: np.ndarray  # [n, L]

    @property
    def teacher_confidence(self) -> np.ndarray:
        return self.teacher_probs[np.arange(len(self.teacher_labels)), self.teacher_labels]

    @property
    def student_uncertainty(self) -> np.ndarray:
        return normalized_entropy(self.student_probs)

    @property
    def num_classes(self) -> int:
        return self.teacher_probs.shape[1]


@dataclass
class Selection:
    mask: np.ndarray  # [n] bool
    weights: np.ndarray  # [n] float, 0 where not selected
    teacher_thresholds: np.ndarray  # [L]
    student_thresholds: np.ndarray  # [L]
    llkd_count: int  # how many LLKD itself would select: the budget of the budget-matched baselines
    per_class: list[int] = field(default_factory=list)


@dataclass
class EpochInputs:
    """What a selector sees in one epoch."""

    scores: PoolScores
    confident: np.ndarray  # K
    llkd: np.ndarray  # the LLKD selection S (floor applied)
    state: ThresholdState
    cfg: SelectionConfig
    warmup: bool
    rng: np.random.Generator


@dataclass(frozen=True)
class Selector:
    """One selection strategy: which samples it trains on and with what weights, and which rows the student
    must score for it ("confident": K only; "all": the whole pool)."""

    choose: Callable[[EpochInputs], tuple[np.ndarray, np.ndarray]]
    scores: Literal["confident", "all"]
    summary: str


def teacher_gate(scores_teacher_probs: np.ndarray, labels: np.ndarray, state: ThresholdState, cfg: SelectionConfig):
    """Step 1 (module docstring): move the teacher's averages and return K, the teacher-confident mask."""
    confidence = scores_teacher_probs[np.arange(len(labels)), labels]
    state.update_teacher(scores_teacher_probs, confidence, cfg.momentum, cfg.teacher_quantile)
    teacher_thr, _ = state.thresholds()
    return confidence >= teacher_thr[labels]


def rows_to_score(strategy: str, confident: np.ndarray) -> np.ndarray:
    """The rows the student must score this epoch for ``strategy``."""
    if selector(strategy).scores == "all":
        return np.ones(len(confident), dtype=bool)
    return confident


def _student_gate(scores: PoolScores, confident: np.ndarray, state: ThresholdState, cfg, warmup: bool) -> np.ndarray:
    """Step 2 (module docstring): move the student's averages over K and return S (floor applied)."""
    labels = scores.teacher_labels
    if warmup:
        return confident.copy()
    uncertainty = scores.student_uncertainty
    state.update_student(
        uncertainty[confident], labels[confident], scores.num_classes, cfg.momentum, cfg.student_quantile
    )
    _, student_thr = state.thresholds()
    with np.errstate(invalid="ignore"):  # NaN outside K: never selected
        mask = confident & (uncertainty >= student_thr[labels])
    floor = int(np.ceil(cfg.min_fraction * len(labels)))
    if mask.sum() < floor:
        candidates = np.flatnonzero(confident & ~mask)
        ranking = (scores.teacher_confidence * uncertainty)[candidates]
        mask[candidates[_top_k(ranking, floor - int(mask.sum()))]] = True
    return mask


def _normalised(raw: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """raw / its mean over ``mask``, 0 elsewhere (1 on the mask when the mean is 0)."""
    mean = raw[mask].mean() if mask.any() else 0.0
    return np.where(mask, raw / mean, 0.0) if mean > 0 else mask.astype(float)


def class_balanced_weights(raw: np.ndarray, labels: np.ndarray, mask: np.ndarray, confident: np.ndarray):
    """The class-balanced weights of the module docstring for any raw per-sample score."""
    if not mask.any():
        return mask.astype(float)
    selected = int(mask.sum())
    weights = np.zeros(len(raw))
    for c in np.unique(labels[mask]):
        members = mask & (labels == c)
        share = (confident & (labels == c)).sum() / max(int(confident.sum()), 1)
        weights += _normalised(raw, members) * share * selected / members.sum()
    total = weights.sum()  # < |S| when a confident class has nothing selected: spread its share back
    return weights * selected / total if total > 0 else mask.astype(float)


def llkd_weights(scores: PoolScores, mask: np.ndarray, confident: np.ndarray | None = None) -> np.ndarray:
    """w_i of the module docstring; ``confident`` (K) turns on class balance."""
    raw = np.nan_to_num(scores.teacher_confidence * scores.student_uncertainty)
    if confident is None:
        return _normalised(raw, mask)
    return class_balanced_weights(raw, scores.teacher_labels, mask, confident)


def soft_need(uncertainty: np.ndarray, mean: float, var: float) -> np.ndarray:
    """g(u) of the module docstring: 1 at or above the mean uncertainty, a Gaussian fall-off below it."""
    gap = np.minimum(np.nan_to_num(uncertainty) - mean, 0.0)
    return np.exp(-(gap**2) / (2 * max(var, 1e-8)))


def _top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Mask of the k largest values; ties broken by index, so the result never depends on the worker count."""
    order = np.lexsort((np.arange(len(values)), -np.nan_to_num(values, nan=-np.inf)))
    mask = np.zeros(len(values), dtype=bool)
    mask[order[: max(k, 0)]] = True
    return mask


# ---- the selectors ----------------------------------------------------------------------------------------------
def _llkd(e: EpochInputs):
    return e.llkd, llkd_weights(e.scores, e.llkd, e.confident if e.cfg.balance_classes else None)


def _llkd_soft(e: EpochInputs):
    mask = e.confident
    if e.warmup or e.state.student_mean is None:
        need = np.ones(len(mask))
    else:
        need = soft_need(e.scores.student_uncertainty, e.state.student_mean, e.state.student_var)
    raw = e.scores.teacher_confidence * need
    if e.cfg.balance_classes:
        return mask, class_balanced_weights(raw, e.scores.teacher_labels, mask, e.confident)
    return mask, _normalised(raw, mask)


def _all(e: EpochInputs):
    mask = np.ones(len(e.confident), dtype=bool)
    return mask, mask.astype(float)


def _random(e: EpochInputs):
    size = len(e.confident)
    mask = np.zeros(size, dtype=bool)
    mask[e.rng.choice(size, size=int(e.llkd.sum()), replace=False)] = True
    return mask, mask.astype(float)


def _teacher_confidence(e: EpochInputs):
    if e.cfg.teacher_confidence_threshold is not None:
        mask = e.scores.teacher_confidence >= e.cfg.teacher_confidence_threshold
    else:
        mask = _top_k(e.scores.teacher_confidence, int(e.llkd.sum()))
    return mask, mask.astype(float)


def _student_uncertainty(e: EpochInputs):
    mask = _top_k(e.scores.student_uncertainty, int(e.llkd.sum()))
    return mask, mask.astype(float)


def _fixed_ratio(e: EpochInputs):
    mask = np.zeros(len(e.confident), dtype=bool)
    ranking = e.scores.teacher_confidence * e.scores.student_uncertainty
    for c in range(e.scores.num_classes):
        members = np.flatnonzero(e.scores.teacher_labels == c)
        mask[members[_top_k(ranking[members], int(round(e.cfg.fraction * len(members))))]] = True
    return mask, mask.astype(float)


SELECTORS: dict[str, Selector] = {
    "llkd": Selector(_llkd, "confident", "teacher-confident and student-uncertain, weighted by c·u (the paper)"),
    "llkd_soft": Selector(_llkd_soft, "confident", "every teacher-confident sample, weighted by the student's need"),
    "all": Selector(_all, "confident", "every pool sample, weight 1"),
    "random": Selector(_random, "confident", "as many random samples as LLKD selects"),
    "teacher_confidence": Selector(_teacher_confidence, "confident", "LLKD's count of most confident teacher labels"),
    "student_uncertainty": Selector(_student_uncertainty, "all", "LLKD's count of most uncertain student scores"),
    "fixed_ratio": Selector(_fixed_ratio, "all", "a fixed fraction of each class, ranked by c·u"),
}


def selector(strategy: str) -> Selector:
    if strategy not in SELECTORS:
        raise ValueError(f"unknown selection strategy {strategy!r}; choose one of {tuple(SELECTORS)}")
    return SELECTORS[strategy]


def select(
    cfg: SelectionConfig,
    scores: PoolScores,
    state: ThresholdState,
    confident: np.ndarray,
    *,
    warmup: bool,
    rng: np.random.Generator,
) -> Selection:
    """Step 2, then the configured selector's choice. ``confident`` is what ``teacher_gate`` returned this epoch.

    Every strategy updates the same thresholds and reports the LLKD count, so budget-matched baselines
    (``random``, ``teacher_confidence`` without a threshold, ``student_uncertainty``) train on exactly as many
    samples as LLKD would have that epoch.
    """
    choose = selector(cfg.strategy).choose
    llkd = _student_gate(scores, confident, state, cfg, warmup)
    mask, weights = choose(EpochInputs(scores, confident, llkd, state, cfg, warmup, rng))
    teacher_thr, student_thr = state.thresholds()
    per_class = np.bincount(scores.teacher_labels[mask], minlength=scores.num_classes).tolist()
    return Selection(mask, weights, teacher_thr, student_thr, int(llkd.sum()), per_class)
