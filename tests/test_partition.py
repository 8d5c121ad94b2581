"""Tests for s3t.partition: deterministic, record-independent, subject-aware (shard, slice) assignment."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import s3t
from s3t.errors import DataError, PlanError
from s3t.partition import assign, partition, partition_key, slice_sizes


@dataclass(frozen=True)
class Rec:
    id: str
    subject: str | None = None


records_strategy = st.lists(
    st.builds(Rec, st.text(min_size=1, max_size=12), st.one_of(st.none(), st.sampled_from(["ann", "bob", "cy"]))),
    max_size=40,
    unique_by=lambda r: r.id,
)


@given(st.text(), st.integers(-(2**70), 2**70), st.integers(1, 64), st.integers(1, 64))
def test_assign_is_in_range_and_repeatable(key: str, seed: int, m: int, slices: int) -> None:
    cell = assign(key, seed=seed, num_shards=m, num_slices=slices)
    assert 0 <= cell[0] < m and 0 <= cell[1] < slices
    assert assign(key, seed=seed, num_shards=m, num_slices=slices) == cell


def test_assign_is_stable_across_processes() -> None:
    # Python's hash() is salted per process; the partition must not be.
    code = "from s3t.partition import assign; print(assign('r:alice-42', seed=3, num_shards=7, num_slices=11))"
    src = str(Path(s3t.__file__).resolve().parents[1])
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONPATH": src, "PYTHONHASHSEED": salt},
        ).stdout
        for salt in ("1", "2")
    }
    assert outputs == {f"{assign('r:alice-42', seed=3, num_shards=7, num_slices=11)}\n"}


def test_assign_depends_on_seed() -> None:
    keys = [f"r:{i}" for i in range(200)]
    a = [assign(k, seed=0, num_shards=4, num_slices=5) for k in keys]
    b = [assign(k, seed=1, num_shards=4, num_slices=5) for k in keys]
    assert a != b


@given(records_strategy, st.data())
def test_removing_or_adding_records_never_moves_the_others(records: list[Rec], data: st.DataObject) -> None:
    full = partition(records, seed=5, num_shards=3, num_slices=4)
    kept = data.draw(st.lists(st.sampled_from(records), unique=True)) if records else []
    subset = partition(kept, seed=5, num_shards=3, num_slices=4)
    assert subset == {r.id: full[r.id] for r in kept}
    # Order of the input does not matter either.
    assert partition(list(reversed(records)), seed=5, num_shards=3, num_slices=4) == full


def test_subject_records_share_one_cell() -> None:
    records = [Rec(f"doc-{i}", subject="user-7") for i in range(50)] + [Rec(f"x-{i}") for i in range(50)]
    cells = partition(records, seed=0, num_shards=4, num_slices=5)
    assert len({cells[f"doc-{i}"] for i in range(50)}) == 1
    assert cells["doc-0"] == assign(partition_key("anything", "user-7"), seed=0, num_shards=4, num_slices=5)
    # Records without a subject spread out.
    assert len({cells[f"x-{i}"] for i in range(50)}) > 10


def test_partition_key_namespaces_ids_and_subjects() -> None:
    assert partition_key("bob", None) != partition_key("other", "bob")
    assert partition_key("bob", None) == "r:bob"
    assert partition_key("r1", "bob") == "s:bob"
    # An id that spells another key's namespaced form still gets its own namespace.
    assert partition_key("s:bob", None) != partition_key("x", "bob")


def test_balance_over_10000_ids() -> None:
    m, slices, n = 4, 5, 10_000
    cells = partition([Rec(f"id-{i}") for i in range(n)], seed=2024, num_shards=m, num_slices=slices)
    sizes = slice_sizes(cells, num_shards=m, num_slices=slices)
    assert sizes.shape == (m, slices) and sizes.dtype == np.int64 and sizes.sum() == n
    mean = n / (m * slices)
    assert np.all(np.abs(sizes - mean) <= 0.25 * mean)
    # Pearson chi-square with 19 degrees of freedom; 43.8 is its 0.999 quantile.
    assert float(((sizes - mean) ** 2 / mean).sum()) < 43.8


def test_shard_and_slice_are_independent() -> None:
    # If shard and slice reused the same hash bits, (shard, slice) pairs would be confined to a few cells.
    cells = partition([Rec(f"id-{i}") for i in range(2_000)], seed=0, num_shards=2, num_slices=2)
    assert np.all(slice_sizes(cells, num_shards=2, num_slices=2) > 400)


def test_duplicate_ids_are_rejected_by_name() -> None:
    with pytest.raises(DataError, match="'a'"):
        partition([Rec("a"), Rec("b"), Rec("a")], seed=0, num_shards=2, num_slices=2)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(seed=0, num_shards=0, num_slices=2), "`num_shards`"),
        (dict(seed=0, num_shards=2, num_slices=-1), "`num_slices`"),
        (dict(seed="0", num_shards=2, num_slices=2), "`seed`"),
    ],
)
def test_bad_counts_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(PlanError, match=field):
        assign("r:a", **kwargs)


def test_slice_sizes_rejects_out_of_range_cells() -> None:
    with pytest.raises(DataError, match="'z'"):
        slice_sizes({"z": (3, 0)}, num_shards=2, num_slices=2)


# -- prior-aware placement -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Risky:
    id: str
    subject: str | None = None
    risk: float | None = None


def aware(records, **kwargs) -> dict[str, tuple[int, int]]:
    return partition(records, seed=3, num_shards=4, num_slices=5, placement="prior_aware", **kwargs)


def test_prior_aware_moves_only_risky_records_and_keeps_their_shard() -> None:
    records = [Risky(f"r{i}", risk=[None, 0.1, 0.5, 0.9][i % 4]) for i in range(400)]
    hashed = partition(records, seed=3, num_shards=4, num_slices=5)
    placed = aware(records)
    for r in records:
        if r.risk is not None and r.risk > 0.5:
            assert placed[r.id][0] == hashed[r.id][0] and placed[r.id][1] == 4  # the last slice
        else:
            assert placed[r.id] == hashed[r.id]  # exactly where hash placement puts it
    # Two risky slices: risky records spread over slices 3 and 4 only.
    two = aware(records, risky_slices=2, risk_threshold=0.0)
    risky_cells = {two[r.id][1] for r in records if r.risk}
    assert risky_cells == {3, 4}


def test_prior_aware_with_no_risky_record_equals_hash_placement() -> None:
    records = [Risky(f"r{i}", subject=f"u{i % 7}" if i % 3 else None, risk=0.5) for i in range(200)]
    assert aware(records) == partition(records, seed=3, num_shards=4, num_slices=5)
    assert aware([Rec(f"x{i}") for i in range(50)]) == partition([Rec(f"x{i}") for i in range(50)], seed=3,
                                                                  num_shards=4, num_slices=5)


@given(st.lists(st.builds(Risky, st.text(min_size=1, max_size=8), st.none(),
                          st.one_of(st.none(), st.floats(0, 1))), max_size=30, unique_by=lambda r: r.id),
       st.data())
def test_prior_aware_removing_records_never_moves_the_others(records: list[Risky], data: st.DataObject) -> None:
    full = aware(records)
    kept = data.draw(st.lists(st.sampled_from(records), unique=True)) if records else []
    assert aware(kept) == {r.id: full[r.id] for r in kept}


def test_prior_aware_subject_needs_one_risk_and_bad_settings_are_named() -> None:
    with pytest.raises(DataError, match="'a' and 'b' of subject 'u' carry different risks"):
        aware([Risky("a", "u", 0.9), Risky("b", "u", 0.1)])
    with pytest.raises(DataError, match="risk 2"):
        aware([Risky("a", None, 2)])
    for kwargs, field in ((dict(placement="smart"), "`placement`"), (dict(risky_slices=5), "`risky_slices`"),
                          (dict(risk_threshold=1.0), "`risk_threshold`")):
        with pytest.raises(PlanError, match=field):
            partition([Rec("a")], seed=0, num_shards=2, num_slices=5, **({"placement": "prior_aware"} | kwargs))
    # Hash placement ignores risk entirely, even inconsistent risks within a subject.
    assert partition([Risky("a", "u", 0.9), Risky("b", "u", 0.1)], seed=0, num_shards=2, num_slices=5)
