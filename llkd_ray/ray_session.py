"""Connecting to Ray (an existing cluster when one is named or RAY_ADDRESS is set, else a local one), and the
Ray Data actor pool that model-holding stages share."""

from __future__ import annotations

import json
import os

from llkd_ray.config import RayConfig

# Forwarded to every worker so actors on other nodes see the same offline/cache settings as the driver.
FORWARDED_ENV = (
    "HF_HUB_OFFLINE",
    "LLKD_CACHE",
    "VLLM_CPU_KVCACHE_SPACE",
    "VLLM_ENABLE_V1_MULTIPROCESSING",
    "DS_ACCELERATOR",
)


def _set_by_the_job() -> set[str]:
    """Env vars the Ray Job's own runtime_env sets (``llkd submit`` forwards the same ones): a job driver that
    sets them again fails in ray.init with a runtime-env conflict."""
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    return set((job_config.get("runtime_env") or {}).get("env_vars") or {})


def init_ray(cfg: RayConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    taken = _set_by_the_job()
    env_vars = {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ and key not in taken}
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env_vars} if env_vars else None, log_to_driver=True)
        return
    # Ray 2.60 turns token auth on by default; a cluster this process starts for itself needs none.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        num_cpus=cfg.num_cpus,
        include_dashboard=cfg.include_dashboard,
        object_store_memory=cfg.object_store_memory_mb * 2**20 if cfg.object_store_memory_mb else None,
        runtime_env={"env_vars": env_vars},
    )


def threads_per_copy(explicit: int | None, copies: int, cpus_each: float, cores: int | None = None) -> int:
    """Torch/OpenMP threads for one of ``copies`` actors or replicas that ask ``cpus_each`` CPUs each.

    ``explicit`` wins. Otherwise the node's cores are shared among as many copies as Ray can place on one node, so
    copies packed on a node do not oversubscribe it (four 16-thread actors on 16 cores ran four OpenMP teams on
    every core), and a lone copy still uses every core: Ray exports OMP_NUM_THREADS=num_cpus, one thread for a
    fractional CPU, which would leave half of a 2-core box idle.
    """
    if explicit:
        return explicit
    cores = cores or os.cpu_count() or 1
    fit = int(cores // cpus_each) if cpus_each > 0 else copies
    return max(1, cores // max(1, min(copies, fit)))


def model_actor_pool(size: int, max_size: int | None = None):
    """A Ray Data actor pool whose UDF runs in the actor's own thread, the one that built the model.

    By default Ray Data runs each call of a class UDF in a second thread (``make_callable_class_single_threaded``),
    which buys nothing at one call per actor and costs a CPU model a second OpenMP team: on 2 cores the teacher's
    actor labeled at 28.6 rows/s that way and 33.5 this way, against bare vLLM's 33.9 (teacher_throughput.py).
    One call at a time per actor (Ray's default ``max_concurrency=1``) keeps a GPU from running two at once.
    """
    from ray.data import ActorPoolStrategy

    if max_size:
        return ActorPoolStrategy(min_size=size, max_size=max_size, enable_true_multi_threading=True)
    return ActorPoolStrategy(size=size, enable_true_multi_threading=True)
