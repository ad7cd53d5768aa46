"""Ray Jobs on a real multi-node cluster (loopback): `ray job submit` of the whole run with the teacher placed on
the node that holds the "GPU" resource, and a teacher node killed mid-labeling."""

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from llkd_ray.corpus import load_rotten_tomatoes
from llkd_ray.labeling import run_labeling
from llkd_ray.pseudo_label_store import PseudoLabelStore, read_labels
from tests.conftest import GPU_NODE_RESOURCE, RAY, make_config, node_id_with_resource

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def write_corpus(path: Path, count: int, seed: int) -> Path:
    rows = load_rotten_tomatoes(seed=seed, limit=count).to_pylist()
    path.write_text("".join(json.dumps({"text": r["text"], "label": r["gold"]}) + "\n" for r in rows))
    return path


def teacher_actors() -> dict[str, str]:
    """{actor id: node id} of every teacher actor the cluster has seen (alive or not)."""
    from ray.util.state import list_actors

    actors = list_actors(
        filters=[("class_name", "=", "MapWorker(MapBatches(TeacherActor))")], limit=1000, raise_on_missing_output=False
    )
    return {actor.actor_id: actor.node_id for actor in actors}


def teacher_nodes() -> set[str]:
    return set(teacher_actors().values())


def submit_when_ready(command: list[str], dashboard: str) -> subprocess.CompletedProcess:
    """Run a submitting command; a freshly started head takes a few seconds before its job agent accepts jobs."""
    for _ in range(12):
        submitted = subprocess.run(
            command, capture_output=True, text=True, timeout=900, cwd=ROOT, env={**os.environ, "RAY_ADDRESS": dashboard}
        )
        if "No available agent to submit job" not in submitted.stderr + submitted.stdout:
            return submitted
        time.sleep(5)
    return submitted


def test_submitted_run_places_the_teacher_on_the_gpu_node(ray_cluster, tmp_path):
    """`ray job submit --working-dir .` of jobs/run.py, every output on a filesystem URI (as on s3://)."""
    corpus = write_corpus(tmp_path / "corpus.jsonl", 120, seed=31)
    remote = f"file://{tmp_path}/bucket"
    cfg = make_config(
        corpus={"source": str(corpus), "gold_column": "label"},
        teacher={"resources": {GPU_NODE_RESOURCE: 1}, "num_cpus": 0.5},
        store={"path": f"{remote}/store"},
        student={"max_length": 48},
        training={"strategy": "ddp", "epochs": 1, "cpus_per_worker": 0.5, "storage_path": f"{remote}/ray"},
        evaluation={"holdout": 30},
        output={"name": "submitted", "dir": f"{remote}/runs"},
    )
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump()))
    before = teacher_actors()
    submitted = submit_when_ready(
        [
            RAY,
            "job",
            "submit",
            "--address",
            ray_cluster.dashboard,
            "--working-dir",
            ".",
            "--",
            "python",
            "jobs/run.py",
            "--config",
            str(config_file),
        ],
        ray_cluster.dashboard,
    )
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert "succeeded" in submitted.stdout.lower()
    assert "published to file://" in submitted.stdout
    run_dir = tmp_path / "bucket" / "runs" / "submitted"
    for name in ("config.yaml", "report.md", "metrics.json", "student/config.json", "selection.png"):
        assert (run_dir / name).exists(), name
    assert (tmp_path / "bucket" / "store").is_dir() and (tmp_path / "bucket" / "ray" / "submitted").is_dir()
    new_teachers = {node for actor, node in teacher_actors().items() if actor not in before}
    assert new_teachers == {node_id_with_resource(GPU_NODE_RESOURCE)}


def test_llkd_submit_uploads_the_checkout_and_follows_the_job(ray_cluster, tmp_path):
    """`llkd submit label` through the Job Submission API: the checkout is uploaded as the job's working dir."""
    corpus = write_corpus(tmp_path / "corpus.jsonl", 40, seed=51)
    cfg = make_config(
        corpus={"source": str(corpus)}, teacher={"num_cpus": 0.5}, store={"path": str(tmp_path / "store")}
    )
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump()))
    llkd = str(Path(RAY).with_name("llkd"))
    submitted = submit_when_ready(
        [llkd, "submit", "label", "--address", ray_cluster.dashboard, "--config", str(config_file)],
        ray_cluster.dashboard,
    )
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    output = submitted.stdout + submitted.stderr
    job_id = output.split("submitted label as ")[1].split()[0]
    assert f"job {job_id} SUCCEEDED" in output
    from ray.job_submission import JobSubmissionClient

    runtime_env = JobSubmissionClient(ray_cluster.dashboard).get_job_info(job_id).runtime_env
    assert runtime_env["working_dir"].startswith("gcs://")  # uploaded, not a path on the submitting machine
    assert sorted(read_labels(cfg)["source"].to_pylist()) == sorted(f"{corpus}:{n}" for n in range(1, 41))


def raylet_pid(node_manager_port: int) -> int:
    found = subprocess.run(
        ["pgrep", "-f", f"raylet.*--node_manager_port={node_manager_port}"], capture_output=True, text=True
    ).stdout.split()
    assert found, f"no raylet on port {node_manager_port}"
    return int(found[0])


def label_in_background(cfg) -> tuple[threading.Thread, dict, Path]:
    """run_labeling on a thread: (the thread, where its summary lands, the store's parts directory)."""
    result: dict = {}
    labeling = threading.Thread(target=lambda: result.update(summary=run_labeling(cfg)), daemon=True)
    labeling.start()
    return labeling, result, Path(PseudoLabelStore(cfg).root) / "parts"


def wait_for_parts(parts: Path, count: int, labeling: threading.Thread, before: str) -> None:
    deadline = time.time() + 600
    while len(list(parts.glob("part-*.parquet"))) < count:
        assert labeling.is_alive() and time.time() < deadline, f"labeling ended or stalled before {before}"
        time.sleep(0.5)


def test_a_teacher_node_killed_mid_labeling_loses_and_duplicates_nothing(ray_cluster, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl", 240, seed=41)
    cfg = make_config(
        corpus={"source": str(corpus), "gold_column": "label", "rows_per_block": 16},
        teacher={"resources": {"doomed_node": 1}, "batch_size": 8, "num_cpus": 0.5},
        store={"path": str(tmp_path / "store"), "rows_per_part": 8},
    )
    doomed = ray_cluster.start_node({"doomed_node": 1})
    labeling, result, parts = label_in_background(cfg)
    wait_for_parts(parts, 3, labeling, before="the kill")
    labeled_before_the_kill = len(PseudoLabelStore(cfg).stored_keys())
    os.kill(raylet_pid(doomed), signal.SIGKILL)  # the node dies with its teacher actor, mid-stream
    assert labeled_before_the_kill < 240, "every row was labeled before the node died: nothing was tested"
    replacement = ray_cluster.start_node({"doomed_node": 1})  # what the autoscaler does for a lost node
    labeling.join(timeout=900)
    assert not labeling.is_alive(), "labeling did not finish after the node was replaced"
    summary = result["summary"]
    assert (summary.rows, summary.labeled, summary.rejected) == (240, 240, 0)
    sources = pq.read_table(summary.labels_path, columns=["source"])["source"].to_pylist()
    assert sorted(sources) == sorted(f"{corpus}:{n}" for n in range(1, 241))  # nothing lost, nothing twice
    os.kill(raylet_pid(replacement), signal.SIGKILL)


def node_id_of(node_manager_port: int) -> str:
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"] and n["NodeManagerPort"] == node_manager_port]
    assert len(nodes) == 1, f"no live node on port {node_manager_port}"
    return nodes[0]["NodeID"]


def test_the_teacher_pool_grows_onto_a_node_that_joins_mid_labeling(ray_cluster, tmp_path):
    """num_actors=1, max_actors=2: the pool starts on the one teacher node; when a second one joins (what the
    cluster autoscaler does for the pending actor), a second teacher lands there. Every row once."""
    rows = 800  # enough work left, when the node joins, for a second engine to load and take some of it
    corpus = write_corpus(tmp_path / "corpus.jsonl", rows, seed=71)
    cfg = make_config(
        corpus={"source": str(corpus), "rows_per_block": 16},
        teacher={"resources": {"grow_node": 1}, "batch_size": 8, "num_cpus": 0.5, "num_actors": 1, "max_actors": 2},
        store={"path": str(tmp_path / "store"), "rows_per_part": 8},
    )
    first = ray_cluster.start_node({"grow_node": 1})
    labeling, result, parts = label_in_background(cfg)
    wait_for_parts(parts, 2, labeling, before="the node joined")
    assert teacher_nodes() >= {node_id_of(first)}
    second = ray_cluster.start_node({"grow_node": 1})
    parts_when_it_joined = len(list(parts.glob("part-*.parquet")))
    labeling.join(timeout=900)
    assert not labeling.is_alive(), "labeling did not finish"
    assert parts_when_it_joined < rows / 8, "the node joined after labeling was over"
    expected_nodes = {node_id_of(first), node_id_of(second)}
    assert expected_nodes <= teacher_nodes(), (expected_nodes, teacher_nodes())
    summary = result["summary"]
    assert (summary.rows, summary.labeled, summary.rejected) == (rows, rows, 0)
    sources = pq.read_table(summary.labels_path, columns=["source"])["source"].to_pylist()
    assert sorted(sources) == sorted(f"{corpus}:{n}" for n in range(1, rows + 1))  # nothing lost, nothing twice
    for port in (first, second):
        os.kill(raylet_pid(port), signal.SIGKILL)
