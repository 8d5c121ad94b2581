"""BERT-like text encoders for classification: mean pooling over real tokens, then a linear head per stage."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from .base import Batch, LayeredModel

__all__ = ["TextEncoder", "MODEL_TYPES"]

MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "camembert")


class TextEncoder(LayeredModel):
    """A frozen text encoder (model.embeddings, then its blocks) classifying texts."""

    task = "classify"
    kind = "text"
    aux_fields: ClassVar[tuple[str, ...]] = ("attention_mask",)

    def load(self, path: Path) -> nn.Module:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        kwargs = {"add_pooling_layer": False} if _has_pooler(path) else {}
        return AutoModel.from_pretrained(path, **self.load_kwargs(), **kwargs)

    def prepare(self, texts: Sequence[str]) -> Batch:
        """Token ids and attention mask, padded to `max_length` so a text's tensors never depend on its batch."""
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return self.to_device({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})

    def embed(self, batch: Batch) -> torch.Tensor:
        return self.model.embeddings(input_ids=batch["input_ids"])

    def run_blocks(self, hidden: torch.Tensor, batch: Batch, start: int, stop: int) -> torch.Tensor:
        from transformers.masking_utils import create_bidirectional_mask

        if start >= stop:
            return hidden
        mask = create_bidirectional_mask(config=self.model.config, inputs_embeds=hidden,
                                         attention_mask=batch["attention_mask"])
        for block in self.blocks[start:stop]:
            hidden = block(hidden, mask)
        return hidden

    def output(self, hidden: torch.Tensor, batch: Batch, *, slot: int = 0) -> torch.Tensor:
        """Mean pooling over real tokens, then the head of `slot`: logits (B, labels)."""
        weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        head = self.heads[slot]   # float32 whatever the model's dtype: the trained head keeps full precision
        return head(pooled.to(head.weight.dtype))

    def loss(self, outputs: torch.Tensor, batch: Batch, targets: torch.Tensor | None) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, targets)


def _has_pooler(path: Path) -> bool:
    """Whether the model class takes `add_pooling_layer` (BERT-likes do; a pooler s3t never uses stays out)."""
    import inspect

    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(path)
    cls = AutoModel._model_mapping[type(config)]
    return "add_pooling_layer" in inspect.signature(cls.__init__).parameters
