"""The service's operations, independent of HTTP: what each route calls, in one object per served run.

Concurrency and visibility (the semantics the HTTP API promises):

- One `S3T` serves the process. Its backbone switches adapters per call, so predictions take
  `model_lock` one at a time. Deletions never touch the model and never wait for predictions.
- Deletions in this process take `write_lock` (guard check, then apply, then quota), and every registry
  write transaction begins with SQLite's BEGIN IMMEDIATE and waits on a busy lock, so concurrent
  requests and the restoration child serialise instead of failing with "database is locked".
- A deletion is acknowledged (its HTTP response sent) only after its transaction committed: the ledger
  entry, the erased records, the truncated orders and the new served set, all at once, with SQLite's
  synchronous=FULL. A prediction reads the served set from the registry when it starts computing (after
  taking `model_lock`), so any prediction that starts after an acknowledgement uses the served set that
  deletion chose; every prediction reports the served-set version it used.
- Restoration runs in a child process (`worker`); its results are switched in by `unlearning.rebuild`,
  which discards any order that saw a record deleted while it trained.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import ConflictError, NotFoundError
from ..system import S3T, Prediction
from ..unlearning import Receipt
from . import review
from .auth import Token, authenticate, require
from .guard import CapacityGuard, RateLimiter, check_quota
from .metrics import Metrics
from .review import Flag
from .settings import ServiceSettings
from .worker import RestorationWorker

__all__ = ["Service", "DeletionOutcome"]

log = logging.getLogger("s3t.service")


@dataclass(frozen=True)
class DeletionOutcome:
    """What became of a deletion request: applied (or replayed) with a receipt, or held with a flag."""

    outcome: str                 # applied | replayed | held
    receipt: Receipt | None = None
    flag: Flag | None = None


class Service:
    """One served run: its `S3T`, locks, abuse controls, restoration worker and metrics."""

    def __init__(self, run_dir: str | Path, settings: ServiceSettings | None = None) -> None:
        from .. import cache  # noqa: F401  (imports torch now: the first deletion must not pay for it)

        self.settings = settings or ServiceSettings()
        self.system = S3T.open(run_dir)
        self.model_lock = threading.Lock()
        self.write_lock = threading.Lock()
        self.limiter = RateLimiter()
        self.guard = CapacityGuard(self.settings.guard)
        self.worker = (RestorationWorker(self.system, restore_below=self.settings.restore_below,
                                         poll_s=self.settings.restore_poll_s, on_finish=self._restored)
                       if self.settings.worker else None)
        self.metrics = Metrics(self._state)
        self.model_ready = threading.Event()

    # -- lifecycle ----------------------------------------------------------------------------------
    def start(self) -> None:
        self.system.sweep()   # shred what a crash left: retired stages, and orphans unless a trainer runs
        if self.settings.preload:
            threading.Thread(target=self._load_model, name="s3t-preload", daemon=True).start()
        if self.worker is not None:
            self.worker.start()

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        self.system.close()

    def _load_model(self) -> None:
        try:
            with self.model_lock:
                self.system.trainer   # loads the backbone; the first prediction then starts warm
            self.model_ready.set()
        except Exception:
            log.exception("loading the model failed; predictions will retry and report the error")

    # -- auth ---------------------------------------------------------------------------------------
    def authorize(self, authorization: str | None, role: str, *, client: str) -> Token | None:
        """The caller's token, checked for `role` and its rate limit; None for an anonymous public predict."""
        if authorization is None and role == "predict" and self.settings.public_predict:
            self.limiter.take(f"anonymous client {client}", rate=self.settings.rate, burst=self.settings.burst)
            return None
        token = authenticate(self.system.registry, authorization)
        require(token, role)
        self.limiter.take(f"token {token.id}", rate=token.rate or self.settings.rate, burst=self.settings.burst)
        return token

    # -- predictions --------------------------------------------------------------------------------
    def predict(self, texts: Sequence[str]) -> Prediction:
        started = time.perf_counter()
        with self.model_lock:
            prediction = self.system.classify(texts)
        self.model_ready.set()
        self.metrics.prediction_requests.inc()
        self.metrics.predicted_texts.inc(len(texts))
        self.metrics.prediction_latency.observe(time.perf_counter() - started)
        return prediction

    # -- deletions ----------------------------------------------------------------------------------
    def delete(self, token: Token, *, ids: Sequence[str] = (), subjects: Sequence[str] = (),
               reference: str | None = None, idempotency_key: str | None = None) -> DeletionOutcome:
        """Replay, hold or apply one deletion request (the order of the checks is the order below)."""
        key = f"{token.id}:{idempotency_key}" if idempotency_key else None   # keys are per token
        try:
            return self._delete(token, key, ids=ids, subjects=subjects, reference=reference)
        except ConflictError as exc:   # name the key as the client sent it
            raise ConflictError(str(exc).replace(repr(key), repr(idempotency_key))) from None

    def _delete(self, token: Token, key: str | None, *, ids: Sequence[str], subjects: Sequence[str],
                reference: str | None) -> DeletionOutcome:
        started = time.perf_counter()
        with self.write_lock:
            # A key seen before: the first request's result, whatever the limits say now.
            if key is not None and (replay := self._replay(key, ids=ids, subjects=subjects, reference=reference)):
                self.metrics.deletion_requests.labels("replayed").inc()
                return replay
            check_quota(self.system.registry, token, len(ids) + len(subjects), default=self.settings.daily_quota)
            verdict = self.guard.judge(token.id, self.system, ids=ids, subjects=subjects)
            if verdict.flagged and self.settings.guard.action == "hold":
                flag = review.hold(self.system, token_id=token.id, ids=ids, subjects=subjects, reference=reference,
                                   reason=verdict.reason, idempotency_key=key)
                self.metrics.guard_flags.labels("hold").inc()
                self.metrics.deletion_requests.labels("held").inc()
                log.warning("held deletion request %s for review: %s", flag.id, verdict.reason)
                return DeletionOutcome("held", flag=flag)
            receipt = self.system.delete(ids=ids, subjects=subjects, reference=reference, idempotency_key=key,
                                         requested_by=token.id)
            self.guard.record(token.id, verdict)
            if verdict.flagged:
                flag = review.record_alert(self.system, token_id=token.id, receipt=receipt, reason=verdict.reason)
                self.metrics.guard_flags.labels("alert").inc()
                log.warning("deletion request %s flagged (flag %s): %s", receipt.request_id, flag.id, verdict.reason)
        self.metrics.deletion_requests.labels("applied").inc()
        self.metrics.deleted_records.inc(len(receipt.deleted))
        self.metrics.deletion_latency.observe(time.perf_counter() - started)
        if self.worker is not None:
            self.worker.poke()
        return DeletionOutcome("applied", receipt=receipt)

    def _replay(self, key: str, **request) -> DeletionOutcome | None:
        held = review.flag_for_key(self.system, key)
        if held is not None:
            flag, fingerprint = held
            if fingerprint != review.fingerprint(self.system, **request):
                raise ConflictError(f"idempotency key {key!r} was used for a different request "
                                    f"(held as {flag.id}); use a new key for a new request")
            if flag.status == "rejected":
                raise ConflictError(f"this request (held as {flag.id}) was rejected by an admin at "
                                    f"{flag.decided_at}: {flag.note or 'no reason given'}")
            if flag.status == "pending":
                return DeletionOutcome("held", flag=flag)
            return DeletionOutcome("replayed", receipt=self.system.receipt(flag.request_id))
        if self.system.idempotent_receipt(key) is None:
            return None
        # The library checks the request matches the key's and returns the stored receipt.
        return DeletionOutcome("replayed", receipt=self.system.delete(idempotency_key=key, **request))

    def receipt(self, token: Token, request_id: str) -> Receipt:
        """A stored receipt; a non-admin token sees only its own requests' receipts."""
        receipt = self.system.receipt(request_id)
        if not token.allows("admin") and receipt.requested_by != token.id:
            raise NotFoundError(f"no deletion request {request_id!r} made with token {token.id}")
        return receipt

    # -- review of flagged requests -----------------------------------------------------------------
    def flags(self, *, status: str | None = None) -> list[Flag]:
        return review.flags(self.system, status=status)

    def flag(self, token: Token, flag_id: str) -> Flag:
        flag = review.get_flag(self.system, flag_id)
        if not token.allows("admin") and flag.token_id != token.id:
            raise NotFoundError(f"no flagged request {flag_id!r} made with token {token.id}")
        return flag

    def apply(self, admin: Token, flag_id: str, *, note: str | None = None) -> Receipt:
        with self.write_lock:
            receipt = review.apply(self.system, flag_id, decided_by=admin.id, note=note)
        self.metrics.deleted_records.inc(len(receipt.deleted))
        if self.worker is not None:
            self.worker.poke()
        return receipt

    def reject(self, admin: Token, flag_id: str, *, note: str | None = None) -> Flag:
        with self.write_lock:
            return review.reject(self.system, flag_id, decided_by=admin.id, note=note)

    # -- status and restoration ---------------------------------------------------------------------
    def status(self) -> dict:
        st = self.system.status()
        return {
            "trained": st.trained, "serving": st.serving, "served_version": st.served_version,
            "live_records": st.live_records, "deleted_records": st.deleted_records,
            "truncated_orders": st.truncated_orders,
            "capacity_left": min((s.deletions_to_drop for s in st.shards if s.served_depth > 0), default=0),
            "shards": [asdict(s) for s in st.shards],
            "restoration": self.worker.describe() if self.worker else {"state": "disabled"},
            "held_requests": len(review.flags(self.system, status="pending")),
            "model_loaded": self.model_ready.is_set(),
        }

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
        return {"status": self.system.status(), "pending_holds": len(review.flags(self.system, status="pending")),
                "restoring": self.worker is not None and self.worker.state == "running"}
