"""Background restoration: a thread in the server that runs `S3T.restore()` in a child process.

Training in a child keeps predictions and deletions responsive (the child has its own model, runs at a
lower priority and touches the registry only in short transactions) and a crash of either side cannot
corrupt the other. The exactness of what gets served is `unlearning.rebuild`'s: it switches an order in
only after checking, in the same transaction, that none of its artifacts saw a record deleted while it
trained; such a result is discarded and that order is retrained on the next run.

Policy: a run starts when an admin asks (POST /v1/restore; remembered in the registry until a run
completes, so a restart resumes it), when some shard's served depth is below `restore_below`, or (with
`train_added`) when records were added that some trained order has not seen (stale orders). After a run
the policy waits for the served set or the record counts to change before triggering again, so a shard
that cannot be restored (all its records deleted) does not spin. One trainer at a time per run folder (the library's
training lock: a child that finds it held exits BUSY), and the child dies with the server (Linux
parent-death signal).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..registry import utcnow

__all__ = ["RestorationWorker", "REQUEST_KEY", "main"]

log = logging.getLogger("s3t.service.worker")

REQUEST_KEY = "service.restore_requested"   # registry meta: when an admin asked for a restoration
BUSY = 75   # exit code of a child that found another process training the run (EX_TEMPFAIL)


class RestorationWorker:
    """Starts restoration children by policy or on request; never blocks its caller."""

    def __init__(self, system, *, restore_below: int | None, poll_s: float, train_added: bool = False,
                 executor: str = "local", ray_address: str | None = None,
                 on_finish: Callable[[str, int], None] = lambda outcome, orders: None) -> None:
        self.system = system
        self.executor = executor
        self.ray_address = ray_address
        self.restore_below = restore_below
        self.train_added = train_added
        self.poll_s = poll_s
        self.on_finish = on_finish
        self.state = "idle"
        self.runs = {"started": 0, "completed": 0, "failed": 0, "busy": 0}
        self.orders_restored = 0
        self.last: dict | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._child: subprocess.Popen | None = None
        self._state_after_last_run: tuple[int, int, int] | None = None   # (served version, live, deleted)
        self._backoff = poll_s
        self._thread = threading.Thread(target=self._loop, name="s3t-restoration", daemon=True)

    # -- control ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        child = self._child
        if child is not None and child.poll() is None:
            child.terminate()
        self._thread.join(timeout)

    def request(self) -> None:
        """Ask for a run (persisted: a restart before it completes runs it again)."""
        with self.system.registry.transaction() as conn:
            self.system.registry.set_meta(conn, REQUEST_KEY, utcnow())
        self._wake.set()

    def poke(self) -> None:
        """Re-check the policy now (after a deletion)."""
        self._wake.set()

    def requested(self) -> bool:
        return self.system.registry.get_meta(REQUEST_KEY) is not None

    def describe(self) -> dict:
        return {"state": self.state, "policy": {"restore_below": self.restore_below, "train_added": self.train_added},
                "requested": self.requested(),
                "runs": dict(self.runs), "orders_restored": self.orders_restored, "last": self.last}

    # -- the loop -----------------------------------------------------------------------------------
    def _due(self) -> bool:
        if self.requested():
            return True
        if self.restore_below is None and not self.train_added:
            return False
        status = self.system.status()
        if not status.trained or _state(status) == self._state_after_last_run:
            return False   # nothing changed since the last run: it would restore nothing more
        if self.train_added and status.stale_orders:
            return True
        return (self.restore_below is not None and status.truncated_orders > 0
                and any(s.served_depth < self.restore_below for s in status.shards))

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self._due():
                    self._run()
            except Exception:   # keep serving: a failed check is retried at the next poll
                log.exception("restoration worker check failed")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def _run(self) -> None:
        asked = self.system.registry.get_meta(REQUEST_KEY)
        started, t0 = utcnow(), time.perf_counter()
        self.state = "running"
        self.runs["started"] += 1
        cmd = [sys.executable, "-m", "s3t.service.worker", str(self.system.run_dir), "--parent", str(os.getpid()),
               "--executor", self.executor, *(["--address", self.ray_address] if self.ray_address else [])]
        self._child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        out, _ = self._child.communicate()
        code = self._child.returncode
        self._child = None
        orders = 0
        if code == 0:
            outcome = "completed"
            orders = int(json.loads(out.strip().splitlines()[-1])["completed"])
            self.orders_restored += orders
            self._backoff = self.poll_s
            if asked is not None:
                with self.system.registry.transaction() as conn:   # clear only the request this run served
                    self.system.registry.delete_meta(conn, REQUEST_KEY, if_value=asked)
        else:
            outcome = "busy" if code == BUSY else "failed"
            if outcome == "failed" and not self._stop.is_set():
                log.error("restoration child exited with code %s; retrying in %.0f s", code, self._backoff)
            self._stop.wait(self._backoff)   # another run holds the lock, or this one failed: back off
            self._backoff = min(60.0, self._backoff * 2)
        self.runs[outcome] += 1
        self._state_after_last_run = _state(self.system.status()) if outcome == "completed" else None
        self.last = {"started_at": started, "finished_at": utcnow(), "outcome": outcome, "orders": orders,
                     "seconds": round(time.perf_counter() - t0, 3)}
        self.state = "idle"
        self.on_finish(outcome, orders)


def _state(status) -> tuple[int, int, int]:
    """What a restoration run can change, or a deletion or an addition: the policy re-triggers on a change."""
    return status.served_version, status.live_records, status.deleted_records


# -- the child process ------------------------------------------------------------------------------
def _die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (kill -9 of the server included)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):   # not Linux: the file lock still prevents two runs at once
        pass
    if os.getppid() != parent:   # the parent died before the signal was armed
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> int:
    """`python -m s3t.service.worker RUN_DIR [--parent PID] [--executor ray [--address ADDR]]`: restore once,
    print {"completed": n}."""
    import argparse

    from ..executors import EXECUTORS, executor_for

    parser = argparse.ArgumentParser(prog="python -m s3t.service.worker")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--parent", type=int)
    parser.add_argument("--executor", choices=EXECUTORS, default="local")
    parser.add_argument("--address")
    args = parser.parse_args(argv)
    if args.parent:
        _die_with_parent(args.parent)
    os.nice(10)   # training yields the CPU to predictions and deletions
    from ..errors import RunBusyError
    from ..system import S3T

    system = S3T.open(args.run_dir)
    try:
        # takes the run's training lock (torch loads only then)
        completed = system.restore(progress=False, executor=executor_for(args.executor, address=args.address))
    except RunBusyError:
        return BUSY
    finally:
        system.close()
    print(json.dumps({"completed": completed}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
