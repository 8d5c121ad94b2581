"""The frozen-trunk cache: each record's frozen hidden states at the layer-group boundaries.

At stage i of any order, every block below group i runs the frozen backbone with no adapter, so a
record's hidden state there is the same for every stage, order and shard. It is computed once per record
and reused by all of them. Three properties keep training bit-exact and erasure honest:

- a record's value never depends on the other records in its batch: batches always have the same shape
  (the last one is padded by repeating a row), and a transformer mixes no information across rows;
- the cache lives under a key of everything that changes the values (base model digest, max length,
  boundaries, numeric environment): a different key means a different folder, and stale folders are wiped;
- deleting a record overwrites its file with zeros before unlinking it, inside the deletion transaction.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .store import shred_file

if TYPE_CHECKING:
    import torch

__all__ = ["TrunkCache", "CacheMiss", "cache_key", "erase_records"]

CACHE_DIR = "cache"
BATCH = 16   # fixed batch shape for computing the cache (see the module docstring)


class CacheMiss(KeyError):
    """A record's cached state vanished: it was deleted while training was using it."""


def cache_key(*, base_model: str, max_length: int, boundaries: Sequence[int], environment: str) -> str:
    # The environment too: hidden states computed on another numeric stack must not feed this one's training.
    payload = {"base_model": base_model, "max_length": max_length, "boundaries": list(boundaries),
               "environment": environment}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _record_file(root: Path, record_id: str) -> Path:
    name = hashlib.sha256(record_id.encode()).hexdigest()   # file names never show ids
    return root / name[:2] / f"{name}.safetensors"


def erase_records(run_dir: Path, record_ids: Sequence[str]) -> None:
    """Shred the cached hidden states of these records under every cache key of the run."""
    base = Path(run_dir) / CACHE_DIR
    if not base.is_dir():
        return
    for key_dir in base.iterdir():
        for rid in record_ids:
            path = _record_file(key_dir, rid)
            shred_file(path)
            shred_file(path.with_suffix(".tmp"))   # left by a crash mid-write


class TrunkCache:
    """Per-record safetensors files {"mask": (T,), "hidden": (len(boundaries), T, H)} under one key."""

    def __init__(self, run_dir: Path, *, key: str, boundaries: Sequence[int]) -> None:
        self.base = Path(run_dir) / CACHE_DIR
        self.root = self.base / key
        self.boundaries = list(boundaries)
        self._index = {b: k for k, b in enumerate(self.boundaries)}
        if self.base.is_dir():   # invalidation: values under another key were computed differently
            for stale in self.base.iterdir():
                if stale != self.root:
                    for f in stale.rglob("*.safetensors"):
                        shred_file(f)
                    shutil.rmtree(stale, ignore_errors=True)

    def shred(self, ids: Sequence[str]) -> None:
        """Shred the cached states of these records (under this key)."""
        for rid in ids:
            shred_file(_record_file(self.root, rid))

    def missing(self, ids: Sequence[str]) -> list[str]:
        return [i for i in ids if not _record_file(self.root, i).is_file()]

    def fill(self, backbone, ids: Sequence[str], text_of: Callable[[str], str],
             on_batch: Callable[[int], None] = lambda n: None) -> None:
        """Compute and store the hidden states of `ids` (those not cached yet)."""
        import torch
        from safetensors.torch import save_file

        todo = self.missing(ids)
        top = max(self.boundaries)
        backbone.set_depth(0)
        for b in range(0, len(todo), BATCH):
            batch = todo[b:b + BATCH]
            texts = [text_of(i) for i in batch]
            texts += [texts[-1]] * (BATCH - len(texts))   # same shape every time: values independent of batch
            input_ids, mask = backbone.tokenize(texts)
            with torch.no_grad():
                hidden = backbone.family.embed(backbone.model, input_ids)
                states, at = {}, 0
                for stop in sorted(self.boundaries):
                    hidden = backbone.run_blocks(hidden, mask, at, stop)
                    states[stop], at = hidden, stop
                assert at == top
            for k, rid in enumerate(batch):
                path = _record_file(self.root, rid)
                path.parent.mkdir(parents=True, exist_ok=True)
                stacked = torch.stack([states[s][k] for s in self.boundaries]).contiguous()
                tmp = path.with_suffix(".tmp")
                save_file({"mask": mask[k].contiguous(), "hidden": stacked}, tmp)
                try:
                    os.replace(tmp, path)
                except FileNotFoundError:   # a deletion shredded the temp file: the record is gone
                    pass
            on_batch(len(batch))

    def load(self, ids: Sequence[str], boundary: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden (B, T, H) at block `boundary`, attention mask (B, T)) for a batch of records."""
        import torch
        from safetensors import safe_open

        k = self._index[boundary]
        hidden, masks = [], []
        for rid in ids:
            try:
                f = safe_open(_record_file(self.root, rid), framework="pt")
            except FileNotFoundError:
                raise CacheMiss(rid) from None
            with f:
                hidden.append(f.get_slice("hidden")[k])
                masks.append(f.get_tensor("mask"))
        return torch.stack(hidden), torch.stack(masks)
