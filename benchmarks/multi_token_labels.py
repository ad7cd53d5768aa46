"""Multi-token labels: an 8-label task whose label names are several tokens long, against the same task with
one-token labels, on the same texts, engine and cores, in one run.

The label names are a newswire user's (`money-fx`, `acq`, `crude`, ...: 10 multi-token variants with Gemma's
tokenizer); the one-token task renames them (`money`, `business`, `oil`, ...). Both score the same AG News
articles, truncated to 128 tokens, with Gemma-3-270m through vLLM: the Teacher the pipeline uses. Printed:
- rows/s of each task and their ratio (the goal: multi-token ≥ 50% of one-token), with the requests and the
  prompt tokens computed per text;
- the multi-token task with every label variant followed to its end (``teacher.continuation_tolerance`` 0), and
  how far the default's distributions are from it (at most the tolerance);
- the multi-token task with each prompt's end padded to a whole KV block (``teacher.align_prompt_end``: 0 to 31
  newlines before the article's line), so that the follow-up requests find the whole prompt cached; another
  prompt, so how far its distributions and labels are from the default prompt's is printed too;
- the multi-token task scored by each variant's first token alone (fast, but a different distribution);
- the same multi-token task scored the way labeling did before (`prompt_logprobs` on prompt + continuation,
  which computes the vocabulary head at every position and skips vLLM's prefix cache), on fewer texts;
- vLLM's own prefix-cache counters (queried and hit tokens) for each timed run;
- how far the multi-token distributions are from the transformers backend (full forward passes, the reference).

    python benchmarks/multi_token_labels.py                      # 256 articles, 8 for the old path
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np

from llkd_ray.teacher_backends import prefix_cache_counters

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MULTI = ["money-fx", "acq", "crude", "earn", "grain", "interest", "ship", "trade"]
SINGLE = ["money", "business", "oil", "profit", "grain", "interest", "ship", "trade"]
EXAMPLES = [  # label positions in MULTI / SINGLE
    ("Central bank intervenes as the dollar slides against the yen.", 0),
    ("Oil prices climb after the pipeline outage.", 2),
    ("The company agreed to buy its rival for $2 billion.", 1),
]


def task(names: list[str]) -> dict:
    return {
        "instruction": "Classify the topic of each newswire article.",
        "text_prefix": "Article: ",
        "answer_prefix": "Topic:",
        "labels": [{"name": name} for name in names],
        "examples": [{"text": text, "label": names[index]} for text, index in EXAMPLES],
    }


def articles(count: int) -> list[str]:
    with open(SHARED_DATA / "ag_news" / "test.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [f"{row['title']}. {row['description']}" for row in rows[:count]]


def old_continuation_logprobs(llm, prompts, continuations) -> np.ndarray:
    """What labeling did before: one prompt_logprobs request per (text, continuation)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    result = np.empty((len(prompts), len(continuations)))
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    sequences = [TokensPrompt(prompt_token_ids=p + list(c)) for p in prompts for c in continuations]
    for index, output in enumerate(llm.generate(sequences, params, use_tqdm=False)):
        row, column = divmod(index, len(continuations))
        continuation = continuations[column]
        scored = output.prompt_logprobs[-len(continuation) :]
        result[row, column] = sum(position[t].logprob for position, t in zip(scored, continuation, strict=True))
    return result


def count_requests(llm) -> dict:
    """Counts the requests ``llm.generate`` is given (the engine's own counters have no per-call total)."""
    counter = {"requests": 0}
    generate = llm.generate

    def counting(prompts, *args, **kwargs):
        counter["requests"] += len(prompts)
        return generate(prompts, *args, **kwargs)

    llm.generate = counting
    return counter


def timed(label: str, llm, run, texts: list[str], counter: dict) -> tuple[float, np.ndarray]:
    # Every timed run scores the same texts: none may find another run's prompts in the cache.
    llm.reset_prefix_cache()
    queried, hits = prefix_cache_counters(llm)
    requests = counter["requests"]
    started = time.perf_counter()
    probs = run(texts)
    seconds = time.perf_counter() - started
    queried_after, hits_after = prefix_cache_counters(llm)
    rate = len(texts) / seconds
    computed = (queried_after - queried) - (hits_after - hits)
    print(
        f"{label:<44} {len(texts):>5} texts {seconds:>7.1f} s {rate:>6.2f} rows/s"
        f" {(counter['requests'] - requests) / len(texts):>6.2f} requests/text {computed / len(texts):>6.0f}"
        f" tokens computed/text (prefix cache: {hits_after - hits:,.0f} of {queried_after - queried:,.0f} hit)",
        flush=True,
    )
    return rate, probs


def main() -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # As the teacher actor does (teacher.py): unset, vLLM drops to one thread "for serving".
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--old-texts", type=int, default=8)  # ~11 s a text: no prefix cache, a head per position
    parser.add_argument("--reference-texts", type=int, default=16)
    parser.add_argument("--block-size", type=int, help="vLLM KV block size (default: the backend's, 32 on CPU)")
    args = parser.parse_args()

    from llkd_ray.config import config_from_dict
    from llkd_ray.label_scoring import label_log_scores, normalize_scores
    from llkd_ray.model_sources import resolve_model
    from llkd_ray.teacher import Teacher
    from llkd_ray.teacher_backends import TransformersBackend, VLLMBackend

    model_dir = resolve_model(args.model)
    stats = {"engine_kwargs": {"disable_log_stats": False}}  # vLLM counts prefix-cache hits only with stats on
    if args.block_size:
        stats["block_size"] = args.block_size
    teacher_options = {"model": args.model, "max_text_tokens": 128, "vllm": stats}
    configs = {
        name: config_from_dict({"task": task(names), "teacher": teacher_options})
        for name, names in (("multi", MULTI), ("single", SINGLE))
    }
    configs["multi-aligned"] = config_from_dict(
        {"task": task(MULTI), "teacher": {**teacher_options, "align_prompt_end": True}}
    )
    engine = VLLMBackend(model_dir, configs["multi"].teacher)
    counter = count_requests(engine.llm)
    teachers = {name: Teacher(cfg.task, cfg.teacher, model_dir, backend=engine) for name, cfg in configs.items()}
    for name, teacher in [(name, teachers[name]) for name in ("multi", "single")]:
        verbalizer = teacher.verbalizer
        print(
            f"{name}-token task: {len(verbalizer.single_token_ids)} one-token variants, "
            f"{len(verbalizer.multi_token_continuations)} multi-token variants"
        )
    assert not teachers["single"].verbalizer.multi_token_continuations, "the one-token task has a multi-token label"

    everything = articles(args.texts + 32)
    texts, warm_up = everything[: args.texts], everything[args.texts :]
    for teacher in teachers.values():
        teacher.score(warm_up)  # untimed; a timed text must not come whole from the prefix cache

    def score(name: str):
        return lambda batch: teachers[name].score(batch)[0]

    single_rate, _ = timed("one-token labels", engine.llm, score("single"), texts, counter)
    tolerance = engine.tolerance
    multi_rate, multi_probs = timed(
        f"multi-token labels (tolerance {tolerance:g}, the default)", engine.llm, score("multi"), texts, counter
    )
    engine.tolerance = 0.0
    exact_rate, exact_probs = timed(
        "multi-token labels (every variant followed)", engine.llm, score("multi"), texts, counter
    )
    engine.tolerance = tolerance
    aligned_rate, aligned_probs = timed(
        "multi-token labels, prompt end aligned", engine.llm, score("multi-aligned"), texts, counter
    )

    def first_tokens_only(batch: list[str]) -> np.ndarray:
        """An approximation the issue lists: a variant scored by its first token alone (one request a text). The
        labels' first tokens are distinct here, but p(" money") is not p(" money-fx")."""
        verbalizer = teachers["multi"].verbalizer
        firsts = list(dict.fromkeys(ids[0] for _, ids in verbalizer.variants))
        logprobs = engine.next_token_logprobs(teachers["multi"].encode(batch), firsts)
        scores = np.zeros((len(batch), len(verbalizer.label_names)))
        for label, first in dict.fromkeys((label, ids[0]) for label, ids in verbalizer.variants):
            scores[:, label] += np.exp(logprobs[:, firsts.index(first)])
        return scores / scores.sum(axis=1, keepdims=True)

    first_rate, first_probs = timed(
        "multi-token labels (first token only)", engine.llm, first_tokens_only, texts, counter
    )

    multi = teachers["multi"]

    def old_path(batch: list[str]) -> np.ndarray:
        prompts = multi.encode(batch)
        verbalizer = multi.verbalizer
        first = engine.next_token_logprobs(prompts, verbalizer.single_token_ids)
        rest = old_continuation_logprobs(engine.llm, prompts, verbalizer.multi_token_continuations)
        return normalize_scores(label_log_scores(verbalizer, first, rest))[0]

    old_texts = texts[: args.old_texts]
    old_rate, old_probs = timed(
        "multi-token labels (prompt_logprobs, before)", engine.llm, old_path, old_texts, counter
    )

    reference_texts = texts[: args.reference_texts]
    reference = Teacher(
        configs["multi"].task,
        configs["multi"].teacher,
        model_dir,
        backend=TransformersBackend(model_dir, configs["multi"].teacher),
    )
    reference_probs = reference.score(reference_texts)[0]

    print()
    print(f"multi-token / one-token rows/s: {multi_rate / single_rate:.2f}  (goal >= 0.50)")
    print(
        f"multi-token, prompt end aligned / one-token rows/s: {aligned_rate / single_rate:.2f}  (goal >= 0.50);"
        f" / the default prompt: {aligned_rate / multi_rate:.2f}x"
    )
    aligned_gap = np.abs(aligned_probs - multi_probs)
    changed = np.mean(aligned_probs.argmax(1) != multi_probs.argmax(1))
    print(
        f"prompt end aligned vs the default prompt ({len(texts)} texts): max |p| difference {aligned_gap.max():.2e},"
        f" mean {aligned_gap.mean():.1e}; labels changed {changed:.1%}"
    )
    print(f"multi-token now / before:       {multi_rate / old_rate:.1f}x")
    print(f"multi-token now / every variant followed: {multi_rate / exact_rate:.2f}x")
    exact_gap = np.abs(multi_probs - exact_probs).max()
    first_gap = np.abs(first_probs - exact_probs).max()
    print(
        f"first token only / one-token rows/s: {first_rate / single_rate:.2f}, but max |p| difference from every"
        f" variant followed: {first_gap:.2e}"
    )
    print(
        f"max |p| difference, now vs every variant followed ({len(texts)} texts): {exact_gap:.2e}"
        f"  (bound {tolerance:g})"
    )
    old_gap = np.abs(multi_probs[: len(old_texts)] - old_probs).max()
    print(f"max |p| difference, now vs before ({len(old_texts)} texts):        {old_gap:.2e}")
    reference_gap = np.abs(multi_probs[: len(reference_texts)] - reference_probs).max()
    print(
        f"max |p| difference, now vs transformers ({len(reference_texts)} texts): {reference_gap:.2e}"
        "  (backend-agreement tolerance 2e-3)"
    )


if __name__ == "__main__":
    main()
