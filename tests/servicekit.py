"""Helpers for the service tests and benchmarks: a real `s3t serve` subprocess on loopback, tokens,
and the fault-injection loop (shared by tests/test_service_faults.py and benchmarks/service_faults.py).

Every loop here is bounded in iterations and time; servers are always stopped (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HOST = "127.0.0.1"   # loopback only


def child_env() -> dict[str, str]:
    """The environment of a server child: offline, unbuffered, and importing the very s3t sources this
    process imported (a worktree's `src`, not whatever an editable install points at)."""
    import s3t

    source = str(Path(s3t.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PYTHONPATH=path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """`python -m s3t.cli serve RUN_DIR --port P ...` as a child process, ready when /healthz answers."""

    def __init__(self, run_dir: Path, *args: str, log: Path | None = None, startup_s: float = 300.0) -> None:
        self.run_dir = Path(run_dir)
        self.args = list(args)
        self.log_path = log or self.run_dir.parent / f"server-{uuid.uuid4().hex[:8]}.log"
        self.startup_s = startup_s
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> "Server":
        for _attempt in range(5):   # a free port can be taken between the probe and the bind: retry
            self.port = free_port()
            env = child_env()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "s3t.cli", "serve", str(self.run_dir), "--host", HOST,
                     "--port", str(self.port), *self.args],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
            if self._wait_ready():
                return self
            self.stop()
        raise RuntimeError(f"the server did not start; log:\n{self.log()}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2.0).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        return False

    def kill(self) -> None:
        """kill -9: no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> int | None:
        """Graceful stop (SIGTERM), then SIGKILL if it hangs; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)   # a graceful stop on a loaded machine can take a while: never a verdict
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, token: str | None = None, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kwargs.pop("timeout", 60.0), **kwargs)

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class InProcessServer:
    """The service app in this process, under uvicorn in a thread: tests can reach into `service` (patch
    the model, read queue lengths) while real HTTP clients talk to it over loopback."""

    def __init__(self, run_dir: Path, settings=None) -> None:
        from s3t.service.app import create_app

        self.app = create_app(run_dir, settings)
        self.service = self.app.state.service
        self.port = 0
        self._server = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def __enter__(self) -> "InProcessServer":
        import uvicorn

        from s3t.service.app import uvicorn_config

        self.port = free_port()
        self._server = uvicorn.Server(uvicorn_config(self.app, host=HOST, port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, name="uvicorn", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(60)

    def client(self, token: str | None = None, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kwargs.pop("timeout", 60.0), **kwargs)


def make_token(run_dir: Path, *roles: str, name: str = "test", rate: float | None = None,
               quota: int | None = None) -> str:
    """A token secret for a run (the registry is shared with a running server: it sees it at once)."""
    import s3t
    from s3t.service.auth import create_token

    system = s3t.S3T.open(run_dir)
    try:
        _, secret = create_token(system.registry, name=name, roles=roles or ("predict",), rate=rate, daily_quota=quota)
    finally:
        system.close()
    return secret


def worker_children(run_dir: Path) -> list[int]:
    """Pids of restoration children still running for this run (there must be none after a kill -9)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"s3t.service.worker" in cmd and str(run_dir).encode() in cmd:
                pids.append(int(entry.name))
    return pids


def wait_for(predicate, *, timeout: float, what: str = "condition", every: float = 0.05):
    """Poll `predicate` until it returns something truthy and return that (a condition, never a fixed sleep:
    `timeout` is a ceiling far above the idle figure, so a loaded machine answers late, not wrong)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def by_cell(run_dir: Path) -> dict[tuple[int, int], list[str]]:
    """Live record ids of the run grouped by (shard, slice)."""
    import s3t

    system = s3t.S3T.open(run_dir)
    try:
        return {(shard, sl): list(ids) for shard in range(system.plan.num_shards)
                for sl, ids in system.registry.live_members(shard).items()}
    finally:
        system.close()


def served_lineage_ids(run_dir: Path, version: int) -> set[str]:
    """Every record id in the lineage of served-set `version`'s artifacts."""
    import json

    from sqlalchemy import select

    import s3t
    from s3t.registry import lineage, served_sets

    system = s3t.S3T.open(run_dir)
    try:
        with system.registry.engine.connect() as conn:
            components = json.loads(conn.execute(select(served_sets.c.components)
                                                 .where(served_sets.c.version == version)).scalar_one())
            artifacts = [a for c in components for a in c["artifacts"]]
            return set(conn.execute(select(lineage.c.record_id).where(lineage.c.artifact.in_(artifacts))).scalars())
    finally:
        system.close()


# -- fault injection ------------------------------------------------------------------------------------
@dataclass
class FaultFigures:
    kills: int = 0
    requests: int = 0          # deletion requests sent
    acknowledged: int = 0      # answered 200 with a receipt
    unanswered: int = 0        # cut off by a kill (retried with the same key after the restart)
    lost: int = 0              # acknowledged, but not in the ledger or the ids not deleted after restart
    tainted: int = 0           # served artifacts whose lineage holds a deleted id, summed over checks
    corrupt: int = 0           # served artifacts whose file fails its hash, summed over checks
    duplicates: int = 0        # idempotency keys that produced more than one ledger entry
    restorations: int = 0      # restoration runs that completed between kills
    orphans: int = 0           # restoration children that outlived a killed server
    grouped: int = 0           # requests that shared a group commit with an earlier one (seen before kills)
    errors: list = field(default_factory=list)   # answers other than 200 (there must be none)
    seconds: float = 0.0
    receipts: dict = field(default_factory=dict, repr=False)   # idempotency key -> acknowledged receipt

    def summary(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("receipts", "errors")} | {
            "errors": len(self.errors)}


def _grouped(server: Server, token: str) -> int:
    """Deletion requests the server applied in a transaction shared with an earlier one, from /metrics
    (0 if it cannot tell: the token lacks the metrics role, or the server is busy)."""
    try:
        text = server.client(token, timeout=10.0).get("/metrics").text
    except httpx.HTTPError:
        return 0
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith(("s3t_deletion_batches_total ", "s3t_deletion_batched_requests_total "))}
    return int(values.get("s3t_deletion_batched_requests_total", 0) - values.get("s3t_deletion_batches_total", 0))


def check_run(run_dir: Path, figures: FaultFigures) -> None:
    """Open the run offline (as a restart would) and check every acknowledged deletion and the served set."""
    import s3t
    from s3t.store import ArtifactStore

    system = s3t.S3T.open(run_dir)
    try:
        reg = system.registry
        ledger = {r.request_id: r for r in system.receipts()}
        located = reg.locate(sorted({i for r in figures.receipts.values() for i in r["deleted"]}))
        for receipt in figures.receipts.values():
            stored = ledger.get(receipt["request_id"])
            if stored is None or sorted(stored.deleted) != sorted(receipt["deleted"]):
                figures.lost += 1
            elif not all(located.get(i, (0, 0, False))[2] for i in receipt["deleted"]):
                figures.lost += 1
        _, components = reg.served()
        served = sorted({a for c in components for a in c["artifacts"]})
        with reg.engine.connect() as conn:
            figures.tainted += len(reg.saw_deleted(conn, served))
        hashes = reg.artifact_hashes(served)
        store = ArtifactStore(run_dir / "artifacts")
        figures.corrupt += sum(not store.verify(a, hashes.get(a, "")) for a in served)
    finally:
        system.close()


def fault_injection(run_dir: Path, token: str, *, kills: int, seed: int, ids: list[str], clients: int = 2,
                    long_every: int = 5, short_s: tuple[float, float] = (0.3, 1.5),
                    long_s: tuple[float, float] = (6.0, 10.0), log: Path | None = None, guard: str = "off",
                    progress=lambda figures: None) -> FaultFigures:
    """Kill -9 a real server `kills` times at random moments under a deletion load; check after each kill.

    Clients send deletions of random ids (some repeated, some unknown) with fresh idempotency keys; a
    request cut off by a kill is retried with its key after the restart, so the ledger must show each
    key at most once. Every `long_every`-th cycle runs long enough for a background restoration to
    finish (the server restores whenever a shard is truncated), so kills also land mid-restoration.
    """
    rng = random.Random(seed)
    figures = FaultFigures()
    started = time.monotonic()
    pending: dict[str, dict] = {}    # key -> body, requests that got no answer
    lock = threading.Lock()

    def send(client: httpx.Client, key: str, body: dict) -> bool:
        """One deletion; True if acknowledged. Returns False when the server is gone."""
        with lock:
            figures.requests += 1
        try:
            response = client.post("/v1/deletions", json=body, headers={"Idempotency-Key": key})
        except httpx.HTTPError:
            with lock:
                pending[key] = body
            return False
        if response.status_code != 200:
            with lock:
                figures.errors.append(f"{response.status_code}: {response.text[:300]}")
            return False
        with lock:
            figures.receipts[key] = response.json()
            figures.acknowledged += 1
            pending.pop(key, None)
        return True

    def load(server: Server, stop: threading.Event, worker_seed: int) -> None:
        local = random.Random(worker_seed)
        with server.client(token, timeout=30.0) as client:
            for _ in range(10_000):   # bounded; the kill or `stop` ends it much sooner
                if stop.is_set():
                    return
                body = {"ids": local.sample(ids, k=local.choice((1, 1, 2)))}
                if local.random() < 0.1:
                    body["ids"].append(f"unknown-{local.randrange(10**6)}")
                if not send(client, uuid.uuid4().hex, body):
                    return

    # The guard off, or `alert` (its windows are written in every group commit; nothing is held).
    limits = ("--rate", "100000", "--burst", "100000", "--quota", "1000000000", "--guard", guard, "--no-preload")
    for cycle in range(kills):
        server = Server(run_dir, *limits, "--restore-below", "2", "--restore-poll", "0.5", log=log)
        server.start()
        stop = threading.Event()
        threads = [threading.Thread(target=load, args=(server, stop, rng.randrange(10**9))) for _ in range(clients)]
        try:
            with server.client(token, timeout=30.0) as client:   # retry what the last kill cut off
                for key, body in list(pending.items()):
                    send(client, key, body)
            for t in threads:
                t.start()
            long_cycle = long_every and cycle % long_every == long_every - 1
            time.sleep(rng.uniform(*(long_s if long_cycle else short_s)))
            figures.grouped += _grouped(server, token)
            if long_cycle:
                with server.client(token, timeout=120.0) as client:   # a loaded machine answers late, not wrong
                    figures.restorations += client.get("/v1/status").json()["restoration"]["runs"]["completed"]
        finally:
            server.kill()   # also when something above failed: never leave a server behind
            stop.set()
            for t in threads:
                if t.is_alive() or t.ident is not None:
                    t.join(60)
        figures.kills += 1
        # A child dies with its server (parent-death signal), or, if it was still starting up, exits by
        # itself at its first check, before it touches the run; either way within moments (a loaded machine
        # takes longer to reap: wait for the condition, with a ceiling far above the idle figure).
        deadline = time.monotonic() + 60.0
        while worker_children(run_dir) and time.monotonic() < deadline:
            time.sleep(0.05)
        figures.orphans += len(worker_children(run_dir))
        check_run(run_dir, figures)
        progress(figures)
    # The last requests cut off: retry them once more on a clean server, then the final check.
    with Server(run_dir, *limits, "--no-worker", log=log) as server, server.client(token) as client:
        for key, body in list(pending.items()):
            send(client, key, body)
    figures.unanswered = len(pending)
    check_run(run_dir, figures)
    import s3t
    from sqlalchemy import func, select

    from s3t.registry import idempotency, ledger

    system = s3t.S3T.open(run_dir)
    try:   # every ledger entry was made under a key (same transaction); one entry per key at most
        with system.registry.engine.connect() as conn:
            entries = conn.execute(select(func.count()).select_from(ledger)).scalar()
            keyed = conn.execute(select(func.count()).select_from(idempotency)).scalar()
        ids_acked = [r["request_id"] for r in figures.receipts.values()]
        figures.duplicates = (entries - keyed) + (len(ids_acked) - len(set(ids_acked)))
    finally:
        system.close()
    figures.seconds = round(time.monotonic() - started, 1)
    return figures
