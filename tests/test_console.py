"""The operator console (/console) and the API calls it makes, without a browser (FastAPI's TestClient).

The page itself is checked for what the browser would otherwise enforce only at run time: a strict
Content-Security-Policy, no inline script or style, nothing loaded from elsewhere; and every API call in
its script is checked to exist in the OpenAPI document and to answer by the same roles as the API.
"""

from __future__ import annotations

import re
import shutil
from html.parser import HTMLParser
from importlib.resources import files
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import s3t
from s3t.service.app import create_app
from s3t.service.auth import create_token
from s3t.service.settings import GuardPolicy, ServiceSettings

CONSOLE = files("s3t.service").joinpath("console")
ROLES = ("predict", "delete", "metrics", "admin")

# Every call console.js makes: (method, path template, roles that may make it). `admin` implies the rest.
CALLS = [
    ("GET", "/v1/whoami", {"predict", "delete", "metrics", "admin"}),
    ("GET", "/v1/status", {"predict", "metrics", "admin"}),
    ("GET", "/v1/capacity", {"metrics", "admin"}),
    ("POST", "/v1/restore", {"admin"}),
    ("GET", "/v1/review", {"admin"}),
    ("GET", "/v1/review/{flag_id}", {"delete", "admin"}),
    ("GET", "/v1/review/{flag_id}/preview", {"admin"}),
    ("POST", "/v1/review/{flag_id}/apply", {"admin"}),
    ("POST", "/v1/review/{flag_id}/reject", {"admin"}),
    ("GET", "/v1/deletions", {"delete", "admin"}),
    ("GET", "/v1/deletions/{request_id}", {"delete", "admin"}),
    ("GET", "/v1/deletions/{request_id}/export", {"delete", "admin"}),
    ("GET", "/v1/audit", {"admin"}),
]


def cells_of(system: s3t.S3T) -> dict[tuple[int, int], list[str]]:
    return {(shard, sl): list(ids) for shard in range(system.plan.num_shards)
            for sl, ids in system.registry.live_members(shard).items()}


@pytest.fixture
def served(trained_dir, tmp_path):
    """A private copy of the tiny run behind the app (no worker, no model load), tokens by role, its cells."""
    run = tmp_path / "run"
    shutil.copytree(trained_dir, run)
    system = s3t.S3T.open(run)
    try:
        tokens = {role: create_token(system.registry, name=role, roles=[role])[1] for role in ROLES}
        tokens["other"] = create_token(system.registry, name="other", roles=["delete"])[1]
        cells = cells_of(system)
    finally:
        system.close()
    settings = ServiceSettings(worker=False, preload=False, rate=1000.0, burst=1000,
                               guard=GuardPolicy(action="hold", min_spent=2, max_ratio=1.5))
    with TestClient(create_app(run, settings)) as client:
        yield client, tokens, cells


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- the page and its assets ----------------------------------------------------------------------------
@pytest.mark.parametrize("path, kind", [("/console", "text/html"), ("/console/console.js", "text/javascript"),
                                        ("/console/console.css", "text/css"),
                                        ("/console/favicon.svg", "image/svg+xml")])
def test_console_files_are_served_without_a_token_under_a_strict_policy(served, path, kind):
    client, _, _ = served
    r = client.get(path)
    assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
    policy = {d.split()[0]: d.split()[1:] for d in r.headers["content-security-policy"].split("; ")}
    assert policy["default-src"] == ["'none'"] and policy["script-src"] == ["'self'"]
    assert policy["style-src"] == ["'self'"] and policy["connect-src"] == ["'self'"]
    assert policy["frame-ancestors"] == ["'none'"]
    assert not any("unsafe" in v or "*" in v or ":" in v for values in policy.values() for v in values)
    assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"


@pytest.mark.parametrize("path", ["/console/app.py", "/console/..%2Fapp.py", "/console/index.htm",
                                  "/console/%2e%2e%2f%2e%2e%2fregistry.py"])
def test_only_the_console_files_are_reachable(served, path):
    client, _, _ = served
    assert client.get(path).status_code == 404


def test_the_console_is_not_part_of_the_api_document(served):
    client, _, _ = served
    assert not [p for p in client.get("/openapi.json").json()["paths"] if p.startswith("/console")]


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text = ""
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.script_text += data.strip()


def test_the_page_has_no_inline_script_or_style_and_loads_only_its_own_files():
    page = _Tags()
    page.feed(CONSOLE.joinpath("index.html").read_text())
    assert page.script_text == "", "inline script: the policy would block it"
    scripts = [a for t, a in page.tags if t == "script"]
    assert [a.get("src") for a in scripts] == ["/console/console.js"]
    assert not [t for t, _ in page.tags if t == "style"]
    for tag, attrs in page.tags:
        assert "style" not in attrs, f"inline style on <{tag}>: the policy would block it"
        assert not [a for a in attrs if a.startswith("on")], f"inline handler on <{tag}>"
        for a in ("src", "href", "action"):
            if attrs.get(a):
                assert attrs[a].startswith("/console/"), f"<{tag} {a}={attrs[a]}> leaves the console"


@pytest.mark.parametrize("name", ["index.html", "console.js", "console.css", "favicon.svg"])
def test_no_external_urls(name):
    text = CONSOLE.joinpath(name).read_text()
    # The SVG namespace is an identifier, never fetched; anything else absolute would be.
    text = text.replace('"http://www.w3.org/2000/svg"', "")
    assert not re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, flags=re.I)
    assert "@import" not in text and "url(" not in text
    if name == "console.js":
        assert "innerHTML" not in text and "eval(" not in text and "localStorage" not in text
        assert "sessionStorage" not in text and "document.cookie" not in text


def test_package_data_ships_the_console():
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"s3t.service" = ["console/*.html", "console/*.js", "console/*.css", "console/*.svg"]' in text


# -- the API calls the page makes -----------------------------------------------------------------------
def test_every_call_in_the_script_is_an_api_route(served):
    client, _, _ = served
    script = CONSOLE.joinpath("console.js").read_text()
    made = set(re.findall(r'api\("(GET|POST)", ["`](/v1/[A-Za-z0-9_/]*)', script))
    assert made, "no API calls found in console.js"
    paths = client.get("/openapi.json").json()["paths"]
    for method, template, _ in CALLS:
        assert method.lower() in paths.get(template, {}), f"{method} {template} is not in the API"
    for method, literal in made:
        assert any(m == method and t.startswith(literal) for m, t, _ in CALLS), f"console.js calls {method} {literal}"
    for method, template, _ in CALLS:
        static = template.split("{")[0]
        assert any(m == method and (static.startswith(lit) or lit.startswith(static)) for m, lit in made), template
    assert '"/preview"' in script and '"apply"' in script and '"reject"' in script and '"/export"' in script


@pytest.mark.parametrize("method, template, allowed", CALLS, ids=[f"{m} {t}" for m, t, _ in CALLS])
def test_console_calls_answer_by_the_api_roles(served, method, template, allowed):
    client, tokens, _ = served
    path = template.replace("{flag_id}", "0" * 16).replace("{request_id}", "0" * 16)
    for role in ROLES:
        r = client.request(method, path, headers=auth(tokens[role]))
        may = role in allowed or role == "admin"
        assert (r.status_code != 403) == may, (role, path, r.status_code, r.text)
        assert r.status_code < 500, r.text
    assert client.request(method, path).status_code == 401


def test_whoami_names_the_token_and_its_roles(served):
    client, tokens, _ = served
    me = client.get("/v1/whoami", headers=auth(tokens["metrics"])).json()
    assert me["name"] == "metrics" and me["roles"] == ["metrics"] and len(me["id"]) == 12


# -- the endpoints added for the console ----------------------------------------------------------------
def test_status_adds_slices_and_recent_deletion_latency_for_metrics_tokens(served):
    client, tokens, cells = served
    before = client.get("/v1/status", headers=auth(tokens["metrics"])).json()
    assert before["num_slices"] == 2 and before["deletion_latency"]["count"] == 0
    r = client.post("/v1/deletions", json={"ids": [cells[1, 0][0]]}, headers=auth(tokens["delete"]))
    assert r.status_code == 200, r.text
    after = client.get("/v1/status", headers=auth(tokens["metrics"])).json()["deletion_latency"]
    assert after["count"] == 1 and after["median_ms"] == after["last_ms"] == after["max_ms"] > 0
    coarse = client.get("/v1/status", headers=auth(tokens["predict"])).json()
    assert "deletion_latency" not in coarse and "num_slices" not in coarse


def test_capacity_is_simulated_from_the_current_state(served):
    client, tokens, cells = served
    fresh = client.get("/v1/capacity", headers=auth(tokens["metrics"])).json()
    assert fresh["live_shards"] == 2 and fresh["live_records"] == 96 and fresh["num_slices"] == 2
    assert 1 <= fresh["next_drop"]["mean"] <= fresh["all_out"]["mean"] <= 96
    assert all(s["expected_to_drop"] > 0 for s in fresh["shards"])
    assert [s["deletions_to_drop"] for s in fresh["worst_case"]] == [2, 2]
    assert client.get("/v1/capacity", headers=auth(tokens["metrics"])).json() == fresh, "same state, same answer"
    # An admin takes shard 0 out: its expectation is 0 and the rest is simulated over shard 1 alone.
    r = client.post("/v1/deletions", json={"ids": [cells[0, 0][0], cells[0, 1][0]]}, headers=auth(tokens["admin"]))
    assert r.status_code == 200 and r.json()["shards"][0]["depth_after"] == 0
    now = client.get("/v1/capacity", headers=auth(tokens["admin"])).json()
    assert now["live_shards"] == 1 and now["live_records"] == 94
    assert now["shards"][0]["expected_to_drop"] == 0 and now["shards"][1]["expected_to_drop"] > 0
    assert [s["deletions_to_drop"] for s in now["worst_case"]] == [0, 2]
    assert now["next_drop"] == now["all_out"], "one live shard: the next drop is the last"


def test_preview_of_a_held_request_is_what_applying_does(served):
    client, tokens, cells = served
    first = client.post("/v1/deletions", json={"ids": [cells[0, 0][0]]}, headers=auth(tokens["delete"]))
    assert first.status_code == 200
    held = client.post("/v1/deletions", json={"ids": [cells[0, 1][0]], "reference": "T-9"},
                       headers=auth(tokens["delete"]))
    assert held.status_code == 202, held.text
    flag_id = held.json()["flag"]["id"]
    preview = client.get(f"/v1/review/{flag_id}/preview", headers=auth(tokens["admin"]))
    assert preview.status_code == 200, preview.text
    assert preview.json() == {"records": 1, "shards": [{"shard": 0, "depth_before": 1, "depth_after": 0,
                                                        "capacity_before": 1, "capacity_after": 0}]}
    assert client.get(f"/v1/review/{flag_id}/preview", headers=auth(tokens["delete"])).status_code == 403
    status = client.get("/v1/status", headers=auth(tokens["admin"])).json()
    assert status["shards"][0]["served_depth"] == 1, "previewing deletes nothing"
    applied = client.post(f"/v1/review/{flag_id}/apply", json={"note": "checked"}, headers=auth(tokens["admin"]))
    assert applied.status_code == 200
    assert [(s["shard"], s["depth_before"], s["depth_after"]) for s in applied.json()["shards"]] == [(0, 1, 0)]
    decided = client.get(f"/v1/review/{flag_id}/preview", headers=auth(tokens["admin"]))
    assert decided.status_code == 409 and "not pending" in decided.json()["detail"]


def test_an_exported_receipt_verifies_with_the_runs_public_key_and_only_its_owner_may_export_it(served):
    from s3t.ledger import load_public_key, verify_export

    client, tokens, cells = served
    receipt = client.post("/v1/deletions", json={"ids": [cells[1, 0][0]], "reference": "T-7"},
                          headers=auth(tokens["delete"])).json()
    doc = client.get(f"/v1/deletions/{receipt['request_id']}/export", headers=auth(tokens["delete"]))
    assert doc.status_code == 200, doc.text
    service = client.app.state.service
    entry = verify_export(doc.json(), load_public_key(service.system.public_key()))
    assert entry["receipt"] == receipt
    assert client.get(f"/v1/deletions/{receipt['request_id']}/export", headers=auth(tokens["other"])).status_code == 404
    assert client.get(f"/v1/deletions/{receipt['request_id']}/export", headers=auth(tokens["admin"])).json() == doc.json()
    assert client.get("/v1/deletions/nope/export", headers=auth(tokens["admin"])).status_code == 404


def test_receipts_by_reference_and_recent_ones_respect_ownership(served):
    client, tokens, cells = served
    mine = client.post("/v1/deletions", json={"ids": [cells[1, 0][0]], "reference": "T-1"},
                       headers=auth(tokens["delete"])).json()
    theirs = client.post("/v1/deletions", json={"ids": [cells[1, 0][1]], "reference": "T-2"},
                         headers=auth(tokens["other"])).json()
    again = client.post("/v1/deletions", json={"ids": [cells[1, 0][2]], "reference": "T-1"},
                        headers=auth(tokens["delete"])).json()
    admin = auth(tokens["admin"])
    assert [r["request_id"] for r in client.get("/v1/deletions", headers=admin).json()["receipts"]] == [
        again["request_id"], theirs["request_id"], mine["request_id"]], "newest first"
    by_ref = client.get("/v1/deletions", params={"reference": "T-1"}, headers=admin).json()["receipts"]
    assert [r["request_id"] for r in by_ref] == [again["request_id"], mine["request_id"]]
    assert by_ref[1] == mine
    own = client.get("/v1/deletions", headers=auth(tokens["delete"])).json()["receipts"]
    assert {r["request_id"] for r in own} == {mine["request_id"], again["request_id"]}
    assert client.get("/v1/deletions", params={"reference": "T-2"},
                      headers=auth(tokens["delete"])).json()["receipts"] == [], "another token's: not visible"
    assert len(client.get("/v1/deletions", params={"limit": 1}, headers=admin).json()["receipts"]) == 1
    assert client.get("/v1/deletions", params={"limit": 0}, headers=admin).status_code == 422
    assert client.get("/v1/deletions", params={"reference": "x" * 201}, headers=admin).status_code == 422
