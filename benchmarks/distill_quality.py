"""Distillation quality: every selector against LLKD, on the same teacher labels, trainer, seeds and step budget.

Datasets are YAML files under benchmarks/datasets/ (one per dataset: where its rows are, how to read them, the
task's prompt and how many rows to take); none is hard-coded here, and a user can add their own. For each one:

1. its rows are read into a JSONL corpus (``--work``/corpora), shuffled with a fixed seed and cut to ``limit``;
2. the teacher labels it once (the label store is reused across invocations);
3. the gold-labelled rows held out of the pool are split, by a fixed hash, into **dev** and **test**. Every
   default is chosen on dev; the README reports test;
4. every selector (and the ``gold_labels`` ceiling: ``all`` on the pool's gold labels) trains the student with
   every seed, through the same Ray Train loop and optimizer-step budget, and is scored on dev and test.

Each finished run is stored under ``--work``/results/<fingerprint>.json, where the fingerprint covers the code
of llkd_ray/, the resolved config and the dataset file: an interrupted matrix resumes where it stopped, and a
changed recipe never reuses a stale result. Prints per dataset × selector the test macro-F1 (mean and 95% CI over
seeds), dev macro-F1, pool fraction used and optimizer steps, then LLKD − best baseline (best on dev) as a paired
difference with its CI, and LLKD − each baseline averaged over the datasets (per seed, the mean over datasets of
the difference; then its CI over seeds). ``--pair-with`` earlier result files pairs every selector with its own
runs there, by dataset and seed (an override against the defaults, in one command); ``--from-results`` trains
nothing and summarises result files together (a matrix run in parts, on machines that do not share a cache), or
finished runs from the cache (``--work``/results/*.json: a matrix stopped before it wrote its summary). Writes
benchmarks/results/distill_quality.json and a plot of F1 against pool fraction.

    python benchmarks/distill_quality.py                                     # every dataset, seeds 0 1 2
    python benchmarks/distill_quality.py --datasets trec sms_spam --seeds 0 1 2 3 4
    python benchmarks/distill_quality.py --selectors llkd all training.epochs=4   # overrides anywhere, for every run
    python benchmarks/distill_quality.py --selectors llkd training.x=1 --pair-with earlier.json
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DATASETS = Path(__file__).resolve().parent / "datasets"
RESULTS = Path(__file__).resolve().parent / "results"
# Not a selector: `all` trained on the pool's gold labels, what this student can reach on this pool with perfect
# labels. It tells whether a goal above the teacher is within the student's reach at all.
GOLD_CEILING = "gold_labels"
DEV_FRACTION = 0.5  # of the held-out gold rows; the rest is test
log = logging.getLogger("llkd_ray.benchmarks")  # under llkd_ray: the quiet console shows it


# ---- datasets -----------------------------------------------------------------------------------------------------
def read_rows(spec: dict) -> list[dict]:
    """{"text", "label"} rows of a dataset file as its YAML describes it."""
    gold_map = {str(k): v for k, v in (spec.get("gold_map") or {}).items()}
    rows = []
    for name in spec.get("files", []):
        path = SHARED / name
        if not path.exists():
            raise SystemExit(f"{spec['name']}: {path} not found (benchmarks read ../shared/data)")
        for text, label in _records(spec, path):
            rows.append({"text": text, "label": gold_map.get(str(label), str(label))})
    return rows


def _records(spec: dict, path: Path):
    reader = spec["reader"]
    if reader == "jsonl":
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                yield record[spec["text_field"]], record[spec["label_field"]]
    elif reader == "csv":
        with path.open(encoding="utf-8", newline="") as handle:
            for record in csv.DictReader(handle):
                yield record[spec["text_field"]], record[spec["label_field"]]
    elif reader == "trec_lines":
        for line in path.read_bytes().decode("latin-1").splitlines():
            label, _, text = line.partition(" ")
            yield text, label.split(":")[0]
    elif reader == "sms_tsv":
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            label, _, text = line.partition("\t") if "\t" in line else line.partition(" ")
            yield text.strip(), label.strip()
    else:
        raise SystemExit(f"{spec['name']}: unknown reader {reader!r}")


def corpus_overrides(spec: dict, work: Path) -> list[str]:
    """Config overrides that point the pipeline at this dataset (the builtin one needs none)."""
    overrides = [f"store.path={work}/pseudo_labels", f"evaluation.holdout={HELD_OUT}"]
    if spec["reader"] == "builtin":
        return overrides + [f"corpus.limit={spec['limit']}"]
    rows = [row for row in read_rows(spec) if row["text"].strip()]
    random.Random(0).shuffle(rows)
    corpus = work / "corpora" / f"{spec['name']}.jsonl"
    corpus.parent.mkdir(parents=True, exist_ok=True)
    content = "".join(json.dumps(row) + "\n" for row in rows[: spec["limit"]])
    if not corpus.exists() or corpus.read_text() != content:
        corpus.write_text(content)
    source = {"source": str(corpus), "gold_column": "label", "limit": None}
    return overrides + [f"corpus={json.dumps(source)}", f"task={json.dumps(spec['task'])}"]


HELD_OUT = 600  # gold-labelled rows kept out of the pool: dev + test


def split_dev_test(holdout):
    """(dev, test): the held-out rows split by a hash of their id (fixed, independent of order and seed)."""
    keys = [hashlib.sha256(f"dev-test:{row_id}".encode()).digest()[0] / 256 for row_id in holdout["id"].to_pylist()]
    dev = [i for i, key in enumerate(keys) if key < DEV_FRACTION]
    test = [i for i, key in enumerate(keys) if key >= DEV_FRACTION]
    return holdout.take(dev), holdout.take(test)


def dataset_config(name: str, work: Path, extra: list[str] = ()):
    """The config that points the pipeline at dataset ``name``, with ``extra`` overrides after it."""
    from llkd_ray.config import load_config

    spec = yaml.safe_load((DATASETS / f"{name}.yaml").read_text())
    return load_config(None, corpus_overrides(spec, work) + list(extra))


def stored_splits(cfg):
    """(every stored label of the corpus, pool, dev, test): the teacher's labels as the store holds them, the pool
    training draws from, and the held-out gold rows split into dev and test."""
    from llkd_ray.corpus import corpus_ids
    from llkd_ray.pseudo_label_store import read_labels
    from llkd_ray.training import split_pool_and_holdout

    labels = read_labels(cfg, ids=corpus_ids(cfg.corpus))
    pool, holdout = split_pool_and_holdout(labels, cfg)
    return (labels, pool, *split_dev_test(holdout))


def with_gold_labels(pool):
    """The pool with the teacher's columns replaced by one-hot gold labels (rows without gold keep the teacher's)."""
    import pyarrow as pa

    gold = np.asarray(pool["gold_index"].to_pylist())
    teacher = np.asarray(pool["teacher_label"].to_pylist())
    labels = np.where(gold >= 0, gold, teacher)
    probs = np.eye(len(pool["teacher_probs"][0]), dtype=np.float32)[labels]
    probs = np.where((gold >= 0)[:, None], probs, np.asarray(pool["teacher_probs"].to_pylist(), dtype=np.float32))
    pool = pool.set_column(
        pool.schema.get_field_index("teacher_probs"), "teacher_probs", pa.array(probs.tolist(), pa.list_(pa.float32()))
    )
    return pool.set_column(pool.schema.get_field_index("teacher_label"), "teacher_label", pa.array(labels, pa.int32()))


# ---- statistics ----------------------------------------------------------------------------------------------------
def mean_ci(values) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student's t over seeds)."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return float(values.mean()), float(half)


def over_seeds(differences: dict) -> dict:
    """{seed: difference} → its mean, 95% CI over the seeds, and the seeds."""
    seeds = sorted(differences)
    mean, ci = mean_ci([differences[s] for s in seeds]) if seeds else (float("nan"), float("nan"))
    return {"difference": mean, "ci95": ci, "seeds": seeds}


def paired(mine: dict, other: dict) -> dict:
    """``mine`` − ``other`` over the seeds both have (each a {seed: value} map)."""
    return over_seeds({s: mine[s] - other[s] for s in set(mine) & set(other)})


def by_seed(runs: list[dict], dataset: str, selector: str, metric: str) -> dict:
    return {r["seed"]: r[metric] for r in runs if r["dataset"] == dataset and r["selector"] == selector}


def averaged_over_datasets(
    runs: list[dict], datasets, mine: str, other: str, earlier=None, splits=("dev", "test")
) -> dict:
    """``mine`` − ``other`` on each split, averaged over the datasets and paired by seed: per seed, the mean over
    datasets of the difference, then its mean and CI over the seeds every dataset has for both. ``earlier``
    (another run's rows) takes the place of ``other``'s rows when comparing with a previous result file."""
    earlier = runs if earlier is None else earlier
    result = {}
    for split in splits:
        metric = f"{split}_macro_f1"
        per_dataset = [(by_seed(runs, d, mine, metric), by_seed(earlier, d, other, metric)) for d in datasets]
        seeds = set.intersection(*(set(a) & set(b) for a, b in per_dataset)) if per_dataset else set()
        result[split] = over_seeds({s: float(np.mean([a[s] - b[s] for a, b in per_dataset])) for s in seeds})
    return result


def code_fingerprint() -> str:
    digest = hashlib.sha256()
    for path in sorted((ROOT / "llkd_ray").rglob("*")):
        if path.is_file() and path.suffix in (".py", ".yaml"):
            digest.update(path.relative_to(ROOT).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()[:16]


# ---- the matrix ----------------------------------------------------------------------------------------------------
def run_one(spec, base, pool, dev, test, selector: str, seed: int, work: Path, code: str) -> dict:
    from llkd_ray.config import load_config
    from llkd_ray.evaluation import evaluate
    from llkd_ray.training import steps_per_epoch, train_student

    ceiling = selector == GOLD_CEILING
    overrides = base + [
        f"selection.strategy={'all' if ceiling else selector}",
        f"selection.seed={seed}",
        f"training.seed={seed}",
        f"training.storage_path={work}/ray_results",
        f"output.dir={work}/runs",
        "training.strategy=ddp",
    ]
    cfg = load_config(None, overrides)
    fingerprint = hashlib.sha256(
        json.dumps([code, cfg.model_dump(mode="json"), spec, selector, seed], sort_keys=True, default=str).encode()
    ).hexdigest()[:16]
    result_file = work / "results" / f"{fingerprint}.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    name = f"{spec['name']}-{selector}-seed{seed}-{fingerprint[:8]}"
    cfg = load_config(None, overrides + [f"output.name={name}"])
    started = time.time()
    trained = train_student(cfg, with_gold_labels(pool) if ceiling else pool, dev, work / "runs" / name)
    names = cfg.task.label_names
    dev_report = evaluate(trained.student_dir, dev, names, cfg.student.max_length)
    test_report = evaluate(trained.student_dir, test, names, cfg.student.max_length)
    result = {
        "dataset": spec["name"],
        "selector": selector,
        "seed": seed,
        "test_macro_f1": test_report["student"]["macro_f1"],
        "dev_macro_f1": dev_report["student"]["macro_f1"],
        "teacher_test_macro_f1": test_report["teacher"]["macro_f1"],
        "teacher_dev_macro_f1": dev_report["teacher"]["macro_f1"],
        "pool_fraction": len(trained.used_pool_indices) / pool.num_rows,
        "steps": steps_per_epoch(cfg.training, pool.num_rows) * cfg.training.epochs,
        "dev_f1_by_epoch": [h.get("eval_macro_f1") for h in trained.history],
        "selected_by_epoch": [h["selected"] for h in trained.history],
        "seconds": round(time.time() - started, 1),
        "fingerprint": fingerprint,
        "code_fingerprint": code,
    }
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.write_text(json.dumps(result, indent=2))
    # The result is all the matrix needs again: a run's checkpoints (~0.5 GB) would fill the disk over the matrix.
    shutil.rmtree(work / "ray_results" / name, ignore_errors=True)
    shutil.rmtree(work / "runs" / name, ignore_errors=True)
    return result


def summarise(results: list[dict], selectors: list[str], earlier: list[dict] | None = None) -> dict:
    """Per dataset × selector: test mean ± CI, dev mean, pool fraction, steps; LLKD − best baseline (chosen on
    dev) per dataset; LLKD − each baseline averaged over the datasets that ran both; and, given ``earlier`` (the
    ``runs`` of a previous result file), every selector against its own earlier runs, paired by seed."""
    summary: dict = {"datasets": {}, "average": {}, "llkd_minus": {}}
    by_dataset: dict[str, list[dict]] = {}
    for result in results:
        by_dataset.setdefault(result["dataset"], []).append(result)
    for dataset, rows in by_dataset.items():
        entry = {
            "teacher_test_macro_f1": rows[0]["teacher_test_macro_f1"],
            "teacher_dev_macro_f1": rows[0]["teacher_dev_macro_f1"],
            "selectors": {},
        }
        for selector in selectors:
            mine = sorted((r for r in rows if r["selector"] == selector), key=lambda r: r["seed"])
            if not mine:
                continue
            test_mean, test_ci = mean_ci([r["test_macro_f1"] for r in mine])
            entry["selectors"][selector] = {
                "test_macro_f1": test_mean,
                "test_ci95": test_ci,
                "dev_macro_f1": float(np.mean([r["dev_macro_f1"] for r in mine])),
                "pool_fraction": float(np.mean([r["pool_fraction"] for r in mine])),
                "steps": mine[0]["steps"],
                "seeds": [r["seed"] for r in mine],
                "test_by_seed": {r["seed"]: r["test_macro_f1"] for r in mine},
            }
        baselines = {k: v for k, v in entry["selectors"].items() if k not in ("llkd", GOLD_CEILING)}
        if "llkd" in entry["selectors"] and baselines:
            best = max(baselines, key=lambda k: baselines[k]["dev_macro_f1"])  # chosen on dev
            diff = paired(entry["selectors"]["llkd"]["test_by_seed"], baselines[best]["test_by_seed"])
            entry["llkd_minus_best_baseline"] = {
                "baseline": best,
                "test_difference": diff["difference"],
                "ci95": diff["ci95"],
            }
        summary["datasets"][dataset] = entry
    for selector in selectors:
        values = [
            d["selectors"][selector]["test_macro_f1"]
            for d in summary["datasets"].values()
            if selector in d["selectors"]
        ]
        if values:
            summary["average"][selector] = float(np.mean(values))
    for baseline in selectors:
        both = [d for d, e in summary["datasets"].items() if {"llkd", baseline} <= set(e["selectors"])]
        if baseline != "llkd" and both:
            summary["llkd_minus"][baseline] = {
                "datasets": both,
                **averaged_over_datasets(results, both, "llkd", baseline),
            }
    if earlier is not None:
        summary["paired_with_earlier"] = {}
        for selector in selectors:
            both = [
                d
                for d in by_dataset
                if by_seed(results, d, selector, "test_macro_f1") and by_seed(earlier, d, selector, "test_macro_f1")
            ]
            if both:
                summary["paired_with_earlier"][selector] = {
                    "per_dataset": {d: averaged_over_datasets(results, [d], selector, selector, earlier) for d in both},
                    **averaged_over_datasets(results, both, selector, selector, earlier),
                }
    return summary


def _points(d: dict) -> str:
    ci = "" if np.isnan(d["ci95"]) else f" ± {100 * d['ci95']:.1f}"
    return f"{100 * d['difference']:+.1f}{ci}"


def print_summary(summary: dict) -> None:
    print(f"\n{'dataset':<16}{'selector':<21}{'test macro-F1':>20}{'dev':>8}{'pool used':>11}{'steps':>7}")
    for dataset, entry in summary["datasets"].items():
        print(
            f"{dataset:<16}{'teacher':<21}{entry['teacher_test_macro_f1']:>20.3f}{entry['teacher_dev_macro_f1']:>8.3f}"
        )
        for selector, s in entry["selectors"].items():
            ci = "" if np.isnan(s["test_ci95"]) else f" ± {s['test_ci95']:.3f}"
            print(
                f"{'':<16}{selector:<21}{s['test_macro_f1']:>12.3f}{ci:>8}{s['dev_macro_f1']:>8.3f}"
                f"{s['pool_fraction']:>10.1%}{s['steps']:>7}"
            )
        if "llkd_minus_best_baseline" in entry:
            d = entry["llkd_minus_best_baseline"]
            print(
                f"{'':<16}LLKD - {d['baseline']} (best on dev): {100 * d['test_difference']:+.1f} points"
                f" (95% CI ± {100 * d['ci95']:.1f}, paired over seeds)"
            )
    print("\naverage test macro-F1 over datasets: " + ", ".join(f"{k} {v:.3f}" for k, v in summary["average"].items()))
    for baseline, d in summary["llkd_minus"].items():
        print(
            f"LLKD - {baseline}, averaged over {len(d['datasets'])} dataset(s), paired by seed {d['test']['seeds']}:"
            f" dev {_points(d['dev'])}, test {_points(d['test'])} points (95% CI)"
        )
    for selector, d in summary.get("paired_with_earlier", {}).items():
        rows = ", ".join(
            f"{name} dev {_points(v['dev'])} test {_points(v['test'])}" for name, v in d["per_dataset"].items()
        )
        print(
            f"{selector} - the earlier file's {selector}, paired by seed: {rows};"
            f" averaged: dev {_points(d['dev'])}, test {_points(d['test'])} points"
        )


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(summary["datasets"])
    figure, axes = plt.subplots(1, len(datasets), figsize=(4 * len(datasets), 3.6), squeeze=False)
    for axis, dataset in zip(axes[0], datasets):
        entry = summary["datasets"][dataset]
        for selector, s in entry["selectors"].items():
            axis.errorbar(
                s["pool_fraction"], s["test_macro_f1"], yerr=np.nan_to_num(s["test_ci95"]), fmt="o", label=selector
            )
        axis.axhline(entry["teacher_test_macro_f1"], color="grey", linestyle="--", label="teacher")
        axis.set(title=dataset, xlabel="fraction of the pool used", ylabel="test macro-F1")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def parse_args_with_overrides(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Options and key=value overrides in any order, as with ``llkd``: an override after ``--selectors a b`` is an
    override, not a selector argparse refuses."""
    from llkd_ray.cli import split_overrides

    takes_value = [name for action in parser._actions if action.nargs != 0 for name in action.option_strings]
    rest, overrides = split_overrides(sys.argv[1:], takes_value)
    return parser.parse_args(overrides + rest)


def main() -> None:
    from llkd_ray.selection import SELECTORS

    available = sorted(p.stem for p in DATASETS.glob("*.yaml"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=available, choices=available)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--selectors", nargs="+", default=[*SELECTORS, GOLD_CEILING], choices=[*SELECTORS, GOLD_CEILING]
    )
    parser.add_argument("--work", default="runs/bench_distill", help="corpora, stores, checkpoints and results")
    parser.add_argument("--out", default=str(RESULTS / "distill_quality.json"))
    parser.add_argument(
        "--pair-with",
        nargs="+",
        help="earlier result files: each selector here minus its own runs there, by dataset and seed",
    )
    parser.add_argument(
        "--from-results",
        nargs="+",
        help="train nothing: summarise the runs of these result files, or finished runs of the cache, together",
    )
    parser.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. training.epochs=6")
    args = parse_args_with_overrides(parser)
    # read before hours of runs, not after
    earlier = merged_runs(args.pair_with) if args.pair_with else None
    if args.from_results:
        if args.overrides:
            parser.error("--from-results trains nothing: overrides would not apply to its runs")
        results = [r for r in merged_runs(args.from_results) if r["dataset"] in args.datasets]
        write_summary(results, [s for s in args.selectors if any(r["selector"] == s for r in results)], earlier, args)
        return

    import ray

    from llkd_ray.console import console

    work = Path(args.work).resolve()
    code = code_fingerprint()
    # The project's quiet console: Ray's, vLLM's and DeepSpeed's output goes to the log file; the terminal shows
    # one line per finished run and the workers' epoch lines.
    with console(work / "distill_quality.log"):
        ray.init(num_cpus=os.cpu_count())
        results = run_matrix(args, work, code)
        ray.shutdown()
    write_summary(results, args.selectors, earlier, args, code)


def merged_runs(paths) -> list[dict]:
    """The runs of several result files, once each: a (dataset, selector, seed) that two files hold with different
    scores is refused (they trained different code or configs), not silently picked."""
    runs: dict[tuple, dict] = {}
    for path in paths:
        stored = json.loads(Path(path).read_text())
        for run in stored["runs"] if "runs" in stored else [stored]:  # a summary, or one finished run's file
            run.setdefault("code_fingerprint", stored.get("code_fingerprint"))
            key = (run["dataset"], run["selector"], run["seed"])
            scores = (run["dev_macro_f1"], run["test_macro_f1"])
            if key in runs and (runs[key]["dev_macro_f1"], runs[key]["test_macro_f1"]) != scores:
                raise SystemExit(f"{path}: {key} is also in an earlier file, with other scores")
            runs.setdefault(key, run)
    return list(runs.values())


def write_summary(results: list[dict], selectors, earlier, args, code: str | None = None) -> None:
    summary = summarise(results, selectors, earlier)
    summary["machine"] = f"{os.cpu_count()} CPU cores, {sys.platform}"
    # a summary of result files names the code of each file it read (each run keeps its own fingerprint too)
    summary["code_fingerprint"] = code or sorted({str(r.get("code_fingerprint")) for r in results})
    summary["from_results"] = args.from_results
    summary["runs"] = results
    print_summary(summary)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    plot(summary, out.with_suffix(".png"))
    print(f"\nresults: {out}, plot: {out.with_suffix('.png')}")


def run_matrix(args, work: Path, code: str) -> list[dict]:
    from llkd_ray.config import load_config
    from llkd_ray.labeling import run_labeling

    results = []
    for dataset in args.datasets:
        spec = yaml.safe_load((DATASETS / f"{dataset}.yaml").read_text())
        base = corpus_overrides(spec, work) + list(args.overrides)
        cfg = load_config(None, base)
        run_labeling(cfg)
        _, pool, dev, test = stored_splits(cfg)
        log.info("%s: pool %d, dev %d, test %d", dataset, pool.num_rows, dev.num_rows, test.num_rows)
        for seed in args.seeds:
            for selector in args.selectors:
                result = run_one(spec, base, pool, dev, test, selector, seed, work, code)
                results.append(result)
                log.info(
                    "%s %s seed %d: test %.3f, dev %.3f (teacher %.3f), pool used %.1f%%, %.0f s",
                    dataset,
                    selector,
                    seed,
                    result["test_macro_f1"],
                    result["dev_macro_f1"],
                    result["teacher_test_macro_f1"],
                    100 * result["pool_fraction"],
                    result["seconds"],
                )
    return results


if __name__ == "__main__":
    main()
