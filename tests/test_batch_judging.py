"""A request in a group commit is judged as if it were alone, and nothing is acknowledged before its batch
is durable (s3t.batch with the service's checks, in process: no HTTP).

Every test queues its requests behind a writer held busy (`Held`), so they share one transaction, and
compares with what the same requests get one by one, or checks the order of commit, key destruction
and answer. SQLite only, except the durability test, which also runs on PostgreSQL (its commit and
settings are the database's own).
"""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import create_engine, event, func, insert, select

import s3t
from conftest import copy_run
from s3t.registry import ledger, lineage
from s3t.service.auth import authenticate, create_token
from s3t.service.core import Service
from s3t.service.settings import GuardPolicy, ServiceSettings
from test_batch import Held, cells, submit


def service_for(run_dir, **settings) -> Service:
    return Service(run_dir, ServiceSettings(worker=False, preload=False, **settings))


def token(service: Service, name: str, *roles: str, quota: int | None = None):
    _, secret = create_token(service.system.registry, name=name, roles=roles or ("delete",), daily_quota=quota)
    return authenticate(service.system.registry, f"Bearer {secret}")


def outcomes(futures) -> list[str]:
    out = []
    for f in futures:
        exc = f.exception(60)
        out.append(type(exc).__name__ if exc is not None else f.result().outcome)
    return out


def test_the_guard_judges_each_request_of_a_batch_with_the_ones_ahead_of_it_counted(trained_dir, tmp_path):
    """The ensemble budget (test_service_abuse's scenario): one token, then one cell per token (Sybils).
    Batched, the third and fourth requests are held exactly as they are one by one."""
    run_dir = copy_run(trained_dir, tmp_path / "run")
    by = cells_of(run_dir)
    targets = [by[cell][0] for cell in [(0, 0), (1, 0), (0, 1), (1, 1)]]
    for sybils in (False, True):
        service = service_for(copy_run(run_dir, tmp_path / f"copy-{sybils}"),
                              guard=GuardPolicy(protect_last_order=False))
        try:
            who = [token(service, f"t{k}") for k in range(4)]
            who = who if sybils else [who[0]] * 4
            held = Held(service.system)
            futures = [service.submit_delete(who[k], ids=[targets[k]]) for k in range(4)]
            held.release()
            assert outcomes(futures) == ["applied", "applied", "held", "held"]
            assert service.system.deletions.batches == held.batches + 1
            reason = futures[2].result().flag.reason
            assert ("all tokens together" if sybils else f"token {who[0].id}") in reason, reason
        finally:
            service.close()


def test_the_per_shard_ratio_counts_what_the_requests_ahead_in_the_batch_consumed(trained_dir, tmp_path):
    """Aimed at shard 0's first slices (the per-shard ratio's scenario; the budgets out of the way): the
    second request is held because of the first, batched exactly as one by one; shard 1 is not."""
    run_dir = copy_run(trained_dir, tmp_path / "run")
    by = cells_of(run_dir)
    targets = [by[0, 0][0], by[0, 1][0], by[1, 0][0]]
    policy = GuardPolicy(protect_last_order=False, token_share=1.0, total_share=1.0, min_spent=2, max_ratio=1.5)
    got = {}
    for batched in (False, True):
        service = service_for(copy_run(run_dir, tmp_path / f"copy-{batched}"), guard=policy)
        try:
            who = token(service, "aimer")
            if batched:
                held = Held(service.system)
                futures = [service.submit_delete(who, ids=[t]) for t in targets]
                held.release()
            else:   # each answered before the next is sent: a transaction each
                futures = []
                for t in targets:
                    futures.append(service.submit_delete(who, ids=[t]))
                    futures[-1].exception(60)
            got[batched] = outcomes(futures)
            if batched:
                assert service.system.deletions.batches == held.batches + 1, "one transaction for the three"
            assert "shard 0" in futures[1].result().flag.reason
        finally:
            service.close()
    assert got[True] == got[False] == ["applied", "held", "applied"]


def test_a_subject_request_reads_its_records_lineage_once_not_once_per_record(trained_dir, tmp_path, tiny_data):
    """A subject's records are found in the request (not prefetched by id); the guard's preview and the
    deletion then ask which stages saw them: one lineage read for all of them, under the write lock."""
    service = service_for(copy_run(trained_dir, tmp_path / "run"),
                          guard=GuardPolicy(action="alert", protect_last_order=False))
    lineage_reads = []

    def count(conn, cursor, statement, parameters, context, executemany) -> None:
        if "FROM lineage" in statement:
            lineage_reads.append(statement)

    subject = tiny_data[0].subject
    try:
        event.listen(service.system.registry.engine, "before_cursor_execute", count)
        receipt = service.delete(token(service, "eraser"), subjects=[subject]).receipt
    finally:
        event.remove(service.system.registry.engine, "before_cursor_execute", count)
        service.close()
    assert len(receipt.deleted) == sum(r.subject == subject for r in tiny_data) > 1
    assert len(lineage_reads) == 1, lineage_reads


def test_a_quota_counts_the_requests_ahead_in_the_batch_but_not_one_rolled_back(trained_dir, tmp_path):
    service = service_for(copy_run(trained_dir, tmp_path / "run"), guard=GuardPolicy(action="off"))
    try:
        by = cells_of(service.system.run_dir)
        tok = token(service, "q", quota=4)
        # Forge the lineage: a served artifact of shard 0 "saw" a shard-1 record, so the request naming it
        # fails its lineage check (after its quota was counted) and rolls back to its savepoint.
        forged = by[1, 1][0]
        _, components = service.system.served()
        artifact = next(c for c in components if c["shard"] == 0)["artifacts"][0]
        with service.system.registry.transaction() as conn:
            conn.execute(insert(lineage).values(artifact=artifact, record_id=forged))
        held = Held(service.system)
        # (Shard 0 is left alone, so that artifact stays served.)
        futures = [service.submit_delete(tok, ids=[by[1, 0][0], by[1, 0][1]]),      # 2 of 4
                   service.submit_delete(tok, ids=[forged, by[1, 1][1]]),            # fails: not counted
                   service.submit_delete(tok, ids=[by[1, 0][2], by[1, 1][2]]),       # 4 of 4
                   service.submit_delete(tok, ids=[by[1, 0][3]])]                    # 5 > 4: refused
        held.release()
        assert outcomes(futures) == ["applied", "IntegrityError", "applied", "RateLimitError"]
        assert "has used 4 of its 4 deletion items" in str(futures[3].exception())
        day = futures[0].result().receipt.created_at[:10]
        assert service.system.registry.usage(tok.id, day) == 4
        assert service.system.deletions.batches == held.batches + 1
    finally:
        service.close()


def test_a_key_held_earlier_in_the_batch_replays_the_hold(trained_dir, tmp_path):
    """The second request under an idempotency key finds the first one's hold, made in the same
    transaction: one hold, counted once, both answered with it."""
    service = service_for(copy_run(trained_dir, tmp_path / "run"))   # protect_last_order: holds this one
    try:
        by = cells_of(service.system.run_dir)
        tok = token(service, "k", quota=100)
        wipe = [by[0, 0][0], by[0, 1][0]]   # every order of shard 0 loses its first slice
        held = Held(service.system)
        futures = [service.submit_delete(tok, ids=wipe, idempotency_key="same") for _ in range(2)]
        futures.append(service.submit_delete(tok, ids=[wipe[0]], idempotency_key="same"))   # another request
        held.release()
        assert outcomes(futures) == ["held", "held", "ConflictError"]
        first, again = futures[0].result(), futures[1].result()
        assert again.replayed and not first.replayed and again.flag.id == first.flag.id
        assert "'same'" in str(futures[2].exception())
        assert service.system.registry.count_flagged(status="pending") == 1
        assert service.system.registry.usage(tok.id, first.flag.created_at[:10]) == 2
    finally:
        service.close()


def test_a_token_revoked_after_it_was_authenticated_is_refused_in_the_batch(trained_dir, tmp_path):
    """The deletion route takes tokens from a cache (no registry read per request): the group commit
    re-checks revocation in its transaction."""
    from s3t.service.auth import revoke_token

    service = service_for(copy_run(trained_dir, tmp_path / "run"), guard=GuardPolicy(action="off"))
    try:
        by = cells_of(service.system.run_dir)
        tok, other = token(service, "r"), token(service, "o")
        revoke_token(service.system.registry, tok.id)
        held = Held(service.system)
        futures = [service.submit_delete(tok, ids=[by[0, 0][0]]), service.submit_delete(other, ids=[by[0, 0][1]])]
        held.release()
        assert outcomes(futures) == ["AuthError", "applied"]
        assert "was revoked" in str(futures[0].exception())
        located = service.system.registry.locate([by[0, 0][0], by[0, 0][1]])
        assert (located[by[0, 0][0]][2], located[by[0, 0][1]][2]) == (False, True)
    finally:
        service.close()


def test_a_failed_commit_acknowledges_nothing(trained, monkeypatch):
    """The staged erasure write fails for every batch and every retry (after each request appended its
    ledger entry): no request is answered with a receipt, no record is erased, no key destroyed, and the
    ledger entries went with the rolled-back transaction."""
    by = cells(trained)
    victims = [by[0, 0][0], by[0, 1][0], by[1, 0][0]]
    slots = trained.registry.key_slots(victims)
    destroyed: list[int] = []
    real_destroy = trained.registry.keys.destroy
    monkeypatch.setattr(trained.registry.keys, "destroy", lambda s: (destroyed.extend(s), real_destroy(s))[1])

    def broken(conn, erased):
        if erased:
            raise OSError(28, "No space left on device")
    monkeypatch.setattr(trained.registry, "erase_many", broken)
    entries = len(trained.registry.ledger_entries())
    held = Held(trained)
    futures = [submit(trained, ids=[v]) for v in victims]
    held.release()
    for f in futures:
        with pytest.raises(OSError, match="No space left"):
            f.result(60)
    assert not set(destroyed) & set(slots.values())
    assert all(v is not None for v in trained.registry.keys.keys(slots.values()).values())
    assert not any(deleted for _s, _sl, deleted in trained.registry.locate(victims).values())
    with trained.registry.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(ledger)).scalar() == entries == 0


@pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)
def test_keys_are_destroyed_after_the_durable_commit_and_answers_come_after_both(trained, database, monkeypatch):
    """Order of a group commit: the commit (durable: SQLite synchronous=FULL, PostgreSQL
    synchronous_commit=on), then the keys destroyed (fsynced), then the answers; never another order."""
    with trained.registry.engine.connect() as conn:
        if database.postgres:
            assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"
            assert conn.exec_driver_sql("SHOW fsync").scalar() == "on"
        else:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2   # FULL
    by = cells(trained)
    victims = [by[0, 0][0], by[1, 1][0]]
    seen: dict[str, object] = {}
    go = threading.Event()
    real_destroy = trained.registry.keys.destroy
    observer = create_engine(trained.registry.url, connect_args=(
        {"options": f"-csearch_path={trained.registry.schema}"} if database.postgres else {}))

    def destroy(slots):
        slots = list(slots)
        if slots and "committed" not in seen:
            with observer.connect() as conn:   # another connection: sees only what is committed
                seen["committed"] = conn.execute(select(func.count()).select_from(ledger)).scalar()
            seen["answered_before"] = [f.done() for f in futures]
            assert go.wait(60)
        return real_destroy(slots)

    monkeypatch.setattr(trained.registry.keys, "destroy", destroy)
    held = Held(trained)
    futures = [submit(trained, ids=[v]) for v in victims]
    held.release()
    waiter = threading.Timer(0.5, go.set)
    waiter.start()
    receipts = [f.result(60) for f in futures]
    observer.dispose()
    assert seen["committed"] == 2, "the keys were destroyed before the batch's commit"
    assert seen["answered_before"] == [False, False], "a request was answered before its keys were destroyed"
    slots = trained.registry.key_slots(victims)
    assert set(trained.registry.keys.keys(slots.values()).values()) == {None}
    assert [r.deleted for r in receipts] == [(victims[0],), (victims[1],)]


def cells_of(run_dir) -> dict:
    system = s3t.S3T.open(run_dir)
    try:
        return cells(system)
    finally:
        system.close()

