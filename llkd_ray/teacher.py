"""The teacher: texts in, label distributions out; and the Ray Data actor that runs it over a corpus."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from llkd_ray.config import Config, TaskConfig, TeacherConfig
from llkd_ray.corpus import ROW_SCHEMA
from llkd_ray.label_scoring import label_log_scores, normalize_scores
from llkd_ray.prompts import PromptPadding, build_verbalizer, encode_prompts, prompt_padding, shared_prefix_length
from llkd_ray.ray_session import threads_per_copy
from llkd_ray.teacher_backends import TeacherBackend

logger = logging.getLogger(__name__)
MAX_CHARS_PER_TOKEN = 32  # generous: subword tokens average ~4 characters

# The corpus row plus what the teacher adds to it.
SCORED_SCHEMA = pa.schema(
    list(ROW_SCHEMA)
    + [
        pa.field("probs_raw", pa.list_(pa.float32())),
        pa.field("label_mass", pa.float32()),
        pa.field("truncated", pa.bool_()),
    ]
)


class Teacher:
    """Builds prompts, truncates over-long texts and turns backend log-probs into label distributions."""

    def __init__(self, task: TaskConfig, cfg: TeacherConfig, model_dir: Path, backend: TeacherBackend | None = None):
        """``backend`` lets several tasks share one loaded engine; by default one is built from ``cfg``."""
        from transformers import AutoTokenizer

        from llkd_ray.teacher_backends import make_backend, prefix_alignment

        self.task = task
        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.verbalizer = build_verbalizer(task, self.tokenizer)
        alignment = prefix_alignment(task, cfg)
        self.padding = (
            prompt_padding(task, self.tokenizer, alignment, cfg.align_prompt_end) if alignment else PromptPadding()
        )
        longest = len(self.encode(["x"])[0]) + cfg.max_text_tokens + self.padding.end_block
        longest += max(len(ids) for _, ids in self.verbalizer.variants)
        if cfg.backend == "vllm" and longest > cfg.vllm.max_model_len:
            raise ValueError(
                f"teacher.vllm.max_model_len={cfg.vllm.max_model_len} is too small for prompts of up to {longest}"
                f" tokens (teacher.max_text_tokens={cfg.max_text_tokens} plus the prompt); raise it or lower"
                " teacher.max_text_tokens"
            )
        self.backend = backend or make_backend(model_dir, cfg)

    def truncate(self, text: str) -> tuple[str, bool]:
        # Characters first: a 10 MB row is cut to what max_text_tokens could ever hold before it is tokenized.
        cap = self.cfg.max_text_tokens * MAX_CHARS_PER_TOKEN
        clipped = len(text) > cap
        text = text[:cap]
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= self.cfg.max_text_tokens:
            return text, clipped
        return self.tokenizer.decode(ids[: self.cfg.max_text_tokens]), True

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [self.padding.apply(ids) for ids in encode_prompts(self.task, self.tokenizer, texts)]

    def score(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(raw label distribution [n, labels], label mass [n], truncated [n]) for already-validated texts."""
        truncated_texts, flags = zip(*(self.truncate(text) for text in texts)) if texts else ((), ())
        prompts = self.encode(list(truncated_texts))
        verbalizer = self.verbalizer
        first, rest = self.backend.label_logprobs(
            prompts, verbalizer.single_token_ids, verbalizer.multi_token_continuations
        )
        probs, mass = normalize_scores(label_log_scores(verbalizer, first, rest))
        return probs, mass, np.array(flags, dtype=bool)


class TeacherActor:
    """Ray Data ``map_batches`` actor: scores usable rows, passes rejected rows through with their reason.

    A batch that fails as a whole is retried row by row, so one bad row is rejected with the error and the
    rest of the batch is still labeled; an actor never dies because of its input.
    """

    def __init__(self, config: Config):
        # Ray exports OMP_NUM_THREADS=<num_cpus> (1 for a fractional or single CPU) to every actor, and vLLM's
        # CPU kernels honour it: without this the teacher would use one core of the node whatever it has.
        teacher = config.teacher
        threads = threads_per_copy(teacher.torch_threads, teacher.max_actors or teacher.num_actors, teacher.num_cpus)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)
        from llkd_ray.model_sources import resolve_model

        self.teacher = Teacher(config.task, config.teacher, resolve_model(config.teacher.model))
        self.num_labels = len(config.task.labels)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        usable = [i for i, row in enumerate(rows) if row["reject_reason"] is None]
        probs = np.full((len(rows), self.num_labels), np.nan)
        mass = np.full(len(rows), np.nan)
        truncated = np.zeros(len(rows), dtype=bool)
        try:
            scored = self.teacher.score([rows[i]["text"] for i in usable])
            for column, target in zip(scored, (probs, mass, truncated)):
                target[usable] = column
        except Exception:  # isolate the failing row(s): score one at a time
            for i in usable:
                try:
                    row_probs, row_mass, row_truncated = self.teacher.score([rows[i]["text"]])
                    probs[i], mass[i], truncated[i] = row_probs[0], row_mass[0], row_truncated[0]
                except Exception as error:
                    rows[i]["reject_reason"] = f"teacher error: {type(error).__name__}: {error}"[:500]
                    logger.exception("row %s rejected", rows[i].get("source"))
        for i, row in enumerate(rows):
            ok = row["reject_reason"] is None
            row["probs_raw"] = probs[i].astype(np.float32).tolist() if ok else None
            row["label_mass"] = float(mass[i]) if ok else None
            row["truncated"] = bool(truncated[i])
        return pa.Table.from_pylist(rows, schema=SCORED_SCHEMA)


def labeling_cost_note(cfg: Config) -> str:
    """One line on what each text costs the teacher with these labels and this tokenizer (``llkd check-config``)."""
    from transformers import AutoTokenizer

    from llkd_ray.model_sources import resolve_model
    from llkd_ray.teacher_backends import kv_block_size, prefix_alignment

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.teacher.model))
    verbalizer = build_verbalizer(cfg.task, tokenizer)
    requests = verbalizer.engine_requests_per_text
    multi = len(verbalizer.multi_token_continuations)
    tolerance = cfg.teacher.continuation_tolerance
    note = (
        f"teacher: {len(verbalizer.variants)} label variants, {multi} of them several tokens long; each text costs"
        + (
            f" up to {requests} engine requests: the prompt's prefill, plus up to {requests - 1} of a few tokens"
            " each on top of the cached prompt (variants too unlikely to matter are not followed, within"
            f" teacher.continuation_tolerance={tolerance:g})"
            if requests > 1
            else " 1 engine request: the prompt's prefill"
        )
    )
    if requests > MANY_REQUESTS:
        note += (
            f". Warning: up to {requests} requests per text slow labeling down; label names (or verbalizers) of one"
            " token each cost one request"
        )
    if cfg.task.prompt_style == "plain":
        note += ". " + _prefix_note(cfg, tokenizer, kv_block_size(cfg.teacher))
    if requests > 1 and prefix_alignment(cfg.task, cfg.teacher) and not cfg.teacher.align_prompt_end:
        note += (
            ". Each follow-up request recomputes the prompt's last partial KV block: teacher.align_prompt_end=true"
            " lines every prompt up with the blocks so that they compute one token of it only, for half a block of"
            " newlines a text; it pays where texts average more than one follow-up (README: multi-token labels;"
            " another prompt: the store labels anew)"
        )
    return note


def _prefix_note(cfg: Config, tokenizer, block: int) -> str:
    """How much of the shared prompt prefix vLLM's prefix cache can keep (it keeps whole blocks only)."""
    from llkd_ray.teacher_backends import prefix_alignment

    shared = shared_prefix_length(cfg.task, tokenizer)
    alignment = prefix_alignment(cfg.task, cfg.teacher)
    align_end = cfg.teacher.align_prompt_end
    padding = prompt_padding(cfg.task, tokenizer, alignment, align_end) if alignment else PromptPadding()
    if padding.end_block:
        return (
            f"The prompts share {shared} tokens; the {padding.end_at - len(padding.tokens)} before the text's line,"
            f" padded with {len(padding.tokens)} newline tokens to {padding.end_at}, are whole {block}-token KV"
            f" blocks, all cached; each prompt then gets the 0 to {padding.end_block - 1} newlines before that line"
            " that make all of it but its last token whole blocks too (teacher.align_prompt_end), so a multi-token"
            " label's follow-up requests compute that token and their own only"
        )
    if padding.tokens:
        return (
            f"The prompts share {shared} tokens, padded with {len(padding.tokens)} newline tokens to"
            f" {shared + len(padding.tokens)}: whole {block}-token KV blocks, all cached"
        )
    if shared % block == 0:
        return f"The prompts share {shared} tokens: whole {block}-token KV blocks, all cached"
    return (
        f"The prompts share {shared} tokens; vLLM caches whole {block}-token KV blocks, so the last {shared % block}"
        " are computed again for every text"
        + (
            " (this tokenizer has no one-token newline to pad the prefix with)"
            if alignment
            else " (teacher.align_prefix pads the prefix to whole blocks)"
        )
    )


MANY_REQUESTS = 8  # past this, the continuation requests cost more than the prompt's own prefill
