"""Deletion capacity: how many deletion requests a plan absorbs before shards drop out of the ensemble.

Two answers side by side: the closed form of METHOD.md ("Deletion capacity") and a Monte Carlo
simulation that runs on the engine's own rules rather than a toy model of them. The records (or subjects)
are placed by `partition.partition`, each shard's orders come from `orders.select_orders` for a real
`Plan`, and the served depth of a shard is what `truncation.truncate` and `truncation.choose_served`
decide. A shard's state after any run of requests is only the set of slices hit so far (truncating by one
hit slice at a time equals truncating by their union, as `unlearning.delete` does across requests), so the
simulator tabulates those two functions over all 2^L hit sets once per set of orders, and a trial reduces
to *when* each (shard, slice) cell is first hit. Every statistic follows from those first-hit times.

Request models (`Requests.distribution`); a request deletes one record or one subject, never both:

- ``cells``: each request hits a uniformly random slice of a uniformly random shard, independently: the
  closed form's setting (many records, balanced slices). `closed_form` is reported for it.
- ``uniform``: each request deletes one record, uniformly among the `population` records not yet deleted.
- ``zipf``: each request deletes every record of one data subject, chosen among the `population` subjects
  not yet deleted with probability proportional to rank^-`zipf_exponent`.
- ``hot``: as zipf, but a `hot_fraction` of the subjects sends a `hot_share` of the requests (by default
  10% of subjects send 50%), the rest share the remainder equally.

For the last three, each record or subject carries the risk a deletion-prior model would give it:
w / (w + mean w), where w is its request weight. That is 0.5 for everyone under a uniform prior and above
0.5 exactly for data more likely to be deleted than average, which `risk_threshold` = 0.5 flags.

    >>> result = simulate(Plan(num_shards=5, num_slices=6, budget=3), trials=200, seed=0)
    >>> round(result.closed_form, 1)
    99.5
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

from s3t.errors import PlanError
from s3t.orders import Order, select_orders
from s3t.partition import partition
from s3t.plan import Plan
from s3t.truncation import attainable_depth, choose_served, truncate

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

__all__ = [
    "Distribution",
    "Requests",
    "CapacityResult",
    "expected_capacity",
    "served_depth_table",
    "simulate",
    "sweep",
    "save_json",
    "plot",
    "SELECTIONS",
    "plan_for",
    "Draw",
    "first_hits",
]

Distribution = Literal["cells", "uniform", "zipf", "hot"]

# What `sweep` and the CLI call a selection: the plan's order selections, plus our prior-aware placement
# (which brings its own orders, so it stands in for a selection here).
SELECTIONS = ("cyclic", "bms", "random", "prior_aware")

# The simulator tabulates 2^L hit sets per set of orders; beyond this that table stops being cheap.
MAX_SLICES = 12

# Bound on the float64 cells held at once while drawing request sequences (about 32 MB).
_CHUNK_CELLS = 4_000_000


def expected_capacity(num_shards: int, num_slices: int, budget: int) -> float:
    """Expected deletions until no shard has a live order: m·L·H(m·min(B, L)), with H the harmonic number.

    The setting of METHOD.md: each request hits a uniformly random slice of a uniformly random shard, and
    the B orders of a shard start with distinct slices. It is a coupon collector over the m·min(B, L) first
    slices, each hit with probability 1/(mL) per request. `budget` = 1 gives SISA with slice checkpoints.
    """
    for name, value in (("num_shards", num_shards), ("num_slices", num_slices), ("budget", budget)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise PlanError(f"`{name}` must be an int >= 1; got {value!r}. Pass a positive count.")
    return _coupon_collector(num_shards * num_slices, num_shards * min(budget, num_slices))


def _coupon_collector(cells: int, targets: int) -> float:
    """Expected uniform draws from `cells` equally likely cells until `targets` given cells were all drawn."""
    return cells * math.fsum(1.0 / k for k in range(1, targets + 1))


@dataclass(frozen=True)
class Requests:
    """Who sends deletion requests, and how often: see the module docstring for each distribution."""

    distribution: Distribution = "cells"
    population: int = 10_000  # records ("uniform") or data subjects ("zipf", "hot") requests draw from
    zipf_exponent: float = 1.0  # "zipf": the subject of rank r is asked for with weight r^-a
    hot_fraction: float = 0.1  # "hot": share of subjects that are hot ...
    hot_share: float = 0.5  # ... and the share of requests they send

    def __post_init__(self) -> None:
        if self.distribution not in get_args(Distribution):
            raise PlanError(f"`distribution` must be one of {', '.join(map(repr, get_args(Distribution)))}; "
                            f"got {self.distribution!r}. Use 'cells' for the closed form's setting.")
        if isinstance(self.population, bool) or not isinstance(self.population, numbers.Integral) \
                or self.population < 1:
            raise PlanError(f"`population` must be an int >= 1; got {self.population!r}. Use the number of "
                            "records (uniform) or subjects (zipf, hot), such as 10000.")
        object.__setattr__(self, "population", int(self.population))
        for name, low, high in (("zipf_exponent", 0.0, math.inf), ("hot_fraction", 0.0, 1.0),
                                ("hot_share", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low < value < high:
                allowed = f"a number > {low}" if high == math.inf else f"a number in ({low}, {high})"
                raise PlanError(f"`{name}` must be {allowed}; got {value!r}. Keep the default "
                                f"({getattr(Requests, name)}) or pick a value in range.")
            object.__setattr__(self, name, float(value))

    @property
    def by_subject(self) -> bool:
        """Whether a request deletes a data subject (else a record)."""
        return self.distribution in ("zipf", "hot")

    def weights(self) -> NDArray[np.float64]:
        """Relative request weight of each record or subject (unused for "cells")."""
        import numpy as np

        n = self.population
        if self.distribution == "zipf":
            return np.arange(1, n + 1, dtype=np.float64) ** -self.zipf_exponent
        if self.distribution == "hot":
            hot = max(1, min(n - 1, round(self.hot_fraction * n))) if n > 1 else n
            weights = np.full(n, (1.0 - self.hot_share) / max(n - hot, 1))
            weights[:hot] = self.hot_share / hot
            return weights
        return np.ones(n, dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        """The settings that matter for this distribution, as JSON-ready values."""
        out: dict[str, Any] = {"distribution": self.distribution}
        if self.distribution != "cells":
            out["population"] = self.population
        if self.distribution == "zipf":
            out["zipf_exponent"] = self.zipf_exponent
        if self.distribution == "hot":
            out |= {"hot_fraction": self.hot_fraction, "hot_share": self.hot_share}
        return out


@dataclass(frozen=True)
class _Unit:
    """One record, or one subject's record, as `partition` sees it."""

    id: str
    subject: str | None
    risk: float


@dataclass(frozen=True, eq=False)
class CapacityResult:
    """What `simulate` measured: per-trial event counts and mean curves against the number of deletions.

    Times count requests, 1-based: a value t means the t-th request caused the event; `math.inf` means it
    did not happen within the horizon. `depth_drop[d - 1]` holds, per trial, the request after which some
    shard's served depth first fell below d, so `depth_drop[0]` equals `first_death`.
    """

    plan: Plan
    requests: Requests
    trials: int
    seed: int
    horizon: int | None
    closed_form: float | None  # expected all_dead for "cells" requests; None for the others
    sisa_closed_form: float | None  # the same with one order per shard (SISA with slice checkpoints)
    first_death: NDArray[np.float64] = field(repr=False)  # (trials,) until the first shard drops out
    all_dead: NDArray[np.float64] = field(repr=False)  # (trials,) until no shard is left
    depth_drop: NDArray[np.float64] = field(repr=False)  # (L, trials)
    served_depth: NDArray[np.float64] = field(repr=False)  # mean over trials and shards (dead = 0), per t
    live_shards: NDArray[np.float64] = field(repr=False)  # mean shards still in the ensemble, per t
    serving: NDArray[np.float64] = field(repr=False)  # share of trials with any shard left, per t

    @property
    def label(self) -> str:
        """Short name of the configuration, such as 'cyclic B=3' or 'prior_aware B=3'."""
        name = "prior_aware" if self.plan.placement == "prior_aware" else self.plan.selection
        return f"{name} B={self.plan.resolved_budget}"

    def survival(self, deletions: int, *, min_depth: int = 1) -> float:
        """Share of trials in which every shard still serves depth >= `min_depth` after `deletions` requests."""
        if not 1 <= min_depth <= self.plan.num_slices:
            raise PlanError(f"`min_depth` must be in [1, {self.plan.num_slices}] (= num_slices); got "
                            f"{min_depth!r}. Use 1 to ask only that every shard stays live.")
        return float((self.depth_drop[min_depth - 1] > deletions).mean())

    def summary(self) -> dict[str, Any]:
        """Mean, standard error and quantiles of `first_death` and `all_dead`, with the closed forms."""
        return {"first_death": _stats(self.first_death), "all_dead": _stats(self.all_dead),
                "closed_form": self.closed_form, "sisa_closed_form": self.sisa_closed_form}

    def to_dict(self) -> dict[str, Any]:
        """Settings, summary and curves as JSON-ready values (infinite times become null)."""
        plan = self.plan
        settings = {"num_shards": plan.num_shards, "num_slices": plan.num_slices, "budget": plan.resolved_budget,
                    "selection": plan.selection, "placement": plan.placement, "seed": plan.seed,
                    "deletion_prior": None if plan.deletion_prior is None else list(plan.deletion_prior)}
        if plan.placement == "prior_aware":
            settings |= {"risky_slices": plan.risky_slices, "risk_threshold": plan.risk_threshold}
        return {"label": self.label, "plan": settings, "requests": self.requests.to_dict(),
                "trials": self.trials, "seed": self.seed, "horizon": self.horizon, **self.summary(),
                "curves": {"deletions": list(range(len(self.served_depth))),
                           "served_depth": [round(float(v), 6) for v in self.served_depth],
                           "live_shards": [round(float(v), 6) for v in self.live_shards],
                           "serving": [round(float(v), 6) for v in self.serving]}}


def _stats(times: NDArray[np.float64]) -> dict[str, Any]:
    import numpy as np

    finite = np.isfinite(times)
    censored = int((~finite).sum())

    def q(p: float) -> float | None:
        value = float(np.quantile(times, p, method="inverted_cdf"))
        return value if math.isfinite(value) else None

    return {"mean": float(times.mean()) if not censored else None,
            "sem": float(times.std(ddof=1) / math.sqrt(times.size)) if not censored and times.size > 1 else None,
            "median": q(0.5), "p05": q(0.05), "p95": q(0.95), "censored": censored}


def served_depth_table(orders: Sequence[Order], num_slices: int) -> NDArray[np.int16]:
    """Served depth of one shard (0: out of the ensemble) for every set of hit slices, by the engine's rules.

    Entry `mask` is the depth after requests hit the slices whose bits are set in `mask`, starting from
    fully trained orders: `truncate` each order by the hit slices, then serve `choose_served`'s pick.
    """
    import numpy as np

    table = np.zeros(1 << num_slices, dtype=np.int16)
    for mask in range(1 << num_slices):
        hit = frozenset(s for s in range(num_slices) if mask >> s & 1)
        depths = [truncate(order, num_slices, hit) for order in orders]
        served = choose_served(depths)
        table[mask] = 0 if served is None else depths[served]
    return table


def simulate(plan: Plan, *, requests: Requests | None = None, trials: int = 1000, seed: int = 0,
             horizon: int | None = None) -> CapacityResult:
    """Monte Carlo deletion capacity of `plan` under `requests` (default: "cells"), on the engine's rules.

    `horizon` stops each trial after that many requests (events later count as never); by default a trial
    runs until every cell has been hit ("cells") or every record or subject is deleted. With selection
    "bms" and no `deletion_prior`, the plan gets the prior the requests imply per slice, as an informed
    user would give it. Same arguments, same result.

        result = simulate(Plan(num_shards=5, num_slices=6, budget=3), trials=2000)
        result.summary()["all_dead"]["mean"], result.closed_form     # about 99.5, and 99.55
    """
    requests = Requests() if requests is None else requests
    if not isinstance(plan, Plan):
        raise PlanError(f"`plan` must be an s3t.Plan; got {type(plan).__name__}. Build one with Plan(...).")
    if not isinstance(requests, Requests):
        raise PlanError(f"`requests` must be an s3t.capacity.Requests; got {type(requests).__name__}.")
    _positive("trials", trials)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise PlanError(f"`seed` must be an int >= 0; got {seed!r}.")
    if horizon is not None:
        _positive("horizon", horizon)
    draw = first_hits(plan, requests=requests, trials=trials, seed=seed, horizon=horizon)
    plan, shard_orders, table, first_hit = draw.plan, draw.shard_orders, draw.depth_table, draw.first_hit
    m, num_slices = plan.num_shards, plan.num_slices
    result = _measure(first_hit, table, horizon)

    closed = sisa = None
    if requests.distribution == "cells":
        firsts = sum(len({order[0] for order in orders}) for orders in shard_orders)
        closed = _coupon_collector(m * num_slices, firsts)
        sisa = expected_capacity(m, num_slices, 1)
    return CapacityResult(plan=plan, requests=requests, trials=trials, seed=int(seed), horizon=horizon,
                          closed_form=closed, sisa_closed_form=sisa, **result)


@dataclass(frozen=True, eq=False)
class Draw:
    """Simulated request sequences, as `first_hits` returns them (the raw material of `simulate`)."""

    plan: Plan  # the plan simulated ("bms" without a prior gets the prior the requests imply)
    shard_orders: list[list[Order]]  # the orders of each shard
    depth_table: NDArray[np.int16] = field(repr=False)  # (m, 2^L) served depth per set of hit slices
    first_hit: NDArray[np.float64] = field(repr=False)  # (trials, m, L) request that first hit each cell


def first_hits(plan: Plan, *, requests: Requests, trials: int, seed: int, horizon: int | None) -> Draw:
    """Draw `trials` request sequences for `plan`: when each (shard, slice) cell is first hit, 1-based.

    Arguments as in `simulate` (checked there); `math.inf` marks a cell not hit within the horizon. The
    served depth of shard k after requests hit the slices in mask h is `depth_table[k, h]`.
    """
    import numpy as np

    m, num_slices = plan.num_shards, plan.num_slices
    if num_slices > MAX_SLICES:
        raise PlanError(f"`num_slices` = {num_slices} is above the simulator's limit of {MAX_SLICES} (it "
                        f"tabulates all 2^L sets of hit slices); simulate at most {MAX_SLICES} slices.")
    rng = np.random.default_rng(seed)

    cells = weights = None
    if requests.distribution != "cells":
        weights = requests.weights()
        cells = _place(plan, requests, weights)
        if plan.selection == "bms" and plan.deletion_prior is None:
            mass = np.bincount(cells % num_slices, weights=weights, minlength=num_slices)
            plan = plan.replace(deletion_prior=tuple(float(v) for v in mass))
    shard_orders = [select_orders(plan, k) for k in range(m)]
    if cells is not None:   # as in the engine, an order whose first slice holds no record is never trained
        occupied = set(np.unique(cells).tolist())
        shard_orders = [[o for o in orders if attainable_depth(o, {s for s in range(num_slices)
                                                                   if k * num_slices + s in occupied})]
                        for k, orders in enumerate(shard_orders)]
    tables: dict[tuple[Order, ...], NDArray[np.int16]] = {}
    for orders in shard_orders:
        if tuple(orders) not in tables:
            tables[tuple(orders)] = served_depth_table(orders, num_slices)
    table = np.stack([tables[tuple(orders)] for orders in shard_orders])  # (m, 2^L)

    if cells is None:
        first_hit = _first_hits_uniform_cells(rng, trials, m * num_slices, horizon)
    else:
        first_hit = _first_hits_population(rng, trials, cells, weights, m * num_slices, horizon)
    return Draw(plan, shard_orders, table, first_hit.reshape(trials, m, num_slices))


def _positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise PlanError(f"`{name}` must be an int >= 1; got {value!r}.")


def _place(plan: Plan, requests: Requests, weights: NDArray[np.float64]) -> NDArray[np.int64]:
    """Cell index (shard * L + slice) of every record or subject, placed by the real partition."""
    import numpy as np

    risk = weights / (weights + weights.mean())
    if requests.by_subject:
        units = [_Unit(f"u{i}", f"s{i}", float(r)) for i, r in enumerate(risk)]
    else:
        units = [_Unit(f"r{i}", None, float(r)) for i, r in enumerate(risk)]
    where = partition(units, seed=plan.seed, num_shards=plan.num_shards, num_slices=plan.num_slices,
                      placement=plan.placement, risky_slices=plan.risky_slices, risk_threshold=plan.risk_threshold)
    return np.array([where[u.id][0] * plan.num_slices + where[u.id][1] for u in units], dtype=np.int64)


def _first_hits_uniform_cells(rng: np.random.Generator, trials: int, cells: int,
                              horizon: int | None) -> NDArray[np.float64]:
    """(trials, cells) index of the request that first hit each cell; requests hit cells uniformly."""
    import numpy as np

    first = np.full((trials, cells), np.inf)
    chunk = max(64, min(cells, _CHUNK_CELLS // trials))
    step = 0
    while horizon is None or step < horizon:
        todo = np.flatnonzero(np.isinf(first).any(axis=1))  # trials with a cell not yet hit
        if todo.size == 0:
            break
        size = chunk if horizon is None else min(chunk, horizon - step)
        draws = rng.integers(0, cells, size=(todo.size, size))
        times = np.arange(step + 1, step + size + 1, dtype=np.float64)
        # minimum.at, not fancy assignment: with repeated cells the earliest request must win.
        np.minimum.at(first, (np.repeat(todo, size), draws.ravel()), np.tile(times, todo.size))
        step += size
    return first


def _first_hits_population(rng: np.random.Generator, trials: int, cells: NDArray[np.int64],
                           weights: NDArray[np.float64], num_cells: int,
                           horizon: int | None) -> NDArray[np.float64]:
    """(trials, cells) index of the request that first hit each cell, deleting units without replacement.

    A trial's deletion sequence sorts the units by exponential keys E/w (Efraimidis-Spirakis): that is
    exactly drawing with probability proportional to w among the units not yet drawn. A cell is first hit
    by its unit with the smallest key, at that key's rank among all keys.
    """
    import numpy as np

    # Keys are drawn in cell order (units are exchangeable given their weights), so each cell's units are
    # one contiguous run of columns.
    by_cell = np.argsort(cells, kind="stable")
    weights = weights[by_cell]
    present, starts = np.unique(cells[by_cell], return_index=True)
    n = cells.size
    equal = bool(np.all(weights == weights[0]))
    # Within a horizon only the `horizon` smallest keys matter: a partial sort finds them in linear time.
    kept = n if horizon is None or horizon >= n else horizon
    first = np.full((trials, num_cells), np.inf)
    batch = max(1, _CHUNK_CELLS // n)
    for lo in range(0, trials, batch):
        size = min(batch, trials - lo)
        keys = rng.random((size, n)) if equal else rng.exponential(size=(size, n)) / weights
        cell_min = np.minimum.reduceat(keys, starts, axis=1)
        smallest = np.sort(np.partition(keys, kept - 1, axis=1)[:, :kept] if kept < n else keys, axis=1)
        rank = np.stack([np.searchsorted(smallest[i], cell_min[i]) for i in range(size)]) + 1.0
        # A rank past the kept keys means the cell's first key is not among them: not hit in the horizon.
        first[lo:lo + size, present] = np.where(rank > kept, np.inf, rank)
    if horizon is not None:
        first[first > horizon] = np.inf
    return first


def _measure(first_hit: NDArray[np.float64], table: NDArray[np.int16], horizon: int | None) -> dict[str, Any]:
    """Event times and mean curves from the first-hit times (trials, m, L) and the depth tables (m, 2^L)."""
    import numpy as np

    trials, m, num_slices = first_hit.shape
    hits = np.argsort(first_hit, axis=2, kind="stable")  # a shard's slices in the order they are first hit
    times = np.take_along_axis(first_hit, hits, axis=2)
    masks = np.cumsum(np.left_shift(1, hits), axis=2)  # bits are distinct, so the running sum is the union
    after = table[np.arange(m)[None, :, None], masks].astype(np.int64)  # served depth after each event
    full = table[:, 0].astype(np.int64)  # fully trained: nothing hit yet
    before = np.concatenate([np.broadcast_to(full[None, :, None], (trials, m, 1)), after[..., :-1]], axis=2)

    def drop_times(depth: int) -> NDArray[np.float64]:
        """(trials, m) request after which each shard's served depth first fell below `depth`."""
        below = after < depth
        k = np.argmax(below, axis=2)
        when = np.take_along_axis(times, k[..., None], axis=2)[..., 0]
        # A shard below `depth` before any request (no trainable order: every order starts on an empty slice).
        return np.where(full[None, :] < depth, 0.0, np.where(below.any(axis=2), when, np.inf))

    depth_drop = np.stack([drop_times(d).min(axis=1) for d in range(1, num_slices + 1)])
    death = drop_times(1)
    first_death, all_dead = death.min(axis=1), death.max(axis=1)

    if horizon is not None:
        end = horizon
    elif np.isfinite(all_dead).all():
        end = int(all_dead.max())
    else:
        end = int(times[np.isfinite(times)].max(initial=0))
    happened = np.isfinite(times) & (times <= end)
    when = times[happened].astype(np.int64)
    depth_change = np.bincount(when, weights=(after - before)[happened], minlength=end + 1)
    died = ((before > 0) & (after == 0))[happened]
    deaths = np.bincount(when, weights=died, minlength=end + 1)
    gone = np.bincount(all_dead[np.isfinite(all_dead) & (all_dead <= end)].astype(np.int64), minlength=end + 1)
    return {
        "first_death": first_death, "all_dead": all_dead, "depth_drop": depth_drop,
        "served_depth": full.mean() + np.cumsum(depth_change) / (trials * m),
        "live_shards": float((full > 0).sum()) - np.cumsum(deaths) / trials,
        "serving": 1.0 - np.cumsum(gone) / trials,
    }


def plan_for(selection: str, *, num_shards: int, num_slices: int, budget: int, seed: int = 0,
             risky_slices: int = 1, risk_threshold: float = 0.5) -> Plan:
    """The plan a simulator selection stands for: 'prior_aware' is cyclic selection with prior-aware placement."""
    if selection not in SELECTIONS:
        raise PlanError(f"`selection` must be one of {', '.join(map(repr, SELECTIONS))}; got {selection!r}. "
                        "Pick one of those.")
    if selection == "prior_aware":
        return Plan(num_shards=num_shards, num_slices=num_slices, budget=budget, seed=seed,
                    placement="prior_aware", risky_slices=risky_slices, risk_threshold=risk_threshold)
    return Plan(num_shards=num_shards, num_slices=num_slices, budget=budget, seed=seed, selection=selection)


def sweep(*, num_shards: int, num_slices: int, budgets: Sequence[int], selections: Sequence[str] = ("cyclic",),
          requests: Sequence[Requests] = (Requests(),), trials: int = 1000, seed: int = 0,
          risky_slices: int = 1, risk_threshold: float = 0.5, horizon: int | None = None) -> list[CapacityResult]:
    """`simulate` every combination of request model, selection and budget (in that nesting), same seed each.

        sweep(num_shards=5, num_slices=6, budgets=[1, 3, 6])    # SISA, B = 3, B = 6 under "cells"
    """
    return [simulate(plan_for(selection, num_shards=num_shards, num_slices=num_slices, budget=budget,
                              risky_slices=risky_slices, risk_threshold=risk_threshold),
                     requests=req, trials=trials, seed=seed, horizon=horizon)
            for req in requests for selection in selections for budget in budgets]


def save_json(results: Sequence[CapacityResult], path: str | os.PathLike[str]) -> None:
    """Write the results as sorted JSON, stamped with the s3t version."""
    from s3t import __version__

    payload = {"s3t_version": __version__, "results": [r.to_dict() for r in results]}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, sort_keys=True, indent=1)
        f.write("\n")


def plot(results: Sequence[CapacityResult], path: str | os.PathLike[str], *, title: str | None = None) -> None:
    """Draw live shards and mean served depth against deletions, one column per request model, as a PNG.

    Colour tells the selection, line style the budget; dotted vertical lines mark the closed form where it
    applies. The x axis stops where 99% of trials have lost every shard.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not results:
        raise PlanError("`plot` needs at least one result; run `simulate` or `sweep` first.")
    groups: dict[str, list[CapacityResult]] = {}
    for r in results:
        groups.setdefault(_describe(r.requests), []).append(r)
    names = list(dict.fromkeys(r.label.split()[0] for r in results))
    budgets = sorted({r.plan.resolved_budget for r in results})
    styles = ["-", "--", "-.", (0, (5, 1, 1, 1, 1, 1))]
    # The Figure API with an explicit Agg canvas: no pyplot, so no global backend switch for the caller.
    fig = Figure(figsize=(4.8 * len(groups), 6.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(groups), squeeze=False, sharex="col")
    for col, (name, group) in enumerate(groups.items()):
        top, bottom = axes[0][col], axes[1][col]
        for r in group:
            color = f"C{names.index(r.label.split()[0]) % 10}"
            style = styles[budgets.index(r.plan.resolved_budget) % len(styles)]
            x = np.arange(len(r.live_shards))
            top.plot(x, r.live_shards, color=color, linestyle=style, label=r.label)
            bottom.plot(x, r.served_depth, color=color, linestyle=style, label=r.label)
            if r.closed_form is not None:
                top.axvline(r.closed_form, color=color, linestyle=":", linewidth=1)
        ends = [float(np.quantile(r.all_dead, 0.99)) for r in group]
        finite = [e for e in ends if math.isfinite(e)]
        if finite:
            bottom.set_xlim(0, max(finite))
        top.set_title(name, fontsize=10)
        top.set_ylabel("live shards (mean)")
        bottom.set_ylabel("served depth (mean over shards)")
        bottom.set_xlabel("deletion requests")
        top.grid(alpha=0.3)
        bottom.grid(alpha=0.3)
        top.legend(fontsize=8)
    plan = results[0].plan
    note = "; dotted: closed form" if any(r.closed_form is not None for r in results) else ""
    fig.suptitle(title or f"Deletion capacity, m={plan.num_shards}, L={plan.num_slices} "
                          f"({results[0].trials} trials{note})", fontsize=11)
    fig.savefig(os.fspath(path), dpi=100)


def _describe(requests: Requests) -> str:
    if requests.distribution == "cells":
        return "uniform over (shard, slice) cells"
    if requests.distribution == "uniform":
        return f"uniform over {requests.population:,} records"
    if requests.distribution == "zipf":
        return f"Zipf(a={requests.zipf_exponent:g}) over {requests.population:,} subjects"
    return (f"{requests.hot_fraction:.0%} of {requests.population:,} subjects send "
            f"{requests.hot_share:.0%} of requests")
