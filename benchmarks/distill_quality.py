"""Distillation quality: LLKD vs every baseline selector, on the same teacher labels, seeds and trainer.

For each dataset the teacher labels the corpus once (the store is reused across runs of this script); then every
selector trains the same student with the same seeds through the same Ray Train loop, and all are evaluated on
the same gold-labelled holdout. Prints macro-F1 of the teacher and of each selector's student (mean ± std over
seeds) and the fraction of the pool each student ever trained on, and a `gold_labels` row: the same student
trained on the pool's gold labels, the most it can reach on that pool.

    python benchmarks/distill_quality.py                                  # embedded default + AG News
    python benchmarks/distill_quality.py --datasets rotten_tomatoes --seeds 0 1 2
    python benchmarks/distill_quality.py store.path=runs/pseudo_labels --seeds 0   # overrides before the options
Goals on the embedded default: LLKD ≥ teacher + 3 points and ≥ `all` + 2 points, using ≤ 30% of the pool.
A run already finished under the same name (dataset, selector, seed) is resumed from its last checkpoint and
only evaluated again, so a long matrix can be filled in over several invocations.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
STRATEGIES = ["llkd", "all", "random", "teacher_confidence", "student_uncertainty", "fixed_ratio"]
# Not a selector: `all` trained on the pool's gold labels, what this student can reach on this pool with perfect
# labels. It tells whether a goal above the teacher is within the student's reach at all.
GOLD_CEILING = "gold_labels"


def with_gold_labels(pool):
    """The pool with the teacher's columns replaced by one-hot gold labels (rows without gold keep the teacher's)."""
    import pyarrow as pa

    gold = np.asarray(pool["gold_index"].to_pylist())
    teacher = np.asarray(pool["teacher_label"].to_pylist())
    labels = np.where(gold >= 0, gold, teacher)
    probs = np.eye(len(pool["teacher_probs"][0]), dtype=np.float32)[labels]
    probs = np.where((gold >= 0)[:, None], probs, np.asarray(pool["teacher_probs"].to_pylist(), dtype=np.float32))
    pool = pool.set_column(
        pool.schema.get_field_index("teacher_probs"),
        "teacher_probs",
        pa.array(probs.tolist(), type=pa.list_(pa.float32())),
    )
    return pool.set_column(
        pool.schema.get_field_index("teacher_label"), "teacher_label", pa.array(labels, type=pa.int32())
    )


def dataset_overrides(name: str, work: Path) -> list[str]:
    store = [f"store.path={work}/pseudo_labels"]
    if name == "rotten_tomatoes":
        return store  # the embedded default, as `llkd run` uses it
    if name == "ag_news":
        task = {
            "instruction": "Classify the topic of each news article.",
            "text_prefix": "Article: ",
            "answer_prefix": "Topic:",
            "labels": [{"name": "world"}, {"name": "sports"}, {"name": "business"}, {"name": "science"}],
            "examples": [
                {"text": "Leaders of both nations met in Geneva to discuss the ceasefire.", "label": "world"},
                {"text": "The striker scored twice as the home side won the cup final.", "label": "sports"},
                {"text": "Shares fell after the company cut its profit forecast.", "label": "business"},
                {"text": "Researchers unveiled a faster chip that uses less power.", "label": "science"},
            ],
        }
        corpus = {
            "source": str(SHARED / "ag_news" / "test.csv"),
            "text_column": "description",
            "gold_column": "label",
            "gold_map": {"1": "world", "2": "sports", "3": "business", "4": "science"},
            "limit": 3000,
        }  # labelled in ~5 min; the embedded default has 5,000
        return store + [f"task={json.dumps(task)}", f"corpus={json.dumps(corpus)}"]
    raise SystemExit(f"unknown dataset {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["rotten_tomatoes", "ag_news"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=STRATEGIES + [GOLD_CEILING],
        help=f"selectors to run; {GOLD_CEILING} trains `all` on gold labels (the ceiling)",
    )
    parser.add_argument("--work", default="runs/bench_distill", help="stores, checkpoints and run directories")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="config overrides for every run, e.g. training.epochs=6 (before --seeds/--datasets)",
    )
    args = parser.parse_args()

    import ray

    from llkd_ray.config import load_config
    from llkd_ray.corpus import corpus_ids
    from llkd_ray.evaluation import evaluate
    from llkd_ray.labeling import run_labeling
    from llkd_ray.pseudo_label_store import read_labels
    from llkd_ray.training import split_pool_and_holdout, train_student

    work = Path(args.work).resolve()
    ray.init(num_cpus=os.cpu_count())
    rows = []
    for dataset in args.datasets:
        base = dataset_overrides(dataset, work) + list(args.overrides)
        cfg = load_config(None, base)
        run_labeling(cfg)
        pool, holdout = split_pool_and_holdout(read_labels(cfg, ids=corpus_ids(cfg.corpus)), cfg)
        results: dict[str, list[tuple[float, float]]] = {}
        teacher_f1 = None
        for seed in args.seeds:
            for strategy in args.strategies:
                started = time.time()
                name = f"{dataset}-{strategy}-seed{seed}"
                ceiling = strategy == GOLD_CEILING
                run_cfg = load_config(
                    None,
                    base
                    + [
                        f"selection.strategy={'all' if ceiling else strategy}",
                        f"selection.seed={seed}",
                        f"training.seed={seed}",
                        f"training.storage_path={work}/ray_results",
                        f"output.name={name}",
                        f"output.dir={work}/runs",
                        "training.strategy=ddp",
                    ],
                )
                trained = train_student(
                    run_cfg, with_gold_labels(pool) if ceiling else pool, holdout, work / "runs" / name
                )
                report = evaluate(trained.student_dir, holdout, run_cfg.task.label_names, run_cfg.student.max_length)
                teacher_f1 = report["teacher"]["macro_f1"]
                used = len(trained.used_pool_indices) / pool.num_rows
                results.setdefault(strategy, []).append((report["student"]["macro_f1"], used))
                print(
                    f"[bench] {name}: student macro-F1 {report['student']['macro_f1']:.3f}"
                    f" (teacher {teacher_f1:.3f}), pool used {used:.1%}, {time.time() - started:.0f} s",
                    flush=True,
                )
        rows.append((dataset, pool.num_rows, holdout.num_rows, teacher_f1, results))
    ray.shutdown()

    print(f"\nseeds {args.seeds}; macro-F1 on the gold-labelled holdout (mean ± std over seeds)")
    print(f"{'dataset':<17}{'selector':<21}{'macro-F1':>16}{'pool used':>11}")
    for dataset, pool_size, holdout_size, teacher_f1, results in rows:
        print(f"{dataset:<17}{'teacher':<21}{teacher_f1:>16.3f}{'':>11}   (pool {pool_size}, holdout {holdout_size})")
        for strategy, values in results.items():
            f1 = np.array([v[0] for v in values])
            used = np.mean([v[1] for v in values])
            print(f"{'':<17}{strategy:<21}{f1.mean():>10.3f} ± {f1.std():.3f}{used:>10.1%}")
        if "llkd" in results and "all" in results:
            llkd = np.mean([v[0] for v in results["llkd"]])
            print(
                f"{'':<17}LLKD - teacher: {100 * (llkd - teacher_f1):+.1f} points;"
                f" LLKD - all: {100 * (llkd - np.mean([v[0] for v in results['all']])):+.1f} points"
            )


if __name__ == "__main__":
    main()
