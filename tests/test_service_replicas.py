"""A replicated service: two `s3t serve` processes on loopback sharing one PostgreSQL registry and one run
folder (issue 11, item 4). PostgreSQL only: a SQLite run is served by one process.

- a deletion acknowledged by one replica is honoured by the other's next prediction (its served version
  and its probabilities are the deleting replica's, bit for bit);
- restoration: both replicas asked at once, one trainer at a time (the training lock is a PostgreSQL
  advisory lock, which a test process holding it proves), every truncated order restored exactly once;
- a token's rate limit and its capacity-guard budget span both replicas, and so does a deleter's bucket,
  now spent in its group commit (once per batch: tests/test_batch.py), however its requests are batched.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import s3t
from conftest import copy_run
from servicekit import Server, by_cell, make_token, served_lineage_ids, wait_for

pytestmark = pytest.mark.parametrize("database", ["postgresql"], indirect=True)

TEXTS = ["shares rose at the bank", "the team won the match", "a new phone was launched"]


def test_a_deletion_through_one_replica_is_honoured_by_the_others_next_prediction(trained_dir, tmp_path):
    run_dir = copy_run(trained_dir, tmp_path / "run")
    victim = by_cell(run_dir)[0, 0][0]
    token = make_token(run_dir, "predict", "delete", name="both", rate=1e6)
    with Server(run_dir, "--guard", "off", "--no-worker") as a, Server(run_dir, "--guard", "off", "--no-worker") as b:
        before = b.client(token).post("/v1/predict", json={"texts": TEXTS}).json()
        assert victim in served_lineage_ids(run_dir, before["served_version"])
        receipt = a.client(token).post("/v1/deletions", json={"ids": [victim]}).json()
        assert receipt["deleted"] == [victim]
        after = b.client(token).post("/v1/predict", json={"texts": TEXTS}).json()   # the other replica, next request
        assert after["served_version"] == receipt["served_version"] > before["served_version"]
        assert victim not in served_lineage_ids(run_dir, after["served_version"])
        assert after["predictions"] != before["predictions"], "the served model changed"
        same = a.client(token).post("/v1/predict", json={"texts": TEXTS}).json()
        assert same == after, "both replicas serve the same model, bit for bit"
        again = b.client(token).post("/v1/deletions", json={"ids": [victim]}).json()
        assert again["already_deleted"] == [victim]


def test_replicas_restore_one_at_a_time_and_each_order_once(trained_dir, tmp_path):
    run_dir = copy_run(trained_dir, tmp_path / "run")
    cells = by_cell(run_dir)
    admin = make_token(run_dir, "admin", name="admin", rate=1e6)
    system = s3t.S3T.open(run_dir)
    try:
        system.delete(ids=[cells[0, 0][0], cells[1, 1][0]])
        truncated = system.status().truncated_orders
        assert truncated > 0
        # A trainer elsewhere (this process) holds the run's training lock: the lock is the database's,
        # not a file on this machine, so no replica may train meanwhile, and `s3t restore` refuses.
        lock = system.registry.lock("train.lock")
        assert lock.acquire(wait=0)
        assert not (run_dir / "train.lock").exists() or not _file_locked(run_dir / "train.lock")
        with pytest.raises(s3t.RunBusyError, match="advisory lock"):
            system.restore(progress=False)
    finally:
        system.close()
    args = ("--guard", "off", "--no-preload", "--restore-poll", "0.2")
    with Server(run_dir, *args) as a, Server(run_dir, *args) as b:
        for server in (a, b):
            assert server.client(admin).post("/v1/restore").status_code == 202
        wait_for(lambda: sum(s.client(admin).get("/v1/status").json()["restoration"]["runs"]["busy"]
                             for s in (a, b)) >= 1, timeout=60, what="a replica to find the lock taken")
        states = [s.client(admin).get("/v1/status").json() for s in (a, b)]
        assert sum(st["restoration"]["orders_restored"] for st in states) == 0, "nothing trained while locked"
        lock.release()

        def finished() -> list[dict] | None:
            states = [s.client(admin).get("/v1/status").json() for s in (a, b)]
            idle = all(not x["restoration"]["requested"] and x["restoration"]["state"] == "idle" for x in states)
            return states if idle else None

        done = wait_for(finished, timeout=300, what="both replicas' restorations")
    assert all(st["truncated_orders"] == 0 for st in done)
    assert sum(st["restoration"]["orders_restored"] for st in done) == truncated, "each order restored once"
    assert all(st["restoration"]["runs"]["failed"] == 0 for st in done)


def _file_locked(path: Path) -> bool:
    import fcntl
    import os

    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def test_a_tokens_rate_limit_and_guard_budget_span_both_replicas(trained_dir, tmp_path):
    run_dir = copy_run(trained_dir, tmp_path / "run")
    cells = by_cell(run_dir)
    slow = make_token(run_dir, "predict", name="slow", rate=0.01)
    deleter = make_token(run_dir, "delete", name="deleter", rate=1e6)
    # The tiny run: 2 shards of capacity 2. One token may take a quarter (1 unit) unreviewed per window.
    args = ("--no-worker", "--no-preload", "--burst", "4", "--guard", "hold", "--guard-min-spent", "1",
            "--no-protect-last-order", "--guard-ratio", "100")
    with Server(run_dir, *args) as a, Server(run_dir, *args) as b:
        codes = [s.client(slow).get("/v1/status").status_code for s in (a, b, a, b)]
        assert codes == [200] * 4, "a burst of 4, spent on two replicas"
        assert a.client(slow).get("/v1/status").status_code == 429
        assert b.client(slow).get("/v1/status").status_code == 429
        first = a.client(deleter).post("/v1/deletions", json={"ids": [cells[0, 0][0]]})
        assert first.status_code == 200 and first.json()["deleted"], first.text
        second = b.client(deleter).post("/v1/deletions", json={"ids": [cells[1, 0][0]]})
        assert second.status_code == 202, second.text
        assert "would consume 2 of the ensemble's 4 units" in second.json()["flag"]["reason"]


def test_a_deleters_rate_bucket_spans_both_replicas_however_its_requests_are_batched(trained_dir, tmp_path):
    run_dir = copy_run(trained_dir, tmp_path / "run")
    deleter = make_token(run_dir, "delete", name="deleter", rate=0.01)   # a burst of 4, then one per 100 s
    args = ("--guard", "off", "--no-worker", "--no-preload", "--burst", "4")
    with Server(run_dir, *args) as a, Server(run_dir, *args) as b:
        def delete(k: int):
            return (a, b)[k % 2].client(deleter).post("/v1/deletions", json={"ids": [f"nobody-{k}"]},
                                                       headers={"Idempotency-Key": f"k{k}"})
        with ThreadPoolExecutor(10) as pool:   # concurrent: group commits of several requests on each replica
            answers = list(pool.map(delete, range(10)))
        codes = sorted(r.status_code for r in answers)
        assert codes == [200] * 4 + [429] * 6, [r.text for r in answers]
        for r in answers:
            if r.status_code == 429:
                assert r.json()["error"] == "RateLimitError" and int(r.headers["Retry-After"]) >= 50, r.text
        granted = {k for k, r in enumerate(answers) if r.status_code == 200}
        replayed = delete(min(granted))   # a retry with the same key: the bucket is empty, so refused as before
        assert replayed.status_code == 429
