"""The operator console in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`,
driven by selenium) against a real `s3t serve` on loopback over the tiny run.

An admin signs in with a token, sees both shards, opens the held request in the review queue, sees what
applying it would do, applies it with a note, and sees shard 0's served depth fall to 0 in the overview.
The browser's console log must hold no error (a Content-Security-Policy violation would show there).
Skipped, with the reason, where Chromium, its driver or selenium is missing (`.ci/run` installs them).

Waits are on conditions, with ceilings far above the idle figures (each step takes well under a second
idle): a loaded machine answers late, not wrong.
"""

from __future__ import annotations

import shutil

import pytest

from servicekit import Server, make_token

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if CHROMIUM is None or DRIVER is None:
    pytest.skip("console browser tests need Chromium and its driver: apt-get install -y chromium chromium-driver "
                f"(found chromium={CHROMIUM}, chromedriver={DRIVER})", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="console browser tests need selenium: "
                                                             "pip install -e '.[test]'")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

import s3t  # noqa: E402

@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-extensions", "--window-size=1200,1000", "--lang=en-US"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: selenium must never try to download one (the machines are offline).
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def scene(trained_dir, tmp_path_factory):
    """The tiny run with one held request: shard 0 lost slice 0 (served depth 1); the held request would
    delete a record of slice 1, the first slice of shard 0's other order, taking the shard out."""
    run = tmp_path_factory.mktemp("console") / "run"
    shutil.copytree(trained_dir, run)
    admin = make_token(run, "admin", name="dpo")
    deleter = make_token(run, "delete", name="erasure-desk")
    system = s3t.S3T.open(run)
    try:
        cells = {(0, sl): list(ids) for sl, ids in system.registry.live_members(0).items()}
    finally:
        system.close()
    with Server(run, "--guard", "hold", "--guard-ratio", "1.5", "--guard-min-spent", "2", "--no-preload",
                "--no-worker") as server:
        with server.client(deleter) as client:
            assert client.post("/v1/deletions", json={"ids": [cells[0, 0][0]], "reference": "T-100"}).status_code == 200
            held = client.post("/v1/deletions", json={"ids": [cells[0, 1][0]], "reference": "T-101"})
            assert held.status_code == 202, held.text
        yield server, admin, held.json()["flag"]["id"]
    assert "Traceback" not in server.log(), server.log()


def wait(driver, condition, what: str, timeout: float = 60.0):
    # The overview redraws itself every few seconds: an element read during a redraw is retried.
    return WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=(StaleElementReferenceException,)
                         ).until(lambda d: condition(d), message=what)


def depth_of(driver, shard: int) -> str | None:
    cells = driver.find_elements(By.CSS_SELECTOR, f"#shard-table tr[data-shard='{shard}'] td.depth")
    return cells[0].text if cells else None


def test_an_admin_applies_a_held_request_and_sees_the_depth_change(browser, scene):
    server, admin, flag_id = scene
    d = browser
    d.get(f"{server.url}/console")
    assert d.title == "s3t console"
    d.find_element(By.ID, "token").send_keys(admin)
    d.find_element(By.ID, "signin").click()
    wait(d, lambda d: d.find_element(By.ID, "who-name").text.startswith("dpo"), "signed in")
    assert d.find_element(By.ID, "token").get_attribute("value") == "", "the token is not left in the form"

    # Overview: both shards, shard 0 at depth 1 of 2, the held request counted, the simulator's answer.
    wait(d, lambda d: depth_of(d, 0) == "1" and depth_of(d, 1) == "2", "both shards in the overview")
    wait(d, lambda d: {g.get_attribute("data-shard"): g.get_attribute("data-depth") for g in
                       d.find_elements(By.CSS_SELECTOR, "#shard-chart svg g.shard")} == {"0": "1", "1": "2"}, "chart")
    wait(d, lambda d: d.find_element(By.ID, "held-badge").text == "1", "one held request")
    wait(d, lambda d: "Until the next shard drops out" in d.find_element(By.ID, "capacity").text, "capacity")

    # Review queue: the held request, why, and what applying would do.
    d.find_element(By.CSS_SELECTOR, "#tabs button[data-tab='review']").click()
    row = wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, f"#review-table tr[data-flag='{flag_id}']"), "held row")[0]
    assert "out of the ensemble" in row.text
    row.find_element(By.CSS_SELECTOR, "button.open").click()
    preview = wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#preview-table tr[data-shard='0']"), "preview")[0]
    assert "1 → 0" in preview.text and "drops out" in preview.text
    d.find_element(By.ID, "decision-note").send_keys("verified with the requester (T-101)")
    d.find_element(By.ID, "apply").click()
    wait(d, lambda d: d.find_element(By.ID, "message").text.startswith("Applied: 1 records deleted"), "applied")
    wait(d, lambda d: "No held requests" in d.find_element(By.ID, "review-table").text, "queue empty")

    # Overview again: shard 0 is out.
    d.find_element(By.CSS_SELECTOR, "#tabs button[data-tab='overview']").click()
    wait(d, lambda d: depth_of(d, 0) == "0" and depth_of(d, 1) == "2", "shard 0 out of the ensemble")
    wait(d, lambda d: d.find_element(By.CSS_SELECTOR, "#shard-chart g[data-shard='0']").get_attribute("data-depth")
         == "0", "the chart shows shard 0 out")

    # Receipts: look the applied request up by its reference; the lineage check passed.
    d.find_element(By.CSS_SELECTOR, "#tabs button[data-tab='receipts']").click()
    d.find_element(By.ID, "receipt-query").send_keys("T-101")
    d.find_element(By.ID, "receipt-lookup").click()
    check = wait(d, lambda d: d.find_elements(By.ID, "lineage-check"), "receipt")[0]
    assert check.text.startswith("passed") and "pass" in check.get_attribute("class")

    # The signed receipt is offered as a download of what the API exported.
    d.find_element(By.ID, "export").click()
    link = wait(d, lambda d: d.find_elements(By.ID, "export-link"), "export link")[0]
    assert link.get_attribute("download").startswith("receipt-") and link.get_attribute("href").startswith("blob:")
    assert "signed by key" in d.find_element(By.ID, "export-note").text

    # Audit (without replay): every check passes on this run.
    d.find_element(By.CSS_SELECTOR, "#tabs button[data-tab='audit']").click()
    d.find_element(By.ID, "audit-run").click()
    verdict = wait(d, lambda d: d.find_elements(By.ID, "audit-verdict"), "audit verdict", timeout=120)[0]
    assert verdict.text.startswith("Passed"), d.find_element(By.ID, "audit-result").text
    assert len(d.find_elements(By.CSS_SELECTOR, "#audit-table tr[data-check]")) >= 5

    # The decision went through the API and is recorded with its note.
    with server.client(admin) as client:
        flag = client.get(f"/v1/review/{flag_id}").json()
        assert flag["status"] == "applied" and flag["note"] == "verified with the requester (T-101)"
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_a_bad_token_is_refused_and_a_metrics_token_sees_no_review(browser, scene):
    server, _, _ = scene
    d = browser
    d.get(f"{server.url}/console")
    d.find_element(By.ID, "token").send_keys("s3t_not-a-real-token")
    d.find_element(By.ID, "signin").click()
    wait(d, lambda d: "unknown token" in d.find_element(By.ID, "message").text, "refused")
    assert d.find_element(By.ID, "login").is_displayed() and not d.find_element(By.ID, "tabs").is_displayed()
    d.get_log("browser")   # the 401 above is logged by the browser as a failed request: expected
    watcher = make_token(server.run_dir, "metrics", name="grafana")
    d.get(f"{server.url}/console")
    d.find_element(By.ID, "token").send_keys(watcher)
    d.find_element(By.ID, "signin").click()
    wait(d, lambda d: depth_of(d, 1) == "2", "overview for a metrics token")
    assert not d.find_element(By.CSS_SELECTOR, "#tabs button[data-tab='review']").is_displayed()
    assert not d.find_element(By.CSS_SELECTOR, "#tabs button[data-tab='audit']").is_displayed()
    assert not d.find_element(By.ID, "restore").is_displayed()
