"""Deletion by deactivation, and restoration in the background.

`delete` never trains and never scans the data: it looks records up by key, erases their content,
truncates the orders of the shards they sat in, switches the served set, proves from the stored lineage
that no served artifact saw a deleted id, retires every stage that did see one (their files are
shredded once the deletion commits), appends the signed receipt to the ledger (`s3t.ledger`) and, once
committed, destroys the records' keys. `rebuild` brings truncated orders back to full depth and stale
orders (records added since they were trained) up to date on the current data (it is also how a run is
first trained), switching the served set order by order.
`preview` says what a deletion would do to each shard without doing it (the service's abuse guard).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from . import ledger
from .errors import ConflictError, IntegrityError
from .registry import Registry, utcnow
from .truncation import attainable_depth, choose_served, deletions_to_drop, truncate

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from .batch import Batch
    from .executors import Executor
    from .training import Trainer

__all__ = ["Applied", "Receipt", "apply", "delete", "preview", "rebuild", "restorable", "current_depth",
           "served_component", "subject_digest", "write_ledger_entry"]


@dataclass(frozen=True)
class Receipt:
    """Proof of one deletion request, as stored in the ledger.

    `subjects` holds keyed digests (HMAC-SHA256 with the run's ledger key), never the names sent.
    `lineage_check` states the result of querying the stored lineage of every served artifact for the
    deleted ids; a receipt is only issued when that check passed.
    """

    request_id: str
    created_at: str
    reference: str | None
    deleted: tuple[str, ...]
    already_deleted: tuple[str, ...]
    unknown: tuple[str, ...]
    subjects: tuple[str, ...]
    unknown_subjects: tuple[str, ...]
    shards: tuple[dict, ...]          # {shard, depth_before, depth_after} for every shard the request hit
    served_version: int
    served_artifacts: tuple[str, ...]
    lineage_check: str
    duration_ms: float
    requested_by: str | None = None   # who asked: e.g. the service token's id (never its secret)
    retired_artifacts: tuple[str, ...] = ()   # stages that saw the deleted records: unregistered, files shredded

    def to_dict(self) -> dict:
        """`dataclasses.asdict(self)`, without its generic deep copy (a deletion's hot path): the same dict."""
        out = {name: getattr(self, name) for name in RECEIPT_FIELDS}
        out["shards"] = tuple(dict(s) for s in self.shards)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Receipt":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


RECEIPT_FIELDS = tuple(f.name for f in fields(Receipt))


def subject_digest(key: bytes, subject: str) -> str:
    return hmac.new(key, subject.encode(), hashlib.sha256).hexdigest()


def served_component(shard_orders: Sequence[dict]) -> dict | None:
    """The served model of one shard: its deepest live order's first `depth` stages, or None if dead."""
    best = choose_served([o["depth"] for o in shard_orders])
    if best is None:
        return None
    o = shard_orders[best]
    return {"shard": o["shard"], "position": o["position"], "depth": o["depth"], "artifacts": o["artifacts"][:o["depth"]]}


def _serve(registry: Registry, conn, served: tuple[int, list[dict]], shard_orders: Sequence[dict],
           *, write: Callable | None = None) -> tuple[int, list[dict]]:
    """Re-choose the served model of the shards of `shard_orders` (their current state), keep the other
    shards' components from `served`, and write a new served-set version if anything changed (with
    `write(components, version=...)`, default `registry.add_served` in `conn`)."""
    version, components = served
    by_shard: dict[int, list[dict]] = defaultdict(list)
    for o in shard_orders:
        by_shard[o["shard"]].append(o)
    kept = [c for c in components if c["shard"] not in by_shard]
    fresh = [c for s in sorted(by_shard) if (c := served_component(by_shard[s])) is not None]
    new = sorted(kept + fresh, key=lambda c: c["shard"])
    if new == components:
        return version, components
    if write is None:
        registry.add_served(conn, new, version=version + 1)
    else:
        write(new, version=version + 1)
    return version + 1, new


def request_fingerprint(key: bytes, *, ids: Sequence[str], subjects: Sequence[str], reference: str | None) -> str:
    """A keyed hash of what a deletion request asks for (order and repeats do not matter)."""
    payload = {"ids": sorted(set(ids)), "subjects": sorted({subject_digest(key, s) for s in subjects}),
               "reference": reference}
    return hmac.new(key, json.dumps(payload, sort_keys=True).encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Applied:
    """What one deletion request did inside a transaction, and what must follow once it commits."""

    receipt: Receipt
    erased: tuple[str, ...] = ()      # records whose derived copies (cache) must be shredded before the commit
    key_slots: tuple[int, ...] = ()   # keys to destroy after the commit
    replayed: bool = False            # the idempotency key was seen before: the stored receipt, nothing applied


def delete(registry: Registry, key: bytes, *, ids: Sequence[str] = (), subjects: Sequence[str] = (),
           reference: str | None = None,
           erase_derived: Callable[[list[str]], AbstractContextManager] = lambda ids: nullcontext(),
           idempotency_key: str | None = None, requested_by: str | None = None,
           signing_key: "Ed25519PrivateKey | None" = None) -> Receipt:
    """Delete records and/or every record of data subjects, in a transaction of its own; effective when
    this returns. (`S3T.delete` goes through `batch.DeletionQueue`, which applies concurrent requests
    in one transaction, each with `apply`.)

    `erase_derived(ids)` is a context manager that removes what was computed from the records' content
    outside the database (the trunk cache) when entered, and keeps it from being recomputed until it
    exits, after the commit (`cache.erasing`): an acknowledged deletion has left no copy behind. The
    records' keys are destroyed after the commit (before it, a failed commit would lose live data); a
    crash in between is finished by the next `S3T.open`. The receipt is appended to the ledger's hash
    chain, signed with `signing_key` (`s3t.ledger`).
    """
    from .batch import Batch

    with ExitStack() as until_committed, registry.transaction() as conn:
        batch = Batch(registry, conn, key, signing_key=signing_key)
        receipt = batch.delete(ids=ids, subjects=subjects, reference=reference, idempotency_key=idempotency_key,
                               requested_by=requested_by)
        batch.flush()
        # Shred derived copies (cached hidden states) before committing, and keep them from being
        # rewritten until the commit is done (the stack exits after the transaction): a crash here leaves
        # the records live and the cache merely cold, never a deleted record's trace behind an ack.
        if batch.erased:
            until_committed.enter_context(erase_derived(list(batch.erased)))
    # Committed: destroy the records' keys, so every copy of their sealed content (a journal's, a freed
    # block's) is noise. Not before the commit: a rolled-back deletion must not lose live records.
    registry.keys.destroy(batch.key_slots)
    return receipt


def apply(batch: "Batch", *, ids: Sequence[str] = (), subjects: Sequence[str] = (), reference: str | None = None,
          idempotency_key: str | None = None, requested_by: str | None = None) -> Applied:
    """One deletion request in a write transaction (`batch`: the transaction, with the writes of the
    requests before this one in it): ledger entry, erasure, truncation, served set, lineage check,
    retirement. The caller shreds `erased` records' derived copies before committing and destroys
    `key_slots` after; the retired stages' files are shredded once it commits.

    A repeated `idempotency_key` returns the receipt stored under it and deletes nothing; the key is
    written in the deletion's own transaction, so a request is never applied twice. `requested_by` is
    stored in the receipt, and the request's ids + subjects count towards that requester's usage for the
    day (UTC), in the same transaction.
    """
    started = time.perf_counter()
    key = batch.key
    ids, subjects = list(dict.fromkeys(ids)), list(dict.fromkeys(subjects))
    digests = {s: subject_digest(key, s) for s in subjects}
    fingerprint = request_fingerprint(key, ids=ids, subjects=subjects, reference=reference)
    # 0. A key seen before answers with its stored receipt (checked under the write lock: no race).
    if idempotency_key is not None and (seen := batch.idempotent(idempotency_key)) is not None:
        if seen["fingerprint"] != fingerprint:
            raise ConflictError(f"idempotency key {idempotency_key!r} was used for a different request "
                                f"({seen['request_id']}); use a new key for a new request")
        stored = batch.receipt(seen["request_id"])
        # That deletion committed before; if its key destruction failed, destroying them again finishes it.
        slots = tuple(r["key_slot"] for r in batch.find_records(ids=stored["deleted"]))
        return Applied(Receipt.from_dict(stored), key_slots=slots, replayed=True)
    request_id, created_at = uuid.uuid4().hex, utcnow()   # in commit order: "already deleted" means by an earlier one
    # 1. Resolve the request by key (ids, subjects' keyed digests): no scan of the data.
    rows = batch.find_records(ids=ids, subject_digests=list(digests.values()))
    live = [dict(r) for r in rows if r["deleted_in"] is None]
    known = {r["id"] for r in rows}
    seen_digests = {r["subject_digest"] for r in rows if r["subject_digest"]}
    already = tuple(sorted(r["id"] for r in rows if r["deleted_in"] is not None and r["id"] in ids))
    # 2. Erase their content; the id stays as a tombstone so a repeat reports "already deleted".
    batch.erase(live, request_id)
    # 3. Truncate: in every order of a hit shard, drop the stages from the first hit slice on. A record
    #    added since training that no stage saw yet hits nothing: every stage is exact without it.
    hit: dict[int, set[int]] = defaultdict(set)
    seen = batch.seen([r["id"] for r in live])
    for r in live:
        if r["id"] in seen:
            hit[r["shard"]].add(r["slice"])
    served = batch.served()
    depth_before = {c["shard"]: c["depth"] for c in served[1]}
    shard_orders = batch.orders(hit)
    for o in shard_orders:
        depth = truncate(o["slices"], o["depth"], hit[o["shard"]])
        if depth != o["depth"]:
            batch.set_depth(o, depth)
    for shard, capacity in _capacities(shard_orders).items():
        batch.set_capacity(shard, capacity)
    # 4. Serve each hit shard's deepest surviving order (a shard with none drops out).
    version, components = _serve(batch.registry, batch.conn, served, shard_orders, write=batch.add_served)
    served_artifacts = sorted({a for c in components for a in c["artifacts"]})
    # 5. Check the claim against the stored lineage, not against the truncation logic above: which
    #    artifacts' recorded lineage holds a named id (one indexed read, also used by step 6).
    named = sorted(known)
    saw = batch.saw(named)
    if tainted := sorted(set(served_artifacts) & set(saw)):
        raise IntegrityError(f"served artifacts {tainted} saw deleted ids; deletion rolled back")
    depth_after = {c["shard"]: c["depth"] for c in components}
    # 6. Retire every registered stage that saw a record deleted now (none is served, as just checked):
    #    they can never be served again, so they go. Their files are shredded once this commits.
    live_saw = saw if len(live) == len(named) else batch.saw([r["id"] for r in live])
    retired = sorted(a for a, registered in live_saw.items() if registered)
    batch.retire(retired)
    receipt = Receipt(
        request_id=request_id, created_at=created_at, reference=reference,
        deleted=tuple(sorted(r["id"] for r in live)),
        already_deleted=already,
        unknown=tuple(i for i in ids if i not in known),
        subjects=tuple(digests[s] for s in subjects),
        unknown_subjects=tuple(digests[s] for s in subjects if digests[s] not in seen_digests),
        shards=tuple({"shard": s, "depth_before": depth_before.get(s, 0), "depth_after": depth_after.get(s, 0)}
                     for s in sorted(hit)),
        served_version=version, served_artifacts=tuple(served_artifacts),
        lineage_check=(f"passed: none of the {len(served_artifacts)} served artifacts has any of the "
                       f"{len(named)} named ids in its recorded lineage"),
        duration_ms=round((time.perf_counter() - started) * 1000, 3), requested_by=requested_by,
        retired_artifacts=tuple(retired),
    )
    # 7. The ledger entry commits with everything above: acknowledged means durable.
    write_ledger_entry(batch, receipt, idempotency_key=idempotency_key, fingerprint=fingerprint)
    if requested_by is not None:   # per-requester daily counts (the service's quotas), exact after a crash
        batch.add_usage(requested_by, created_at[:10], len(ids) + len(subjects))
    return Applied(receipt, erased=tuple(r["id"] for r in live), key_slots=tuple(r["key_slot"] for r in live))


def write_ledger_entry(batch: "Batch", receipt: Receipt, *, idempotency_key: str | None, fingerprint: str) -> None:
    """One request's ledger entry, and its idempotency key, in the deletion's transaction."""
    batch.add_ledger_entry(receipt.to_dict())
    if idempotency_key is not None:
        batch.add_idempotent(idempotency_key, fingerprint, receipt.request_id, receipt.created_at)


def _capacities(shard_orders: Sequence[dict]) -> dict[int, int]:
    """The deletion capacity of each shard in `shard_orders` (at their current depths)."""
    by_shard: dict[int, list[dict]] = defaultdict(list)
    for o in shard_orders:
        by_shard[o["shard"]].append(o)
    return {shard: deletions_to_drop([o["slices"] for o in mine], [o["depth"] for o in mine])
            for shard, mine in by_shard.items()}


def preview(registry: Registry, key: bytes, *, ids: Sequence[str] = (), subjects: Sequence[str] = (),
            batch: "Batch | None" = None) -> dict:
    """What `delete` would do, without doing it: {records, shards: [{shard, depth_before, depth_after,
    capacity_before, capacity_after}]} for every shard holding a live record of the request.

    Capacity is `deletions_to_drop`: the fewest further deletions that take the shard out of the ensemble.
    With `batch`, it reads inside that transaction (what the requests before it in the batch did included).
    """
    digests = [subject_digest(key, s) for s in subjects]
    with registry.engine.connect() if batch is None else nullcontext(batch.conn) as conn:
        rows = (registry.find_records(conn, ids=list(ids), subject_digests=digests) if batch is None
                else batch.find_records(ids=list(ids), subject_digests=digests))
        live = [r for r in rows if r["deleted_in"] is None]
        hit: dict[int, set[int]] = defaultdict(set)
        seen = (registry.seen(conn, [r["id"] for r in live]) if batch is None
                else batch.seen([r["id"] for r in live]))
        for r in live:
            if r["id"] in seen:
                hit[r["shard"]].add(r["slice"])
        by_shard: dict[int, list[dict]] = defaultdict(list)
        for o in (registry.orders(conn, shards=hit) if batch is None else batch.orders(hit)):
            by_shard[o["shard"]].append(o)
    shards = []
    for shard, shard_orders in sorted(by_shard.items()):
        after = [dict(o, depth=truncate(o["slices"], o["depth"], hit[shard])) for o in shard_orders]
        before_c, after_c = served_component(shard_orders), served_component(after)
        shards.append({"shard": shard,
                       "depth_before": before_c["depth"] if before_c else 0,
                       "depth_after": after_c["depth"] if after_c else 0,
                       "capacity_before": deletions_to_drop([o["slices"] for o in shard_orders],
                                                            [o["depth"] for o in shard_orders]),
                       "capacity_after": deletions_to_drop([o["slices"] for o in after], [o["depth"] for o in after])})
    return {"records": len(live), "shards": shards}


def restorable(registry: Registry, *, orders: Sequence[dict] | None = None,
               counts: dict[tuple[int, int], int] | None = None,
               examples: dict[str, int] | None = None) -> list[dict]:
    """The orders a training on the current data would change: those below the depth it gives them
    (`attainable_depth`: deletions truncated them) and those with a trained stage whose lineage no longer
    matches the current data (`current_depth`: records were added to its prefix)."""
    orders = registry.orders() if orders is None else orders
    counts = registry.live_counts() if counts is None else counts
    if examples is None:
        examples = registry.artifact_examples(a for o in orders for a in o["artifacts"][:o["depth"]])
    return [o for o in orders if truncated(o, counts) or current_depth(o, counts, examples) < o["depth"]]


def truncated(order: dict, counts: dict[tuple[int, int], int]) -> bool:
    """Whether the order is below the depth a training on the current data gives it."""
    live = {sl for (m, sl), n in counts.items() if m == order["shard"] and n > 0}
    return order["depth"] < attainable_depth(order["slices"], live)


def current_depth(order: dict, counts: dict[tuple[int, int], int], examples: dict[str, int]) -> int:
    """How many of the order's served stages saw exactly the current live records of their prefix slices.

    Within an order's depth a stage never lost a record it saw (deleting one truncates the order below
    it), so the live records of its prefix are those it saw plus, possibly, records added since. Its
    example count against the live counts of its prefix cells says which, without reading a record.
    """
    total = 0
    for i, slice_ in enumerate(order["slices"][:order["depth"]]):
        total += counts.get((order["shard"], slice_), 0)
        if examples.get(order["artifacts"][i]) != total:
            return i
    return order["depth"]


def rebuild(registry: Registry, trainer: "Trainer", *, on_stage: Callable[[str], None] = lambda done: None,
            executor: "Executor | None" = None) -> int:
    """Train every `restorable` order on the current data (in this process, or on `executor`: see
    `s3t.executors`); return how many were completed.

    After each order, one transaction re-checks that none of its artifacts saw a record deleted while it
    trained (such a result is discarded and left for the next rebuild) and switches the served set. Stages
    the order no longer uses and no other order uses either (superseded by a retraining on added data) are
    unregistered with it, then shredded (the caller holds the training lock; after a crash in between,
    its sweep shreds them).
    """
    completed = 0
    by_shard: dict[int, list[dict]] = defaultdict(list)
    for o in restorable(registry):
        by_shard[o["shard"]].append(o)

    def commit(order: dict, lineages: list[str]) -> None:
        nonlocal completed
        with registry.transaction() as conn:
            if stale := registry.saw_deleted(conn, lineages):
                registry.retire(conn, stale)   # a deletion raced this training: never serve it
                return
            before = next(o["artifacts"] for o in registry.orders(conn, shards=[order["shard"]])
                          if o["position"] == order["position"])
            registry.set_stages(conn, order["shard"], order["position"], lineages)
            registry.set_depth(conn, order["shard"], order["position"], len(lineages))
            superseded = registry.unreferenced(conn, set(before) - set(lineages))
            registry.unregister(conn, superseded)
            shard_orders = registry.orders(conn, shards=[order["shard"]])
            for shard, capacity in _capacities(shard_orders).items():
                registry.set_capacity(conn, shard, capacity)
            _serve(registry, conn, registry.served(conn), shard_orders)
        for lineage_hash in sorted(superseded):   # the caller holds the training lock: nobody saves one meanwhile
            trainer.store.shred(lineage_hash)
        trainer.forget(superseded)
        completed += 1

    if executor is None:
        from .executors import LocalExecutor

        executor = LocalExecutor()
    executor.complete(trainer, dict(by_shard), on_stage=on_stage, on_order=commit)
    return completed
