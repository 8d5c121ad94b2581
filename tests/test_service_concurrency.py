"""Many clients at once against a real server: 8 clients, each sending deletions (ids, subjects, unknown
ids, repeated idempotency keys) interleaved with predictions, while the background worker restores.

The deleted records come from one slice per shard (the last slice of each shard's first order), so every
shard keeps a live order and predictions keep being served: random ids would take both shards of this
tiny plan out within a few deletions, and every later prediction would be a 503.

Checks: no error ever surfaces (no 500, no "database is locked"); the ledger holds exactly one entry per
idempotency key and nothing else; every record was deleted by at most one request, and exactly the
records the receipts name are gone; and visibility: no prediction that started after a deletion was
acknowledged used a served set whose lineage holds that deletion's ids.
"""

from __future__ import annotations

import json
import random
import threading
import time

import pytest

import s3t
from conftest import copy_run
from servicekit import Server, make_token

pytestmark = pytest.mark.both_databases

CLIENTS = 8
DELETIONS_PER_CLIENT = 25


def test_concurrent_deletions_and_predictions_keep_the_ledger_and_the_visibility_guarantee(
        trained_dir, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    copy_run(trained_dir, run_dir)
    token = make_token(run_dir, "delete", "predict", name="load", rate=1e6)
    system = s3t.S3T.open(run_dir)
    safe = {(o["shard"], o["slices"][-1]) for o in system.registry.orders() if o["position"] == 0}
    located = system.locate([r.id for r in tiny_data])
    system.close()
    ids = [r.id for r in tiny_data if located[r.id] in safe]
    subjects = sorted({r.subject for r in tiny_data if r.subject and located[r.id] in safe}
                      - {r.subject for r in tiny_data if r.subject and located[r.id] not in safe})
    assert len(ids) >= 20 and subjects
    events: list[dict] = []
    lock = threading.Lock()
    barrier = threading.Barrier(CLIENTS, timeout=300)

    def client(k: int) -> None:
        rng = random.Random(k)
        with server.client(token, timeout=120.0) as c:
            barrier.wait()
            for i in range(DELETIONS_PER_CLIENT):
                body: dict = {"ids": rng.sample(ids, rng.choice((1, 1, 2)))}
                if rng.random() < 0.15:
                    body["ids"].append(f"unknown-{k}-{i}")
                if rng.random() < 0.1:
                    body["subjects"] = [rng.choice(subjects)]
                key = f"client{k}-{i}"
                for attempt in range(2 if i % 4 == 0 else 1):   # every 4th request is sent twice
                    t0 = time.monotonic()
                    r = c.post("/v1/deletions", json=body, headers={"Idempotency-Key": key})
                    with lock:
                        events.append({"kind": "delete", "t0": t0, "t1": time.monotonic(), "status": r.status_code,
                                       "body": r.json(), "key": key, "replayed": "Idempotent-Replayed" in r.headers})
                t0 = time.monotonic()
                p = c.post("/v1/predict", json={"texts": ["shares rose", "the match was won"]})
                with lock:
                    events.append({"kind": "predict", "t0": t0, "status": p.status_code, "body": p.json()})

    with Server(run_dir, "--restore-below", "2", "--restore-poll", "0.5", "--guard", "off") as server:
        with server.client() as c:   # start the load once the model is in memory
            deadline = time.monotonic() + 120
            while not c.get("/healthz").json()["model_loaded"] and time.monotonic() < deadline:
                time.sleep(0.1)
        threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not any(t.is_alive() for t in threads), "clients did not finish"
    log = server.log()
    assert "database is locked" not in log and "Traceback" not in log, log[-3000:]

    deletions = [e for e in events if e["kind"] == "delete"]
    predictions = [e for e in events if e["kind"] == "predict"]
    assert len(deletions) == CLIENTS * (DELETIONS_PER_CLIENT + (DELETIONS_PER_CLIENT + 3) // 4)
    assert all(e["status"] == 200 for e in deletions), [e["body"] for e in deletions if e["status"] != 200][:3]
    assert all(e["status"] == 200 for e in predictions), [e for e in predictions if e["status"] != 200][:3]

    # One receipt per key: a repeat returns the first one, marked as replayed.
    by_key: dict[str, dict] = {}
    for e in deletions:
        if e["key"] in by_key:
            assert e["replayed"] and e["body"] == by_key[e["key"]], e["key"]
        else:
            assert not e["replayed"]
            by_key[e["key"]] = e["body"]
    acked = {b["request_id"]: b for b in by_key.values()}
    assert len(acked) == len(by_key) == CLIENTS * DELETIONS_PER_CLIENT

    system = s3t.S3T.open(run_dir)
    try:
        ledger = {r.request_id: r for r in system.receipts()}
        assert set(ledger) == set(acked), "the ledger holds exactly the acknowledged requests"
        deleted_by: dict[str, str] = {}
        for rid, receipt in ledger.items():
            for i in receipt.deleted:
                assert i not in deleted_by, f"{i} deleted by two requests"
                deleted_by[i] = rid
        located = system.registry.locate(ids)
        assert {i for i, (_s, _sl, gone) in located.items() if gone} == set(deleted_by)
        for receipt in ledger.values():   # "already deleted" means deleted by an earlier request
            for i in receipt.already_deleted:
                assert ledger[deleted_by[i]].created_at < receipt.created_at

        # Visibility: a prediction that started after an acknowledgement never saw the deleted ids.
        from sqlalchemy import select

        from s3t.registry import lineage, served_sets

        seen_by_version: dict[int, set[str]] = {}
        with system.registry.engine.connect() as conn:
            def lineage_ids(version: int) -> set[str]:
                if version not in seen_by_version:
                    comps = json.loads(conn.execute(select(served_sets.c.components)
                                                    .where(served_sets.c.version == version)).scalar_one())
                    arts = [a for c in comps for a in c["artifacts"]]
                    seen_by_version[version] = set(conn.execute(
                        select(lineage.c.record_id).where(lineage.c.artifact.in_(arts))).scalars())
                return seen_by_version[version]

            checked = 0
            for p in predictions:
                gone_before = {i for e in deletions if e["t1"] < p["t0"]
                               for i in e["body"]["deleted"] + e["body"]["already_deleted"]}
                assert not gone_before & lineage_ids(p["body"]["served_version"]), p["body"]["served_version"]
                checked += bool(gone_before)
            assert checked >= CLIENTS * DELETIONS_PER_CLIENT - CLIENTS
    finally:
        system.close()
