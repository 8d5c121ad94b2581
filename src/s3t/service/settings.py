"""What an operator tunes when serving a run: request limits, auth, rate limits, the abuse guard and
the restoration policy. Plain frozen dataclasses, checked once at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal

from ..errors import PlanError

__all__ = ["ServiceSettings", "GuardPolicy"]


@dataclass(frozen=True)
class GuardPolicy:
    """When a token consumes one shard's deletion capacity abnormally fast, and what to do then.

    A shard's capacity is `deletions_to_drop` (distinct first slices of its live orders). Over the last
    `window_s` seconds the guard sums, per token and shard, the capacity the token's deletions consumed
    and the capacity that uniformly random deletions of as many records would have consumed. A request
    is flagged when one shard's sum reaches `min_spent` and `max_ratio` times the random expectation:
    the signature of requests aimed at one shard's first slices.
    """

    action: Literal["alert", "hold", "off"] = "alert"   # alert: apply and record; hold: wait for an admin
    window_s: float = 3600.0
    min_spent: int = 2             # capacity units of one shard before a token's rate is judged
    max_ratio: float = 3.0         # flag at this many times the consumption of random deletions
    protect_last_order: bool = False   # also flag any request that would take a shard out of the ensemble

    def __post_init__(self) -> None:
        if self.action not in ("alert", "hold", "off"):
            raise PlanError(f"guard `action` must be 'alert', 'hold' or 'off'; got {self.action!r}")
        _positive("guard `window_s`", self.window_s)
        _positive("guard `max_ratio`", self.max_ratio)
        if not isinstance(self.min_spent, int) or self.min_spent < 1:
            raise PlanError(f"guard `min_spent` must be an integer >= 1; got {self.min_spent!r}")


@dataclass(frozen=True)
class ServiceSettings:
    """Limits and policies of one `s3t serve` process (host and port are the server's, not these)."""

    public_predict: bool = False       # True: /v1/predict and /v1/status need no token
    max_body_bytes: int = 1 << 20      # larger request bodies get 413
    rate: float = 20.0                 # requests per second per token (a token may override)
    burst: int = 40                    # requests a token may send at once before the rate applies
    daily_quota: int = 10_000          # deletion items (ids + subjects) per token per UTC day
    guard: GuardPolicy = field(default_factory=GuardPolicy)
    restore_below: int | None = None   # restore when a shard's served depth is below this; None: on request only
    restore_poll_s: float = 2.0        # how often the worker checks the policy
    worker: bool = True                # run the background restoration worker
    preload: bool = True               # load the model at startup (in the background) instead of on first use

    def __post_init__(self) -> None:
        _positive("`max_body_bytes`", self.max_body_bytes)
        _positive("`rate`", self.rate)
        _positive("`restore_poll_s`", self.restore_poll_s)
        for name in ("burst", "daily_quota"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise PlanError(f"`{name}` must be an integer >= 1; got {value!r}")
        if self.restore_below is not None and (not isinstance(self.restore_below, int) or self.restore_below < 1):
            raise PlanError(f"`restore_below` must be a served depth >= 1, or None to restore only on request; "
                            f"got {self.restore_below!r}")

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["guard"] = {f.name: getattr(self.guard, f.name) for f in fields(self.guard)}
        return out


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise PlanError(f"{name} must be a positive number; got {value!r}")
