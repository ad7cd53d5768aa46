"""The train stage: Ray Train workers run one loop, with a distributed score-and-select step every epoch.

Each epoch, on every worker:
  1. score its shard of the pool with the current student (no gradients);
  2. all-gather the pool's scores, so every worker computes the same thresholds and the same selection
     (which therefore does not depend on the number of workers);
  3. train on the selected samples of its own shard with the LLKD weights (workers take equal step counts,
     cycling their samples, as DDP and ZeRO collectives require);
  4. evaluate on its shard of the gold-labelled holdout, and report metrics with a checkpoint.
The final checkpoint also carries the student exported in Hugging Face format (ZeRO-3 shards gathered first).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from llkd_ray.config import Config, TrainingConfig
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
    import hashlib

    names = cfg.task.label_names
    probs_column = "probs_calibrated" if cfg.teacher.calibrate else "probs_raw"
    rows = labels.select(["id", "text", "gold", probs_column, "label_index"]).to_pylist()
    rows.sort(key=lambda row: hashlib.sha256(row["id"].encode()).hexdigest())
    holdout, pool = [], []
    for row in rows:
        gold_ok = row["gold"] in names
        (holdout if gold_ok and len(holdout) < cfg.evaluation.holdout else pool).append(row)
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
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

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


# ---- worker side ------------------------------------------------------------------------------------------------
def _columns(shard, names: list[str], index_column: str) -> dict[str, list]:
    """Read a worker's dataset shard once into columns, skipping the padding rows."""
    columns: dict[str, list] = {name: [] for name in names}
    for batch in shard.iter_batches(batch_size=1024, batch_format="pyarrow"):
        keep = [i for i, index in enumerate(batch[index_column].to_pylist()) if index >= 0]
        for name in names:
            values = batch[name].to_pylist()
            columns[name].extend(values[i] for i in keep)
    return columns


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


def _train_pass(engine, encode, texts, labels, weights, positions, cfg: Config, rng, collective) -> float:
    """One pass over this worker's selected samples; returns the mean loss of its real steps."""
    import torch
    import torch.nn.functional as F

    lengths = np.array([len(text) for text in texts])
    batches = _length_grouped_batches(positions, lengths, cfg.training.batch_size, rng)
    steps = collective.max(len(batches))
    engine.train(True)
    losses = []
    for step in range(steps):
        if batches:
            index = batches[step % len(batches)]  # a worker with fewer samples cycles through them again
            scale = torch.tensor(weights[index], dtype=torch.float32)
            batch_texts, targets = [texts[i] for i in index], torch.tensor(labels[index], dtype=torch.long)
        else:  # nothing selected here: a zero-weight step keeps the gradient all-reduce in step
            batch_texts, targets, scale = ["."], torch.zeros(1, dtype=torch.long), torch.zeros(1)
        logits = engine.logits(encode(batch_texts))
        per_sample = F.cross_entropy(logits, targets.to(logits.device), reduction="none")
        loss = (scale.to(logits.device) * per_sample).sum() / len(batch_texts)
        engine.step(loss)
        if batches and step < len(batches):
            losses.append(float(loss.detach()))
    return float(np.mean(losses)) if losses else float("nan")


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


def train_loop(loop_config: dict) -> None:
    """The per-worker training function (Ray Train calls it on every worker)."""
    import ray.train
    import torch
    from ray.train import Checkpoint

    from llkd_ray.console import worker_console_line
    from llkd_ray.engines import make_engine
    from llkd_ray.metrics import classification_report
    from llkd_ray.selection import PoolScores, ThresholdState, select
    from llkd_ray.student import export_student, load_student

    cfg: Config = loop_config["cfg"]
    pool_size: int = loop_config["pool_size"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.set_num_threads(cfg.training.torch_threads or max(1, (os.cpu_count() or 1) // context.get_local_world_size()))
    collective = _Collective()
    names = cfg.task.label_names
    device = ray.train.torch.get_device()

    pool = _columns(
        ray.train.get_dataset_shard("pool"), ["pool_index", "text", "teacher_probs", "teacher_label"], "pool_index"
    )
    holdout = _columns(ray.train.get_dataset_shard("holdout"), ["holdout_index", "text", "gold_index"], "holdout_index")
    texts, labels = pool["text"], np.asarray(pool["teacher_label"], dtype=np.int64)
    local_index = np.asarray(pool["pool_index"], dtype=np.int64)

    network, tokenizer = load_student(cfg.student.model, names, seed=cfg.training.seed)
    engine = make_engine(network, cfg.training, device)

    def encode(batch: list[str]) -> dict:
        encoded = tokenizer(
            batch, padding=True, truncation=True, max_length=cfg.student.max_length, return_tensors="pt"
        )
        return {key: value.to(device) for key, value in encoded.items()}

    # Teacher side of the pool, gathered once: it does not change between epochs.
    teacher_parts = collective.gather((local_index, np.asarray(pool["teacher_probs"], dtype=np.float64), labels))
    order_index = np.concatenate([part[0] for part in teacher_parts])
    order = np.argsort(order_index)
    if len(order) != pool_size or not np.array_equal(order_index[order], np.arange(pool_size)):
        raise RuntimeError(f"pool shards do not cover the pool exactly ({len(order)} rows for {pool_size})")
    teacher_probs = np.concatenate([part[1] for part in teacher_parts])[order]
    teacher_labels = np.concatenate([part[2] for part in teacher_parts])[order]

    thresholds, history, used, start_epoch = ThresholdState(), [], np.zeros(pool_size, dtype=bool), 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # resuming after a failure or a re-run under the same name
        with checkpoint.as_directory() as directory:
            engine.load(directory)
            saved = json.loads((Path(directory) / STATE_FILE).read_text())
        thresholds = ThresholdState(**saved["thresholds"])
        history, start_epoch = saved["history"], saved["epoch"]
        used[saved["used"]] = True
        if rank == 0:
            worker_console_line(f"resumed from the checkpoint of epoch {start_epoch}")

    for epoch in range(start_epoch + 1, cfg.training.epochs + 1):
        _maybe_fail(loop_config.get("fail_once_at"), epoch, rank, cfg)
        started = time.time()
        local_probs = _score(engine, encode, texts, 128, collective, len(names))
        parts = collective.gather((local_index, local_probs))
        student_probs = np.concatenate([p[1] for p in parts])[np.argsort(np.concatenate([p[0] for p in parts]))]
        scores = PoolScores(teacher_probs, teacher_labels, np.round(student_probs, SCORE_DECIMALS))
        selection = select(
            cfg.selection.strategy,
            scores,
            thresholds,
            momentum=cfg.selection.momentum,
            warmup=epoch <= cfg.selection.warmup_epochs,
            rng=np.random.default_rng([cfg.selection.seed, epoch]),
            fraction=cfg.selection.fraction,
            teacher_confidence_threshold=cfg.selection.teacher_confidence_threshold,
            teacher_quantile=cfg.selection.teacher_quantile,
            student_quantile=cfg.selection.student_quantile,
            balance_classes=cfg.selection.balance_classes,
        )
        used |= selection.mask
        positions = np.flatnonzero(selection.mask[local_index])
        scored_at = time.time()
        loss = _train_pass(
            engine,
            encode,
            texts,
            labels,
            selection.weights[local_index],
            positions,
            cfg,
            np.random.default_rng([cfg.training.seed, epoch, rank]),
            collective,
        )
        losses = [value for value in collective.gather(loss) if not np.isnan(value)]
        train_seconds = time.time() - scored_at

        metrics = {
            "epoch": epoch,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "selected": int(selection.mask.sum()),
            "selected_per_class": dict(zip(names, selection.per_class)),
            "llkd_count": selection.llkd_count,
            "teacher_thresholds": dict(zip(names, np.round(selection.teacher_thresholds, 4).tolist())),
            "student_thresholds": dict(zip(names, np.round(selection.student_thresholds, 4).tolist())),
            "cumulative_used": int(used.sum()),
            "cumulative_used_fraction": float(used.mean()) if pool_size else 0.0,
        }
        holdout_probs = _score(engine, encode, holdout["text"], 128, collective, len(names))
        gathered = collective.gather((holdout["gold_index"], holdout_probs.argmax(axis=1).tolist()))
        gold = np.concatenate([np.asarray(g, dtype=np.int64) for g, _ in gathered])
        predicted = np.concatenate([np.asarray(p, dtype=np.int64) for _, p in gathered])
        if len(gold):
            report = classification_report(gold, predicted, names)
            metrics.update(eval_accuracy=report["accuracy"], eval_macro_f1=report["macro_f1"])
        metrics.update(
            score_select_seconds=round(scored_at - started, 3),
            train_seconds=round(train_seconds, 3),
            epoch_seconds=round(time.time() - started, 3),
            finished_at=time.time(),  # wall clock: a resumed epoch keeps the time it really finished
        )
        history.append(metrics)

        final = epoch == cfg.training.epochs
        with tempfile.TemporaryDirectory() as directory:
            engine.save(directory)
            state_dict = engine.full_state_dict() if final else None  # ZeRO-3: a collective on every rank
            if rank == 0:
                state = {
                    "epoch": epoch,
                    "thresholds": asdict(thresholds),
                    "history": history,
                    "used": np.flatnonzero(used).tolist(),
                }
                Path(directory, STATE_FILE).write_text(json.dumps(state))
                if final:
                    export_student(
                        engine.module,
                        tokenizer,
                        Path(directory) / STUDENT_DIR,
                        {"labels": names, "epochs": epoch, "selection": cfg.selection.strategy},
                        max_length=cfg.student.max_length,
                        state_dict=state_dict,
                    )
                worker_console_line(epoch_line(metrics, cfg.training.epochs, pool_size))
            has_files = any(Path(directory).iterdir())
            ray.train.report(
                metrics,
                checkpoint=Checkpoint.from_directory(directory) if has_files else None,
                checkpoint_dir_name=f"epoch-{epoch:03d}",
            )
        del state_dict
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
