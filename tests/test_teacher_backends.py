"""The vLLM and transformers backends give the same label distributions on the same real model.

Stated tolerance: 2e-3 absolute on every label probability (both run float32; measured differences ~1e-5).
"""

import os
from dataclasses import replace

import numpy as np
import pytest

from llkd_ray.corpus import load_rotten_tomatoes
from llkd_ray.prompts import encode_prompts, shared_prefix_length
from llkd_ray.teacher import Teacher
from llkd_ray.teacher_backends import TransformersBackend, VLLMBackend
from tests.conftest import SENTIMENT_TASK, make_config

TOLERANCE = 2e-3
TOPIC_TASK = {
    "instruction": "Classify the topic of each news headline.",
    "labels": [{"name": "world politics"}, {"name": "sports"}, {"name": "science and technology"}],
    "examples": [{"text": "Parliament passes the new budget", "label": "world politics"}],
}
HEADLINES = [
    "Striker scores twice as United win the derby",
    "New telescope spots water on a distant planet",
    "Leaders meet in Geneva for peace talks",
    "Chip maker unveils faster processor",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def backends(smollm2_dir):
    # With stats on, vLLM counts its prefix-cache hits.
    cfg = make_config(teacher={"vllm": {"engine_kwargs": {"disable_log_stats": False}}}).teacher
    return {"vllm": VLLMBackend(smollm2_dir, cfg), "transformers": TransformersBackend(smollm2_dir, cfg)}


def score_with_both(backends, smollm2_dir, task: dict, texts: list[str], **teacher):
    cfg = make_config(task=task, teacher=teacher)
    return {
        name: Teacher(cfg.task, cfg.teacher, smollm2_dir, backend=backend).score(texts)
        for name, backend in backends.items()
    }


def test_single_token_labels_agree(backends, smollm2_dir):
    texts = load_rotten_tomatoes(seed=3, limit=24)["text"].to_pylist()
    results = score_with_both(backends, smollm2_dir, SENTIMENT_TASK, texts)
    vllm_probs, vllm_mass, _ = results["vllm"]
    hf_probs, hf_mass, _ = results["transformers"]
    assert vllm_probs.shape == (24, 2)
    np.testing.assert_allclose(vllm_probs.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(vllm_probs, hf_probs, atol=TOLERANCE)
    np.testing.assert_allclose(vllm_mass, hf_mass, atol=TOLERANCE)
    assert ((vllm_mass > 0.1) & (vllm_mass <= 1.0 + 1e-6)).all()  # the teacher does answer with a label
    assert len(set(vllm_probs.argmax(axis=1))) == 2  # not one label for everything on this sample


def test_an_aligned_prompt_prefix_is_cached_whole_and_the_backends_still_agree(backends, smollm2_dir):
    from llkd_ray.teacher_backends import kv_block_size, prefix_cache_counters

    # Texts no other test scores: the only blocks they can find cached are the shared prefix's.
    texts = [f"Review {i} of a film about {topic}." for i, topic in enumerate(["ships", "cats", "rain", "war"] * 3)]
    hits_per_text, shared = {}, {}
    for align in (False, True):
        cfg = make_config(teacher={"align_prefix": align})
        teachers = {name: Teacher(cfg.task, cfg.teacher, smollm2_dir, backend=b) for name, b in backends.items()}
        shared[align] = shared_prefix_length(cfg.task, teachers["vllm"].tokenizer, teachers["vllm"].padding)
        teachers["vllm"].score([f"A warm-up text ({align})."])  # the shared prefix enters the cache
        _, hits_before = prefix_cache_counters(backends["vllm"].llm)
        vllm_probs = teachers["vllm"].score(texts)[0]
        _, hits_after = prefix_cache_counters(backends["vllm"].llm)
        hits_per_text[align] = (hits_after - hits_before) / len(texts)
        np.testing.assert_allclose(vllm_probs, teachers["transformers"].score(texts)[0], atol=TOLERANCE)
    block = kv_block_size(make_config().teacher)
    assert shared[False] % block != 0  # this prompt's prefix does end inside a block: something to align
    assert hits_per_text[False] == shared[False] - shared[False] % block  # its partial block is computed each time
    assert shared[True] % block == 0 and shared[True] > shared[False]
    assert hits_per_text[True] == shared[True]  # every shared token now comes from the cache


def test_an_aligned_prompt_end_leaves_follow_up_requests_only_their_own_tokens_to_compute(backends, smollm2_dir):
    from llkd_ray.prompts import scoring_prefixes
    from llkd_ray.teacher_backends import kv_block_size, prefix_cache_counters

    block = kv_block_size(make_config().teacher)
    engine = backends["vllm"]
    computed, expected = {}, {}
    tolerance, engine.tolerance = engine.tolerance, 0.0  # every variant followed: the requests are known
    try:
        for align_end in (False, True):
            cfg = make_config(task=TOPIC_TASK, teacher={"align_prompt_end": align_end})
            teachers = {name: Teacher(cfg.task, cfg.teacher, smollm2_dir, backend=b) for name, b in backends.items()}
            vllm = teachers["vllm"]
            verbalizer = vllm.verbalizer
            follow_ups = [
                p for p in scoring_prefixes(verbalizer.single_token_ids, verbalizer.multi_token_continuations) if p
            ]
            assert follow_ups  # a task whose labels need them
            vllm.score([f"A warm-up headline ({align_end})"])  # the shared part enters the cache
            # Texts no request has seen, whose first block past the shared part holds some of their own tokens (a
            # block of nearly all newlines could be found cached from another text with as many).
            candidates = [f"{i} {headline} ({align_end})" for i, headline in enumerate(HEADLINES * 4)]
            prefix_only = replace(vllm.padding, end_block=0)
            unpadded = dict(zip(candidates, encode_prompts(cfg.task, vllm.tokenizer, candidates)))
            newlines = {t: len(vllm.encode([t])[0]) - len(prefix_only.apply(unpadded[t])) for t in candidates}
            texts = [t for t in candidates if newlines[t] < block - 8][:4]
            queried, hits = prefix_cache_counters(engine.llm)
            probs = vllm.score(texts)[0]
            queried_after, hits_after = prefix_cache_counters(engine.llm)
            computed[align_end] = (queried_after - queried) - (hits_after - hits)
            np.testing.assert_allclose(probs, teachers["transformers"].score(texts)[0], atol=TOLERANCE)
            prompts = vllm.encode(texts)
            shared = vllm.padding.end_at if align_end else shared_prefix_length(cfg.task, vllm.tokenizer, vllm.padding)
            assert shared % block == 0  # the shared part is whole blocks either way
            assert not align_end or all(len(prompt) % block == 1 for prompt in prompts)
            # The prompt computes what follows the shared part; a follow-up its own tokens and the prompt's last
            # block again (vLLM leaves the block of a request's last prompt token uncached): lined up, one token.
            expected[align_end] = sum(
                len(prompt) - shared + sum(len(p) + (len(prompt) - 1) % block + 1 for p in follow_ups)
                for prompt in prompts
            )
    finally:
        engine.tolerance = tolerance
    assert computed == expected
    assert computed[True] < computed[False]


def test_multi_token_labels_agree_and_are_scored_over_all_tokens(backends, smollm2_dir):
    results = score_with_both(backends, smollm2_dir, TOPIC_TASK, HEADLINES)
    np.testing.assert_allclose(results["vllm"][0], results["transformers"][0], atol=TOLERANCE)
    assert results["vllm"][0][0].argmax() == 1  # the football headline is sports


def test_chat_prompts_agree(backends, smollm2_dir):
    texts = ["An instant classic.", "I walked out after twenty minutes."]
    results = score_with_both(backends, smollm2_dir, {**SENTIMENT_TASK, "prompt_style": "chat"}, texts)
    np.testing.assert_allclose(results["vllm"][0], results["transformers"][0], atol=TOLERANCE)


def test_over_long_texts_are_truncated_and_flagged(backends, smollm2_dir):
    cfg = make_config(teacher={"max_text_tokens": 16})
    teacher = Teacher(cfg.task, cfg.teacher, smollm2_dir, backend=backends["transformers"])
    long_text = "This film is a delight from start to finish. " * 40
    truncated, flagged = teacher.truncate(long_text)
    assert flagged and len(teacher.tokenizer(truncated, add_special_tokens=False)["input_ids"]) <= 16
    assert teacher.truncate("Short.") == ("Short.", False)
    _, _, flags = teacher.score([long_text, "Short."])
    assert flags.tolist() == [True, False]


def test_prompts_longer_than_the_engine_allows_are_refused(smollm2_dir):
    cfg = make_config(teacher={"max_text_tokens": 2000})
    with pytest.raises(ValueError, match="teacher.vllm.max_model_len=1024 is too small"):
        Teacher(cfg.task, cfg.teacher, smollm2_dir, backend=object())


def test_a_tensor_parallel_teacher_gives_the_single_rank_distributions():
    """The 70B recipe's engine settings (tensor_parallel_size, the mp executor) on the CPU twin: two ranks, each on
    a core of its own, score the embedded default's task like one rank does. Gemma-3-270m: its 4 heads split."""
    from llkd_ray.config import load_config
    from llkd_ray.model_sources import resolve_model

    texts = load_rotten_tomatoes(seed=3, limit=8)["text"].to_pylist()
    probs = {}
    try:
        for ranks in (1, 2):
            executor = "teacher.vllm.engine_kwargs={distributed_executor_backend: mp}"
            cfg = load_config(None, [f"teacher.vllm.tensor_parallel_size={ranks}", executor])
            teacher = Teacher(cfg.task, cfg.teacher, resolve_model("gemma-3-270m"))
            probs[ranks] = teacher.score(texts)[0]
            del teacher
    finally:
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)  # set for two ranks: a later one-rank engine must not see it
    np.testing.assert_allclose(probs[2], probs[1], atol=TOLERANCE)


def test_cores_are_split_among_tensor_parallel_ranks(monkeypatch):
    from llkd_ray.teacher_backends import cores_per_rank

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    assert cores_per_rank(2) == "0-2|3-4" and cores_per_rank(5) == "0|1|2|3|4"
    with pytest.raises(ValueError, match="needs at least 6 cores"):
        cores_per_rank(6)


def test_multi_token_labels_agree_on_gemma_too():
    """Gemma-3-270m is where the path this one replaced (prompt_logprobs) disagreed with transformers by up to .23."""
    from llkd_ray.model_sources import resolve_model

    gemma = resolve_model("gemma-3-270m")
    cfg = make_config(task=TOPIC_TASK, teacher={"model": "gemma-3-270m"})
    assert Teacher(cfg.task, cfg.teacher, gemma, backend=object()).verbalizer.multi_token_continuations
    results = {
        name: Teacher(cfg.task, cfg.teacher, gemma, backend=backend(gemma, cfg.teacher)).score(HEADLINES)[0]
        for name, backend in (("vllm", VLLMBackend), ("transformers", TransformersBackend))
    }
    np.testing.assert_allclose(results["vllm"], results["transformers"], atol=TOLERANCE)
