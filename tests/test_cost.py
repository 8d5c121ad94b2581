"""Tests for s3t.cost and `s3t cost`: each method's arithmetic on small cases worked out by hand, the
simulated restoration cycle against its exact expectation, validation, and the command's outputs and errors.
No model is loaded here (calibration is tests/test_calibration.py)."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from s3t import Plan
from s3t.cli import app
from s3t.cost import ASSUMPTIONS, FULL, S3T, SISA, Throughput, cost_report, plot, retrain_table, save_json
from s3t.errors import PlanError
from s3t.planner import prefix_counts, stage_passes

HOUR = 3600.0


def report(plan: Plan, **kwargs):
    settings = dict(records=1200, deletions_per_period=5, periods=4, throughput=100.0, trials=4000, seed=0)
    return cost_report(plan, **(settings | kwargs))


# -- SISA and full retraining: closed forms --------------------------------------------------------------
def test_sisa_retrains_the_hit_shard_from_the_hit_slice():
    # m=2, L=3, E=2, N=1200: a shard holds 600 records, a slice 200; a stage i trains i slices, E epochs.
    # Offline: stages of 200, 400, 600 records x 2 epochs, in 2 shards = 4800 examples.
    # Deletion in slice j retrains stages j..3: j=1: 2400, j=2: 2000, j=3: 1200 examples; mean 5600/3.
    sisa = report(Plan(num_shards=2, num_slices=3, budget=3, epochs=2)).method(SISA)
    assert sisa.offline_hours == pytest.approx(4800 / 100 / HOUR, rel=1e-12)
    assert sisa.hours_per_event == pytest.approx(5600 / 3 / 100 / HOUR, rel=1e-12)
    assert sisa.events == sisa.deletions == 20    # 5 per period x 4 periods, one retrain each
    assert sisa.upkeep_hours == pytest.approx(20 * 5600 / 3 / 100 / HOUR, rel=1e-12)
    assert sisa.served_without_downtime == pytest.approx(20 * 2 / 3)   # a first-slice hit takes its shard out
    assert sisa.influence_mean_days == sisa.influence_max_days == 0


def test_full_retraining_runs_on_a_schedule_and_keeps_deleted_records_until_then():
    # 4 periods of 30 days = 120 days; a retrain every 45 days runs twice (days 45 and 90), N·E = 2400
    # examples each at 100/s = 24 s. A record waits half an interval on average, a whole one at most,
    # plus the retrain itself (24 s = 24 / 86400 days).
    full = report(Plan(num_shards=2, num_slices=3, epochs=2), retrain_every_days=45).method(FULL)
    assert full.events == 2
    assert full.hours_per_event == pytest.approx(24 / HOUR, rel=1e-12)
    assert full.offline_hours == pytest.approx(24 / HOUR, rel=1e-12)
    assert full.influence_mean_days == pytest.approx(22.5 + 24 / 86400, rel=1e-12)
    assert full.influence_max_days == pytest.approx(45 + 24 / 86400, rel=1e-12)
    assert full.served_without_downtime == 0
    assert [full.hours_at(d) for d in (0, 44.9, 45, 89.9, 90, 120)] == pytest.approx(
        [24 / HOUR * k for k in (1, 1, 2, 2, 3, 3)], rel=1e-12)


def test_money_is_hours_times_price():
    out = report(Plan(num_shards=2, num_slices=3), price=2.5).to_dict()
    for m in out["methods"]:
        assert m["total_cost"] == pytest.approx(2.5 * m["total_hours"], rel=1e-12)
        assert m["offline_cost"] + m["upkeep_cost"] == pytest.approx(m["total_cost"], rel=1e-12)
    assert all(m["total_cost"] is None for m in report(Plan()).to_dict()["methods"])


# -- S3T: offline work and restorations ------------------------------------------------------------------
def test_s3t_offline_counts_each_distinct_prefix_once_at_its_depth():
    # m=1, L=2, B=2: orders [0,1] and [1,0]; prefixes [0], [1] (half the shard, depth 1) and [0,1], [1,0]
    # (the whole shard, depth 2): N·E examples at depth 1 and 2·N·E at depth 2.
    plan = Plan(num_shards=1, num_slices=2, budget=2, epochs=3)
    assert prefix_counts(plan) == [2, 2]
    throughput = Throughput((100.0, 50.0), trunk=200.0)
    s3t = report(plan, throughput=throughput).method(S3T)
    assert s3t.detail["offline_examples_by_depth"] == [3600, 7200]
    assert s3t.offline_hours == pytest.approx((3600 / 100 + 7200 / 50 + 1200 / 200) / HOUR, rel=1e-12)


@pytest.mark.parametrize("slices, budget", [(3, 3), (4, 2), (3, 6), (2, 1)])
def test_prefix_counts_agree_with_stage_passes(slices, budget):
    plan = Plan(num_shards=2, num_slices=slices, budget=budget)
    assert sum(c * d / slices for d, c in enumerate(prefix_counts(plan), 1)) == pytest.approx(stage_passes(plan))


def test_one_slice_restores_after_every_deletion():
    # L = 1: every request empties its shard's only order, so every request triggers a restoration that
    # retrains that one shard (N/m·E examples); no request is served without a shard out.
    s3t = report(Plan(num_shards=3, num_slices=1, budget=1, epochs=2)).method(S3T)
    assert s3t.detail["requests_per_restoration"] == 1
    assert s3t.events == 20
    assert s3t.detail["restore_examples_by_depth"] == [800]
    assert s3t.hours_per_event == pytest.approx(800 / 100 / HOUR, rel=1e-12)
    assert s3t.served_without_downtime == 0


def test_restoring_below_full_depth_triggers_at_the_first_hit():
    # m=1, L=2, B=2, restore below depth 2: the first request truncates one order to 0 and the other to 1,
    # so it triggers; the hit slice s is in prefixes [s], [s,t] and [t,s]: N·E/2 at depth 1, 2·N·E at
    # depth 2. The shard still serves (depth 1): no downtime.
    s3t = report(Plan(num_shards=1, num_slices=2, budget=2), restore_below=2).method(S3T)
    assert s3t.detail["requests_per_restoration"] == 1
    assert s3t.detail["restore_examples_by_depth"] == [600, 2400]
    assert s3t.detail["restorations_taking_a_shard_out"] == 0
    assert s3t.events == 20 and s3t.served_without_downtime == 20


def test_restoration_cycle_matches_its_exact_expectation():
    # m=2, L=2, B=1 (order [0,1] in each shard), restore when a shard drops out: a request hits one of the
    # 4 cells; the cycle ends at the first hit on a slice 0, T ~ Geometric(1/2): E[T] = 2. The hit shard
    # retrains [0] and [0,1] (N/m·(1/2 + 1) examples); the other retrains [0,1] if its slice 1 was hit
    # before, with probability 1 - E[(1/2)^(T-1)] = 1/3. N/m = 600.
    s3t = report(Plan(num_shards=2, num_slices=2, budget=1), trials=40_000).method(S3T)
    cycle = s3t.detail["requests_per_restoration"]
    assert abs(cycle - 2) < 4 * s3t.detail["requests_per_restoration_sem"]
    depth1, depth2 = s3t.detail["restore_examples_by_depth"]
    assert depth1 == 300
    assert depth2 == pytest.approx(600 + 600 / 3, rel=0.02)
    assert s3t.detail["restorations_taking_a_shard_out"] == 1
    assert s3t.events == pytest.approx(20 / 2, rel=0.02)


def test_restoring_one_shard_at_a_time_batches_more_hits():
    # The same plan, each shard restored alone when its slice 0 is hit: per shard T ~ Geometric(1/4), E = 4,
    # so the two shards restore once per 2 requests together; each restoration retrains [0] and [0,1] of
    # its own shard only: 300 examples at depth 1 and 600 at depth 2, whatever else was hit.
    s3t = report(Plan(num_shards=2, num_slices=2, budget=1), trials=40_000, restore_scope="shard").method(S3T)
    assert s3t.detail["restore_examples_by_depth"] == [300, 600]
    assert s3t.detail["requests_per_restoration"] == pytest.approx(2, rel=0.02)
    assert s3t.detail["restorations_taking_a_shard_out"] == 1
    assert s3t.events == pytest.approx(10, rel=0.02)


def test_retrain_table_counts_prefixes_that_hold_a_hit_slice():
    table = retrain_table([[0, 1, 2], [1, 2, 0], [2, 0, 1]], 3)
    assert table[0].tolist() == [0, 0, 0]                     # nothing hit, nothing retrained
    # Slice 0 hit: [0] (1/3 of the shard), [0,1] and [2,0] (2/3 each), and all three full orders (1 each).
    assert table[0b001].tolist() == pytest.approx([1 / 3, 4 / 3, 3])
    assert table[0b111].tolist() == pytest.approx([1, 2, 3])  # everything
    assert table.shape == (8, 3)


def test_same_seed_same_report_and_curves_start_at_the_offline_cost():
    a, b = (report(Plan(num_shards=3, num_slices=3, budget=2), trials=500, seed=4).to_dict() for _ in range(2))
    assert a == b
    for name, curve in a["cumulative_hours"].items():
        method = next(m for m in a["methods"] if m["method"] == name)
        assert curve[0] == pytest.approx(method["offline_hours"])
        assert curve[-1] == pytest.approx(method["total_hours"])
        assert curve == sorted(curve)
    assert a["assumptions"] == list(ASSUMPTIONS)


def test_json_and_png(tmp_path):
    r = report(Plan(num_shards=2, num_slices=3), price=3.0, trials=300)
    save_json(r, tmp_path / "cost.json")
    data = json.loads((tmp_path / "cost.json").read_text())
    assert [m["method"] for m in data["methods"]] == [S3T, SISA, FULL] and "s3t_version" in data
    plot(r, tmp_path / "cost.png")
    assert (tmp_path / "cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- validation ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    (dict(price=-1.0), "price"), (dict(periods=0), "periods"), (dict(deletions_per_period=-2), "deletions_per_period"),
    (dict(deletions_per_period=math.nan), "deletions_per_period"), (dict(records=5), "records"),
    (dict(throughput=0.0), "throughput"), (dict(throughput=-5), "throughput"), (dict(period_days=0), "period_days"),
    (dict(retrain_every_days=-1), "retrain_every_days"), (dict(restore_below=4), "restore_below"),
    (dict(trials=0), "trials"), (dict(throughput=Throughput((1.0, 2.0))), "depths"),
    (dict(restore_scope="some"), "restore_scope"),
])
def test_bad_input_names_the_field(kwargs, field):
    with pytest.raises(PlanError, match=field):
        report(Plan(num_shards=2, num_slices=3), **kwargs)


def test_a_sisa_plan_is_refused():
    with pytest.raises(PlanError, match="method"):
        report(Plan(method="sisa"))


def test_throughput_validation():
    with pytest.raises(PlanError, match="per_depth"):
        Throughput(())
    with pytest.raises(PlanError, match="trunk"):
        Throughput((1.0,), trunk=0)


# -- the command ---------------------------------------------------------------------------------------
def invoke(*args):
    return CliRunner().invoke(app, ["cost", *map(str, args)])


def test_cli_writes_json_and_png_and_prints_the_table(tmp_path):
    result = invoke("--records", 1200, "--deletions", 5, "--periods", 4, "--throughput", 100, "--price", 2,
                    "-m", 2, "-L", 3, "-B", 3, "--epochs", 2, "--retrain-every", 45, "--trials", 300,
                    "--out-json", tmp_path / "c.json", "--out-png", tmp_path / "c.png")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["plan"] == dict(num_shards=2, num_slices=3, budget=3, epochs=2, selection="cyclic",
                                     placement="hash")
    sisa = next(m for m in data["methods"] if m["method"] == SISA)
    assert sisa["hours_per_event"] == pytest.approx(5600 / 3 / 100 / HOUR, rel=1e-12)
    assert (tmp_path / "c.png").stat().st_size > 1000
    for name in (S3T, SISA, FULL):
        assert name in result.stdout
    # Full retraining's influence, mean (max) days (rich may wrap the cell over two lines).
    assert "22.5" in result.stdout and "(45.0)" in result.stdout


def test_cli_takes_one_throughput_per_depth(tmp_path):
    result = invoke("--records", 1200, "--deletions", 5, "-m", 1, "-L", 2, "-B", 2, "--throughput", 100,
                    "--throughput", 50, "--trunk-throughput", 200, "--trials", 200, "--out-json", tmp_path / "c.json")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["throughput"]["per_depth"] == [100, 50]
    s3t = next(m for m in data["methods"] if m["method"] == S3T)
    # Prefixes [0] and [1] (600 records each) at depth 1, [0,1] and [1,0] (1200 each) at depth 2; one
    # frozen forward per record.
    assert s3t["offline_hours"] == pytest.approx((1200 / 100 + 2400 / 50 + 1200 / 200) / HOUR, rel=1e-12)


def test_cli_recommend_takes_the_planners_plan(tmp_path):
    from s3t.planner import plan_capacity

    result = invoke("--records", 2000, "--deletions", 10, "--throughput", 50, "--recommend", "--trials", 300,
                    "--out-json", tmp_path / "c.json")
    assert result.exit_code == 0, result.output
    best = plan_capacity(2000, 10, trials=300)[0]
    plan = json.loads((tmp_path / "c.json").read_text())["plan"]
    assert (plan["num_shards"], plan["num_slices"], plan["budget"]) == (best.num_shards, best.num_slices, best.budget)


@pytest.mark.parametrize("args, message", [
    (["--price", -1], "`price` must be a number >= 0"),
    (["--periods", 0], "`periods` must be an int >= 1"),
    (["--deletions", -3], "`deletions_per_period` must be a number >= 0"),
    (["--throughput", 0], "`throughput` must be a positive number"),
    (["--restore-below", 9], "`restore_below` must be a served depth in [1, 3]"),
    (["--calibrate-data", "x.jsonl"], "give exactly one of --throughput, --calibrate RUN_DIR or --calibrate-data"),
    (["--recommend", "-m", 3], "--recommend chooses m, L and B itself"),
    (["--out-png", "/no/such/folder/c.png"], "no folder /no/such/folder"),
    (["--distribution", "gaussian"], "`distribution` must be one of"),
    (["--restore-scope", "some"], "`restore_scope` must be 'all'"),
    (["--throughput", 10, "--throughput", 20], "the throughput has 2 depths but the plan has `num_slices` = 3"),
])
def test_cli_bad_input_is_one_line(args, message):
    base = {"--records": 1200, "--deletions": 5, "--throughput": 100, "-L": 3, "-m": 2}
    for flag in [f for f in base if f in args]:
        base.pop(flag)
    result = invoke(*[x for kv in base.items() for x in kv], *args)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.output


def test_cli_trunk_throughput_needs_a_throughput():
    result = invoke("--records", 1200, "--deletions", 5, "--calibrate-data", "x.jsonl", "--trunk-throughput", 5)
    assert result.exit_code == 1 and "--trunk-throughput goes with --throughput" in result.stderr


def test_cli_needs_records_without_a_run():
    result = invoke("--deletions", 5, "--throughput", 100)
    assert result.exit_code == 1 and "--records is required" in result.stderr
