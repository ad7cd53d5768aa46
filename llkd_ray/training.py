"""The train stage: Ray Train workers run one loop, with a distributed score-and-select step every epoch.

Each epoch, on every worker:
  1. score its shard of the pool with the current student (no gradients): only the teacher-confident rows
     when the selector cannot pick others;
  2. all-gather the pool's scores, so every worker computes the same thresholds and the same selection
     (which therefore does not depend on the number of workers);
  3. train on the selected samples of its own shard with the selection's weights: the same number of optimizer
     steps every epoch for every selector and on every worker (cycling a small selection), under one learning-rate
     schedule over the whole run;
  4. evaluate on its shard of the gold-labelled holdout, and report metrics with a checkpoint.
The final checkpoint also carries the student exported in Hugging Face format (ZeRO-3 shards gathered first).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np
import pyarrow as pa

from llkd_ray.config import Config, TrainingConfig
from llkd_ray.errors import UserError
from llkd_ray.storage import absolute

STATE_FILE = "llkd_state.json"
STUDENT_DIR = "student"
# Scores are rounded before selection so float noise from different batch shapes (1 vs N workers) cannot
# move a sample across a threshold.
SCORE_DECIMALS = 6


# ---- driver side ------------------------------------------------------------------------------------------------
def split_pool_and_holdout(labels: pa.Table, cfg: Config) -> tuple[pa.Table, pa.Table]:
    """(pool, holdout): the holdout is ``evaluation.holdout`` gold-labelled rows chosen by id hash; the pool
    is every other row, with the teacher's distribution (calibrated if configured) and label."""
    names = cfg.task.label_names
    probs_column = "probs_calibrated" if cfg.teacher.calibrate else "probs_raw"
    rows = labels.select(["id", "text", "gold", probs_column, "label_index"]).to_pylist()
    chosen = holdout_ids([row["id"] for row in rows], [row["gold"] for row in rows], names, cfg.evaluation.holdout)
    holdout = sorted((row for row in rows if row["id"] in chosen), key=lambda row: _id_order(row["id"]))
    pool = sorted((row for row in rows if row["id"] not in chosen), key=lambda row: _id_order(row["id"]))
    pool_table = pa.table(
        {
            "pool_index": pa.array(range(len(pool)), type=pa.int64()),
            "id": [r["id"] for r in pool],
            "text": [r["text"] for r in pool],
            "teacher_probs": pa.array([r[probs_column] for r in pool], type=pa.list_(pa.float32())),
            "teacher_label": pa.array([r["label_index"] for r in pool], type=pa.int32()),
            "gold_index": pa.array(
                [names.index(r["gold"]) if r["gold"] in names else -1 for r in pool], type=pa.int32()
            ),
        }
    )
    holdout_table = pa.table(
        {
            "id": [r["id"] for r in holdout],
            "text": [r["text"] for r in holdout],
            "gold_index": pa.array([names.index(r["gold"]) for r in holdout], type=pa.int32()),
            "teacher_probs": pa.array([r[probs_column] for r in holdout], type=pa.list_(pa.float32())),
        }
    )
    return pool_table, holdout_table


def _id_order(row_id: str) -> str:
    import hashlib

    return hashlib.sha256(row_id.encode()).hexdigest()


def holdout_ids(ids: list[str], golds: list[str | None], label_names: list[str], size: int) -> set[str]:
    """The ``size`` gold-labelled ids first in the order of their hash: the holdout, fixed whatever the corpus
    order, and chosen before labeling when a budget decides what the teacher labels."""
    gold_ids = sorted({i for i, gold in zip(ids, golds) if gold in label_names}, key=_id_order)
    return set(gold_ids[:size])


def _padded_for_equal_split(table: pa.Table, workers: int, index_column: str) -> pa.Table:
    """Ray Train splits datasets with equal=True, which drops rows unless the count divides evenly: pad with
    sentinel rows (index -1) that workers skip."""
    missing = (-table.num_rows) % workers
    if not missing:
        return table
    filler = {name: pa.nulls(missing, type=table.schema.field(name).type) for name in table.column_names}
    filler[index_column] = pa.array([-1] * missing, type=table.schema.field(index_column).type)
    return pa.concat_tables([table, pa.table(filler, schema=table.schema)])


def worker_resources(training: TrainingConfig) -> dict[str, float]:
    """What one Ray Train worker reserves (``ScalingConfig.resources_per_worker``)."""
    resources = {"CPU": training.cpus_per_worker, **training.resources_per_worker}
    if training.gpus_per_worker:
        resources["GPU"] = training.gpus_per_worker
    return resources


# What a checkpoint's training depends on. A re-run under the same output.name resumes from its checkpoint, so a
# run with a different recipe must not silently continue another one (where it runs, on how many workers, and
# how many failures it may survive are left out: changing those resumes the same run).
_NOT_RECIPE = {
    "storage_path",
    "max_failures",
    "checkpoints_to_keep",
    "num_workers",
    "cpus_per_worker",
    "gpus_per_worker",
    "accelerator_type",
    "resources_per_worker",
    "torch_threads",
    "score_batch_size",
}


def recipe_fingerprint(cfg: Config, pool_size: int) -> str:
    import hashlib

    recipe = {
        "selection": cfg.selection.model_dump(),
        "training": cfg.training.model_dump(exclude=_NOT_RECIPE),
        "student": cfg.student.model_dump(),
        "labels": cfg.task.label_names,
        "pool_size": pool_size,
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_resumable(cfg: Config, pool_size: int) -> None:
    """Refuse to resume a run whose checkpoints were trained with another recipe (see ``recipe_fingerprint``)."""
    from pyarrow import fs as pafs

    from llkd_ray import storage
    from llkd_ray.engines import (
        ZERO_STAGE_FILE,
        ZERO_STAGE_RECORD_LIMIT,
        check_zero_stage,
        effective_zero_stage,
        read_zero_stage,
    )

    filesystem, root = storage.resolve(absolute(cfg.training.storage_path))
    run_root = f"{root.rstrip('/')}/{cfg.output.name}"
    found = filesystem.get_file_info(pafs.FileSelector(run_root, recursive=True, allow_not_found=True))
    expected = recipe_fingerprint(cfg, pool_size)
    for info in found:
        if info.base_name == ZERO_STAGE_FILE and cfg.training.strategy == "deepspeed":
            # Checked here too, so a worker count that changes the stage fails now, not after max_failures retries.
            with filesystem.open_input_stream(info.path) as stream:
                saved_stage = read_zero_stage(stream.read(ZERO_STAGE_RECORD_LIMIT), info.path)
            check_zero_stage(saved_stage, effective_zero_stage(cfg.training.zero_stage, cfg.training.num_workers))
        if info.base_name != STATE_FILE:
            continue
        with filesystem.open_input_stream(info.path) as stream:
            saved = _saved_recipe(stream.read(STATE_RECORD_LIMIT))
        if saved is None:
            raise UserError(
                f"{info.path} is damaged (not a JSON object with the run's recipe): set output.name to a new name,"
                " or delete that run's directory to start over"
            )
        if saved != expected:
            raise UserError(
                f"{storage.join(cfg.training.storage_path, cfg.output.name)} holds a run named {cfg.output.name!r}"
                " trained with another configuration (selection, training, student, labels or pool); a run of"
                " the same name would resume it. Set output.name to a new name, or delete that directory to"
                " start over"
            )


STATE_RECORD_LIMIT = 2**20  # bytes read from a checkpoint's llkd_state.json (a few KB; a planted huge file is cut)


def _saved_recipe(text: bytes) -> str | None:
    """The recipe fingerprint a checkpoint's state records, or None where the file is damaged or altered."""
    try:
        state = json.loads(text)
    except (ValueError, RecursionError):
        return None
    recipe = state.get("recipe") if isinstance(state, dict) else None
    return recipe if isinstance(recipe, str) else None


@dataclass
class TrainResult:
    student_dir: Path
    history: list[dict]
    used_pool_indices: list[int]
    checkpoint_path: str


def train_student(
    cfg: Config, pool: pa.Table, holdout: pa.Table, run_dir: Path, fail_once_at: tuple[int, str] | None = None
) -> TrainResult:
    """Run the Ray Train job and copy the exported student into ``run_dir/student``.

    ``fail_once_at=(epoch, marker_path)`` kills the rank-0 worker process once at that epoch (fault injection
    for testing recovery; the marker file records that it happened).
    """
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    check_resumable(cfg, pool.num_rows)
    training = cfg.training
    workers = training.num_workers
    holdout = holdout.append_column("holdout_index", pa.array(range(holdout.num_rows), type=pa.int64()))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg, "pool_size": pool.num_rows, "fail_once_at": fail_once_at},
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=training.gpus_per_worker > 0,
            resources_per_worker=worker_resources(training),
            accelerator_type=training.accelerator_type,
        ),
        run_config=RunConfig(
            name=cfg.output.name,
            storage_path=absolute(training.storage_path),
            failure_config=FailureConfig(max_failures=training.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=training.checkpoints_to_keep),
        ),
        datasets={
            "pool": ray.data.from_arrow(_padded_for_equal_split(pool, workers, "pool_index")),
            "holdout": ray.data.from_arrow(_padded_for_equal_split(holdout, workers, "holdout_index")),
        },
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training produced no checkpoint: {result.error}")
    student_dir = Path(run_dir) / STUDENT_DIR
    with result.checkpoint.as_directory() as directory:
        state = json.loads((Path(directory) / STATE_FILE).read_text())
        if student_dir.exists():
            shutil.rmtree(student_dir)
        shutil.copytree(Path(directory) / STUDENT_DIR, student_dir)
    return TrainResult(student_dir, state["history"], state["used"], result.checkpoint.path)


# ---- the recipe (pure functions, the same for every selector) ----------------------------------------------------
def steps_per_epoch(training: TrainingConfig, pool_size: int) -> int:
    """Optimizer steps per epoch, the same for every selector (see TrainingConfig.steps_per_epoch)."""
    if training.steps_per_epoch:
        return training.steps_per_epoch
    samples_per_step = training.batch_size * training.num_workers
    return max(training.min_steps_per_epoch, math.ceil(training.epoch_fraction * pool_size / samples_per_step))


def learning_rate_at(step: int, total_steps: int, training: TrainingConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of ``total_steps``: linear warm-up over
    ``warmup_ratio`` of the steps, then linear or cosine decay to 0 at the end, or constant. A pure function of
    the step, so a resumed run continues the schedule exactly where it stopped."""
    peak = training.learning_rate
    warmup = math.ceil(training.warmup_ratio * total_steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    if training.lr_schedule == "constant":
        return peak
    progress = (step - warmup) / max(total_steps - warmup, 1)
    if training.lr_schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * progress))
    return peak * (1 - progress)


def distillation_loss(logits, targets, teacher_probs, weights, training: TrainingConfig):
    """Σ w_i · [(1 - a)·CE(logits_i, y_i) + a·T²·KL(p_i^(1/T) ‖ softmax(logits_i / T))] / batch size."""
    import torch
    import torch.nn.functional as F

    per_sample = F.cross_entropy(logits, targets, reduction="none")
    alpha = training.soft_label_weight
    if alpha > 0:
        temperature = training.distill_temperature
        tempered = torch.softmax(torch.log(teacher_probs.clamp_min(1e-12)) / temperature, dim=-1)
        log_student = F.log_softmax(logits / temperature, dim=-1)
        kl = (tempered * (torch.log(tempered.clamp_min(1e-12)) - log_student)).sum(dim=-1)
        per_sample = (1 - alpha) * per_sample + alpha * temperature**2 * kl
    return (weights * per_sample).sum() / len(per_sample)


# ---- worker side ------------------------------------------------------------------------------------------------
@dataclass
class ShardPool:
    """This worker's shard of the pool, as typed columns."""

    index: np.ndarray  # [m] global pool index of each row
    texts: list[str]
    teacher_labels: np.ndarray  # [m]
    teacher_probs: np.ndarray  # [m, L]


class EpochMetrics(TypedDict, total=False):
    """One epoch's entry in metrics.json and the run's history (eval_* only when the holdout has gold)."""

    epoch: int
    loss: float
    selected: int
    selected_per_class: dict[str, int]
    llkd_count: int
    scored: int
    steps: int
    learning_rate: float
    teacher_thresholds: dict[str, float]
    student_thresholds: dict[str, float]
    cumulative_used: int
    cumulative_used_fraction: float
    eval_accuracy: float
    eval_macro_f1: float
    score_select_seconds: float
    train_seconds: float
    epoch_seconds: float
    finished_at: float


def _columns(shard, names: list[str], index_column: str) -> dict[str, list]:
    """Read a worker's dataset shard once into columns, skipping the padding rows."""
    columns: dict[str, list] = {name: [] for name in names}
    for batch in shard.iter_batches(batch_size=1024, batch_format="pyarrow"):
        keep = [i for i, index in enumerate(batch[index_column].to_pylist()) if index >= 0]
        for name in names:
            values = batch[name].to_pylist()
            columns[name].extend(values[i] for i in keep)
    return columns


def _shard_pool(shard) -> ShardPool:
    columns = _columns(shard, ["pool_index", "text", "teacher_probs", "teacher_label"], "pool_index")
    return ShardPool(
        index=np.asarray(columns["pool_index"], dtype=np.int64),
        texts=columns["text"],
        teacher_labels=np.asarray(columns["teacher_label"], dtype=np.int64),
        teacher_probs=np.asarray(columns["teacher_probs"], dtype=np.float64),
    )


class _Collective:
    """The few collectives the loop needs, on Ray Train's process group."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist

    def max(self, value: int) -> int:
        import torch

        tensor = torch.tensor([value], dtype=torch.long)
        self.dist.all_reduce(tensor, op=self.dist.ReduceOp.MAX)
        return int(tensor.item())

    def gather(self, obj) -> list:
        gathered = [None] * self.dist.get_world_size()
        self.dist.all_gather_object(gathered, obj)
        return gathered


def _gather_pool_rows(collective: _Collective, index: np.ndarray, values: np.ndarray, pool_size: int) -> np.ndarray:
    """Every worker's rows of ``values`` put together in global pool order (checked to cover the pool once)."""
    parts = collective.gather((index, values))
    order_index = np.concatenate([part[0] for part in parts])
    order = np.argsort(order_index)
    if len(order) != pool_size or not np.array_equal(order_index[order], np.arange(pool_size)):
        raise RuntimeError(f"pool shards do not cover the pool exactly ({len(order)} rows for {pool_size})")
    return np.concatenate([part[1] for part in parts])[order]


def _chunks(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def _score(engine, encode, texts: list[str], batch_size: int, collective: _Collective, num_labels: int) -> np.ndarray:
    """Student probabilities for ``texts``; every worker runs the same number of forwards (collectives inside).

    Texts are batched in order of length, so a batch pads to its own longest text rather than the shard's
    (on Rotten Tomatoes snippets, pool scoring went from 81 to 119 rows/s)."""
    import torch

    by_length = np.argsort([len(text) for text in texts], kind="stable")
    batches = _chunks(by_length.tolist(), batch_size)
    steps = collective.max(len(batches))
    probs = np.zeros((len(texts), num_labels))
    engine.train(False)
    with torch.no_grad():
        for step in range(steps):
            index = batches[step] if step < len(batches) else []
            batch = [texts[i] for i in index] or ["."]  # a throwaway forward keeps ranks in step
            batch_probs = torch.softmax(engine.logits(encode(batch)), dim=-1).float().cpu().numpy()
            if index:
                probs[index] = batch_probs
    return probs


def _score_pool(
    engine, encode, pool: ShardPool, wanted: np.ndarray, collective, pool_size: int, num_labels: int, batch_size: int
):
    """Student probabilities for the pool rows in ``wanted`` (a global mask), NaN for the rest: a selector that
    can only pick teacher-confident rows does not pay for scoring the others."""
    rows = np.flatnonzero(wanted[pool.index])
    local = np.full((len(pool.index), num_labels), np.nan)
    if wanted.any():
        local[rows] = _score(engine, encode, [pool.texts[i] for i in rows], batch_size, collective, num_labels)
    return np.round(_gather_pool_rows(collective, pool.index, local, pool_size), SCORE_DECIMALS)


def _length_grouped_batches(positions: np.ndarray, lengths: np.ndarray, batch_size: int, rng) -> list[list[int]]:
    """Shuffled batches of similar-length samples (transformers' ``group_by_length``): shuffle, sort windows of
    64 batches by length, cut them into batches, shuffle the batches. Less padding, still a random order."""
    shuffled = rng.permutation(positions)
    window = batch_size * 64
    batches = []
    for start in range(0, len(shuffled), window):
        chunk = shuffled[start : start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(_chunks(chunk.tolist(), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def epoch_batches(positions: np.ndarray, lengths: np.ndarray, batch_size: int, steps: int, rng) -> list[list[int]]:
    """Exactly ``steps`` length-grouped batches from ``positions``: passes over them in fresh random orders until
    the budget is spent, the last pass cut short. Empty when there is nothing to draw from."""
    batches: list[list[int]] = []
    while len(positions) and len(batches) < steps:
        batches.extend(_length_grouped_batches(positions, lengths, batch_size, rng))
    return batches[:steps]


def align_across_workers(batches: list[list[int]], lengths: np.ndarray, shared_rng) -> list[list[int]]:
    """This worker's batches in the order of a permutation every worker draws alike (``shared_rng`` is seeded the
    same on every rank) applied to its batches sorted by their longest text: at each step, every worker trains on
    the batch of the same length rank. Each DDP step waits for the slowest worker, and independently shuffled
    length-grouped batches made it wait for a longer batch than its own: on Rotten Tomatoes with 2 workers, the
    sum over steps of the longer padded batch was 23% above the mean. A worker's order stays a random one."""
    by_length = sorted(range(len(batches)), key=lambda i: (int(lengths[batches[i]].max()), i))
    return [batches[by_length[i]] for i in shared_rng.permutation(len(batches))]


@dataclass
class StepPlan:
    steps: int  # this epoch's optimizer steps, on every worker
    first_step: int  # the run-wide index of the first one (for the schedule)
    total_steps: int


def _train_epoch(
    engine, encode, pool: ShardPool, weights: np.ndarray, plan: StepPlan, cfg: Config, rng, shared_rng, average=None
) -> float:
    """This epoch's ``plan.steps`` optimizer steps on this worker's selected samples; returns their mean loss.
    A worker with nothing selected takes zero-weight steps, which keep the gradient all-reduce in step.
    ``rng`` forms this worker's batches; ``shared_rng`` (None for one worker) orders them alike on every worker.
    ``average`` (a WeightAverage) follows every step."""
    import torch

    training = cfg.training
    positions = np.flatnonzero(weights > 0)
    lengths = np.array([len(text) for text in pool.texts])
    batches = epoch_batches(positions, lengths, training.batch_size, plan.steps, rng)
    if shared_rng is not None:
        batches = align_across_workers(batches, lengths, shared_rng)
    engine.train(True)
    losses = []
    for step in range(plan.steps):
        engine.set_learning_rate(learning_rate_at(plan.first_step + step, plan.total_steps, training))
        if batches:
            index = batches[step]
            texts = [pool.texts[i] for i in index]
            targets, scale = torch.tensor(pool.teacher_labels[index]), torch.tensor(weights[index], dtype=torch.float32)
            teacher = torch.tensor(pool.teacher_probs[index], dtype=torch.float32)
        else:
            texts, targets, scale, teacher = ["."], torch.zeros(1, dtype=torch.long), torch.zeros(1), None
        logits = engine.logits(encode(texts))
        if teacher is None:
            teacher = torch.full_like(logits, 1.0 / logits.shape[-1])
        device = logits.device
        loss = distillation_loss(logits, targets.to(device), teacher.to(device), scale.to(device), training)
        engine.step(loss)
        if average is not None:
            average.update(engine.module)
        if batches:
            losses.append(float(loss.detach()))
    return float(np.mean(losses)) if losses else float("nan")


def _evaluate(engine, encode, holdout: dict, collective: _Collective, names: list[str], batch_size: int) -> dict:
    from llkd_ray.metrics import classification_report

    probs = _score(engine, encode, holdout["text"], batch_size, collective, len(names))
    gathered = collective.gather((holdout["gold_index"], probs.argmax(axis=1).tolist()))
    gold = np.concatenate([np.asarray(g, dtype=np.int64) for g, _ in gathered])
    predicted = np.concatenate([np.asarray(p, dtype=np.int64) for _, p in gathered])
    if not len(gold):
        return {}
    report = classification_report(gold, predicted, names)
    return {"eval_accuracy": report["accuracy"], "eval_macro_f1": report["macro_f1"]}


def epoch_line(metrics: dict, epochs: int, pool_size: int) -> str:
    """The one line a person sees per epoch (everything else is in metrics.json and the report)."""
    fields = [
        f"epoch {metrics['epoch']}/{epochs}",
        f"selected {metrics['selected']:>6,} ({metrics['selected'] / max(pool_size, 1):6.1%} of the pool)",
        f"loss {metrics['loss']:.4f}",
    ]
    if "eval_macro_f1" in metrics:
        fields.append(f"holdout macro-F1 {metrics['eval_macro_f1']:.3f}")
    fields.append(f"{metrics['epoch_seconds']:.1f} s")
    return " | ".join(fields)


def _maybe_fail(fail_once_at: tuple[int, str] | None, epoch: int, rank: int, cfg: Config) -> None:
    """Fault injection: kill this worker process (not raise: a real crash) once, at the given epoch.

    It first waits until Ray Train's controller has registered the previous epoch's checkpoint: a report counts
    once the controller has processed it, so a worker that dies within a moment of reporting restarts from the
    checkpoint before (an epoch redone). That window is real; this injection is for testing the resume."""
    if not fail_once_at or rank != 0:
        return
    fail_epoch, marker = fail_once_at
    if fail_epoch != epoch or os.path.exists(marker):
        return
    snapshot = Path(absolute(cfg.training.storage_path)) / cfg.output.name / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if snapshot.exists() and f'"epoch-{epoch - 1:03d}"' in snapshot.read_text():
            break
        time.sleep(0.5)
    Path(marker).write_text("failed once")
    os._exit(1)


def _checkpoint(
    engine, tokenizer, cfg: Config, epoch: int, rank: int, state: dict, metrics: EpochMetrics, average=None
) -> None:
    """Report the epoch's metrics with a checkpoint; the final one also carries the exported student (the weight
    average's weights when there is one)."""
    import ray.train
    from ray.train import Checkpoint

    from llkd_ray.console import worker_console_line
    from llkd_ray.student import export_student

    final = epoch == cfg.training.epochs
    with tempfile.TemporaryDirectory() as directory:
        engine.save(directory)
        state_dict = engine.full_state_dict() if final else None  # ZeRO-3: a collective on every rank
        if final and average is not None:
            state_dict = average.state_dict_for(engine.module)
        if rank == 0:
            Path(directory, STATE_FILE).write_text(json.dumps(state))
            if average is not None:
                average.save(directory)
            if final:
                export_student(
                    engine.module,
                    tokenizer,
                    Path(directory) / STUDENT_DIR,
                    {"labels": cfg.task.label_names, "epochs": epoch, "selection": cfg.selection.strategy},
                    max_length=cfg.student.max_length,
                    state_dict=state_dict,
                )
            worker_console_line(epoch_line(dict(metrics), cfg.training.epochs, state["pool_size"]))
        has_files = any(Path(directory).iterdir())
        ray.train.report(
            dict(metrics),
            checkpoint=Checkpoint.from_directory(directory) if has_files else None,
            checkpoint_dir_name=f"epoch-{epoch:03d}",
        )
        del state_dict


def train_loop(loop_config: dict) -> None:
    """The per-worker training function (Ray Train calls it on every worker): score, gather, select, train,
    evaluate and checkpoint, once per epoch."""
    import ray.train
    import torch

    from llkd_ray.console import worker_console_line
    from llkd_ray.engines import make_engine
    from llkd_ray.selection import PoolScores, ThresholdState, rows_to_score, select, selector, teacher_gate
    from llkd_ray.student import load_student
    from llkd_ray.weight_average import WeightAverage

    cfg: Config = loop_config["cfg"]
    pool_size: int = loop_config["pool_size"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.set_num_threads(cfg.training.torch_threads or max(1, (os.cpu_count() or 1) // context.get_local_world_size()))
    collective = _Collective()
    names = cfg.task.label_names
    device = ray.train.torch.get_device()

    pool = _shard_pool(ray.train.get_dataset_shard("pool"))
    holdout = _columns(ray.train.get_dataset_shard("holdout"), ["holdout_index", "text", "gold_index"], "holdout_index")
    network, tokenizer = load_student(cfg.student.model, names, seed=cfg.training.seed, pooling=cfg.student.pooling)
    engine = make_engine(network, cfg.training, device)
    decay = cfg.training.ema_decay
    average = WeightAverage(engine.module, decay) if decay is not None else None

    def encode(batch: list[str]) -> dict:
        encoded = tokenizer(
            batch, padding=True, truncation=True, max_length=cfg.student.max_length, return_tensors="pt"
        )
        return {key: value.to(device) for key, value in encoded.items()}

    # The teacher side of the pool, gathered once: it does not change between epochs.
    teacher_probs = _gather_pool_rows(collective, pool.index, pool.teacher_probs, pool_size)
    teacher_labels = _gather_pool_rows(collective, pool.index, pool.teacher_labels, pool_size)
    steps = steps_per_epoch(cfg.training, pool_size)
    total_steps = steps * cfg.training.epochs

    thresholds, history, used, start_epoch = ThresholdState(), [], np.zeros(pool_size, dtype=bool), 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # resuming after a failure or a re-run under the same name
        with checkpoint.as_directory() as directory:
            engine.load(directory)
            if average is not None:
                average.load(directory)
            saved = json.loads((Path(directory) / STATE_FILE).read_text())
        thresholds = ThresholdState(**saved["thresholds"])
        history, start_epoch = saved["history"], saved["epoch"]
        used[saved["used"]] = True
        if rank == 0:
            worker_console_line(f"resumed from the checkpoint of epoch {start_epoch}")

    scope = selector(cfg.selection.strategy).scores
    for epoch in range(start_epoch + 1, cfg.training.epochs + 1):
        _maybe_fail(loop_config.get("fail_once_at"), epoch, rank, cfg)
        started = time.time()
        warmup = epoch <= cfg.selection.warmup_epochs
        confident = teacher_gate(teacher_probs, teacher_labels, thresholds, cfg.selection)
        wanted = rows_to_score(cfg.selection.strategy, confident)
        if warmup and scope == "confident":  # the student's scores are not looked at in warm-up
            wanted = np.zeros(pool_size, dtype=bool)
        student_probs = _score_pool(
            engine, encode, pool, wanted, collective, pool_size, len(names), cfg.training.score_batch_size
        )
        selection = select(
            cfg.selection,
            PoolScores(teacher_probs, teacher_labels, student_probs),
            thresholds,
            confident,
            warmup=warmup,
            rng=np.random.default_rng([cfg.selection.seed, epoch]),
        )
        used |= selection.mask
        scored_at = time.time()
        plan = StepPlan(steps, (epoch - 1) * steps, total_steps)
        rng = np.random.default_rng([cfg.training.seed, epoch, rank])
        # One worker has no one to wait for: its batch order stays what it was before workers were aligned.
        shared_rng = np.random.default_rng([cfg.training.seed, epoch]) if context.get_world_size() > 1 else None
        loss = _train_epoch(engine, encode, pool, selection.weights[pool.index], plan, cfg, rng, shared_rng, average)
        losses = [value for value in collective.gather(loss) if not np.isnan(value)]
        train_seconds = time.time() - scored_at

        metrics = EpochMetrics(
            epoch=epoch,
            loss=float(np.mean(losses)) if losses else float("nan"),
            selected=int(selection.mask.sum()),
            selected_per_class=dict(zip(names, selection.per_class)),
            llkd_count=selection.llkd_count,
            scored=int(wanted.sum()),
            steps=steps,
            learning_rate=learning_rate_at(plan.first_step + steps - 1, total_steps, cfg.training),
            teacher_thresholds=dict(zip(names, np.round(selection.teacher_thresholds, 4).tolist())),
            student_thresholds=dict(zip(names, np.round(selection.student_thresholds, 4).tolist())),
            cumulative_used=int(used.sum()),
            cumulative_used_fraction=float(used.mean()) if pool_size else 0.0,
        )
        with average.applied(engine.module) if average is not None else contextlib.nullcontext():
            metrics.update(_evaluate(engine, encode, holdout, collective, names, cfg.training.score_batch_size))
        metrics.update(
            score_select_seconds=round(scored_at - started, 3),
            train_seconds=round(train_seconds, 3),
            epoch_seconds=round(time.time() - started, 3),
            finished_at=time.time(),  # wall clock: a resumed epoch keeps the time it really finished
        )
        history.append(dict(metrics))
        state = {
            "epoch": epoch,
            "thresholds": asdict(thresholds),
            "history": history,
            "used": np.flatnonzero(used).tolist(),
            "pool_size": pool_size,
            "recipe": recipe_fingerprint(cfg, pool_size),
        }
        _checkpoint(engine, tokenizer, cfg, epoch, rank, state, metrics, average)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
