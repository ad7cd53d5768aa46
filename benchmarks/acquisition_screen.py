"""Acquisition screen: which teacher-budget settings deserve a full ``teacher_budget.py`` run, in minutes.

``teacher_budget.py`` trains a real student every round, ~14 min a run here, so one comparison over five datasets
and three seeds takes a day of this machine. This screen keeps everything of a budgeted run but the student:

- the library's own choices (``llkd_ray.acquisition``): the budget's rows, the probe (drawn, never trained on),
  the round-0 seed stratified over k-means clusters of the untrained encoder's embeddings, and each later round's
  uncertain-and-diverse choice with its ``random_share``; the ``random`` arm draws every round uniformly;
- distill_quality's datasets, stored teacher labels, pools and dev rows (dev only: the screen is for decisions);
- the student replaced by a **proxy**: logistic regression on the frozen encoder's mean-pooled embeddings (the
  student's starting point, computed once by the library's ``StudentScorer``), trained on the teacher's labels of
  the rows bought so far. Its uncertainty picks the next round's rows;
- ``--candidates``: arms the library does not have yet, screened before anyone builds them at scale. ``typical``
  (TypiClust, Hacohen et al. 2022): every round, k-means with k = the round's size over the rows still free, and
  the densest row of each cluster, on the frozen embeddings (round 0 too); the probe is drawn as for the others.

What it cannot show: a fine-tuned student's uncertainty and the LLKD recipe's selection inside each round differ
from the proxy's, and the clusters stay those of the frozen encoder. A setting that wins here is a candidate for
``teacher_budget.py``, not a result. Prints, per dataset, the proxy's dev macro-F1 with every arm (mean and 95%
CI over seeds) and on the whole pool, each arm minus ``random`` paired by seed, and that difference averaged over
the datasets.

    python benchmarks/acquisition_screen.py                      # five datasets, 10 seeds, shares 0 and 0.5, typical
    python benchmarks/acquisition_screen.py --random-shares 0 0.25 0.5 0.75 labeling.rounds=4
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distill_quality as dq  # noqa: E402  (the shared datasets, splits and statistics)

log = logging.getLogger("llkd_ray.benchmarks")
PROXY_C = 10.0  # inverse L2 strength; embeddings are unit-length, so sklearn's default of 1 underfits


def proxy_student(x: np.ndarray, labels: np.ndarray, num_classes: int):
    """A function embeddings → class probabilities [n, num_classes], fitted on (x, labels)."""
    from sklearn.linear_model import LogisticRegression

    present = np.unique(labels)
    if len(present) == 1:  # one class bought so far: certain of it everywhere
        return lambda z: np.eye(num_classes)[np.full(len(z), present[0])]
    model = LogisticRegression(C=PROXY_C, max_iter=500).fit(x, labels)

    def predict(z: np.ndarray) -> np.ndarray:
        probs = np.full((len(z), num_classes), 1e-9)
        probs[:, model.classes_] = model.predict_proba(z)
        return probs / probs.sum(axis=1, keepdims=True)

    return predict


def embed(scorer, table) -> np.ndarray:
    """The untrained student's L2-normalised mean-pooled embeddings, as round 0 of a budgeted run computes them
    (``scorer``: the library's ``StudentScorer`` for the base encoder)."""
    import pyarrow as pa

    rows = table.num_rows
    batch = pa.table({"key": table["id"], "id": table["id"], "text": table["text"]})
    parts = [scorer(batch.slice(start, 256))["embedding"].to_pylist() for start in range(0, rows, 256)]
    return np.asarray([e for part in parts for e in part], dtype=np.float64)


def bought_rows(data: dict, labeling, arm: str, share: float, seed: int) -> np.ndarray:
    """The training rows (probe excluded) a budgeted run with this arm buys, round by round."""
    from llkd_ray import acquisition

    x, teacher = data["pool_x"], data["teacher_label"]
    n, num_classes = len(x), data["num_classes"]
    probe_size, sizes = acquisition.round_sizes(
        acquisition.budget_rows(labeling.budget, n), labeling.rounds, labeling.probe_fraction
    )
    rng = np.random.default_rng([seed, 0])
    free = np.setdiff1d(np.arange(n), rng.choice(n, size=probe_size, replace=False))
    if arm == "random":
        return np.sort(rng.choice(free, size=min(sum(sizes), len(free)), replace=False))
    if arm == "typical":
        return typical_rounds(x, free, sizes, seed)
    centroids = acquisition.kmeans(x[free], labeling.clusters, rng)
    clusters = acquisition.nearest_centroid(x, centroids)
    bought = free[acquisition.stratified_seed(clusters[free], sizes[0], rng)]
    for round_index, size in enumerate(sizes[1:], start=1):
        student = proxy_student(x[bought], teacher[bought], num_classes)
        free = np.setdiff1d(free, bought)
        probs = student(x[free])
        chosen, drawn = acquisition.student_and_random(
            acquisition.normalized_entropy(probs),
            probs.argmax(axis=1),
            clusters[free],
            size,
            num_classes,
            share,
            np.random.default_rng([seed, round_index]),
        )
        bought = np.concatenate([bought, free[chosen], free[drawn]])
    return np.sort(bought)


def typicality(x: np.ndarray, neighbours: int = 20) -> np.ndarray:
    """Mean cosine similarity of each (unit-length) row to its nearest ``neighbours`` other rows: high in dense
    regions (TypiClust's typicality, Hacohen et al. 2022, with cosine similarity for its inverse distance)."""
    result = np.empty(len(x))
    for start in range(0, len(x), 1024):
        similarity = x[start : start + 1024] @ x.T
        similarity[np.arange(len(similarity)), np.arange(start, start + len(similarity))] = -np.inf  # not itself
        result[start : start + 1024] = -np.sort(-similarity, axis=1)[:, :neighbours].mean(axis=1)
    return result


def typical_rounds(x: np.ndarray, free: np.ndarray, sizes: list[int], seed: int) -> np.ndarray:
    """Candidate, not in the library: every round k-means with k = the round's size over the rows still free, and
    the most typical row of each cluster (TypiClust); rows short of a cluster each go to the most typical left."""
    from llkd_ray import acquisition

    typical = typicality(x)
    bought = np.array([], dtype=np.int64)
    for round_index, size in enumerate(sizes):
        left = np.setdiff1d(free, bought)
        centroids = acquisition.kmeans(x[left], size, np.random.default_rng([seed, round_index]), iterations=10)
        assigned = acquisition.nearest_centroid(x[left], centroids)
        picked = [left[members[np.argmax(typical[left][members])]] for members in _members(assigned)]
        rest = np.setdiff1d(left, picked)
        picked += list(rest[np.argsort(-typical[rest], kind="stable")][: size - len(picked)])
        bought = np.concatenate([bought, np.asarray(picked, dtype=np.int64)])
    return np.sort(bought)


def _members(assigned: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(assigned == cluster) for cluster in np.unique(assigned)]


def dev_f1(data: dict, rows: np.ndarray) -> float:
    from llkd_ray.metrics import classification_report

    student = proxy_student(data["pool_x"][rows], data["teacher_label"][rows], data["num_classes"])
    predicted = student(data["dev_x"]).argmax(axis=1)
    return classification_report(data["dev_gold"], predicted, list(range(data["num_classes"])))["macro_f1"]


def load_dataset(name: str, work: Path, overrides: list[str]):
    from llkd_ray.config import load_config
    from llkd_ray.labeling import run_labeling
    from llkd_ray.student_scoring import StudentScorer

    spec = yaml.safe_load((dq.DATASETS / f"{name}.yaml").read_text())
    cfg = load_config(None, dq.corpus_overrides(spec, work) + ["labeling.budget=0.3"] + overrides)
    run_labeling(cfg)  # a no-op once distill_quality has labeled the corpus
    _, pool, dev, _ = dq.stored_splits(cfg)
    scorer = StudentScorer(cfg, cfg.student.model)  # loaded once for the pool and dev rows
    data = {
        "pool_x": embed(scorer, pool),
        "teacher_label": np.asarray(pool["teacher_label"].to_pylist()),
        "dev_x": embed(scorer, dev),
        "dev_gold": np.asarray(dev["gold_index"].to_pylist()),
        "num_classes": len(cfg.task.labels),
    }
    return cfg, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    available = sorted(p.stem for p in dq.DATASETS.glob("*.yaml"))
    parser.add_argument("--datasets", nargs="+", default=available, choices=available)
    parser.add_argument("--seeds", nargs="+", type=int, default=list(range(10)))
    parser.add_argument("--random-shares", nargs="+", type=float, default=[0.0, 0.5])
    parser.add_argument(
        "--candidates", nargs="*", default=["typical"], choices=["typical"], help="arms the library does not have yet"
    )
    parser.add_argument("--work", default="runs/bench_distill", help="distill_quality's work directory (its store)")
    parser.add_argument("--out", default=str(dq.RESULTS / "acquisition_screen.json"))
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. labeling.budget=0.2 labeling.rounds=4")
    args = dq.parse_args_with_overrides(parser)

    import ray

    from llkd_ray.console import console

    work = Path(args.work).resolve()
    shares = {f"student, random_share {share:g}": share for share in args.random_shares}
    arms = ["random", *shares, *args.candidates]
    runs = []
    with console(work / "acquisition_screen.log"):
        ray.init(num_cpus=os.cpu_count())
        for dataset in args.datasets:
            cfg, data = load_dataset(dataset, work, list(args.overrides))
            whole_pool = dev_f1(data, np.arange(len(data["pool_x"])))
            for seed in args.seeds:
                for arm in arms:
                    kind = "student" if arm in shares else arm
                    rows = bought_rows(data, cfg.labeling, kind, shares.get(arm, 0.0), seed)
                    runs.append(
                        {
                            "dataset": dataset,
                            "selector": arm,
                            "seed": seed,
                            "dev_macro_f1": dev_f1(data, rows),  # test is never looked at: the screen decides
                            "rows": len(rows),
                            "whole_pool_dev_macro_f1": whole_pool,
                        }
                    )
            log.info("%s: %d runs screened", dataset, len(args.seeds) * len(arms))
        ray.shutdown()
    summary = summarise(runs, arms, args.datasets)
    summary.update(machine=f"{os.cpu_count()} CPU cores, {sys.platform}", overrides=list(args.overrides), runs=runs)
    print_summary(summary, arms)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"\nresults: {out}")


def summarise(runs: list[dict], arms: list[str], datasets: list[str]) -> dict:
    summary = {"datasets": {}, "averaged_over_datasets": {}}
    for dataset in datasets:
        entry = {"whole_pool": next(r["whole_pool_dev_macro_f1"] for r in runs if r["dataset"] == dataset)}
        random_rows = dq.by_seed(runs, dataset, "random", "dev_macro_f1")
        for arm in arms:
            mine = dq.by_seed(runs, dataset, arm, "dev_macro_f1")
            mean, ci = dq.mean_ci(list(mine.values()))
            entry[arm] = {"dev": mean, "ci95": ci, "minus_random": dq.paired(mine, random_rows)}
        summary["datasets"][dataset] = entry
    for arm in arms[1:]:  # per seed the mean over datasets of arm − random, then its CI over the seeds
        averaged = dq.averaged_over_datasets(runs, datasets, arm, "random", splits=("dev",))
        summary["averaged_over_datasets"][arm] = averaged["dev"]
    return summary


def print_summary(summary: dict, arms: list[str]) -> None:
    width = max(24, *(len(arm) + 2 for arm in arms))  # a cell: "0.123±0.012 (+1.2±3.4)" fits in 24
    print(f"\nproxy student dev macro-F1 (mean ± 95% CI over seeds); minus random, paired by seed\n{'':16}", end="")
    print(f"{'whole pool':>12}" + "".join(f"{arm:>{width}}" for arm in arms))
    for dataset, entry in summary["datasets"].items():
        cells = []
        for arm in arms:
            s = entry[arm]
            d = s["minus_random"]
            diff = "" if arm == "random" else f" ({100 * d['difference']:+.1f}±{100 * d['ci95']:.1f})"
            cells.append(f"{s['dev']:.3f}±{s['ci95']:.3f}{diff}")
        print(f"{dataset:16}{entry['whole_pool']:>12.3f}" + "".join(f"{c:>{width}}" for c in cells))
    for arm, d in summary["averaged_over_datasets"].items():
        print(
            f"{arm} − random, averaged over the datasets: {100 * d['difference']:+.1f} ± {100 * d['ci95']:.1f}"
            f" points (dev, {len(d['seeds'])} seeds)"
        )


if __name__ == "__main__":
    main()
