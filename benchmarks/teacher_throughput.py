"""Teacher throughput: the vLLM path vs a naive one-prompt-at-a-time transformers loop, in one run.

Same model, same prompts (the same Teacher builds them), same cores. Each engine runs in its own subprocess so
thread settings of one cannot leak into the other. Prints prompts/s of each, their ratio, and the fraction of
this machine's measured fp32 matmul rate (the roofline) that each reaches.

    python benchmarks/teacher_throughput.py                      # Gemma-3-270m, 400 Rotten Tomatoes snippets
    python benchmarks/teacher_throughput.py --model smollm2-135m-instruct --texts 200 --naive-texts 40
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def texts_for(count: int) -> list[str]:
    from llkd_ray.corpus import load_rotten_tomatoes

    return load_rotten_tomatoes(seed=11, limit=count)["text"].to_pylist()


def teacher_for(args, backend: str, eager: bool | None = None):
    from llkd_ray.config import load_config
    from llkd_ray.model_sources import resolve_model
    from llkd_ray.teacher import Teacher

    overrides = [f"teacher.model={args.model}", f"teacher.backend={backend}", f"teacher.batch_size={args.batch_size}"]
    if eager is not None:
        overrides.append(f"teacher.vllm.enforce_eager={eager}")
    cfg = load_config(None, overrides)
    return Teacher(cfg.task, cfg.teacher, resolve_model(args.model)), cfg


def run_vllm(args, eager: bool | None) -> dict:
    started = time.perf_counter()
    teacher, cfg = teacher_for(args, "vllm", eager)
    load_s = time.perf_counter() - started
    everything = texts_for(args.texts + cfg.teacher.batch_size)
    # Warm up on texts that are not timed: a timed text seen before would come whole from the prefix cache.
    texts, warm_up = everything[: args.texts], everything[args.texts :]
    teacher.score(warm_up)
    prompt_tokens = sum(len(p) for p in teacher.encode(texts))
    started = time.perf_counter()
    for start in range(0, len(texts), cfg.teacher.batch_size):
        teacher.score(texts[start : start + cfg.teacher.batch_size])
    seconds = time.perf_counter() - started
    # vLLM's prefix cache reuses whole blocks of the shared instruction + few-shot prefix: those tokens cost
    # no compute, so the roofline fraction is taken over the tokens actually computed.
    prompts = teacher.encode(texts)
    shared = next((i for i, column in enumerate(zip(*prompts)) if len(set(column)) > 1), min(map(len, prompts)))
    block = teacher.backend.llm.llm_engine.vllm_config.cache_config.block_size
    cached_per_prompt = (shared // block) * block
    return {
        "prompts": len(texts),
        "seconds": seconds,
        "prompt_tokens": prompt_tokens,
        "load_s": load_s,
        "computed_tokens": prompt_tokens - cached_per_prompt * len(texts),
        "cached_per_prompt": cached_per_prompt,
    }


def run_naive(args) -> dict:
    """What one writes first: one prompt at a time, a plain forward (the vocabulary head at every position)."""
    import torch
    from transformers import AutoModelForCausalLM

    from llkd_ray.model_sources import resolve_model

    torch.set_num_threads(os.cpu_count())
    teacher, _ = teacher_for(args, "transformers")
    model = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), dtype=torch.float32).eval()
    token_ids = teacher.verbalizer.single_token_ids
    texts = texts_for(args.naive_texts)
    prompts = teacher.encode(texts)
    started = time.perf_counter()
    for ids in prompts:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits
        torch.log_softmax(logits[0, -1], dim=-1)[token_ids].tolist()
    seconds = time.perf_counter() - started
    return {"prompts": len(texts), "seconds": seconds, "prompt_tokens": sum(len(p) for p in prompts)}


def matmul_gflops() -> float:
    """This machine's fp32 matmul rate with every core: the roofline the teacher is measured against."""
    import torch

    torch.set_num_threads(os.cpu_count())
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    rounds, started = 10, time.perf_counter()
    for _ in range(rounds):
        a @ b
    return 2 * 2048**3 * rounds / (time.perf_counter() - started) / 1e9


def flops_per_prompt(model: str, prompt_tokens: float, head_positions: float) -> float:
    """2·(non-embedding params) per token, plus 2·hidden·vocab for each position whose logits are computed."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from llkd_ray.model_sources import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(model))
    config = getattr(config, "text_config", config)
    with __import__("torch").device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    embedding = config.vocab_size * config.hidden_size
    return 2 * (params - embedding) * prompt_tokens + 2 * embedding * head_positions


def worker(args) -> None:
    result = {
        "vllm": lambda: run_vllm(args, eager=None),
        "vllm-compiled": lambda: run_vllm(args, eager=False),
        "naive": lambda: run_naive(args),
        "matmul": lambda: {"gflops": matmul_gflops()},
    }[args.worker]()
    print("RESULT " + json.dumps(result), flush=True)


def measure(kind: str, args) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--model",
        args.model,
        "--texts",
        str(args.texts),
        "--naive-texts",
        str(args.naive_texts),
        "--batch-size",
        str(args.batch_size),
    ]
    print(f"[bench] running {kind} ...", flush=True)
    output = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        sys.exit(f"{kind} failed:\n{output.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--texts", type=int, default=400, help="prompts timed on the vLLM path")
    parser.add_argument("--naive-texts", type=int, default=80, help="prompts timed on the naive loop")
    parser.add_argument("--batch-size", type=int, default=256, help="prompts per teacher call (the actor batch)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    roofline = measure("matmul", args)["gflops"]
    results = {kind: measure(kind, args) for kind in ("naive", "vllm", "vllm-compiled")}
    print(f"\nmodel {args.model}; {os.cpu_count()} CPU cores; fp32 matmul roofline {roofline:.0f} GFLOP/s")
    print(f"{'path':<12}{'prompts':>8}{'prompts/s':>11}{'computed tokens/prompt':>24}{'GFLOP/s':>9}{'% roofline':>12}")
    rates = {}
    for kind, result in results.items():
        rate = result["prompts"] / result["seconds"]
        tokens = result.get("computed_tokens", result["prompt_tokens"]) / result["prompts"]
        # The naive loop computes the vocabulary head at every position; vLLM only at the last one.
        flops = flops_per_prompt(args.model, tokens, tokens if kind == "naive" else 1)
        rates[kind] = rate
        print(
            f"{kind:<12}{result['prompts']:>8}{rate:>11.2f}{tokens:>24.1f}{rate * flops / 1e9:>9.1f}"
            f"{100 * rate * flops / 1e9 / roofline:>11.1f}%"
        )
    print(
        f"\nratio vLLM path (the default: eager on CPU) / naive loop: {rates['vllm'] / rates['naive']:.1f}x"
        f"  (torch.compile'd engine: {rates['vllm-compiled'] / rates['naive']:.1f}x)"
    )
    print("engine load: " + ", ".join(f"{k} {results[k]['load_s']:.0f} s" for k in ("vllm", "vllm-compiled")))
    print(
        f"prompt tokens served from vLLM's prefix cache: {results['vllm']['cached_per_prompt']} per prompt"
        f" (of {results['vllm']['prompt_tokens'] / results['vllm']['prompts']:.1f})"
    )


if __name__ == "__main__":
    main()
