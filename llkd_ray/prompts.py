"""Prompting and verbalizers: how a task becomes token ids the teacher scores.

A prompt ends right where the teacher would write the label (after ``answer_prefix``), so the label is scored
as the continuation, never generated. The instruction and few-shot examples come first and are identical for
every text, which is what lets vLLM's prefix cache reuse them.
"""

from __future__ import annotations

from dataclasses import dataclass

from llkd_ray.config import LabelSpec, TaskConfig


def default_verbalizers(label: LabelSpec) -> list[str]:
    """Surface forms of a label: lower, Title and original case, with and without a leading space."""
    if label.verbalizers:
        return list(dict.fromkeys(label.verbalizers))
    cases = dict.fromkeys([label.name.lower(), label.name[:1].upper() + label.name[1:].lower(), label.name])
    return [prefix + case for case in cases for prefix in (" ", "")]


def _label_line(task: TaskConfig) -> str:
    parts = []
    for label in task.labels:
        parts.append(f"{label.name} ({label.description})" if label.description else label.name)
    return "Labels: " + ", ".join(parts)


def plain_prefix(task: TaskConfig) -> str:
    """The shared part of every plain prompt: instruction, label list and few-shot examples."""
    blocks = [f"{task.instruction}\n{_label_line(task)}"]
    for example in task.examples:
        blocks.append(f"{task.text_prefix}{example.text}\n{task.answer_prefix} {example.label}")
    return "\n\n".join(blocks) + "\n\n"


def render_prompt(task: TaskConfig, text: str, tokenizer=None) -> str:
    """The full prompt for one text; ``tokenizer`` is needed for the chat style (its chat template)."""
    query = f"{task.text_prefix}{text}\n{task.answer_prefix}"
    if task.prompt_style == "plain":
        return plain_prefix(task) + query
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("task.prompt_style=chat needs a teacher whose tokenizer has a chat template")
    messages = [{"role": "system", "content": f"{task.instruction}\n{_label_line(task)}\nAnswer with the label only."}]
    for example in task.examples:
        messages.append({"role": "user", "content": f"{task.text_prefix}{example.text}\n{task.answer_prefix}"})
        messages.append({"role": "assistant", "content": example.label})
    messages.append({"role": "user", "content": query})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompts(task: TaskConfig, tokenizer, texts: list[str]) -> list[list[int]]:
    """The teacher's token ids of each text's prompt."""
    prompts = [render_prompt(task, text, tokenizer) for text in texts]
    # The chat template already spells out BOS and the special tokens it needs.
    add_special = task.prompt_style == "plain"
    return [tokenizer(prompt, add_special_tokens=add_special)["input_ids"] for prompt in prompts]


def _common_length(sequences: list[list[int]]) -> int:
    length = 0
    for column in zip(*sequences):
        if len(set(column)) > 1:
            break
        length += 1
    return length


# Texts that share no first token: what all their prompts have in common is the task's shared prefix.
_PROBE_TEXTS = ["a", "Z", "0", "!", "\u00e9"]


def shared_prefix_length(task: TaskConfig, tokenizer, padding: PromptPadding | None = None) -> int:
    """Tokens every prompt of the task starts with (with ``padding`` applied)."""
    prompts = encode_prompts(task, tokenizer, _PROBE_TEXTS)
    return _common_length([(padding or PromptPadding()).apply(ids) for ids in prompts])


@dataclass(frozen=True)
class PromptPadding:
    """Newline tokens that line a prompt up with vLLM's KV-cache blocks: ``tokens`` inserted at ``at`` (every
    prompt alike), then, with ``end_block``, ``end_token`` repeated at ``end_at`` until all of the prompt but its
    last token is a whole number of ``end_block``-token blocks (as many as the prompt needs)."""

    at: int = 0
    tokens: tuple[int, ...] = ()
    end_at: int = 0
    end_token: int = 0
    end_block: int = 0

    def apply(self, ids: list[int]) -> list[int]:
        if self.tokens:
            ids = [*ids[: self.at], *self.tokens, *ids[self.at :]]
        if self.end_block:
            ids = [*ids[: self.end_at], *[self.end_token] * ((1 - len(ids)) % self.end_block), *ids[self.end_at :]]
        return ids


def prompt_padding(task: TaskConfig, tokenizer, block: int, align_end: bool = False) -> PromptPadding:
    """Newline tokens after the label line that make the shared prefix a whole number of ``block``-token blocks;
    with ``align_end``, more before each text's query that make all of the prompt but its last token one too.

    vLLM's prefix cache keeps whole KV blocks only, so the shared prefix's last partial block would otherwise be
    recomputed with every text. The newlines extend the blank line between the label line and the examples.
    ``align_end`` is for labels of several tokens: each is scored by follow-up requests of prompt + its first
    tokens (teacher_backends.VLLMBackend.label_logprobs), which find cached only the prompt's whole blocks that
    its own request cached, and a request that samples one token leaves the block holding its last prompt token
    uncached (vLLM 0.32, measured: a prompt of whole blocks left its follow-ups 32 tokens to recompute, one of
    whole blocks plus a token 1). Padded so that all but the last token are whole blocks, a follow-up computes
    that token and its own; unpadded, the prompt's last partial block too. The shared prefix is then aligned up
    to the query (``Review: <text>...`` of the default task), and the query is preceded by the blank lines that
    line its prompt up (0 to block - 1 of them, half a block on average).
    """
    if task.prompt_style != "plain":
        raise ValueError("prompt padding is for plain prompts only")
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    if len(newline) != 1:
        return PromptPadding()  # nothing to pad with that keeps the prompt's text; check-config says so
    probe = encode_prompts(task, tokenizer, _PROBE_TEXTS[:1])[0]
    head = tokenizer(f"{task.instruction}\n{_label_line(task)}", add_special_tokens=True)["input_ids"]
    at = _common_length([head, probe])
    if not align_end:
        shared = shared_prefix_length(task, tokenizer)
        return PromptPadding(min(at, shared), tuple(newline) * (-shared % block))
    # The query starts where the prompt stops agreeing with the shared part alone (instruction, labels, examples).
    query_start = _common_length([tokenizer(plain_prefix(task), add_special_tokens=True)["input_ids"], probe])
    at = min(at, query_start)
    pad = -query_start % block
    return PromptPadding(at, tuple(newline) * pad, query_start + pad, newline[0], block)


@dataclass(frozen=True)
class Verbalizer:
    """Every surface form of every label, as token ids in the context where the answer starts.

    ``variants[i] = (label_index, token_ids)``; distinct variants never share token ids.
    """

    label_names: tuple[str, ...]
    variants: tuple[tuple[int, tuple[int, ...]], ...]

    @property
    def single_token_ids(self) -> list[int]:
        """Distinct first tokens of the one-token variants, scored from the prompt's next-token distribution."""
        return list(dict.fromkeys(ids[0] for _, ids in self.variants if len(ids) == 1))

    @property
    def multi_token_continuations(self) -> list[tuple[int, ...]]:
        """Variants of several tokens, each scored as the sum of its tokens' conditional log-probs."""
        return [ids for _, ids in self.variants if len(ids) > 1]

    @property
    def engine_requests_per_text(self) -> int:
        """What scoring one text costs the engine: one request per prefix in ``scoring_prefixes`` (the prompt
        itself, then one a few tokens long per distinct start of a multi-token variant)."""
        return len(scoring_prefixes(self.single_token_ids, self.multi_token_continuations))


def scoring_prefixes(token_ids: list[int], continuations: list[tuple[int, ...]]) -> dict[tuple[int, ...], list[int]]:
    """{prefix: the tokens scored right after prompt + prefix}. ``token_ids`` are scored after the prompt itself;
    a continuation c contributes c_t after prefix c_<t, for every t: log p(c) = sum_t log p(c_t | prompt + c_<t)."""
    wanted: dict[tuple[int, ...], list[int]] = {(): list(token_ids)}
    for continuation in continuations:
        for t, token in enumerate(continuation):
            tokens = wanted.setdefault(tuple(continuation[:t]), [])
            if token not in tokens:
                tokens.append(token)
    return wanted


def build_verbalizer(task: TaskConfig, tokenizer) -> Verbalizer:
    """Tokenize each label variant as it would follow the answer prefix.

    Tokenizing a variant on its own can differ from how it tokenizes after the prompt (SentencePiece adds a
    word-start marker, BPE merges across the boundary), so each variant is tokenized after a context that ends
    like every prompt and the context's own tokens are removed.
    """
    context = render_prompt(task, "x", tokenizer) if task.prompt_style == "chat" else f"x\n{task.answer_prefix}"
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    seen: dict[tuple[int, ...], int] = {}
    for label_index, label in enumerate(task.labels):
        for surface in default_verbalizers(label):
            full = tokenizer(context + surface, add_special_tokens=False)["input_ids"]
            if full[: len(context_ids)] == context_ids and len(full) > len(context_ids):
                ids = tuple(full[len(context_ids) :])
            else:
                ids = tuple(tokenizer(surface, add_special_tokens=False)["input_ids"])
            if not ids:
                continue
            owner = seen.setdefault(ids, label_index)
            if owner != label_index:
                raise ValueError(
                    f"labels {task.labels[owner].name!r} and {label.name!r} share the surface form {surface!r}"
                    f" (tokens {list(ids)}); give them distinct verbalizers"
                )
    return Verbalizer(tuple(task.label_names), tuple((label, ids) for ids, label in seen.items()))
