"""Unit tests of the service's abuse controls and settings (s3t.service.guard, .settings, .auth): no server.

The capacity guard keeps its windows in the registry (replicas share them); these tests give it a bare
registry and judge each request in a transaction of its own, with a fake clock.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest

import s3t
from s3t.batch import Batch
from s3t.errors import AuthError, DataError, ForbiddenError, PlanError, RateLimitError
from s3t.service import guard as guard_module
from s3t.service.auth import authenticate, create_token, list_tokens, require, revoke_token
from s3t.keystore import KeyStore
from s3t.registry import Registry
from s3t.service.guard import CapacityGuard, RateLimiter
from s3t.service.settings import GuardPolicy, ServiceSettings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(guard_module.time, "monotonic", c)
    return c


@pytest.fixture
def registries(tmp_path):
    """registries() -> an empty run registry (the guard's windows are its tables); closed after the test."""
    made: list[Registry] = []

    def make() -> Registry:
        folder = tmp_path / f"registry-{len(made)}"
        folder.mkdir()
        reg = Registry(f"sqlite:///{folder / 'registry.sqlite'}", KeyStore.create(folder / "keys.bin"))
        reg.create_schema()
        made.append(reg)
        return reg

    yield make
    for reg in made:
        reg.close()


class Guard:
    """A `CapacityGuard` on the fake clock, each call in a transaction of its own (as the service does)."""

    def __init__(self, policy: GuardPolicy, registry: Registry, clock: Clock) -> None:
        self.guard, self.registry = CapacityGuard(policy, registry, clock=clock), registry

    def judge_preview(self, token: str, preview: dict, per_record: dict, *, capacity: int):
        with self.batch() as batch:
            return self.guard.judge_preview(batch, token, preview, per_record, capacity=capacity)

    def record(self, token: str, verdict, *, reviewed: bool = False) -> None:
        with self.batch() as batch:
            self.guard.record(batch, token, verdict, reviewed=reviewed)

    def record_reviewed(self, units: int) -> None:
        with self.batch() as batch:
            self.guard.record_reviewed(batch, units)

    @contextmanager
    def batch(self):
        """A group commit of one request: its staged writes are flushed before the commit."""
        with self.registry.transaction() as conn:
            batch = Batch(self.registry, conn, b"ledger key")
            yield batch
            batch.flush()


@pytest.fixture
def guard(registries, clock):
    """guard(policy) -> a `Guard` on the test's clock, with windows of its own (a registry each)."""
    return lambda policy: Guard(policy, registries(), clock)


def test_rate_limiter_allows_a_burst_then_the_rate(clock):
    limiter = RateLimiter()
    for _ in range(3):
        limiter.take("t", rate=2.0, burst=3)
    with pytest.raises(RateLimitError) as exc:
        limiter.take("t", rate=2.0, burst=3)
    assert exc.value.retry_after == pytest.approx(0.5)
    limiter.take("other", rate=2.0, burst=3)   # buckets are per key
    clock.now += 0.5
    limiter.take("t", rate=2.0, burst=3)
    with pytest.raises(RateLimitError):
        limiter.take("t", rate=2.0, burst=3)


def preview(shard: int, spent: int, *, records: int = 1, depth_after: int = 1) -> dict:
    return {"records": records, "shards": [{"shard": shard, "depth_before": 2, "depth_after": depth_after,
                                            "capacity_before": 2, "capacity_after": 2 - spent}]}


BIG = 10_000   # an ensemble capacity so large that the ensemble budgets never bind: the ratio alone is judged


def test_guard_flags_concentrated_consumption_within_the_window(clock, guard):
    g = guard(GuardPolicy(min_spent=2, max_ratio=3.0, window_s=60))
    baseline = {0: 0.25, 1: 0.25}   # a random record consumes 0.25 of each shard's capacity on average
    first = g.judge_preview("a", preview(0, 1), baseline, capacity=BIG)
    assert not first.flagged
    g.record("a", first)
    second = g.judge_preview("a", preview(0, 1), baseline, capacity=BIG)
    assert second.flagged and "shard 0" in second.reason and "4.0x" in second.reason
    assert not g.judge_preview("b", preview(0, 1), baseline, capacity=BIG).flagged, "windows are per token"
    spread = g.judge_preview("a", preview(1, 1), baseline, capacity=BIG)
    assert not spread.flagged, "one unit in another shard is not concentration"
    clock.now += 61
    assert not g.judge_preview("a", preview(0, 1), baseline, capacity=BIG).flagged, "old requests leave the window"


def test_guard_ratio_compares_with_random_deletions(clock, guard):
    g = guard(GuardPolicy(min_spent=2, max_ratio=3.0))
    assert not g.judge_preview("a", preview(0, 2, records=2), {0: 0.5}, capacity=BIG).flagged   # 2 vs 1.0: ratio 2
    assert g.judge_preview("a", preview(0, 2, records=2), {0: 0.3}, capacity=BIG).flagged       # 2 vs 0.6: ratio 3.3


def test_guard_protects_the_last_order_by_default(clock, guard):
    # Changed by design (issue 9, item 8): protecting a shard's last order is the default now.
    verdict = guard(GuardPolicy()).judge_preview("a", preview(1, 1, depth_after=0), {1: 1.0}, capacity=BIG)
    assert verdict.flagged and "out of the ensemble" in verdict.reason
    lax = guard(GuardPolicy(protect_last_order=False))
    assert not lax.judge_preview("a", preview(1, 1, depth_after=0), {1: 1.0}, capacity=BIG).flagged


def test_random_consumption_counts_records_in_first_slices_of_live_orders(trained):
    per_record = CapacityGuard.random_consumption(trained.registry)
    assert set(per_record) == {0, 1} and sum(per_record.values()) == pytest.approx(1.0)   # B = L: all critical
    victim = next(iter(trained.registry.live_members(0)[0]))
    trained.delete(ids=[victim])                 # kills the order starting with slice 0 of shard 0
    after = CapacityGuard.random_consumption(trained.registry)
    assert after[0] < per_record[0] and after[1] > 0


@pytest.mark.parametrize("changes,match", [
    (dict(rate=0), "`rate`"), (dict(burst=0), "`burst`"), (dict(daily_quota=-1), "`daily_quota`"),
    (dict(restore_below=0), "`restore_below`"), (dict(max_body_bytes=0), "`max_body_bytes`"),
])
def test_settings_name_the_bad_field(changes, match):
    with pytest.raises(PlanError, match=match):
        ServiceSettings(**changes)


@pytest.mark.parametrize("changes,match", [(dict(action="block"), "`action`"), (dict(min_spent=0), "`min_spent`"),
                                           (dict(max_ratio=-1), "`max_ratio`"), (dict(window_s=0), "`window_s`")])
def test_guard_policy_names_the_bad_field(changes, match):
    with pytest.raises(PlanError, match=match):
        GuardPolicy(**changes)


def test_tokens_are_hashed_checked_and_revocable(trained):
    reg = trained.registry
    token, secret = create_token(reg, name="desk", roles=["delete"], rate=5.0, daily_quota=10)
    assert token.roles == ("delete",) and token.rate == 5.0 and token.daily_quota == 10
    assert authenticate(reg, f"Bearer {secret}").id == token.id
    require(token, "delete")
    with pytest.raises(ForbiddenError, match="--role admin"):
        require(token, "admin")
    for header in (None, "", "Bearer", "Basic abc", f"Bearer {secret}x", "Bearer s3t_unknown"):
        with pytest.raises(AuthError):
            authenticate(reg, header)
    revoke_token(reg, token.id)
    with pytest.raises(AuthError, match="revoked"):
        authenticate(reg, f"Bearer {secret}")
    assert [t.revoked_at is not None for t in list_tokens(reg)] == [True]
    with pytest.raises(DataError, match="roles"):
        create_token(reg, name="x", roles=["root"])
    admin, _ = create_token(reg, name="root", roles=["admin"])
    require(admin, "delete")
    require(admin, "predict")


# -- the ensemble budget (issue 9, item 8) -----------------------------------------------------------
def spread(shard: int, *, capacity_before: int = 4, depth_after: int = 3) -> dict:
    """One record from a fresh slice of a 4-slice shard: one unit of its capacity, the shard stays live."""
    return {"records": 1, "shards": [{"shard": shard, "depth_before": 4, "depth_after": depth_after,
                                      "capacity_before": capacity_before, "capacity_after": capacity_before - 1}]}


def test_ensemble_budget_bounds_an_attack_spread_over_every_shard(clock, guard):
    # 4 shards x 4 orders with distinct first slices: 16 units. Random deletions consume one unit per record
    # too at first (every slice is some order's first), so the per-shard ratio cannot see this attack.
    g = guard(GuardPolicy(window_s=60))   # defaults: token_share 0.25, total_share 0.5, min_spent 2
    per_record = {s: 1.0 for s in range(4)}
    capacity = 16

    def send(token: str, shard: int) -> bool:
        nonlocal capacity
        verdict = g.judge_preview(token, spread(shard), per_record, capacity=capacity)
        if not verdict.flagged:
            g.record(token, verdict)
            capacity -= verdict.units
        return verdict.flagged

    assert [send("a", k % 4) for k in range(4)] == [False] * 4, "a quarter of the ensemble per token"
    verdict = g.judge_preview("a", spread(0), per_record, capacity=capacity)
    assert verdict.flagged and "token a would consume 5 of the ensemble's 16 units" in verdict.reason
    assert [send("b", k % 4) for k in range(4)] == [False] * 4, "another token has its own quarter"
    verdict = g.judge_preview("c", spread(1), per_record, capacity=capacity)
    assert verdict.flagged and "all tokens together would consume 9 of the ensemble's 16 units" in verdict.reason
    clock.now += 61
    assert not g.judge_preview("c", spread(1), per_record, capacity=capacity).flagged, "the window slides"


def test_ensemble_budget_floor_and_reviewed_consumption(clock, guard):
    g = guard(GuardPolicy(min_spent=2, window_s=60))
    # A 4-unit ensemble: a quarter is 1 unit, but every token may take `min_spent` (2) before it is judged.
    first = g.judge_preview("a", spread(0, capacity_before=2, depth_after=1), {0: 1.0, 1: 1.0}, capacity=4)
    assert not first.flagged
    g.record("a", first)
    second = g.judge_preview("a", spread(1, capacity_before=2, depth_after=1), {0: 1.0, 1: 1.0}, capacity=3)
    assert not second.flagged
    g.record("a", second)
    assert g.judge_preview("a", spread(0, capacity_before=1, depth_after=1), {0: 1.0, 1: 1.0}, capacity=2).flagged
    # What admins applied counts towards the capacity the window started with, never towards a budget.
    g2 = guard(GuardPolicy(min_spent=1, window_s=60))
    g2.record_reviewed(8)
    verdict = g2.judge_preview("b", spread(0), {0: 1.0}, capacity=8)
    assert not verdict.flagged and verdict.units == 1, "1 unit of a 16-unit window start is within a quarter"
    g3 = guard(GuardPolicy(min_spent=1, token_share=0.25, total_share=0.25, window_s=60))   # 1 of 4 units
    random = {s: 1.0 for s in range(4)}
    g3.record("admin", g3.judge_preview("admin", spread(0), random, capacity=4), reviewed=True)
    assert not g3.judge_preview("b", spread(1), random, capacity=3).flagged, "an admin's own request is reviewed"
    g3.record("c", g3.judge_preview("c", spread(2), random, capacity=3))
    assert g3.judge_preview("b", spread(1), random, capacity=2).flagged, "while an unreviewed one counts"


def test_requests_that_consume_nothing_are_never_flagged(clock, guard):
    g = guard(GuardPolicy(min_spent=1, window_s=60))
    free = {"records": 1, "shards": [{"shard": 0, "depth_before": 1, "depth_after": 1,
                                      "capacity_before": 1, "capacity_after": 1}]}
    for _ in range(10):
        verdict = g.judge_preview("a", free, {0: 0.0}, capacity=1)
        assert not verdict.flagged
        g.record("a", verdict)


def test_defaults_protect_the_ensemble():
    # Changed by design (issue 9, item 8): hold and last-order protection are the defaults.
    policy = ServiceSettings().guard
    assert (policy.action, policy.protect_last_order, policy.token_share, policy.total_share) == ("hold", True,
                                                                                                 0.25, 0.5)


@pytest.mark.parametrize("changes,match", [(dict(token_share=0), "`token_share`"),
                                           (dict(total_share=1.5), "`total_share`"),
                                           (dict(token_share=0.6, total_share=0.5), "cannot exceed")])
def test_guard_shares_name_the_bad_field(changes, match):
    with pytest.raises(PlanError, match=match):
        GuardPolicy(**changes)


# -- smaller items (issue 9, item 11) ------------------------------------------------------------------
def test_rate_limiter_keeps_a_bounded_table_of_the_most_recent_keys(clock):
    limiter = RateLimiter(max_keys=100)
    for _ in range(3):
        limiter.take("victim", rate=1.0, burst=3)
    for k in range(10_000):   # e.g. rotating client addresses
        limiter.take(f"client {k}", rate=1.0, burst=3)
        if k % 50 == 0:   # the draining bucket stays among the most recently used
            with pytest.raises(RateLimitError):
                limiter.take("victim", rate=1.0, burst=3)
    assert len(limiter) == 100


def test_uvicorn_trusts_forwarded_headers_only_from_named_proxies():
    from s3t.service.app import uvicorn_config

    plain = uvicorn_config(object(), host="127.0.0.1", port=1)
    assert plain.proxy_headers is False
    behind = uvicorn_config(object(), host="127.0.0.1", port=1, trusted_proxies=["10.0.0.5"])
    assert behind.proxy_headers is True and behind.forwarded_allow_ips == ["10.0.0.5"]


def test_the_serving_process_freezes_its_heap_at_start_and_once_the_model_is_loaded(monkeypatch):
    import gc
    import threading
    import time
    from types import SimpleNamespace

    from s3t.service.app import freeze_heap

    calls: list[str] = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: calls.append(f"collect {generation}"))
    monkeypatch.setattr(gc, "freeze", lambda: calls.append("freeze"))
    service = SimpleNamespace(model_ready=threading.Event())
    freeze_heap(service)
    assert calls == ["collect 2", "freeze"], "a full collection, then what is alive is frozen"
    time.sleep(0.2)
    assert len(calls) == 2, "nothing more until the model is loaded"
    service.model_ready.set()
    deadline = time.monotonic() + 10
    while len(calls) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert calls[2:] == ["collect 1", "freeze"], "the model's objects are frozen too, without another full walk"


def test_expired_idempotency_keys_are_purged_by_an_index_range(trained):
    from sqlalchemy import insert, select, text

    from s3t.registry import idempotency

    reg = trained.registry
    with reg.transaction() as conn:
        conn.execute(insert(idempotency), [
            dict(key=f"k{i}", fingerprint="f", request_id=f"r{i}", created_at=f"2020-01-0{1 + i}T00:00:00.000000+00:00")
            for i in range(3)])
    with reg.transaction() as conn:
        assert reg.expire_idempotent(conn, before="2020-01-02T12:00:00.000000+00:00") == 2
        plan = " ".join(str(r) for r in conn.execute(text(
            "EXPLAIN QUERY PLAN DELETE FROM idempotency WHERE created_at < '2020'")))
    assert "ix_idempotency_created_at" in plan, plan
    with reg.engine.connect() as conn:
        assert list(conn.execute(select(idempotency.c.key)).scalars()) == ["k2"]


def test_a_run_from_before_the_counts_and_indexes_gains_them_when_opened(trained):
    # An older registry: flagged_requests without the count columns, no service indexes; opening adds them.
    import sqlite3

    from s3t.service import review

    path, run_dir = trained.run_dir / "registry.sqlite", trained.run_dir
    flag = trained.deletions.submit(lambda batch: review.hold(
        trained, batch, token_id="t", ids=["a", "b"], subjects=[], reference=None, reason="test")).result()
    trained.close()
    with sqlite3.connect(path) as db:
        for index in ("ix_flagged_created", "ix_flagged_status_created", "ix_flagged_token_status",
                      "ix_flagged_decided", "ix_idempotency_created_at"):
            db.execute(f"DROP INDEX {index}")
        db.execute("ALTER TABLE flagged_requests DROP COLUMN id_count")
        db.execute("ALTER TABLE flagged_requests DROP COLUMN subject_count")
    system = s3t.S3T.open(run_dir)
    try:
        with sqlite3.connect(path) as db:
            indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
            columns = {r[1] for r in db.execute("PRAGMA table_info(flagged_requests)")}
        assert {"ix_flagged_created", "ix_idempotency_created_at"} <= indexes and {"id_count", "subject_count"} <= columns
        page, following = review.flags(system)
        assert [(f.id, f.id_count) for f in page] == [(flag.id, None)] and following is None   # counted before: unknown
        assert review.get_flag(system, flag.id).ids == ("a", "b") and review.pending(system, token_id="t") == 1
    finally:
        system.close()


def test_the_head_bound_counts_no_body_bytes_of_a_request_read_with_the_next_ones_head():
    """One read holding the end of a 200 KB body and the start of a pipelined request's head: the bound
    (64 KiB besides bodies) must not count the body (it answered 400 and dropped the first request)."""
    import asyncio

    import uvicorn
    from uvicorn.server import ServerState

    from s3t.service.protocol import MAX_HEAD_BYTES, BoundedHttpToolsProtocol

    class Transport(asyncio.Transport):
        def __init__(self):
            super().__init__()
            self.written, self.closing = b"", False

        def get_extra_info(self, name, default=None):
            return ("127.0.0.1", 8000) if name in ("sockname", "peername") else default

        def write(self, data):
            self.written += data

        def is_closing(self):
            return self.closing

        def close(self):
            self.closing = True

        def pause_reading(self):
            pass

        def resume_reading(self):
            pass

    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def exchange(*reads: bytes) -> Transport:
        config = uvicorn.Config(app, http=BoundedHttpToolsProtocol, log_level="error")
        protocol = BoundedHttpToolsProtocol(config=config, server_state=ServerState(), app_state={})
        transport = Transport()
        protocol.connection_made(transport)
        for data in reads:
            protocol.data_received(data)
            await asyncio.sleep(0.05)
        return transport

    body = b"a" * 200_000
    first = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    pipelined = asyncio.run(exchange(first + body[:1000], body[1000:] + b"GET / HTTP/1.1\r\nHost: x\r\n",
                                     b"\r\n"))
    assert pipelined.written.count(b"HTTP/1.1 200 OK") == 2 and not pipelined.closing, pipelined.written[:200]
    endless = asyncio.run(exchange(b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * MAX_HEAD_BYTES))
    assert endless.written.startswith(b"HTTP/1.1 400 ") and endless.closing
