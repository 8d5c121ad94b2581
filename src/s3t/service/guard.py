"""Abuse controls: per-token rate limits and daily quotas, and the capacity guard.

Rate limits are token buckets kept in memory (a restart refills them); quotas count the deletion items
(ids + subjects) applied per token per UTC day, which the deletion itself records in the registry (same
transaction), so they are exact across crashes and restarts; a held request counts once applied. The
capacity guard
implements `GuardPolicy`: it compares how fast a token's recent deletions consumed each shard's
deletion capacity with what uniformly random deletions of as many records would have consumed.

Why that comparison: a shard drops out of the ensemble when every live order has lost its first slice.
Random deletions spread over shards and soon land in slices whose orders are already truncated, so each
record consumes little capacity on average; an adversary who aims at one shard's first slices consumes
one unit per record. The expected consumption of one random record in shard s is the share of live
records that sit in a first slice of a live order of s (each such record kills one order's prefix).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from ..errors import RateLimitError
from ..registry import Registry
from .auth import Token
from .settings import GuardPolicy

__all__ = ["RateLimiter", "check_quota", "CapacityGuard", "Verdict", "utc_day"]


class RateLimiter:
    """Token buckets keyed by token id (or client address for anonymous predictions); thread-safe."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}   # key -> (tokens left, time of last refill)
        self._lock = threading.Lock()

    def take(self, key: str, *, rate: float, burst: int) -> None:
        """Spend one request from `key`'s bucket, or raise RateLimitError with the wait needed."""
        now = time.monotonic()
        with self._lock:
            tokens, then = self._buckets.get(key, (float(burst), now))
            tokens = min(float(burst), tokens + (now - then) * rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                wait = (1.0 - tokens) / rate
                raise RateLimitError(f"rate limit of {rate:g} requests/s (burst {burst}) exceeded for {key}; "
                                     f"retry in {wait:.2f} s", retry_after=wait)
            self._buckets[key] = (tokens - 1.0, now)


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


class CapacityGuard:
    """Judges deletion requests against `GuardPolicy`; keeps each token's recent consumption in memory.

    The random-deletion baseline needs a count of live records per slice (a scan of the records table);
    it is recomputed at most every `BASELINE_TTL_S` seconds, which is plenty for a rate judged over minutes.
    """

    BASELINE_TTL_S = 5.0

    def __init__(self, policy: GuardPolicy) -> None:
        self.policy = policy
        self._recent: dict[str, deque[tuple[float, Verdict]]] = {}
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

    def judge(self, token_id: str, system, *, ids: Sequence[str] = (), subjects: Sequence[str] = ()) -> Verdict:
        """Would this deletion request flag the token? Records nothing (see `record`)."""
        if self.policy.action == "off":
            return Verdict(False, "", {}, {})
        now = time.monotonic()
        if self._baseline is None or now - self._baseline[0] > self.BASELINE_TTL_S:
            self._baseline = (now, self.random_consumption(system.registry))
        return self.judge_preview(token_id, system.preview_delete(ids=ids, subjects=subjects), self._baseline[1])

    def judge_preview(self, token_id: str, preview: dict, per_record: dict[int, float]) -> Verdict:
        """`judge` on a `S3T.preview_delete` result and a `random_consumption` baseline."""
        spent = {s["shard"]: s["capacity_before"] - s["capacity_after"] for s in preview["shards"]}
        expected = {s: preview["records"] * q for s, q in per_record.items()}
        verdict = Verdict(False, "", spent, expected)
        if self.policy.protect_last_order:
            for s in preview["shards"]:
                if s["depth_before"] > 0 and s["depth_after"] == 0:
                    return Verdict(True, f"the request would take shard {s['shard']} out of the ensemble "
                                         "(its last live order)", spent, expected)
        now = time.monotonic()
        with self._lock:
            window = self._window(token_id, now)
            for shard in sorted(spent):
                total = spent[shard] + sum(v.spent.get(shard, 0) for _, v in window)
                baseline = expected.get(shard, 0.0) + sum(v.expected.get(shard, 0.0) for _, v in window)
                if total >= self.policy.min_spent and total >= self.policy.max_ratio * baseline:
                    ratio = total / baseline if baseline > 0 else math.inf
                    return Verdict(True, (
                        f"token {token_id} consumed {total} units of shard {shard}'s deletion capacity in the last "
                        f"{self.policy.window_s:g} s, {ratio:.1f}x what random deletions of as many records would "
                        f"({baseline:.2f}; limit {self.policy.max_ratio:g}x)"), spent, expected)
        return verdict

    def record(self, token_id: str, verdict: Verdict) -> None:
        """Count an applied request towards the token's window."""
        now = time.monotonic()
        with self._lock:
            self._window(token_id, now).append((now, verdict))

    def _window(self, token_id: str, now: float) -> deque[tuple[float, Verdict]]:
        window = self._recent.setdefault(token_id, deque())
        while window and window[0][0] < now - self.policy.window_s:
            window.popleft()
        return window
