"""Two engines behind one scoring interface: vLLM (the fast path) and transformers (the reference).

Both take token ids (the teacher tokenizes once, so both engines see identical inputs) and return log-probs
over the full vocabulary for just the tokens asked about:

    next_token_logprobs(prompts, token_ids)         -> [batch, len(token_ids)]
    continuation_logprobs(prompts, continuations)   -> [batch, len(continuations)], summed over each continuation
    label_logprobs(prompts, token_ids, continuations) -> both at once (what the teacher calls)

The device is configuration: the same classes run on CPU here and on GPUs in a cluster.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Protocol

import numpy as np

from llkd_ray.config import TaskConfig, TeacherConfig


class TeacherBackend(Protocol):
    def next_token_logprobs(self, prompts: list[list[int]], token_ids: list[int]) -> np.ndarray: ...

    def continuation_logprobs(self, prompts: list[list[int]], continuations: list[tuple[int, ...]]) -> np.ndarray: ...

    def label_logprobs(
        self, prompts: list[list[int]], token_ids: list[int], continuations: list[tuple[int, ...]]
    ) -> tuple[np.ndarray, np.ndarray]: ...


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_dtype(dtype: str) -> str:
    # GPUs want bf16. CPUs stay in float32: without native bf16 it ran ~6x slower; with it (AVX512-BF16), vLLM
    # labeled 1.5-1.65x faster, the teacher as good on dev, but moved probabilities by up to 0.24
    # (benchmarks/teacher_settings.py --b teacher.dtype=bfloat16): an opt-in, not a default.
    if dtype != "auto":
        return dtype
    return "bfloat16" if has_cuda() else "float32"


def cores_per_rank(ranks: int) -> str:
    """This process's cores split into ``ranks`` contiguous groups, as VLLM_CPU_OMP_THREADS_BIND takes them
    ("0-3|4-7")."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < ranks:
        raise ValueError(f"tensor_parallel_size={ranks} needs at least {ranks} cores; this process has {len(cores)}")
    groups = np.array_split(np.array(cores), ranks)
    return "|".join(f"{g[0]}-{g[-1]}" if len(g) > 1 else f"{g[0]}" for g in groups)


def prefix_logprob(scored: dict, prefix: tuple[int, ...]) -> float:
    """log p(prefix | prompt) from one prompt's scores ({prefix: {token: logprob}}); -inf where a shorter prefix
    was not followed."""
    total = 0.0
    for t, token in enumerate(prefix):
        total += scored.get(tuple(prefix[:t]), {}).get(token, -np.inf)
    return total


def prefixes_worth_following(
    prefixes: list, scored: dict, token_ids: list[int], continuations: list, tolerance: float, dropped: float = 0.0
) -> tuple[list, float]:
    """The prefixes (all of one depth d) worth another request, and the probability mass left unfollowed so far.

    Every continuation under a prefix has at most the prefix's probability, so not following the prefix loses at
    most that much per continuation. The unlikeliest prefixes are dropped first while everything dropped (this
    depth and the ones before, ``dropped``) stays within ``tolerance`` times the label mass already scored
    exactly: the one-token variants and the continuations no longer than d. That mass only grows, so in the end
    no label's normalized probability moves by more than ``tolerance``. Variants the model would not write (a
    missing leading space, an odd casing) typically go after their first token.
    """
    if tolerance <= 0 or not prefixes:
        return list(prefixes), dropped
    depth = len(prefixes[0])
    exact = [scored[()][token] for token in token_ids]
    exact += [prefix_logprob(scored, c) for c in continuations if len(c) <= depth]
    budget = tolerance * float(np.exp(np.logaddexp.reduce(exact))) if exact else 0.0
    under = {prefix: sum(1 for c in continuations if len(c) > depth and c[:depth] == prefix) for prefix in prefixes}
    cost = {prefix: float(np.exp(prefix_logprob(scored, prefix))) * under[prefix] for prefix in prefixes}
    kept = set()
    for prefix in sorted(prefixes, key=cost.__getitem__):
        if dropped + cost[prefix] <= budget:
            dropped += cost[prefix]
        else:
            kept.add(prefix)
    return [prefix for prefix in prefixes if prefix in kept], dropped


def prefix_cache_counters(llm) -> tuple[float, float]:
    """(prompt tokens queried, prompt tokens hit) from a vLLM engine's own prefix-cache counters (NaN where the
    engine keeps no stats: ``disable_log_stats`` must be off)."""
    values = {metric.name: metric.value for metric in llm.get_metrics() if hasattr(metric, "value")}
    return values.get("vllm:prefix_cache_queries", float("nan")), values.get("vllm:prefix_cache_hits", float("nan"))


CPU_BLOCK_SIZE = 32  # vLLM's CPU attention takes multiples of 32
GPU_BLOCK_SIZE = 16  # vLLM's default on GPUs


def kv_block_size(cfg: TeacherConfig) -> int:
    """The KV-cache block (tokens) of this teacher's vLLM engine: the unit its prefix cache keeps."""
    return cfg.vllm.requested_block_size or (GPU_BLOCK_SIZE if has_cuda() else CPU_BLOCK_SIZE)


def prefix_alignment(task: TaskConfig, cfg: TeacherConfig) -> int | None:
    """The multiple of tokens the prompts' shared prefix is padded to, or None where it is not padded.

    A multiple of vLLM's CPU and GPU blocks (and of the block the config asks for, if any), not of this machine's
    block: the prompt of a text, and so its label, is then the same on every device, and the store's fingerprint
    can say which prompt its labels came from without knowing where the actors ran.
    """
    if cfg.align_prefix is False or task.prompt_style != "plain":
        return None
    return math.lcm(CPU_BLOCK_SIZE, GPU_BLOCK_SIZE, cfg.vllm.requested_block_size or 1)


def make_backend(model_dir: Path, cfg: TeacherConfig) -> TeacherBackend:
    if cfg.backend == "vllm":
        return VLLMBackend(model_dir, cfg)
    return TransformersBackend(model_dir, cfg)


def engine_arguments(model_dir: Path, cfg: TeacherConfig, on_gpu: bool) -> dict:
    """``vllm.LLM``'s arguments: the typed options, CPU defaults where vLLM's own suit GPUs, then
    ``engine_kwargs`` over everything."""
    options = cfg.vllm
    arguments = dict(
        model=str(model_dir),
        dtype=resolve_dtype(cfg.dtype),
        enable_prefix_caching=options.enable_prefix_caching,
        tensor_parallel_size=options.tensor_parallel_size,
        max_model_len=options.max_model_len,
        enforce_eager=not on_gpu if options.enforce_eager is None else options.enforce_eager,
        seed=0,
    )
    if on_gpu:
        arguments["gpu_memory_utilization"] = options.gpu_memory_utilization
    # The CPU default block is 128 tokens: a shared few-shot prefix shorter than that is never cached.
    if options.block_size or not on_gpu:
        arguments["block_size"] = options.block_size or CPU_BLOCK_SIZE
    # On CPU, steps of 1,024 tokens labeled 1.10x and 1.15x faster than vLLM's 4,096 in two runs of
    # benchmarks/teacher_throughput.py (1.1-1.4x in one-off runs), likely because a step's vocabulary-head logits
    # stay in cache; GPUs keep vLLM's.
    batched_tokens = options.max_num_batched_tokens or (None if on_gpu else 1024)
    if batched_tokens is not None:
        arguments["max_num_batched_tokens"] = batched_tokens
    return {**arguments, **options.engine_kwargs}


class VLLMBackend:
    """vLLM's offline engine: label tokens scored with ``logprob_token_ids`` from one prefill per prompt."""

    # vLLM caps logprob_token_ids per request; larger label sets are scored in chunks (the prefix cache makes
    # the repeated prompt nearly free).
    max_ids_per_request = 128

    def __init__(self, model_dir: Path, cfg: TeacherConfig):
        options = cfg.vllm
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(options.cpu_kvcache_space_gib))
        # In-process engine: starts in ~3 s instead of ~30 s and lives inside the Ray actor that owns it.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if options.tensor_parallel_size > 1 and not has_cuda():
            # vllm-cpu pins each tensor-parallel rank to cores of its own and, on one NUMA node, must be told which.
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cores_per_rank(options.tensor_parallel_size))
        import vllm.envs
        from vllm import LLM

        # An engine started earlier in this process froze vLLM's view of the environment: read it afresh.
        vllm.envs.disable_envs_cache()

        self.llm = LLM(**engine_arguments(model_dir, cfg, on_gpu=has_cuda()))
        self.tolerance = cfg.continuation_tolerance

    def next_token_logprobs(self, prompts: list[list[int]], token_ids: list[int]) -> np.ndarray:
        return self.label_logprobs(prompts, token_ids, [])[0]

    def continuation_logprobs(self, prompts: list[list[int]], continuations: list[tuple[int, ...]]) -> np.ndarray:
        return self.label_logprobs(prompts, [], continuations)[1]

    def label_logprobs(
        self, prompts: list[list[int]], token_ids: list[int], continuations: list[tuple[int, ...]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Both kinds of label scores, with every request at one position: the end of the prompt plus the
        continuation tokens before the one scored.

        log p(c | prompt) = sum_t log p(c_t | prompt + c_<t): each term is a ``logprob_token_ids`` request on
        ``prompt + c_<t``, and continuations sharing ``c_<t`` share the request. Unlike ``prompt_logprobs``, such a
        request keeps vLLM's prefix cache (V1 skips it for prompt_logprobs) and computes one row of the
        vocabulary head, so a continuation costs its own tokens plus the prompt's last partial block (one token of
        it with ``teacher.align_prompt_end``, which lines every prompt up with the blocks). Requests go
        in rounds by depth, so the prompt a round extends is already cached, and in chunks of prompts whose KV
        blocks fit the cache, so it is still there. Prefixes too unlikely to matter are not followed, within
        ``teacher.continuation_tolerance`` in all (``prefixes_worth_following``): their variants score -inf.
        """
        from llkd_ray.prompts import scoring_prefixes

        wanted = scoring_prefixes(token_ids, continuations)
        first = np.empty((len(prompts), len(token_ids)))
        rest = np.zeros((len(prompts), len(continuations)))
        # One round needs no chunks: nothing comes back for the cached prompts.
        chunk = self._prompts_per_chunk(prompts) if continuations else max(len(prompts), 1)
        for start in range(0, len(prompts), chunk):
            part = prompts[start : start + chunk]
            scored = self._score_prefixes(part, wanted, token_ids, continuations)
            for row, row_scores in enumerate(scored):
                first[start + row] = [row_scores[()][token] for token in token_ids]
                rest[start + row] = [prefix_logprob(row_scores, continuation) for continuation in continuations]
        return first, rest

    def _score_prefixes(self, prompts: list[list[int]], wanted: dict, token_ids, continuations) -> list[dict]:
        """Per prompt, {prefix: {token: log p(token | prompt + prefix)}}, shallow prefixes first."""
        from vllm import SamplingParams

        scored: list[dict] = [{} for _ in prompts]
        dropped = [0.0] * len(prompts)  # per prompt: probability mass left unfollowed so far
        for depth in sorted({len(prefix) for prefix in wanted}):
            at_depth = [prefix for prefix in wanted if len(prefix) == depth and wanted[prefix]]
            requests = []
            for row in range(len(prompts)):
                followed = at_depth
                if depth:
                    followed, dropped[row] = prefixes_worth_following(
                        at_depth, scored[row], token_ids, continuations, self.tolerance, dropped[row]
                    )
                requests += [
                    (row, prefix, wanted[prefix][i : i + self.max_ids_per_request])
                    for prefix in followed
                    for i in range(0, len(wanted[prefix]), self.max_ids_per_request)
                ]
            if not requests:
                continue
            params = [SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=ids) for _, _, ids in requests]
            inputs = self._inputs([prompts[row] + list(prefix) for row, prefix, _ in requests])
            for (row, prefix, ids), output in zip(requests, self.llm.generate(inputs, params, use_tqdm=False)):
                logprobs = output.outputs[0].logprobs[0]
                scored[row].setdefault(prefix, {}).update({token: logprobs[token].logprob for token in ids})
        return scored

    def _prompts_per_chunk(self, prompts: list[list[int]]) -> int:
        """As many prompts as fill half the KV cache (the other half holds the continuation requests)."""
        cache = self.llm.llm_engine.vllm_config.cache_config
        if not cache.num_gpu_blocks or not prompts:
            return max(len(prompts), 1)
        longest = max(len(prompt) for prompt in prompts) + cache.block_size
        return max(1, cache.num_gpu_blocks * cache.block_size // (2 * longest))

    @staticmethod
    def _inputs(sequences: list[list[int]]):
        from vllm.inputs import TokensPrompt

        return [TokensPrompt(prompt_token_ids=ids) for ids in sequences]


class TransformersBackend:
    """A batched transformers forward with left padding; computes the vocabulary head only where needed."""

    def __init__(self, model_dir: Path, cfg: TeacherConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = "cuda" if has_cuda() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, resolve_dtype(cfg.dtype)))
        self.model.to(self.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def next_token_logprobs(self, prompts: list[list[int]], token_ids: list[int]) -> np.ndarray:
        logprobs = self._logprobs(prompts, keep=1)[:, -1, :]
        return logprobs[:, token_ids].numpy().astype(np.float64)

    def continuation_logprobs(self, prompts: list[list[int]], continuations: list[tuple[int, ...]]) -> np.ndarray:
        result = np.empty((len(prompts), len(continuations)))
        for column, continuation in enumerate(continuations):
            length = len(continuation)
            # Logits at the last `length + 1` positions; the first `length` of them predict the continuation.
            logprobs = self._logprobs([prompt + list(continuation) for prompt in prompts], keep=length + 1)
            targets = self.torch.tensor(continuation).expand(len(prompts), -1)
            picked = logprobs[:, :-1, :].gather(2, targets.unsqueeze(-1)).squeeze(-1)
            result[:, column] = picked.sum(dim=1).numpy()
        return result

    def label_logprobs(
        self, prompts: list[list[int]], token_ids: list[int], continuations: list[tuple[int, ...]]
    ) -> tuple[np.ndarray, np.ndarray]:
        return self.next_token_logprobs(prompts, token_ids), self.continuation_logprobs(prompts, continuations)

    def _logprobs(self, sequences: list[list[int]], keep: int):
        torch = self.torch
        width = max(len(ids) for ids in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, ids in enumerate(sequences):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        # Left padding shifts positions unless they are given explicitly: count only real tokens.
        positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                position_ids=positions.to(self.device),
                logits_to_keep=keep,
            ).logits
        return torch.log_softmax(logits.float(), dim=-1).cpu()
