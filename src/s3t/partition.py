"""Partition records into (shard, slice) cells, deterministically and one record at a time.

Each record's cell is a pure function of (seed, partition key, its own risk): removing or adding records
never moves any other record, so "retrain without the deleted data" reproduces the same partition minus
the deleted records, which is what exact unlearning needs. Records of one data subject share a key, hence
one cell: forgetting a subject then touches one slice of one shard.

Prior-aware placement (our addition to S3T): a record whose `risk` exceeds the plan's `risk_threshold`
keeps its hashed shard but is hashed into one of the last `risky_slices` slices, which every order trains
last (`orders.prior_aware_orders`). Requests for risky data then truncate orders near their ends instead of
killing them, so shards survive more deletions. Every other record lands exactly where hash placement
puts it, so with no risky records the two placements are identical.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

from s3t.errors import DataError, PlanError
from s3t.plan import Placement

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

__all__ = ["assign", "partition_key", "partition", "slice_sizes"]


class _Record(Protocol):
    id: str
    subject: str | None  # records may also carry `risk: float | None` (read with getattr)


def _check_counts(num_shards: int, num_slices: int) -> None:
    """Raise PlanError unless both counts are integers >= 1."""
    for name, value in (("num_shards", num_shards), ("num_slices", num_slices)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise PlanError(f"`{name}` must be an integer >= 1; got {value!r}. Set `{name}` to a positive integer.")


def assign(key: str, *, seed: int, num_shards: int, num_slices: int, risky_slices: int = 0) -> tuple[int, int]:
    """Return the (shard, slice) of a partition key, a pure function of (seed, key).

    With `risky_slices` = r > 0 the slice is one of the last r (a risky record under prior-aware placement);
    the shard is the one hash placement gives.
    """
    _check_counts(num_shards, num_slices)
    if isinstance(risky_slices, bool) or not isinstance(risky_slices, int) or not 0 <= risky_slices < num_slices:
        raise PlanError(f"`risky_slices` must be an integer in [0, {num_slices - 1}] (below `num_slices` = "
                        f"{num_slices}); got {risky_slices!r}. Use 1.")
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
    if risky_slices:
        return shard, num_slices - risky_slices + int.from_bytes(digest[8:], "big") % risky_slices
    slice_ = int.from_bytes(digest[8:], "big") % num_slices
    return shard, slice_


def partition_key(record_id: str, subject: str | None) -> str:
    """Return the key a record is partitioned by: its subject when given (namespaced), else its id."""
    # Distinct prefixes keep a record id from landing in the cell of a subject with the same name.
    if subject is not None:
        return "s:" + subject
    return "r:" + record_id


def partition(
    records: Iterable[_Record],
    *,
    seed: int,
    num_shards: int,
    num_slices: int,
    placement: Placement = "hash",
    risky_slices: int = 1,
    risk_threshold: float = 0.5,
) -> dict[str, tuple[int, int]]:
    """Map each record id to its (shard, slice); raises DataError on a repeated id.

    `placement`, `risky_slices` and `risk_threshold` are the plan's fields of those names; with
    placement "prior_aware" a record with `risk` > `risk_threshold` goes to one of the last `risky_slices`.
    """
    _check_counts(num_shards, num_slices)
    prior_aware = _check_placement(placement, num_slices, risky_slices, risk_threshold)
    cells: dict[str, tuple[int, int]] = {}
    by_key: dict[str, tuple[tuple[int, int], float | None, str]] = {}  # one subject, one hash
    for record in records:
        if record.id in cells:
            raise DataError(
                f"record id {record.id!r} appears more than once; ids must be unique. "
                "Remove or rename the duplicate record."
            )
        key = partition_key(record.id, record.subject)
        risk = _risk(record) if prior_aware else None
        if key not in by_key:
            risky = risky_slices if risk is not None and risk > risk_threshold else 0
            cell = assign(key, seed=seed, num_shards=num_shards, num_slices=num_slices, risky_slices=risky)
            by_key[key] = (cell, risk, record.id)
        elif by_key[key][1] != risk:
            raise DataError(
                f"records {by_key[key][2]!r} and {record.id!r} of subject {record.subject!r} carry different "
                f"risks ({by_key[key][1]!r} and {risk!r}); a subject's records share one cell. Give them "
                "the same risk (for example the highest)."
            )
        cells[record.id] = by_key[key][0]
    return cells


def _check_placement(placement: str, num_slices: int, risky_slices: int, risk_threshold: float) -> bool:
    """Validate the placement settings; return whether placement is prior-aware."""
    if placement == "hash":
        return False
    if placement != "prior_aware":
        raise PlanError(f"`placement` must be 'hash' or 'prior_aware'; got {placement!r}. Pick one of those.")
    if isinstance(risky_slices, bool) or not isinstance(risky_slices, int) or not 1 <= risky_slices < num_slices:
        raise PlanError(f"`risky_slices` must be an integer in [1, {num_slices - 1}] with placement "
                        f"'prior_aware' and {num_slices} slices; got {risky_slices!r}. Use 1.")
    if isinstance(risk_threshold, bool) or not isinstance(risk_threshold, (int, float)) \
            or not 0.0 <= risk_threshold < 1.0:
        raise PlanError(f"`risk_threshold` must be a float in [0, 1); got {risk_threshold!r}. Use 0.5.")
    return True


def _risk(record: _Record) -> float | None:
    """The record's deletion risk (None when it has none), checked to be a number in [0, 1]."""
    risk = getattr(record, "risk", None)
    if risk is None:
        return None
    if isinstance(risk, bool) or not isinstance(risk, (int, float)) or not 0.0 <= risk <= 1.0:
        raise DataError(f"record {record.id!r} has risk {risk!r}; a risk must be a number in [0, 1] or None. "
                        "Fix the record's `risk`.")
    return float(risk)


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
