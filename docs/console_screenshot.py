"""Take the README's console screenshots: a small trained run, some deletions, one held request, the console
in headless Chromium (Debian's `chromium` and `chromium-driver`, driven by selenium).

    PYTHONPATH=src python docs/console_screenshot.py [KEEP_DIR]   # writes docs/console.png, docs/console-review.png

About two minutes on 2 cores (most of it training 4 shards x 3 orders of a 2-block MiniLM cut).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))   # servicekit: the tests' server and token helpers

import s3t  # noqa: E402
from s3t import datasets  # noqa: E402
from servicekit import Server, make_token  # noqa: E402


def tiny_model(out: Path) -> str:
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from s3t.models import default_model_path

    source = default_model_path()
    config = AutoConfig.from_pretrained(source, num_hidden_layers=3)
    AutoModel.from_pretrained(source, config=config).save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return str(out)


def fit(driver) -> None:
    """Make the window tall enough for the whole page (the window is taller than its viewport)."""
    driver.set_window_size(1180, 400)   # shrink first: a page shorter than the window measures as the window
    chrome = driver.execute_script("return window.outerHeight - window.innerHeight")
    driver.set_window_size(1180, driver.execute_script("return document.documentElement.scrollHeight") + chrome + 16)
    time.sleep(0.3)


def main() -> None:
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    keep = Path(sys.argv[1]) if len(sys.argv) > 1 else None   # a folder to keep the trained run in, for reruns
    work = Path(tempfile.mkdtemp(prefix="s3t-console-"))
    try:
        trained = (keep or work) / "trained"
        if not (trained / "plan.json").exists() and not any(trained.glob("*")):
            plan = s3t.Plan(num_shards=4, num_slices=3, budget=3, epochs=1, max_length=24, batch_size=16,
                            learning_rate=5e-3, base_model=tiny_model((keep or work) / "model"), seed=0)
            system = s3t.S3T.create(trained, plan, datasets.synthetic(240, num_labels=3, num_subjects=60, seed=3))
            system.train(progress=False)
            system.close()
        run = work / "run"
        shutil.copytree(trained, run)
        system = s3t.S3T.open(run)
        cells = {(k, sl): list(ids) for k in range(system.plan.num_shards)
                 for sl, ids in system.registry.live_members(k).items()}
        system.close()
        admin, desk = make_token(run, "admin", name="dpo"), make_token(run, "delete", name="erasure-desk")
        # A fixed scene (orders are cyclic: 012, 120, 201): shard 0 loses slice 0 (serves 2 of 3), shard 3
        # slice 2 (2 of 3), shard 2 slices 0 and 1 (1 of 3); the request for slice 2 of shard 2 would take
        # it out, so the guard holds it. Only the last-order check flags here.
        with Server(run, "--guard", "hold", "--guard-ratio", "1000", "--guard-token-share", "1",
                    "--guard-total-share", "1") as server, server.client(desk) as c:
            n = 40
            for shard, sl, count in ((0, 0, 3), (3, 2, 2), (1, 1, 0), (2, 0, 1), (2, 1, 2)):
                for i in range(count):
                    r = c.post("/v1/deletions", json={"ids": [cells[shard, sl][i]], "reference": f"DSR-2026-{n:04d}"})
                    assert r.status_code == 200, r.text
                    n += 1
            held = c.post("/v1/deletions", json={"ids": [cells[2, 2][0], cells[2, 2][1]], "reference": "DSR-2026-0052"})
            assert held.status_code == 202, held.text

            options = webdriver.ChromeOptions()
            options.binary_location = shutil.which("chromium")
            for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--window-size=1180,1200", "--hide-scrollbars", "--force-device-scale-factor=1"):
                options.add_argument(arg)
            d = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
            try:
                wait = WebDriverWait(d, 20, poll_frequency=0.1)
                d.get(f"{server.url}/console")
                d.find_element(By.ID, "token").send_keys(admin)
                d.find_element(By.ID, "signin").click()
                wait.until(lambda d: "Until the next shard" in d.find_element(By.ID, "capacity").text)
                WebDriverWait(d, 60).until(lambda d: "model loaded" in d.find_element(By.ID, "summary").text
                                           and "not loaded" not in d.find_element(By.ID, "summary").text)
                time.sleep(0.5)
                fit(d)
                d.save_screenshot(str(HERE / "console.png"))
                d.find_element(By.CSS_SELECTOR, "#tabs button[data-tab='review']").click()
                wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#review-table button.open"))[0].click()
                wait.until(lambda d: d.find_elements(By.ID, "preview-table"))
                note = "Verified the requester's identity (ticket DSR-2026-0052)"
                d.find_element(By.ID, "decision-note").send_keys(note)
                time.sleep(0.3)
                fit(d)
                d.save_screenshot(str(HERE / "console-review.png"))
            finally:
                d.quit()
        print(f"wrote {HERE / 'console.png'} and {HERE / 'console-review.png'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
