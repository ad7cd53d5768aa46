"""Training throughput: the Ray Train loop (DDP and DeepSpeed) vs a plain single-process PyTorch loop.

Same student, same texts, same batch size, same cores (the Ray worker gets every core; the plain loop sets
torch to the same thread count). Samples/s count training samples through forward + backward + step; the Ray
figure is taken from the loop's own per-epoch train-pass timing (selection `all`, so every sample is trained).

    python benchmarks/train_throughput.py --texts 1024 --epochs 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
NAMES = ["positive", "negative"]


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


def plain_loop(texts: list[str], labels: np.ndarray, args) -> float:
    """What one writes without Ray: tokenize per batch, forward, cross-entropy, backward, AdamW step."""
    import torch
    import torch.nn.functional as F

    from llkd_ray.student import load_student

    torch.set_num_threads(os.cpu_count())
    network, tokenizer = load_student("minilm-l6", NAMES)
    network.train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=5e-5, weight_decay=0.01)
    order = np.random.default_rng(0).permutation(len(texts))
    samples, started = 0, time.perf_counter()
    for _ in range(args.epochs):
        for start in range(0, len(order), args.batch_size):
            index = order[start : start + args.batch_size]
            batch = tokenizer(
                [texts[i] for i in index],
                padding=True,
                truncation=True,
                max_length=args.max_length,
                return_tensors="pt",
            )
            loss = F.cross_entropy(network(**batch).logits, torch.tensor(labels[index]))
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
            optimizer.step()
            samples += len(index)
    return samples / (time.perf_counter() - started)


def ray_loop(table: pa.Table, strategy: str, args) -> float:
    from llkd_ray.config import config_from_dict
    from llkd_ray.training import split_pool_and_holdout, train_student

    storage = tempfile.mkdtemp()
    cfg = config_from_dict(
        {
            "task": {"instruction": "sentiment", "labels": [{"name": n} for n in NAMES]},
            "student": {"max_length": args.max_length},
            "selection": {"strategy": "all"},
            "evaluation": {"holdout": 0},
            "training": {
                "strategy": strategy,
                "zero_stage": 1,
                "num_workers": 1,
                "cpus_per_worker": os.cpu_count(),
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "storage_path": storage,
            },
            "output": {"name": f"bench-{strategy}", "dir": storage},
        }
    )
    pool, holdout = split_pool_and_holdout(table, cfg)
    result = train_student(cfg, pool, holdout, Path(storage) / "run")
    samples = sum(h["selected"] for h in result.history)
    return samples / sum(h["train_seconds"] for h in result.history)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=64)
    args = parser.parse_args()

    import ray

    table = pseudo_labels(args.texts)
    plain = plain_loop(table["text"].to_pylist(), np.asarray(table["label_index"].to_pylist()), args)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    rates = {
        "plain PyTorch": plain,
        "Ray Train DDP": ray_loop(table, "ddp", args),
        "Ray Train DeepSpeed": ray_loop(table, "deepspeed", args),
    }
    ray.shutdown()
    print(
        f"\n{args.texts} texts x {args.epochs} epochs, batch {args.batch_size}, max_length {args.max_length},"
        f" {os.cpu_count()} CPU cores"
    )
    for name, rate in rates.items():
        print(f"{name:<22}{rate:>8.1f} samples/s   overhead vs plain: {100 * (plain / rate - 1):>6.1f}%")


if __name__ == "__main__":
    main()
