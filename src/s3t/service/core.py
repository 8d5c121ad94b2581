"""The service's operations, independent of HTTP: what each route calls, in one object per served run.

Concurrency and visibility (the semantics the HTTP API promises):

- One `S3T` serves the process. Its backbone switches adapters per call, so predictions take
  `model_lock` one at a time. Deletions never touch the model and never wait for predictions: the HTTP
  routes run predictions and reads in separate lanes (`lanes`), and hand deletions to the run's
  deletion queue (`S3T.deletions`, a group commit: `s3t.batch`), so predictions queued for the model
  hold no thread that a deletion, an auth check or /healthz needs.
- Deletion requests that arrive together are applied in one transaction, each in its own savepoint, in
  arrival order: its replay check, quota, capacity guard and hold or deletion (`_decide`) run in that
  transaction, so each is judged with the requests ahead of it counted, and one that fails (a quota, a
  conflict) fails alone. Each keeps its own receipt, ledger entry, idempotency key and quota count.
- A deletion is acknowledged (its HTTP response sent) only after its batch committed (the ledger entry,
  the erased records, the truncated orders and the new served set; SQLite with synchronous=FULL) and
  the batch's keys were destroyed and retired stages shredded. A prediction reads the served set from
  the registry when it starts computing (after taking `model_lock`), so any prediction that starts
  after an acknowledgement uses the served set that deletion chose, whichever replica acknowledged it;
  every prediction reports the served-set version it used.
- Restoration runs in a child process (`worker`); its results are switched in by `unlearning.rebuild`,
  which discards any order that saw a record deleted while it trained. One trainer per run, across
  replicas (the run's training lock: a PostgreSQL advisory lock when the registry is PostgreSQL).
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from ..audit import AuditReport
from ..batch import Batch
from ..errors import AuthError, ConflictError, DataError, NotFoundError, RateLimitError
from ..ingest import Addition
from ..records import Dataset
from ..system import S3T, Generation, Prediction
from ..unlearning import Receipt
from . import review
from .auth import Token, TokenCache, authenticate, require
from .guard import CapacityGuard, RateLimiter, SharedRateLimiter, check_quota, utc_day
from .lanes import Lane
from .metrics import Metrics
from .review import Flag, FlagSummary
from .settings import ServiceSettings
from .worker import RestorationWorker

__all__ = ["Service", "DeletionOutcome"]

log = logging.getLogger("s3t.service")


@dataclass(frozen=True)
class DeletionOutcome:
    """What became of a deletion request: applied (or replayed) with a receipt, or held with a flag."""

    outcome: str                 # applied | replayed | held
    receipt: Receipt | None = None
    flag: Flag | None = None     # the hold, or the alert recorded for an applied request
    replayed: bool = False       # answered from an idempotency key seen before (a receipt or a pending hold)


class Service:
    """One served run: its `S3T`, locks, abuse controls, restoration worker and metrics."""

    def __init__(self, run_dir: str | Path, settings: ServiceSettings | None = None) -> None:
        from .. import cache  # noqa: F401  (imports torch now: the first deletion must not pay for it)

        self.settings = settings or ServiceSettings()
        self.system = S3T.open(run_dir)
        self.system.deletions.max_batch = self.settings.max_batch
        self.system.deletions.max_queued = self.settings.deletion_queue
        registry = self.system.registry
        self.model_lock = threading.Lock()
        # Replicas share a PostgreSQL registry: their rate limits must too. A SQLite run has one server.
        self.limiter = (SharedRateLimiter(registry) if registry.postgres
                        else RateLimiter(max_keys=self.settings.rate_limit_keys))
        # A deletion is refused at the door by a bucket in memory: on SQLite the limiter itself; with shared
        # buckets, this replica's own bucket of the same rate and burst, which sees only the requests sent
        # to this replica, so it refuses only what exceeds the token's rate by this replica's traffic alone.
        # What it lets through spends the shared bucket in its group commit (`_decide`), so a flood of
        # refused requests never takes places in the deletion queue, whose writer every replica waits for.
        self.door = (RateLimiter(max_keys=self.settings.rate_limit_keys) if registry.postgres else self.limiter)
        self.guard = CapacityGuard(self.settings.guard, registry)
        self.tokens = TokenCache()   # deletions re-check revocation in their transaction
        self.worker = (RestorationWorker(self.system, restore_below=self.settings.restore_below,
                                         poll_s=self.settings.restore_poll_s, train_added=self.settings.train_added,
                                         executor=self.settings.restore_executor,
                                         ray_address=self.settings.ray_address, on_finish=self._restored)
                       if self.settings.worker else None)
        self.metrics = Metrics(self._state)
        self.model_ready = threading.Event()
        # The model's one thread with a bounded queue; writes and reads never wait behind predictions.
        self.model_lane = Lane("prediction", threads=1, limit=self.settings.prediction_queue)
        self.write_lane = Lane("write", threads=1)   # restoration requests (deletions go to the queue)
        self.read_lane = Lane("read", threads=4)
        # The capacity simulator takes up to seconds on a large run: its own thread, so it never holds one
        # that auth checks, status or /healthz need.
        self.capacity_lane = Lane("capacity", threads=1, limit=16)
        self._stopping = threading.Event()
        self.recent_latency: deque[float] = deque(maxlen=50)   # seconds of the last deletions this process applied
        self._capacity_lock = threading.Lock()
        self._capacity: tuple[object, dict] | None = None      # (state it was simulated for, result)
        self._housekeeping = threading.Thread(target=self._housekeep, name="s3t-housekeeping", daemon=True)

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        self.system.sweep()   # shred what a crash left: retired stages, and orphans unless a trainer runs
        try:   # here, before other threads run: an older run reads its kind from the model's config
            self.system.kind
        except Exception:   # the base model moved: the model's load reports it
            pass
        self._housekeeping.start()
        if self.settings.preload:
            self.model_lane.submit(self._load_model)
        if self.worker is not None:
            self.worker.start()

    def close(self) -> None:
        self._stopping.set()
        if self.worker is not None:
            self.worker.stop()
        for lane in (self.model_lane, self.write_lane, self.read_lane, self.capacity_lane):
            lane.close()
        if self._housekeeping.is_alive():
            self._housekeeping.join(10)
        self.system.close()   # applies what the deletion queue holds, then stops it

    def _housekeep(self) -> None:
        """Purge expired idempotency keys, guard buckets and idle rate-limit buckets at start, then hourly
        (or every TTL if shorter)."""
        every = max(1.0, min(self.settings.idempotency_ttl_s, 3600.0, self.settings.guard.window_s))
        while True:
            try:
                self.expire_keys()
                if isinstance(self.limiter, SharedRateLimiter):
                    self.limiter.expire()
            except Exception:   # keep serving; the next round retries
                log.exception("housekeeping (expired idempotency keys, guard and rate-limit buckets) failed")
            if self._stopping.wait(every):
                return

    def expire_keys(self) -> int:
        """Forget idempotency keys older than `idempotency_ttl_s` (an index range delete, never a scan), and
        guard buckets that have left the window."""
        with self.system.registry.transaction() as conn:
            self.guard.expire(conn)
            return self.system.registry.expire_idempotent(conn, before=self._key_cutoff())

    def _key_cutoff(self) -> str:
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=self.settings.idempotency_ttl_s)
        return cutoff.isoformat(timespec="microseconds")   # the registry's time format: compares as text

    def _load_model(self) -> None:
        try:
            with self.model_lock:
                self.system.trainer   # loads the backbone; the first prediction then starts warm
            self.model_ready.set()
        except Exception:
            log.exception("loading the model failed; predictions will retry and report the error")

    # -- auth ---------------------------------------------------------------------------------------
    def authorize(self, authorization: str | None, *roles: str, client: str, cached: bool = False) -> Token | None:
        """The caller's token, checked for one of `roles` and its rate limit; None for an anonymous caller
        of a `predict` endpoint on a server with public predictions. `cached`: the deletion path, whose
        group commit re-checks revocation (and, with shared rate limits, spends the token's bucket, after
        the check at `door`): a token seen before is taken from memory; otherwise the registry is asked,
        so a revocation takes effect on the next request."""
        if authorization is None and "predict" in roles and self.settings.public_predict:
            self.limiter.take(f"anonymous client {client}", rate=self.settings.rate, burst=self.settings.burst)
            return None
        token = authenticate(self.system.registry, authorization, cache=self.tokens if cached else None)
        require(token, *roles)
        key, rate, burst = self._bucket(token)
        (self.door if cached else self.limiter).take(key, rate=rate, burst=burst)
        return token

    def authorize_in_memory(self, authorization: str | None, *roles: str) -> Token | None:
        """`authorize(..., cached=True)` when it needs no I/O (a cached token), so the event loop can run it
        without a thread hop; None when it would need the registry."""
        if authorization is None or (token := self.tokens.get(authorization)) is None:
            return None
        require(token, *roles)
        key, rate, burst = self._bucket(token)
        self.door.take(key, rate=rate, burst=burst)
        return token

    @property
    def _rate_in_commit(self) -> bool:
        """Whether a deletion also spends a shared rate bucket in its group commit (one statement per batch
        and token, instead of a transaction per request)."""
        return self.door is not self.limiter

    def _bucket(self, token: Token) -> tuple[str, float, int]:
        return f"token {token.id}", token.rate or self.settings.rate, self.settings.burst

    # -- predictions --------------------------------------------------------------------------------
    def predict(self, texts: Sequence[str]) -> Prediction:
        if self.system.kind == "image":   # never let a client's string become a path the server reads
            raise DataError("this run classifies images: POST them base64-encoded to /v1/predict/images")
        return self._classify(texts)

    def predict_images(self, images: Sequence[bytes]) -> Prediction:
        """Classify encoded images (PNG/JPEG bytes), each within the server's byte and pixel limits."""
        from ..images import check

        if self.system.kind != "image":
            raise DataError("this run does not classify images" + (": send texts to /v1/predict"
                                                                    if self.system.kind == "text" else ""))
        for k, image in enumerate(images):
            check(image, where=f"image {k}", max_bytes=self.settings.max_image_bytes,
                  max_pixels=self.settings.max_image_pixels)
        return self._classify(list(images))

    def _classify(self, inputs: Sequence) -> Prediction:
        started = time.perf_counter()
        with self.model_lock:
            prediction = self.system.classify(inputs)
        self.model_ready.set()
        self.metrics.prediction_requests.inc()
        self.metrics.predicted_texts.inc(len(inputs))   # texts or images
        self.metrics.prediction_latency.observe(time.perf_counter() - started)
        return prediction

    def generate(self, prompts: Sequence[str], **settings) -> Generation:
        started = time.perf_counter()
        with self.model_lock:
            generation = self.system.complete(prompts, **settings)
        self.model_ready.set()
        self.metrics.prediction_requests.inc()
        self.metrics.predicted_texts.inc(len(prompts))
        self.metrics.prediction_latency.observe(time.perf_counter() - started)
        return generation

    # -- deletions ----------------------------------------------------------------------------------
    def delete(self, token: Token, *, ids: Sequence[str] = (), subjects: Sequence[str] = (),
               reference: str | None = None, idempotency_key: str | None = None) -> DeletionOutcome:
        """Replay, hold or apply one deletion request, and wait for its group commit."""
        return self.submit_delete(token, ids=ids, subjects=subjects, reference=reference,
                                  idempotency_key=idempotency_key).result()

    def submit_delete(self, token: Token, *, ids: Sequence[str] = (), subjects: Sequence[str] = (),
                      reference: str | None = None, idempotency_key: str | None = None) -> "Future[DeletionOutcome]":
        """Queue one deletion request for the next group commit; the future resolves once it is durable."""
        key = f"{token.id}:{idempotency_key}" if idempotency_key else None   # keys are per token
        ids, subjects = list(ids), list(subjects)
        started = time.perf_counter()

        def work(batch: Batch) -> DeletionOutcome:
            try:
                return self._decide(batch, token, key, ids=ids, subjects=subjects, reference=reference)
            except ConflictError as exc:   # name the key as the client sent it
                raise ConflictError(str(exc).replace(repr(key), repr(idempotency_key))) from None

        future = self.system.deletions.submit(work, ids=ids, keys=[key] if key else [], tokens=[token.id],
                                              rate=self._bucket(token) if self._rate_in_commit else None)
        future.add_done_callback(lambda f: self._answered(token, f, started))
        return future

    def _decide(self, batch: Batch, token: Token, key: str | None, *, ids: list[str], subjects: list[str],
                reference: str | None) -> DeletionOutcome:
        """One request in its group commit's transaction (the order of the checks is the order below)."""
        conn = batch.conn
        if batch.revoked(token.id):   # the auth cache may predate a revocation
            raise AuthError(f"token {token.id} was revoked")
        if self._rate_in_commit:
            bucket, rate, burst = self._bucket(token)
            batch.take_rate(bucket, rate=rate, burst=burst)
        # A key seen before (and not expired): the first request's result, whatever the limits say now.
        if key is not None and (replay := self._replay(batch, key, ids=ids, subjects=subjects, reference=reference)):
            return replay
        check_quota(token, len(ids) + len(subjects), used=batch.usage(token.id, utc_day()),
                    default=self.settings.daily_quota)
        reviewed = token.allows("admin")   # an admin's own request is its own review: never held
        verdict = self.guard.judge(token.id, self.system, batch, ids=ids, subjects=subjects)
        flagged = verdict.flagged and not reviewed
        if flagged and self.settings.guard.action == "hold":
            self._check_held_cap(token, conn)
            flag = review.hold(self.system, batch, token_id=token.id, ids=ids, subjects=subjects,
                               reference=reference, reason=verdict.reason, idempotency_key=key)
            return DeletionOutcome("held", flag=flag)
        receipt = batch.delete(ids=ids, subjects=subjects, reference=reference, idempotency_key=key,
                               requested_by=token.id)
        self.guard.record(batch, token.id, verdict, reviewed=reviewed)
        flag = (review.record_alert(self.system, conn, token_id=token.id, receipt=receipt, reason=verdict.reason)
                if flagged else None)
        return DeletionOutcome("applied", receipt=receipt, flag=flag)

    def _answered(self, token: Token, future: "Future[DeletionOutcome]", started: float) -> None:
        """Metrics and logs of a deletion request, once its group commit is done (and before its answer)."""
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            if isinstance(exc, AuthError):
                self.tokens.forget(token.id)
            return
        result = future.result()
        if result.replayed:
            self.metrics.deletion_requests.labels("replayed").inc()
            return
        if result.outcome == "held":
            self.metrics.guard_flags.labels("hold").inc()
            log.warning("held deletion request %s for review: %s", result.flag.id, result.flag.reason)
        elif result.outcome == "applied":
            self.metrics.deleted_records.inc(len(result.receipt.deleted))
            self.metrics.deletion_latency.observe(elapsed := time.perf_counter() - started)
            self.recent_latency.append(elapsed)
            if result.flag is not None:
                self.metrics.guard_flags.labels("alert").inc()
                log.warning("deletion request %s flagged (flag %s): %s", result.receipt.request_id, result.flag.id,
                            result.flag.reason)
            if self.worker is not None:
                self.worker.poke()
        self.metrics.deletion_requests.labels(result.outcome).inc()

    def _check_held_cap(self, token: Token, conn) -> None:
        held = self.system.registry.count_flagged(conn, status="pending", token_id=token.id)
        if held >= self.settings.max_held:
            raise RateLimitError(
                f"token {token.id} already has {held} deletion requests held for review, the most the server keeps "
                f"per token ({self.settings.max_held}); send more once an admin has applied or rejected some "
                "(GET /v1/review/{id} shows each one's status)", retry_after=60.0)

    def _replay(self, batch: Batch, key: str, **request) -> DeletionOutcome | None:
        conn = batch.conn
        cutoff = self._key_cutoff()
        held = review.flag_for_key(self.system, key, conn) if batch.has_flag(key) else None
        if held is not None and held[0].status != "pending" and (held[0].decided_at or "") < cutoff:
            batch.expire_key(key, before=cutoff)   # decided longer ago than the TTL: free again
            held = None
        if held is not None:
            flag, fingerprint = held
            if fingerprint != review.fingerprint(self.system, **request):
                raise ConflictError(f"idempotency key {key!r} was used for a different request "
                                    f"(held as {flag.id}); use a new key for a new request")
            if flag.status == "rejected":
                raise ConflictError(f"this request (held as {flag.id}) was rejected by an admin at "
                                    f"{flag.decided_at}: {flag.note or 'no reason given'}")
            if flag.status == "pending":
                return DeletionOutcome("held", flag=flag, replayed=True)
            return DeletionOutcome("replayed", receipt=Receipt.from_dict(batch.receipt(flag.request_id)),
                                   replayed=True)
        seen = batch.idempotent(key)
        if seen is None:
            return None
        stored = batch.receipt(seen["request_id"])
        if stored["created_at"] < cutoff:   # expired: a repeat is a new request (its receipt: "already deleted")
            batch.expire_key(key, before=cutoff)
            return None
        # The library checks the request matches the key's and returns the stored receipt.
        return DeletionOutcome("replayed", receipt=batch.delete(idempotency_key=key, **request), replayed=True)

    def receipts(self, token: Token, *, reference: str | None = None, limit: int = 20) -> list[Receipt]:
        """Receipts newest first, only those with `reference` if given; a non-admin token sees only its own
        requests' receipts (as with `receipt`)."""
        mine = None if token.allows("admin") else token.id
        return [Receipt.from_dict(r) for r in
                self.system.registry.recent_receipts(limit, reference=reference, requested_by=mine)]

    def export_receipt(self, token: Token, request_id: str) -> dict:
        """The signed, self-contained copy of a receipt (`S3T.export_receipt`), visible as with `receipt`."""
        from ..errors import IntegrityError

        self.receipt(token, request_id)   # the same "not found" for another token's request
        try:
            return self.system.export_receipt(request_id)
        except IntegrityError as exc:   # an entry made before the run had a signing key: nothing to export
            raise ConflictError(str(exc)) from None

    def receipt(self, token: Token, request_id: str) -> Receipt:
        """A stored receipt; a non-admin token sees only its own requests' receipts (another's is "not found",
        exactly as an unknown one)."""
        unknown = NotFoundError(f"no deletion request {request_id!r} visible to this token")
        try:
            receipt = self.system.receipt(request_id)
        except NotFoundError:
            raise unknown from None
        if not token.allows("admin") and receipt.requested_by != token.id:
            raise unknown
        return receipt

    # -- review of flagged requests -----------------------------------------------------------------
    def flags(self, *, status: str | None = None, limit: int = 100,
              after: str | None = None) -> tuple[list[FlagSummary], str | None]:
        """A page of flagged requests (counts, not ids) and the cursor of the next page."""
        return review.flags(self.system, status=status, limit=limit, after=after)

    def flag(self, token: Token, flag_id: str) -> Flag:
        """One flagged request with its ids; a non-admin token sees only its own (another's is "not found")."""
        unknown = NotFoundError(f"no flagged request {flag_id!r} visible to this token")
        try:
            flag = review.get_flag(self.system, flag_id)
        except NotFoundError:
            raise unknown from None
        if not token.allows("admin") and flag.token_id != token.id:
            raise unknown
        return flag

    def preview_flag(self, flag_id: str) -> dict:
        """What applying a pending hold would do to each shard, now (`review.preview`)."""
        return review.preview(self.system, flag_id)

    def apply(self, admin: Token, flag_id: str, *, note: str | None = None) -> Receipt:
        return self.submit_apply(admin, flag_id, note=note).result()

    def submit_apply(self, admin: Token, flag_id: str, *, note: str | None = None) -> "Future[Receipt]":
        """Apply a held request in the next group commit; what it consumes counts as reviewed."""
        def work(batch: Batch) -> Receipt:
            before = sum(batch.capacities().values())
            receipt = review.apply_in(batch, self.system, flag_id, decided_by=admin.id, note=note)
            self.guard.record_reviewed(batch, before - sum(batch.capacities().values()))
            return receipt

        def done(future: "Future[Receipt]") -> None:
            if not future.cancelled() and future.exception() is None:
                self.metrics.deleted_records.inc(len(future.result().deleted))
                if self.worker is not None:
                    self.worker.poke()

        future = self.system.deletions.submit(work)
        future.add_done_callback(done)
        return future

    def reject(self, admin: Token, flag_id: str, *, note: str | None = None) -> Flag:
        return self.submit_reject(admin, flag_id, note=note).result()

    def submit_reject(self, admin: Token, flag_id: str, *, note: str | None = None) -> "Future[Flag]":
        return self.system.deletions.submit(
            lambda batch: review.reject_in(batch, self.system, flag_id, decided_by=admin.id, note=note))

    # -- adding records and the audit -----------------------------------------------------------------
    def add(self, token: Token, data: Dataset, *, replace_deleted: bool = False) -> Addition:
        """Add records (no training here); the worker trains them in if `train_added`. Not under `write_lock`
        and not in the write lane: a re-add waits for the training lock, and deletions must not wait with it
        (the registry's write transaction serialises the addition with them)."""
        addition = self.system.add(data, replace_deleted=replace_deleted, requested_by=token.id)
        self.metrics.added_records.inc(addition.records)
        if self.worker is not None:
            self.worker.poke()
        return addition

    def audit(self, *, replay: int | str = 0, seed: int | None = None) -> AuditReport:
        """The run's audit (`S3T.audit`). A replay trains on the served model's backbone, so it holds the model
        lock and predictions wait for it: only a server started with `audit_replay` replays."""
        if not self.model_ready.is_set():
            # The audit names stages from the model's config: wait for the load (two threads importing
            # transformers at once fail) rather than race it; a load that fails leaves the lineage check
            # to skip with its reason.
            with self.model_lock:
                try:
                    self.system.trainer
                except Exception:
                    pass
        if replay == 0:
            return self.system.audit()
        if not self.settings.audit_replay:
            raise ConflictError("this server does not replay stages (a replay trains on the served model and "
                                "predictions wait for it): run `s3t audit RUN_DIR --replay N` next to it, or start "
                                "the server with --audit-replay")
        with self.model_lock:
            return self.system.audit(replay=replay, seed=seed)

    # -- status and restoration ---------------------------------------------------------------------
    def status(self, token: Token | None = None) -> dict:
        """The run's state. Coarse (serving, version, live shards) unless the token has the `metrics` role:
        per-shard capacity tells an attacker where deletions hurt most."""
        st = self.system.status()
        coarse = {"trained": st.trained, "serving": st.serving, "served_version": st.served_version,
                  "live_shards": sum(s.served_depth > 0 for s in st.shards), "shards_total": len(st.shards),
                  "model_loaded": self.model_ready.is_set()}
        if token is None or not token.allows("metrics"):
            return coarse
        return coarse | {
            "num_slices": self.system.plan.num_slices,
            "live_records": st.live_records, "deleted_records": st.deleted_records,
            "truncated_orders": st.truncated_orders, "stale_orders": st.stale_orders,
            "unseen_records": st.unseen_records,
            "capacity_left": min((s.deletions_to_drop for s in st.shards if s.served_depth > 0), default=0),
            "shards": [asdict(s) for s in st.shards],
            "restoration": self.worker.describe() if self.worker else {"state": "disabled"},
            "held_requests": review.pending(self.system),
            "deletion_latency": self._latency(),
        }

    def _latency(self) -> dict:
        """The last deletions' apply-and-commit time in this process (what the latency histogram observes)."""
        recent = [1000.0 * s for s in self.recent_latency]
        if not recent:
            return {"count": 0, "median_ms": None, "max_ms": None, "last_ms": None}
        return {"count": len(recent), "median_ms": round(statistics.median(recent), 1),
                "max_ms": round(max(recent), 1), "last_ms": round(recent[-1], 1)}

    def capacity(self, *, trials: int | None = None) -> dict:
        """The capacity simulator on the current state (`S3T.remaining_capacity`), with each shard's worst case.
        Simulated again only when the orders' depths or the live cell counts changed since the last call."""
        registry = self.system.registry
        with self._capacity_lock:
            orders = registry.orders()
            state = (trials, tuple((o["shard"], o["position"], o["depth"]) for o in orders),
                     tuple(sorted(registry.live_counts().items())))
            if self._capacity is None or self._capacity[0] != state:
                self._capacity = (state, self.system.remaining_capacity(trials=trials))
            result = self._capacity[1]
        worst = self.system.status().shards
        return result | {"num_slices": self.system.plan.num_slices,
                         "worst_case": [{"shard": s.shard, "deletions_to_drop": s.deletions_to_drop} for s in worst]}

    def health(self) -> dict:
        """Liveness: the registry answers."""
        version, _ = self.system.served()
        return {"status": "ok", "served_version": version, "model_loaded": self.model_ready.is_set()}

    def restore(self) -> dict:
        if self.worker is None:
            raise ConflictError("this server runs without a restoration worker (--no-worker): "
                                "run `s3t restore RUN_DIR` instead")
        self.worker.request()
        return self.worker.describe()

    def _restored(self, outcome: str, orders: int) -> None:
        self.metrics.restorations.labels(outcome).inc()
        self.metrics.restored_orders.inc(orders)

    def _state(self) -> dict:
        return {"status": self.system.status(), "pending_holds": review.pending(self.system),
                "restoring": self.worker is not None and self.worker.state == "running",
                "batches": self.system.deletions.batches, "batched": self.system.deletions.applied,
                "queued": self.system.deletions.waiting}
