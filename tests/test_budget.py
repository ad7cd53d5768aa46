"""A teacher-call budget spent in rounds (llkd_ray/budget.py), on a real local Ray cluster with the real teacher
(SmolLM2 through vLLM), the real student and real Ray Train rounds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import make_config

from llkd_ray.acquisition import budget_rows, normalized_entropy, round_sizes
from llkd_ray.corpus import load_rotten_tomatoes
from llkd_ray.pseudo_label_store import PseudoLabelStore

ROOT = Path(__file__).resolve().parents[1]

# A driver that SIGKILLs itself once round 1 has committed two parts of its rows: killed mid-round, for real.
KILL_MID_ROUND_ONE = """
import os, signal, sys
import yaml
from llkd_ray.config import config_from_dict
from llkd_ray.pipeline import run_pipeline
from llkd_ray.pseudo_label_store import PseudoLabelStore

cfg = config_from_dict(yaml.safe_load(open(sys.argv[1])))
real_commit = PseudoLabelStore.commit
plan = f"{PseudoLabelStore(cfg).root}/acquisitions/{cfg.output.name}/round-01.parquet"
commits = []

def commit_then_maybe_die(self, batch):
    counts = real_commit(self, batch)
    if os.path.exists(plan):
        commits.append(batch.num_rows)
        if len(commits) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return counts

PseudoLabelStore.commit = commit_then_maybe_die
run_pipeline(cfg)
"""


def budget_config(tmp_path: Path, corpus: Path, **labeling):
    return make_config(
        corpus={"source": str(corpus), "gold_column": "label"},
        teacher={"batch_size": 4, "num_cpus": 0.5},
        store={"path": str(tmp_path / "store"), "rows_per_part": 4},
        labeling={"budget": 0.6, "rounds": 3, "clusters": 4, **labeling},
        student={"max_length": 48},
        training={
            "strategy": "ddp",
            "epochs": 1,
            "batch_size": 16,
            "min_steps_per_epoch": 4,
            "cpus_per_worker": 0.5,
            "storage_path": str(tmp_path / "ray"),
        },
        evaluation={"holdout": 20},
        output={"name": "budget", "dir": str(tmp_path / "runs")},
    )


def write_corpus(tmp_path: Path, seed: int, rows: int, extra: list[dict] = ()) -> Path:
    records = [{"text": r["text"], "label": r["gold"]} for r in load_rotten_tomatoes(seed=seed, limit=rows).to_pylist()]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(record) + "\n" for record in [*records, *extra]))
    return corpus


def committed_keys(store: PseudoLabelStore, sub: str) -> list[str]:
    files = sorted(Path(store.root, sub).glob("part-*.parquet"))
    return [key for path in files for key in pq.read_table(path, columns=["key"])["key"].to_pylist()]


def test_a_budget_run_killed_mid_round_resumes_with_exact_teacher_call_accounting(ray_cluster, tmp_path):
    from llkd_ray.budget import AcquisitionLedger, index_corpus
    from llkd_ray.pipeline import run_pipeline
    from llkd_ray.student import load_exported_student, predict_probs

    # 120 rows and an empty one (rejected by the reader: recorded in the store, never sent to the teacher)
    corpus = write_corpus(tmp_path, seed=11, rows=120, extra=[{"text": ""}])
    cfg = budget_config(tmp_path, corpus, stop_margin=None)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump()))
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    killed = subprocess.run(
        [sys.executable, "-c", KILL_MID_ROUND_ONE, str(config_file)], cwd=ROOT, env=env, check=False, timeout=900
    )
    assert killed.returncode == -signal.SIGKILL

    store = PseudoLabelStore(cfg)
    ledger = AcquisitionLedger(store, "budget")
    index = index_corpus(cfg)
    round_one = set(ledger.plan(1)["key"].to_pylist())
    before_resume = set(committed_keys(store, "parts"))
    assert 0 < len(round_one & before_resume) < len(round_one)  # killed mid-round: part of its rows committed
    assert ledger.result(0) is not None and ledger.result(1) is None

    run_pipeline(cfg)  # resumes at round 1 with the same rows

    metrics = json.loads((tmp_path / "runs" / "budget" / "metrics.json").read_text())
    budget = metrics["budget"]
    plans = [ledger.plan(r) for r in range(3)]
    keys = [set(plan["key"].to_pylist()) for plan in plans]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])
    candidates = len(index.candidates)
    assert candidates == 100  # 120 usable rows less the 20 held out
    probe, sizes = round_sizes(budget_rows(0.6, candidates), 3, 0.1)
    assert [len(k) for k in keys] == [probe + sizes[0], sizes[1], sizes[2]] == [24, 18, 18]
    assert budget["acquired_rows"] == 60 and budget["rows_not_labeled"] == 40 and budget["rounds_run"] == 3

    # Exact accounting: every committed row was sent to the teacher once, and the teacher saw nothing outside
    # the holdout and the rounds' rows. The resumed run paid only for what the kill left unlabeled.
    labeled = committed_keys(store, "parts")
    assert len(labeled) == len(set(labeled))
    assert set(labeled) == index.holdout_keys | keys[0] | keys[1] | keys[2]
    assert budget["teacher_calls"] == len(round_one - before_resume) + len(keys[2])
    assert committed_keys(store, "rejects") == list(index.rejected_keys) and len(index.rejected_keys) == 1

    # Round 1 took the rows the round-0 student was least sure of: more uncertain than the rows it left.
    plan = plans[1].to_pylist()
    assert {row["reason"] for row in plan} == {"uncertain"} and all(row["score"] is not None for row in plan)
    taken = keys[0] | keys[1] | index.holdout_keys | index.rejected_keys
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    left = [rows[i]["text"] for i, key in enumerate(index.keys) if key not in taken and key not in index.duplicate_keys]
    chosen = [rows[index.keys.index(row["key"])]["text"] for row in plan]
    network, tokenizer = load_exported_student(tmp_path / "runs" / "budget" / "rounds" / "round-00" / "student")
    uncertainty = [normalized_entropy(predict_probs(network, tokenizer, t, 48)).mean() for t in (chosen, left)]
    assert uncertainty[0] > uncertainty[1]
    recorded = np.array([row["score"] for row in plan])
    assert recorded == pytest.approx(normalized_entropy(predict_probs(network, tokenizer, chosen, 48)), abs=1e-3)

    # A driver on another node has no local copy of a round's student: it comes back from the round's checkpoint.
    from llkd_ray.budget import _round_student

    exported = tmp_path / "runs" / "budget" / "rounds" / "round-01" / "student"
    weights = (exported / "model.safetensors").read_bytes()
    shutil.rmtree(exported)
    restored = _round_student(ledger.result(1), tmp_path / "runs" / "budget")
    assert restored.student_dir == exported and (exported / "model.safetensors").read_bytes() == weights

    report = (tmp_path / "runs" / "budget" / "report.md").read_text()
    assert "## Teacher budget" in report and "| 2 | 18 |" in report
    assert (tmp_path / "runs" / "budget" / "rounds.png").stat().st_size > 0


@pytest.mark.parametrize(
    "acquisition, random_share, reasons",
    [("random", 0.0, {"random": 12}), ("student", 0.5, {"uncertain": 6, "random": 6})],
    ids=["random-rounds", "student-rounds-half-random"],
)
def test_random_rounds_and_the_stopping_rule_leave_the_rest_of_the_budget_unspent(
    ray_cluster, tmp_path, acquisition, random_share, reasons
):
    from llkd_ray.budget import AcquisitionLedger
    from llkd_ray.pipeline import run_pipeline

    corpus = write_corpus(tmp_path, seed=12, rows=100)
    # A margin no round can clear: the rule stops after round 1, the first round it can compare with another.
    cfg = budget_config(
        tmp_path, corpus, acquisition=acquisition, random_share=random_share, stop_margin=1.0, probe_fraction=0.25
    )
    run_pipeline(cfg)
    budget = json.loads((tmp_path / "runs" / "budget" / "metrics.json").read_text())["budget"]
    assert (budget["rounds_run"], budget["stopped_early"]) == (2, True)
    ledger = AcquisitionLedger(PseudoLabelStore(cfg), "budget")
    assert ledger.plan(2) is None  # round 2's rows were never chosen, let alone labeled
    round_one = ledger.plan(1)
    assert dict(Counter(round_one["reason"].to_pylist())) == reasons
    assert len(set(round_one["key"].to_pylist())) == round_one.num_rows  # no row bought twice in a round
    # the student's rows carry the uncertainty that chose them; drawn rows carry none
    random_rows = round_one.filter(pc.equal(round_one["reason"], "random"))
    assert random_rows["score"].null_count == random_rows.num_rows == reasons["random"]
    assert round_one["score"].null_count == reasons["random"]
    probe, sizes = round_sizes(budget_rows(0.6, 80), 3, 0.25)  # 48 rows: probe 12, rounds of 12
    assert budget["acquired_rows"] == probe + sizes[0] + sizes[1] == 36
    assert budget["rows_not_labeled"] == 80 - 36
    assert len(committed_keys(PseudoLabelStore(cfg), "parts")) == 20 + 36  # holdout + what the rounds bought
    assert all(len(r["probe_agreed"]) == 12 for r in budget["rounds"])
