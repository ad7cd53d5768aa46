"""The label stage on a real local Ray cluster: hostile input, and a killed run resumed with exact accounting."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from llkd_ray.corpus import load_rotten_tomatoes
from llkd_ray.labeling import run_labeling
from llkd_ray.pseudo_label_store import PseudoLabelStore, StoreBusyError
from tests.conftest import make_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, records: list, extra_lines: list[bytes] = ()) -> Path:
    with path.open("wb") as handle:
        for record in records:
            handle.write(json.dumps(record).encode() + b"\n")
        for line in extra_lines:
            handle.write(line + b"\n")
    return path


def stored_sources(summary_path: str) -> list[str]:
    labels = pq.read_table(summary_path, columns=["source"])["source"].to_pylist()
    rejects = pq.read_table(summary_path.replace("labels.parquet", "rejects.parquet"), columns=["source"])
    return labels + rejects["source"].to_pylist()


def test_hostile_rows_are_rejected_and_the_rest_labeled(ray_cluster, tmp_path):
    texts = load_rotten_tomatoes(seed=5, limit=30).to_pylist()
    good = [{"text": row["text"], "label": row["gold"]} for row in texts]
    jsonl = write_jsonl(
        tmp_path / "reviews.jsonl",
        good[:20] + [{"text": None}, {"text": 3.5}, {"text": "  "}],
        [b"{broken json", b'{"text": "caf\xe9 au lait"}'],
    )
    csv_path = tmp_path / "more.csv"
    csv_path.write_text("text,label\n" + "".join(f'"{r["text"]}",{r["label"]}\n' for r in good[20:]) + '"x","y",z\n')
    cfg = make_config(
        corpus={"source": [str(jsonl), str(csv_path)], "gold_column": "label", "rows_per_block": 8},
        teacher={"backend": "transformers", "batch_size": 8},
        store={"path": str(tmp_path / "store"), "rows_per_part": 8},
    )
    summary = run_labeling(cfg)
    assert (summary.rows, summary.labeled, summary.rejected) == (36, 30, 6)
    rejects = pq.read_table(summary.labels_path.replace("labels.parquet", "rejects.parquet")).to_pylist()
    assert sorted(r["reject_reason"].split(" (")[0].split(":")[0] for r in rejects) == [
        "invalid JSON line",
        "malformed row",
        "text is empty",
        "text is float, not a string",
        "text is missing",
        "undecodable bytes",
    ]
    labels = pq.read_table(summary.labels_path).to_pylist()
    assert {row["text"] for row in labels} == {row["text"] for row in good}
    assert all(
        abs(sum(row["probs_calibrated"]) - 1) < 1e-5 and row["label"] in ("positive", "negative") for row in labels
    )
    assert all(row["confidence"] == max(row["probs_calibrated"]) for row in labels)


def test_killed_run_resumes_without_losing_or_duplicating_rows(ray_cluster, tmp_path):
    rows = load_rotten_tomatoes(seed=7, limit=200).to_pylist()
    records = [{"text": row["text"], "label": row["gold"]} for row in rows]
    records += [records[0], records[1], {"text": ""}]  # two duplicate texts and an empty one
    corpus = write_jsonl(tmp_path / "corpus.jsonl", records)
    sections = dict(
        corpus={"source": str(corpus), "gold_column": "label", "rows_per_block": 16},
        teacher={"batch_size": 8},  # vLLM backend
        store={"path": str(tmp_path / "store"), "rows_per_part": 8},
    )
    cfg = make_config(**sections)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump()))

    # A separate driver process on the same cluster, killed with SIGKILL once some parts are committed.
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    driver = subprocess.Popen(
        [sys.executable, "-m", "llkd_ray.cli", "label", "--config", str(config_file)],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    store = PseudoLabelStore(cfg)
    parts_dir = Path(store.root) / "parts"
    deadline = time.time() + 600
    while len(list(parts_dir.glob("part-*.parquet"))) < 3:
        assert driver.poll() is None, "the first run ended before it could be interrupted"
        assert time.time() < deadline, "no parts were committed in time"
        time.sleep(0.5)
    # A second writer while the first is labeling: refused before it labels anything (no row labeled twice).
    with pytest.raises(StoreBusyError, match="is being written by pid"):
        run_labeling(cfg)
    os.killpg(driver.pid, signal.SIGKILL)  # the lock dies with its holder
    driver.wait()
    already = PseudoLabelStore(cfg).stored_keys()
    assert 0 < len(already) < len(records)

    summary = run_labeling(cfg)
    assert summary.resumed_rows == len(already)
    assert summary.resumed_rows + summary.labeled_this_run + summary.rejected_this_run == len(records)
    assert (summary.rows, summary.labeled, summary.rejected, summary.duplicates) == (203, 200, 3, 2)
    sources = stored_sources(summary.labels_path)
    assert sorted(sources) == sorted(f"{corpus}:{n}" for n in range(1, len(records) + 1))  # each row exactly once
    ids = pq.read_table(summary.labels_path, columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 200

    # Everything is stored: a third run does not start the teacher. This teacher could not start (its context is
    # too short for the prompts), and max_model_len does not change the labels, so the store is the same one.
    unstartable = make_config(**{**sections, "teacher": {"batch_size": 8, "vllm": {"max_model_len": 16}}})
    assert PseudoLabelStore(unstartable).root == store.root
    again = run_labeling(unstartable)
    assert (again.labeled_this_run, again.rejected_this_run, again.rows, again.labeled) == (0, 0, 203, 200)


def test_ten_thousand_hostile_rows_end_labeled_or_rejected_with_a_reason(ray_cluster, tmp_path):
    """The real pipeline, 10,000 rows: hostile kinds of every sort are rejected by the reader before the teacher,
    a corrupt archive is rejected as a unit, a 10 MB row is cut and labeled; no crash, each row once."""
    import gzip

    good = [row["text"] for row in load_rotten_tomatoes(seed=13, limit=155).to_pylist()]
    hostile_kinds = [
        b'{"text": ' + b"[" * 5000 + b"]" * 5000 + b"}",  # deeper than the parser's recursion limit
        b"{broken json",
        b'["a", "list"]',
        b'{"text": null}',
        b'{"text": ""}',
        b'{"text": 7}',
        b'{"body": "no text field"}',
        b'{"text": "caf\xe9"}',  # not UTF-8
        b'{"text": "lone \\ud800 surrogate"}',
    ]
    separators = [json.dumps({"text": f"{text} \u2028 (and more)"}, ensure_ascii=False).encode() for text in good[:5]]
    huge = json.dumps({"text": "A long, long review. " * 500_000}).encode()  # ~10 MB
    duplicates = [json.dumps({"text": text}).encode() for text in good[:5]]
    files_rows = {"reviews.jsonl": 120 + 5 + 5 + 1, "more.csv": 20 + 50 + 1, "good.jsonl.gz": 10, "broken.jsonl.gz": 1}
    hostile_count = 10_000 - sum(files_rows.values())
    lines = [json.dumps({"text": text}).encode() for text in good[:120]] + separators + duplicates + [huge]
    lines += [hostile_kinds[i % len(hostile_kinds)] for i in range(hostile_count)]
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "reviews.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    csv_rows = [f'"{text}",x' for text in good[120:140]] + ['"a","b","c"'] * 50 + ['"' + "z" * (17 * 2**20) + '",x']
    (tmp_path / "corpus" / "more.csv").write_text("text,label\n" + "\n".join(csv_rows) + "\n")
    gz_lines = [json.dumps({"text": text}).encode() for text in good[140:150]]
    (tmp_path / "corpus" / "good.jsonl.gz").write_bytes(gzip.compress(b"\n".join(gz_lines) + b"\n"))
    (tmp_path / "corpus" / "broken.jsonl.gz").write_bytes(b"\x1f\x8b this is not gzip")
    cfg = make_config(
        corpus={"source": str(tmp_path / "corpus"), "rows_per_block": 512},
        teacher={"batch_size": 32, "max_text_tokens": 64},
        store={"path": str(tmp_path / "store"), "rows_per_part": 512},
    )
    summary = run_labeling(cfg)
    teacher_bound = 120 + 5 + 5 + 1 + 20 + 10
    assert (summary.rows, summary.labeled, summary.duplicates) == (10_000, teacher_bound - 5, 5)
    assert summary.rejected == 10_000 - summary.labeled
    sources = stored_sources(summary.labels_path)
    assert len(sources) == len(set(sources)) == 10_000  # every row once, labeled or rejected
    rejects = pq.read_table(summary.labels_path.replace("labels.parquet", "rejects.parquet")).to_pylist()
    assert all(row["reject_reason"] for row in rejects)
    reasons = " | ".join(row["reject_reason"] for row in rejects)
    for expected in (
        "nested too deeply",
        "invalid JSON line",
        "a JSON list",
        "text is missing",
        "text is empty",
        "text is int",
        "no 'text' field",
        "undecodable bytes",
        "more fields than the header",
        "row longer than",  # the 17 MiB CSV line, skipped without being held whole
        "unreadable file: BadGzipFile",
        "duplicate id",
    ):
        assert expected in reasons, expected
    labels = pq.read_table(summary.labels_path, columns=["text", "truncated"]).to_pylist()
    assert sum(row["truncated"] for row in labels) == 1  # the 10 MB row, cut before it was tokenized
    assert sum("\u2028" in row["text"] for row in labels) == 5  # line separators stayed inside their texts


KILL_IN_FINALIZE = """
import os, signal, sys
import yaml
from llkd_ray.config import config_from_dict
from llkd_ray.labeling import run_labeling
from llkd_ray.pseudo_label_store import PseudoLabelStore

target = sys.argv[2]
real_write = PseudoLabelStore._write_atomically

def write_then_die(self, table, path):
    if path.endswith(target):
        real_write(self, table, path)  # labels.parquet lands, and the process dies before anything after it
        os.kill(os.getpid(), signal.SIGKILL)
    real_write(self, table, path)

PseudoLabelStore._write_atomically = write_then_die
run_labeling(config_from_dict(yaml.safe_load(open(sys.argv[1]))))
"""


def test_sigkill_during_finalize_then_an_inserted_line_resume_with_exact_accounting(ray_cluster, tmp_path):
    rows = load_rotten_tomatoes(seed=11, limit=41).to_pylist()
    records = [{"text": row["text"]} for row in rows[:40]] + [{"text": rows[0]["text"]}, {"text": None}]
    corpus = write_jsonl(tmp_path / "corpus.jsonl", records)
    cfg = make_config(
        corpus={"source": str(corpus), "rows_per_block": 16},
        teacher={"backend": "transformers", "batch_size": 8},
        store={"path": str(tmp_path / "store"), "rows_per_part": 8},
    )
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump()))
    root = Path(PseudoLabelStore(cfg).root)
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    killed = subprocess.run(
        [sys.executable, "-c", KILL_IN_FINALIZE, str(config_file), "labels.parquet"], cwd=ROOT, env=env, check=False
    )
    assert killed.returncode == -signal.SIGKILL
    assert (root / "labels.parquet").exists() and not (root / "manifest.json").exists()  # killed mid-finalize

    summary = run_labeling(cfg)  # resumes: nothing is labeled again, and the accounting is exact
    assert (summary.resumed_rows, summary.labeled_this_run, summary.rejected_this_run) == (42, 0, 0)
    assert (summary.rows, summary.labeled, summary.rejected, summary.duplicates) == (42, 40, 2, 1)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["counts"]["rows"] == 42

    # A line inserted at the top shifts every file:line after it; resume goes by content, so only it is new.
    new_text = rows[40]["text"]
    corpus.write_text(json.dumps({"text": new_text}) + "\n" + corpus.read_text())
    again = run_labeling(cfg)
    assert (again.resumed_rows, again.labeled_this_run, again.rejected_this_run) == (42, 1, 0)
    assert (again.rows, again.labeled, again.rejected, again.duplicates) == (43, 41, 2, 1)
    labels = pq.read_table(again.labels_path).to_pylist()
    assert sorted(row["text"] for row in labels) == sorted({r["text"] for r in records[:40]} | {new_text})


def test_model_actor_pools_run_each_call_in_the_thread_that_built_the_model(ray_cluster):
    # A second thread costs a CPU model a second OpenMP team (see model_actor_pool).
    import threading

    import ray.data

    from llkd_ray.labeling import teacher_pool
    from llkd_ray.ray_session import model_actor_pool

    class ThreadRecorder:  # defined here so that Ray pickles it by value
        def __init__(self):
            self.init_thread = threading.get_ident()

        def __call__(self, batch):
            return {"same_thread": [threading.get_ident() == self.init_thread] * len(batch["id"])}

    for pool in (model_actor_pool(1), teacher_pool(make_config(teacher={"max_actors": 2}))):
        rows = (
            ray.data.from_items([{"id": i} for i in range(12)])
            .map_batches(ThreadRecorder, batch_size=4, compute=pool, num_cpus=0.5)
            .take_all()
        )
        assert len(rows) == 12 and all(row["same_thread"] for row in rows)
