"""Training throughput per epoch, scoring pass included: Ray Train with 2 real workers (DDP, and DeepSpeed ZeRO-2)
against a plain single-process PyTorch loop, in one run.

Every path does the same work per epoch on the same texts and cores: score the whole pool with the student (no
gradients, ``training.score_batch_size`` texts a forward in length order, as training scores it), then train on
the same number of samples in length-grouped batches of 32 (``training.epoch_batches``), AdamW with clipping.
The plain loop runs 2 torch threads in one process; each Ray worker runs 1 thread, and the two take half the steps
each with a global batch of 64. Epoch time is the mean over the epochs after the first (the first pays for
start-up and warm-up).

    python benchmarks/train_throughput.py --texts 1024 --epochs 3
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
NAMES = ["positive", "negative"]
log = logging.getLogger("llkd_ray.benchmarks")  # under llkd_ray: the quiet console shows it


def pseudo_labels(count: int) -> pa.Table:
    """Real snippets; the teacher distribution is irrelevant to speed, so gold labels stand in for it."""
    from llkd_ray.corpus import load_rotten_tomatoes

    rows = load_rotten_tomatoes(seed=2, limit=count).to_pylist()
    probs = [[0.9, 0.1] if r["gold"] == "positive" else [0.1, 0.9] for r in rows]
    return pa.table(
        {
            "id": [r["id"] for r in rows],
            "text": [r["text"] for r in rows],
            "gold": [r["gold"] for r in rows],
            "probs_raw": pa.array(probs, type=pa.list_(pa.float32())),
            "probs_calibrated": pa.array(probs, type=pa.list_(pa.float32())),
            "label_index": pa.array([NAMES.index(r["gold"]) for r in rows], type=pa.int32()),
        }
    )


def plain_loop(texts: list[str], labels: np.ndarray, args) -> tuple[list[float], list[dict]]:
    """What one writes without Ray, with the same batching as training: per epoch, score the pool, then train."""
    import torch
    import torch.nn.functional as F

    from llkd_ray.config import TrainingConfig
    from llkd_ray.student import load_student
    from llkd_ray.training import epoch_batches

    torch.set_num_threads(2)
    network, tokenizer = load_student("minilm-l6", NAMES)
    optimizer = torch.optim.AdamW(network.parameters(), lr=5e-5, weight_decay=0.01)
    rng = np.random.default_rng(0)
    lengths = np.array([len(text) for text in texts])
    by_length = np.argsort(lengths, kind="stable")
    score_batch = TrainingConfig().score_batch_size  # what the Ray paths score with

    def encode(batch: list[str]):
        return tokenizer(batch, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")

    seconds, splits = [], []
    for _ in range(args.epochs):
        started = time.perf_counter()
        network.eval()
        with torch.no_grad():
            for start in range(0, len(texts), score_batch):
                batch = [texts[i] for i in by_length[start : start + score_batch]]
                torch.softmax(network(**encode(batch)).logits, dim=-1)
        scored = time.perf_counter()
        network.train()
        for index in epoch_batches(np.arange(len(texts)), lengths, args.batch_size, args.steps, rng):
            loss = F.cross_entropy(network(**encode([texts[i] for i in index])).logits, torch.tensor(labels[index]))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
            optimizer.step()
        seconds.append(time.perf_counter() - started)
        splits.append({"score": scored - started, "train": time.perf_counter() - scored})
    return seconds, splits


def ray_loop(table: pa.Table, strategy: str, args) -> tuple[list[float], list[dict]]:
    """Per-epoch seconds from the loop's own clock, 2 workers of 1 thread each."""
    from llkd_ray.config import config_from_dict
    from llkd_ray.training import split_pool_and_holdout, train_student

    storage = tempfile.mkdtemp()
    cfg = config_from_dict(
        {
            "task": {"instruction": "sentiment", "labels": [{"name": n} for n in NAMES]},
            "student": {"max_length": args.max_length},
            # Scores every pool row every epoch (its scores scope is "all"): the scoring pass always runs.
            "selection": {"strategy": "fixed_ratio"},
            "evaluation": {"holdout": 0},
            "training": {
                "strategy": strategy,
                "zero_stage": 2,
                "num_workers": 2,
                "cpus_per_worker": 1,
                "torch_threads": 1,
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "steps_per_epoch": args.steps // 2,  # per worker: the same samples per epoch as the plain loop
                "storage_path": storage,
            },
            "output": {"name": f"bench-{strategy}", "dir": storage},
        }
    )
    pool, holdout = split_pool_and_holdout(table, cfg)
    result = train_student(cfg, pool, holdout, Path(storage) / "run")
    # From one epoch's end to the next: scoring, selection, training and the checkpoint each epoch writes.
    finished = [h["finished_at"] for h in result.history]
    seconds = [result.history[0]["epoch_seconds"], *np.diff(finished).tolist()]
    splits = [
        {
            "score": h["score_select_seconds"],
            "train": h["train_seconds"],
            "rest": wall - h["score_select_seconds"] - h["train_seconds"],
        }
        for h, wall in zip(result.history, seconds)
    ]
    return seconds, splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=32, help="optimizer steps of batch-size samples per epoch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--log", default="runs/train_throughput.log", help="Ray's, DeepSpeed's and the models' output")
    args = parser.parse_args()

    import ray

    from llkd_ray.console import console

    # The project's quiet console: Ray's, transformers' and DeepSpeed's output goes to the log file; the terminal
    # shows the workers' epoch lines and the table.
    with console(Path(args.log).resolve()):
        table = pseudo_labels(args.texts)
        log.info("plain PyTorch loop, %d epochs", args.epochs)
        plain = plain_loop(table["text"].to_pylist(), np.asarray(table["label_index"].to_pylist()), args)
        ray.init(num_cpus=2, include_dashboard=False)
        epochs = {"plain PyTorch, 2 threads": plain}
        for name, strategy in (("Ray Train DDP", "ddp"), ("Ray Train DeepSpeed ZeRO-2", "deepspeed")):
            log.info("%s, 2 workers, %d epochs", name, args.epochs)
            epochs[f"{name}, 2 workers"] = ray_loop(table, strategy, args)
        ray.shutdown()
    print(
        f"\n{args.texts} texts scored and {args.steps * args.batch_size} trained per epoch, batch {args.batch_size},"
        f" max_length {args.max_length}, {args.epochs} epochs, {os.cpu_count()} CPU cores"
    )
    baseline = float(np.mean(plain[0][1:]))
    for name, (seconds, splits) in epochs.items():
        mean = float(np.mean(seconds[1:]))
        split = {key: float(np.mean([s[key] for s in splits[1:]])) for key in splits[0]}
        parts = ", ".join(f"{key} {value:.1f}" for key, value in split.items())
        print(f"{name:<40}{mean:>7.1f} s an epoch ({parts})   overhead vs plain: {100 * (mean / baseline - 1):>6.1f}%")
    print("(score: pool scoring and selection; train: the optimizer steps; rest: checkpoint and report, Ray only)")


if __name__ == "__main__":
    main()
