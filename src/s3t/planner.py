"""Capacity planning: which (m, L, B) absorb D deletions before a shard needs restoring, and at what cost.

Users fix m shards, L slices and B orders before training. `plan_capacity` searches that grid for the
fewest shards that keep every shard live (or serving at least `min_depth` layer groups) through D
deletion requests with the asked probability, confirms each answer with `capacity.simulate`, and prices it
in offline training work (`stage_passes`), and in wall time when a throughput is given.

    >>> best = plan_capacity(2_000, 20, trials=300)[0]
    >>> best.survival >= 0.95
    True
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from s3t.capacity import SELECTIONS, Requests, plan_for, simulate
from s3t.errors import PlanError
from s3t.orders import select_orders
from s3t.plan import Plan

__all__ = ["Candidate", "plan_capacity", "recommended_plan", "stage_passes", "prefix_counts"]


def stage_passes(plan: Plan) -> float:
    """Offline training work of `plan` per epoch, in shard-passes (equally, passes over the whole data set).

    Stage i of an order trains on its first i slices, i/L of its shard (slices taken as equal in size).
    Orders that share a prefix share its stages (same lineage, trained once), so each distinct prefix
    counts once: B orders with distinct first slices cost B·(L+1)/2, like B runs of SISA with L slices.
    """
    return sum(count * depth / plan.num_slices for depth, count in enumerate(prefix_counts(plan), 1))


def prefix_counts(plan: Plan) -> list[float]:
    """Distinct order prefixes of each length 1..L per shard (the stages trained at each depth), mean over shards."""
    num_slices = plan.num_slices
    # Only random orders differ between shards; the others cost the same in every shard.
    shards = range(plan.num_shards) if plan.selection == "random" and plan.placement == "hash" else range(1)
    counts = [0] * num_slices
    for shard in shards:
        prefixes = {order[:i] for order in select_orders(plan, shard) for i in range(1, num_slices + 1)}
        for prefix in prefixes:
            counts[len(prefix) - 1] += 1
    return [c / len(shards) for c in counts]


@dataclass(frozen=True)
class Candidate:
    """One recommended (m, L, B), its simulated survival and its offline cost."""

    num_shards: int
    num_slices: int
    budget: int
    survival: float  # share of simulated trials in which every shard met the target through D deletions
    records_per_slice: float  # records / (m · L): the data behind each layer group's first stage
    shard_passes: float  # training work per epoch (see `stage_passes`)
    training_examples: int  # examples processed to train the run: shard_passes · records · epochs
    seconds: float | None  # training_examples / throughput, when a throughput was given

    def plan(self, **fields: object) -> Plan:
        """A `Plan` with this candidate's counts and any other `fields`."""
        return Plan(num_shards=self.num_shards, num_slices=self.num_slices, budget=self.budget, **fields)


def plan_capacity(
    records: int,
    deletions: int,
    *,
    confidence: float = 0.95,
    min_depth: int | None = None,
    throughput: float | None = None,
    epochs: int = 1,
    requests: Requests | None = None,
    selection: str = "cyclic",
    max_shards: int = 32,
    max_slices: int = 8,
    min_records_per_slice: int = 10,
    trials: int = 1000,
    seed: int = 0,
    top: int = 5,
) -> list[Candidate]:
    """Recommend (m, L, B) that keep every shard live (or at depth >= `min_depth`) through `deletions` requests.

    For each L <= `max_slices` and B <= L, the fewest shards m <= `max_shards` that still leave
    `min_records_per_slice` records per slice and whose simulated survival reaches `confidence` (a local
    search started from an analytic estimate, each step confirmed by `simulate` with `trials` trials).
    Returned: the candidates no other one beats on both cost and shard count, cheapest first, at most
    `top`; an empty list when none meets the target. `throughput` is training examples per second
    (e.g. measured by a short `s3t train`); without it, cost is reported in shard-passes only.

        plan_capacity(20_000, 100, throughput=240.0)   # 100 deletions, 95% sure, ~240 examples/s
    """
    _integer("records", records, low=1)
    _integer("deletions", deletions, low=1)
    _integer("epochs", epochs, low=1)
    _integer("max_shards", max_shards, low=1)
    _integer("max_slices", max_slices, low=1)
    _integer("min_records_per_slice", min_records_per_slice, low=1)
    _integer("top", top, low=1)
    if isinstance(confidence, bool) or not isinstance(confidence, numbers.Real) or not 0 < confidence < 1:
        raise PlanError(f"`confidence` must be a number in (0, 1); got {confidence!r}. Use 0.95.")
    if min_depth is not None:
        _integer("min_depth", min_depth, low=1)
        if min_depth > max_slices:
            raise PlanError(f"`min_depth` = {min_depth} needs at least that many slices, but `max_slices` is "
                            f"{max_slices}. Raise `max_slices` or lower `min_depth`.")
    if throughput is not None and (isinstance(throughput, bool) or not isinstance(throughput, numbers.Real)
                                   or not 0 < throughput < math.inf):
        raise PlanError(f"`throughput` must be a positive number of training examples per second; got "
                        f"{throughput!r}. Measure it with a short training run, or leave it out.")
    if selection not in SELECTIONS:
        raise PlanError(f"`selection` must be one of {', '.join(map(repr, SELECTIONS))}; got {selection!r}.")
    depth = min_depth or 1
    lowest = max(depth, 2 if selection == "prior_aware" else 1)

    found: list[Candidate] = []
    for num_slices in range(lowest, max_slices + 1):
        most = min(max_shards, records // (num_slices * min_records_per_slice))
        if most < 1:
            break  # more slices only leave fewer records per slice
        floor = 1
        # Budgets from L down: fewer orders never need fewer shards, so each search starts where the last
        # one ended, and once even `most` shards fail, every smaller budget fails too.
        for budget in range(num_slices, 0, -1):

            def survival(m: int) -> float:
                plan = plan_for(selection, num_shards=m, num_slices=num_slices, budget=budget, seed=seed)
                result = simulate(plan, requests=requests, trials=trials, seed=seed, horizon=deletions)
                return result.survival(deletions, min_depth=depth)

            guess = max(floor, _estimate(num_slices, budget, deletions, depth, confidence, most))
            shards = _fewest_shards(survival, confidence, most, guess=guess, floor=floor)
            if shards is None:
                break
            m, p = shards
            floor = m
            plan = plan_for(selection, num_shards=m, num_slices=num_slices, budget=budget, seed=seed)
            passes = stage_passes(plan)
            examples = round(passes * records * epochs)
            found.append(Candidate(num_shards=m, num_slices=num_slices, budget=budget, survival=p,
                                   records_per_slice=records / (m * num_slices), shard_passes=passes,
                                   training_examples=examples,
                                   seconds=None if throughput is None else examples / float(throughput)))
    # Keep the Pareto front on (cost, shards): fewer shards means more data per model, so better accuracy.
    found.sort(key=lambda c: (c.shard_passes, c.num_shards, c.num_slices))
    front: list[Candidate] = []
    for c in found:
        if not front or c.num_shards < front[-1].num_shards:
            front.append(c)
    return front[:top]



def recommended_plan(base: Plan, records: int, deletions: int, *, requests: Requests | None = None,
                     fit_model: bool = False, trials: int = 1000, seed: int = 0) -> Plan:
    """`base` with the m, L and B of `plan_capacity`'s cheapest candidate for (`records`, `deletions`).

    With `fit_model`, L is capped so that the layer groups fit the base model (read from its config).
    """
    max_slices = 8
    if fit_model:
        from s3t.models import count_blocks, resolve_model_path

        max_slices = min(8, count_blocks(resolve_model_path(base.base_model)) // (base.blocks_per_slice or 1))
    found = plan_capacity(records, deletions, epochs=base.epochs, requests=requests, max_slices=max_slices,
                          trials=trials, seed=seed)
    if not found:
        raise PlanError(f"no plan with at most 32 shards and {max_slices} slices keeps every shard live through "
                        f"{deletions} deletions of {records} records; choose m, L and B yourself")
    best = found[0]
    return base.replace(num_shards=best.num_shards, num_slices=best.num_slices, budget=best.budget)

def _integer(name: str, value: object, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise PlanError(f"`{name}` must be an int >= {low}; got {value!r}.")


def _estimate(num_slices: int, budget: int, deletions: int, depth: int, confidence: float, most: int) -> int:
    """Fewest shards that the independence approximation says suffice (uniform requests), at most `most`.

    A cell escapes D requests with probability q = (1 - 1/(mL))^D; an order keeps depth d when its first
    d slices all escape; a shard fails when all its B orders fail; shards are treated as independent.
    """
    for m in range(1, most + 1):
        q = (1.0 - 1.0 / (m * num_slices)) ** deletions
        shard_ok = 1.0 - (1.0 - q ** depth) ** min(budget, num_slices)
        if shard_ok ** m >= confidence:
            return m
    return most


def _fewest_shards(survival, confidence: float, most: int, *, guess: int, floor: int) -> tuple[int, float] | None:
    """Smallest m in [floor, most] with survival(m) >= confidence, by bisection around `guess`, or None.

    Survival grows with m (more cells, each hit less often) over the range that matters, so the search
    confirms the guess and bisects below it (down to `floor`) when it passes, above it when it fails.
    """
    cache: dict[int, float] = {}

    def ok(m: int) -> bool:
        if m not in cache:
            cache[m] = survival(m)
        return cache[m] >= confidence

    if ok(guess):
        low, high = floor - 1, guess  # low is taken to fail, high passes
    else:
        if guess == most or not ok(most):
            return None
        low, high = guess, most
    while high - low > 1:
        mid = (low + high) // 2
        if ok(mid):
            high = mid
        else:
            low = mid
    return high, cache[high]
