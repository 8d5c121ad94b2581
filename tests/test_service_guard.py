"""Unit tests of the service's abuse controls and settings (s3t.service.guard, .settings, .auth): no server."""

from __future__ import annotations

import pytest

from s3t.errors import AuthError, DataError, ForbiddenError, PlanError, RateLimitError
from s3t.service import guard as guard_module
from s3t.service.auth import authenticate, create_token, list_tokens, require, revoke_token
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


def test_guard_flags_concentrated_consumption_within_the_window(clock):
    g = CapacityGuard(GuardPolicy(min_spent=2, max_ratio=3.0, window_s=60))
    baseline = {0: 0.25, 1: 0.25}   # a random record consumes 0.25 of each shard's capacity on average
    first = g.judge_preview("a", preview(0, 1), baseline)
    assert not first.flagged
    g.record("a", first)
    second = g.judge_preview("a", preview(0, 1), baseline)
    assert second.flagged and "shard 0" in second.reason and "4.0x" in second.reason
    assert not g.judge_preview("b", preview(0, 1), baseline).flagged, "windows are per token"
    spread = g.judge_preview("a", preview(1, 1), baseline)
    assert not spread.flagged, "one unit in another shard is not concentration"
    clock.now += 61
    assert not g.judge_preview("a", preview(0, 1), baseline).flagged, "old requests leave the window"


def test_guard_ratio_compares_with_random_deletions(clock):
    g = CapacityGuard(GuardPolicy(min_spent=2, max_ratio=3.0))
    assert not g.judge_preview("a", preview(0, 2, records=2), {0: 0.5}).flagged   # 2 vs 1.0: ratio 2
    assert g.judge_preview("a", preview(0, 2, records=2), {0: 0.3}).flagged       # 2 vs 0.6: ratio 3.3


def test_guard_protects_the_last_order_when_asked(clock):
    strict = CapacityGuard(GuardPolicy(protect_last_order=True))
    verdict = strict.judge_preview("a", preview(1, 1, depth_after=0), {1: 1.0})
    assert verdict.flagged and "out of the ensemble" in verdict.reason
    assert not CapacityGuard(GuardPolicy()).judge_preview("a", preview(1, 1, depth_after=0), {1: 1.0}).flagged


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
