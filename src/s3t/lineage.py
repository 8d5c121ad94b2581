"""Lineage: what a trained component saw, its content address, and every seed derived from it.

A stage artifact (one layer group's LoRA weights + that stage's head) is a pure function of its lineage:
the training fields of the plan (the label space included), the base model's digest, the numeric
environment it is trained in (`s3t.environment`) and the ordered list of slices in its prefix (each slice
as its sorted record ids). Seeds come from the lineage hash, never from global RNG state or job order,
so the same lineage trains to the same bits wherever and whenever it runs, and an unchanged prefix keeps
its name (and its file) across deletions elsewhere in the shard.

A record added under the id of a deleted one (`S3T.add(..., replace_deleted=True)`) is a new record: it
enters its slice's digest with its generation, so no stage that saw it is ever named like a stage that
saw the deleted one. Its seeds come from the same lineage without generations, which is the lineage a
fresh run on the same data has: it trains to the same bits as that fresh run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["slice_digest", "lineage_hash", "stage_seed", "epoch_order"]

LINEAGE_FORMAT = 2


def _sha256(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def slice_digest(ids: Iterable[str], generations: Mapping[str, int] | None = None) -> str:
    """Digest of one slice's contents: its record ids, sorted, so row order never matters.

    A record re-added under the id of a deleted one (`generations[id]` > 0) enters as [id, generation]:
    a stage that saw the new record is never named like one that saw the deleted one.
    """
    generations = generations or {}
    return _sha256([[i, generations[i]] if generations.get(i) else i for i in sorted(ids)])


def lineage_hash(*, training: dict, base_model: str, environment: str, prefix: Sequence[str]) -> str:
    """Content address of the stage trained on `prefix` (the slice digests π1..πi, in order) in the
    numeric environment with fingerprint `environment`."""
    return _sha256({
        "format": LINEAGE_FORMAT,
        "training": training,
        "base_model": base_model,
        "environment": environment,
        "prefix": list(prefix),
    })


def stage_seed(lineage: str) -> int:
    """The stage's RNG seed: LoRA init, head init, dropout all draw from it."""
    return int(lineage[:15], 16)


def epoch_order(ids: Iterable[str], *, seed: int, epoch: int) -> list[str]:
    """Deterministic shuffle of record ids for one epoch, from ids and seed alone.

    Sorting by a keyed hash (rather than permuting row positions) means deleting one record never moves
    the others: the survivors keep their relative order.
    """
    key = f"{seed}:{epoch}:".encode()
    return sorted(ids, key=lambda i: hashlib.blake2b(key + i.encode(), digest_size=16).digest())
