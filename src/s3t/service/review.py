"""Flagged deletion requests: the capacity guard's alerts, and holds that wait for an admin.

A held request is stored with its content (ids, subjects, reference) until an admin applies or rejects
it; then the content is erased and only the decision remains. The content is sealed under a key of its
own (the registry seals and unseals it), and that key is destroyed once the decision has committed, so
copies of it left in the database's journal or in freed blocks are unreadable. Nothing is dropped: a
held request stays pending across restarts until someone decides. Applying runs the deletion under the idempotency key
`flag:<id>`, in the same transaction as the decision (a group commit: `s3t.batch`), so an apply
interrupted by a crash and retried deletes once. Holds and alerts are written in the transaction of
the request they flag (`conn`).

A held request's items (ids + subjects) count towards its token's daily quota when it is held, in the
same transaction, and keep counting if it is rejected; applying it does not count them again (the
decision's transaction takes back what the deletion added). Listings (`flags`) read no content: they
show how many ids and subjects each request named, a page at a time.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from ..errors import ConflictError, NotFoundError
from ..registry import utcnow
from ..unlearning import Receipt, request_fingerprint

if TYPE_CHECKING:
    from ..batch import Batch
    from ..system import S3T

__all__ = ["Flag", "FlagSummary", "hold", "record_alert", "flags", "pending", "get_flag", "flag_for_key", "preview",
           "apply", "apply_in", "reject", "reject_in", "fingerprint"]


@dataclass(frozen=True)
class Flag:
    """One flagged request. `ids` is shown only while a hold is pending; subjects only as a count."""

    id: str
    created_at: str
    token_id: str | None
    action: str                 # alert | hold
    status: str                 # pending | applied | rejected
    reason: str
    ids: tuple[str, ...]
    subjects: int
    request_id: str | None      # the ledger entry, once applied
    decided_at: str | None
    decided_by: str | None
    note: str | None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict) -> "Flag":
        content = json.loads(row["request"]) if row["request"] else {"ids": [], "subjects": []}
        return cls(id=row["id"], created_at=row["created_at"], token_id=row["token_id"], action=row["action"],
                   status=row["status"], reason=row["reason"], ids=tuple(content["ids"]),
                   subjects=len(content["subjects"]), request_id=row["request_id"], decided_at=row["decided_at"],
                   decided_by=row["decided_by"], note=row["note"])


@dataclass(frozen=True)
class FlagSummary:
    """One flagged request in a listing: counts, never the ids."""

    id: str
    created_at: str
    token_id: str | None
    action: str
    status: str
    reason: str
    id_count: int | None         # ids and subjects the request named (None: flagged before counts were kept)
    subject_count: int | None
    request_id: str | None
    decided_at: str | None
    decided_by: str | None
    note: str | None

    def to_dict(self) -> dict:
        return asdict(self)


def fingerprint(system: "S3T", *, ids: Sequence[str], subjects: Sequence[str], reference: str | None) -> str:
    return request_fingerprint(system._ledger_key(), ids=ids, subjects=subjects, reference=reference)


def hold(system: "S3T", batch: "Batch", *, token_id: str | None, ids: Sequence[str], subjects: Sequence[str],
         reference: str | None, reason: str, idempotency_key: str | None = None) -> Flag:
    """Record a request for an admin's review instead of applying it (in a group commit's transaction)."""
    flag_id = secrets.token_hex(8)
    id_count, subject_count = len(set(ids)), len(set(subjects))   # as the deletion will count them
    conn = batch.conn
    system.registry.add_flagged(
        conn, id=flag_id, token_id=token_id, action="hold", status="pending", reason=reason,
        request=json.dumps({"ids": list(ids), "subjects": list(subjects), "reference": reference}),
        idempotency_key=idempotency_key,
        fingerprint=fingerprint(system, ids=ids, subjects=subjects, reference=reference),
        id_count=id_count, subject_count=subject_count)
    if idempotency_key is not None:   # a later request of the batch under this key replays the hold
        batch.note_flag(idempotency_key)
    if token_id is not None:   # a held request counts towards the quota now, like an applied one
        batch.add_usage(token_id, utcnow()[:10], id_count + subject_count)
    return get_flag(system, flag_id, conn)


def record_alert(system: "S3T", conn, *, token_id: str | None, receipt: Receipt, reason: str) -> Flag:
    """Record that an applied request was flagged (the `alert` policy), in the transaction that applies it."""
    flag_id = secrets.token_hex(8)
    system.registry.add_flagged(conn, id=flag_id, token_id=token_id, action="alert", status="applied",
                                reason=reason, request_id=receipt.request_id)
    return get_flag(system, flag_id, conn)


def flags(system: "S3T", *, status: str | None = None, limit: int = 100,
          after: str | None = None) -> tuple[list[FlagSummary], str | None]:
    """One page of flagged requests, oldest first, and the id to pass as `after` for the next page (None
    on the last); `status` = pending lists the holds waiting for a decision."""
    cursor = None
    if after is not None:
        cursor = system.registry.flag_position(after)
        if cursor is None:
            raise NotFoundError(f"no flagged request {after!r} to list after; start from the first page")
    rows = system.registry.flagged_page(status=status, after=cursor, limit=limit + 1)
    page = [FlagSummary(**{f: r[f] for f in FlagSummary.__dataclass_fields__}) for r in rows[:limit]]
    return page, (page[-1].id if len(rows) > limit else None)


def pending(system: "S3T", *, token_id: str | None = None) -> int:
    """How many held requests wait for a decision (of one token, if given)."""
    return system.registry.count_flagged(status="pending", token_id=token_id)


def get_flag(system: "S3T", flag_id: str, conn=None) -> Flag:
    rows = system.registry.flagged(conn, flag_id=flag_id)
    if not rows:
        raise NotFoundError(f"no flagged request {flag_id!r}; list them with GET /v1/review")
    return Flag.from_row(rows[0])


def flag_for_key(system: "S3T", idempotency_key: str, conn=None) -> tuple[Flag, str] | None:
    """The hold made under an idempotency key and its request fingerprint, or None."""
    rows = system.registry.flagged(conn, idempotency_key=idempotency_key)
    return (Flag.from_row(rows[0]), rows[0]["fingerprint"]) if rows else None


def preview(system: "S3T", flag_id: str) -> dict:
    """What applying a pending hold would do now (`S3T.preview_delete`): {records, shards: [{shard,
    depth_before, depth_after, capacity_before, capacity_after}]}. A decided request has no content left
    to preview (its receipt says what applying did)."""
    content = json.loads(_pending(system, flag_id)["request"])
    return system.preview_delete(ids=content["ids"], subjects=content["subjects"])


def apply(system: "S3T", flag_id: str, *, decided_by: str | None, note: str | None = None) -> Receipt:
    """Apply a pending hold: run its deletion and erase its stored content, in one group commit."""
    return system.deletions.submit(lambda batch: apply_in(batch, system, flag_id, decided_by=decided_by,
                                                          note=note)).result()


def apply_in(batch: "Batch", system: "S3T", flag_id: str, *, decided_by: str | None, note: str | None = None) -> Receipt:
    """`apply` inside a group commit's transaction: the deletion, the decision and the quota refund commit
    together; the hold's content key is destroyed after the commit (a crash before: `S3T.open` does it)."""
    conn = batch.conn
    row = _pending(system, flag_id, conn)
    content = json.loads(row["request"])
    receipt = batch.delete(ids=content["ids"], subjects=content["subjects"], reference=content["reference"],
                           idempotency_key=f"flag:{flag_id}", requested_by=row["token_id"])
    system.registry.decide_flagged(conn, flag_id, status="applied", request=None, request_id=receipt.request_id,
                                   decided_by=decided_by, note=note)
    if row["token_id"] is not None:   # counted when held: take back what the deletion added
        items = (row["id_count"] + row["subject_count"] if row["id_count"] is not None
                 else len(set(content["ids"])) + len(set(content["subjects"])))
        batch.add_usage(row["token_id"], receipt.created_at[:10], -items)
    batch.destroy_after_commit([row["key_slot"]])
    return receipt


def reject(system: "S3T", flag_id: str, *, decided_by: str | None, note: str | None = None) -> Flag:
    """Reject a pending hold: nothing is deleted, its stored content is erased, the decision is kept."""
    return system.deletions.submit(lambda batch: reject_in(batch, system, flag_id, decided_by=decided_by,
                                                           note=note)).result()


def reject_in(batch: "Batch", system: "S3T", flag_id: str, *, decided_by: str | None, note: str | None = None) -> Flag:
    """`reject` inside a group commit's transaction; the content key is destroyed after the commit."""
    row = _pending(system, flag_id, batch.conn)
    system.registry.decide_flagged(batch.conn, flag_id, status="rejected", request=None, decided_by=decided_by,
                                   note=note)
    batch.destroy_after_commit([row["key_slot"]])
    return get_flag(system, flag_id, batch.conn)


def _pending(system: "S3T", flag_id: str, conn=None) -> dict:
    rows = system.registry.flagged(conn, flag_id=flag_id)
    if not rows:
        raise NotFoundError(f"no flagged request {flag_id!r}; list them with GET /v1/review")
    if rows[0]["status"] != "pending":
        raise ConflictError(f"flagged request {flag_id} is {rows[0]['status']}, not pending: it was decided "
                            f"at {rows[0]['decided_at']} by {rows[0]['decided_by']}")
    return rows[0]
