"""Errors raised by s3t. Every message names the offending input and how to fix it.

    S3TError                 base class: catch this to handle any s3t failure
    ├── PlanError            a plan field is invalid or inconsistent with the model
    ├── DataError            bad records: duplicate ids, missing fields, empty set, unknown labels
    ├── RunError             a run folder cannot be created, opened or used
    │   ├── RunExistsError   `S3T.create` refuses to overwrite an existing run
    │   ├── RunNotFoundError no run at the given folder
    │   ├── RunBusyError     another process is training (train/restore) the run
    │   └── NotTrainedError  the run has no trained model yet: call `train()`
    ├── NeedsRestoreError    deletions left no shard with a live order: call `restore()`
    ├── IntegrityError       a stored artifact or lineage failed verification
    ├── NotFoundError        an unknown receipt, held request or service token id
    ├── ConflictError        an idempotency key reused for another request; a decided held request
    ├── AuthError            a service token is missing, unknown or revoked (HTTP 401)
    │   └── ForbiddenError   the token is valid but lacks the role the endpoint needs (HTTP 403)
    ├── RateLimitError       a token exceeded its request rate, daily quota or held requests (HTTP 429)
    └── BusyError            the service has as many predictions waiting as it queues (HTTP 503)
"""

from __future__ import annotations

__all__ = [
    "S3TError",
    "PlanError",
    "DataError",
    "RunError",
    "RunExistsError",
    "RunNotFoundError",
    "RunBusyError",
    "NotTrainedError",
    "NeedsRestoreError",
    "IntegrityError",
    "NotFoundError",
    "ConflictError",
    "AuthError",
    "ForbiddenError",
    "RateLimitError",
    "BusyError",
]


class S3TError(Exception):
    """Base class of every error s3t raises on purpose."""


class PlanError(S3TError, ValueError):
    """A plan field is invalid or inconsistent with the base model."""


class DataError(S3TError, ValueError):
    """The records given are unusable; the message names the record or line."""


class RunError(S3TError):
    """A run folder cannot be created, opened or used."""


class RunExistsError(RunError):
    """`S3T.create` was pointed at a folder that already holds a run."""


class RunNotFoundError(RunError):
    """No run was found at the given folder."""


class RunBusyError(RunError):
    """Another process is training (`train` or `restore`) the run; only one may at a time."""


class NotTrainedError(RunError):
    """The run has not been trained yet."""


class NeedsRestoreError(S3TError):
    """Deletions left no shard with a live order; the model must be restored first."""


class IntegrityError(S3TError):
    """A stored artifact or lineage record failed verification."""


class NotFoundError(S3TError, LookupError):
    """A receipt, held request or token id is unknown; the message says where to list valid ones."""


class ConflictError(S3TError):
    """The request contradicts stored state: an idempotency key reused for a different request, or a
    held request that was already applied or rejected."""


class AuthError(S3TError):
    """A service request has no token, or an unknown or revoked one."""


class ForbiddenError(AuthError):
    """A valid service token lacks the role the endpoint needs."""


class RateLimitError(S3TError):
    """A token exceeded its request rate or its daily deletion quota; retry after `retry_after` seconds."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    @classmethod
    def bucket(cls, key: str, *, rate: float, burst: int, wait: float) -> "RateLimitError":
        """A token bucket of `rate` requests/s and `burst` is empty for `key` for another `wait` seconds."""
        return cls(f"rate limit of {rate:g} requests/s (burst {burst}) exceeded for {key}; retry in {wait:.2f} s",
                   retry_after=wait)


class BusyError(S3TError):
    """A queue is full (the service's predictions, or the run's deletions waiting for a group commit);
    retry after `retry_after` seconds."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
