"""The distillation benchmark's paired statistics, on hand-computed values (the README's claims rest on them)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import distill_quality as dq  # noqa: E402


def run(dataset, selector, seed, dev, test):
    return {
        "dataset": dataset,
        "selector": selector,
        "seed": seed,
        "dev_macro_f1": dev,
        "test_macro_f1": test,
        "teacher_dev_macro_f1": 0.5,
        "teacher_test_macro_f1": 0.5,
        "pool_fraction": 1.0 if selector == "all" else 0.5,
        "steps": 192,
    }


# llkd − all per seed: dataset a: test +.02, +.04, +.06; dataset b: test −.02, .00, +.02 (b has no seed-2 `all`)
RUNS = [
    run("a", "llkd", 0, 0.70, 0.72),
    run("a", "llkd", 1, 0.70, 0.74),
    run("a", "llkd", 2, 0.70, 0.76),
    run("a", "all", 0, 0.60, 0.70),
    run("a", "all", 1, 0.60, 0.70),
    run("a", "all", 2, 0.60, 0.70),
    run("b", "llkd", 0, 0.50, 0.48),
    run("b", "llkd", 1, 0.50, 0.50),
    run("b", "llkd", 2, 0.50, 0.52),
    run("b", "all", 0, 0.50, 0.50),
    run("b", "all", 1, 0.50, 0.50),
]


def test_paired_difference_uses_the_seeds_both_have():
    d = dq.paired({0: 0.7, 1: 0.8, 2: 0.9}, {0: 0.6, 1: 0.6})
    assert d["seeds"] == [0, 1]
    assert d["difference"] == pytest.approx(0.15)
    assert d["ci95"] == pytest.approx(12.7062 * 0.05, rel=1e-4)  # t(0.975, 1) · sd / √n, sd/√2 = .05


def test_llkd_minus_a_baseline_is_averaged_over_datasets_per_seed():
    summary = dq.summarise(RUNS, ["llkd", "all"])
    test = summary["llkd_minus"]["all"]["test"]
    # seeds 0 and 1 only (b lacks seed 2): per seed (+.02 − .02)/2 = 0, (+.04 + 0)/2 = +.02
    assert test["seeds"] == [0, 1]
    assert test["difference"] == pytest.approx(0.01)
    assert summary["llkd_minus"]["all"]["dev"]["difference"] == pytest.approx(0.05)  # (+.10 + 0)/2
    assert summary["llkd_minus"]["all"]["datasets"] == ["a", "b"]
    assert summary["datasets"]["a"]["llkd_minus_best_baseline"]["test_difference"] == pytest.approx(0.04)


def test_pairing_with_an_earlier_file_compares_each_selector_with_its_own_runs():
    earlier = [{**r, "test_macro_f1": r["test_macro_f1"] - 0.01 * (r["seed"] + 1)} for r in RUNS]
    summary = dq.summarise(RUNS, ["llkd", "all"], earlier)
    llkd = summary["paired_with_earlier"]["llkd"]
    assert llkd["per_dataset"]["a"]["test"]["difference"] == pytest.approx(0.02)  # mean of .01, .02, .03
    assert llkd["per_dataset"]["a"]["dev"]["difference"] == pytest.approx(0.0)
    assert llkd["test"]["difference"] == pytest.approx(0.02) and llkd["test"]["seeds"] == [0, 1, 2]
    assert summary["paired_with_earlier"]["all"]["test"]["seeds"] == [0, 1]


def test_result_files_merge_once_each_and_refuse_conflicting_scores(tmp_path):
    import json

    first, second, conflicting = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    first.write_text(json.dumps({"code_fingerprint": "one", "runs": RUNS[:4]}))
    second.write_text(json.dumps({"code_fingerprint": "two", "runs": RUNS[3:]}))  # RUNS[3] in both, same scores
    merged = dq.merged_runs([first, second])
    assert len(merged) == len(RUNS)
    assert {r["code_fingerprint"] for r in merged} == {"one", "two"}
    conflicting.write_text(json.dumps({"runs": [{**RUNS[0], "test_macro_f1": 0.1}]}))
    with pytest.raises(SystemExit, match="other scores"):
        dq.merged_runs([first, conflicting])
    # a finished run's own file from the cache (no summary around it) counts as one run
    cached = [tmp_path / f"run{i}.json" for i in range(2)]
    for path, run in zip(cached, RUNS[:2]):
        path.write_text(json.dumps({**run, "code_fingerprint": "three"}))
    assert dq.merged_runs(cached) == [{**run, "code_fingerprint": "three"} for run in RUNS[:2]]
    assert len(dq.merged_runs([first, *cached])) == 4  # the same runs as in the summary: once each
