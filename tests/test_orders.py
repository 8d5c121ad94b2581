"""Tests for s3t.orders: cyclic, BMS and random slice orders, the log survival score, and plan dispatch."""

from __future__ import annotations

import itertools
import math
import sys
from dataclasses import dataclass
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from s3t.errors import PlanError
from s3t.orders import bms_orders, cyclic_orders, order_log_score, random_orders, select_orders


def is_permutation(order: tuple[int, ...], num_slices: int) -> bool:
    return sorted(order) == list(range(num_slices))


def is_latin_square(orders: list[tuple[int, ...]], num_slices: int) -> bool:
    """Each slice appears exactly once at every position."""
    return len(orders) == num_slices and all(
        sorted(o[pos] for o in orders) == list(range(num_slices)) for pos in range(num_slices)
    )


def naive_score(order: tuple[int, ...], prior: list[float], deletions: float) -> float:
    """The official float64 score sum_n n * (1 - c_n)^t, with c_n summed exactly so only the power rounds."""
    total = sum(Fraction(x) for x in prior)
    cumulative, score = Fraction(0), 0.0
    for n, s in enumerate(order, start=1):
        cumulative += Fraction(prior[s]) / total
        score += n * float(1 - cumulative) ** deletions
    return score


priors = st.integers(1, 7).flatmap(
    lambda n: st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=n, max_size=n).filter(
        lambda p: sum(p) > 0
    )
)


# --- cyclic --------------------------------------------------------------------------------------


@given(st.integers(1, 12).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n))))
def test_cyclic_first_slices_distinct_up_to_L(case: tuple[int, int]) -> None:
    num_slices, budget = case
    orders = cyclic_orders(num_slices, budget)
    assert [o[0] for o in orders] == list(range(budget))
    assert all(is_permutation(o, num_slices) for o in orders)


@pytest.mark.parametrize("num_slices", range(1, 7))
def test_cyclic_reaches_every_budget_up_to_L_factorial(num_slices: int) -> None:
    everything = cyclic_orders(num_slices, math.factorial(num_slices))
    assert set(everything) == set(itertools.permutations(range(num_slices)))
    assert len(everything) == math.factorial(num_slices)
    # Smaller budgets are prefixes of the full enumeration, so growing B never reshuffles trained orders.
    for budget in range(1, math.factorial(num_slices) + 1):
        assert cyclic_orders(num_slices, budget) == everything[:budget]


@pytest.mark.parametrize("num_slices", range(1, 9))
def test_cyclic_latin_square_at_budget_L(num_slices: int) -> None:
    assert is_latin_square(cyclic_orders(num_slices, num_slices), num_slices)


def test_cyclic_level_one_keeps_first_slice_and_rotates_suffix() -> None:
    assert cyclic_orders(4, 6)[4:] == [(0, 2, 3, 1), (0, 3, 1, 2)]


# --- the log survival score ----------------------------------------------------------------------


@given(priors, st.floats(0.0, 20.0), st.data())
def test_log_score_matches_naive_score_where_naive_is_safe(prior, deletions, data) -> None:
    order = tuple(data.draw(st.permutations(range(len(prior)))))
    naive = naive_score(order, prior, deletions)
    score = order_log_score(order, prior, deletions=deletions)
    if naive < sys.float_info.min:   # zero or subnormal: float64 itself has lost the digits here
        assert score == -math.inf or score < -700
    else:
        assert score == pytest.approx(math.log(naive), rel=1e-9, abs=1e-6)


@given(priors, st.floats(0.0, 200.0), st.data())
def test_log_score_never_falls_when_a_slice_is_appended(prior, deletions, data) -> None:
    order = tuple(data.draw(st.permutations(range(len(prior)))))
    scores = [order_log_score(order[:n], prior, deletions=deletions) for n in range(1, len(order) + 1)]
    # The appended term n * (1 - c_n)^t is >= 0; allow rounding in the shared terms.
    assert all(b >= a - 1e-12 * max(1.0, abs(a)) for a, b in itertools.pairwise(scores))


def test_log_score_separates_orders_the_float64_score_ties_at_t_100() -> None:
    # Slice 0 holds almost all the mass, so (1 - c_n)^100 < 1e-308 for every prefix that starts with it.
    prior = [0.9995, 1e-6, 2.5e-4, 2.5e-4 - 1e-6]
    deep, shallow = (0, 1, 2, 3), (0, 2, 1, 3)
    assert naive_score(deep, prior, 100) == naive_score(shallow, prior, 100) == 0.0
    a = order_log_score(deep, prior, deletions=100)
    b = order_log_score(shallow, prior, deletions=100)
    assert math.isfinite(a) and math.isfinite(b)
    # `deep` appends a nearly-never-deleted slice second, so its depth-2 prefix survives as well as depth 1.
    assert a > b + 0.5


def test_log_score_treats_full_mass_prefix_as_dead() -> None:
    assert order_log_score((0, 1), [1.0, 0.0], deletions=3) == -math.inf
    # t = 0: every prefix "survives", as 0**0 == 1 in the official code.
    assert order_log_score((0, 1), [1.0, 0.0], deletions=0) == pytest.approx(math.log(3))


def test_log_score_normalises_prior() -> None:
    assert order_log_score((2, 0, 1), [1, 2, 3], deletions=4) == pytest.approx(
        order_log_score((2, 0, 1), [1 / 6, 2 / 6, 3 / 6], deletions=4)
    )


# --- BMS -----------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(priors, st.one_of(st.none(), st.floats(0.0, 200.0)))
def test_bms_is_latin_square_at_budget_L(prior, deletions) -> None:
    orders = bms_orders(len(prior), len(prior), prior, deletions=deletions)
    assert is_latin_square(orders, len(prior))


@pytest.mark.parametrize("num_slices", range(1, 9))
def test_bms_uniform_prior_is_latin_square_and_keeps_index_order_below_L(num_slices: int) -> None:
    uniform = [1.0] * num_slices
    assert is_latin_square(bms_orders(num_slices, num_slices, uniform), num_slices)
    # Every order scores the same under a uniform prior, so ties go to the lower index: first slices 0..B-1.
    for budget in range(1, num_slices + 1):
        assert [o[0] for o in bms_orders(num_slices, budget, uniform)] == list(range(budget))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5).flatmap(lambda n: st.lists(st.floats(0.0, 1.0), min_size=n, max_size=n)).filter(
    lambda p: sum(p) > 0
))
def test_bms_reaches_every_budget_up_to_L_factorial(prior) -> None:
    num_slices = len(prior)
    everything = bms_orders(num_slices, math.factorial(num_slices), prior)
    assert set(everything) == set(itertools.permutations(range(num_slices)))
    assert len(everything) == math.factorial(num_slices)
    budgets = {1, num_slices, num_slices + 1, math.factorial(num_slices) - 1}
    for budget in sorted(b for b in budgets if 1 <= b <= math.factorial(num_slices)):
        orders = bms_orders(num_slices, budget, prior)
        assert orders == everything[:budget]  # growing B only appends
        assert len(set(orders)) == len(orders) == budget
        assert all(is_permutation(o, num_slices) for o in orders)


SKEWED = [0.5, 0.3, 0.1, 0.05, 0.05]  # slices 0 and 1 are the likely deletions


def expected_best_depth(orders: list[tuple[int, ...]], prior: list[float], deletions: int) -> float:
    """Exact expected depth of the deepest surviving prefix after `deletions` i.i.d. requests from the prior."""
    total = sum(prior)
    expectation = 0.0
    for hits in itertools.product(range(len(prior)), repeat=deletions):
        probability = math.prod(prior[s] / total for s in hits)
        expectation += probability * max(min(o.index(s) for s in hits) for o in orders)
    return expectation


def test_bms_budget_below_L_starts_with_unlikely_slices_and_ends_with_likely_ones() -> None:
    orders = bms_orders(5, 2, SKEWED)
    assert {o[0] for o in orders} == {3, 4}
    # The likeliest deletion sits in the last two positions of both chosen orders.
    assert all(o.index(0) >= 3 for o in orders)
    # Ignoring the prior, as cyclic does, starts with the two most fragile slices.
    assert [o[0] for o in cyclic_orders(5, 2)] == [0, 1]
    for deletions in (1, 3, 5):
        assert expected_best_depth(orders, SKEWED, deletions) > expected_best_depth(
            cyclic_orders(5, 2), SKEWED, deletions
        ) + 0.5


def test_bms_with_skewed_prior_keeps_deeper_models_alive_than_cyclic() -> None:
    bms = bms_orders(5, 5, SKEWED)
    cyclic = cyclic_orders(5, 5)
    assert set(bms) != set(cyclic)
    scores = [order_log_score(o, SKEWED, deletions=5) for o in bms]
    assert scores == sorted(scores, reverse=True)
    # Both are Latin squares, so one request never kills a shard; with more, BMS's best order is deeper.
    assert expected_best_depth(bms, SKEWED, 1) == pytest.approx(expected_best_depth(cyclic, SKEWED, 1))
    for deletions in (3, 5):
        assert expected_best_depth(bms, SKEWED, deletions) > expected_best_depth(cyclic, SKEWED, deletions)


def test_bms_beyond_L_extends_the_latin_square_by_score() -> None:
    base = bms_orders(5, 5, SKEWED)
    more = bms_orders(5, 12, SKEWED)
    assert more[:5] == base
    assert len(set(more)) == 12
    extra = [order_log_score(o, SKEWED, deletions=5) for o in more[5:]]
    assert extra == sorted(extra, reverse=True)  # all 7 come from level 1 (20 candidates there)


def test_bms_default_deletions_discriminate() -> None:
    # The default t = num_slices must rank a skewed prior's orders, not tie them all.
    scores = {order_log_score(o, SKEWED, deletions=5) for o in bms_orders(5, 5, SKEWED)}
    assert len(scores) == 5


# --- random --------------------------------------------------------------------------------------


sizes_up_to_factorial = st.integers(1, 6).flatmap(
    lambda n: st.tuples(st.just(n), st.integers(1, math.factorial(n)))
)


@given(sizes_up_to_factorial, st.integers(0, 2**32))
def test_random_orders_are_distinct_permutations_and_deterministic(case, seed) -> None:
    num_slices, budget = case
    orders = random_orders(num_slices, budget, seed=seed)
    assert len(set(orders)) == len(orders) == budget
    assert all(is_permutation(o, num_slices) for o in orders)
    assert random_orders(num_slices, budget, seed=seed) == orders


def test_random_orders_depend_on_seed() -> None:
    assert random_orders(8, 4, seed=1) != random_orders(8, 4, seed=2)


# --- plan dispatch -------------------------------------------------------------------------------


@dataclass
class FakePlan:
    selection: str = "cyclic"
    num_slices: int = 6
    budget: int | None = None
    deletion_prior: list[float] | None = None
    seed: int = 0

    @property
    def resolved_budget(self) -> int:
        return self.budget if self.budget is not None else self.num_slices


def test_select_orders_dispatches() -> None:
    assert select_orders(FakePlan(), 0) == cyclic_orders(6, 6)
    assert select_orders(FakePlan(budget=3), 2) == cyclic_orders(6, 3)
    prior = [0.3, 0.3, 0.1, 0.1, 0.1, 0.1]
    assert select_orders(FakePlan("bms", deletion_prior=prior), 0) == bms_orders(6, 6, prior)
    assert select_orders(FakePlan("bms"), 0) == bms_orders(6, 6, [1.0] * 6)


def test_select_orders_random_differs_per_shard_and_repeats_per_seed() -> None:
    plan = FakePlan("random", budget=4, seed=7)
    per_shard = [select_orders(plan, shard) for shard in range(4)]
    assert len({tuple(orders) for orders in per_shard}) == 4
    assert per_shard == [select_orders(FakePlan("random", budget=4, seed=7), s) for s in range(4)]
    assert select_orders(FakePlan("random", budget=4, seed=8), 0) != per_shard[0]


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda: cyclic_orders(3, 7), "`budget`"),
        (lambda: cyclic_orders(3, 0), "`budget`"),
        (lambda: cyclic_orders(0, 1), "`num_slices`"),
        (lambda: random_orders(2, 3, seed=0), "`budget`"),
        (lambda: bms_orders(3, 7, [1, 1, 1]), "`budget`"),
        (lambda: bms_orders(3, 3, [1, 1]), "`deletion_prior`"),
        (lambda: bms_orders(3, 3, [1, -1, 1]), "`deletion_prior`"),
        (lambda: bms_orders(3, 3, [0, 0, 0]), "`deletion_prior`"),
        (lambda: bms_orders(3, 3, [1, float("nan"), 1]), "`deletion_prior`"),
        (lambda: bms_orders(3, 3, [1, 1, 1], deletions=-1), "`deletions`"),
        (lambda: order_log_score((0, 0), [1, 1], deletions=1), "`order`"),
        (lambda: order_log_score((), [1, 1], deletions=1), "`order`"),
        (lambda: select_orders(FakePlan("sorted"), 0), "`selection`"),
    ],
)
def test_errors_name_the_field(call, field: str) -> None:
    with pytest.raises(PlanError, match=field):
        call()


def test_budget_error_gives_value_range_and_fix() -> None:
    with pytest.raises(PlanError) as info:
        cyclic_orders(3, 7)
    message = str(info.value)
    assert "got 7" in message and "[1, 6]" in message and "Lower `budget`" in message


def test_select_orders_accepts_the_real_plan() -> None:
    from s3t.plan import Plan

    prior = (0.4, 0.3, 0.2, 0.1)
    plan = Plan(num_shards=2, num_slices=4, budget=6, selection="bms", deletion_prior=prior)
    assert select_orders(plan, 1) == bms_orders(4, 6, prior)


# --- prior-aware ---------------------------------------------------------------------------------------


@given(st.integers(2, 7).flatmap(lambda n: st.tuples(st.just(n), st.integers(1, n - 1), st.integers(1, 2 * n))))
def test_prior_aware_orders_keep_risky_slices_last(case: tuple[int, int, int]) -> None:
    from s3t.orders import prior_aware_orders

    num_slices, risky, budget = case
    budget = min(budget, math.factorial(num_slices))
    orders = prior_aware_orders(num_slices, budget, risky_slices=risky)
    assert len(orders) == budget == len(set(orders)) and all(is_permutation(o, num_slices) for o in orders)
    safe = num_slices - risky
    firsts = [o[0] for o in orders]
    # The first orders start with distinct safe slices and train every risky slice after every safe one.
    for order in orders[:safe]:
        assert set(order[:safe]) == set(range(safe))
    assert firsts[:safe] == list(range(min(budget, safe)))
    # Up to L orders, all first slices differ (so a uniform prior gets cyclic's capacity).
    assert len(set(firsts[:num_slices])) == min(budget, num_slices)


@pytest.mark.parametrize("num_slices, risky", [(3, 1), (4, 2), (5, 1)])
def test_prior_aware_orders_reach_every_permutation(num_slices: int, risky: int) -> None:
    from s3t.orders import prior_aware_orders

    everything = prior_aware_orders(num_slices, math.factorial(num_slices), risky_slices=risky)
    assert set(everything) == set(itertools.permutations(range(num_slices)))


def test_prior_aware_orders_examples_and_errors() -> None:
    from s3t.orders import prior_aware_orders
    from s3t.plan import Plan

    assert prior_aware_orders(4, 4, risky_slices=1) == [(0, 1, 2, 3), (1, 2, 0, 3), (2, 0, 1, 3), (3, 0, 1, 2)]
    assert prior_aware_orders(4, 3, risky_slices=2) == [(0, 1, 2, 3), (1, 0, 2, 3), (2, 0, 1, 3)]
    plan = Plan(num_shards=3, num_slices=4, budget=4, placement="prior_aware")
    assert select_orders(plan, 2) == prior_aware_orders(4, 4, risky_slices=1)
    for risky in (0, 4, True):
        with pytest.raises(PlanError, match="`risky_slices`"):
            prior_aware_orders(4, 2, risky_slices=risky)
