"""The accuracy-under-deletion benchmark's core loop (benchmarks/deletions.py) on the 2-block tiny model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "deletions.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("deletions_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_every_method_is_measured_on_the_same_requests(bench, tiny_plan, tiny_data, tmp_path):
    train, test = tiny_data.subset(tiny_data.ids[:64]).split(test_fraction=0.25, seed=0)   # 48 / 16
    sequences = bench.deletion_sequences(train, 3, seed=0)
    assert [r.kind for r in sequences["hot subjects"]] == ["subject"] * 3
    plan = tiny_plan.replace(epochs=1)   # one epoch: this checks the loop, not the accuracy
    results = bench.run_experiment(train, test, plan, sequences, every=2, work_dir=tmp_path, log=lambda m: None)

    s3t_methods = ["S3T B=1", "S3T B=2"]   # L = 2: budgets 1, ceil(L/2) = 1 and L = 2
    assert list(results["plans"]) == [bench.FINE_TUNE, bench.SISA, *s3t_methods]
    assert all(t["stage_examples"] > 0 and t["accuracy"] is not None for t in results["training"])
    for seq in sequences:
        for method in [bench.SISA, *s3t_methods, bench.RETRAIN]:
            steps = [r["deletions"] for r in results["accuracy"] if r["sequence"] == seq and r["method"] == method]
            assert steps == [0, 2, 3], (seq, method)
            rows = [r for r in results["requests"] if r["sequence"] == seq and r["method"] == method]
            # The same requests, in the same order, for every method.
            assert [r["target"] for r in rows] == [q.target for q in sequences[seq]]
            if method.startswith("S3T"):
                assert all(r["latency_ms"] == r["receipt_ms"] > 0 for r in rows)
                assert all(r["retrain_stage_examples"] == 0 for r in rows)
            else:
                assert all(r["retrain_stage_examples"] > 0 and r["latency_ms"] > r["receipt_ms"] for r in rows)
        assert [r["method"] for r in results["accuracy"] if r["sequence"] == seq].count(bench.FINE_TUNE) == 1
    # A system with no live shard has no accuracy, and says why.
    for r in results["accuracy"]:
        assert (r["accuracy"] is None) == (r["live_shards"] == 0)
        assert r["accuracy"] is not None or r["note"].startswith("missing")


def test_prior_study_trains_bms_and_prior_aware_for_the_hot_sequence_only(bench, tiny_plan, tiny_data, tmp_path):
    train, test = tiny_data.subset(tiny_data.ids[:64]).split(test_fraction=0.25, seed=0)
    sequences = bench.deletion_sequences(train, 2, seed=0)
    weights = bench.hot_weights(train, seed=0)
    hot = {s for s, w in weights.items() if w > min(weights.values())}
    assert {r.target for r in sequences[bench.HOT]} <= set(weights) and hot

    plans = bench.prior_plans(tiny_plan, train, weights)
    bms, aware = plans.values()
    assert bms.selection == "bms" and aware.placement == "prior_aware" and bms.budget == aware.budget == 2
    assert sum(bms.deletion_prior) == pytest.approx(sum(weights.values()))
    # Risk is the simulator's w / (w + mean w): above the 0.5 threshold exactly for the hot subjects.
    risky = {r.subject for r in bench.with_hot_prior(train, weights) if r.risk > aware.risk_threshold}
    assert risky == hot & {r.subject for r in train}

    results = bench.run_experiment(train, test, tiny_plan.replace(epochs=1), sequences, every=2, work_dir=tmp_path,
                                   hot_prior=weights, log=lambda m: None)
    for name in plans:
        assert results["sequences_of"][name] == [bench.HOT]
        assert {r["sequence"] for r in results["requests"] if r["method"] == name} == {bench.HOT}
    # Prior-aware placement put every hot subject's records in the last slice of its shard.
    system = bench.s3t.S3T.open(tmp_path / "trained" / "S3T_B2_prior-aware")
    where = system.registry.locate([r.id for r in train if r.subject in hot])
    system.close()
    assert where and all(slice_ == tiny_plan.num_slices - 1 for _shard, slice_, _deleted in where.values())
