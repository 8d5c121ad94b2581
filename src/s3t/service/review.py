"""Flagged deletion requests: the capacity guard's alerts, and holds that wait for an admin.

A held request is stored with its content (ids, subjects, reference) until an admin applies or rejects
it; then the content is erased and only the decision remains. The content is sealed under a key of its
own (the registry seals and unseals it), and that key is destroyed once the decision has committed, so
copies of it left in the database's journal or in freed blocks are unreadable. Nothing is dropped: a held request stays
pending across restarts until someone decides. Applying runs the deletion under the idempotency key
`flag:<id>`, so an apply interrupted by a crash and retried deletes once.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from ..errors import ConflictError, NotFoundError
from ..unlearning import Receipt, request_fingerprint

if TYPE_CHECKING:
    from ..system import S3T

__all__ = ["Flag", "hold", "record_alert", "flags", "get_flag", "flag_for_key", "apply", "reject", "fingerprint"]


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


def fingerprint(system: "S3T", *, ids: Sequence[str], subjects: Sequence[str], reference: str | None) -> str:
    return request_fingerprint(system._ledger_key(), ids=ids, subjects=subjects, reference=reference)


def hold(system: "S3T", *, token_id: str | None, ids: Sequence[str], subjects: Sequence[str], reference: str | None,
         reason: str, idempotency_key: str | None = None) -> Flag:
    """Record a request for an admin's review instead of applying it."""
    flag_id = secrets.token_hex(8)
    with system.registry.transaction() as conn:
        system.registry.add_flagged(
            conn, id=flag_id, token_id=token_id, action="hold", status="pending", reason=reason,
            request=json.dumps({"ids": list(ids), "subjects": list(subjects), "reference": reference}),
            idempotency_key=idempotency_key,
            fingerprint=fingerprint(system, ids=ids, subjects=subjects, reference=reference))
    return get_flag(system, flag_id)


def record_alert(system: "S3T", *, token_id: str | None, receipt: Receipt, reason: str) -> Flag:
    """Record that an applied request was flagged (the `alert` policy)."""
    flag_id = secrets.token_hex(8)
    with system.registry.transaction() as conn:
        system.registry.add_flagged(conn, id=flag_id, token_id=token_id, action="alert", status="applied",
                                    reason=reason, request_id=receipt.request_id)
    return get_flag(system, flag_id)


def flags(system: "S3T", *, status: str | None = None) -> list[Flag]:
    """Flagged requests, oldest first; `status` = pending lists the holds waiting for a decision."""
    return [Flag.from_row(r) for r in system.registry.flagged(status=status)]


def get_flag(system: "S3T", flag_id: str) -> Flag:
    rows = system.registry.flagged(flag_id=flag_id)
    if not rows:
        raise NotFoundError(f"no flagged request {flag_id!r}; list them with GET /v1/review")
    return Flag.from_row(rows[0])


def flag_for_key(system: "S3T", idempotency_key: str) -> tuple[Flag, str] | None:
    """The hold made under an idempotency key and its request fingerprint, or None."""
    rows = system.registry.flagged(idempotency_key=idempotency_key)
    return (Flag.from_row(rows[0]), rows[0]["fingerprint"]) if rows else None


def apply(system: "S3T", flag_id: str, *, decided_by: str | None, note: str | None = None) -> Receipt:
    """Apply a pending hold: run its deletion and erase its stored content."""
    row = _pending(system, flag_id)
    content = json.loads(row["request"])
    receipt = system.delete(ids=content["ids"], subjects=content["subjects"], reference=content["reference"],
                            idempotency_key=f"flag:{flag_id}", requested_by=row["token_id"])
    with system.registry.transaction() as conn:
        system.registry.decide_flagged(conn, flag_id, status="applied", request=None, request_id=receipt.request_id,
                                       decided_by=decided_by, note=note)
    system.registry.keys.destroy([row["key_slot"]])   # after the commit (a crash before: `S3T.open` does it)
    return receipt


def reject(system: "S3T", flag_id: str, *, decided_by: str | None, note: str | None = None) -> Flag:
    """Reject a pending hold: nothing is deleted, its stored content is erased, the decision is kept."""
    row = _pending(system, flag_id)
    with system.registry.transaction() as conn:
        system.registry.decide_flagged(conn, flag_id, status="rejected", request=None, decided_by=decided_by,
                                       note=note)
    system.registry.keys.destroy([row["key_slot"]])   # after the commit (a crash before: `S3T.open` does it)
    return get_flag(system, flag_id)


def _pending(system: "S3T", flag_id: str) -> dict:
    rows = system.registry.flagged(flag_id=flag_id)
    if not rows:
        raise NotFoundError(f"no flagged request {flag_id!r}; list them with GET /v1/review")
    if rows[0]["status"] != "pending":
        raise ConflictError(f"flagged request {flag_id} is {rows[0]['status']}, not pending: it was decided "
                            f"at {rows[0]['decided_at']} by {rows[0]['decided_by']}")
    return rows[0]
