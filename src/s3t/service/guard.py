"""Abuse controls: per-token rate limits and daily quotas, and the capacity guard.

Rate limits are token buckets: in the registry on PostgreSQL (`SharedRateLimiter`: one atomic statement
per request, or per group commit for deletions, on the database server's clock, so replicas of the
service share every token's budget),
in memory on SQLite (`RateLimiter`: a SQLite run is served by one process; a restart refills them).
Quotas count the deletion items (ids + subjects) per token per UTC day in the registry, in the same
transaction as the deletion (or the hold) they count, so they are exact across crashes, restarts and
replicas. The capacity guard implements `GuardPolicy`; its windows are registry tables written by the
deletion's group commit (replicas share them), read by index once per group commit and token, with the
batch's own requests laid over them: a request is judged with the ones ahead of it counted.

Why two measures of consumption: a shard drops out of the ensemble when every live order has lost its
first slice, and the whole model is gone when every shard has. Random deletions spread over shards and
soon land in slices whose orders are already truncated, so each record consumes little capacity on
average; an adversary who aims at one shard's first slices consumes one unit per record, which the
per-shard ratio against random deletions catches. But an adversary who spreads one id per (shard,
slice) over the whole ensemble consumes capacity exactly as fast as early random deletions do, so no
ratio can tell them apart: what bounds that attack is an absolute budget of the ensemble's capacity per
window, per token and for all tokens together, and never letting an unreviewed request take a shard's
last live order.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from ..errors import RateLimitError
from ..registry import ALL_TOKENS, Registry
from .auth import Token
from .settings import GuardPolicy

__all__ = ["RateLimiter", "SharedRateLimiter", "check_quota", "CapacityGuard", "Verdict", "utc_day"]

BUCKETS_PER_WINDOW = 60   # the guard's windows slide in steps of window_s / 60


class RateLimiter:
    """Token buckets keyed by token id (or client address for anonymous predictions); thread-safe.

    At most `max_keys` buckets are kept; beyond, the least recently used one is dropped. A bucket left
    alone for `burst / rate` seconds has refilled, and a full bucket is the same as none, so dropping it
    loses nothing; only `max_keys` distinct callers within that time could evict a bucket still draining.
    """

    def __init__(self, *, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()   # key -> (tokens left, last refill)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, *, rate: float, burst: int) -> None:
        """Spend one request from `key`'s bucket, or raise RateLimitError with the wait needed."""
        now = time.monotonic()
        with self._lock:
            tokens, then = self._buckets.pop(key, (float(burst), now))   # re-inserted last: most recently used
            tokens = min(float(burst), tokens + (now - then) * rate)
            if tokens < 1.0:
                self._store(key, (tokens, now))
                raise RateLimitError.bucket(key, rate=rate, burst=burst, wait=(1.0 - tokens) / rate)
            self._store(key, (tokens - 1.0, now))

    def _store(self, key: str, bucket: tuple[float, float]) -> None:
        self._buckets[key] = bucket
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)


class SharedRateLimiter:
    """`RateLimiter` with its buckets in the registry (PostgreSQL): every replica of the service spends
    from the same bucket, in one atomic statement per request (`Registry.take_rate`). A deletion spends
    from its bucket in its group commit instead (`Batch.take_rate`): one statement per batch and token."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def take(self, key: str, *, rate: float, burst: int) -> None:
        granted, left = self.registry.take_rate(key, rate=rate, burst=burst)
        if not granted:
            raise RateLimitError.bucket(key, rate=rate, burst=burst, wait=(1.0 - left) / rate)

    def expire(self, *, idle_s: float = 3600.0) -> int:
        return self.registry.expire_rate_buckets(idle_s=idle_s)


def utc_day(now: datetime | None = None) -> str:
    return (now or datetime.now(timezone.utc)).strftime("%Y-%m-%d")


def check_quota(token: Token, items: int, *, used: int, default: int) -> None:
    """RateLimitError if `items` more deletion items would exceed the token's quota for today (UTC), given
    what it `used` today (`Batch.usage`: the requests before it in a group commit included)."""
    quota = token.daily_quota or default
    if used + items > quota:
        now = datetime.now(timezone.utc)
        midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        raise RateLimitError(f"token {token.id} has used {used} of its {quota} deletion items for {utc_day(now)} "
                             f"(UTC); this request has {items}. The quota resets at midnight UTC, or an admin can "
                             "raise it with `s3t token create ... --quota N`", retry_after=(midnight - now).total_seconds())


@dataclass(frozen=True)
class Verdict:
    """The guard's judgement of one request: `flagged` with a human-readable `reason`, and the accounting."""

    flagged: bool
    reason: str
    spent: dict[int, int]          # capacity this request would consume, per shard
    expected: dict[int, float]     # capacity random deletions of as many records would consume, per shard
    records: int = 0               # live records the request would delete

    @property
    def units(self) -> int:
        """Capacity this request would consume from the ensemble (all shards)."""
        return sum(max(0, v) for v in self.spent.values())


class CapacityGuard:
    """Judges deletion requests against `GuardPolicy`; its windows live in the registry.

    Two windows of `window_s` seconds, kept in time buckets of window_s / 60 (an entry leaves the window
    between window_s and window_s + one bucket after it was made): per token, what its unreviewed
    requests consumed of each shard and how many records they deleted (the ratio check); for the
    ensemble, every applied request's units, marked reviewed (an admin's) or not (the budgets count only
    unreviewed ones; all count towards the capacity at the window's start). Judging a request reads its
    token's buckets (indexed; once per group commit, `Batch.guard_window`), the ensemble's capacity (one
    row per shard) and the random-deletion baseline, which needs the live counts per cell and every
    order's first slice: it is refreshed at most every `BASELINE_TTL_S` seconds, plenty for a rate judged
    over minutes. Nothing per request grows with the number of records.
    """

    BASELINE_TTL_S = 5.0

    def __init__(self, policy: GuardPolicy, registry: Registry, *, clock: Callable[[], float] = time.time) -> None:
        self.policy, self.registry, self.clock = policy, registry, clock
        self._bucket_ms = max(1, int(policy.window_s * 1000 / BUCKETS_PER_WINDOW))
        self._baseline: tuple[float, dict[int, float]] | None = None

    @staticmethod
    def random_consumption(registry: Registry, conn=None) -> dict[int, float]:
        """Per shard: expected capacity consumed by deleting one uniformly random live record."""
        counts = registry.live_counts(conn)
        total = sum(counts.values())
        critical: dict[int, set[int]] = {}
        for o in registry.orders(conn):
            critical.setdefault(o["shard"], set())
            if o["depth"] > 0:
                critical[o["shard"]].add(o["slices"][0])
        if not total:
            return {s: 0.0 for s in critical}
        return {s: sum(counts.get((s, sl), 0) for sl in firsts) / total for s, firsts in critical.items()}

    @staticmethod
    def ensemble_capacity(registry: Registry, conn=None) -> int:
        """The ensemble's deletion capacity now: the sum over shards of `deletions_to_drop` (kept per shard)."""
        return sum(registry.capacities(conn).values())

    def judge(self, token_id: str, system, batch, *, ids: Sequence[str] = (), subjects: Sequence[str] = ()) -> Verdict:
        """Would this deletion request flag the token? Judged in a group commit's transaction (`batch`), so
        the requests ahead of it count; records nothing (see `record`)."""
        if self.policy.action == "off":
            return Verdict(False, "", {}, {})
        now = time.monotonic()
        if self._baseline is None or now - self._baseline[0] > self.BASELINE_TTL_S:
            self._baseline = (now, self.random_consumption(self.registry, batch.conn))
        preview = system.preview_delete(ids=ids, subjects=subjects, batch=batch)
        return self.judge_preview(batch, token_id, preview, self._baseline[1],
                                  capacity=sum(batch.capacities().values()))

    def judge_preview(self, batch, token_id: str, preview: dict, per_record: dict[int, float], *,
                      capacity: int) -> Verdict:
        """`judge` on a `S3T.preview_delete` result, a `random_consumption` baseline and the ensemble's
        capacity now (`ensemble_capacity`), with the windows as `batch` sees them. Every check that fails
        is named in the reason."""
        policy = self.policy
        spent = {s["shard"]: s["capacity_before"] - s["capacity_after"] for s in preview["shards"]}
        records = preview["records"]
        expected = {s: records * q for s, q in per_record.items()}
        reasons = []
        if policy.protect_last_order:
            dropped = [s["shard"] for s in preview["shards"] if s["depth_before"] > 0 and s["depth_after"] == 0]
            if dropped:
                reasons.append(f"the request would take shard {', '.join(map(str, dropped))} out of the ensemble "
                               "(its last live order)")
        units = sum(max(0, v) for v in spent.values())
        usage, window_spent = batch.guard_window(token_id, since=self._since())
        # Random deletions of as many records as the token's window deleted: today's per-record baseline.
        window_records = records + usage.get((token_id, False), (0, 0))[0]
        for shard in sorted(spent):
            total = spent[shard] + window_spent.get(shard, 0)
            baseline = window_records * per_record.get(shard, 0.0)
            if spent[shard] > 0 and total >= policy.min_spent and total >= policy.max_ratio * baseline:
                ratio = total / baseline if baseline > 0 else math.inf
                reasons.append(
                    f"token {token_id} consumed {total} units of shard {shard}'s deletion capacity in the last "
                    f"{policy.window_s:g} s, {ratio:.1f}x what random deletions of as many records would "
                    f"({baseline:.2f}; limit {policy.max_ratio:g}x)")
                break
        if units > 0:
            start = capacity + sum(usage.get((ALL_TOKENS, r), (0, 0))[1] for r in (False, True))   # at window start
            mine = units + usage.get((token_id, False), (0, 0))[1]
            everyone = units + usage.get((ALL_TOKENS, False), (0, 0))[1]
            for who, used, share in ((f"token {token_id}", mine, policy.token_share),
                                     ("all tokens together", everyone, policy.total_share)):
                budget = max(float(policy.min_spent), share * start)
                if used > budget:
                    reasons.append(
                        f"{who} would consume {used} of the ensemble's {start} units of deletion capacity "
                        f"within {policy.window_s:g} s without review (limit {share:.0%}: {budget:g} units)")
                    break
        return Verdict(bool(reasons), "; ".join(reasons), spent, expected, records)

    def record(self, batch, token_id: str, verdict: Verdict, *, reviewed: bool = False) -> None:
        """Count an applied request in the group commit that applies it (`batch`): towards the ensemble's
        window, and towards its token's unless it is an admin's own (`reviewed`)."""
        if self.policy.action == "off":
            return
        batch.add_guard_usage(token_id, bucket=self._bucket(), reviewed=reviewed, records=verdict.records,
                              units=verdict.units, spent=verdict.spent)

    def record_reviewed(self, batch, units: int) -> None:
        """Count the capacity a held request consumed when an admin applied it (reviewed: no budget)."""
        if units > 0 and self.policy.action != "off":
            batch.add_guard_usage("", bucket=self._bucket(), reviewed=True, records=0, units=units, spent={})

    def expire(self, conn) -> int:
        """Forget buckets that have left the window (housekeeping)."""
        return self.registry.expire_guard(conn, before=self._since())

    def _bucket(self) -> int:
        now_ms = int(self.clock() * 1000)
        return now_ms - now_ms % self._bucket_ms

    def _since(self) -> int:
        """The start of the oldest bucket still in the window: one whose end is less than `window_s` ago.
        On the buckets' grid, so it names the same window until the next bucket starts (a group commit
        reads a token's window once)."""
        oldest = int(self.clock() * 1000) - int(self.policy.window_s * 1000) - self._bucket_ms + 1
        return -(-oldest // self._bucket_ms) * self._bucket_ms
