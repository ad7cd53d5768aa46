"""Shared fixtures: one real local Ray cluster per session, real small models from PyPI packages, offline."""

from __future__ import annotations

import os

# Set before anything imports ray, vllm or transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib
import json
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from llkd_ray.config import config_from_dict, load_config

SENTIMENT_TASK = {
    "instruction": "Classify the sentiment of each movie review snippet as positive or negative.",
    "labels": [{"name": "positive"}, {"name": "negative"}],
    "examples": [
        {"text": "A warm, funny and beautifully acted film.", "label": "positive"},
        {"text": "A tedious, clumsy mess.", "label": "negative"},
    ],
}


# A test that uses one of these starts a Ray cluster or loads a real LLM: it is in the slow tier, whatever its
# file says. `pytest -m "not slow"` is the fast tier (pure logic, config, readers, metrics: about a minute).
SLOW_FIXTURES = {"ray_cluster", "smollm2_dir", "smollm2_tokenizer"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def make_config(**sections):
    """A config on the small SmolLM2 teacher; ``sections`` replace or extend the defaults per section."""
    data = {
        "task": SENTIMENT_TASK,
        "teacher": {"model": "smollm2-135m-instruct", "batch_size": 16, "num_cpus": 1},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return config_from_dict(data)


RAY = str(Path(sys.executable).parent / "ray")
# Job drivers run `python` from PATH: make it this interpreter (the venv), as a cluster image would.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
# Forwarded to every worker the test cluster starts.
WORKER_ENV = (
    "HF_HUB_OFFLINE",
    "RAY_AUTH_MODE",
    "VLLM_CPU_KVCACHE_SPACE",
    "VLLM_ENABLE_V1_MULTIPROCESSING",
    "TOKENIZERS_PARALLELISM",
)
GPU_NODE_RESOURCE = "gpu_node"  # what the second node offers in place of a GPU


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class TestCluster:
    address: str  # GCS address, for ray.init and RAY_ADDRESS
    dashboard: str  # for `ray job submit --address`

    def start_node(self, resources: dict, num_cpus: int = 1) -> int:
        """Join one more node (same host); returns its node-manager port, which identifies its raylet. Each node
        gets its own temp dir, as real nodes have their own disks: nodes sharing one would share the runtime-env
        cache, and one node deleting a job's working directory would pull it from under the other's driver."""
        port = free_port()
        subprocess.run(
            [
                RAY,
                "start",
                "--address",
                self.address,
                f"--num-cpus={num_cpus}",
                f"--temp-dir={TEST_TEMP_DIR}_n{port}",
                f"--resources={json.dumps(resources)}",
                f"--node-manager-port={port}",
                "--object-store-memory=200000000",
                "--disable-usage-stats",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        return port


def node_id_with_resource(resource: str) -> str:
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"] and resource in n["Resources"]]
    assert len(nodes) == 1, f"expected one live node with {resource}: {nodes}"
    return nodes[0]["NodeID"]


@pytest.fixture(scope="session")
def ray_cluster():
    """The one Ray cluster of the test session, multi-node on loopback: a head (2 CPUs, dashboard and job server)
    plus a node that holds a custom resource standing in for a GPU. One cluster per host: a second one on the
    same machine would kill the first one's jobs."""
    import ray

    from llkd_ray.config import ServeConfig
    from llkd_ray.serving import use_throughput_optimized_serve

    use_throughput_optimized_serve(ServeConfig())  # Serve as `llkd serve` runs it on a cluster it starts
    port, dashboard_port = free_port(), free_port()
    subprocess.run(
        [
            RAY,
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--object-store-memory=300000000",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--temp-dir={TEST_TEMP_DIR}",
            "--disable-usage-stats",
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    cluster = TestCluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}")
    cluster.start_node({GPU_NODE_RESOURCE: 1})
    ray.init(
        address=cluster.address,
        runtime_env={"env_vars": {key: os.environ[key] for key in WORKER_ENV if key in os.environ}},
    )
    yield cluster
    ray.shutdown()
    stop_test_cluster()


# Every process of the test cluster names its temp dir on its command line (head and joined nodes alike), so the
# teardown stops this cluster alone: `ray stop` would also kill any other Ray cluster on the host.
TEST_TEMP_DIR = "/tmp/llkd_ray_tests"


def stop_test_cluster(timeout_s: float = 60) -> None:
    import psutil

    def ours(process: psutil.Process) -> bool:
        try:
            return TEST_TEMP_DIR in " ".join(process.cmdline())
        except psutil.Error:
            return False

    victims = [process for process in psutil.process_iter() if process.pid != os.getpid() and ours(process)]
    # The raylet's agents retitle themselves ("ray::DashboardAgent") and would outlive it: take its children too.
    for process in list(victims):
        with contextlib.suppress(psutil.Error):
            victims += [child for child in process.children(recursive=True) if child not in victims]
    for process in victims:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(victims, timeout=timeout_s)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


@pytest.fixture(scope="session")
def smollm2_dir():
    from llkd_ray.model_sources import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture()
def default_config():
    return load_config()
