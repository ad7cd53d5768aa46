"""Prompt rendering and verbalizers, with the real SmolLM2 tokenizer where tokens matter."""

import pytest

from llkd_ray.config import LabelSpec, TaskConfig
from llkd_ray.prompts import build_verbalizer, default_verbalizers, plain_prefix, render_prompt
from tests.conftest import SENTIMENT_TASK

TASK = TaskConfig.model_validate(SENTIMENT_TASK)


def test_plain_prompt_is_instruction_labels_examples_then_the_text():
    assert render_prompt(TASK, "Great fun.") == (
        "Classify the sentiment of each movie review snippet as positive or negative.\n"
        "Labels: positive, negative\n\n"
        "Text: A warm, funny and beautifully acted film.\nLabel: positive\n\n"
        "Text: A tedious, clumsy mess.\nLabel: negative\n\n"
        "Text: Great fun.\nLabel:"
    )
    # The shared prefix is identical for every text: what the prefix cache reuses.
    assert render_prompt(TASK, "Other.").startswith(plain_prefix(TASK))


def test_label_descriptions_appear_in_the_label_line():
    task = TaskConfig(
        instruction="Topic?", labels=[LabelSpec(name="sci", description="science"), LabelSpec(name="art")]
    )
    assert render_prompt(task, "t").startswith("Topic?\nLabels: sci (science), art\n\n")


def test_default_verbalizers_cover_case_and_leading_space():
    assert default_verbalizers(LabelSpec(name="positive")) == [" positive", "positive", " Positive", "Positive"]
    assert default_verbalizers(LabelSpec(name="SciTech")) == [
        " scitech",
        "scitech",
        " Scitech",
        "Scitech",
        " SciTech",
        "SciTech",
    ]
    assert default_verbalizers(LabelSpec(name="x", verbalizers=["yes", "yes", "y"])) == ["yes", "y"]


def test_verbalizer_tokens_are_the_tokens_that_follow_the_answer_prefix(smollm2_tokenizer):
    verbalizer = build_verbalizer(TASK, smollm2_tokenizer)
    surfaces = {smollm2_tokenizer.decode(list(ids)): label for label, ids in verbalizer.variants}
    assert surfaces == {
        " positive": 0,
        "positive": 0,
        " Positive": 0,
        "Positive": 0,
        " negative": 1,
        "negative": 1,
        " Negative": 1,
        "Negative": 1,
    }
    prompt_ids = smollm2_tokenizer(render_prompt(TASK, "Fine."), add_special_tokens=False)["input_ids"]
    for _, ids in verbalizer.variants:
        full = smollm2_tokenizer(
            render_prompt(TASK, "Fine.") + smollm2_tokenizer.decode(list(ids)), add_special_tokens=False
        )
        assert full["input_ids"] == prompt_ids + list(ids)


def test_multi_token_labels_keep_every_token(smollm2_tokenizer):
    task = TaskConfig(instruction="Topic?", labels=[LabelSpec(name="world politics"), LabelSpec(name="sport")])
    verbalizer = build_verbalizer(task, smollm2_tokenizer)
    assert any(len(ids) > 1 for ids in verbalizer.multi_token_continuations)
    decoded = {smollm2_tokenizer.decode(list(ids)) for ids in verbalizer.multi_token_continuations}
    assert " world politics" in decoded


def test_labels_sharing_a_surface_form_are_refused(smollm2_tokenizer):
    task = TaskConfig(instruction="?", labels=[LabelSpec(name="Yes"), LabelSpec(name="yes_", verbalizers=[" yes"])])
    with pytest.raises(ValueError, match="share the surface form ' yes'"):
        build_verbalizer(task, smollm2_tokenizer)


def test_chat_style_uses_the_chat_template(smollm2_tokenizer):
    task = TASK.model_copy(update={"prompt_style": "chat"})
    prompt = render_prompt(task, "Great fun.", smollm2_tokenizer)
    assert prompt.startswith("<|im_start|>system\nClassify the sentiment")
    assert prompt.endswith("Text: Great fun.\nLabel:<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="chat template"):
        render_prompt(task, "x", None)


def test_an_aligned_prompt_end_adds_only_newlines_and_makes_every_prompt_whole_blocks(smollm2_tokenizer):
    from collections import Counter

    from llkd_ray.prompts import encode_prompts, prompt_padding

    block = 32
    newline = smollm2_tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    texts = ["Fine.", "A long, winding and in the end rewarding film. " * 4, "x", "Bad!", "é"]
    plain = encode_prompts(TASK, smollm2_tokenizer, texts)
    padding = prompt_padding(TASK, smollm2_tokenizer, block, align_end=True)
    padded = [padding.apply(ids) for ids in plain]
    # All but the last token whole blocks: vLLM leaves the block of a request's last prompt token uncached.
    assert padding.end_at % block == 0 and all(len(ids) % block == 1 for ids in padded)
    assert len({tuple(ids[: padding.end_at]) for ids in padded}) == 1  # one shared part, whole blocks: cached
    for before, after in zip(plain, padded):
        added = len(after) - len(before)
        assert Counter(after) - Counter(before) == Counter({newline: added})  # newlines only, nothing lost
        assert 0 <= added - len(padding.tokens) < block
        # The text's own line comes right after the newlines, as it was.
        tail = before[padding.end_at - len(padding.tokens) :]
        assert after[-len(tail) :] == tail and set(after[padding.end_at : len(after) - len(tail)]) <= {newline}
    # Without align_end the shared prefix alone is whole blocks, and prompts keep their own lengths.
    prefix_only = prompt_padding(TASK, smollm2_tokenizer, block)
    assert prefix_only.end_block == 0 and len({len(prefix_only.apply(ids)) % block for ids in plain}) > 1
