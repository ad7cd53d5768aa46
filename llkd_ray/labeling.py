"""The label stage: corpus → teacher actors on Ray Data → pseudo-label store.

Ray Data streams corpus blocks through a pool of teacher actors (vLLM or transformers); the driver commits each
scored batch to the store as it arrives, so the store always holds every row finished so far.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from llkd_ray.config import Config
from llkd_ray.corpus import read_corpus
from llkd_ray.pseudo_label_store import PseudoLabelStore, StoreSummary
from llkd_ray.ray_session import init_ray
from llkd_ray.teacher import TeacherActor


def teacher_remote_args(cfg: Config) -> dict:
    """Where teacher actors may run: CPUs/GPUs, an accelerator type or custom resources, all from config."""
    teacher = cfg.teacher
    args = {
        "num_cpus": teacher.num_cpus,
        "num_gpus": teacher.num_gpus * teacher.vllm.tensor_parallel_size if teacher.backend == "vllm" else teacher.num_gpus,
        "max_restarts": teacher.max_actor_restarts,
        "max_task_retries": teacher.max_actor_restarts,
    }
    if teacher.resources:
        args["resources"] = dict(teacher.resources)
    if teacher.accelerator_type:
        args["accelerator_type"] = teacher.accelerator_type
    return args


def _skip_stored(batch: pa.Table, stored: set[str]) -> pa.Table:
    return batch.filter(pc.invert(pc.is_in(batch["source"], value_set=pa.array(sorted(stored), type=pa.string()))))


def run_labeling(cfg: Config) -> StoreSummary:
    """Label every corpus row the store does not hold yet, then consolidate the store."""
    import ray.data
    from ray.data import ActorPoolStrategy

    init_ray(cfg.ray)
    store = PseudoLabelStore(cfg)
    stored = store.stored_sources()
    if stored:
        print(f"[llkd] resuming: {len(stored)} rows already in {store.display_root}")
    ds = read_corpus(cfg.corpus)
    if stored:
        ds = ds.map_batches(_skip_stored, fn_kwargs={"stored": stored}, batch_format="pyarrow")
    remote_args = teacher_remote_args(cfg)
    ds = ds.map_batches(
        TeacherActor,
        fn_constructor_kwargs={"config": cfg},
        batch_size=cfg.teacher.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=cfg.teacher.num_actors),
        **remote_args,
    )
    labeled = rejected = 0
    with tqdm(desc="teacher", unit="row", dynamic_ncols=True) as progress:
        for batch in ds.iter_batches(batch_size=cfg.store.rows_per_part, batch_format="pyarrow"):
            new_labeled, new_rejected = store.commit(batch)
            labeled, rejected = labeled + new_labeled, rejected + new_rejected
            progress.update(batch.num_rows)
            progress.set_postfix(labeled=labeled, rejected=rejected)
    summary = store.finalize(labeled_this_run=labeled, rejected_this_run=rejected, resumed_rows=len(stored))
    print(f"[llkd] {summary.describe()}")
    return summary
