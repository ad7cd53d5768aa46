"""A classifier on the mean of an encoder's last hidden states (``student.pooling=mean``).

BERT-style ``*ForSequenceClassification`` heads read the first token ([CLS]) through a pooler. Sentence-embedding
checkpoints such as all-MiniLM-L6-v2 were trained on the *mean* of the token states instead, so their [CLS] state
was never trained to summarise the text; SetFit and sentence-transformers classify on the mean for that reason.

The model is a transformers ``PreTrainedModel`` of its own type (``llkd_mean_pooled``), registered with the Auto
classes when this module is imported: ``save_pretrained`` / ``AutoModelForSequenceClassification.from_pretrained``
work as for any HF classifier once ``llkd_ray`` is imported. Without it, transformers refuses the unknown model type
(it cannot silently load the weights under another head). Any encoder ``AutoModel`` builds works; its own pooler,
if it has one, is dropped (unused parameters would stall DDP's gradient reduction).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput

MODEL_TYPE = "llkd_mean_pooled"


def masked_mean(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, hidden]: the mean of each text's token states, its padding left out."""
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


class MeanPooledConfig(PretrainedConfig):
    model_type = MODEL_TYPE

    def __init__(self, encoder: dict | None = None, classifier_dropout: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.encoder = dict(encoder or {})
        self.classifier_dropout = classifier_dropout
        # What callers read off any HF classifier's config (embedding sizes, the tokenizer's limits).
        self.hidden_size = self.encoder.get("hidden_size")

    def encoder_config(self) -> PretrainedConfig:
        settings = dict(self.encoder)
        return AutoConfig.for_model(settings.pop("model_type"), **settings)


class MeanPooledClassifier(PreTrainedModel):
    config_class = MeanPooledConfig
    base_model_prefix = "encoder"
    supports_gradient_checkpointing = False

    def __init__(self, config: MeanPooledConfig, encoder=None):
        super().__init__(config)
        self.encoder = encoder if encoder is not None else AutoModel.from_config(config.encoder_config())
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None
        self.dropout = torch.nn.Dropout(config.classifier_dropout)
        self.classifier = torch.nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module):
        if module is self.classifier:  # the encoder's own weights come from its checkpoint
            module.weight.data.normal_(mean=0.0, std=0.02)
            module.bias.data.zero_()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        labels=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        output = self.encoder(**inputs, output_hidden_states=output_hidden_states, return_dict=True)
        states = output.last_hidden_state
        pooled = states.mean(dim=1) if attention_mask is None else masked_mean(states, attention_mask)
        logits = self.classifier(self.dropout(pooled))
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=output.hidden_states)


def mean_pooled_from_encoder(path, num_labels: int, id2label: dict, label2id: dict) -> MeanPooledClassifier:
    """A fresh mean-pooled classifier around the encoder checkpoint at ``path`` (its weights, a new head)."""
    encoder = AutoModel.from_pretrained(path)
    config = MeanPooledConfig(
        encoder=encoder.config.to_dict(), num_labels=num_labels, id2label=id2label, label2id=label2id
    )
    return MeanPooledClassifier(config, encoder=encoder)


def checkpoint_pooling(path: Path) -> str:
    """``student.pooling=auto``: "mean" for a sentence-transformers checkpoint whose Pooling module averages the
    token states (its modules.json and the module's config.json say so), else "model" (the architecture's head)."""
    try:
        modules = json.loads((Path(path) / "modules.json").read_text())
        pooling = next(m for m in modules if str(m.get("type", "")).endswith(".Pooling"))
        settings = json.loads((Path(path) / pooling["path"] / "config.json").read_text())
    except (OSError, ValueError, TypeError, KeyError, AttributeError, StopIteration):
        return "model"  # not a sentence-transformers checkpoint, or one this cannot read
    return "mean" if settings.get("pooling_mode_mean_tokens") is True else "model"


AutoConfig.register(MODEL_TYPE, MeanPooledConfig, exist_ok=True)
AutoModelForSequenceClassification.register(MeanPooledConfig, MeanPooledClassifier, exist_ok=True)
# save_pretrained copies this file next to the weights and names it in config.json's auto_map, so an exported
# student also loads where llkd_ray is not installed: from_pretrained(directory, trust_remote_code=True).
MeanPooledConfig.register_for_auto_class()
MeanPooledClassifier.register_for_auto_class("AutoModelForSequenceClassification")
