"""Ensemble inference over the served shard models, sharing the frozen trunk between shards.

Every served component (one shard's order, stages 1..depth) is loaded into an adapter slot of its own
(`LayeredModel`: slot k + 1 for the k-th component; slot 0 belongs to training), so switching between
shards is switching adapters. The frozen trunk runs once per batch up to the lowest block any shard
adapts; each shard then continues from there with its own adapters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .models import LayeredModel

__all__ = ["load_components", "shard_logits", "aggregate", "generate", "perplexity"]

Load = Callable[[str], dict[str, torch.Tensor]]


def load_components(model: LayeredModel, components: Sequence[dict], load: Load) -> list[int]:
    """Load each component's stages into its slot (once: a slot keeps what it holds until it changes)."""
    loaded = model.slot_contents
    slots = []
    for k, component in enumerate(components):
        slot = k + 1
        if slot >= model.slots:
            raise ValueError(f"{len(components)} served components but only {model.slots - 1} serving slots")
        wanted = tuple(component["artifacts"])
        if loaded.get(slot) != wanted:
            loaded.pop(slot, None)   # half-loaded if a load fails below
            for lineage in wanted:   # groups 1..depth; the last one leaves the head of stage `depth`
                model.load_state(load(lineage), slot=slot)
            loaded[slot] = wanted
        slots.append(slot)
    return slots


def shard_logits(model: LayeredModel, components: Sequence[dict], inputs: Sequence, *, load: Load,
                 batch_size: int) -> np.ndarray:
    """Class logits of every served shard model: array (shards, inputs, labels)."""
    slots = load_components(model, components, load)
    out = np.zeros((len(components), len(inputs), model.num_outputs), dtype=np.float32)
    starts = [model.group_start(model.groups_at(c["depth"])) for c in components]
    shared_stop = min(starts)
    with torch.no_grad():
        for b in range(0, len(inputs), batch_size):
            batch = model.prepare(list(inputs[b:b + batch_size]))
            model.set_active(0)
            trunk = model.run_blocks(model.embed(batch), batch, 0, shared_stop)
            for k, (component, slot, start) in enumerate(zip(components, slots, starts)):
                model.set_active(0)
                hidden = model.run_blocks(trunk, batch, shared_stop, start)   # frozen, below this shard's groups
                model.set_active(model.groups_at(component["depth"]), slot=slot)
                out[k, b:b + batch_size] = model.top(hidden, batch, start, slot=slot).float().cpu().numpy()
    model.set_active(0)
    return out


def aggregate(logits: np.ndarray, how: str) -> np.ndarray:
    """Combine per-shard logits (shards, n, labels) into class probabilities (n, labels)."""
    if how == "mean_logits":
        return torch.softmax(torch.from_numpy(logits.mean(axis=0)), dim=-1).numpy()
    if how == "vote":
        votes = np.zeros(logits.shape[1:], dtype=np.float32)
        winners = logits.argmax(axis=-1)
        for shard_winners in winners:
            votes[np.arange(len(shard_winners)), shard_winners] += 1
        return votes / len(logits)
    return torch.softmax(torch.from_numpy(logits), dim=-1).numpy().mean(axis=0)   # mean_proba


def generate(model: LayeredModel, components: Sequence[dict], prompts: Sequence[str], *, load: Load,
             max_new_tokens: int, temperature: float, aggregation: str, seed: int | None) -> list[str]:
    """Completions of `prompts` by the ensemble of served shards, decoding one token for all shards per step."""
    from .models.decoder import Shard
    from .models.decoder import generate as decode

    slots = load_components(model, components, load)
    shards = [Shard(slot=slot, depth=c["depth"]) for slot, c in zip(slots, components)]
    generator = None if seed is None else torch.Generator(device=model.device).manual_seed(seed)
    tokens = decode(model, model.prepare_prompts(prompts), shards, max_new_tokens=max_new_tokens,
                    temperature=temperature, aggregation=aggregation, generator=generator)
    return model.decode(tokens)


def perplexity(model: LayeredModel, components: Sequence[dict], records: Sequence[tuple[str, str]], *,
               load: Load, batch_size: int) -> float:
    """exp of the mean negative log-likelihood of the completion tokens under the ensemble (the shards'
    next-token probabilities averaged, as `generate` averages them)."""
    import math

    slots = load_components(model, components, load)
    starts = [model.group_start(model.groups_at(c["depth"])) for c in components]
    shared_stop = min(starts)
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(records), batch_size):
            batch = model.prepare(list(records[b:b + batch_size]))
            model.set_active(0)
            trunk = model.run_blocks(model.embed(batch), batch, 0, shared_stop)
            probs = 0
            for component, slot, start in zip(components, slots, starts):
                model.set_active(0)
                hidden = model.run_blocks(trunk, batch, shared_stop, start)
                model.set_active(model.groups_at(component["depth"]), slot=slot)
                probs = probs + torch.softmax(model.top(hidden, batch, start, slot=slot).float(), dim=-1)
            log_probs = torch.log(probs / len(components))
            nll, n = model.record_losses_from_log_probs(log_probs, batch["labels"])
            total, count = total + float(nll.sum()), count + int(n.sum())
    model.set_active(0)
    return math.exp(total / count) if count else float("nan")
