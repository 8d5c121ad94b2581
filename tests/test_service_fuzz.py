"""Property-based fuzzing of the HTTP API from its own OpenAPI document (schemathesis + hypothesis).

Every operation gets generated valid and invalid requests (wrong types, missing and extra fields, odd
strings, bad headers) with an admin token, against a real server on loopback; none may answer 5xx, and
every answer must be a status the document declares.
"""

from __future__ import annotations


import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error, status_code_conformance

from conftest import copy_run
from servicekit import Server, make_token

EXAMPLES = 25   # per operation; 20 operations
CALLS: dict[str, int] = {}   # requests sent, by "operation mode" (printed, and checked at the end)


@pytest.fixture(scope="module")
def fuzz_server(trained_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fuzz") / "run"
    copy_run(trained_dir, run_dir)
    token = make_token(run_dir, "admin", name="fuzz", rate=1e6, quota=10**9)
    with Server(run_dir, "--no-worker", "--guard", "hold") as server:
        yield server, token
    assert "Traceback" not in server.log(), server.log()[-5000:]
    print(f"fuzz: {sum(CALLS.values())} requests", dict(sorted(CALLS.items())))
    assert sum(CALLS.values()) >= 100, CALLS


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    server, _ = fuzz_server
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_never_errors_and_answers_documented_statuses(case, fuzz_server):
    server, token = fuzz_server
    mode = getattr(getattr(getattr(case, "meta", None), "generation", None), "mode", "?")
    name = f"{case.method} {case.path} {getattr(mode, 'value', mode)}"
    CALLS[name] = CALLS.get(name, 0) + 1
    case.call_and_validate(base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=300,
                           checks=[not_a_server_error, status_code_conformance])
