"""Shared fixtures: one real local Ray cluster per session, real small models from PyPI packages, offline."""
from __future__ import annotations

import os

# Set before anything imports ray, vllm or transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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


def make_config(**sections):
    """A config on the small SmolLM2 teacher; ``sections`` replace or extend the defaults per section."""
    data = {
        "task": SENTIMENT_TASK,
        "teacher": {"model": "smollm2-135m-instruct", "batch_size": 16, "num_cpus": 1},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return config_from_dict(data)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """The one Ray cluster of the test session (a second cluster on one host kills the first one's jobs)."""
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=300 * 2**20,
        _temp_dir="/tmp/llkd_ray_tests",
        runtime_env={"env_vars": {key: os.environ[key] for key in (
            "HF_HUB_OFFLINE", "VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING", "TOKENIZERS_PARALLELISM")}},
    )
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


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
