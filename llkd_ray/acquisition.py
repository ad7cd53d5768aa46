"""Which rows the teacher labels next, under a budget: pure functions over scores, no Ray and no models.

A budget of B rows is spent as (``budget.py`` runs the rounds):

    probe   P = round(probe_fraction · B) rows drawn uniformly at random in round 0, never trained on: the
            student's agreement with the teacher on them, after each round, is the stopping rule's signal;
    seed    round 0's share of the rest, stratified over k-means clusters of the untrained student's embeddings
            (every cluster gets a row when the seed has room: largest-remainder allocation, at least one each);
    rounds  1 … R-1, the rest in equal shares. Each round quotas the rows evenly over the classes the current
            student predicts (a class it predicts for few rows gives its unused quota to the others); inside a
            class it takes the most uncertain rows (normalised entropy of the student's distribution), one cluster
            at a time in turn, so one dense region of confusing rows cannot take the whole round. With
            ``random_share`` s > 0, round(s · round size) of a round's rows are drawn uniformly from the rows the
            student's choice left: the rows a student finds hardest are where a noisy teacher is wrong most often,
            and the random share keeps buying the teacher's average rows too.

The random baseline (``labeling.acquisition=random``) spends the same rounds on uniformly drawn rows.
"""

from __future__ import annotations

import math

import numpy as np


def budget_rows(budget: float | int, candidates: int) -> int:
    """Rows the budget buys out of ``candidates`` (a fraction, or a count capped at the candidates)."""
    if isinstance(budget, int):
        return min(budget, candidates)
    return min(candidates, max(1, round(budget * candidates)))


def round_sizes(budget: int, rounds: int, probe_fraction: float) -> tuple[int, list[int]]:
    """(probe rows, training rows per round): the probe off the top, the rest split evenly, remainder to round 0."""
    probe = round(probe_fraction * budget) if budget > rounds else 0
    rest = budget - probe
    share, remainder = divmod(rest, rounds)
    return probe, [share + remainder] + [share] * (rounds - 1)


def kmeans(points: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 25) -> np.ndarray:
    """Centroids [k', d] (k' = min(k, distinct points)) by k-means++ seeding and Lloyd iterations."""
    points = np.asarray(points, dtype=np.float64)
    distinct = np.unique(points, axis=0)
    k = min(k, len(distinct))
    centroids = [points[rng.integers(len(points))]]
    closest = ((points - centroids[0]) ** 2).sum(axis=1)  # squared distance to the nearest centroid so far
    for _ in range(1, k):
        if closest.sum() == 0:
            break
        centroids.append(points[rng.choice(len(points), p=closest / closest.sum())])
        closest = np.minimum(closest, ((points - centroids[-1]) ** 2).sum(axis=1))
    centroids = np.asarray(centroids)
    for _ in range(iterations):
        assigned = nearest_centroid(points, centroids)
        moved = np.array(
            [
                points[assigned == c].mean(axis=0) if np.any(assigned == c) else centroids[c]
                for c in range(len(centroids))
            ]
        )
        if np.allclose(moved, centroids):
            break
        centroids = moved
    return centroids


def nearest_centroid(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    points, centroids = np.asarray(points, dtype=np.float64), np.asarray(centroids, dtype=np.float64)
    # |p - c|^2 = |p|^2 - 2 p·c + |c|^2, without a [n, k, d] temporary
    distance = -2 * points @ centroids.T + (centroids**2).sum(axis=1)[None, :]
    return distance.argmin(axis=1)


def stratified_seed(clusters: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` row indices spread over the clusters: one per cluster first (the largest clusters first when
    ``size`` is smaller than their number), the rest in proportion to the rows each has left (largest
    remainder); drawn at random inside each cluster."""
    clusters = np.asarray(clusters)
    names, counts = np.unique(clusters, return_counts=True)
    size = min(size, len(clusters))
    quota = np.zeros(len(names), dtype=np.int64)
    quota[np.argsort(-counts, kind="stable")[: min(size, len(names))]] = 1
    room = counts - quota
    if size > quota.sum():
        ideal = (size - quota.sum()) * room / room.sum()
        quota += np.floor(ideal).astype(np.int64)
        remainder = ideal - np.floor(ideal)
        for c in np.argsort(-remainder, kind="stable"):  # at most one more each, and only where rows are left
            if quota.sum() == size:
                break
            if quota[c] < counts[c]:
                quota[c] += 1
        for c in np.flatnonzero(quota < counts):  # float ties can leave a row short
            quota[c] += min(counts[c] - quota[c], size - quota.sum())
    chosen = [rng.choice(np.flatnonzero(clusters == name), size=q, replace=False) for name, q in zip(names, quota)]
    return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.array([], dtype=np.int64)


def normalized_entropy(probs: np.ndarray) -> np.ndarray:
    """Entropy of each distribution over its classes, divided by log(classes): 0 certain … 1 uniform."""
    probs = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1)
    return -(probs * np.log(probs)).sum(axis=1) / math.log(probs.shape[1])


def uncertain_and_diverse(
    uncertainty: np.ndarray, predicted: np.ndarray, clusters: np.ndarray, size: int, num_classes: int
) -> np.ndarray:
    """``size`` row indices: an even quota per predicted class (unused quota passed on), and inside a class the
    most uncertain rows, taking one from each cluster in turn (clusters ordered by their most uncertain row)."""
    uncertainty, predicted, clusters = np.asarray(uncertainty), np.asarray(predicted), np.asarray(clusters)
    size = min(size, len(uncertainty))
    available = np.bincount(predicted, minlength=num_classes)
    quota = np.zeros(num_classes, dtype=np.int64)
    while quota.sum() < size:  # water-filling: every class with rows left gets one more, in turn
        for c in np.flatnonzero(available > quota):
            if quota.sum() == size:
                break
            quota[c] += 1
    chosen: list[int] = []
    for c in range(num_classes):
        rows = np.flatnonzero(predicted == c)
        chosen.extend(_round_robin_over_clusters(rows, uncertainty[rows], clusters[rows], quota[c]))
    return np.sort(np.asarray(chosen, dtype=np.int64))


def student_and_random(
    uncertainty: np.ndarray,
    predicted: np.ndarray,
    clusters: np.ndarray,
    size: int,
    num_classes: int,
    random_share: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """(the student's rows, the random rows), disjoint, ``size`` in all: round(random_share · size) drawn uniformly
    from what ``uncertain_and_diverse`` left of the rest."""
    size = min(size, len(uncertainty))
    drawn = round(random_share * size)
    chosen = uncertain_and_diverse(uncertainty, predicted, clusters, size - drawn, num_classes)
    left = np.setdiff1d(np.arange(len(uncertainty)), chosen)
    return chosen, np.sort(rng.choice(left, size=drawn, replace=False)).astype(np.int64)


def _round_robin_over_clusters(rows: np.ndarray, uncertainty: np.ndarray, clusters: np.ndarray, take: int) -> list:
    queues = []
    for cluster in np.unique(clusters):
        members = np.flatnonzero(clusters == cluster)
        members = members[np.argsort(-uncertainty[members], kind="stable")]
        queues.append([(float(uncertainty[m]), int(rows[m])) for m in members])
    queues.sort(key=lambda queue: -queue[0][0])  # the cluster with the most uncertain row goes first
    taken: list[int] = []
    while len(taken) < take:
        for queue in queues:
            if queue and len(taken) < take:
                taken.append(queue.pop(0)[1])
    return taken


def agreement_stalled(previous: np.ndarray | None, current: np.ndarray, margin: float | None) -> bool:
    """The stopping rule. ``previous`` and ``current`` say, per probe row, whether the last two rounds' students
    agreed with the teacher. Stop when even the gain's upper bound (the paired gain plus one standard error)
    is under ``margin``: a small probe's noise alone does not stop the spending. ``None`` never stops."""
    if margin is None or previous is None or len(current) == 0:
        return False
    change = np.asarray(current, dtype=np.float64) - np.asarray(previous, dtype=np.float64)
    spread = change.std(ddof=1) / math.sqrt(len(change)) if len(change) > 1 else 0.0
    return change.mean() + spread < margin


def budget_note(labeling, holdout: int) -> str:
    """One line on how ``llkd run`` will spend a budget (``llkd check-config``)."""
    budget = labeling.budget
    amount = f"{budget:.0%} of the candidate rows" if isinstance(budget, float) else f"{budget} rows"
    margin = labeling.stop_margin
    chooser = labeling.acquisition
    if chooser == "student" and labeling.random_share:
        chooser += f" ({labeling.random_share:.0%} of each later round at random)"
    return (
        f"labeling budget: {amount} (the corpus less the {holdout} gold-labelled rows held out for evaluation, which"
        f" are labeled too), in {labeling.rounds} round(s) chosen by {chooser}; a probe of"
        f" {labeling.probe_fraction:.0%} of the budget is never trained on; "
        + (
            "the whole budget is spent"
            if margin is None
            else f"spending stops when a round raises the student's agreement on the probe by less than {margin:g}"
        )
    )
