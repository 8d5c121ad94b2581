"""Group commit (s3t.batch): concurrent deletion requests in one transaction, each with its own receipt,
ledger entry and idempotency key; a failing request fails alone; keys are destroyed before any answer.

The writer is held busy by a first request that waits on an event, so the requests sent meanwhile are
queued and must all go into the next transaction: the tests count transactions, not time.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest
from sqlalchemy import event, func, insert, select

import s3t
from s3t.registry import idempotency, ledger, lineage, rate_buckets

pytestmark = pytest.mark.both_databases


def cells(system) -> dict[tuple[int, int], list[str]]:
    out: dict[tuple[int, int], list[str]] = {}
    for shard in range(system.plan.num_shards):
        for sl, ids in system.registry.live_members(shard).items():
            out[shard, sl] = list(ids)
    return out


class Held:
    """Keeps the deletion queue's writer inside a first request until `release()`: what is submitted
    meanwhile waits in the queue and goes into one later transaction."""

    def __init__(self, system) -> None:
        self.system, self.entered, self.go = system, threading.Event(), threading.Event()
        self.batches = system.deletions.batches + 1   # once the held request's own transaction has committed

        def wait(batch):
            self.entered.set()
            assert self.go.wait(60), "the test never released the writer"
            return "held"

        self.future = system.deletions.submit(wait)
        assert self.entered.wait(60)

    def release(self) -> None:
        self.go.set()
        assert self.future.result(60) == "held"


def submit(system, **request) -> Future:
    return system.deletions.submit(lambda batch: batch.delete(**request))


def test_queued_requests_share_one_transaction_with_a_receipt_each(trained, tiny_data):
    by_cell = cells(trained)
    victims = [by_cell[0, 0][0], by_cell[0, 0][1], by_cell[1, 1][0], by_cell[0, 0][0]]   # the last one repeats
    held = Held(trained)
    futures = [submit(trained, ids=[v], idempotency_key=f"k{i}", requested_by="tok") for i, v in enumerate(victims)]
    futures.append(submit(trained, ids=[victims[1]], idempotency_key="k1"))   # a retry of k1 in the same batch
    assert not any(f.done() for f in futures)
    held.release()
    receipts = [f.result(60) for f in futures]
    assert trained.deletions.batches == held.batches + 1, "the queued requests went into one transaction"

    first, second, third, repeat, retry = receipts
    assert (first.deleted, second.deleted, third.deleted) == ((victims[0],), (victims[1],), (victims[2],))
    assert repeat.deleted == () and repeat.already_deleted == (victims[0],), "sees the request before it"
    assert retry == second, "a key seen earlier in the same batch replays its receipt"
    assert len({r.request_id for r in receipts[:4]}) == 4
    assert [r.created_at for r in receipts[:4]] == sorted(r.created_at for r in receipts[:4])
    versions = [r.served_version for r in receipts[:4]]
    assert versions == sorted(versions) and versions[0] > 0
    assert {r.request_id for r in trained.receipts()} == {r.request_id for r in receipts[:4]}
    with trained.registry.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(idempotency)).scalar() == 4
        assert conn.execute(select(func.count()).select_from(ledger)).scalar() == 4
    assert trained.registry.usage("tok", receipts[0].created_at[:10]) == 4, "each request counts its own items"
    # Acknowledged means done: every deleted record's key was destroyed before the futures resolved.
    slots = trained.registry.key_slots(list(victims[:3]))
    assert set(trained.registry.keys.keys(slots.values()).values()) == {None}


def test_batched_deletions_serve_exactly_what_one_by_one_deletions_serve(trained, trained_dir, tmp_path):
    from conftest import copy_run

    alone = s3t.S3T.open(copy_run(trained_dir, tmp_path / "alone"))
    try:
        by_cell = cells(trained)
        victims = [by_cell[0, 1][0], by_cell[1, 0][0], by_cell[1, 0][1], by_cell[0, 1][1]]
        held = Held(trained)
        futures = [submit(trained, ids=[v]) for v in victims]
        held.release()
        batched = [f.result(60) for f in futures]
        sequential = [alone.delete(ids=[v]) for v in victims]
        keep = ("deleted", "already_deleted", "shards", "served_version", "served_artifacts", "retired_artifacts")
        assert [{k: getattr(r, k) for k in keep} for r in batched] == \
               [{k: getattr(r, k) for k in keep} for r in sequential]
        assert trained.served() == alone.served()
        assert trained.status() == alone.status()
    finally:
        alone.close()


def test_a_request_that_fails_in_the_batch_fails_alone(trained, tiny_data):
    by_cell = cells(trained)
    good, forged, later, conflicted = by_cell[1, 0][0], by_cell[1, 0][1], by_cell[1, 1][0], by_cell[1, 1][1]
    trained.delete(ids=[conflicted], idempotency_key="used")
    # Forge the lineage: a served artifact of shard 0 (which no request here touches) "saw" `forged`, a
    # shard-1 record: its request's lineage check must fail.
    _, components = trained.served()
    other = next(c for c in components if c["shard"] == 0)
    with trained.registry.transaction() as conn:
        conn.execute(insert(lineage).values(artifact=other["artifacts"][0], record_id=forged))
    held = Held(trained)
    futures = [submit(trained, ids=[good]), submit(trained, ids=[good, "x"], idempotency_key="used"),
               submit(trained, ids=[forged]), submit(trained, ids=[later])]
    held.release()
    assert futures[0].result(60).deleted == (good,)
    with pytest.raises(s3t.ConflictError, match="'used' was used for a different request"):
        futures[1].result(60)
    with pytest.raises(s3t.IntegrityError, match="saw deleted ids"):
        futures[2].result(60)
    assert futures[3].result(60).deleted == (later,)
    assert trained.deletions.batches == held.batches + 1
    located = trained.registry.locate([good, forged, later])
    assert (located[good][2], located[forged][2], located[later][2]) == (True, False, True)
    # The rolled-back request's record keeps its content and its key.
    slot = trained.registry.key_slots([forged])[forged]
    assert trained.registry.keys.keys([slot])[slot] is not None
    shard, _ = trained.locate([forged])[forged]
    assert forged in trained.registry.live_shard(shard)[1]


def test_a_failed_commit_is_retried_request_by_request(trained, tiny_data, monkeypatch):
    """The batch fails as a whole for one request's sake (here: its cached state cannot be shredded); the
    queue applies each request alone, so only that one fails."""
    import s3t.cache

    by_cell = cells(trained)
    cursed, fine = by_cell[0, 0][0], [by_cell[0, 1][0], by_cell[1, 1][0]]
    erase = s3t.cache.erase_records

    def refuse(run_dir, record_ids):
        if cursed in record_ids:
            raise OSError(5, "Input/output error")
        erase(run_dir, record_ids)

    monkeypatch.setattr(s3t.cache, "erase_records", refuse)
    held = Held(trained)
    futures = [submit(trained, ids=[fine[0]]), submit(trained, ids=[cursed]), submit(trained, ids=[fine[1]])]
    held.release()
    assert futures[0].result(60).deleted == (fine[0],) and futures[2].result(60).deleted == (fine[1],)
    with pytest.raises(OSError):
        futures[1].result(60)
    located = trained.registry.locate([cursed, *fine])
    assert not located[cursed][2] and all(located[i][2] for i in fine)
    assert len(trained.receipts()) == 2


def test_concurrent_library_callers_batch_and_each_get_their_receipt(trained, tiny_data):
    """`S3T.delete` from many threads: every call returns its own receipt; the ledger has one each."""
    ids = [r.id for r in tiny_data][:24]
    held = Held(trained)
    results: dict[str, s3t.Receipt] = {}

    def call(rid: str) -> None:
        results[rid] = trained.delete(ids=[rid])

    threads = [threading.Thread(target=call, args=(rid,)) for rid in ids]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while trained.deletions._queue.qsize() < len(ids):   # every call is queued behind the held writer
        assert time.monotonic() < deadline, "the callers did not queue"
        time.sleep(0.01)
    held.release()
    for t in threads:
        t.join(120)
    assert sorted(results) == sorted(ids) and all(results[i].deleted == (i,) for i in ids)
    assert trained.deletions.batches == held.batches + 1
    assert len(trained.receipts()) == len(ids)


def test_a_batch_appends_one_signed_entry_per_request_in_order_and_a_rolled_back_one_leaves_no_gap(trained):
    """The ledger's hash chain through a group commit: each applied request its own signed entry, in
    request order; the request rolled back to its savepoint (a failed lineage check) leaves no entry and
    no gap; the chain verifies against the run's public key."""
    from s3t import ledger

    by_cell = cells(trained)
    good, forged, later = by_cell[1, 0][0], by_cell[1, 0][1], by_cell[1, 1][0]
    _, components = trained.served()
    other = next(c for c in components if c["shard"] == 0)   # shard 0: untouched, stays served
    with trained.registry.transaction() as conn:
        conn.execute(insert(lineage).values(artifact=other["artifacts"][0], record_id=forged))
    before = trained.registry.ledger_entries()
    held = Held(trained)
    futures = [submit(trained, ids=[good]), submit(trained, ids=[forged]), submit(trained, ids=[later])]
    held.release()
    first, last = futures[0].result(60), futures[2].result(60)
    with pytest.raises(s3t.IntegrityError):
        futures[1].result(60)
    assert trained.deletions.batches == held.batches + 1
    rows = trained.registry.ledger_entries()
    new = rows[len(before):]
    assert [r["request_id"] for r in new] == [first.request_id, last.request_id]
    assert [r["seq"] for r in new] == [len(before) + 1, len(before) + 2], "no gap where the failed one was"
    assert new[1]["prev_hash"] == new[0]["entry_hash"]
    assert all(r["signature"] and r["kind"] == "deletion" for r in new)
    assert [r["receipt"]["deleted"] for r in new] == [[good], [later]]
    with trained.registry.engine.connect() as conn:
        head = trained.registry.ledger_recorded_head(conn)
    public = ledger.load_public_key(trained.public_key())
    assert ledger.verify_chain(rows, public, head=head) == []
    assert head == (new[-1]["seq"], new[-1]["entry_hash"])


def test_a_request_that_fails_after_its_ledger_entry_was_staged_leaves_no_entry_and_no_key(trained):
    """The entry, erasure and idempotency key of a request are staged in the batch, written at its flush:
    a request that fails after `delete` returned (here: its own code raises) drops all three, the next
    request's entry links to the entry before it, and its key stays free for a new request."""
    from s3t import ledger

    by_cell = cells(trained)
    first, doomed, last = by_cell[1, 0][0], by_cell[1, 0][1], by_cell[1, 1][0]
    before = trained.registry.ledger_entries()

    def fails_late(batch):
        batch.delete(ids=[doomed], idempotency_key="late")
        raise RuntimeError("the caller failed after the deletion was applied in the batch")

    held = Held(trained)
    futures = [submit(trained, ids=[first]), trained.deletions.submit(fails_late),
               submit(trained, ids=[last], idempotency_key="late")]
    held.release()
    a, b = futures[0].result(60), futures[2].result(60)
    with pytest.raises(RuntimeError, match="failed after"):
        futures[1].result(60)
    assert trained.deletions.batches == held.batches + 1
    assert b.deleted == (last,), "the key of the rolled-back request was free: a new request, not a replay"
    rows = trained.registry.ledger_entries()[len(before):]
    assert [r["request_id"] for r in rows] == [a.request_id, b.request_id]
    assert [r["seq"] for r in rows] == [len(before) + 1, len(before) + 2]
    assert rows[1]["prev_hash"] == rows[0]["entry_hash"]
    with trained.registry.engine.connect() as conn:
        head = trained.registry.ledger_recorded_head(conn)
        keys = conn.execute(select(idempotency.c.key, idempotency.c.request_id)).all()
    assert ledger.verify_chain(trained.registry.ledger_entries(), ledger.load_public_key(trained.public_key()),
                               head=head) == []
    assert [tuple(k) for k in keys if k[0] == "late"] == [("late", b.request_id)]
    located = trained.registry.locate([doomed])
    assert not located[doomed][2], "the rolled-back request's record is live"
    slot = trained.registry.key_slots([doomed])[doomed]
    assert trained.registry.keys.keys([slot])[slot] is not None


def test_a_request_that_wrote_at_once_and_then_failed_rolls_its_writes_back(trained):
    """A request's immediate writes (a truncated order's depth, a new served set, retired stages: the first
    deletion to hit a cell makes all three) are undone when it fails later, by the savepoint its first
    write opened; the request after it in the batch finds the registry as it was."""
    by_cell = cells(trained)
    doomed, other = by_cell[0, 1][0], by_cell[1, 0][0]
    served, orders, registered = trained.served(), trained.registry.orders(), trained.registry.artifact_lineages()

    def fails_late(batch):
        receipt = batch.delete(ids=[doomed])
        assert receipt.retired_artifacts and receipt.served_version == served[0] + 1   # it did write
        raise RuntimeError("the caller failed after its deletion was applied in the batch")

    held = Held(trained)
    futures = [trained.deletions.submit(fails_late), submit(trained, ids=[other])]
    held.release()
    with pytest.raises(RuntimeError, match="failed after"):
        futures[0].result(60)
    after = futures[1].result(60)
    assert trained.deletions.batches == held.batches + 1
    assert after.served_version == served[0] + 1, "the failed request's served set was rolled back"
    assert trained.registry.artifact_lineages() == registered - set(after.retired_artifacts)
    shard0 = [o for o in trained.registry.orders() if o["shard"] == 0]
    assert shard0 == [o for o in orders if o["shard"] == 0], "shard 0's depths are as they were"
    assert not trained.registry.locate([doomed])[doomed][2]


def test_a_request_whose_read_fails_in_the_database_fails_alone(trained):
    """A failed statement before any write (no savepoint open yet) aborts a PostgreSQL transaction: the
    batch is retried request by request, so it still fails alone and the others are applied."""
    by_cell = cells(trained)
    first, last = by_cell[1, 0][0], by_cell[1, 1][0]

    def bad_read(batch):
        batch.conn.exec_driver_sql("SELECT no_such_column FROM records")

    held = Held(trained)
    futures = [submit(trained, ids=[first]), trained.deletions.submit(bad_read), submit(trained, ids=[last])]
    held.release()
    assert futures[0].result(60).deleted == (first,) and futures[2].result(60).deleted == (last,)
    with pytest.raises(Exception, match="no_such_column"):
        futures[1].result(60)
    located = trained.registry.locate([first, last])
    assert located[first][2] and located[last][2]
    assert len(trained.receipts()) == 2


class MaskedError(Exception):
    """What a request's own code may turn a database error into."""


@pytest.mark.parametrize("masking", ["re-raised as another exception", "caught and swallowed"])
def test_a_request_that_hides_a_failed_statement_cannot_get_the_batch_acknowledged_unwritten(trained, masking):
    """On PostgreSQL a failed statement aborts the transaction even when the request catches it, and a
    COMMIT then rolls back without an error: every acknowledgement in the batch would be a lie. The batch
    must notice, and be retried request by request: the honest request is applied, durably."""
    from sqlalchemy.exc import DBAPIError

    def writes_at_once(batch):   # like a review's rejection: immediate writes, nothing staged for the flush
        batch.registry.set_meta(batch.conn, "test.honest", "written")
        return "written"

    def hides_a_failure(batch):
        try:
            batch.conn.exec_driver_sql("SELECT no_such_column FROM records")
        except DBAPIError as exc:
            if masking.startswith("re-raised"):
                raise MaskedError("lookup failed") from exc
        return "pretends all went well"

    held = Held(trained)
    honest, hiding = trained.deletions.submit(writes_at_once), trained.deletions.submit(hides_a_failure)
    held.release()
    assert honest.result(60) == "written"
    try:
        hiding.result(60)   # alone on SQLite (no aborted state) it may succeed; it must not take the batch down
    except Exception:
        pass
    assert trained.registry.get_meta("test.honest") == "written", "acknowledged but not committed"


def test_a_batch_retried_after_a_read_error_leaves_no_live_key_behind(trained):
    """The first attempt allocated a key for a held request's content, then rolled back: that key seals
    nothing that was committed and must not stay live (the audit's erasure check would flag it)."""
    from s3t.service import review

    victim = cells(trained)[0, 0][0]

    def bad_read(batch):
        batch.conn.exec_driver_sql("SELECT no_such_column FROM records")

    held = Held(trained)
    hold = trained.deletions.submit(lambda b: review.hold(trained, b, token_id=None, ids=[victim], subjects=[],
                                                          reference=None, reason="test"))
    failing = trained.deletions.submit(bad_read)
    held.release()
    hold.result(60)
    with pytest.raises(Exception, match="no_such_column"):
        failing.result(60)
    assert trained.audit().check("erasure").failures == ()


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)   # shared rate buckets are PostgreSQL's
def test_a_batch_spends_a_shared_rate_bucket_once_and_hands_it_out_request_by_request(trained):
    """Six requests of one bucket (burst 4) in one group commit: one statement reserves the bucket's four,
    the first four take them, a failing one spends its own too, and the rest are refused with growing waits."""
    bucket = ("token t", 0.01, 4)
    statements: list[str] = []

    def work(fail: bool = False):
        def run(batch):
            batch.take_rate(bucket[0], rate=bucket[1], burst=bucket[2])
            if fail:
                raise ValueError("fails after taking its request")
            return "ok"
        return run

    held = Held(trained)

    def count(conn, cursor, statement, *args):
        if "rate_buckets" in statement:
            statements.append(statement)

    event.listen(trained.registry.engine, "before_cursor_execute", count)
    try:
        futures = [trained.deletions.submit(work(fail=(k == 1)), rate=bucket) for k in range(6)]
        held.release()
        outcomes = []
        for f in futures:
            try:
                outcomes.append(f.result(60))
            except Exception as exc:   # noqa: BLE001 - the test sorts them below
                outcomes.append(exc)
    finally:
        event.remove(trained.registry.engine, "before_cursor_execute", count)
    assert trained.deletions.batches == held.batches + 1, "one transaction"
    assert len(statements) == 1, "the bucket is spent once for the whole batch"
    assert outcomes[0] == outcomes[2] == outcomes[3] == "ok"
    assert isinstance(outcomes[1], ValueError), "a request that fails after taking still spent its share"
    refused = outcomes[4:]
    assert all(isinstance(e, s3t.RateLimitError) for e in refused), refused
    assert 0 < refused[0].retry_after < refused[1].retry_after, "the later refusal waits longer"
    with trained.registry.engine.connect() as conn:
        left = conn.execute(select(rate_buckets.c.tokens).where(rate_buckets.c.key == "token t")).scalar()
    assert 0 <= left < 1, "the bucket kept what the batch spent"
    # The next batch finds it empty too (0.01 requests/s: nothing refilled yet).
    with pytest.raises(s3t.RateLimitError):
        trained.deletions.submit(work(), rate=bucket).result(60)


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_a_restore_leaves_fresh_planner_statistics_for_the_lineage_lookup(trained):
    """A batch's lineage lookup scanned the whole lineage table on PostgreSQL (15 ms per batch at 200,000
    rows) until autovacuum came round, because nothing had analyzed the table training had just filled."""
    def analyzed() -> set[str]:
        with trained.registry.engine.connect() as conn:
            return set(conn.exec_driver_sql(
                "SELECT relname FROM pg_stat_user_tables WHERE schemaname = current_schema() "
                "AND last_analyze IS NOT NULL").scalars())

    assert "lineage" not in analyzed(), "the copied schema starts without statistics"
    trained.delete(ids=[cells(trained)[0, 0][0]])
    assert trained.restore(progress=False) > 0
    assert {"records", "lineage", "artifacts"} <= analyzed()


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_a_bucket_updated_after_the_clock_reading_of_a_take_is_not_emptied_by_it(trained):
    """A take whose clock reads earlier than the bucket's last update (it waited for the row lock of a
    group commit that updated the bucket later, or the server's clock stepped back) refills nothing: it
    must not subtract. At 10^6 requests/s one microsecond backwards would empty a bucket of 40."""
    reg = trained.registry
    with reg.transaction() as conn:
        conn.execute(insert(rate_buckets), [dict(key=key, tokens=3.0, at=time.time() + 100.0, granted=1)
                                            for key in ("token c", "token d")])
    assert reg.take_rate("token c", rate=1e6, burst=40) == (1, 2.0), "alone"
    with reg.transaction() as conn:
        assert reg.take_rate("token d", rate=1e6, burst=40, n=5, conn=conn) == (3, 0.0), "for a batch"


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_registry_connections_keep_no_generic_plan_made_while_a_table_was_small(trained):
    """psycopg prepares a statement run 5 times, and PostgreSQL then may keep a generic plan: one made
    while the idempotency table was nearly empty kept scanning it whole for every group commit's key
    lookup as it grew. The registry's connections prepare nothing, so each lookup is planned for its values."""
    reg = trained.registry
    with reg.engine.connect() as conn:
        for k in range(10):
            reg.idempotent_many(conn, [f"key-{k}", "another"])
        assert conn.exec_driver_sql("SELECT count(*) FROM pg_prepared_statements").scalar() == 0


def test_requests_refused_before_they_change_anything_cost_the_batch_no_re_reads(trained):
    """A request refused before it stages or writes anything (a quota, a rate limit) leaves the batch's reads
    true: they are not read again. (Each refusal re-read every hinted record and its lineage: 64 refused
    requests of 1,000 ids each held the writer, and every replica's deletions, for 30 s.)"""
    by_cell = cells(trained)
    ids = [i for ids in by_cell.values() for i in ids][:6]
    statements: list[str] = []

    def refuse(batch):
        batch.find_records(ids=ids)   # reads, as the checks before a refusal do
        raise s3t.RateLimitError("refused", retry_after=1.0)

    def record(conn, cursor, statement, *args):
        statements.append(statement)

    held = Held(trained)
    event.listen(trained.registry.engine, "before_cursor_execute", record)
    try:
        futures = [trained.deletions.submit(refuse, ids=ids) for _ in range(20)]
        futures.append(trained.deletions.submit(lambda batch: batch.delete(ids=ids[:1]), ids=ids[:1]))
        held.release()
        for f in futures[:-1]:
            with pytest.raises(s3t.RateLimitError):
                f.result(60)
        assert futures[-1].result(60).deleted == (ids[0],)
    finally:
        event.remove(trained.registry.engine, "before_cursor_execute", record)
    reads = [st for st in statements if st.lstrip().upper().startswith("SELECT") and "FROM records" in st]
    assert len(reads) <= 2, f"{len(reads)} reads of the records for one batch"
