"""Adding records to a run: into their cells, sealed, and into the ledger; never trained on the request path.

New records go to the cells the partition gives them (a pure function of each record's id or subject,
its risk and the seed: nothing already in the run moves), through the same sealed insert as `S3T.create`.
The served model stays what it was: exact for the data it saw. Every order whose trained prefix holds a
cell that gained records is *stale* from that cell's position (`unlearning.current_depth`), and
`restore()` retrains it on the current data, switching it in when done.

Re-adding the id of a deleted record is refused unless the caller says it is a new record
(`replace_deleted=True`). The new record then gets the next *generation* of that id: its stages are
named apart from every stage that saw the deleted one (`lineage.slice_digest`), their lineage rows say
which generation they saw, and the ledger's addition entry says which generation came in, so an auditor
never mistakes the new record's stages for stages that saw the deleted one.

    addition = add(registry, ledger_key, plan, Dataset.from_jsonl("new.jsonl"), signing_key=key)
"""

from __future__ import annotations

import hashlib
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from . import ledger
from .errors import ConflictError, DataError
from .partition import partition
from .records import payload
from .registry import Registry, utcnow
from .unlearning import subject_digest

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from .plan import Plan
    from .records import Dataset

__all__ = ["Addition", "add", "assign_cells", "record_rows"]


@dataclass(frozen=True)
class Addition:
    """What an addition did, as its ledger entry records it (ids appear only as a count and a digest,
    except those of deleted records re-added as new ones)."""

    request_id: str
    created_at: str
    records: int                          # records added
    ids_sha256: str                       # SHA-256 of the sorted added ids, one per line
    replaced: tuple[tuple[str, int], ...]  # (id, generation) of the re-added ids of deleted records
    cells: tuple[dict, ...]               # {shard, slice, records}: where they went
    requested_by: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Addition":
        return cls(**{k: (tuple(tuple(p) for p in v) if k == "replaced" else tuple(v) if isinstance(v, list) else v)
                      for k, v in data.items()})


def assign_cells(plan: "Plan", data: "Dataset") -> dict[str, tuple[int, int]]:
    """{id: (shard, slice)} by the run's partition: the same function create used."""
    return partition(data, seed=plan.seed, num_shards=plan.num_shards, num_slices=plan.num_slices,
                     placement=plan.placement, risky_slices=plan.risky_slices, risk_threshold=plan.risk_threshold)


def record_rows(data: "Dataset", cells: Mapping[str, tuple[int, int]], ledger_key: bytes) -> list[dict]:
    """The registry rows of records of any kind, their content as (input, target) bytes (`records.payload`,
    sealed by `Registry.insert_records`); subjects only as keyed digests."""
    return [dict(zip(("input", "target"), payload(r)), id=r.id, shard=cells[r.id][0], slice=cells[r.id][1],
                 subject_digest=subject_digest(ledger_key, r.subject) if r.subject is not None else None)
            for r in data]


def add(registry: Registry, ledger_key: bytes, plan: "Plan", data: "Dataset", *, kind: str,
        replace_deleted: bool = False, signing_key: "Ed25519PrivateKey | None" = None,
        requested_by: str | None = None) -> Addition:
    """Add records to the run in one transaction, with their ledger entry; returns what it did.

    `kind` is the record kind the run's model trains on (`records.KINDS`: "text", "image", "prompt"). ConflictError
    if an id is already live in the run, or belongs to a deleted record and `replace_deleted` is False;
    DataError if the records are of another kind, a label is outside the plan's, or a subject's new records
    would land in another cell than its records already there (prior-aware placement with another risk).
    With `replace_deleted` the caller must hold the run's training lock (see the module docstring).
    """
    if data.kind != kind:
        wanted = {"text": "labelled texts {id, text, label}", "image": "labelled images {id, image, label}",
                  "prompt": "prompts and completions {id, prompt, completion}"}
        raise DataError(f"the run trains on {wanted.get(kind, kind)}, but the records to add are "
                        f"{wanted.get(data.kind, data.kind)}")
    if unknown := sorted(set(data.labels) - set(plan.labels or ())):
        raise DataError(f"record label(s) {', '.join(map(repr, unknown))} are not in the run's label space "
                        f"{list(plan.labels or ())!r}, which is fixed when the run is created; drop those records "
                        "or create a new run whose plan declares them")
    cells = assign_cells(plan, data)
    rows = record_rows(data, cells, ledger_key)
    request_id, created_at = uuid.uuid4().hex, utcnow()
    with registry.transaction() as conn:
        existing = {r["id"]: r for r in registry.find_records(conn, ids=list(data.ids))}
        live = sorted(i for i, r in existing.items() if r["deleted_in"] is None)
        if live:
            raise ConflictError(f"{len(live)} record id(s) are already in the run ({_some(live)}); ids are unique: "
                                "give new records new ids")
        if existing and not replace_deleted:
            raise ConflictError(f"{len(existing)} id(s) belong to deleted records ({_some(sorted(existing))}); "
                                "re-adding one stores a new record under the old id: pass replace_deleted=True "
                                "(`s3t add --replace-deleted`) if that is what you mean")
        _check_subject_cells(registry, conn, rows)
        replaced = {i: (r["generation"] or 0) + 1 for i, r in existing.items()}
        fresh = [r for r in rows if r["id"] not in replaced]
        revived = [dict(r, generation=replaced[r["id"]]) for r in rows if r["id"] in replaced]
        if fresh:
            registry.insert_records(conn, fresh)
        if revived:
            registry.revive_records(conn, revived)
        per_cell = Counter(cells.values())
        addition = Addition(
            request_id=request_id, created_at=created_at, records=len(rows),
            ids_sha256=hashlib.sha256("\n".join(sorted(data.ids)).encode()).hexdigest(),
            replaced=tuple(sorted(replaced.items())),
            cells=tuple({"shard": m, "slice": s, "records": n} for (m, s), n in sorted(per_cell.items())),
            requested_by=requested_by)
        ledger.append(registry, conn, addition.to_dict(), kind="addition", signing_key=signing_key)
    return addition


def _check_subject_cells(registry: Registry, conn, rows: list[dict]) -> None:
    """A subject's records share one cell, so that forgetting a person costs one slice: refuse new records
    of a subject that would land elsewhere than its live records (placement by risk, with another risk)."""
    new = {r["subject_digest"]: (r["shard"], r["slice"]) for r in rows if r["subject_digest"]}
    if not new:
        return
    for old in registry.find_records(conn, subject_digests=sorted(new)):
        if old["deleted_in"] is None and (old["shard"], old["slice"]) != new[old["subject_digest"]]:
            raise DataError(f"new records of a subject would land in shard {new[old['subject_digest']][0]} slice "
                            f"{new[old['subject_digest']][1]}, but its records in the run are in shard {old['shard']} "
                            f"slice {old['slice']} (record {old['id']!r}); a subject's records share one cell: give "
                            "them the risk its records were added with")


def _some(ids: list[str], shown: int = 5) -> str:
    return ", ".join(map(repr, ids[:shown])) + (f" and {len(ids) - shown} more" if len(ids) > shown else "")
