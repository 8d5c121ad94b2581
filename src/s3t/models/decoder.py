"""Decoder-only causal LMs for generation, and ensemble decoding over a shared frozen trunk.

One shape covers the causal LMs of transformers 5.24 named gpt2, llama, mistral, qwen2, qwen3, gemma, phi3,
opt and gpt_neox: token embedding (+ learned positions for gpt2/opt) -> a `ModuleList` of decoder blocks (+
one rotary embedding shared by all blocks) -> final norm -> LM head. `CausalLM` finds those parts among the
loaded modules and runs them piece by piece, so that embed -> blocks[0:n] -> output equals the model's own
forward logits bit for bit. The LM head stays frozen: a stage artifact is its group's adapters only.

Padding: training batches are padded on the RIGHT to a fixed length (a record's real tokens keep positions
0..len-1 and never attend to padding, so its values do not depend on its batch, as the trunk cache needs);
generation batches are padded on the LEFT (every row ends in the same column, so each step appends one
column to every KV cache). Position ids always come from the attention mask, as `generate` makes them.

`generate`: the blocks below the lowest adapted block run once per token for all shards with one KV cache;
each shard runs the rest with its own adapters (its slot) and its own cache; the shards' next-token
distributions are averaged and one token is chosen for all of them, so the ensemble decodes as one model.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import PlanError
from .base import Batch, LayeredModel

__all__ = ["CausalLM", "Shard", "generate", "position_ids_from_mask", "MODEL_TYPES", "IGNORE_INDEX"]

MODEL_TYPES = ("gemma", "gpt2", "gpt_neox", "llama", "mistral", "opt", "phi3", "qwen2", "qwen3")
IGNORE_INDEX = -100   # label of prompt and padding positions (the value torch's cross_entropy ignores)
_FINAL_NORMS = ("norm", "ln_f", "final_layer_norm")   # what the block list's owner calls its final norm


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions 0..len-1 of the real tokens of each row (padding gets 0), exactly as `generate` computes them."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


class CausalLM(LayeredModel):
    """A frozen causal LM trained to complete prompts: the loss is on completion tokens only."""

    task = "generate"
    kind = "prompt"
    aux_fields: ClassVar[tuple[str, ...]] = ("attention_mask", "labels")

    def load(self, path: Path) -> nn.Module:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **self.load_kwargs())
        self.pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id   # gpt2-style tokenizers have no pad token: any id works, it is masked
        self.eos_token_id = self.tokenizer.eos_token_id
        if self.eos_token_id is None:
            raise PlanError("the base model's tokenizer has no end-of-sequence token; generation needs one "
                            "(save the tokenizer with an eos_token)")
        self._find_parts(model)
        return model

    def _find_parts(self, model: nn.Module) -> None:
        """Locate embeddings, learned positions, rotary embedding, final norm and LM head."""
        from .base import find_blocks

        blocks_path, blocks = find_blocks(model)
        owner = model.get_submodule(blocks_path.rpartition(".")[0])   # GPT2Model, LlamaModel, OPTDecoder, ...
        embed_tokens = model.get_input_embeddings()   # gemma's scales itself by sqrt(hidden)
        learned = [m for m in owner.children() if isinstance(m, nn.Embedding) and m is not embed_tokens]
        rotary = [m for m in owner.children() if type(m).__name__.endswith("RotaryEmbedding")]
        norms = [getattr(owner, name) for name in _FINAL_NORMS if getattr(owner, name, None) is not None]
        project_out = getattr(owner, "project_out", None)
        # References into `model`, kept outside nn.Module's registry so no parameter is listed twice.
        self.parts = _Parts(
            embed_tokens=embed_tokens,
            project_in=getattr(owner, "project_in", None),   # opt with word_embed_proj_dim != hidden_size
            learned_positions=learned[0] if learned else None,   # gpt2 `wpe`, opt `embed_positions`
            rotary=rotary[0] if rotary else None,
            final=(*norms[:1], *([project_out] if project_out is not None else [])),
            lm_head=model.get_output_embeddings())
        config = model.config
        # Which mask each block gets: the rule the model and DynamicCache(config=...) use.
        types = getattr(config, "layer_types", None)
        if types is None:
            sliding = getattr(config, "sliding_window", None) is not None   # mistral, phi3 with a window
            types = ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers
        unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
        if unknown:
            raise PlanError(f"this {config.model_type} model has attention layers of type {unknown}; s3t runs "
                            "full and sliding-window attention only")
        self.layer_types = list(types)
        # gpt_neox blocks take the cache as `layer_past`, the others as `cache` (transformers 5 renamed
        # `past_key_values`); gpt2 blocks take it as their 2nd positional argument: always pass keywords.
        params = inspect.signature(blocks[0].forward).parameters
        self._cache_kw = "cache" if "cache" in params else "layer_past"

    # -- batches -----------------------------------------------------------------------------------
    def prepare(self, records: Sequence[tuple[str, str]]) -> Batch:
        """Right-padded input_ids, attention_mask and labels, each (B, max_length), of (prompt, completion) pairs.

        A row is prompt + completion + EOS; labels are the completion and EOS tokens, IGNORE_INDEX elsewhere.
        Too long: the prompt loses its oldest tokens first, then the completion its last ones.
        """
        B, T = len(records), self.max_length
        ids = torch.full((B, T), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        for i, (prompt_text, completion_text) in enumerate(records):
            prompt = self._prompt_ids(prompt_text)
            completion = self.tokenizer(completion_text, add_special_tokens=False)["input_ids"] + [self.eos_token_id]
            completion = completion[:T]
            prompt = prompt[max(0, len(prompt) + len(completion) - T):]
            row = prompt + completion
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
            labels[i, len(prompt):len(row)] = torch.tensor(completion)
        return self.to_device({"input_ids": ids, "attention_mask": mask, "labels": labels})

    def prepare_prompts(self, prompts: Sequence[str]) -> Batch:
        """Left-padded input_ids and attention_mask of prompts, tokenized as training tokenizes them (the
        oldest tokens are dropped past `max_length`)."""
        rows = [self._prompt_ids(p)[-self.max_length:] for p in prompts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        return self.to_device({"input_ids": ids, "attention_mask": mask})

    def _prompt_ids(self, prompt: str) -> list[int]:
        # The tokenizer's own special tokens (e.g. BOS) go in front of the prompt, none after it: prompt and
        # completion are tokenized apart so the label boundary is exact and generation sees the same prompt ids.
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if not ids:   # an empty prompt with a tokenizer that adds no BOS (gpt2): start from BOS, else EOS
            ids = [self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eos_token_id]
        return ids

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """Texts of generated token rows, stopping at the first EOS of each."""
        texts = []
        for row in tokens.tolist():
            if self.eos_token_id in row:
                row = row[:row.index(self.eos_token_id)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True))
        return texts

    # -- forward pieces ----------------------------------------------------------------------------
    def embed(self, batch: Batch, *, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Everything before block 0: token embeddings (+ projection, + learned positions)."""
        if position_ids is None:
            position_ids = position_ids_from_mask(batch["attention_mask"])
        parts = self.parts
        hidden = parts.embed_tokens(batch["input_ids"])
        if parts.project_in is not None:
            hidden = parts.project_in(hidden)
        if parts.learned_positions is not None:
            # gpt2's wpe takes positions; opt's embed_positions(mask, past, position_ids) adds its offset of 2
            if hasattr(parts.learned_positions, "offset"):
                hidden = hidden + parts.learned_positions(None, 0, position_ids=position_ids)
            else:
                hidden = hidden + parts.learned_positions(position_ids)
        return hidden   # embedding dropout (gpt2, gpt_neox) is skipped: the base model is always in eval mode

    def rotary_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        """(cos, sin) shared by every block, or None for models with learned positions."""
        return None if self.parts.rotary is None else self.parts.rotary(hidden, position_ids)

    def new_cache(self):
        """An empty KV cache laid out for this model (sliding-window layers where the config has them)."""
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _masks(self, hidden, attention_mask, position_ids, cache, start: int, stop: int) -> dict:
        """The masks blocks start..stop-1 need, sized against the first cache layer of each type in the range.

        A cache may hold only some layers (the shared trunk cache holds 0..s-1, a shard's cache s..n-1), so a
        mask must be sized against a layer this cache fills; the model itself sizes against layer 0.
        """
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        masks = {}
        for i in range(start, stop):
            kind = self.layer_types[i]
            if kind not in masks:
                fn = create_causal_mask if kind == "full_attention" else create_sliding_window_causal_mask
                masks[kind] = fn(config=self.model.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                 cache=cache, position_ids=position_ids, layer_idx=i if cache is not None else None)
        return masks

    def run_blocks(self, hidden: torch.Tensor, batch: Batch, start: int, stop: int, *, position_ids=None,
                   cache=None, position_embeddings=None) -> torch.Tensor:
        """Blocks start..stop-1 on hidden (B, q, H) with their active adapters.

        batch["attention_mask"] covers past + new tokens (B, past + q); position_ids the new ones (B, q),
        from the mask by default. With a cache, the blocks append their keys and values to it.
        """
        if start >= stop:
            return hidden
        attention_mask = batch["attention_mask"]
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        if position_embeddings is None:
            position_embeddings = self.rotary_embeddings(hidden, position_ids)
        masks = self._masks(hidden, attention_mask, position_ids, cache, start, stop)
        extra = {} if position_embeddings is None else {"position_embeddings": position_embeddings}
        for i in range(start, stop):
            hidden = self.blocks[i](hidden, attention_mask=masks[self.layer_types[i]], position_ids=position_ids,
                                    use_cache=cache is not None, **{self._cache_kw: cache}, **extra)
        return hidden

    def output(self, hidden: torch.Tensor, batch: Batch | None = None, *, slot: int = 0,
               last_only: bool = False) -> torch.Tensor:
        """Final norm (+ opt's project_out) and the frozen LM head: token logits. `last_only` slices after the
        norm, as `generate` does."""
        for module in self.parts.final:
            hidden = module(hidden)
        if last_only:
            hidden = hidden[:, -1:, :]
        return self.parts.lm_head(hidden)

    # -- loss --------------------------------------------------------------------------------------
    def loss(self, outputs: torch.Tensor, batch: Batch, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Mean over the batch's completion tokens, computed as transformers' ForCausalLMLoss computes it."""
        V = outputs.shape[-1]
        shifted = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:].contiguous()
        return F.cross_entropy(outputs.float().view(-1, V), shifted.view(-1), ignore_index=IGNORE_INDEX)

    @staticmethod
    def record_losses_from_log_probs(log_probs: torch.Tensor, labels: torch.Tensor
                                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(negative log-likelihood of the completion tokens, their number) per record, from next-token
        log-probabilities (B, T, vocab): what perplexity sums."""
        shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
        keep = shifted != IGNORE_INDEX
        picked = log_probs.gather(-1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return -(picked * keep).sum(-1), keep.sum(-1)


@dataclass(frozen=True)
class _Parts:
    """Where a causal LM keeps what runs before and after its blocks."""

    embed_tokens: nn.Module
    project_in: nn.Module | None
    learned_positions: nn.Module | None
    rotary: nn.Module | None
    final: tuple[nn.Module, ...]
    lm_head: nn.Module


# -- ensemble generation ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    """One served shard model in generation: groups 1..depth of adapter slot `slot`."""

    slot: int
    depth: int


def _choose(logits: torch.Tensor, *, temperature: float, aggregation: str, generator) -> torch.Tensor:
    """One next token per row from the shards' logits (m, B, V)."""
    if aggregation == "mean_logprob":
        if temperature == 0.0:
            # argmax of the mean log-probability = argmax of the mean logits (the log-normalisers are constants)
            return logits.mean(0).argmax(-1)
        probs = torch.softmax(torch.log_softmax(logits / temperature, dim=-1).mean(0), dim=-1)
    else:   # mean_proba
        probs = torch.softmax(logits / (temperature or 1.0), dim=-1).mean(0)
        if temperature == 0.0:
            return probs.argmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(lm: CausalLM, prompts: Batch, shards: Sequence[Shard], *, max_new_tokens: int,
             temperature: float = 0.0, aggregation: str = "mean_proba", share_trunk: bool = True,
             generator: torch.Generator | None = None, logits: list | None = None) -> torch.Tensor:
    """Decode left-padded prompts with the ensemble of `shards`, one token for all shards per step: (B, new).

    share_trunk: every frozen block runs once per step for all shards, with one KV cache: the frozen pass goes
    up to the highest shard start, and each shard branches off at its own start (the lowest block it adapts).
    With share_trunk=False every shard runs every block itself (the per-shard baseline, for benchmarks).
    Rows that ended (EOS) get padding until every row has ended. `logits`, if given, receives each step's
    next-token logits (shards, B, vocab).
    """
    n = lm.num_blocks
    starts = [lm.group_start(lm.groups_at(s.depth)) if share_trunk else 0 for s in shards]
    taps = sorted(set(starts))               # where shards branch off the frozen pass
    trunk_cache = lm.new_cache()             # holds layers 0..taps[-1]-1 only
    caches = [lm.new_cache() for _ in shards]   # shard k: layers starts[k]..n-1 only
    mask = prompts["attention_mask"]
    B = mask.shape[0]
    finished = torch.zeros(B, dtype=torch.bool, device=mask.device)
    chosen = []
    step_ids, step_pos = prompts["input_ids"], position_ids_from_mask(mask)
    for _ in range(max_new_tokens):
        step = {"input_ids": step_ids, "attention_mask": mask}
        hidden = lm.embed(step, position_ids=step_pos)
        rope = lm.rotary_embeddings(hidden, step_pos)
        lm.set_active(0)
        branch, at = {}, 0
        for stop in taps:
            hidden = lm.run_blocks(hidden, step, at, stop, position_ids=step_pos, cache=trunk_cache,
                                   position_embeddings=rope)
            branch[stop], at = hidden, stop
        per_shard = []
        for shard, start, cache in zip(shards, starts, caches):
            lm.set_active(lm.groups_at(shard.depth), slot=shard.slot)
            top = lm.run_blocks(branch[start], step, start, n, position_ids=step_pos, cache=cache,
                                position_embeddings=rope)
            per_shard.append(lm.output(top, last_only=True)[:, -1])
        step_logits = torch.stack(per_shard)
        if logits is not None:
            logits.append(step_logits)
        token = _choose(step_logits, temperature=temperature, aggregation=aggregation, generator=generator)
        token = torch.where(finished, torch.full_like(token, lm.pad_token_id), token)   # as `generate` does
        finished |= token == lm.eos_token_id
        chosen.append(token)
        if finished.all():
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=-1)
        step_ids, step_pos = token[:, None], step_pos[:, -1:] + 1
    lm.set_active(0)
    return torch.stack(chosen, dim=1)
