"""Abuse of the HTTP service (issue 9, items 8 to 11), against real servers on loopback.

- Item 8: one delete token cannot wipe the ensemble, with one request or spread over many, with the
  default guard: what goes beyond the bound is held (202) for an admin, who can then apply it.
- Item 9: held requests are capped per token, count towards the quota when held, and the review list
  is paginated and shows counts, not ids.
- Item 10: a flood of predictions waiting for a blocked model delays neither a deletion nor /healthz.
- Item 11: X-Forwarded-For is not believed by default; error messages name no server path; another
  token's receipt is "not found"; duplicate JSON keys are refused; idempotency keys expire; per-shard
  capacity is for `metrics`/admin tokens only; /docs is off by default.
- Malformed HTTP on a raw socket (smuggling framings, an endless header, garbage) is answered 400 and
  closed, and the server goes on serving.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import httpx
import pytest

import s3t
from s3t.service.settings import GuardPolicy, ServiceSettings
from conftest import copy_run
from servicekit import InProcessServer, Server, by_cell, make_token, wait_for


# -- item 8: the ensemble ---------------------------------------------------------------------------------
@pytest.mark.parametrize("attack", ["one request", "round robin"])
def test_one_delete_token_cannot_take_the_ensemble_down(trained_dir, tmp_path, attack):
    # The tiny run: 2 shards x 2 slices, both orders per shard, so one id from each (shard, slice) takes
    # every shard out. Defaults only: the guard holds what would take a shard's last order or go beyond
    # the token's share of the ensemble's capacity.
    run_dir = copy_run(trained_dir, tmp_path / "run")
    cells = by_cell(run_dir)
    attacker, admin = make_token(run_dir, "delete", name="attacker"), make_token(run_dir, "admin", name="admin")
    targets = [cells[cell][0] for cell in [(0, 0), (1, 0), (0, 1), (1, 1)]]
    bodies = [{"ids": targets}] if attack == "one request" else [{"ids": [t]} for t in targets]
    with Server(run_dir, "--no-worker", "--no-preload") as srv:
        answers = [srv.client(attacker).post("/v1/deletions", json=body) for body in bodies]
        codes = [a.status_code for a in answers]
        assert codes == ([202] if attack == "one request" else [200, 200, 202, 202]), [a.text for a in answers]
        st = srv.client(admin).get("/v1/status").json()
        assert st["serving"] and st["live_shards"] == 2 and all(s["served_depth"] > 0 for s in st["shards"]), st
        held = [a.json()["flag"] for a in answers if a.status_code == 202]
        assert all("out of the ensemble" in f["reason"] for f in held)
        listed = srv.client(admin).get("/v1/review", params={"status": "pending"}).json()["flags"]
        assert [f["id"] for f in listed] == [f["id"] for f in held]
        for f in held:   # an admin's decision: applying works, and then the ensemble is gone by choice
            applied = srv.client(admin).post(f"/v1/review/{f['id']}/apply", json={"note": "verified"})
            assert applied.status_code == 200 and applied.json()["deleted"], applied.text
        st = srv.client(admin).get("/v1/status").json()
        assert not st["serving"] and st["live_shards"] == 0
    gone = s3t.S3T.open(run_dir)
    try:
        assert all(deleted for _s, _sl, deleted in gone.registry.locate(targets).values())
    finally:
        gone.close()


def test_the_ensemble_budget_binds_without_last_order_protection(trained_dir, tmp_path):
    # The budget alone, in process (no HTTP): one token round robin, then one cell per token (Sybils).
    run_dir = copy_run(trained_dir, tmp_path / "run")
    cells = by_cell(run_dir)
    targets = [cells[cell][0] for cell in [(0, 0), (1, 0), (0, 1), (1, 1)]]
    tokens = [make_token(run_dir, "delete", name=f"t{k}") for k in range(4)]
    settings = ServiceSettings(worker=False, preload=False, guard=GuardPolicy(protect_last_order=False))
    from s3t.service.auth import authenticate
    from s3t.service.core import Service

    for sybils in (False, True):
        service = Service(copy_run(run_dir, tmp_path / f"copy-{sybils}"), settings)
        try:
            who = [authenticate(service.system.registry, f"Bearer {tokens[k if sybils else 0]}") for k in range(4)]
            outcomes = [service.delete(who[k], ids=[targets[k]]) for k in range(4)]
            assert [o.outcome for o in outcomes] == ["applied", "applied", "held", "held"]
            reason = outcomes[2].flag.reason
            assert ("all tokens together" if sybils else f"token {who[0].id}") in reason, reason
            assert "of the ensemble's 4 units" in reason, reason
            assert service.system.status().serving
        finally:
            service.close()


# -- item 9: held requests --------------------------------------------------------------------------------
def test_held_requests_are_capped_counted_towards_the_quota_and_listed_in_pages(trained_dir, tmp_path):
    # The 195 MB in miniature: each request is held (it would take every shard out) and carries
    # ~0.5 MB of ids. The cap (3 here) stops the token after 3; the listing shows counts, a page at a time.
    run_dir = copy_run(trained_dir, tmp_path / "run")
    cells = by_cell(run_dir)
    wipe = [cells[cell][0] for cell in sorted(cells)]
    flooder = make_token(run_dir, "delete", name="flooder", quota=10**9, rate=1e6)
    admin = make_token(run_dir, "admin", name="admin", rate=1e6)
    db = run_dir / "registry.sqlite"
    with Server(run_dir, "--no-worker", "--no-preload", "--max-held", "3") as srv:
        size_before = db.stat().st_size
        client = srv.client(flooder)
        answers = []
        for k in range(20):
            padding = [f"junk-{k}-{i}-" + "x" * 480 for i in range(1000 - len(wipe))]
            answers.append(client.post("/v1/deletions", json={"ids": wipe + padding}))
        assert [a.status_code for a in answers] == [202] * 3 + [429] * 17, [a.text[:200] for a in answers]
        refused = answers[-1]
        assert "3 deletion requests held for review" in refused.json()["detail"] and int(refused.headers["Retry-After"])
        growth = db.stat().st_size - size_before
        assert growth < 3 * 700_000, f"the database grew by {growth} bytes"   # 20 held would be > 10 MB

        # Listing: counts, not ids; pages of `limit`, continued with `after`.
        review = srv.client(admin)
        whole = review.get("/v1/review")
        assert whole.status_code == 200 and len(whole.content) < 10_000, len(whole.content)
        flags = whole.json()["flags"]
        assert len(flags) == 3 and whole.json()["next"] is None
        assert all(f["id_count"] == 1000 and f["subject_count"] == 0 and "ids" not in f for f in flags)
        first = review.get("/v1/review", params={"limit": 2}).json()
        assert [f["id"] for f in first["flags"]] == [f["id"] for f in flags[:2]] and first["next"] == flags[1]["id"]
        rest = review.get("/v1/review", params={"limit": 2, "after": first["next"]}).json()
        assert [f["id"] for f in rest["flags"]] == [flags[2]["id"]] and rest["next"] is None
        assert review.get("/v1/review", params={"limit": 1001}).status_code == 422
        assert review.get("/v1/review", params={"after": "no-such-flag"}).status_code == 404
        one = client.get(f"/v1/review/{flags[0]['id']}").json()   # the submitter sees its ids one request at a time
        assert len(one["ids"]) == 1000

        # An admin's decision frees a place under the cap.
        assert review.post(f"/v1/review/{flags[0]['id']}/reject", json={"note": "flood"}).status_code == 200
        assert client.post("/v1/deletions", json={"ids": wipe}).status_code == 202
        assert client.post("/v1/deletions", json={"ids": wipe + ["again"]}).status_code == 429

        # Quota: a held request's items count when held, not again when applied; a rejected one keeps counting.
        for decision in ("reject", "apply"):   # rejected first: applying deletes the ids
            small = make_token(run_dir, "delete", name=f"quota-{decision}", quota=5, rate=1e6)
            c = srv.client(small)
            held = c.post("/v1/deletions", json={"ids": wipe})   # 4 items
            assert held.status_code == 202, held.text
            over = c.post("/v1/deletions", json={"ids": ["unknown-1", "unknown-2"]})
            assert over.status_code == 429 and "has used 4 of its 5" in over.json()["detail"], over.text
            decided = review.post(f"/v1/review/{held.json()['flag']['id']}/{decision}")
            assert decided.status_code == 200, decided.text
            assert c.post("/v1/deletions", json={"ids": ["unknown-3"]}).status_code == 200, "4 + 1 = 5 items"
            assert c.post("/v1/deletions", json={"ids": ["unknown-4"]}).status_code == 429


# -- item 10: predictions cannot starve deletions or /healthz ------------------------------------------------
def test_a_full_deletion_queue_answers_503_and_loses_nothing_queued(trained_dir, tmp_path):
    """The deletions waiting for a group commit are bounded (`--deletion-queue`): with the writer held, the
    queue's two places fill, a third request gets 503 with Retry-After, and the two are applied once the
    writer is free."""
    from test_batch import Held

    run_dir = copy_run(trained_dir, tmp_path / "run")
    cells = by_cell(run_dir)
    victims = [cells[cell][0] for cell in sorted(cells)[:3]]
    token = make_token(run_dir, "delete", name="queue", rate=1e6, quota=10**6)
    settings = ServiceSettings(worker=False, preload=False, guard=GuardPolicy(action="off"), deletion_queue=2)
    with InProcessServer(run_dir, settings) as srv, srv.client(token) as client:
        deletions = srv.service.system.deletions
        held = Held(srv.service.system)
        answers: dict[str, httpx.Response] = {}

        def delete(victim: str) -> None:
            with srv.client(token, timeout=120) as c:
                answers[victim] = c.post("/v1/deletions", json={"ids": [victim]})

        threads = [threading.Thread(target=delete, args=(v,)) for v in victims[:2]]
        try:
            for t in threads:
                t.start()
            wait_for(lambda: deletions.waiting == 2, timeout=60, what="two deletions queued")
            full = client.post("/v1/deletions", json={"ids": [victims[2]]})
        finally:
            held.release()
            for t in threads:
                t.join(120)
        assert full.status_code == 503 and full.json()["error"] == "BusyError", full.text
        assert int(full.headers["Retry-After"]) >= 1
        assert {v: r.status_code for v, r in answers.items()} == {v: 200 for v in victims[:2]}
        assert [answers[v].json()["deleted"] for v in victims[:2]] == [[v] for v in victims[:2]]
        again = client.post("/v1/deletions", json={"ids": [victims[2]]})
        assert again.status_code == 200 and again.json()["deleted"] == [victims[2]], again.text


def test_a_prediction_flood_delays_neither_deletions_nor_health(trained_dir, tmp_path, monkeypatch):
    run_dir = copy_run(trained_dir, tmp_path / "run")
    system = s3t.S3T.open(run_dir)   # records whose deletion keeps every shard live (each order 0's last slice)
    safe = {(o["shard"], o["slices"][-1]) for o in system.registry.orders() if o["position"] == 0}
    system.close()
    cells = by_cell(run_dir)
    warm_ups = [cells[cell][-1] for cell in sorted(safe)]   # the first deletion in a cell retires its stages
    victims = cells[min(safe)][:10]                          # so idle and flood delete alike: one cell, warmed
    token = make_token(run_dir, "delete", "predict", name="load", rate=1e6, quota=10**6)
    flood = 48
    settings = ServiceSettings(worker=False, preload=False, guard=GuardPolicy(action="off"), prediction_queue=flood)
    with InProcessServer(run_dir, settings) as srv, srv.client(token) as client:
        service = srv.service
        assert client.post("/v1/predict", json={"texts": ["warm up"]}).status_code == 200   # loads the model
        for warm_up in warm_ups:
            assert client.post("/v1/deletions", json={"ids": [warm_up]}).status_code == 200

        def timed(method: str, path: str, **kwargs) -> tuple[httpx.Response, float]:
            t0 = time.perf_counter()
            r = client.request(method, path, **kwargs)
            return r, time.perf_counter() - t0

        idle = [timed("POST", "/v1/deletions", json={"ids": [v]}) for v in victims[:5]]
        assert all(r.status_code == 200 and r.json()["deleted"] == [v] for (r, _), v in zip(idle, victims))

        # Block the model: every prediction waits inside it (or in its queue) until released.
        release, entered = threading.Event(), threading.Event()
        classify = service.system.classify

        def blocked(texts, **kwargs):
            entered.set()
            if not release.wait(300):
                raise RuntimeError("the test never released the model")
            return classify(texts, **kwargs)

        monkeypatch.setattr(service.system, "classify", blocked)
        statuses: list[int] = []

        def predict() -> None:
            with srv.client(token, timeout=300) as c:
                statuses.append(c.post("/v1/predict", json={"texts": ["a flood"]}).status_code)

        threads = [threading.Thread(target=predict) for _ in range(flood)]
        try:
            for t in threads:
                t.start()
            wait_for(lambda: entered.is_set() and service.model_lane.pending == flood, timeout=120,
                     what=f"{flood} predictions in flight")
            busy = [timed("POST", "/v1/deletions", json={"ids": [v]}) for v in victims[5:]]
            health, health_s = timed("GET", "/healthz")
            status = client.get("/v1/status")   # auth and reads are not starved either
            full = client.post("/v1/predict", json={"texts": ["one too many"]})
            still_blocked = not release.is_set() and service.model_lane.pending == flood
        finally:
            release.set()
            for t in threads:
                t.join(300)
        idle_ms, busy_ms = (sorted(s * 1000 for _, s in rs) for rs in (idle, busy))
        print(f"\ndeletion latency (median of 5): idle {idle_ms[2]:.1f} ms, under a flood of {flood} blocked "
              f"predictions {busy_ms[2]:.1f} ms (max {busy_ms[-1]:.1f}); /healthz under the flood "
              f"{health_s * 1000:.1f} ms")
        assert still_blocked, "the deletions and /healthz completed while the model was still blocked"
        assert all(r.status_code == 200 and r.json()["deleted"] == [v] for (r, _), v in zip(busy, victims[5:])), \
            [r.text for r, _ in busy]
        assert health.status_code == 200 and status.status_code == 200
        assert full.status_code == 503 and full.json()["error"] == "BusyError" and int(full.headers["Retry-After"]) >= 1
        assert statuses == [200] * flood, statuses


# -- item 11: smaller items ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hardened(trained_dir, tmp_path_factory):
    run_dir = copy_run(trained_dir, tmp_path_factory.mktemp("hardened") / "run")
    tokens = {name: make_token(run_dir, *roles, name=name, rate=1e6) for name, roles in {
        "admin": ("admin",), "deleter": ("delete",), "other": ("delete",), "predictor": ("predict",),
        "watcher": ("metrics",)}.items()}
    with Server(run_dir, "--public-predict", "--rate", "0.5", "--burst", "3", "--idempotency-ttl", "1",
                "--no-worker", "--no-preload") as srv:
        yield srv, run_dir, tokens
    assert "Traceback" not in srv.log(), srv.log()[-3000:]


def test_rotating_x_forwarded_for_does_not_bypass_the_anonymous_rate_limit(hardened):
    srv, _, _ = hardened
    with srv.client() as anonymous:
        codes = [anonymous.get("/v1/status", headers={"X-Forwarded-For": f"203.0.113.{k}"}).status_code
                 for k in range(10)]
    assert codes[:3] == [200] * 3 and 429 in codes, codes


def test_another_tokens_receipt_or_hold_is_simply_not_found(hardened):
    srv, run_dir, tokens = hardened
    victim = by_cell(run_dir)[0, 1][0]
    receipt = srv.client(tokens["deleter"]).post("/v1/deletions", json={"ids": [victim]}).json()
    theirs = srv.client(tokens["other"]).get(f"/v1/deletions/{receipt['request_id']}")
    missing = srv.client(tokens["other"]).get("/v1/deletions/0123456789abcdef")
    assert theirs.status_code == missing.status_code == 404
    assert (theirs.json()["detail"].replace(receipt["request_id"], "ID")
            == missing.json()["detail"].replace("0123456789abcdef", "ID"))
    assert str(run_dir) not in missing.text and "ledger" not in missing.text
    cells = by_cell(run_dir)
    held = srv.client(tokens["deleter"]).post("/v1/deletions", json={"ids": [ids[0] for ids in cells.values()]})
    assert held.status_code == 202, held.text   # it would take every shard out
    flag_id = held.json()["flag"]["id"]
    theirs = srv.client(tokens["other"]).get(f"/v1/review/{flag_id}")
    missing = srv.client(tokens["other"]).get("/v1/review/0123456789abcdef")
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["detail"].replace(flag_id, "ID") == missing.json()["detail"].replace("0123456789abcdef", "ID")


def test_duplicate_json_keys_are_refused(hardened):
    srv, _, tokens = hardened
    for body in (b'{"ids": ["a"], "ids": ["b"]}', b'{"ids": ["a"], "reference": "x", "reference": "y"}'):
        r = srv.client(tokens["deleter"]).post("/v1/deletions", content=body,
                                                headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and "duplicate key" in json.dumps(r.json()), r.text
    r = srv.client(tokens["admin"]).post("/v1/review/0123/reject", content=b'{"note": "a", "note": "b"}',
                                          headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text


def test_idempotency_keys_expire(hardened):
    srv, run_dir, tokens = hardened
    victim = by_cell(run_dir)[1, 1][0]
    client = srv.client(tokens["deleter"])
    first = client.post("/v1/deletions", json={"ids": [victim]}, headers={"Idempotency-Key": "ttl-1"})
    assert first.status_code == 200 and first.json()["deleted"] == [victim]
    time.sleep(1.5)   # the server was started with --idempotency-ttl 1
    again = client.post("/v1/deletions", json={"ids": [victim]}, headers={"Idempotency-Key": "ttl-1"})
    assert again.status_code == 200 and "Idempotent-Replayed" not in again.headers
    assert again.json()["request_id"] != first.json()["request_id"]
    assert again.json()["already_deleted"] == [victim] and again.json()["deleted"] == []
    # The housekeeping thread purges keys past the TTL (once a TTL, here every second).
    from sqlalchemy import func, select

    from s3t.registry import idempotency

    def purged() -> bool:
        system = s3t.S3T.open(run_dir)
        try:
            with system.registry.engine.connect() as conn:
                return conn.execute(select(func.count()).select_from(idempotency)).scalar() == 0
        finally:
            system.close()
    wait_for(purged, timeout=120, what="the expired keys to be purged")


def test_per_shard_capacity_is_for_metrics_and_admin_tokens_only(hardened):
    srv, _, tokens = hardened
    # Anonymous from another loopback address: its own rate-limit bucket, whatever the tests above spent.
    anonymous = srv.client(transport=httpx.HTTPTransport(local_address="127.0.0.3"))
    for client in (anonymous, srv.client(tokens["predictor"])):
        st = client.get("/v1/status").json()
        assert set(st) == {"trained", "serving", "served_version", "live_shards", "shards_total", "model_loaded"}, st
    for who in ("watcher", "admin"):
        st = srv.client(tokens[who]).get("/v1/status").json()
        assert {"shards", "capacity_left", "held_requests", "restoration"} <= set(st)
        assert "deletions_to_drop" in st["shards"][0]
    assert srv.client().get("/metrics").status_code == 401
    assert srv.client(tokens["predictor"]).get("/metrics").status_code == 403
    for who in ("watcher", "admin"):
        assert 's3t_shard_capacity{shard="0"}' in srv.client(tokens[who]).get("/metrics").text
    assert srv.client(tokens["watcher"]).post("/v1/deletions", json={"ids": ["x"]}).status_code == 403


def test_interactive_docs_are_off_by_default_and_the_openapi_document_stays(hardened):
    srv, _, _ = hardened
    assert srv.client().get("/docs").status_code == 404
    assert srv.client().get("/redoc").status_code == 404
    assert "/v1/deletions" in srv.client().get("/openapi.json").json()["paths"]


def test_error_messages_do_not_name_the_servers_paths(tiny_plan, tiny_data, tmp_path):
    run_dir = tmp_path / "untrained"
    s3t.S3T.create(run_dir, tiny_plan, tiny_data).close()
    token = make_token(run_dir, "predict", name="p")
    with InProcessServer(run_dir, ServiceSettings(worker=False, preload=False, docs=True)) as srv:
        r = srv.client(token).post("/v1/predict", json={"texts": ["x"]})
        assert r.status_code == 503 and r.json()["error"] == "NotTrainedError", r.text
        assert "<run>" in r.json()["detail"]
        for path in {str(run_dir), str(run_dir.resolve()), str(tmp_path)}:
            assert path not in r.text, r.text
        assert srv.client().get("/docs").status_code == 200, "--docs turns the interactive docs on"


# -- malformed HTTP ---------------------------------------------------------------------------------------
def raw_exchange(port: int, request: bytes, *, timeout: float = 10.0) -> bytes:
    """Send raw bytes, then read until the server closes the connection."""
    reply = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(request)
        except OSError:   # the server may cut an endless request off mid-send; its answer is still read
            pass
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass
    return reply


MALFORMED = {
    "both framings (request smuggling)": b"POST /v1/deletions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                                         b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two lengths": b"POST /v1/deletions HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    "a negative length": b"POST /v1/deletions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http\r\n\r\n",
    "a NUL in the target": b"GET /healthz\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    "a header without a colon": b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    "a header of 1 MB": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (1 << 20) + b"\r\n\r\n",
    "1,000 headers of 1 KB": b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                             + b"".join(b"X-%d: %s\r\n" % (k, b"a" * 1024) for k in range(1000)) + b"\r\n",
    "a trailer (a header after the body)": b"POST /v1/deletions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                                           b"Content-Type: application/json\r\n\r\n2\r\n{}\r\n0\r\n"
                                           b"Authorization: Bearer stolen\r\n\r\n",
    "a trailer of 1 MB": b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-Pad: "
                         + b"a" * (1 << 20) + b"\r\n\r\n",
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_http_is_answered_400_and_the_server_goes_on(hardened, name):
    srv, _, _ = hardened
    reply = raw_exchange(srv.port, MALFORMED[name])
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]
    assert b"connection: close" in reply.lower()
    assert httpx.get(f"{srv.url}/healthz", timeout=10).status_code == 200


def test_an_endless_request_head_is_cut_off_without_growing_the_server(hardened):
    srv, _, _ = hardened
    rss = lambda: int(open(f"/proc/{srv.proc.pid}/status").read().split("VmRSS:")[1].split()[0]) // 1024  # noqa: E731
    before = rss()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Pad: ")
        sent = 0
        with pytest.raises(OSError):   # reset or broken pipe once the server has had enough
            for sent in range(1, 65):
                sock.sendall(b"a" * (1 << 20))
    assert sent < 8, f"the server read {sent} MB of one header"
    assert rss() - before < 32, "the server buffered the header"
    assert httpx.get(f"{srv.url}/healthz", timeout=10).status_code == 200


def test_a_large_body_and_a_request_pipelined_behind_it_are_both_answered(hardened):
    """A 200 KB body and a request pipelined behind it on one connection are both answered (the bound counts
    what is not body; tests/test_service_guard.py feeds the protocol the split that broke it, read by read)."""
    srv, _, tokens = hardened
    body = json.dumps({"ids": ["x" * 500] * 390}).encode()   # about 200 KB, under the 1 MiB body limit
    first = (b"POST /v1/deletions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + tokens["deleter"].encode()
             + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    second = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    reply = b""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(first + second[:20])
        time.sleep(0.5)   # the server reads the body and the next head's start before the head's end
        sock.sendall(second[20:])
        while chunk := sock.recv(65536):
            reply += chunk
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", reply)
    assert statuses == [b"200", b"200"], reply[:300]
