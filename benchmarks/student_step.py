"""One worker's student step, in one process: what DeepSpeed's ZeRO stage and the scoring batch size cost.

Two side-by-side measurements on the same texts, cores and weights (MiniLM, 2 torch threads, world size 1):

- a training step (forward, backward, optimizer step; batch 32) with plain PyTorch AdamW, with DeepSpeed as
  ``llkd_ray.engines`` runs it for one worker (ZeRO-2 configured, stage 0 run), and with DeepSpeed ZeRO-2 on
  the same DeepSpeed config;
- scoring, as training scores the pool (length order, no gradients), at 128 and at 32 texts a forward.

    python benchmarks/student_step.py --steps 24 --texts 2000
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
NAMES = ["positive", "negative"]


def step_times(kind: str, texts: list[str], steps: int) -> dict:
    """Mean ms of forward, backward and optimizer step over ``steps`` steps, after 4 untimed ones."""
    import numpy as np
    import torch

    from llkd_ray.config import TrainingConfig
    from llkd_ray.engines import DeepSpeedEngine, deepspeed_config, use_environment_extension_cache
    from llkd_ray.student import load_student

    network, tokenizer = load_student("minilm-l6", NAMES, seed=0)
    if kind == "plain":
        optimizer = torch.optim.AdamW(network.parameters(), lr=5e-5, weight_decay=0.01)
        forward = network
    else:
        use_environment_extension_cache()
        import deepspeed

        device = torch.device("cpu")
        if kind == "deepspeed-0":  # what training runs for one worker configured with ZeRO-2
            engine = DeepSpeedEngine(network, TrainingConfig(strategy="deepspeed", zero_stage=2), device)
            assert engine.zero_stage == 0
            forward = engine.engine
        else:  # ZeRO-2 as it ran before, with the same DeepSpeed config
            config = deepspeed_config(TrainingConfig(strategy="deepspeed"), 2, device)
            forward, *_ = deepspeed.initialize(
                model=network, model_parameters=network.parameters(), config=config, dist_init_required=False
            )
    rng = np.random.default_rng(0)
    totals = {"forward": 0.0, "backward": 0.0, "step": 0.0}
    for index in range(steps + 4):
        batch = tokenizer(
            [texts[i] for i in rng.choice(len(texts), 32, replace=False)],
            padding=True,
            truncation=True,
            max_length=128,
            return_tensors="pt",
        )
        targets = torch.randint(0, 2, (32,))
        started = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(forward(**batch).logits, targets)
        forwarded = time.perf_counter()
        if kind == "plain":
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            backwarded = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
            optimizer.step()
        else:
            forward.backward(loss)
            backwarded = time.perf_counter()
            forward.step()
        if index >= 4:
            totals["forward"] += forwarded - started
            totals["backward"] += backwarded - forwarded
            totals["step"] += time.perf_counter() - backwarded
    return {key: 1000 * value / steps for key, value in totals.items()}


def scoring_rate(texts: list[str], batch_size: int) -> float:
    """Rows/s of scoring ``texts`` in length order, ``batch_size`` a forward (after one untimed pass)."""
    import numpy as np
    import torch

    from llkd_ray.student import load_student

    network, tokenizer = load_student("minilm-l6", NAMES, seed=0)
    network.eval()
    order = np.argsort([len(text) for text in texts], kind="stable")
    for _pass in ("warm-up", "timed"):
        started = time.perf_counter()
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                batch = [texts[i] for i in order[start : start + batch_size]]
                encoded = tokenizer(batch, padding=True, truncation=True, max_length=128, return_tensors="pt")
                torch.softmax(network(**encoded).logits, dim=-1)
    return len(texts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--texts", type=int, default=2000)
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    from llkd_ray.corpus import load_rotten_tomatoes

    torch.set_num_threads(2)
    os.environ.update(LOCAL_RANK="0", RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("gloo", rank=0, world_size=1)  # one worker, as Ray Train sets it up
    texts = load_rotten_tomatoes(0, args.texts).column("text").to_pylist()
    print(f"MiniLM, {len(texts)} Rotten Tomatoes snippets, 2 torch threads, one process (world size 1)")
    steps = {kind: step_times(kind, texts, args.steps) for kind in ("plain", "deepspeed-0", "deepspeed-2")}
    for kind, ms in steps.items():
        total = sum(ms.values())
        print(
            f"{kind:<12} forward {ms['forward']:6.1f} ms  backward {ms['backward']:6.1f} ms"
            f"  optimizer step {ms['step']:6.1f} ms  total {total:6.1f} ms"
        )
    rates = {size: scoring_rate(texts, size) for size in (128, 32)}
    for size, rate in rates.items():
        print(f"scoring {size:>3} texts a forward: {rate:6.1f} rows/s")
    zero2, zero0 = steps["deepspeed-2"], steps["deepspeed-0"]
    print(
        f"\nZeRO-2 / stage 0, optimizer step: {zero2['step'] / zero0['step']:.2f}x;"
        f" whole step: {sum(zero2.values()) / sum(zero0.values()):.2f}x"
    )
    print(f"stage 0 / plain PyTorch, whole step: {sum(zero0.values()) / sum(steps['plain'].values()):.2f}x")
    print(f"scoring, 32 / 128 texts a forward: {rates[32] / rates[128]:.2f}x")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
