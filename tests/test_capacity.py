"""Tests for s3t.capacity and s3t.planner: closed form vs Monte Carlo, the engine's rules inside the simulator,
determinism, prior-aware placement under skew and under a uniform prior, and planner answers the simulator
confirms. Small settings throughout: the whole file runs in seconds."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from s3t.capacity import (Requests, expected_capacity, plan_for, plot, save_json, served_depth_table, simulate,
                          sweep)
from s3t.errors import PlanError
from s3t.orders import cyclic_orders
from s3t.plan import Plan
from s3t.planner import plan_capacity, stage_passes
from s3t.truncation import choose_served, truncate


def mean_all_dead(result) -> float:
    return result.summary()["all_dead"]["mean"]


# -- closed form ---------------------------------------------------------------------------------------
def test_closed_form_reproduces_method_figures() -> None:
    assert [round(expected_capacity(5, 6, b), 1) for b in (1, 3, 6)] == [68.5, 99.5, 119.8]
    # B beyond L adds no first slices, hence no capacity.
    assert expected_capacity(5, 6, 24) == expected_capacity(5, 6, 6)
    assert expected_capacity(1, 1, 1) == 1.0


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_closed_form_rejects_bad_counts(bad) -> None:
    with pytest.raises(PlanError, match="`budget`"):
        expected_capacity(5, 6, bad)


@pytest.mark.parametrize("budget, figure", [(1, 68.5), (3, 99.5), (6, 119.9)])
def test_simulation_reproduces_m5_l6_within_3_percent(budget: int, figure: float) -> None:
    result = simulate(Plan(num_shards=5, num_slices=6, budget=budget), trials=4000, seed=0)
    assert result.closed_form == pytest.approx(figure, abs=0.1)
    assert mean_all_dead(result) == pytest.approx(figure, rel=0.03)


@pytest.mark.parametrize("shards, slices, budget", [(3, 4, 1), (3, 4, 2), (3, 4, 4), (2, 3, 6), (4, 2, 1)])
def test_simulation_matches_closed_form_on_small_settings(shards: int, slices: int, budget: int) -> None:
    result = simulate(Plan(num_shards=shards, num_slices=slices, budget=budget), trials=3000, seed=1)
    stats = result.summary()["all_dead"]
    assert stats["censored"] == 0
    assert abs(stats["mean"] - result.closed_form) <= max(4 * stats["sem"], 0.03 * result.closed_form)
    assert result.sisa_closed_form == expected_capacity(shards, slices, 1)


def test_random_orders_get_the_coupon_collector_over_their_distinct_first_slices() -> None:
    # Random orders may share first slices; the closed form then counts the distinct ones, shard by shard.
    result = simulate(Plan(num_shards=3, num_slices=4, budget=3, selection="random"), trials=3000, seed=2)
    stats = result.summary()["all_dead"]
    assert result.closed_form <= expected_capacity(3, 4, 3)
    assert abs(stats["mean"] - result.closed_form) <= 4 * stats["sem"]


def test_uniform_record_deletions_approach_the_cells_model() -> None:
    plan = Plan(num_shards=3, num_slices=4, budget=2)
    records = simulate(plan, requests=Requests("uniform", population=3000), trials=1000, seed=0)
    assert records.closed_form is None  # the closed form is stated for the cells model only
    assert mean_all_dead(records) == pytest.approx(expected_capacity(3, 4, 2), rel=0.06)


# -- the engine's rules ------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5).flatmap(lambda n: st.tuples(
    st.just(n),
    st.lists(st.permutations(list(range(n))), min_size=1, max_size=4),
    st.lists(st.integers(0, n - 1), max_size=8))))
def test_depth_table_equals_deleting_one_request_at_a_time(case) -> None:
    # What unlearning.delete does across requests: truncate by each request's slice, then serve.
    num_slices, orders, requests = case
    depths = [num_slices] * len(orders)
    for s in requests:
        depths = [truncate(o, d, {s}) for o, d in zip(orders, depths)]
    served = choose_served(depths)
    mask = sum(1 << s for s in set(requests))
    assert served_depth_table([tuple(o) for o in orders], num_slices)[mask] == (0 if served is None else depths[served])


def test_orders_that_start_on_an_empty_cell_are_dead_from_the_start() -> None:
    """As in the engine (truncation.attainable_depth): with one record in 2 x 2 cells, the shard without it
    serves nothing before any request, and the other shard serves only orders that start on its cell."""
    result = simulate(Plan(num_shards=2, num_slices=2, budget=2), requests=Requests("uniform", population=1),
                      trials=20, seed=0)
    assert np.all(result.first_death == 0) and np.all(result.all_dead == 1)
    assert result.live_shards[0] == 1.0 and result.served_depth[0] == 1.0   # (2 + 0) / 2 shards


def test_curves_and_event_times_are_consistent() -> None:
    result = simulate(Plan(num_shards=4, num_slices=3, budget=2), trials=500, seed=3)
    assert result.served_depth[0] == 3 and result.live_shards[0] == 4 and result.serving[0] == 1
    assert np.all(np.diff(result.served_depth) <= 1e-12) and np.all(np.diff(result.live_shards) <= 1e-12)
    assert np.all(np.diff(result.serving) <= 0) and result.serving[-1] == 0
    assert np.all(result.first_death <= result.all_dead)
    assert np.array_equal(result.depth_drop[0], result.first_death)
    assert np.all(np.diff(result.depth_drop, axis=0) <= 0)  # a higher bar is missed no later
    # Survival read off the event times agrees with the curve of trials still serving.
    assert result.survival(10) == pytest.approx(float(np.mean(result.first_death > 10)))
    assert float(np.mean(result.all_dead > 10)) == pytest.approx(result.serving[10])
    with pytest.raises(PlanError, match="`min_depth`"):
        result.survival(10, min_depth=4)


def test_same_seed_same_result_and_other_seed_differs() -> None:
    plan, requests = Plan(num_shards=3, num_slices=4, budget=2), Requests("zipf", population=500)
    a, b = (simulate(plan, requests=requests, trials=200, seed=7) for _ in range(2))
    assert np.array_equal(a.all_dead, b.all_dead) and np.array_equal(a.served_depth, b.served_depth)
    assert a.to_dict() == b.to_dict()
    assert not np.array_equal(a.all_dead, simulate(plan, requests=requests, trials=200, seed=8).all_dead)


def test_horizon_censors_without_changing_what_happens_before_it() -> None:
    plan, requests = Plan(num_shards=3, num_slices=4, budget=2), Requests("hot", population=400)
    full = simulate(plan, requests=requests, trials=300, seed=0)
    cut = simulate(plan, requests=requests, trials=300, seed=0, horizon=15)
    assert cut.survival(15) == full.survival(15)
    assert np.array_equal(np.where(full.first_death <= 15, full.first_death, np.inf), cut.first_death)
    assert cut.summary()["first_death"]["censored"] == int((full.first_death > 15).sum())
    assert len(cut.served_depth) == 16


def test_bms_gets_the_prior_the_requests_imply() -> None:
    result = simulate(Plan(num_shards=2, num_slices=3, selection="bms"), requests=Requests("zipf", population=300),
                      trials=50, seed=0)
    assert result.plan.deletion_prior is not None and len(result.plan.deletion_prior) == 3
    assert result.plan.selection == "bms"


# -- prior-aware placement ---------------------------------------------------------------------------------
@pytest.mark.parametrize("distribution", ["hot", "zipf"])
def test_prior_aware_beats_cyclic_and_bms_under_skew(distribution: str) -> None:
    requests = Requests(distribution, population=2000)
    results = {r.label.split()[0]: mean_all_dead(r)
               for r in sweep(num_shards=4, num_slices=5, budgets=[2], selections=["cyclic", "bms", "prior_aware"],
                              requests=[requests], trials=400, seed=0)}
    assert results["prior_aware"] >= 1.5 * results["cyclic"]
    assert results["prior_aware"] >= 1.5 * results["bms"]


@pytest.mark.parametrize("budget", [2, 5])
def test_prior_aware_costs_nothing_under_a_uniform_prior(budget: int) -> None:
    # Under a uniform prior no record is riskier than average, so placement equals hash placement, and
    # prior-aware orders start with as many distinct slices as cyclic ones: the same capacity, trial by trial.
    # Served depth may dip slightly (the last position is reserved for the risky slice), on average barely.
    requests = Requests("uniform", population=2000)
    cyclic, prior = sweep(num_shards=4, num_slices=5, budgets=[budget], selections=["cyclic", "prior_aware"],
                          requests=[requests], trials=300, seed=0)
    assert np.array_equal(cyclic.all_dead, prior.all_dead)
    assert np.array_equal(cyclic.first_death, prior.first_death)
    window = int(cyclic.all_dead.mean())
    assert abs(cyclic.served_depth[:window].mean() - prior.served_depth[:window].mean()) <= 0.1


# -- outputs -----------------------------------------------------------------------------------------------
def test_json_and_png_outputs(tmp_path) -> None:
    results = sweep(num_shards=2, num_slices=3, budgets=[1, 3], requests=[Requests(), Requests("hot", population=200)],
                    trials=50, seed=0)
    save_json(results, tmp_path / "capacity.json")
    data = json.loads((tmp_path / "capacity.json").read_text())
    assert [r["label"] for r in data["results"]] == ["cyclic B=1", "cyclic B=3"] * 2
    first = data["results"][0]
    assert first["closed_form"] == pytest.approx(expected_capacity(2, 3, 1))
    assert first["requests"] == {"distribution": "cells"} and first["plan"]["num_shards"] == 2
    assert len(first["curves"]["served_depth"]) == len(first["curves"]["deletions"])
    assert data["results"][2]["closed_form"] is None
    plot(results, tmp_path / "capacity.png")
    assert (tmp_path / "capacity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("kwargs, field", [
    (dict(distribution="pareto"), "`distribution`"),
    (dict(population=0), "`population`"),
    (dict(zipf_exponent=0.0), "`zipf_exponent`"),
    (dict(hot_fraction=1.0), "`hot_fraction`"),
    (dict(hot_share=-0.1), "`hot_share`"),
])
def test_requests_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(PlanError, match=field):
        Requests(**kwargs)


def test_hot_weights_send_the_asked_share() -> None:
    weights = Requests("hot", population=1000).weights()
    assert weights[:100].sum() / weights.sum() == pytest.approx(0.5)
    assert Requests("zipf", population=3, zipf_exponent=2.0).weights().tolist() == [1.0, 0.25, 1 / 9]


@pytest.mark.parametrize("kwargs, field", [
    (dict(trials=0), "`trials`"), (dict(seed=-1), "`seed`"), (dict(horizon=0), "`horizon`")])
def test_simulate_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(PlanError, match=field):
        simulate(Plan(), **kwargs)


def test_simulate_refuses_more_slices_than_it_tabulates() -> None:
    with pytest.raises(PlanError, match="`num_slices` = 13"):
        simulate(Plan(num_slices=13, budget=1), trials=1)


def test_plan_for_maps_prior_aware_to_placement() -> None:
    plan = plan_for("prior_aware", num_shards=2, num_slices=4, budget=3)
    assert (plan.placement, plan.selection, plan.risky_slices) == ("prior_aware", "cyclic", 1)
    with pytest.raises(PlanError, match="`selection`"):
        plan_for("greedy", num_shards=2, num_slices=4, budget=3)


# -- planner -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("slices, budget, passes", [(6, 1, 3.5), (6, 3, 10.5), (6, 6, 21.0), (3, 6, 11.0)])
def test_stage_passes_counts_shared_prefixes_once(slices: int, budget: int, passes: float) -> None:
    # L=3, B=6: 3 distinct first slices, 6 distinct pairs, 6 full orders -> (3*1 + 6*2 + 6*3) / 3 = 11, not 12.
    assert stage_passes(Plan(num_slices=slices, budget=budget)) == passes
    assert len(cyclic_orders(slices, budget)) == budget


def test_planner_recommendations_are_confirmed_by_the_simulator() -> None:
    found = plan_capacity(2000, 15, confidence=0.9, max_shards=16, max_slices=5, trials=400, throughput=100.0)
    assert found, "some plan within 16 shards and 5 slices absorbs 15 deletions"
    costs = [c.shard_passes for c in found]
    assert costs == sorted(costs) and [c.num_shards for c in found] == sorted((c.num_shards for c in found),
                                                                             reverse=True)
    for c in found:
        assert c.survival >= 0.9 and c.num_shards <= 16 and c.num_slices <= 5
        assert c.shard_passes == c.budget * (c.num_slices + 1) / 2
        assert c.training_examples == round(c.shard_passes * 2000) and c.seconds == c.training_examples / 100.0
        again = simulate(c.plan(), trials=1000, seed=99, horizon=15)  # a fresh seed, more trials
        assert again.survival(15) >= 0.9 - 0.03
        if c.num_shards > 1:  # and one shard fewer would not have done
            fewer = simulate(c.plan().replace(num_shards=c.num_shards - 1), trials=1000, seed=99, horizon=15)
            assert fewer.survival(15) < 0.9 + 0.03


def test_planner_honours_a_depth_target() -> None:
    found = plan_capacity(5000, 10, min_depth=2, confidence=0.9, max_shards=32, max_slices=5, trials=300)
    assert found
    for c in found:
        assert c.num_slices >= 2
        assert simulate(c.plan(), trials=600, seed=5, horizon=10).survival(10, min_depth=2) >= 0.9 - 0.04


def test_planner_returns_nothing_when_no_plan_fits() -> None:
    assert plan_capacity(100, 500, max_shards=4, max_slices=3, trials=50) == []


@pytest.mark.parametrize("kwargs, field", [
    (dict(confidence=1.0), "`confidence`"), (dict(throughput=0.0), "`throughput`"),
    (dict(min_depth=9), "`min_depth`"), (dict(selection="greedy"), "`selection`"), (dict(epochs=0), "`epochs`")])
def test_planner_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(PlanError, match=field):
        plan_capacity(1000, 10, **kwargs)


def test_planner_keeps_enough_records_per_slice() -> None:
    # records // (L * min_records_per_slice) bounds the shards: 60 records, 10 per slice -> m * L <= 6.
    found = plan_capacity(60, 1, confidence=0.5, max_shards=32, max_slices=6, trials=100)
    assert found and all(c.num_shards * c.num_slices <= 6 for c in found)
    assert all(math.isclose(c.records_per_slice, 60 / (c.num_shards * c.num_slices)) for c in found)
