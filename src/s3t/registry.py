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

On PostgreSQL a run lives in a schema of its own (`schema`; the connection's search path points there,
so every statement is the same as on SQLite) and writers serialise on a transaction-scoped advisory
lock keyed by that schema, which is what BEGIN IMMEDIATE does on SQLite: the deletion path's checks
assume one writer at a time, across every process and machine that shares the database. `lock(name)`
gives session-scoped advisory locks for longer work (one trainer per run, across machines).
"""

from __future__ import annotations

import json
import logging
import re
import time
import zlib
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone

from sqlalchemy import (BigInteger, Column, Float, Index, Integer, LargeBinary, MetaData, String, Table, Text,
                        bindparam, create_engine, event, func, inspect, select, tuple_, union_all, update)
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from .errors import RunError
from .keystore import KeyStore, aad, seal, unseal

__all__ = ["Registry", "AdvisoryLock", "check_schema_name", "utcnow"]

log = logging.getLogger(__name__)

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
shards = Table(  # each shard's deletion capacity (`deletions_to_drop`), kept with its orders' depths
    "shards", metadata,
    Column("shard", Integer, primary_key=True),
    Column("capacity", Integer, nullable=False),
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
    Column("record_id", String(512), primary_key=True),
    Column("generation", Integer),                   # which incarnation of a re-added id it saw; NULL = 0
    # The deletion path asks which artifacts saw a record: this index answers it alone (an index-only scan),
    # where one on record_id alone would read a table page per artifact (the rows lie in artifact order).
    Index("ix_lineage_record_artifact", "record_id", "artifact"),
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
guard_usage = Table(  # the capacity guard's windows (s3t.service.guard): per token, time bucket and review
    "guard_usage", metadata,
    Column("token_id", String(32), primary_key=True),   # ALL_TOKENS: every token together
    Column("bucket", BigInteger, primary_key=True),     # start of the time bucket, ms since the epoch
    Column("reviewed", Integer, primary_key=True),      # 1: an admin's own request or an applied hold
    Column("records", Integer, nullable=False),         # live records the requests deleted
    Column("units", Integer, nullable=False),           # ensemble capacity they consumed
)
guard_spent = Table(  # capacity a token's unreviewed requests consumed per shard and time bucket
    "guard_spent", metadata,
    Column("token_id", String(32), primary_key=True),
    Column("shard", Integer, primary_key=True),
    Column("bucket", BigInteger, primary_key=True),
    Column("units", Integer, nullable=False),
)
rate_buckets = Table(  # rate-limit token buckets shared by the service's replicas (PostgreSQL only)
    "rate_buckets", metadata,
    Column("key", String(300), primary_key=True),
    Column("tokens", Float, nullable=False),            # requests left
    Column("at", Float, nullable=False),                # last refill (the database server's clock, seconds)
    Column("granted", Integer, nullable=False),         # requests the last take granted
    Index("ix_rate_buckets_at", "at"),
)
FLAG_SUMMARY = [c for c in flagged.c if c.name not in ("request", "key_slot", "fingerprint", "idempotency_key")]
DELETIONS = ledger.c.kind.is_(None) | (ledger.c.kind == "deletion")   # ledger entries that are deletion receipts
LEDGER_HEAD = "ledger.head"   # meta: "seq:entry_hash" of the last appended ledger entry
ABANDONED_SLOTS = "keys.abandoned"   # meta: key slots (destroyed) whose records were re-added under new keys


def _in(column, name: str):
    """`column IN (:name)`, the list given at execution (SQLAlchemy renders it into the cached statement)."""
    return column.in_(bindparam(name, expanding=True))


# The group commit's statements, built once: SQLAlchemy otherwise builds and hashes a statement on every
# call, which cost more CPU than SQLite's work for these lookups (a few per batch, and its flush).
RECORD_COLUMNS = (records.c.id, records.c.subject_digest, records.c.key_slot, records.c.shard, records.c.slice,
                  records.c.deleted_in, records.c.generation)
FIND_BY = {"id": select(*RECORD_COLUMNS).where(_in(records.c.id, "values")),
           "subject_digest": select(*RECORD_COLUMNS).where(_in(records.c.subject_digest, "values"))}
SAW = (select(lineage.c.record_id, lineage.c.artifact, artifacts.c.lineage.is_not(None))
       .select_from(lineage.outerjoin(artifacts, artifacts.c.lineage == lineage.c.artifact))
       .where(_in(lineage.c.record_id, "ids")))
ERASE = (update(records).where(records.c.id == bindparam("rid"))
         .values(input=None, target=None, deleted_in=bindparam("request")))
COUNT = (update(cells).where(cells.c.shard == bindparam("m"), cells.c.slice == bindparam("s"))
         .values(live=cells.c.live + bindparam("n")))
IDEMPOTENT = select(idempotency).where(_in(idempotency.c.key, "keys"))
FLAGGED_KEYS = select(flagged.c.idempotency_key).where(_in(flagged.c.idempotency_key, "keys"))
TOKENS_REVOKED = select(tokens.c.id, tokens.c.revoked_at).where(_in(tokens.c.id, "ids"))
USAGE = select(token_usage.c.used).where(token_usage.c.token_id == bindparam("token"),
                                         token_usage.c.day == bindparam("day"))
SERVED = select(served_sets).order_by(served_sets.c.version.desc()).limit(1)
LEDGER_HEAD_ROW = (select(ledger.c.seq, ledger.c.entry_hash).where(ledger.c.seq.is_not(None))
                   .order_by(ledger.c.seq.desc()).limit(1))


PG_WRITE_LOCK = 0x53335457   # "S3TW": the advisory lock class that serialises writers on PostgreSQL
PG_NAMED_LOCK = 0x53334C4B   # "S3LK": the class of `Registry.lock` (e.g. one trainer per run)
ALL_TOKENS = "*"              # guard_usage's row for every token together
SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def utcnow() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def check_schema_name(schema: str) -> str:
    """A PostgreSQL schema name s3t accepts: lower-case letters, digits and _, at most 63 characters."""
    if not isinstance(schema, str) or not SCHEMA_NAME.match(schema):
        raise RunError(f"database schema {schema!r} is not usable: use 1 to 63 lower-case letters, digits and _, "
                       "starting with a letter or _ (e.g. `news_2024`)")
    return schema


def _lock_key(text: str) -> int:
    """A stable signed 32-bit key for an advisory lock."""
    return zlib.crc32(text.encode()) - (1 << 31)


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


def _create_index(conn: Connection, index: Index) -> None:
    """Add an index that an older run lacks. An index only speeds reads up, so a database role that may not
    change the table (on PostgreSQL, only its owner may) opens the run without it, with a warning."""
    try:
        with conn.begin_nested():
            index.create(conn, checkfirst=True)
    except DBAPIError as exc:
        log.warning("index %s could not be added to table %s (%s): the reads it serves stay slower until the "
                    "run is opened by a role that may change the table", index.name, index.table.name,
                    (str(exc.orig).strip().splitlines() or [type(exc.orig).__name__])[0])


def _chunks(values: Sequence, size: int = 900) -> Iterator[Sequence]:
    for start in range(0, len(values), size):
        yield values[start:start + size]


def _require_psycopg(url: str) -> None:
    """A PostgreSQL URL needs its driver: say which package brings it (an optional extra)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise RunError(f"the database URL {make_url(url).render_as_string(hide_password=True)} needs the PostgreSQL "
                       "driver: pip install 's3t[postgres]'") from None


class AdvisoryLock:
    """A PostgreSQL session-level advisory lock with `files.FileLock`'s interface (acquire, release, held).

    It holds a connection of its own for as long as it is held: the lock ends with that session, so a
    holder that dies (kill -9, a lost machine) releases it.
    """

    def __init__(self, engine: Engine, space: int, key: int) -> None:
        self.engine, self.space, self.key = engine, space, key
        self._conn = None

    def acquire(self, *, wait: float | None = None) -> bool:
        """Take the lock: block until free (`wait=None`), or give up after `wait` seconds and return False."""
        assert self._conn is None, "this AdvisoryLock is already held"
        conn = self.engine.raw_connection()   # outside the pool's transactions: the lock outlives them
        try:
            conn.driver_connection.autocommit = True
            deadline = None if wait is None else time.monotonic() + wait
            while True:
                cur = conn.cursor()
                cur.execute("SELECT pg_try_advisory_lock(%s, %s)", (self.space, self.key))
                got = cur.fetchone()[0]
                cur.close()
                if got:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    conn.close()
                    return False
                time.sleep(0.05 if deadline is None else min(0.05, max(0.0, deadline - time.monotonic())))
        except BaseException:
            conn.invalidate() if hasattr(conn, "invalidate") else conn.close()
            raise
        self._conn = conn
        return True

    def release(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            try:
                cur = conn.cursor()
                cur.execute("SELECT pg_advisory_unlock(%s, %s)", (self.space, self.key))
                cur.close()
            finally:
                conn.invalidate()   # close the session: nothing it held survives

    @property
    def held(self) -> bool:
        return self._conn is not None


class Registry:
    """Typed access to one run's database; methods taking `conn` run inside a caller's transaction."""

    def __init__(self, url: str, keys: KeyStore, *, schema: str | None = None) -> None:
        self.url = url
        self.keys = keys
        self.schema = schema
        backend = make_url(url).get_backend_name()
        self.postgres = backend == "postgresql"
        if schema is not None and not self.postgres:
            raise RunError(f"a database schema ({schema!r}) needs a PostgreSQL database URL; got {backend}")
        if self.postgres:
            _require_psycopg(url)
            # No server-side prepared statements: psycopg prepares a statement run 5 times, and PostgreSQL
            # then keeps a generic plan made while a table was small. The tables a service writes grow from
            # empty (idempotency keys, the ledger, guard windows): a generic plan made at start kept
            # scanning the whole idempotency table for each group commit's key lookup (273 scans and 20
            # index reads in 294 batches), where a plan made for the values at hand reads the primary key.
            # (Connection poolers in transaction mode want no prepared statements either.)
            args = {"prepare_threshold": None}
            if schema:
                args["options"] = f"-csearch_path={check_schema_name(schema)}"
            self.engine: Engine = create_engine(url, connect_args=args, pool_size=8, max_overflow=16,
                                                pool_pre_ping=True)
            self._lock_space = _lock_key(schema or "public")
        else:
            self.engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S})
            event.listen(self.engine, "connect", _sqlite_pragmas)
            event.listen(self.engine, "begin", _sqlite_begin)
        # Upserts the deletion path makes once per group commit, built once for this database's dialect: a
        # meta value (the ledger's head), and counts that add up (quota usage, the guard's windows).
        dialect = pg_dialect if self.postgres else sqlite_dialect
        q = dialect.insert(meta)
        self._set_meta = q.on_conflict_do_update(index_elements=[meta.c.key], set_={"value": q.excluded.value})

        def adding(table: Table, *columns: str):
            q = dialect.insert(table)
            return q.on_conflict_do_update(index_elements=[c.name for c in table.primary_key.columns],
                                           set_={c: table.c[c] + q.excluded[c] for c in columns})
        self._add_usage = adding(token_usage, "used")
        self._add_guard_usage = adding(guard_usage, "records", "units")
        self._add_guard_spent = adding(guard_spent, "units")

    @staticmethod
    def prepare(url: str, schema: str | None) -> None:
        """Create a PostgreSQL schema if it is missing (before the registry's first connection: a search path
        naming a missing schema leaves the connection without a default schema)."""
        if schema is None or make_url(url).get_backend_name() != "postgresql":
            return
        _require_psycopg(url)
        engine = create_engine(url, poolclass=NullPool)
        try:
            with engine.begin() as conn:
                conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{check_schema_name(schema)}"')
        finally:
            engine.dispose()

    def holds_run(self) -> bool:
        """Whether the database (schema) already holds a run's tables."""
        with self.engine.connect() as conn:
            return "meta" in inspect(conn).get_table_names()

    def drop_schema_tables(self) -> None:
        """Drop every s3t table (a `create` that failed half-way, on a database that held no run before)."""
        with self.engine.begin() as conn:
            metadata.drop_all(conn)

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
                    _create_index(conn, index)

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A write transaction. Writers are serialised, as the deletion path's checks assume: SQLite by
        BEGIN IMMEDIATE, PostgreSQL by a transaction-scoped advisory lock (READ COMMITTED alone would let a
        restore commit an order between a deletion's read of it and its write)."""
        with self.engine.connect() as conn:
            conn.execution_options(s3t_write=True)
            with conn.begin():
                if self.postgres:
                    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_WRITE_LOCK}, {self._lock_space})")
                allocated = len(self.keys)   # no other writer allocates keys until this transaction ends
                try:
                    yield conn
                except BaseException:
                    # Rolled back: keys allocated here seal rows that will never exist. Destroy them while
                    # the write lock still keeps other writers from allocating.
                    self.keys.destroy(range(allocated, len(self.keys)))
                    raise

    def lock(self, name: str) -> "AdvisoryLock":
        """A PostgreSQL session-level advisory lock for this run, named `name` (held across transactions,
        released when the holder releases it or its connection ends, e.g. when its process dies)."""
        assert self.postgres, "named advisory locks are a PostgreSQL feature; SQLite runs use files.FileLock"
        return AdvisoryLock(self.engine, PG_NAMED_LOCK, _lock_key(f"{self.schema or 'public'}:{name}"))

    def close(self) -> None:
        self.engine.dispose()
        self.keys.close()

    # -- meta ---------------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(meta.c.value).where(meta.c.key == key)).scalar()

    def set_meta(self, conn: Connection, key: str, value: str) -> None:
        conn.execute(self._set_meta, {"key": key, "value": value})

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
        if changes := [{"m": shard, "s": slice_, "n": n} for (shard, slice_), n in changes.items() if n]:
            conn.execute(COUNT, changes)

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
        for column, values in (("id", list(ids)), ("subject_digest", list(subject_digests))):
            for chunk in _chunks(values):
                for row in conn.execute(FIND_BY[column], {"values": list(chunk)}).all():
                    found[row.id] = row._asdict()
        return list(found.values())

    def erase_many(self, conn: Connection, erased: Sequence[tuple[dict, str]]) -> None:
        """Drop the sealed content of records (many requests' at once, one statement): (record row, request id)
        pairs. The id, the subject's keyed digest and the key slot stay (the caller destroys the key once
        this commits)."""
        if not erased:
            return
        conn.execute(ERASE, [{"rid": row["id"], "request": request_id} for row, request_id in erased])
        self._count(conn, [row for row, _ in erased], -1)

    def saw(self, conn: Connection, record_ids: Sequence[str]) -> dict[str, dict[str, bool]]:
        """{record id: {artifact: still registered}} for every artifact whose recorded lineage holds one of
        these ids (the lineage index, one query per 900 ids): the deletion path's lineage check and its
        retirement in one read. Ids no artifact saw map to {}."""
        out: dict[str, dict[str, bool]] = {rid: {} for rid in record_ids}
        for chunk in _chunks(list(record_ids)):
            for rid, artifact, registered in conn.execute(SAW, {"ids": list(chunk)}).all():
                out[rid][artifact] = bool(registered)
        return out

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

    def set_capacity(self, conn: Connection, shard: int, capacity: int) -> None:
        """Store a shard's deletion capacity (call it wherever its orders' depths change)."""
        if not conn.execute(shards.update().where(shards.c.shard == shard).values(capacity=capacity)).rowcount:
            conn.execute(shards.insert().values(shard=shard, capacity=capacity))

    def capacities(self, conn: Connection | None = None) -> dict[int, int]:
        """{shard: deletion capacity} as kept by `set_capacity` (a row per shard: no scan of the orders)."""
        q = select(shards.c.shard, shards.c.capacity)
        if conn is not None:
            return dict(conn.execute(q).all())
        with self.engine.connect() as c:
            return dict(c.execute(q).all())

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

    def analyze(self) -> None:
        """Refresh PostgreSQL's planner statistics and visibility map of the tables that grow in bulk
        (records, lineage), after training. Without statistics a table filled seconds ago has none
        (autovacuum comes later), and the planner reads the deletion path's lineage lookup for a batch of
        ids as a scan of the whole table (15 ms per batch at 200,000 lineage rows instead of 0.3 ms); without
        the visibility map, that lookup reads a table page per row instead of the index alone. VACUUM
        visits only the pages changed since the last one. SQLite's planner takes the index without
        statistics, and reads a covering index alone."""
        if self.postgres:
            with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("VACUUM (ANALYZE) records, lineage, artifacts")

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
        return self._lineage_hits(conn, lineage.c.artifact, record_ids)

    def seen(self, conn: Connection, record_ids: Sequence[str]) -> set[str]:
        """The ids among these that some registered artifact saw (by index: no scan)."""
        return self._lineage_hits(conn, lineage.c.record_id, record_ids)

    @staticmethod
    def _lineage_hits(conn: Connection, column, record_ids: Sequence[str]) -> set:
        """`column` of the lineage rows of registered artifacts that name any of `record_ids`."""
        hits: set = set()
        for start in range(0, len(record_ids), 900):
            chunk = list(record_ids[start:start + 900])
            hits.update(conn.execute(select(column).distinct()
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
        q = SERVED
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
        row = conn.execute(LEDGER_HEAD_ROW).first()
        return (row.seq, row.entry_hash) if row else None

    def add_ledger_entries(self, conn: Connection, rows: Sequence[dict]) -> None:
        """Write chained entries (`ledger.next_entry` rows, in chain order) in one statement, and record
        the last one as the head (exposes entries later removed from the end)."""
        if rows:
            conn.execute(ledger.insert(), list(rows))
            self.set_meta(conn, LEDGER_HEAD, f"{rows[-1]['seq']}:{rows[-1]['entry_hash']}")

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

    def recent_receipts(self, limit: int, *, reference: str | None = None,
                        requested_by: str | None = None) -> list[dict]:
        """Up to `limit` receipts, newest first; only those with this `reference` or requester, if given.
        A scan of the ledger's JSON (portable across databases, no schema change): fine for a person's
        lookups and the console's few recent entries, not for a hot path."""
        out: list[dict] = []
        q = (select(ledger.c.receipt).where(DELETIONS)
             .order_by(ledger.c.seq.desc().nulls_last(), ledger.c.created_at.desc(), ledger.c.request_id.desc()))
        with self.engine.connect() as conn:
            for text in conn.execute(q).scalars():
                receipt = json.loads(text)
                if reference is not None and receipt.get("reference") != reference:
                    continue
                if requested_by is not None and receipt.get("requested_by") != requested_by:
                    continue
                out.append(receipt)
                if len(out) >= limit:
                    break
        return out

    def receipt_in(self, conn: Connection, request_id: str) -> dict | None:
        text = conn.execute(select(ledger.c.receipt).where(ledger.c.request_id == request_id, DELETIONS)).scalar()
        return json.loads(text) if text else None

    # -- idempotency --------------------------------------------------------------------------------
    def idempotent(self, conn: Connection, key: str) -> dict | None:
        """{fingerprint, request_id} stored under an idempotency key, or None."""
        row = conn.execute(select(idempotency).where(idempotency.c.key == key)).first()
        return row._asdict() if row else None

    def idempotent_many(self, conn: Connection, keys: Sequence[str]) -> dict[str, dict | None]:
        """`idempotent` for many keys (one query per 900): {key: row or None}."""
        out: dict[str, dict | None] = {k: None for k in keys}
        for chunk in _chunks(list(keys)):
            out.update((row.key, row._asdict()) for row in conn.execute(IDEMPOTENT, {"keys": list(chunk)}).all())
        return out

    def flagged_keys(self, conn: Connection, keys: Sequence[str]) -> set[str]:
        """Which of these idempotency keys a flagged (held) request was made under."""
        found: set[str] = set()
        for chunk in _chunks(list(keys)):
            found.update(conn.execute(FLAGGED_KEYS, {"keys": list(chunk)}).scalars().all())
        return found

    def revoked_tokens(self, conn: Connection, token_ids: Sequence[str]) -> dict[str, bool]:
        """`token_revoked` for many tokens: {token id: revoked or unknown}."""
        out = {t: True for t in token_ids}
        for chunk in _chunks(list(token_ids)):
            for tid, revoked_at in conn.execute(TOKENS_REVOKED, {"ids": list(chunk)}).all():
                out[tid] = revoked_at is not None
        return out

    def add_idempotent_many(self, conn: Connection, rows: Sequence[dict]) -> None:
        """Several idempotency keys {key, fingerprint, request_id, created_at}, in one statement."""
        if rows:
            conn.execute(idempotency.insert(), list(rows))

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

    def token_revoked(self, conn: Connection, token_id: str) -> bool:
        """Whether a token is revoked (or gone), read in the caller's transaction."""
        row = conn.execute(select(tokens.c.revoked_at).where(tokens.c.id == token_id)).first()
        return row is None or row.revoked_at is not None

    def token_by_secret(self, secret_sha256: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(tokens).where(tokens.c.secret_sha256 == secret_sha256)).first()
        return row._asdict() if row else None

    def revoke_token(self, conn: Connection, token_id: str) -> bool:
        """Mark a token revoked; False if no live token has this id."""
        done = conn.execute(update(tokens).where(tokens.c.id == token_id, tokens.c.revoked_at.is_(None))
                            .values(revoked_at=utcnow()))
        return done.rowcount > 0

    def usage(self, token_id: str, day: str, conn: Connection | None = None) -> int:
        params = {"token": token_id, "day": day}
        if conn is not None:
            return conn.execute(USAGE, params).scalar() or 0
        with self.engine.connect() as c:
            return c.execute(USAGE, params).scalar() or 0

    def add_usage(self, conn: Connection, token_id: str, day: str, items: int) -> None:
        """Count `items` (negative: take them back) towards a token's usage of `day`."""
        conn.execute(self._add_usage, {"token_id": token_id, "day": day, "used": items})

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

    # -- the capacity guard's windows (s3t.service.guard) ---------------------------------------------
    def add_guard_usage(self, conn: Connection, usage: Sequence[dict], spent: Sequence[dict]) -> None:
        """Add to the guard's windows, one statement each: `usage` rows {token_id (or ALL_TOKENS), bucket,
        reviewed, records, units}, `spent` rows {token_id, shard, bucket, units}, each added to the row of
        its key (at most one row per key in a call)."""
        if usage:
            conn.execute(self._add_guard_usage, list(usage))
        if spent:
            conn.execute(self._add_guard_spent, list(spent))

    def guard_window(self, conn: Connection, token_id: str, *, since: int
                     ) -> tuple[dict[tuple[str, bool], tuple[int, int]], dict[int, int]]:
        """Sums over buckets from `since` on: ({(token or ALL_TOKENS, reviewed): (records, units)},
        {shard: units this token's unreviewed requests consumed}) (by index: the token's rows only)."""
        usage = {(who, bool(rev)): (int(rec), int(units)) for who, rev, rec, units in conn.execute(
            select(guard_usage.c.token_id, guard_usage.c.reviewed, func.sum(guard_usage.c.records),
                   func.sum(guard_usage.c.units))
            .where(guard_usage.c.token_id.in_([token_id, ALL_TOKENS]), guard_usage.c.bucket >= since)
            .group_by(guard_usage.c.token_id, guard_usage.c.reviewed))}
        spent = {shard: int(n) for shard, n in conn.execute(
            select(guard_spent.c.shard, func.sum(guard_spent.c.units))
            .where(guard_spent.c.token_id == token_id, guard_spent.c.bucket >= since)
            .group_by(guard_spent.c.shard))}
        return usage, spent

    def expire_guard(self, conn: Connection, *, before: int) -> int:
        """Forget guard buckets older than `before` (they have left every window)."""
        return (conn.execute(guard_usage.delete().where(guard_usage.c.bucket < before)).rowcount
                + conn.execute(guard_spent.delete().where(guard_spent.c.bucket < before)).rowcount)

    # -- rate limits shared by replicas (PostgreSQL) --------------------------------------------------
    def take_rate(self, key: str, *, rate: float, burst: int, n: int = 1,
                  conn: Connection | None = None) -> tuple[int, float]:
        """Spend up to `n` requests from `key`'s token bucket in one atomic statement, on the database
        server's clock (replicas agree on it); returns (requests granted, requests left). Alone (no `conn`)
        it is its own short transaction, without the write lock: buckets of different keys never wait for
        each other. In a group commit's transaction (`conn`) it spends for the batch, and a take of the same
        bucket elsewhere (the token's predictions) waits for that commit."""
        # The clock when the row is locked, not when the statement began: a statement that waited for
        # another's lock must not refill from before that one's update (negative time, an empty bucket).
        now = func.extract("epoch", func.clock_timestamp())
        elapsed = func.greatest(0.0, now - rate_buckets.c.at)
        refill = func.least(float(burst), rate_buckets.c.tokens + elapsed * rate)
        grant = func.greatest(0, func.least(n, func.floor(refill)))
        first = min(n, burst)
        q = pg_dialect.insert(rate_buckets).values(key=key, tokens=float(burst - first), at=now, granted=first)
        q = q.on_conflict_do_update(index_elements=["key"], set_={
            "tokens": refill - grant, "granted": grant, "at": now,
        }).returning(rate_buckets.c.granted, rate_buckets.c.tokens)
        if conn is not None:
            granted, left = conn.execute(q).one()
            return int(granted), float(left)
        with self.engine.begin() as conn:
            conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")   # a lost bucket is a full one
            granted, left = conn.execute(q).one()
        return int(granted), float(left)

    def expire_rate_buckets(self, *, idle_s: float) -> int:
        """Drop buckets untouched for `idle_s` seconds (refilled by then: the same as no bucket)."""
        with self.engine.begin() as conn:
            cutoff = func.extract("epoch", func.clock_timestamp()) - idle_s
            return conn.execute(rate_buckets.delete().where(rate_buckets.c.at < cutoff)).rowcount
