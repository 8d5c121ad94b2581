"""Lanes: one executor per kind of work, so a flood of one kind cannot delay another.

Why: the model is used by one prediction at a time. Were routes plain `def` functions, every prediction
waiting for the model would hold one of the event loop's shared worker threads (anyio's 40) while it
waits, and a deletion or a health check arriving behind 40 of them would wait for the model too. The
routes are `async` instead and hand their work to a lane: a waiting prediction is a queued future, not
a blocked thread. The service has three lanes: predictions (one thread, the model's; a bounded queue,
beyond which `BusyError`: 503 with Retry-After), writes (deletions, review decisions, restoration
requests) and reads (auth, status, receipts, listings, health, metrics).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from ..errors import BusyError

__all__ = ["Lane"]

T = TypeVar("T")


class Lane:
    """A named thread pool that counts the calls waiting in it or running, and refuses beyond `limit`."""

    def __init__(self, name: str, *, threads: int, limit: int | None = None, retry_after: float = 1.0) -> None:
        self.name, self.limit, self.retry_after = name, limit, retry_after
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"s3t-{name}")
        self._pending = 0
        self._lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Calls submitted and not finished (waiting or running)."""
        return self._pending

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> "Future[T]":
        """Queue `fn(*args, **kwargs)`; BusyError if `limit` calls are already waiting or running."""
        with self._lock:
            if self.limit is not None and self._pending >= self.limit:
                raise BusyError(f"the server is busy: {self._pending} {self.name} requests are waiting (it queues "
                                f"at most {self.limit}); retry in {self.retry_after:g} s", retry_after=self.retry_after)
            self._pending += 1
        try:
            future = self._executor.submit(fn, *args, **kwargs)
        except BaseException:
            self._done(None)
            raise
        future.add_done_callback(self._done)   # also when cancelled before it ran
        return future

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` in this lane, awaited without holding a thread of the event loop's."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def close(self) -> None:
        """Drop the calls still waiting; the running ones finish in the background."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _done(self, _future: Future | None) -> None:
        with self._lock:
            self._pending -= 1
