"""The run's registry: records, orders, artifacts, lineage, served sets and the deletion ledger.

SQLite in the run folder by default (PostgreSQL by URL), through SQLAlchemy Core. Every state change
happens inside `transaction()`.

Record content (a model input and its target: a text and its label, or a prompt and its completion) and
the content of held deletion requests is stored sealed (AES-GCM) under
a key of its own from the run's `KeyStore`: the registry seals on insert and unseals on read, so callers
see the content, and the database files never hold it in clear. A data subject is stored only as a keyed digest
(HMAC-SHA256 with the run's ledger key, which is kept outside the database). Erasing NULLs the sealed
columns, and on SQLite `secure_delete` overwrites them in the database file; the rollback journal's
copies of those pages stay sealed under a key that the deletion destroys right after its commit.

Concurrency on SQLite: `transaction()` starts with BEGIN IMMEDIATE, taking the write lock before its
first read, so a read-check-write sequence (the deletion path, a restoration's commit) cannot interleave
with another process's; reads run in deferred transactions (one consistent snapshot each). A connection
that finds the database locked waits up to `BUSY_TIMEOUT_S` instead of failing.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone

from sqlalchemy import (Column, Float, Index, Integer, LargeBinary, MetaData, String, Table, Text, create_engine,
                        event, func, inspect, select, tuple_, union_all, update)
from sqlalchemy.engine import Connection, Engine, make_url

from .keystore import KeyStore, aad, seal, unseal

__all__ = ["Registry", "utcnow"]

BUSY_TIMEOUT_S = 60.0   # how long a connection waits for SQLite's lock before "database is locked"

metadata = MetaData()

meta = Table("meta", metadata, Column("key", String(64), primary_key=True), Column("value", Text, nullable=False))
records = Table(
    "records", metadata,
    Column("id", String(512), primary_key=True),
    Column("subject_digest", String(64), index=True),  # keyed hash of the subject (never stored in clear); kept
    Column("input", LargeBinary),                    # the model input (text, prompt), sealed; NULL once erased
    Column("target", LargeBinary),                   # its target (label, completion), sealed; NULL once erased
    Column("key_slot", Integer, nullable=False),     # the record's key in the KeyStore, destroyed on deletion
    Column("shard", Integer, nullable=False),
    Column("slice", Integer, nullable=False),
    Column("deleted_in", String(64)),                # request id of the deletion; NULL while live
    Column("generation", Integer),                   # re-added after a deletion this many times; NULL = 0
)
cells = Table(  # live records per (shard, slice), kept by create and every deletion: no scan to read them
    "cells", metadata,
    Column("shard", Integer, primary_key=True),
    Column("slice", Integer, primary_key=True),
    Column("live", Integer, nullable=False),
)
orders = Table(
    "orders", metadata,
    Column("shard", Integer, primary_key=True),
    Column("position", Integer, primary_key=True),   # the order's index within its shard
    Column("slices", Text, nullable=False),          # JSON list: the slice order π
    Column("depth", Integer, nullable=False),        # leading stages that are trained on current data
)
stages = Table(
    "stages", metadata,
    Column("shard", Integer, primary_key=True),
    Column("position", Integer, primary_key=True),
    Column("stage", Integer, primary_key=True),      # 1-based: stage i trains layer group i
    Column("artifact", String(64), nullable=False),
)
artifacts = Table(
    "artifacts", metadata,
    Column("lineage", String(64), primary_key=True),
    Column("sha256", String(64), nullable=False),
    Column("stage", Integer, nullable=False),
    Column("examples", Integer, nullable=False),
    Column("loss", Float),
    Column("created_at", String(40), nullable=False),
    Column("environment", String(16)),               # fingerprint of the numeric environment it was trained in
)
environments = Table(  # the numeric environments stages were trained in (s3t.environment), by fingerprint
    "environments", metadata,
    Column("fingerprint", String(16), primary_key=True),
    Column("description", Text, nullable=False),     # JSON: versions, device, CPU capability, dtype, threads
)
lineage = Table(  # which record ids each artifact saw: the evidence behind every receipt
    "lineage", metadata,
    Column("artifact", String(64), primary_key=True),
    Column("record_id", String(512), primary_key=True, index=True),
    Column("generation", Integer),                   # which incarnation of a re-added id it saw; NULL = 0
)
retired_artifacts = Table(  # unregistered because they saw a deleted record; the row goes once the file is shredded
    "retired_artifacts", metadata,
    Column("lineage", String(64), primary_key=True),
    Column("retired_at", String(40), nullable=False),
)
served_sets = Table(
    "served_sets", metadata,
    Column("version", Integer, primary_key=True),
    Column("created_at", String(40), nullable=False),
    Column("components", Text, nullable=False),      # JSON list of {shard, position, depth, artifacts}
)
ledger = Table(  # a signed hash chain of deletions and additions (see s3t.ledger)
    "ledger", metadata,
    Column("request_id", String(64), primary_key=True),
    Column("created_at", String(40), nullable=False),
    Column("receipt", Text, nullable=False),         # JSON receipt: ids, keyed subject hashes, depths
    Column("seq", Integer),                          # position in the chain, from 1
    Column("kind", String(16)),                      # deletion | addition
    Column("prev_hash", String(64)),                 # entry_hash of entry seq - 1 (ledger.GENESIS for the first)
    Column("entry_hash", String(64)),                # SHA-256 of the canonical entry
    Column("signature", String(128)),                # Ed25519 over the canonical entry, hex
    Index("ix_ledger_seq", "seq", unique=True),
)
idempotency = Table(  # a client's idempotency key -> the deletion it made; written in that deletion's transaction
    "idempotency", metadata,
    Column("key", String(400), primary_key=True),
    Column("fingerprint", String(64), nullable=False),  # hash of the request, to refuse a key reused for another
    Column("request_id", String(64), nullable=False),
    Column("created_at", String(40), nullable=False),
    Index("ix_idempotency_created_at", "created_at"),   # expired keys are purged by range, not by scan
)
tokens = Table(  # HTTP service tokens; only a SHA-256 of each secret is stored
    "tokens", metadata,
    Column("id", String(32), primary_key=True),     # public id, shown in listings and logs
    Column("name", String(200), nullable=False),
    Column("roles", String(100), nullable=False),   # comma-separated: predict, delete, admin
    Column("secret_sha256", String(64), nullable=False, unique=True),
    Column("rate", Float),                          # requests per second; NULL = the server's default
    Column("daily_quota", Integer),                 # ids + subjects per UTC day; NULL = the server's default
    Column("created_at", String(40), nullable=False),
    Column("revoked_at", String(40)),
)
token_usage = Table(  # deletion items (ids + subjects) each requester had applied per UTC day, for quotas
    "token_usage", metadata,
    Column("token_id", String(32), primary_key=True),   # a deletion's `requested_by`
    Column("day", String(10), primary_key=True),
    Column("used", Integer, nullable=False),
)
flagged = Table(  # deletion requests the abuse guard flagged: applied with an alert, or held for review
    "flagged_requests", metadata,
    Column("id", String(32), primary_key=True),
    Column("created_at", String(40), nullable=False),
    Column("token_id", String(32)),
    Column("action", String(8), nullable=False),    # alert (applied at once) or hold (waits for an admin)
    Column("status", String(8), nullable=False),    # pending, applied or rejected
    Column("reason", Text, nullable=False),
    Column("request", LargeBinary),                 # sealed JSON {ids, subjects, reference} while pending; NULL after
    Column("key_slot", Integer),                    # the key sealing `request`, destroyed once decided
    Column("idempotency_key", String(400), unique=True),
    Column("fingerprint", String(64)),
    Column("request_id", String(64)),               # the ledger entry once applied
    Column("decided_at", String(40)),
    Column("decided_by", String(32)),
    Column("note", Text),
    Column("id_count", Integer),                    # how many ids and subjects the request named (kept after
    Column("subject_count", Integer),               # the decision; NULL for requests flagged before v0.1 kept them)
    Index("ix_flagged_created", "created_at", "id"),             # the review listing, page by page
    Index("ix_flagged_status_created", "status", "created_at", "id"),
    Index("ix_flagged_token_status", "token_id", "status"),      # a token's pending holds (the cap)
    Index("ix_flagged_decided", "decided_at"),                   # expiring decided requests' idempotency keys
)
FLAG_SUMMARY = [c for c in flagged.c if c.name not in ("request", "key_slot", "fingerprint", "idempotency_key")]
DELETIONS = ledger.c.kind.is_(None) | (ledger.c.kind == "deletion")   # ledger entries that are deletion receipts
LEDGER_HEAD = "ledger.head"   # meta: "seq:entry_hash" of the last appended ledger entry
ABANDONED_SLOTS = "keys.abandoned"   # meta: key slots (destroyed) whose records were re-added under new keys


PG_WRITE_LOCK = 0x53335457   # "S3TW": the advisory lock key that serialises writers on PostgreSQL


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    dbapi_connection.isolation_level = None     # s3t emits BEGIN itself (see `_sqlite_begin`)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA secure_delete=ON")   # overwrite erased content, don't just unlink pages
    cursor.execute("PRAGMA journal_mode=DELETE")
    cursor.execute("PRAGMA synchronous=FULL")   # an acknowledged deletion survives power loss
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    # Writers lock up front: two read-then-write transactions never deadlock on a lock upgrade.
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("s3t_write") else "BEGIN")


class Registry:
    """Typed access to one run's database; methods taking `conn` run inside a caller's transaction."""

    def __init__(self, url: str, keys: KeyStore) -> None:
        self.url = url
        self.keys = keys
        sqlite = make_url(url).get_backend_name() == "sqlite"
        self.engine: Engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S} if sqlite else {})
        if sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", _sqlite_begin)

    def create_schema(self) -> None:
        """Create the tables that are missing (all for a new run; tables, nullable columns and indexes
        added since, for an older one).

        Under the write lock: two processes opening an older run at once do not both create a table.
        """
        with self.transaction() as conn:
            existing = set(inspect(conn).get_table_names())
            metadata.create_all(conn)
            for table in metadata.sorted_tables:
                if table.name not in existing:
                    continue
                have = {c["name"] for c in inspect(conn).get_columns(table.name)}
                for column in table.columns:
                    if column.name not in have and column.nullable:
                        ddl = column.type.compile(dialect=conn.dialect)
                        conn.exec_driver_sql(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {ddl}')
                for index in table.indexes:
                    index.create(conn, checkfirst=True)

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A write transaction. Writers are serialised, as the deletion path's checks assume: SQLite by
        BEGIN IMMEDIATE, PostgreSQL by a transaction-scoped advisory lock (READ COMMITTED alone would let a
        restore commit an order between a deletion's read of it and its write)."""
        with self.engine.connect() as conn:
            conn.execution_options(s3t_write=True)
            with conn.begin():
                if conn.dialect.name == "postgresql":
                    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_WRITE_LOCK})")
                yield conn

    def close(self) -> None:
        self.engine.dispose()
        self.keys.close()

    # -- meta ---------------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(meta.c.value).where(meta.c.key == key)).scalar()

    def set_meta(self, conn: Connection, key: str, value: str) -> None:
        conn.execute(meta.delete().where(meta.c.key == key))
        conn.execute(meta.insert().values(key=key, value=value))

    def delete_meta(self, conn: Connection, key: str, *, if_value: str | None = None) -> None:
        q = meta.delete().where(meta.c.key == key)
        conn.execute(q if if_value is None else q.where(meta.c.value == if_value))

    # -- records ------------------------------------------------------------------------------------
    def insert_records(self, conn: Connection, rows: Sequence[dict]) -> None:
        """Insert records {id, subject_digest, input, target (bytes), shard, slice}, each sealed under a new key."""
        sealed = self._sealed(rows)
        for start in range(0, len(sealed), 5000):
            conn.execute(records.insert(), sealed[start:start + 5000])
        self._count(conn, rows, +1)

    def revive_records(self, conn: Connection, rows: Sequence[dict]) -> None:
        """Store new records under the ids of deleted ones (rows as for `insert_records`, plus `generation`):
        each tombstone takes the new content, sealed under a new key, and its new cell."""
        for row in self._sealed(rows):
            done = conn.execute(records.update().where(records.c.id == row["id"], records.c.deleted_in.is_not(None))
                                .values(deleted_in=None, **{k: v for k, v in row.items() if k != "id"}))
            assert done.rowcount == 1, f"record {row['id']} is not a deleted record"
        self._count(conn, rows, +1)
        # The old (destroyed) slots lose their row: count them, so `S3T.open` does not take them for leftovers.
        abandoned = int(conn.execute(select(meta.c.value).where(meta.c.key == ABANDONED_SLOTS)).scalar() or 0)
        self.set_meta(conn, ABANDONED_SLOTS, str(abandoned + len(rows)))

    def _sealed(self, rows: Sequence[dict]) -> list[dict]:
        slots = self.keys.allocate(len(rows))   # inside the caller's write transaction (see KeyStore.allocate)
        keys = self.keys.keys(slots)
        return [dict(id=r["id"], subject_digest=r["subject_digest"], shard=r["shard"], slice=r["slice"],
                     key_slot=slot, input=seal(keys[slot], r["input"], aad("record", r["id"], "input")),
                     target=seal(keys[slot], r["target"], aad("record", r["id"], "target")),
                     **({"generation": r["generation"]} if r.get("generation") else {}))
                for r, slot in zip(rows, slots)]

    def add_cells(self, conn: Connection, shape: tuple[int, int]) -> None:
        """One count per (shard, slice) of a `shape` = (shards, slices) grid, all zero."""
        conn.execute(cells.insert(), [dict(shard=m, slice=s, live=0) for m in range(shape[0]) for s in range(shape[1])])

    def _count(self, conn: Connection, rows: Iterable[dict], sign: int) -> None:
        changes: dict[tuple[int, int], int] = defaultdict(int)
        for row in rows:
            changes[row["shard"], row["slice"]] += sign
        for (shard, slice_), n in changes.items():
            conn.execute(cells.update().where(cells.c.shard == shard, cells.c.slice == slice_)
                         .values(live=cells.c.live + n))

    def live_members(self, shard: int) -> dict[int, list[str]]:
        """Live record ids of each slice of a shard, sorted."""
        out: dict[int, list[str]] = defaultdict(list)
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(records.c.slice, records.c.id)
                .where(records.c.shard == shard, records.c.deleted_in.is_(None))
                .order_by(records.c.id)
            )
            for s, rid in rows:
                out[s].append(rid)
        return out

    def live_shard(self, shard: int) -> tuple[dict[int, list[str]], dict[str, tuple[bytes, bytes]]]:
        """(live ids of each slice, sorted; {id: (input, target)}) of one shard, read in one snapshot.

        One query, so a deletion committing meanwhile cannot leave an id listed without its content. A
        record whose key is destroyed by the time it is unsealed was deleted meanwhile: it is left out.
        """
        members: dict[int, list[str]] = defaultdict(list)
        rows: dict[str, tuple[bytes, bytes]] = {}
        with self.engine.connect() as conn:
            found = conn.execute(
                select(records.c.slice, records.c.id, records.c.key_slot, records.c.input, records.c.target)
                .where(records.c.shard == shard, records.c.deleted_in.is_(None)).order_by(records.c.id)).all()
        keys = self.keys.keys(r.key_slot for r in found)
        for s, rid, slot, model_input, target in found:
            if keys[slot] is None:
                continue
            members[s].append(rid)
            rows[rid] = (unseal(keys[slot], model_input, aad("record", rid, "input")),
                         unseal(keys[slot], target, aad("record", rid, "target")))
        return dict(members), rows

    def find_records(self, conn: Connection, *, ids: Sequence[str] = (),
                     subject_digests: Sequence[str] = ()) -> list[dict]:
        """Rows {id, subject_digest, key_slot, shard, slice, deleted_in, generation} for the given ids and
        subjects' digests, by index lookups only."""
        found: dict[str, dict] = {}
        cols = (records.c.id, records.c.subject_digest, records.c.key_slot, records.c.shard, records.c.slice,
                records.c.deleted_in, records.c.generation)
        for column, values in ((records.c.id, list(ids)), (records.c.subject_digest, list(subject_digests))):
            for start in range(0, len(values), 900):
                for row in conn.execute(select(*cols).where(column.in_(values[start:start + 900]))):
                    found[row.id] = row._asdict()
        return list(found.values())

    def erase_records(self, conn: Connection, rows: Sequence[dict], request_id: str) -> None:
        """Drop the sealed content of records; keep the id, the subject's keyed digest and the key slot (the
        caller destroys the key once this commits)."""
        ids = [row["id"] for row in rows]
        for start in range(0, len(ids), 900):
            conn.execute(records.update().where(records.c.id.in_(ids[start:start + 900]))
                         .values(input=None, target=None, deleted_in=request_id))
        self._count(conn, rows, -1)

    def key_slots(self, ids: Sequence[str], *, live_only: bool = False) -> dict[str, int]:
        """{id: key slot} of these records (only the live ones with `live_only`), by index lookups."""
        out: dict[str, int] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 900):
                q = select(records.c.id, records.c.key_slot).where(records.c.id.in_(list(ids[start:start + 900])))
                out.update(conn.execute(q.where(records.c.deleted_in.is_(None)) if live_only else q).all())
        return out

    def generations(self, shard: int) -> dict[str, int]:
        """{id: generation} of a shard's records that were re-added after a deletion (usually none). Only a
        re-add changes a generation, and it holds the training lock: a trainer may read this apart from
        the records' content."""
        with self.engine.connect() as conn:
            return dict(conn.execute(select(records.c.id, records.c.generation).where(
                records.c.shard == shard, records.c.generation > 0)).all())

    def unseen(self, artifact_ids: Sequence[str]) -> list[str]:
        """Live record ids (sorted) that none of these artifacts saw, in the incarnation that is live now."""
        saw = (select(lineage.c.record_id).where(
            lineage.c.artifact.in_(list(set(artifact_ids))), lineage.c.record_id == records.c.id,
            func.coalesce(lineage.c.generation, 0) == func.coalesce(records.c.generation, 0)).exists())
        with self.engine.connect() as conn:
            return list(conn.execute(select(records.c.id).where(records.c.deleted_in.is_(None), ~saw)
                                     .order_by(records.c.id)).scalars())

    def live_ids(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(records.c.id).where(records.c.deleted_in.is_(None))).scalars())

    # -- key slots ----------------------------------------------------------------------------------
    def dead_key_slots(self) -> list[int]:
        """Slots whose keys must be destroyed: those of deleted records and of decided held requests."""
        q = union_all(select(records.c.key_slot).where(records.c.deleted_in.is_not(None)),
                      select(flagged.c.key_slot).where(flagged.c.key_slot.is_not(None), flagged.c.status != "pending"))
        with self.engine.connect() as conn:
            return list(conn.execute(q).scalars())

    def referenced_key_slots(self, conn: Connection | None = None) -> set[int]:
        """Every slot a row refers to (live or dead): any other allocated slot is a leftover."""
        q = union_all(select(records.c.key_slot), select(flagged.c.key_slot).where(flagged.c.key_slot.is_not(None)))
        if conn is not None:
            return set(conn.execute(q).scalars())
        with self.engine.connect() as c:
            return set(c.execute(q).scalars())

    def count_key_slots(self) -> int:
        """Slots allocated by committed writes: those rows refer to, and those re-added records left behind."""
        with self.engine.connect() as conn:
            return ((conn.execute(select(func.count(records.c.key_slot))).scalar() or 0)
                    + (conn.execute(select(func.count(flagged.c.key_slot))).scalar() or 0)
                    + int(conn.execute(select(meta.c.value).where(meta.c.key == ABANDONED_SLOTS)).scalar() or 0))

    def locate(self, ids: Sequence[str]) -> dict[str, tuple[int, int, bool]]:
        out = {}
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 900):
                for rid, shard, sl, deleted in conn.execute(
                        select(records.c.id, records.c.shard, records.c.slice, records.c.deleted_in)
                        .where(records.c.id.in_(list(ids[start:start + 900])))):
                    out[rid] = (shard, sl, deleted is not None)
        return out

    def count_records(self) -> tuple[int, int]:
        """(live, deleted) record counts."""
        with self.engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(records)).scalar() or 0
            deleted = conn.execute(
                select(func.count()).select_from(records).where(records.c.deleted_in.is_not(None))).scalar() or 0
        return total - deleted, deleted

    # -- orders and stages --------------------------------------------------------------------------
    def insert_orders(self, conn: Connection, rows: Iterable[dict]) -> None:
        conn.execute(orders.insert(), [dict(r, slices=json.dumps(list(r["slices"]))) for r in rows])

    def orders(self, conn: Connection | None = None, *, shards: Iterable[int] | None = None) -> list[dict]:
        """Orders as dicts {shard, position, slices (tuple), depth, artifacts (list by stage)}."""
        def run(c: Connection) -> list[dict]:
            q = select(orders).order_by(orders.c.shard, orders.c.position)
            sq = select(stages).order_by(stages.c.shard, stages.c.position, stages.c.stage)
            if shards is not None:
                wanted = list(shards)
                q = q.where(orders.c.shard.in_(wanted))
                sq = sq.where(stages.c.shard.in_(wanted))
            arts: dict[tuple[int, int], list[str]] = defaultdict(list)
            for row in c.execute(sq):
                arts[row.shard, row.position].append(row.artifact)
            return [dict(shard=r.shard, position=r.position, slices=tuple(json.loads(r.slices)), depth=r.depth,
                         artifacts=arts[r.shard, r.position]) for r in c.execute(q)]
        if conn is not None:
            return run(conn)
        with self.engine.connect() as c:
            return run(c)

    def set_depth(self, conn: Connection, shard: int, position: int, depth: int) -> None:
        conn.execute(orders.update().where(orders.c.shard == shard, orders.c.position == position).values(depth=depth))

    def set_stages(self, conn: Connection, shard: int, position: int, artifacts_by_stage: Sequence[str]) -> None:
        conn.execute(stages.delete().where(stages.c.shard == shard, stages.c.position == position))
        conn.execute(stages.insert(), [dict(shard=shard, position=position, stage=i, artifact=a)
                                       for i, a in enumerate(artifacts_by_stage, start=1)])

    # -- artifacts and lineage ----------------------------------------------------------------------
    def artifact(self, lineage_hash: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(artifacts).where(artifacts.c.lineage == lineage_hash)).first()
        return row._asdict() if row else None

    def add_artifact(self, conn: Connection, *, lineage_hash: str, sha256: str, stage: int, examples: int,
                     loss: float | None, record_ids: Iterable[str], environment: str,
                     generations: dict[str, int] | None = None) -> None:
        """Register an artifact and the record ids it saw (with the generation of each re-added one)."""
        conn.execute(artifacts.delete().where(artifacts.c.lineage == lineage_hash))
        conn.execute(lineage.delete().where(lineage.c.artifact == lineage_hash))
        conn.execute(artifacts.insert().values(lineage=lineage_hash, sha256=sha256, stage=stage, examples=examples,
                                               loss=loss, created_at=utcnow(), environment=environment))
        generations = generations or {}
        rows = [dict(artifact=lineage_hash, record_id=r, generation=generations.get(r) or None) for r in record_ids]
        for start in range(0, len(rows), 5000):
            conn.execute(lineage.insert(), rows[start:start + 5000])

    def artifact_lineages(self) -> set[str]:
        """Every registered artifact."""
        with self.engine.connect() as conn:
            return set(conn.execute(select(artifacts.c.lineage)).scalars())

    def add_environment(self, conn: Connection, fingerprint: str, description: dict) -> None:
        """Record a numeric environment once (its fingerprint names it in lineages and artifacts)."""
        if conn.execute(select(environments.c.fingerprint).where(environments.c.fingerprint == fingerprint)).first():
            return
        conn.execute(environments.insert().values(fingerprint=fingerprint,
                                                  description=json.dumps(description, sort_keys=True)))

    def environments(self) -> dict[str, dict]:
        """{fingerprint: description} of every environment a stage of this run was trained in."""
        with self.engine.connect() as conn:
            return {fp: json.loads(d) for fp, d in conn.execute(select(environments))}

    def artifact_hashes(self, lineages: Iterable[str]) -> dict[str, str]:
        wanted = list(set(lineages))
        with self.engine.connect() as conn:
            return dict(conn.execute(select(artifacts.c.lineage, artifacts.c.sha256)
                                     .where(artifacts.c.lineage.in_(wanted))).all())

    def tainted(self, conn: Connection, artifact_ids: Sequence[str], record_ids: Sequence[str]) -> set[str]:
        """The artifacts among `artifact_ids` whose recorded lineage contains any of `record_ids`."""
        hits: set[str] = set()
        arts = list(set(artifact_ids))
        for start in range(0, len(record_ids), 900):
            chunk = list(record_ids[start:start + 900])
            hits.update(conn.execute(select(lineage.c.artifact).distinct()
                                     .where(lineage.c.record_id.in_(chunk), lineage.c.artifact.in_(arts))).scalars())
        return hits

    def saw_deleted(self, conn: Connection, artifact_ids: Sequence[str]) -> set[str]:
        """The artifacts among these that saw a record deleted by now, or an earlier incarnation of a re-added
        one (a join: for offline paths)."""
        q = (select(lineage.c.artifact).distinct().join(records, records.c.id == lineage.c.record_id)
             .where(lineage.c.artifact.in_(list(set(artifact_ids))),
                    records.c.deleted_in.is_not(None)
                    | (func.coalesce(records.c.generation, 0) != func.coalesce(lineage.c.generation, 0))))
        return set(conn.execute(q).scalars())

    def artifact_examples(self, lineages: Iterable[str], conn: Connection | None = None) -> dict[str, int]:
        """{lineage: examples it was trained on} of these registered artifacts."""
        wanted = sorted(set(lineages))
        out: dict[str, int] = {}

        def run(c: Connection) -> None:
            for start in range(0, len(wanted), 900):
                out.update(c.execute(select(artifacts.c.lineage, artifacts.c.examples)
                                     .where(artifacts.c.lineage.in_(wanted[start:start + 900]))).all())
        if conn is not None:
            run(conn)
        else:
            with self.engine.connect() as c:
                run(c)
        return out

    def artifacts_that_saw(self, conn: Connection, record_ids: Sequence[str]) -> set[str]:
        """Registered artifacts whose lineage contains any of `record_ids` (by index: no scan)."""
        hits: set[str] = set()
        for start in range(0, len(record_ids), 900):
            chunk = list(record_ids[start:start + 900])
            hits.update(conn.execute(select(lineage.c.artifact).distinct()
                                     .join(artifacts, artifacts.c.lineage == lineage.c.artifact)
                                     .where(lineage.c.record_id.in_(chunk))).scalars())
        return hits

    def seen(self, conn: Connection, record_ids: Sequence[str]) -> set[str]:
        """The ids among these that some registered artifact saw (by index: no scan)."""
        hits: set[str] = set()
        for start in range(0, len(record_ids), 900):
            chunk = list(record_ids[start:start + 900])
            hits.update(conn.execute(select(lineage.c.record_id).distinct()
                                     .join(artifacts, artifacts.c.lineage == lineage.c.artifact)
                                     .where(lineage.c.record_id.in_(chunk))).scalars())
        return hits

    def unreferenced(self, conn: Connection, lineages: Iterable[str]) -> set[str]:
        """The registered artifacts among these that no order's stages refer to any more."""
        wanted = sorted(set(lineages))
        if not wanted:
            return set()
        registered = set(conn.execute(select(artifacts.c.lineage).where(artifacts.c.lineage.in_(wanted))).scalars())
        used = set(conn.execute(select(stages.c.artifact).distinct().where(stages.c.artifact.in_(wanted))).scalars())
        return registered - used

    def unregister(self, conn: Connection, lineages: Iterable[str]) -> None:
        """Unregister artifacts that saw no deleted record (superseded by a retraining on added data), in the
        caller's transaction; the trainer shreds their files, holding the training lock. They never enter
        the retired queue, which any process may shred at any time: a stage of the same lineage may be
        trained again, and a late shred would take the new file."""
        wanted = sorted(set(lineages))
        for start in range(0, len(wanted), 900):
            conn.execute(artifacts.delete().where(artifacts.c.lineage.in_(wanted[start:start + 900])))

    def retire(self, conn: Connection, lineages: Iterable[str]) -> None:
        """Unregister artifacts in the caller's transaction and queue their files for shredding.

        Their lineage rows stay: they are the evidence of what the retired artifacts saw.
        """
        wanted = sorted(set(lineages))
        for start in range(0, len(wanted), 900):
            chunk = wanted[start:start + 900]
            conn.execute(artifacts.delete().where(artifacts.c.lineage.in_(chunk)))
            conn.execute(retired_artifacts.delete().where(retired_artifacts.c.lineage.in_(chunk)))
            conn.execute(retired_artifacts.insert(), [dict(lineage=h, retired_at=utcnow()) for h in chunk])

    def retired(self) -> list[tuple[str, str]]:
        """(lineage, retired_at) of retired artifacts whose files may still exist; shred them, then pass the
        same pairs to `forget_retired` (an entry queued again meanwhile has a new time and stays)."""
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(select(retired_artifacts.c.lineage, retired_artifacts.c.retired_at))]

    def forget_retired(self, conn: Connection, entries: Sequence[tuple[str, str]]) -> None:
        for lineage_hash, retired_at in entries:
            conn.execute(retired_artifacts.delete().where(retired_artifacts.c.lineage == lineage_hash,
                                                          retired_artifacts.c.retired_at == retired_at))

    # -- served sets --------------------------------------------------------------------------------
    def served(self, conn: Connection | None = None) -> tuple[int, list[dict]]:
        """(version, components) of the current served set; (0, []) before training."""
        q = select(served_sets).order_by(served_sets.c.version.desc()).limit(1)
        if conn is not None:
            row = conn.execute(q).first()
        else:
            with self.engine.connect() as c:
                row = c.execute(q).first()
        return (row.version, json.loads(row.components)) if row else (0, [])

    def add_served(self, conn: Connection, components: list[dict], *, version: int) -> None:
        """Write served-set `version` (the primary key makes a concurrent writer of the same version fail)."""
        conn.execute(served_sets.insert().values(version=version, created_at=utcnow(),
                                                 components=json.dumps(components, sort_keys=True)))

    # -- ledger (appended to by s3t.ledger.append: a signed hash chain) -------------------------------
    def ledger_head(self, conn: Connection) -> tuple[int, str] | None:
        """(seq, entry_hash) of the last chained ledger entry, or None if there is none."""
        row = conn.execute(select(ledger.c.seq, ledger.c.entry_hash).where(ledger.c.seq.is_not(None))
                           .order_by(ledger.c.seq.desc()).limit(1)).first()
        return (row.seq, row.entry_hash) if row else None

    def add_ledger_entry(self, conn: Connection, *, request_id: str, created_at: str, receipt: dict, seq: int,
                         kind: str, prev_hash: str, entry_hash: str, signature: str | None) -> None:
        conn.execute(ledger.insert().values(request_id=request_id, created_at=created_at, seq=seq, kind=kind,
                                            receipt=json.dumps(receipt, sort_keys=True), prev_hash=prev_hash,
                                            entry_hash=entry_hash, signature=signature))
        self.set_meta(conn, LEDGER_HEAD, f"{seq}:{entry_hash}")   # exposes entries later removed from the end

    def chain_entry(self, conn: Connection, request_id: str, *, seq: int, kind: str, prev_hash: str,
                    entry_hash: str, signature: str | None) -> None:
        """Give an entry written before the ledger was chained its place in the chain."""
        conn.execute(update(ledger).where(ledger.c.request_id == request_id, ledger.c.seq.is_(None))
                     .values(seq=seq, kind=kind, prev_hash=prev_hash, entry_hash=entry_hash, signature=signature))
        self.set_meta(conn, LEDGER_HEAD, f"{seq}:{entry_hash}")

    def ledger_entries(self, conn: Connection | None = None, *, request_id: str | None = None,
                       unchained: bool = False) -> list[dict]:
        """Ledger rows {request_id, created_at, receipt (dict), seq, kind, prev_hash, entry_hash, signature},
        in chain order (`unchained`: only those without a chain position, oldest first)."""
        q = select(ledger).order_by(ledger.c.seq, ledger.c.created_at)
        if request_id is not None:
            q = q.where(ledger.c.request_id == request_id)
        if unchained:
            q = q.where(ledger.c.seq.is_(None))
        if conn is not None:
            rows = [r._asdict() for r in conn.execute(q)]
        else:
            with self.engine.connect() as c:
                rows = [r._asdict() for r in c.execute(q)]
        for r in rows:
            r["receipt"] = json.loads(r["receipt"])
            r["kind"] = r["kind"] or "deletion"   # entries from before the chain are all deletions
        return rows

    def ledger_recorded_head(self, conn: Connection) -> tuple[int, str] | None:
        """(seq, entry_hash) the last append recorded, read from the meta table."""
        value = conn.execute(select(meta.c.value).where(meta.c.key == LEDGER_HEAD)).scalar()
        if not value:
            return None
        seq, _, digest = value.partition(":")
        return int(seq), digest

    def receipt(self, request_id: str) -> dict | None:
        with self.engine.connect() as conn:
            return self.receipt_in(conn, request_id)

    def receipts(self) -> list[dict]:
        """Every deletion's receipt, oldest first."""
        with self.engine.connect() as conn:
            return [json.loads(t) for t in conn.execute(select(ledger.c.receipt).where(DELETIONS)
                                                        .order_by(ledger.c.seq, ledger.c.created_at)).scalars()]

    def receipt_in(self, conn: Connection, request_id: str) -> dict | None:
        text = conn.execute(select(ledger.c.receipt).where(ledger.c.request_id == request_id, DELETIONS)).scalar()
        return json.loads(text) if text else None

    # -- idempotency --------------------------------------------------------------------------------
    def idempotent(self, conn: Connection, key: str) -> dict | None:
        """{fingerprint, request_id} stored under an idempotency key, or None."""
        row = conn.execute(select(idempotency).where(idempotency.c.key == key)).first()
        return row._asdict() if row else None

    def add_idempotent(self, conn: Connection, key: str, fingerprint: str, request_id: str) -> None:
        conn.execute(idempotency.insert().values(key=key, fingerprint=fingerprint, request_id=request_id,
                                                 created_at=utcnow()))

    def expire_idempotent(self, conn: Connection, *, before: str, key: str | None = None) -> int:
        """Forget idempotency keys created before `before` (ISO time; by index range), or just `key` if
        it is that old; also decided held requests' keys. Returns how many keys went."""
        q = idempotency.delete().where(idempotency.c.created_at < before)
        gone = conn.execute(q if key is None else q.where(idempotency.c.key == key)).rowcount
        q = (update(flagged).where(flagged.c.decided_at < before, flagged.c.status != "pending",
                                   flagged.c.idempotency_key.is_not(None)).values(idempotency_key=None))
        return gone + conn.execute(q if key is None else q.where(flagged.c.idempotency_key == key)).rowcount

    # -- capacity inputs ----------------------------------------------------------------------------
    def live_counts(self, conn: Connection | None = None) -> dict[tuple[int, int], int]:
        """Live records per (shard, slice), every cell included (a small table: no scan of the records)."""
        q = select(cells.c.shard, cells.c.slice, cells.c.live)
        if conn is not None:
            return {(shard, sl): n for shard, sl, n in conn.execute(q)}
        with self.engine.connect() as c:
            return {(shard, sl): n for shard, sl, n in c.execute(q)}

    def deleted_ids(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(records.c.id).where(records.c.deleted_in.is_not(None))).scalars())

    # -- service tokens -----------------------------------------------------------------------------
    def add_token(self, conn: Connection, **row) -> None:
        conn.execute(tokens.insert().values(created_at=utcnow(), **row))

    def tokens(self) -> list[dict]:
        with self.engine.connect() as conn:
            return [r._asdict() for r in conn.execute(select(tokens).order_by(tokens.c.created_at))]

    def token_by_secret(self, secret_sha256: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(tokens).where(tokens.c.secret_sha256 == secret_sha256)).first()
        return row._asdict() if row else None

    def revoke_token(self, conn: Connection, token_id: str) -> bool:
        """Mark a token revoked; False if no live token has this id."""
        done = conn.execute(update(tokens).where(tokens.c.id == token_id, tokens.c.revoked_at.is_(None))
                            .values(revoked_at=utcnow()))
        return done.rowcount > 0

    def usage(self, token_id: str, day: str) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(token_usage.c.used).where(token_usage.c.token_id == token_id,
                                                                 token_usage.c.day == day)).scalar() or 0

    def add_usage(self, conn: Connection, token_id: str, day: str, items: int) -> None:
        """Count `items` (negative: take them back) towards a token's usage of `day`."""
        done = conn.execute(update(token_usage).where(token_usage.c.token_id == token_id, token_usage.c.day == day)
                            .values(used=token_usage.c.used + items))
        if done.rowcount == 0:
            conn.execute(token_usage.insert().values(token_id=token_id, day=day, used=items))

    # -- flagged deletion requests ------------------------------------------------------------------
    def add_flagged(self, conn: Connection, *, request: str | None = None, **row) -> None:
        """Store a flagged request; its `request` content (if any) is sealed under a new key."""
        if request is not None:
            slot = self.keys.allocate(1)[0]   # inside the caller's write transaction (see KeyStore.allocate)
            row.update(key_slot=slot, request=seal(self.keys.key(slot), request.encode(), aad("flag", row["id"])))
        conn.execute(flagged.insert().values(created_at=utcnow(), **row))

    def flagged(self, conn: Connection | None = None, *, flag_id: str | None = None, status: str | None = None,
                idempotency_key: str | None = None) -> list[dict]:
        q = select(flagged).order_by(flagged.c.created_at)
        if flag_id is not None:
            q = q.where(flagged.c.id == flag_id)
        if status is not None:
            q = q.where(flagged.c.status == status)
        if idempotency_key is not None:
            q = q.where(flagged.c.idempotency_key == idempotency_key)
        if conn is not None:
            found = [r._asdict() for r in conn.execute(q)]
        else:
            with self.engine.connect() as c:
                found = [r._asdict() for r in c.execute(q)]
        keys = self.keys.keys(r["key_slot"] for r in found if r["request"] is not None)
        for r in found:   # unsealed; None once decided (or if its key is already destroyed)
            key = keys.get(r["key_slot"]) if r["request"] is not None else None
            r["request"] = unseal(key, r["request"], aad("flag", r["id"])).decode() if key else None
        return found

    def flagged_page(self, *, status: str | None = None, after: tuple[str, str] | None = None,
                     limit: int = 100) -> list[dict]:
        """One page of flagged requests without their content, oldest first, after (created_at, id)."""
        q = select(*FLAG_SUMMARY).order_by(flagged.c.created_at, flagged.c.id).limit(limit)
        if status is not None:
            q = q.where(flagged.c.status == status)
        if after is not None:
            q = q.where(tuple_(flagged.c.created_at, flagged.c.id) > tuple_(*after))
        with self.engine.connect() as conn:
            return [r._asdict() for r in conn.execute(q)]

    def flag_position(self, flag_id: str) -> tuple[str, str] | None:
        """(created_at, id) of a flagged request, the listing's cursor; None if unknown."""
        with self.engine.connect() as conn:
            row = conn.execute(select(flagged.c.created_at, flagged.c.id).where(flagged.c.id == flag_id)).first()
        return tuple(row) if row else None

    def count_flagged(self, conn: Connection | None = None, *, status: str, token_id: str | None = None) -> int:
        """How many flagged requests have `status` (of one token, if given): by index, no content read."""
        q = select(func.count()).select_from(flagged).where(flagged.c.status == status)
        if token_id is not None:
            q = q.where(flagged.c.token_id == token_id)
        if conn is not None:
            return conn.execute(q).scalar() or 0
        with self.engine.connect() as c:
            return c.execute(q).scalar() or 0

    def decide_flagged(self, conn: Connection, flag_id: str, **values) -> bool:
        """Decide a pending flagged request; False if it was no longer pending (decided meanwhile)."""
        done = conn.execute(update(flagged).where(flagged.c.id == flag_id, flagged.c.status == "pending")
                            .values(decided_at=utcnow(), **values))
        return done.rowcount > 0
