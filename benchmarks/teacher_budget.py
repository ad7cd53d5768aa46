"""Teacher budget: a student trained on labels bought in rounds it chose, against the same budget spent on random
rows and against LLKD with the whole pool labeled.

The datasets, corpora, label store, held-out rows and dev/test split are distill_quality.py's (the same YAML files
under benchmarks/datasets/). For each dataset and seed:

- ``full``: LLKD on the whole pool, every row labeled (distill_quality's ``llkd`` run, reused from its results
  when its fingerprint matches, or read from ``--full-results`` files that distill_quality wrote);
- ``student``: ``labeling.budget`` of the pool bought in ``labeling.rounds`` rounds the student chooses;
- ``random``: the same budget and rounds, spent on uniformly drawn rows.

Every arm trains with the same recipe (the LLKD defaults) and is scored on the same dev and test rows. The
benchmark spends the whole budget (``labeling.stop_margin=null``) so that both budgeted arms buy the same number of
rows; it also reports where the stopping rule would have stopped and what that round's student scored. The
teacher labels come from the shared store, so a budgeted run costs no teacher calls here: its "teacher calls" are
the rows it bought, which is what it would have paid on a fresh store.

    python benchmarks/teacher_budget.py                                # rotten_tomatoes ag_news trec, seeds 0 1 2
    python benchmarks/teacher_budget.py --full-results benchmarks/results/round7/*llkd-teacher_quantile0.5-soft*
    python benchmarks/teacher_budget.py labeling.budget=0.2 --datasets trec    # overrides anywhere, for every run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distill_quality as dq  # noqa: E402  (the shared datasets, splits, statistics and fingerprint)

log = logging.getLogger("llkd_ray.benchmarks")
ARMS = ("student", "random")


def run_budgeted(spec, base, dev, test, arm: str, seed: int, work: Path, code: str, cached_only=False) -> dict | None:
    from llkd_ray.acquisition import agreement_stalled
    from llkd_ray.budget import run_budget
    from llkd_ray.config import load_config
    from llkd_ray.evaluation import evaluate

    overrides = base + [
        f"labeling.acquisition={arm}",
        f"labeling.seed={seed}",
        f"selection.seed={seed}",
        f"training.seed={seed}",
        "labeling.stop_margin=null",
        f"training.storage_path={work}/ray_results",
        f"output.dir={work}/runs",
        "training.strategy=ddp",
    ]
    cfg = load_config(None, overrides)
    fingerprint = hashlib.sha256(
        json.dumps([code, cfg.model_dump(mode="json"), spec, "budget", arm, seed], sort_keys=True).encode()
    ).hexdigest()[:16]
    result_file = work / "budget_results" / f"{fingerprint}.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    if cached_only:
        return None
    name = f"{spec['name']}-budget-{arm}-seed{seed}-{fingerprint[:8]}"
    cfg = load_config(None, overrides + [f"output.name={name}"])
    run_dir = work / "runs" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    budget = run_budget(cfg, run_dir, evaluation_rows=lambda holdout: dev)
    names = cfg.task.label_names
    rounds, teacher = [], None
    for r in budget.rounds:  # every round's student on dev and test: the curve against teacher calls
        on_dev, on_test = (
            evaluate(Path(r["student_dir"]), rows, names, cfg.student.max_length) for rows in (dev, test)
        )
        teacher = on_test["teacher"]["macro_f1"]
        rounds.append(
            {
                "round": r["round"],
                "acquired_rows": r["acquired_rows"],
                "trained_rows": r["trained_rows"],
                "probe_agreement": r["probe_agreement"],
                "dev_macro_f1": on_dev["student"]["macro_f1"],
                "test_macro_f1": on_test["student"]["macro_f1"],
            }
        )
    stop_after = next(
        (
            i
            for i in range(1, len(budget.rounds))
            if agreement_stalled(budget.rounds[i - 1]["probe_agreed"], budget.rounds[i]["probe_agreed"], 0.005)
        ),
        None,
    )
    result = {
        "dataset": spec["name"],
        "arm": arm,
        "seed": seed,
        "test_macro_f1": rounds[-1]["test_macro_f1"],
        "dev_macro_f1": rounds[-1]["dev_macro_f1"],
        "teacher_test_macro_f1": teacher,
        "pool_rows": budget.summary["candidate_rows"],
        "calls_fraction": budget.summary["acquired_rows"] / budget.summary["candidate_rows"],
        "rounds": rounds,
        # The stopping rule at its default margin, read off the same run: where it would have stopped.
        "rule_stops_after_round": stop_after,
        "seconds": round(time.time() - started, 1),
        "fingerprint": fingerprint,
    }
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(result, indent=2))
    for r in range(len(budget.rounds)):
        shutil.rmtree(work / "ray_results" / f"{name}-round-{r:02d}", ignore_errors=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def full_reference(files: list[str]) -> dict:
    """(dataset, seed) → distill_quality's llkd result, from its result files."""
    found = {}
    for path in files:
        for run in json.loads(Path(path).read_text()).get("runs", []):
            if run["selector"] == "llkd":
                found[(run["dataset"], run["seed"])] = run
    return found


def summarise(results: list[dict]) -> dict:
    summary: dict = {"datasets": {}}
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        rows = [r for r in results if r["dataset"] == dataset]
        entry: dict = {"teacher_test_macro_f1": rows[0]["teacher_test_macro_f1"], "arms": {}}
        for arm in ("full", *ARMS):
            mine = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["seed"])
            if not mine:
                continue
            mean, ci = dq.mean_ci([r["test_macro_f1"] for r in mine])
            entry["arms"][arm] = {
                "test_macro_f1": mean,
                "test_ci95": ci,
                "dev_macro_f1": float(np.mean([r["dev_macro_f1"] for r in mine])),
                "calls_fraction": float(np.mean([r["calls_fraction"] for r in mine])),
                "test_by_seed": {r["seed"]: r["test_macro_f1"] for r in mine},
            }
        arms = entry["arms"]
        for mine, other in (("student", "full"), ("student", "random")):
            if mine in arms and other in arms:
                a, b = arms[mine]["test_by_seed"], arms[other]["test_by_seed"]
                diff, ci = dq.mean_ci([a[s] - b[s] for s in a if s in b])
                entry[f"{mine}_minus_{other}"] = {"test_difference": diff, "ci95": ci}
        summary["datasets"][dataset] = entry
    # The two goals, read off the table: within 0.5 points of `full` on >= 2 datasets with <= 30% of the
    # calls, and student-chosen rounds >= 2 points above random ones on average.
    entries = summary["datasets"].values()
    near_full = [
        d
        for d, e in summary["datasets"].items()
        if "student_minus_full" in e
        and e["student_minus_full"]["test_difference"] >= -0.005
        and round(e["arms"]["student"]["calls_fraction"], 3) <= 0.3  # a budget of round(0.3 · pool) rows
    ]
    over_random = [e["student_minus_random"]["test_difference"] for e in entries if "student_minus_random" in e]
    summary["goals"] = {
        "datasets_within_half_a_point_of_full": near_full,
        "student_minus_random_average": float(np.mean(over_random)) if over_random else None,
    }
    return summary


def print_summary(summary: dict) -> None:
    print(f"\n{'dataset':<16}{'arm':<10}{'test macro-F1':>20}{'dev':>8}{'teacher calls':>15}")
    for dataset, entry in summary["datasets"].items():
        print(f"{dataset:<16}{'teacher':<10}{entry['teacher_test_macro_f1']:>20.3f}")
        for arm, s in entry["arms"].items():
            ci = "" if np.isnan(s["test_ci95"]) else f" ± {s['test_ci95']:.3f}"
            print(
                f"{'':<16}{arm:<10}{s['test_macro_f1']:>12.3f}{ci:>8}{s['dev_macro_f1']:>8.3f}{s['calls_fraction']:>14.1%}"
            )
        for key in ("student_minus_full", "student_minus_random"):
            if key in entry:
                d = entry[key]
                print(
                    f"{'':<16}{key}: {100 * d['test_difference']:+.1f} points (95% CI ± {100 * d['ci95']:.1f}, paired)"
                )
    goals = summary["goals"]
    average = goals["student_minus_random_average"]
    print(
        "\nwithin 0.5 points of LLKD on the whole pool, with <= 30% of the calls: "
        + f"{goals['datasets_within_half_a_point_of_full']}"
        + ("" if average is None else f"; student-chosen minus random rounds, averaged: {100 * average:+.1f} points")
    )


def plot(results: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(summary["datasets"])
    figure, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.6), squeeze=False)
    for axis, dataset in zip(axes[0], datasets):
        for arm, color in (("student", "tab:blue"), ("random", "tab:orange")):
            runs = [r for r in results if r["dataset"] == dataset and r["arm"] == arm]
            if not runs:
                continue
            calls = np.cumsum([x["acquired_rows"] for x in runs[0]["rounds"]]) / runs[0]["pool_rows"]
            f1 = np.mean([[x["test_macro_f1"] for x in r["rounds"]] for r in runs], axis=0)
            axis.plot(calls, f1, marker="o", color=color, label=f"{arm}-chosen rounds")
        full = summary["datasets"][dataset]["arms"].get("full")
        if full:
            axis.axhline(full["test_macro_f1"], color="black", linestyle=":", label="LLKD, every row labeled")
        axis.axhline(
            summary["datasets"][dataset]["teacher_test_macro_f1"], color="grey", linestyle="--", label="teacher"
        )
        axis.set(title=dataset, xlabel="teacher calls (fraction of the pool)", ylabel="test macro-F1")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    available = sorted(p.stem for p in dq.DATASETS.glob("*.yaml"))
    parser.add_argument("--datasets", nargs="+", default=["rotten_tomatoes", "trec", "ag_news"], choices=available)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=["full", *ARMS], choices=["full", *ARMS])
    parser.add_argument(
        "--full-results", nargs="*", default=[], help="distill_quality result files to read `full` from"
    )
    parser.add_argument("--work", default="runs/bench_distill", help="distill_quality's work directory (its store)")
    parser.add_argument("--out", default=str(dq.RESULTS / "teacher_budget.json"))
    parser.add_argument("--cached-only", action="store_true", help="summarise the finished runs, start no new one")
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. labeling.budget=0.3")
    args = dq.parse_args_with_overrides(parser)

    import ray

    from llkd_ray.config import load_config
    from llkd_ray.console import console
    from llkd_ray.labeling import run_labeling

    work = Path(args.work).resolve()
    code = dq.code_fingerprint()
    reference = full_reference(args.full_results)
    results = []
    with console(work / "teacher_budget.log"):
        ray.init(num_cpus=os.cpu_count())
        for dataset in args.datasets:
            spec = yaml.safe_load((dq.DATASETS / f"{dataset}.yaml").read_text())
            base = dq.corpus_overrides(spec, work) + ["labeling.budget=0.3"] + list(args.overrides)
            cfg = load_config(None, base)
            run_labeling(cfg)  # the whole corpus, once, into the shared store (a no-op once it is there)
            _, pool, dev, test = dq.stored_splits(cfg)
            for seed in args.seeds:
                for arm in args.arms:
                    if arm == "full":
                        run = reference.get((dataset, seed)) or dq.run_one(
                            spec, base, pool, dev, test, "llkd", seed, work, code
                        )
                        result = {**run, "arm": "full", "calls_fraction": 1.0}
                    else:
                        result = run_budgeted(spec, base, dev, test, arm, seed, work, code, args.cached_only)
                        if result is None:
                            continue
                    results.append(result)
                    log.info(
                        "%s %s seed %d: test %.3f, dev %.3f, teacher calls %.0f%% of the pool",
                        dataset,
                        arm,
                        seed,
                        result["test_macro_f1"],
                        result["dev_macro_f1"],
                        100 * result["calls_fraction"],
                    )
        ray.shutdown()
    if args.cached_only:  # like with like: `full` only for the (dataset, seed) pairs whose budgeted runs finished
        budgeted = {(r["dataset"], r["seed"]) for r in results if r["arm"] != "full"}
        results = [r for r in results if r["arm"] != "full" or (r["dataset"], r["seed"]) in budgeted]
    summary = summarise(results)
    summary.update(machine=f"{os.cpu_count()} CPU cores, {sys.platform}", code_fingerprint=code, runs=results)
    print_summary(summary)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    plot(results, summary, out.with_suffix(".png"))
    print(f"\nresults: {out}, plot: {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
