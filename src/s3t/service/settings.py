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
    """How much deletion capacity requests may take unreviewed, and what happens beyond.

    A shard's capacity is `deletions_to_drop` (distinct first slices of its live orders); the ensemble's
    is their sum. Three checks, each judged on what a request would do (`S3T.preview_delete`):

    - last order (`protect_last_order`): the request would take some shard out of the ensemble.
    - ensemble budget: over the last `window_s` seconds, one token's unreviewed requests may consume at
      most `token_share` of the ensemble's capacity at the start of the window (capacity now + what the
      window consumed), and all tokens' together at most `total_share`; never less than `min_spent`
      units, so a tiny run does not flag its first deletions. This bounds an attack spread evenly over
      all shards, which the per-shard ratio cannot tell from random deletions.
    - per-shard ratio: one shard's capacity consumed by a token's requests in the window reaches
      `min_spent` and `max_ratio` times what uniformly random deletions of as many records would
      consume: the signature of requests aimed at one shard's first slices.

    A flagged request is held for an admin (`hold`) or applied and recorded (`alert`).
    """

    action: Literal["alert", "hold", "off"] = "hold"   # hold: wait for an admin; alert: apply and record
    window_s: float = 3600.0
    min_spent: int = 2             # capacity units a token may always take (and one shard's before the ratio)
    max_ratio: float = 3.0         # flag at this many times the consumption of random deletions
    protect_last_order: bool = True   # flag any request that would take a shard out of the ensemble
    token_share: float = 0.25      # of the ensemble's capacity, per token and window, unreviewed
    total_share: float = 0.5       # of the ensemble's capacity, all tokens together, per window, unreviewed

    def __post_init__(self) -> None:
        if self.action not in ("alert", "hold", "off"):
            raise PlanError(f"guard `action` must be 'alert', 'hold' or 'off'; got {self.action!r}")
        _positive("guard `window_s`", self.window_s)
        _positive("guard `max_ratio`", self.max_ratio)
        if not isinstance(self.min_spent, int) or self.min_spent < 1:
            raise PlanError(f"guard `min_spent` must be an integer >= 1; got {self.min_spent!r}")
        for name in ("token_share", "total_share"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise PlanError(f"guard `{name}` must be a share of the ensemble's capacity in (0, 1]; got {value!r}")
        if self.token_share > self.total_share:
            raise PlanError(f"guard `token_share` ({self.token_share}) cannot exceed `total_share` "
                            f"({self.total_share}): one token is part of all tokens")


@dataclass(frozen=True)
class ServiceSettings:
    """Limits and policies of one `s3t serve` process (host and port are the server's, not these)."""

    public_predict: bool = False       # True: /v1/predict and /v1/status need no token
    max_body_bytes: int = 1 << 20      # larger request bodies get 413
    rate: float = 20.0                 # requests per second per token (a token may override)
    burst: int = 40                    # requests a token may send at once before the rate applies
    daily_quota: int = 10_000          # deletion items (ids + subjects) per token per UTC day
    guard: GuardPolicy = field(default_factory=GuardPolicy)
    max_held: int = 100                # pending held requests per token; beyond, 429 until an admin decides
    idempotency_ttl_s: float = 30 * 86400.0   # idempotency keys expire after this (30 days); then a repeat is new
    prediction_queue: int = 64         # predictions waiting for or using the model; beyond, 503 + Retry-After
    max_batch: int = 256               # deletion requests applied per transaction (1: a commit per request)
    deletion_queue: int = 10_000       # deletion requests waiting for a group commit; beyond, 503 + Retry-After
    max_image_bytes: int = 1 << 20     # per image sent to /v1/predict/images, once decoded from base64; beyond, 422
    max_image_pixels: int = 2048 * 2048   # per image (width x height, read from its header before decoding); 422
    rate_limit_keys: int = 100_000     # rate-limit buckets kept (least recently used dropped beyond)
    docs: bool = False                 # serve interactive docs at /docs (Swagger UI loads from a CDN)
    restore_below: int | None = None   # restore when a shard's served depth is below this; None: on request only
    train_added: bool = True           # restore stale orders (records were added) in the background
    audit_replay: bool = False         # let GET /v1/audit replay stages (trains on the served model: predictions wait)
    restore_poll_s: float = 2.0        # how often the worker checks the policy
    restore_executor: str = "local"    # where the restoration child trains: "local" (itself) or "ray"
    ray_address: str | None = None     # the Ray cluster the child joins (None: a local Ray for each run)
    worker: bool = True                # run the background restoration worker
    preload: bool = True               # load the model at startup (in the background) instead of on first use

    def __post_init__(self) -> None:
        _positive("`max_body_bytes`", self.max_body_bytes)
        _positive("`rate`", self.rate)
        _positive("`restore_poll_s`", self.restore_poll_s)
        _positive("`idempotency_ttl_s`", self.idempotency_ttl_s)
        for name in ("burst", "daily_quota", "max_held", "prediction_queue", "rate_limit_keys", "max_batch",
                     "deletion_queue", "max_image_bytes", "max_image_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise PlanError(f"`{name}` must be an integer >= 1; got {value!r}")
        from ..executors import executor_for

        executor_for(self.restore_executor, address=self.ray_address)   # names and combination checked here
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
