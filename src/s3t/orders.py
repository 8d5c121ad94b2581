"""Slice orders per shard: cyclic rotation, bipartite-matching selection (BMS), random, and prior-aware.

An order is a tuple of slice indices, a permutation of ``range(L)``; stage i of an order trains layer
group i on the union of its first i slices, so a deletion in the slice at position j leaves the stage-(j-1)
prefix intact. Orders are therefore chosen so that their first slices differ (deletion capacity) and, under
a non-uniform deletion prior, so that likely-deleted slices sit late. See METHOD.md, "Choosing the orders".

Beyond L orders both cyclic and BMS use the same expansion ("keep prefixes, rotate suffixes"): level k
takes every order found so far, keeps its first k slices and rotates the remaining L-k by 1..L-k-1. Starting
from L orders with distinct first slices, level k multiplies the count by L-k without duplicates (the
rotations give each parent's children distinct (k+1)-th slices), so levels 0..L-2 enumerate exactly all L!
permutations: every budget up to L! is reachable and no completion step is needed.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from s3t.errors import PlanError

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

__all__ = [
    "Order",
    "cyclic_orders",
    "order_log_score",
    "bms_orders",
    "random_orders",
    "prior_aware_orders",
    "select_orders",
]

Order = tuple[int, ...]

SELECTIONS = ("cyclic", "bms", "random")


def _check_sizes(num_slices: int, budget: int) -> None:
    """Raise PlanError unless 1 <= num_slices and 1 <= budget <= num_slices!."""
    if isinstance(num_slices, bool) or not isinstance(num_slices, int) or num_slices < 1:
        raise PlanError(
            f"`num_slices` must be an integer >= 1; got {num_slices!r}. Set `num_slices` to a positive integer."
        )
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise PlanError(
            f"`budget` must be an integer >= 1; got {budget!r}. Set `budget` to at least 1 "
            f"(or leave it unset to use num_slices = {num_slices})."
        )
    limit = math.factorial(num_slices)
    if budget > limit:
        raise PlanError(
            f"`budget` must be in [1, {limit}] (= {num_slices}! distinct orders of {num_slices} slices); "
            f"got {budget}. Lower `budget` to at most {limit} or raise `num_slices`."
        )


def _normalised_prior(prior: Sequence[float], num_slices: int) -> NDArray[np.float64]:
    """Return the prior as a float64 array summing to 1, or raise PlanError naming `deletion_prior`."""
    import numpy as np

    try:
        p = np.asarray(prior, dtype=np.float64)
    except (TypeError, ValueError):
        raise PlanError(
            f"`deletion_prior` must be a list of {num_slices} non-negative numbers; got {prior!r}."
        ) from None
    if p.ndim != 1 or p.shape[0] != num_slices:
        raise PlanError(
            f"`deletion_prior` must have one entry per slice ({num_slices}); got {p.size} "
            f"({list(np.ravel(p))!r}). Give exactly {num_slices} weights, or leave it unset for uniform."
        )
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise PlanError(
            f"`deletion_prior` entries must be finite and >= 0; got {p.tolist()!r}. "
            "Use non-negative weights (they are normalised to sum 1)."
        )
    total = float(p.sum())
    if total <= 0.0:
        raise PlanError(
            f"`deletion_prior` must have a positive sum; got {p.tolist()!r} (sum {total}). "
            "Give at least one positive weight, or leave it unset for uniform."
        )
    return p / total


def _check_deletions(deletions: float) -> float:
    """Return deletions as a float, or raise PlanError unless it is finite and >= 0."""
    t = float(deletions)
    if not math.isfinite(t) or t < 0:
        raise PlanError(
            f"`deletions` must be a finite number >= 0; got {deletions!r}. "
            "Pass the number of deletion requests the shard should withstand."
        )
    return t


def _expansion_levels(base: Sequence[Order], num_slices: int) -> Iterator[list[Order]]:
    """Yield the new orders of each suffix-rotation level 1..L-2, breadth-first, duplicates dropped."""
    found = list(base)
    seen = set(found)
    for level in range(1, num_slices - 1):
        width = num_slices - level  # positions level..L-1 are rotated
        new: list[Order] = []
        for parent in list(found):
            head, tail = parent[:level], parent[level:]
            for shift in range(1, width):
                child = head + tail[shift:] + tail[:shift]
                if child not in seen:
                    seen.add(child)
                    new.append(child)
        found.extend(new)
        yield new


def cyclic_orders(num_slices: int, budget: int) -> list[Order]:
    """Return `budget` distinct orders: cyclic shifts of 0..L-1 first, then suffix rotations level by level."""
    _check_sizes(num_slices, budget)
    base = list(range(num_slices))
    # Shift k starts with slice k, so the first min(B, L) orders all start with different slices.
    orders: list[Order] = [tuple(base[k:] + base[:k]) for k in range(num_slices)][:budget]
    if budget > num_slices:
        for new in _expansion_levels(orders, num_slices):
            orders.extend(new[: budget - len(orders)])
            if len(orders) == budget:
                break
    assert len(orders) == budget, "suffix rotation enumerates all L! orders"
    return orders


def _log_score(order: Sequence[int], p: NDArray[np.float64], t: float) -> float:
    """Log survival score of an order (or prefix) under a normalised prior array; see order_log_score."""
    import numpy as np

    idx = np.asarray(order, dtype=np.intp)
    mask = np.zeros(p.shape[0], dtype=bool)
    mask[idx] = True
    # 1 - c_n computed as the mass *outside* the prefix, not by subtraction: a full order then ends
    # at exactly 0 and tiny remainders keep their precision instead of cancelling.
    outside = float(p[~mask].sum())
    tail = np.cumsum(p[idx][::-1])[::-1]  # tail[k] = mass of order[k:]
    remaining = outside + np.append(tail[1:], 0.0)  # remaining[n-1] = mass outside the first n slices
    n = np.arange(1, idx.shape[0] + 1, dtype=np.float64)
    if t == 0.0:
        # x**0 == 1 even for x == 0 (as in the official float code); avoids 0 * log(0) = nan.
        logs = np.log(n)
    else:
        with np.errstate(divide="ignore"):
            logs = np.log(n) + t * np.log(remaining)  # log(0) = -inf: that prefix cannot survive
    top = float(np.max(logs))
    if top == -math.inf:
        return -math.inf
    return top + math.log(float(np.sum(np.exp(logs - top))))


def order_log_score(order: Sequence[int], prior: Sequence[float], *, deletions: float) -> float:
    """Return log(sum_n n * (1 - c_n)^t), the log survival score of an order (or prefix) under a deletion prior.

    c_n is the prior mass (normalised to sum 1) of the order's first n slices and t = `deletions`: a
    prefix survives t independent requests with probability (1 - c_n)^t, weighted by its depth n. The
    official code sums this in float64, where t = 100 underflows to 0 and ties orders; here it is a
    log-sum-exp. A prefix with c_n == 1 contributes nothing (-inf in log space).
    """
    try:
        num_slices = len(prior)
    except TypeError:
        raise PlanError(f"`deletion_prior` must be a list of per-slice weights; got {prior!r}.") from None
    p = _normalised_prior(prior, num_slices)
    items = [int(s) for s in order]
    if not items or len(set(items)) != len(items) or any(s < 0 or s >= p.shape[0] for s in items):
        raise PlanError(
            f"`order` must list one or more distinct slice indices in [0, {p.shape[0] - 1}]; "
            f"got {tuple(order)!r}."
        )
    return _log_score(items, p, _check_deletions(deletions))


def bms_orders(
    num_slices: int,
    budget: int,
    prior: Sequence[float],
    *,
    deletions: float | None = None,
) -> list[Order]:
    """Return `budget` distinct orders chosen by bipartite matching against a per-slice deletion prior.

    Each round appends one slice to each of L orders by a max-weight assignment whose weights are the
    survival scores of the extended prefixes, so the L base orders form a Latin square (every slice once
    per position). They are returned best score first, so a budget below L keeps the orders that start
    with the slices least likely to be deleted. Budgets above L add suffix rotations of the base orders,
    level by level, best score first within a level.

    `deletions` (t) defaults to `num_slices`: after L requests spread over L equally likely slices each
    slice survives with probability (1 - 1/L)^L ~ 1/e, so survival terms sit between "everyone survives"
    (small t: scores barely differ) and "only the first slice matters" (large t, as the official t = 100).
    """
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    _check_sizes(num_slices, budget)
    p = _normalised_prior(prior, num_slices)
    t = _check_deletions(num_slices if deletions is None else deletions)

    orders: list[list[int]] = [[i] for i in range(num_slices)]
    for _ in range(1, num_slices):
        log_weights = np.full((num_slices, num_slices), -np.inf)
        free = np.ones((num_slices, num_slices), dtype=bool)  # free[i, j]: slice j not yet in order i
        for i, prefix in enumerate(orders):
            free[i, prefix] = False
            for j in np.flatnonzero(free[i]).tolist():
                log_weights[i, j] = _log_score(prefix + [j], p, t)
        # Maximise the *sum* of survival scores, as the official code does, not the sum of their logs:
        # the sum gives the unlikely slices to the orders that already survive best, while the log sum
        # spends them propping up weak orders (in simulation that leaves the best order shallower).
        # Scaling by the round's best score keeps t = 100 from underflowing the whole matrix; only
        # entries over e^700 below the best become 0, negligible in the sum anyway.
        top = float(np.max(log_weights[free]))
        shift = top if math.isfinite(top) else 0.0
        weights = np.where(free, np.exp(log_weights - shift), -np.inf)  # -inf: slice already used
        # Each round is a perfect matching of orders to unused slices (the free pairs form a regular
        # bipartite graph, so one exists), which is what makes the result a Latin square.
        rows, cols = linear_sum_assignment(weights, maximize=True)
        for i, j in zip(rows.tolist(), cols.tolist()):
            orders[i].append(j)

    base = [tuple(o) for o in orders]
    scores = {o: _log_score(o, p, t) for o in base}

    def ranked(candidates: Sequence[Order]) -> list[Order]:
        # Stable sort: equal scores keep generation order, i.e. ties go to the lower index.
        return sorted(candidates, key=lambda o: -(scores[o] if o in scores else _log_score(o, p, t)))

    chosen = ranked(base)[:budget]
    if budget > num_slices:
        for new in _expansion_levels(base, num_slices):
            chosen.extend(ranked(new)[: budget - len(chosen)])
            if len(chosen) == budget:
                break
    assert len(chosen) == budget, "suffix rotation enumerates all L! orders"
    return chosen


def random_orders(num_slices: int, budget: int, *, seed: int) -> list[Order]:
    """Return `budget` distinct permutations drawn from numpy's default_rng(seed); same seed, same orders."""
    import itertools

    import numpy as np

    _check_sizes(num_slices, budget)
    rng = np.random.default_rng(seed)
    if 2 * budget <= math.factorial(num_slices):
        # At most half the permutations are wanted, so rejection needs under 2 draws per order on average.
        orders: list[Order] = []
        seen: set[Order] = set()
        while len(orders) < budget:
            order = tuple(int(s) for s in rng.permutation(num_slices))
            if order not in seen:
                seen.add(order)
                orders.append(order)
        return orders
    # Most permutations are wanted (so L! is small): shuffle the full list instead of rejecting.
    everything = list(itertools.permutations(range(num_slices)))
    return [everything[int(k)] for k in rng.permutation(len(everything))[:budget]]


def prior_aware_orders(num_slices: int, budget: int, *, risky_slices: int) -> list[Order]:
    """Return `budget` distinct orders that train the risky slices (the last `risky_slices`) as late as possible.

    Prior-aware placement (see partition.py) puts data likely to be deleted in those slices, so a request
    for it truncates an order near its end instead of killing it. In preference order:

    1. the cyclic shifts of the safe slices, each followed by the risky slices: distinct safe first slices;
    2. one order starting with each risky slice (then the safe slices, then the other risky ones), so that
       B = L still has L distinct first slices and a uniform prior loses nothing against cyclic orders;
    3. further risky-last orders: the safe part's suffix rotations (as in `cyclic_orders`), then the risky
       tail's rotations;
    4. any other permutation, in lexicographic order.

    BMS with a prior that marks the risky slices would not do: its base orders form a Latin square, which
    forces every risky slice into every position, early ones included.
    """
    import itertools

    _check_sizes(num_slices, budget)
    if isinstance(risky_slices, bool) or not isinstance(risky_slices, int) or not 1 <= risky_slices < num_slices:
        raise PlanError(
            f"`risky_slices` must be an integer in [1, {num_slices - 1}] (below `num_slices` = {num_slices}); "
            f"got {risky_slices!r}. Use 1."
        )
    num_safe = num_slices - risky_slices
    safe = tuple(range(num_safe))
    risky = tuple(range(num_safe, num_slices))

    def candidates() -> Iterator[Order]:
        safe_orders = cyclic_orders(num_safe, min(budget, math.factorial(num_safe)))
        yield from (order + risky for order in safe_orders[:num_safe])
        for j, first in enumerate(risky):
            yield (first,) + safe + risky[:j] + risky[j + 1:]
        tails = [tuple(num_safe + s for s in tail)
                 for tail in cyclic_orders(risky_slices, min(budget, math.factorial(risky_slices)))]
        for tail in tails:
            yield from (order + tail for order in safe_orders)
        yield from itertools.permutations(range(num_slices))

    orders: list[Order] = []
    seen: set[Order] = set()
    for order in candidates():
        if order not in seen:
            seen.add(order)
            orders.append(order)
            if len(orders) == budget:
                return orders
    raise AssertionError("the candidates include every permutation")  # pragma: no cover


def _shard_seed(seed: int, shard: int) -> int:
    """Derive a per-shard seed from (seed, shard) with blake2b, stable across processes and platforms."""
    digest = hashlib.blake2b(f"{seed}\x00{shard}".encode(), digest_size=8, person=b"s3t-orders").digest()
    return int.from_bytes(digest, "big")


def select_orders(plan: Any, shard: int) -> list[Order]:
    """Return the orders of one shard as the plan's `selection` prescribes.

    The plan is duck-typed: it needs `selection`, `num_slices`, `resolved_budget`, `deletion_prior`
    (None for uniform) and `seed`, and may have `placement` and `risky_slices`. Cyclic, BMS and
    prior-aware orders are the same for every shard; random orders use a seed derived from
    (plan.seed, shard) so shards differ but reruns agree. Prior-aware placement brings its own orders.
    """
    selection = plan.selection
    num_slices = plan.num_slices
    budget = plan.resolved_budget
    if getattr(plan, "placement", "hash") == "prior_aware":
        return prior_aware_orders(num_slices, budget, risky_slices=plan.risky_slices)
    if selection == "cyclic":
        return cyclic_orders(num_slices, budget)
    if selection == "bms":
        prior = plan.deletion_prior
        if prior is None:
            prior = [1.0] * num_slices
        return bms_orders(num_slices, budget, prior)
    if selection == "random":
        return random_orders(num_slices, budget, seed=_shard_seed(plan.seed, shard))
    raise PlanError(
        f"`selection` must be one of {', '.join(repr(s) for s in SELECTIONS)}; got {selection!r}. "
        "Use 'cyclic' for a uniform deletion prior or 'bms' with a `deletion_prior`."
    )
