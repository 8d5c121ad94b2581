"""The frozen-trunk cache: each record's frozen hidden states at the layer-group boundaries.

At stage i of any order, every block below group i runs the frozen backbone with no adapter, so a
record's hidden state there is the same for every stage, order and shard. It is computed once per record
and reused by all of them. These properties keep training bit-exact and erasure honest:

- a record's value never depends on the other records in its batch: batches always have the same shape
  (the last one is padded by repeating a row), and a transformer mixes no information across rows;
- the cache lives under a key of everything that changes the values (base model digest, max length,
  boundaries, numeric environment): a different key means a different folder, and stale folders are
  shredded;
- each file is sealed (AES-GCM) under its record's key, so whatever copy of it lingers dies with the key;
- the cache lock (a `flock` every process of the run shares) orders fills and deletions. A fill computes
  a batch without it, then, under it, keeps only the records still live and writes those; a deletion
  shreds its records' files under it and holds it until its transaction has committed. So either the
  fill's check sees the committed deletion, or the deletion's shred comes after the fill's write: an
  acknowledged deletion never has a cached state written behind it. Reads take the lock too, so they
  never see a file half shredded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import IntegrityError
from .files import FileLock, private_dir, shred, write_private
from .keystore import aad, seal, unseal

if TYPE_CHECKING:
    import torch

    from .registry import Registry

__all__ = ["TrunkCache", "CacheMiss", "cache_key", "cache_lock", "erase_records", "erasing", "sweep"]

CACHE_DIR = "cache"
LOCK_FILE = "cache.lock"   # in the run folder
SUFFIX = ".sealed"
BATCH = 16   # fixed batch shape for computing the cache (see the module docstring)


class CacheMiss(KeyError):
    """A record's cached state vanished: it was deleted while training was using it."""


def cache_key(*, base_model: str, max_length: int, boundaries: Sequence[int], environment: str) -> str:
    # The environment too: hidden states computed on another numeric stack must not feed this one's training.
    payload = {"base_model": base_model, "max_length": max_length, "boundaries": list(boundaries),
               "environment": environment}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _record_name(record_id: str) -> str:
    return hashlib.sha256(record_id.encode()).hexdigest()   # file names never show ids


def _named_file(root: Path, name: str) -> Path:
    return root / name[:2] / f"{name}{SUFFIX}"


def _record_file(root: Path, record_id: str) -> Path:
    return _named_file(root, _record_name(record_id))


def cache_lock(run_dir: Path) -> FileLock:
    """The run's cache lock (a new open file each time: two of them conflict, even in one process)."""
    return FileLock(Path(run_dir) / LOCK_FILE)


def erase_records(run_dir: Path, record_ids: Sequence[str]) -> None:
    """Shred the cached hidden states of these records under every cache key of the run."""
    base = Path(run_dir) / CACHE_DIR
    if not base.is_dir():
        return
    for key_dir in base.iterdir():
        for rid in record_ids:
            shred(_record_file(key_dir, rid))


@contextmanager
def erasing(run_dir: Path, record_ids: Sequence[str]) -> Iterator[None]:
    """Shred these records' cached states, then hold the cache lock until the block ends.

    The deletion path ends this block after its commit, so no fill can write one of these records'
    states in between (see the module docstring).
    """
    with cache_lock(run_dir).hold():
        erase_records(run_dir, record_ids)
        yield


def sweep(run_dir: Path, live_ids: Sequence[str]) -> list[Path]:
    """Shred every cached file that belongs to no live record, and temp files of interrupted writes.

    Only safe while no fill runs (fills run in training: hold the training lock); returns what it shredded.
    """
    base = Path(run_dir) / CACHE_DIR
    if not base.is_dir():
        return []
    live = {_record_name(i) for i in live_ids}
    shredded = []
    for path in sorted(p for p in base.rglob("*") if p.is_file()):
        name, key_dir = path.name.removesuffix(SUFFIX), path.parent.parent
        if name in live and key_dir.parent == base and path == _named_file(key_dir, name):
            continue
        if shred(path):
            shredded.append(path)
    return shredded


class TrunkCache:
    """Per-record sealed safetensors {aux fields (e.g. "attention_mask": (T,)), "hidden": (boundaries, T, H)}."""

    def __init__(self, run_dir: Path, *, key: str, boundaries: Sequence[int], registry: "Registry") -> None:
        self.run_dir = Path(run_dir)
        self.base = self.run_dir / CACHE_DIR
        self.root = self.base / key
        self.name = key
        self.boundaries = list(boundaries)
        self.registry = registry
        self._index = {b: k for k, b in enumerate(self.boundaries)}
        self._slots: dict[str, int] = {}   # record id -> key slot (a re-added record gets a new one)
        if self.base.is_dir():   # invalidation: values under another key were computed differently
            for stale in self.base.iterdir():
                if stale != self.root:
                    for f in stale.rglob("*"):
                        if f.is_file():
                            shred(f)
                    shutil.rmtree(stale, ignore_errors=True)

    def missing(self, ids: Sequence[str]) -> list[str]:
        return [i for i in ids if not _record_file(self.root, i).is_file()]

    def fill(self, model, ids: Sequence[str], input_of: Callable[[str], object],
             on_batch: Callable[[int], None] = lambda n: None) -> None:
        """Compute and store the hidden states of `ids` (those not cached yet, and still live when written);
        `input_of(id)` is the record's model input (`LayeredModel.prepare` takes a list of them)."""
        import torch

        todo = self.missing(ids)
        top = max(self.boundaries)
        model.set_active(0)
        for b in range(0, len(todo), BATCH):
            batch = todo[b:b + BATCH]
            inputs = [input_of(i) for i in batch]
            inputs += [inputs[-1]] * (BATCH - len(inputs))   # same shape every time: values independent of batch
            prepared = model.prepare(inputs)
            with torch.no_grad():   # outside the cache lock: deletions never wait for a forward pass
                hidden = model.embed(prepared)
                states, at = {}, 0
                for stop in sorted(self.boundaries):
                    hidden = model.run_blocks(hidden, prepared, at, stop)
                    states[stop], at = hidden, stop
                assert at == top
            self._store(batch, states, {f: prepared[f] for f in model.aux_fields})
            on_batch(len(batch))

    def _store(self, batch: Sequence[str], states: dict[int, torch.Tensor], aux: dict[str, torch.Tensor]) -> None:
        """Under the cache lock, write the states of the batch's records that are still live (one registry read)."""
        import torch
        from safetensors.torch import save

        with cache_lock(self.run_dir).hold():
            slots = self.registry.key_slots(batch, live_only=True)
            keys = self.registry.keys.keys(slots.values())   # a destroyed key reads as None: never seal with it
            for k, rid in enumerate(batch):
                key = keys.get(slots.get(rid, -1))
                if key is None:   # deleted since the batch was read: its state must not be written
                    continue
                stacked = torch.stack([states[s][k] for s in self.boundaries]).to("cpu").contiguous()
                data = save({**{f: t[k].to("cpu").contiguous() for f, t in aux.items()}, "hidden": stacked})
                path = _record_file(self.root, rid)
                private_dir(path.parent)
                write_private(path, seal(key, data, aad("cache", self.name, rid)), durable=False)
                self._slots[rid] = slots[rid]

    def load(self, ids: Sequence[str], boundary: int, *, device: str = "cpu") -> tuple[torch.Tensor, dict]:
        """(hidden (B, T, H) at block `boundary`, {aux field: (B, ...)}) for a batch of records."""
        import torch
        from safetensors.torch import load

        k = self._index[boundary]
        unknown = [i for i in ids if i not in self._slots]
        if unknown:
            self._slots.update(self.registry.key_slots(unknown))
        hidden, aux = [], []
        with cache_lock(self.run_dir).hold():   # a deletion shreds under this lock: no half-shredded reads
            keys = self.registry.keys.keys(self._slots[i] for i in ids if i in self._slots)
            dead = [i for i in ids if keys.get(self._slots.get(i, -1)) is None]
            if dead:   # deleted; or deleted and added again since, under a new key (S3T.add(replace_deleted=True))
                self._slots.update(self.registry.key_slots(dead, live_only=True))
                keys = self.registry.keys.keys(self._slots[i] for i in ids if i in self._slots)
            for rid in ids:
                key = keys.get(self._slots.get(rid, -1))
                if key is None:   # the record was deleted: its key is gone
                    raise CacheMiss(rid)
                path = _record_file(self.root, rid)
                try:
                    blob = path.read_bytes()
                except FileNotFoundError:
                    raise CacheMiss(rid) from None
                try:
                    tensors = load(unseal(key, blob, aad("cache", self.name, rid)))
                except IntegrityError:
                    raise IntegrityError(f"the cached state at {path} is damaged; delete the folder {self.root} "
                                         "(it is recomputed on the next training)") from None
                hidden.append(tensors.pop("hidden")[k])
                aux.append(tensors)
        fields = {f: torch.stack([a[f] for a in aux]).to(device) for f in aux[0]} if aux else {}
        return torch.stack(hidden).to(device), fields
