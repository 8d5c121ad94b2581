"""Ensemble inference over the served shard models, sharing the frozen trunk between shards."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from .backbone import Backbone

__all__ = ["shard_logits", "aggregate"]


def shard_logits(backbone: Backbone, components: Sequence[dict], texts: Sequence[str], *,
                 load: Callable[[str], dict[str, torch.Tensor]], batch_size: int) -> np.ndarray:
    """Logits of every served shard model: array (shards, texts, labels).

    Each component is {shard, depth, artifacts}: stages 1..depth of one order. The frozen trunk runs once
    per batch up to the lowest block any shard adapts; each shard then continues from there.
    """
    out = np.zeros((len(components), len(texts), backbone.head.out_features), dtype=np.float32)
    shared_stop = min(backbone.group_start(backbone.groups_at(c["depth"])) for c in components)
    with torch.no_grad():
        for b in range(0, len(texts), batch_size):
            input_ids, mask = backbone.tokenize(list(texts[b:b + batch_size]))
            backbone.set_depth(0)
            trunk = backbone.trunk(input_ids, mask, shared_stop)
            for k, component in enumerate(components):
                for lineage in component["artifacts"]:   # groups 1..depth; the last leaves head = stage depth's
                    backbone.load_state(load(lineage))
                groups = backbone.groups_at(component["depth"])
                start = backbone.group_start(groups)
                backbone.set_depth(0)
                hidden = backbone.run_blocks(trunk, mask, shared_stop, start)   # frozen, below this shard's groups
                backbone.set_depth(groups)
                out[k, b:b + batch_size] = backbone.top(hidden, mask, start).numpy()
    backbone.set_depth(0)
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
