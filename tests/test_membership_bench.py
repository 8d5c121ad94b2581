"""The membership-inference benchmark (benchmarks/membership.py): its statistics on hand-worked cases, and its
`--smoke` mode end to end on the 2-block tiny model, so the benchmark cannot silently rot."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "membership.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("membership_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_auc_counts_pairs_and_half_ties(bench):
    # Pairs (member, non-member): (3,1) (3,2) (2,1) win, (2,2) ties: 3.5 of 4.
    assert bench.auc([3, 2], [1, 2]) == 0.875
    assert bench.auc([1, 1], [1, 1]) == 0.5
    assert bench.auc([0], [1, 2]) == 0.0
    with pytest.raises(ValueError):
        bench.auc([], [1])


def test_roc_and_tpr_at_a_false_positive_rate(bench):
    fpr, tpr = bench.roc([4, 3, 1], [2, 0])
    assert (fpr, tpr) == ([0, 0, 0, 0.5, 0.5, 1], [0, 1 / 3, 2 / 3, 2 / 3, 1, 1])
    assert bench.tpr_at([4, 3, 1], [2, 0], 0.0) == pytest.approx(2 / 3)
    assert bench.tpr_at([4, 3, 1], [2, 0], 0.5) == 1


def test_bootstrap_interval_brackets_the_estimate_and_narrows_with_data(bench):
    import numpy as np

    rng = np.random.default_rng(0)
    small = rng.normal(0.5, 1, 30), rng.normal(0, 1, 30)
    large = rng.normal(0.5, 1, 600), rng.normal(0, 1, 600)
    lo_s, hi_s = bench.bootstrap_interval(*small, resamples=300)
    lo_l, hi_l = bench.bootstrap_interval(*large, resamples=300)
    assert lo_s <= bench.auc(*small) <= hi_s and lo_l <= bench.auc(*large) <= hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 2
    assert lo_l > 0.5   # a real shift of half a standard deviation: AUC about 0.64


def test_splice_replaces_only_its_own_section(bench, tmp_path):
    report = tmp_path / "results.md"
    report.write_text("# Other results\n\nkept as is\n")
    bench.splice(report, f"{bench.BEGIN}\nfirst\n{bench.END}\n")
    bench.splice(report, f"{bench.BEGIN}\nsecond\n{bench.END}\n")
    text = report.read_text()
    assert text.startswith("# Other results\n\nkept as is\n") and "second" in text and "first" not in text
    assert text.count(bench.BEGIN) == 1


def test_smoke_run_writes_results_plot_and_section(bench, tiny_model, tmp_path):
    payload = bench.main(["--smoke", "--base-model", tiny_model, "--shadows", "1", "--resamples", "50",
                          "--out-dir", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    assert data == json.loads(json.dumps(payload))
    (res,) = data["results"]
    # The deletion removed exactly the last slice of each shard's first order: every shard still serves.
    assert res["served_depth_before"] == [2, 2] and res["served_depth_after"] == [1, 1]
    assert res["sizes"]["deleted"] > 0 and res["sizes"]["kept"] > 0 and res["deletion_requests"] > 0
    models = ["S3T before deletion", "S3T after deletion", "S3T restored", "plain fine-tune"]
    assert [(r["model"], r["attack"], r["members"]) for r in res["rows"]] == [
        (m, a, s) for m in models for a in ("loss", "reference") for s in ("deleted", "kept")]
    for row in res["rows"]:
        assert 0 <= row["ci_low"] <= row["auc"] <= row["ci_high"] <= 1
        assert row["n_never_seen"] == res["test_records"]
    assert (tmp_path / "membership.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    section = (tmp_path / "results.md").read_text()
    assert section.startswith(bench.BEGIN) and "| S3T after deletion | loss |" in section
    # The plot and section can be redrawn from the JSON alone, identically.
    again = tmp_path / "again"
    bench.main(["--from-json", str(tmp_path / "results.json"), "--out-dir", str(again),
                "--report", str(again / "results.md")])
    assert (again / "results.md").read_text() == section.replace("](results.json)", "](../results.json)")
