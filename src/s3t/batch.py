"""Group commit: concurrent deletion requests applied in one transaction, each with its own receipt.

A deletion's cost is mostly its durable commit (SQLite: journal and database fsyncs; PostgreSQL: a WAL
flush), and writers are serialised anyway (the deletion path's checks assume one writer at a time). So
requests that arrive while a commit is in flight wait in a queue, and one writer thread applies all of
them in the next transaction:

    queue = DeletionQueue(registry, ledger_key, erase_derived=..., after_commit=...)
    receipt = queue.submit(lambda batch: batch.delete(ids=["r1"])).result()

Each request is a unit of work run against the batch's `Batch` in its own savepoint (opened at its first
immediate write: `_Savepoint`; most writes are staged for the batch's flush), in arrival order, so
every request sees what the ones before it did (a record deleted earlier in the batch is "already
deleted"; the service's guard and quotas count the requests ahead of it), and a request that fails
(an idempotency conflict, a lineage check, a quota) rolls back alone while the others go on. Each gets
its own idempotency key, usage count and signed ledger entry, chained in request order (a request rolled
back leaves no entry and no gap in the chain), exactly as if it had committed alone.

Acknowledged still means durably applied: after the one commit, the batch destroys the keys of every
record it deleted (crypto-shredding, one fsync for the batch), shreds the stages it retired
(`after_commit`), and only then resolves the requests' futures. Derived copies (cached hidden states)
are shredded before the commit under the cache lock, held until the commit is done (`erase_derived`).
If the commit itself fails, every request of the batch is retried in a transaction of its own, so a
failure that one request causes fails that request alone.

The queue never waits for company: the writer takes whatever is queued when it becomes free (at most
`max_batch` requests), so a lone request is applied at once and batches grow with the load.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.exc import DBAPIError

from . import ledger
from .errors import BusyError, RateLimitError
from .registry import ALL_TOKENS, Registry
from .unlearning import Receipt, apply

__all__ = ["Batch", "DeletionQueue"]

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_BATCH = 256   # requests per transaction: bounds a batch's latency and its transaction's size
_UNREAD = object()   # a cached read not made yet (None is a value: an empty ledger has no head)


class Batch:
    """One write transaction shared by a group of deletion requests (see the module docstring).

    `conn` is the open transaction; `delete` applies one request in it (`unlearning.apply`). The batch is
    also the deletion path's view of the registry inside that transaction: what it reads (records, the
    served set, orders, capacities, idempotency keys) is read once and kept in step with its own writes,
    since nothing else writes while the transaction holds the write lock; the writes every request makes
    (its signed ledger entry, erasing its records, its idempotency key, its usage count) are staged and
    written in one statement each by `flush`, before the commit. Ledger entries are built and signed
    when staged, each linked to the one staged before it (`ledger.next_entry`), so they are chained in
    request order. Rarer writes (a depth, a served set, retired stages) go to the database at once, in
    the request's savepoint. A request that fails is rewound: its staged writes are dropped (its ledger
    entry too: the next request links to the entry before it, so the chain has no gap), its immediate
    ones rolled back to its savepoint, and the cached reads re-read.
    """

    def __init__(self, registry: Registry, conn, key: bytes, *, signing_key=None) -> None:
        # Write through `conn.execute`/`exec_driver_sql` only: a request's savepoint opens on the first write
        # SQLAlchemy sees (`_Savepoint`); one made on the raw DBAPI connection would not be rolled back.
        self.registry, self.conn, self._key, self.signing_key = registry, conn, key, signing_key
        self.erased: list[str] = []       # records whose derived copies are shredded before the commit
        self.key_slots: list[int] = []    # keys destroyed after the commit
        self.receipts: list[Receipt] = []
        self._ledger: list[dict] = []                # staged: ledger rows, in chain order
        self._erase: list[tuple[dict, str]] = []     # staged: (record row, request id)
        self._keys: list[dict] = []                  # staged idempotency keys
        self._usage: list[tuple[str, str, int]] = []  # staged usage: (requester, day, items)
        self._guard: list[tuple] = []   # staged guard windows: (token, bucket, reviewed, records, units, spent)
        self._hints: tuple[list, list, list] = ([], [], [])
        # Rate buckets spent for the batch: key -> [requests granted and not yet taken, requests left in the
        # bucket, requests refused so far]. Never rewound: a request spends from its bucket even when it
        # fails, as one refused at the door would; except a bucket a request reserved for itself (not
        # hinted): that reservation is in its savepoint, so a request rolled back gives it back.
        self._rates: dict[str, list] = {}
        self._rates_unhinted: list[str] = []
        self._forget()

    def prefetch(self, *, ids: Sequence[str] = (), keys: Sequence[str] = (), tokens: Sequence[str] = ()) -> None:
        """Read at once what the batch's requests will look up one by one (their records and those records'
        lineage, their idempotency keys, their tokens): a few queries per batch instead of per request."""
        self._hints = (list(ids), list(keys), list(tokens))
        reg, conn = self.registry, self.conn
        if ids := [i for i in dict.fromkeys(ids) if i not in self._records]:
            self.find_records(ids=ids)
            self._lineage.update(reg.saw(conn, [i for i in ids if self._records.get(i) is not None]))
        if keys := [k for k in dict.fromkeys(keys) if k not in self._idempotent]:
            self._idempotent.update(reg.idempotent_many(conn, keys))
            self._flag_keys.update(reg.flagged_keys(conn, keys))
            self._keys_checked.update(keys)
        if tokens := [t for t in dict.fromkeys(tokens) if t not in self._revoked]:
            self._revoked.update(reg.revoked_tokens(conn, tokens))

    def delete(self, *, ids: Sequence[str] = (), subjects: Sequence[str] = (), reference: str | None = None,
               idempotency_key: str | None = None, requested_by: str | None = None) -> Receipt:
        """Apply one deletion request in the batch's transaction (`unlearning.apply`)."""
        applied = apply(self, ids=ids, subjects=subjects, reference=reference, idempotency_key=idempotency_key,
                        requested_by=requested_by)
        self.erased.extend(applied.erased)
        self.key_slots.extend(applied.key_slots)
        if not applied.replayed:
            self.receipts.append(applied.receipt)
        return applied.receipt

    def destroy_after_commit(self, slots: Sequence[int]) -> None:
        self.key_slots.extend(slots)

    @property
    def key(self) -> bytes:
        """The run's ledger key (subject digests, request fingerprints)."""
        return self._key

    # -- reads, kept in step with the batch's own writes ---------------------------------------------
    def find_records(self, *, ids: Sequence[str] = (), subject_digests: Sequence[str] = ()) -> list[dict]:
        """`Registry.find_records`, with the records this batch erased marked deleted. The rows are the
        batch's own: `erase` keeps them current (copy what must not change)."""
        found: dict[str, dict] = {}
        missing = [i for i in dict.fromkeys(ids) if i not in self._records]
        if missing or subject_digests:
            for row in self.registry.find_records(self.conn, ids=missing, subject_digests=subject_digests):
                row["deleted_in"] = self._erased_by.get(row["id"], row["deleted_in"])
                if self._records.get(row["id"]) is None:
                    self._records[row["id"]] = row
                found[row["id"]] = self._records[row["id"]]
        for rid in missing:
            self._records.setdefault(rid, None)   # unknown ids are remembered too
        for rid in ids:
            if self._records.get(rid) is not None:
                found.setdefault(rid, self._records[rid])
        return list(found.values())

    def saw(self, record_ids: Sequence[str]) -> dict[str, bool]:
        """{artifact: still registered} for every artifact whose recorded lineage holds one of these ids
        (`Registry.saw`; retirements made in this batch count)."""
        if missing := [i for i in record_ids if i not in self._lineage]:
            self._lineage.update(self.registry.saw(self.conn, missing))
        out: dict[str, bool] = {}
        for rid in record_ids:
            for artifact, registered in self._lineage[rid].items():
                out[artifact] = registered and artifact not in self._retired
        return out

    def retire(self, lineages: Sequence[str]) -> None:
        self.registry.retire(self.conn, lineages)
        self._retired.update(lineages)

    def has_flag(self, key: str) -> bool:
        """Whether a held request was made under this idempotency key (then read it with `review`)."""
        if key not in self._keys_checked:
            self._flag_keys.update(self.registry.flagged_keys(self.conn, [key]))
            self._keys_checked.add(key)
        return key in self._flag_keys

    def expire_key(self, key: str, *, before: str) -> None:
        """`Registry.expire_idempotent` for one key, in the batch: what the batch read about the key is
        forgotten (re-read on demand), so the request that expired it is a new request, as it would be
        in a transaction of its own."""
        self.registry.expire_idempotent(self.conn, before=before, key=key)
        self._idempotent.pop(key, None)
        self._flag_keys.discard(key)
        self._keys_checked.discard(key)

    def note_flag(self, key: str) -> None:
        """A request in this batch was held under this idempotency key: a later one with the same key in the
        same batch must find that hold (as it would in a transaction of its own)."""
        self._flag_keys.add(key)
        self._keys_checked.add(key)

    def served(self) -> tuple[int, list[dict]]:
        if self._served is None:
            self._served = self.registry.served(self.conn)
        return self._served

    def add_served(self, components: list[dict], *, version: int) -> None:
        self.registry.add_served(self.conn, components, version=version)
        self._served = (version, components)

    def orders(self, shards) -> list[dict]:
        """The orders of these shards (the batch's own dicts: `set_depth` keeps them current)."""
        wanted = sorted(set(shards))
        if missing := [s for s in wanted if s not in self._orders]:
            for s in missing:
                self._orders[s] = []
            for o in self.registry.orders(self.conn, shards=missing):
                self._orders[o["shard"]].append(o)
        return [o for s in wanted for o in self._orders[s]]

    def set_depth(self, order: dict, depth: int) -> None:
        self.registry.set_depth(self.conn, order["shard"], order["position"], depth)
        order["depth"] = depth

    def capacities(self) -> dict[int, int]:
        if self._capacity is None:
            self._capacity = self.registry.capacities(self.conn)
        return self._capacity

    def set_capacity(self, shard: int, capacity: int) -> None:
        if self.capacities().get(shard) != capacity:
            self.registry.set_capacity(self.conn, shard, capacity)
            self._capacity[shard] = capacity

    def idempotent(self, key: str) -> dict | None:
        """{fingerprint, request_id, created_at} stored under an idempotency key (in this batch or before)."""
        if key not in self._idempotent:
            self._idempotent[key] = self.registry.idempotent(self.conn, key)
        return self._idempotent[key]

    def receipt(self, request_id: str) -> dict | None:
        """A stored receipt, this batch's staged ledger entries included (as `Registry.receipt_in` will
        read them once written)."""
        for row in self._ledger:
            if row["request_id"] == request_id:
                return json.loads(row["receipt"])
        return self.registry.receipt_in(self.conn, request_id)

    def seen(self, record_ids: Sequence[str]) -> set[str]:
        """The ids among these that some registered artifact saw (`Registry.seen`; stages retired in this
        batch no longer count, as they would not in a transaction of its own)."""
        self.saw(record_ids)   # one read for the ids not cached yet
        return {rid for rid in record_ids
                if any(registered and artifact not in self._retired
                       for artifact, registered in self._lineage[rid].items())}

    def usage(self, requester: str, day: str) -> int:
        """A requester's usage of `day`, with this batch's requests counted."""
        if (requester, day) not in self._usage_base:
            self._usage_base[requester, day] = self.registry.usage(requester, day, self.conn)
        return self._usage_base[requester, day] + sum(n for r, d, n in self._usage if (r, d) == (requester, day))

    def guard_window(self, token_id: str, *, since: int) -> tuple[dict[tuple[str, bool], tuple[int, int]],
                                                                   dict[int, int]]:
        """`Registry.guard_window` (read once per token and window start), with this batch's requests
        counted (`add_guard_usage`)."""
        if (token_id, since) not in self._windows:
            self._windows[token_id, since] = self.registry.guard_window(self.conn, token_id, since=since)
        stored_usage, stored_spent = self._windows[token_id, since]
        usage, spent = dict(stored_usage), dict(stored_spent)
        staged_usage, staged_spent = self._guard_rows()
        for row in staged_usage:
            if row["bucket"] >= since and row["token_id"] in (token_id, ALL_TOKENS):
                key = (row["token_id"], bool(row["reviewed"]))
                records, units = usage.get(key, (0, 0))
                usage[key] = (records + row["records"], units + row["units"])
        for row in staged_spent:
            if row["bucket"] >= since and row["token_id"] == token_id:
                spent[row["shard"]] = spent.get(row["shard"], 0) + row["units"]
        return usage, spent

    def add_guard_usage(self, token_id: str, *, bucket: int, reviewed: bool, records: int, units: int,
                        spent: dict[int, int]) -> None:
        """Stage one applied request's count in the guard's windows (`Registry.add_guard_usage`): for its
        token, for all tokens, and per shard unless reviewed."""
        self._guard.append((token_id, bucket, reviewed, records, units, dict(spent)))

    def reserve_rates(self, buckets: Sequence[tuple[str, float, int]]) -> None:
        """Spend, in one statement per bucket (`Registry.take_rate`), what the batch's requests will take
        one by one from the registry's rate buckets: `buckets` holds one (key, rate, burst) per request."""
        wanted: dict[tuple[str, float, int], int] = {}
        for bucket in buckets:
            wanted[bucket] = wanted.get(bucket, 0) + 1
        for (key, rate, burst), n in wanted.items():
            granted, left = self.registry.take_rate(key, rate=rate, burst=burst, n=n, conn=self.conn)
            held = self._rates.setdefault(key, [0, left, 0])
            held[0] += granted
            held[1] = left

    def take_rate(self, key: str, *, rate: float, burst: int) -> None:
        """Take one request from `key`'s rate bucket in the registry (PostgreSQL; reserved for the batch),
        or raise RateLimitError with the wait until the bucket holds one for this request."""
        if key not in self._rates:   # not hinted: spent in the request's savepoint (given back if it fails)
            self.reserve_rates([(key, rate, burst)])
            self._rates_unhinted.append(key)
        held = self._rates[key]
        if held[0] > 0:
            held[0] -= 1
            return
        held[2] += 1   # the n-th refused request of the batch waits for n requests' worth of refill
        raise RateLimitError.bucket(key, rate=rate, burst=burst, wait=(held[2] - held[1]) / rate)

    def revoked(self, token_id: str) -> bool:
        """Whether a service token is revoked (read once per batch)."""
        if token_id not in self._revoked:
            self._revoked[token_id] = self.registry.token_revoked(self.conn, token_id)
        return self._revoked[token_id]

    # -- staged writes ----------------------------------------------------------------------------------
    def erase(self, rows: Sequence[dict], request_id: str) -> None:
        """Stage the erasure of records (`Registry.erase_many`): the content goes, the id stays as a tombstone."""
        for row in rows:
            self._erase.append((dict(row), request_id))
            self._erased_by[row["id"]] = request_id
            if (cached := self._records.get(row["id"])) is not None:
                cached["deleted_in"] = request_id

    def add_ledger_entry(self, receipt: dict) -> dict:
        """Stage the request's signed entry at the end of the ledger's hash chain (`ledger.next_entry`),
        linked to the entry staged before it, or to the stored head (read once per batch); returns
        {seq, prev, entry_hash}. A request rolled back drops its entry, so the next one links to the
        entry before it (no gap)."""
        if self._ledger:
            head = (self._ledger[-1]["seq"], self._ledger[-1]["entry_hash"])
        else:
            if self._ledger_head is _UNREAD:
                self._ledger_head = self.registry.ledger_head(self.conn)
            head = self._ledger_head
        row = ledger.next_entry(head, receipt, signing_key=self.signing_key)
        self._ledger.append(row)
        return {"seq": row["seq"], "prev": row["prev_hash"], "entry_hash": row["entry_hash"]}

    def add_idempotent(self, key: str, fingerprint: str, request_id: str, created_at: str) -> None:
        row = {"key": key, "fingerprint": fingerprint, "request_id": request_id, "created_at": created_at}
        self._keys.append(row)
        self._idempotent[key] = row

    def add_usage(self, requester: str, day: str, items: int) -> None:
        self._usage.append((requester, day, items))

    def flush(self) -> None:
        """Write the staged writes, one statement per kind (before the commit)."""
        reg, conn = self.registry, self.conn
        reg.add_ledger_entries(conn, self._ledger)
        reg.erase_many(conn, self._erase)
        reg.add_idempotent_many(conn, self._keys)
        totals: dict[tuple[str, str], int] = {}
        for requester, day, items in self._usage:
            totals[requester, day] = totals.get((requester, day), 0) + items
        for (requester, day), items in sorted(totals.items()):
            reg.add_usage(conn, requester, day, items)
        reg.add_guard_usage(conn, *self._guard_rows())

    def _guard_rows(self) -> tuple[list[dict], list[dict]]:
        """The staged guard counts summed into rows of the guard's two tables, one per key
        (`Registry.add_guard_usage`)."""
        usage: dict[tuple[str, int, int], list[int]] = {}
        spent: dict[tuple[str, int, int], int] = {}
        for who, bucket, reviewed, records, units, by_shard in self._guard:
            for key in ((who, bucket, int(reviewed)), (ALL_TOKENS, bucket, int(reviewed))):
                row = usage.setdefault(key, [0, 0])
                row[0] += records
                row[1] += units
            if not reviewed:
                for shard, n in by_shard.items():
                    if n > 0:
                        spent[who, shard, bucket] = spent.get((who, shard, bucket), 0) + n
        return ([dict(token_id=w, bucket=b, reviewed=r, records=n, units=u)
                 for (w, b, r), (n, u) in sorted(usage.items())],
                [dict(token_id=w, shard=m, bucket=b, units=u) for (w, m, b), u in sorted(spent.items())])

    # -- savepoints ----------------------------------------------------------------------------------
    def _mark(self) -> tuple[int, ...]:
        return tuple(map(len, self._staged()))

    def _staged(self) -> tuple[list, ...]:
        return (self.erased, self.key_slots, self.receipts, self._ledger, self._erase, self._keys, self._usage,
                self._guard, self._rates_unhinted)

    def _rewind(self, mark: tuple[int, ...]) -> None:
        """Forget what a request rolled back to its savepoint had done (its keys must live on)."""
        for key in self._rates_unhinted[mark[-1]:]:
            self._rates.pop(key, None)
        for items, n in zip(self._staged(), mark):
            del items[n:]
        self._forget()
        ids, keys, tokens = self._hints
        self.prefetch(ids=ids, keys=keys, tokens=tokens)

    def _forget(self) -> None:
        """Drop the cached reads (re-read on demand, with the staged writes laid over them)."""
        self._erased_by = {row["id"]: request_id for row, request_id in self._erase}
        self._records: dict[str, dict | None] = {}
        self._served: tuple[int, list[dict]] | None = None
        self._ledger_head: tuple[int, str] | None | object = _UNREAD   # the stored head (staged entries follow it)
        self._orders: dict[int, list[dict]] = {}
        self._capacity: dict[int, int] | None = None
        self._idempotent: dict[str, dict | None] = {row["key"]: row for row in self._keys}
        self._usage_base: dict[tuple[str, str], int] = {}
        self._windows: dict[tuple[str, int], tuple[dict, dict]] = {}   # (token, since) -> stored guard window
        self._revoked: dict[str, bool] = {}
        self._lineage: dict[str, dict[str, bool]] = {}   # record id -> {artifact: registered}
        self._retired: set[str] = set()                  # retired in this batch
        self._flag_keys: set[str] = set()
        self._keys_checked: set[str] = set()


class TransactionAborted(RuntimeError):
    """A request left the batch's transaction unable to commit (the queue then retries each request alone)."""


class _Savepoint:
    """Each request's savepoint, opened just before its first write (any statement but a SELECT) on the
    batch's connection: most requests write nothing at once (their writes are staged), so they need no
    SAVEPOINT and RELEASE (two round trips each on PostgreSQL). Rolling a request back to a savepoint
    opened at its first write undoes what rolling back to one opened at its start would: reads leave
    nothing to undo."""

    NAME = "s3t_request"

    def __init__(self, conn) -> None:
        self.conn, self.armed, self.open = conn, False, False
        event.listen(conn, "before_cursor_execute", self._before)

    def _before(self, conn, cursor, statement, parameters, context, executemany) -> None:
        if self.armed and not self.open and statement.lstrip()[:6].upper() != "SELECT":
            cursor.execute(f"SAVEPOINT {self.NAME}")
            self.open = True

    def arm(self) -> None:
        """A request starts: its first write opens its savepoint."""
        self.armed, self.open = True, False

    def release(self) -> None:
        self.armed = False
        if self.open:
            self.conn.exec_driver_sql(f"RELEASE SAVEPOINT {self.NAME}")

    def rollback(self) -> bool:
        """Undo the request's writes; False if it wrote nothing (no savepoint was opened)."""
        self.armed = False
        if self.open:
            self.conn.exec_driver_sql(f"ROLLBACK TO SAVEPOINT {self.NAME}")
            self.conn.exec_driver_sql(f"RELEASE SAVEPOINT {self.NAME}")
        return self.open

    def aborted(self) -> bool:
        """Whether the transaction is in a failed state: on PostgreSQL a failed statement, even one the
        request caught, aborts it, and a COMMIT then rolls back without an error (psycopg 3 tells without a
        round trip; SQLite has no such state)."""
        info = getattr(self.conn.connection.driver_connection, "info", None)
        if info is None:
            return False
        from psycopg import pq

        return info.transaction_status == pq.TransactionStatus.INERROR

    def close(self) -> None:
        self.armed = False
        event.remove(self.conn, "before_cursor_execute", self._before)


@dataclass
class _Request:
    work: Callable[[Batch], Any]
    hints: tuple[Sequence[str], Sequence[str], Sequence[str]] = ((), (), ())   # ids, idempotency keys, tokens
    rate: tuple[str, float, int] | None = None   # the registry rate bucket (key, rate, burst) it takes from
    future: Future = field(default_factory=Future)
    outcome: tuple[bool, Any] | None = None   # (ok, result or exception) once run in a transaction


class DeletionQueue:
    """Deletion requests from any number of threads, applied by one writer thread in group commits.

    `erase_derived(ids)`: a context manager entered before the commit (shreds the records' derived copies,
    keeps them from being rewritten until it exits, after the commit). `after_commit(receipts)`: runs
    after the commit and the key destruction, before any request of the batch is answered (shreds the
    retired stages; its failures are logged, never reported as a failed deletion).
    """

    def __init__(self, registry: Registry, key: bytes, *,
                 erase_derived: Callable[[list[str]], AbstractContextManager] = lambda ids: nullcontext(),
                 after_commit: Callable[[list[Receipt]], None] = lambda receipts: None,
                 max_batch: int = MAX_BATCH, max_queued: int | None = None, signing_key=None) -> None:
        self.registry, self._key, self.signing_key = registry, key, signing_key
        self.erase_derived, self.after_commit, self.max_batch = erase_derived, after_commit, max_batch
        self.max_queued = max_queued   # requests waiting for the writer; beyond, BusyError (None: no bound)
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.batches = 0     # transactions committed (for metrics and tests)
        self.applied = 0     # requests they applied

    def submit(self, work: Callable[[Batch], T], *, ids: Sequence[str] = (), keys: Sequence[str] = (),
               tokens: Sequence[str] = (), rate: tuple[str, float, int] | None = None) -> "Future[T]":
        """Queue `work(batch)` for the next group commit; its future resolves once that has committed and
        its keys are destroyed (or with the exception that rolled the request back). `ids`, `keys` and
        `tokens` (record ids, idempotency keys, service tokens the work will look up) are read for the
        whole batch at once (`Batch.prefetch`), and `rate`, the (key, rate, burst) of the registry rate
        bucket the work takes one request from (`Batch.take_rate`), is spent for the whole batch at once
        (`Batch.reserve_rates`); they are hints, never required. BusyError if `max_queued` requests are
        waiting already."""
        request = _Request(work, (ids, keys, tokens), rate)
        with self._lock:
            if self._closed:
                raise RuntimeError("this deletion queue is closed (its S3T was closed)")
            if self.max_queued is not None and self.waiting >= self.max_queued:
                raise BusyError(f"{self.waiting} deletion requests are waiting for the next group commit (at most "
                                f"{self.max_queued} may); retry in 1 s", retry_after=1.0)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="s3t-deletions", daemon=True)
                self._thread.start()
            self._queue.put(request)
        return request.future

    @property
    def waiting(self) -> int:
        """Requests queued and not yet taken by the writer."""
        return self._queue.qsize()

    def close(self, timeout: float = 60.0) -> None:
        """Apply what is queued, then stop the writer thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            self._queue.put(None)
        if thread is not None:
            thread.join(timeout)

    # -- the writer thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:   # whatever else is waiting: no timer, no lingering
                try:
                    request = self._queue.get_nowait()
                except queue.Empty:
                    break
                if request is None:
                    stop = True
                    break
                batch.append(request)
            try:
                self._commit(batch)
            except BaseException as exc:   # the writer must survive anything: answer the batch and go on
                log.exception("a deletion batch failed outside its transaction")
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(exc)
            if stop:
                return

    def _commit(self, requests: list[_Request]) -> None:
        try:
            receipts, slots = self._transaction(requests)
        except Exception as exc:
            if len(requests) == 1:
                requests[0].future.set_exception(exc)
                return
            # The commit failed (not one request's work: those roll back alone). Retry each request in a
            # transaction of its own, so a failure that one of them causes fails that one alone.
            log.warning("a group commit of %d deletion requests failed (%s); applying them one by one",
                        len(requests), exc)
            for r in requests:
                self._commit([r])
            return
        self._finish(receipts, slots)
        for r in requests:
            ok, value = r.outcome
            r.future.set_result(value) if ok else r.future.set_exception(value)

    def _transaction(self, requests: list[_Request]) -> tuple[list[Receipt], list[int]]:
        """Run every request's work in one transaction, each in a savepoint; commit."""
        until_committed = ExitStack()
        try:
            with self.registry.transaction() as conn:
                batch = self._run_requests(conn, requests, until_committed)
        except BaseException:
            until_committed.close()   # rolled back: the derived copies may be rewritten again
            raise
        try:   # committed: from here on nothing may report the batch as failed, nor retry it
            until_committed.close()
        except Exception:
            log.exception("releasing the cache lock after a group commit failed")
        self.batches += 1
        self.applied += sum(ok for ok, _ in (r.outcome for r in requests))
        return batch.receipts, batch.key_slots

    def _run_requests(self, conn, requests: list[_Request], until_committed: ExitStack) -> Batch:
        """Each request's work in its own savepoint, then the staged writes; holds the cache lock (entered
        on `until_committed`) from the shredding of derived copies until after the commit."""
        batch = Batch(self.registry, conn, self._key, signing_key=self.signing_key)
        batch.prefetch(ids=[i for r in requests for i in r.hints[0]],
                       keys=[k for r in requests for k in r.hints[1]],
                       tokens=[t for r in requests for t in r.hints[2]])
        batch.reserve_rates([r.rate for r in requests if r.rate is not None])
        savepoint = _Savepoint(conn)
        try:
            for r in requests:
                mark = batch._mark()
                savepoint.arm()
                try:
                    r.outcome = (True, r.work(batch))
                except Exception as exc:   # rolled back to its savepoint: the others go on
                    wrote = savepoint.rollback()
                    if not wrote and (isinstance(exc, DBAPIError) or savepoint.aborted()):
                        # A statement failed with no savepoint to return to: on PostgreSQL the transaction
                        # is aborted. Fail the batch; `_commit` retries each request alone.
                        raise
                    if wrote or batch._mark() != mark:   # refused before it changed anything (a quota, a
                        batch._rewind(mark)              # rate limit): the batch's reads are still true
                    r.outcome = (False, exc)
                else:
                    if savepoint.aborted():   # it caught a failed statement: nothing after it would commit
                        raise TransactionAborted("a deletion request caught a failed statement of its own, "
                                                 "which aborted the transaction")
                    savepoint.release()
        finally:
            savepoint.close()
        batch.flush()
        # Shred derived copies before the commit, and hold them off until it is done (module docstring).
        if batch.erased:
            until_committed.enter_context(self.erase_derived(list(dict.fromkeys(batch.erased))))
        return batch

    def _finish(self, receipts: list[Receipt], slots: list[int]) -> None:
        """After the commit, before any answer: destroy the keys, then shred the retired stages."""
        self.registry.keys.destroy(slots)   # if this raises, nobody is told "deleted" (open finishes it)
        if any(r.retired_artifacts for r in receipts):
            try:
                self.after_commit(receipts)
            except Exception as exc:   # applied: a failed shred must not report the deletion as failed
                log.warning("retired stages stay queued for shredding (the next open, sweep or restore "
                            "retries): %s", exc)
