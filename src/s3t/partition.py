"""Partition records into (shard, slice) cells, deterministically and one record at a time.

Each record's cell is a pure function of (seed, partition key): removing or adding records never moves
any other record, so "retrain without the deleted data" reproduces the same partition minus the deleted
records, which is what exact unlearning needs. Records of one data subject share a key, hence one cell:
forgetting a subject then touches one slice of one shard.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

from s3t.errors import DataError, PlanError

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

__all__ = ["assign", "partition_key", "partition", "slice_sizes"]


class _Record(Protocol):
    id: str
    subject: str | None


def _check_counts(num_shards: int, num_slices: int) -> None:
    """Raise PlanError unless both counts are integers >= 1."""
    for name, value in (("num_shards", num_shards), ("num_slices", num_slices)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlanError(f"`{name}` must be an integer >= 1; got {value!r}. Set `{name}` to a positive integer.")


def assign(key: str, *, seed: int, num_shards: int, num_slices: int) -> tuple[int, int]:
    """Return the (shard, slice) of a partition key, a pure function of (seed, key)."""
    _check_counts(num_shards, num_slices)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise PlanError(f"`seed` must be an integer; got {seed!r}.")
    if not isinstance(key, str):
        raise DataError(f"partition key must be a string; got {key!r}. Give records string ids.")
    # blake2b, not hash(): Python salts str hashes per process, and the partition must survive restarts.
    # The seed's decimal form never contains NUL, so "seed NUL key" cannot be read two ways.
    digest = hashlib.blake2b(
        f"{seed}\x00{key}".encode("utf-8"), digest_size=16, person=b"s3t-partition"
    ).digest()
    # Shard and slice come from disjoint halves of the digest, so they are independent; 64 bits make
    # the modulo bias negligible for any realistic count.
    shard = int.from_bytes(digest[:8], "big") % num_shards
    slice_ = int.from_bytes(digest[8:], "big") % num_slices
    return shard, slice_


def partition_key(record_id: str, subject: str | None) -> str:
    """Return the key a record is partitioned by: its subject when given (namespaced), else its id."""
    # Distinct prefixes keep a record id from landing in the cell of a subject with the same name.
    if subject is not None:
        return "s:" + subject
    return "r:" + record_id


def partition(
    records: Iterable[_Record], *, seed: int, num_shards: int, num_slices: int
) -> dict[str, tuple[int, int]]:
    """Map each record id to its (shard, slice); raises DataError on a repeated id."""
    _check_counts(num_shards, num_slices)
    cells: dict[str, tuple[int, int]] = {}
    by_key: dict[str, tuple[int, int]] = {}  # one subject, one hash
    for record in records:
        if record.id in cells:
            raise DataError(
                f"record id {record.id!r} appears more than once; ids must be unique. "
                "Remove or rename the duplicate record."
            )
        key = partition_key(record.id, record.subject)
        if key not in by_key:
            by_key[key] = assign(key, seed=seed, num_shards=num_shards, num_slices=num_slices)
        cells[record.id] = by_key[key]
    return cells


def slice_sizes(assignment: Mapping[str, tuple[int, int]], *, num_shards: int, num_slices: int) -> NDArray[np.int64]:
    """Return an int64 array of shape (num_shards, num_slices) counting the records in each cell."""
    import numpy as np

    _check_counts(num_shards, num_slices)
    sizes = np.zeros((num_shards, num_slices), dtype=np.int64)
    for record_id, (shard, slice_) in assignment.items():
        if not (0 <= shard < num_shards and 0 <= slice_ < num_slices):
            raise DataError(
                f"record {record_id!r} is assigned to (shard {shard}, slice {slice_}), outside "
                f"{num_shards} shards x {num_slices} slices. Recompute the partition with the plan's counts."
            )
        sizes[shard, slice_] += 1
    return sizes
