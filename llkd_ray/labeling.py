"""The label stage: corpus → teacher actors on Ray Data → pseudo-label store.

Ray Data streams corpus blocks through a pool of teacher actors (vLLM or transformers); the driver commits each
scored batch to the store as it arrives, so the store always holds every row finished so far.
"""

from __future__ import annotations

import logging

from tqdm import tqdm

from llkd_ray.config import Config
from llkd_ray.console import progress_stream
from llkd_ray.corpus import key_set, read_corpus, rows_by_key
from llkd_ray.model_sources import converts_on_first_use
from llkd_ray.pseudo_label_store import PseudoLabelStore, StoreSummary
from llkd_ray.ray_session import init_ray, model_actor_pool
from llkd_ray.teacher import TeacherActor

logger = logging.getLogger(__name__)


def teacher_placement(cfg: Config) -> dict:
    """Where teacher actors may run: CPUs/GPUs, an accelerator type or custom resources, all from config.

    Ray Data already restarts a dead actor and retries its tasks (max_restarts=-1), so a lost node costs
    time, not rows.
    """
    teacher = cfg.teacher
    gpus_per_engine = teacher.num_gpus * (teacher.vllm.tensor_parallel_size if teacher.backend == "vllm" else 1)
    placement = {"num_cpus": teacher.num_cpus, "num_gpus": gpus_per_engine or None}
    if teacher.memory_gib:
        placement["memory"] = int(teacher.memory_gib * 2**30)
    if teacher.resources:
        placement["resources"] = dict(teacher.resources)
    if teacher.accelerator_type:
        placement["accelerator_type"] = teacher.accelerator_type
    return placement


def teacher_pool(cfg: Config):
    """A fixed pool of ``num_actors``, or one that autoscales up to ``max_actors`` (cloud GPU clusters)."""
    return model_actor_pool(cfg.teacher.num_actors, cfg.teacher.max_actors)


def run_labeling(cfg: Config, keys: set[str] | None = None) -> StoreSummary:
    """Label every corpus row the store does not hold yet (only those whose key is in ``keys``, when given: a
    budget round), then consolidate the store."""
    init_ray(cfg.ray)
    store = PseudoLabelStore(cfg)
    with store.writer():  # a second `llkd label` on this store is refused before it labels anything
        return _label_missing_rows(cfg, store, keys)


def _label_missing_rows(cfg: Config, store: PseudoLabelStore, keys: set[str] | None) -> StoreSummary:
    stored = store.stored_keys()
    ds = read_corpus(cfg.corpus)
    if keys is not None:
        ds = ds.map_batches(
            rows_by_key, fn_kwargs={"keys": key_set(keys - stored), "keep": True}, batch_format="pyarrow"
        )
        stored = stored & keys  # what this call resumes from: the requested rows already in the store
    elif stored:
        logger.info("resuming: %d rows already in %s", len(stored), store.display_root)
        ds = ds.map_batches(rows_by_key, fn_kwargs={"keys": key_set(stored), "keep": False}, batch_format="pyarrow")
    # One pass over the corpus without the teacher first: it sizes the progress bar, and if nothing is left no
    # engine loads and, on a cloud cluster, no GPU node is launched to find that out.
    remaining = ds.count()
    labeled = rejected = 0
    if remaining == 0:
        logger.info("every corpus row is already in the store: the teacher is not started")
    else:
        labeled, rejected = _label(cfg, ds, store, remaining)
    summary = store.finalize(labeled_this_run=labeled, rejected_this_run=rejected, resumed_rows=len(stored))
    logger.info(summary.describe())
    return summary


def _label(cfg: Config, ds, store: PseudoLabelStore, total: int) -> tuple[int, int]:
    """Stream the rows through the teacher actors, committing each batch; returns (labeled, rejected)."""
    teacher = cfg.teacher
    pool = f"{teacher.num_actors}" + (f" to {teacher.max_actors}" if teacher.max_actors else "")
    logger.info(
        "teacher %s (%s) on %s actor(s) labels %d rows; the first rows wait for the engine to load%s",
        teacher.model,
        teacher.backend,
        pool,
        total,
        " (a first run on this machine converts the teacher from GGUF first, once)"
        if converts_on_first_use(teacher.model)
        else "",
    )
    ds = ds.map_batches(
        TeacherActor,
        fn_constructor_kwargs={"config": cfg},
        batch_size=teacher.batch_size,
        batch_format="pyarrow",
        compute=teacher_pool(cfg),
        **teacher_placement(cfg),
    )
    labeled = rejected = 0
    with tqdm(
        desc="[llkd] labeling", total=total, unit="row", dynamic_ncols=True, file=progress_stream(), mininterval=1.0
    ) as progress:
        for batch in ds.iter_batches(batch_size=cfg.store.rows_per_part, batch_format="pyarrow"):
            new_labeled, new_rejected = store.commit(batch)
            labeled, rejected = labeled + new_labeled, rejected + new_rejected
            progress.update(batch.num_rows)
            progress.set_postfix(rejected=rejected, refresh=False)
    return labeled, rejected
