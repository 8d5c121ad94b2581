"""Abuse controls: per-token rate limits and daily quotas, and the capacity guard.

Rate limits are token buckets kept in memory (a restart refills them), at most `max_keys` of them;
quotas count the deletion items (ids + subjects) per token per UTC day in the registry, in the same
transaction as the deletion (or the hold) they count, so they are exact across crashes and restarts.
The capacity guard implements `GuardPolicy`.

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
from collections import OrderedDict, defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from ..errors import RateLimitError
from ..registry import Registry
from ..truncation import deletions_to_drop
from .auth import Token
from .settings import GuardPolicy

__all__ = ["RateLimiter", "check_quota", "CapacityGuard", "Verdict", "utc_day"]


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
                wait = (1.0 - tokens) / rate
                raise RateLimitError(f"rate limit of {rate:g} requests/s (burst {burst}) exceeded for {key}; "
                                     f"retry in {wait:.2f} s", retry_after=wait)
            self._store(key, (tokens - 1.0, now))

    def _store(self, key: str, bucket: tuple[float, float]) -> None:
        self._buckets[key] = bucket
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)


def utc_day(now: datetime | None = None) -> str:
    return (now or datetime.now(timezone.utc)).strftime("%Y-%m-%d")


def check_quota(registry: Registry, token: Token, items: int, *, default: int) -> None:
    """RateLimitError if `items` more deletion items would exceed the token's quota for today (UTC)."""
    quota = token.daily_quota or default
    used = registry.usage(token.id, utc_day())
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

    @property
    def units(self) -> int:
        """Capacity this request would consume from the ensemble (all shards)."""
        return sum(max(0, v) for v in self.spent.values())


class CapacityGuard:
    """Judges deletion requests against `GuardPolicy`; keeps recent consumption in memory.

    Two windows of `window_s` seconds: per token, what its unreviewed requests consumed of each shard
    (the ratio check); for the ensemble, every applied request's units, marked reviewed (an admin's) or
    not (the budgets count only unreviewed ones; all count towards the capacity at the window's start).
    The random-deletion baseline needs a count of live records per slice (a scan of the records table);
    it is recomputed at most every `BASELINE_TTL_S` seconds, which is plenty for a rate judged over minutes.
    """

    BASELINE_TTL_S = 5.0

    def __init__(self, policy: GuardPolicy) -> None:
        self.policy = policy
        self._recent: dict[str, deque[tuple[float, Verdict]]] = {}
        self._ensemble: deque[tuple[float, str | None, int, bool]] = deque()   # (time, token, units, reviewed)
        self._lock = threading.Lock()
        self._baseline: tuple[float, dict[int, float]] | None = None

    @staticmethod
    def random_consumption(registry: Registry) -> dict[int, float]:
        """Per shard: expected capacity consumed by deleting one uniformly random live record."""
        counts = registry.live_counts()
        total = sum(counts.values())
        critical: dict[int, set[int]] = {}
        for o in registry.orders():
            critical.setdefault(o["shard"], set())
            if o["depth"] > 0:
                critical[o["shard"]].add(o["slices"][0])
        if not total:
            return {s: 0.0 for s in critical}
        return {s: sum(counts.get((s, sl), 0) for sl in firsts) / total for s, firsts in critical.items()}

    @staticmethod
    def ensemble_capacity(registry: Registry) -> int:
        """The ensemble's deletion capacity now: the sum over shards of `deletions_to_drop`."""
        by_shard: dict[int, list[dict]] = defaultdict(list)
        for o in registry.orders():
            by_shard[o["shard"]].append(o)
        return sum(deletions_to_drop([o["slices"] for o in mine], [o["depth"] for o in mine])
                   for mine in by_shard.values())

    def judge(self, token_id: str, system, *, ids: Sequence[str] = (), subjects: Sequence[str] = ()) -> Verdict:
        """Would this deletion request flag the token? Records nothing (see `record`)."""
        if self.policy.action == "off":
            return Verdict(False, "", {}, {})
        now = time.monotonic()
        if self._baseline is None or now - self._baseline[0] > self.BASELINE_TTL_S:
            self._baseline = (now, self.random_consumption(system.registry))
        return self.judge_preview(token_id, system.preview_delete(ids=ids, subjects=subjects), self._baseline[1],
                                  capacity=self.ensemble_capacity(system.registry))

    def judge_preview(self, token_id: str, preview: dict, per_record: dict[int, float], *, capacity: int) -> Verdict:
        """`judge` on a `S3T.preview_delete` result, a `random_consumption` baseline and the ensemble's
        capacity now (`ensemble_capacity`). Every check that fails is named in the reason."""
        policy = self.policy
        spent = {s["shard"]: s["capacity_before"] - s["capacity_after"] for s in preview["shards"]}
        expected = {s: preview["records"] * q for s, q in per_record.items()}
        reasons = []
        if policy.protect_last_order:
            dropped = [s["shard"] for s in preview["shards"] if s["depth_before"] > 0 and s["depth_after"] == 0]
            if dropped:
                reasons.append(f"the request would take shard {', '.join(map(str, dropped))} out of the ensemble "
                               "(its last live order)")
        units = sum(max(0, v) for v in spent.values())
        now = time.monotonic()
        with self._lock:
            window = self._window(token_id, now)
            for shard in sorted(spent):
                total = spent[shard] + sum(v.spent.get(shard, 0) for _, v in window)
                baseline = expected.get(shard, 0.0) + sum(v.expected.get(shard, 0.0) for _, v in window)
                if spent[shard] > 0 and total >= policy.min_spent and total >= policy.max_ratio * baseline:
                    ratio = total / baseline if baseline > 0 else math.inf
                    reasons.append(
                        f"token {token_id} consumed {total} units of shard {shard}'s deletion capacity in the last "
                        f"{policy.window_s:g} s, {ratio:.1f}x what random deletions of as many records would "
                        f"({baseline:.2f}; limit {policy.max_ratio:g}x)")
                    break
            if units > 0:
                ensemble = self._ensemble_window(now)
                start = capacity + sum(u for _, _, u, _ in ensemble)   # the capacity when the window began
                mine = units + sum(u for _, t, u, reviewed in ensemble if t == token_id and not reviewed)
                everyone = units + sum(u for _, _, u, reviewed in ensemble if not reviewed)
                for who, used, share in ((f"token {token_id}", mine, policy.token_share),
                                         ("all tokens together", everyone, policy.total_share)):
                    budget = max(float(policy.min_spent), share * start)
                    if used > budget:
                        reasons.append(
                            f"{who} would consume {used} of the ensemble's {start} units of deletion capacity "
                            f"within {policy.window_s:g} s without review (limit {share:.0%}: {budget:g} units)")
                        break
        return Verdict(bool(reasons), "; ".join(reasons), spent, expected)

    def record(self, token_id: str, verdict: Verdict, *, reviewed: bool = False) -> None:
        """Count an applied request: towards the ensemble's window, and towards its token's unless it is
        an admin's own (`reviewed`)."""
        if self.policy.action == "off":
            return
        now = time.monotonic()
        with self._lock:
            if not reviewed:
                self._window(token_id, now).append((now, verdict))
            if verdict.units:
                self._ensemble_window(now).append((now, token_id, verdict.units, reviewed))

    def record_reviewed(self, units: int) -> None:
        """Count the capacity a held request consumed when an admin applied it (reviewed: no budget)."""
        now = time.monotonic()
        with self._lock:
            if units > 0:
                self._ensemble_window(now).append((now, None, units, True))

    def _window(self, token_id: str, now: float) -> deque[tuple[float, Verdict]]:
        window = self._recent.setdefault(token_id, deque())
        while window and window[0][0] < now - self.policy.window_s:
            window.popleft()
        return window

    def _ensemble_window(self, now: float) -> deque[tuple[float, str | None, int, bool]]:
        while self._ensemble and self._ensemble[0][0] < now - self.policy.window_s:
            self._ensemble.popleft()
        return self._ensemble
