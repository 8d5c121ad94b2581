"""Cost and benefit of honouring deletion requests over a horizon: S3T against SISA and periodic full retraining.

Decision-makers ask what exact unlearning costs and what it buys. `cost_report` answers for one plan, a
number of records, an expected number of deletion requests per period and a horizon, in machine-hours (and
money, given a price per machine-hour), deletions served without downtime and the time a deleted record
keeps influencing the served model. Everything is an expected value under a stated model; what is *not*
modelled is listed in `ASSUMPTIONS` and printed with every report.

The three methods, all on the same frozen backbone, LoRA settings and epochs (E), N records, m shards:

- **S3T** (the plan: m, L, B): trains every distinct order prefix once; stage i runs layer groups 1..i on
  i/L of its shard. A deletion truncates orders at once (no training). When some shard's served depth falls
  below `restore_below` (1: a shard dropped out of the ensemble), everything truncated is retrained, as
  `restore()` and the service's `--restore-below` do (`restore_scope="all"`); or, with
  `restore_scope="shard"`, only that shard (a policy `restore()` does not offer yet). How often that
  happens and what it retrains come from the capacity simulator (`capacity.first_hits`: the engine's own
  truncation and serving rules): with T the requests until the trigger and W the stages it retrains (each
  distinct prefix holding a hit slice), restorations per request = 1 / E[T] and work per restoration =
  E[W] (renewal-reward; per shard for "shard").
- **SISA** (m shards, one order of L slices, one LoRA group over every adapted block, a checkpoint per
  slice): each deletion retrains its shard from the hit slice j: stages j..L, each on i/L of the shard.
  Slice j is uniform (hash placement), so a deletion costs N·E·(L+1)(2L+1) / (6·m·L) examples. The shard
  serves its checkpoint before slice j meanwhile (exact); a hit in its first slice takes it out until then.
- **Full retraining** (one LoRA fine-tune of the same blocks on all the data, no sharding): every
  `retrain_every_days` days it is retrained on the remaining data (N·E examples). Until then a deleted
  record stays in the served model: on average half the interval plus one retraining, at most the whole
  interval plus one retraining.

Machine time = examples / throughput at the depth a stage runs (`Throughput`: measured per depth by
`s3t.calibration.calibrate`, or one figure for every depth), plus one frozen forward per record to fill
the trunk cache when that rate was measured (all three methods pay it once, then reuse the cache).

    >>> report = cost_report(Plan(num_shards=2, num_slices=3, budget=3), records=10_000,
    ...                      deletions_per_period=20, periods=12, throughput=100.0, trials=200)
    >>> [m.method for m in report.methods]
    ['S3T', 'SISA', 'full retraining']
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from s3t.capacity import Requests, first_hits
from s3t.errors import PlanError
from s3t.plan import Plan
from s3t.planner import prefix_counts

__all__ = ["Throughput", "MethodCost", "CostReport", "cost_report", "save_json", "plot", "ASSUMPTIONS",
           "RestoreScope"]

S3T, SISA, FULL = "S3T", "SISA", "full retraining"
RestoreScope = Literal["all", "shard"]

ASSUMPTIONS = (
    "Requests arrive at a constant expected rate; each deletes one record or one data subject "
    "(the simulator's request model, 'cells' by default: a uniformly random slice of a random shard).",
    "Slices are equal in size and deletions are a small share of the data: stages train on N/(m·L) records "
    "per slice throughout the horizon.",
    "S3T restores everything truncated (restore_scope 'all', what restore() does) or only the shard concerned "
    "('shard') when a shard's served depth falls below `restore_below`; requests that arrive while a restoration "
    "runs are not simulated (they only shorten orders further).",
    "SISA retrains the hit shard from the hit slice after every request, one request at a time; full "
    "retraining runs on a fixed schedule, whether or not requests arrived.",
    "Machine time is examples / throughput at the depth each stage runs; S3T stage i runs i of L layer groups, "
    "SISA and full retraining run all of them (the depth-L rate). Given one throughput figure, every depth "
    "gets it, which overstates S3T's cost relative to the others.",
    "Accuracy is not modelled: a truncated S3T shard serves a shallower model until restored (see "
    "docs/results.md for measured accuracy under deletion); SISA serves an earlier checkpoint while retraining.",
    "One machine; no queueing, failures, storage or inference costs.",
)


@dataclass(frozen=True)
class Throughput:
    """Training speed on one machine: examples per second at each stage depth 1..L, and the trunk's records/s.

    Depth i means a stage runs layer groups 1..i forward and backward (the blocks below come from the
    trunk cache); SISA stages and the plain fine-tune run every adapted group, the depth-L rate. `trunk` is
    the one-off frozen forward per record that fills the cache (None: not counted).
    """

    per_depth: tuple[float, ...]
    trunk: float | None = None
    source: str = "given"

    def __post_init__(self) -> None:
        rates = tuple(self.per_depth) if isinstance(self.per_depth, Sequence) else ()
        if not rates or not all(_positive_number(r) for r in rates):
            raise PlanError(f"`per_depth` must be a non-empty list of positive examples/s; got {self.per_depth!r}. "
                            "Measure it with s3t.calibration.calibrate, or give one figure via Throughput.uniform.")
        object.__setattr__(self, "per_depth", tuple(float(r) for r in rates))
        if self.trunk is not None:
            if not _positive_number(self.trunk):
                raise PlanError(f"`trunk` must be a positive number of records/s, or None; got {self.trunk!r}.")
            object.__setattr__(self, "trunk", float(self.trunk))

    @classmethod
    def uniform(cls, examples_per_s: float, num_slices: int, *, trunk: float | None = None,
                source: str = "given") -> Throughput:
        """The same rate at every depth (and, without `trunk`, the trunk fill not counted)."""
        if not _positive_number(examples_per_s):
            raise PlanError(f"`throughput` must be a positive number of training examples per second; got "
                            f"{examples_per_s!r}. Measure it with a short run (s3t cost --calibrate RUN_DIR).")
        return cls((float(examples_per_s),) * num_slices, trunk, source)

    @classmethod
    def of(cls, rates: float | Sequence[float], num_slices: int, *, trunk: float | None = None) -> Throughput:
        """One rate for every depth, or one per depth 1..L (as `calibrate` measures them)."""
        if isinstance(rates, Sequence) and len(rates) != 1:
            return cls(tuple(rates), trunk)
        return cls.uniform(rates[0] if isinstance(rates, Sequence) else rates, num_slices, trunk=trunk)

    @property
    def full(self) -> float:
        """Examples/s when every adapted group trains: SISA stages and the plain fine-tune."""
        return self.per_depth[-1]

    def seconds(self, examples_by_depth: Sequence[float], *, trunk_records: float = 0.0) -> float:
        """Machine seconds to train `examples_by_depth[i - 1]` examples at each depth i, plus the trunk fill."""
        if len(examples_by_depth) != len(self.per_depth):
            raise PlanError(f"the throughput has {len(self.per_depth)} depths but the work has "
                            f"{len(examples_by_depth)}; calibrate with the plan's `num_slices`.")
        fill = trunk_records / self.trunk if self.trunk is not None else 0.0
        return math.fsum(n / r for n, r in zip(examples_by_depth, self.per_depth)) + fill

    def to_dict(self) -> dict[str, Any]:
        return {"per_depth": list(self.per_depth), "trunk": self.trunk, "source": self.source}


@dataclass(frozen=True)
class MethodCost:
    """One method over the horizon: machine-hours, events that retrain, deletions, influence time.

    `events` are what it retrains after training once: S3T restorations, SISA shard retrains (one per
    deletion), full retrains. S3T and SISA spread them at a constant expected rate; full retraining runs
    every `every_days` days.
    """

    method: str
    offline_hours: float  # training once, at the start (trunk fill included when measured)
    events: float  # expected retraining events over the horizon
    hours_per_event: float
    deletions: float  # expected requests over the horizon
    served_without_downtime: float  # honoured at once (no training first) with every shard still serving
    influence_mean_days: float  # how long a deleted record keeps influencing the served model, on average
    influence_max_days: float  # ... at most
    horizon_days: float
    every_days: float | None = None  # full retraining's fixed interval; None: events at a constant rate
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def upkeep_hours(self) -> float:
        """Machine-hours spent retraining after deletions over the horizon."""
        return self.events * self.hours_per_event

    @property
    def total_hours(self) -> float:
        return self.offline_hours + self.upkeep_hours

    def hours_at(self, days: float) -> float:
        """Cumulative machine-hours `days` into the horizon (the offline training counts at day 0)."""
        if self.every_days is None:
            done = self.events * min(days, self.horizon_days) / self.horizon_days
        else:
            done = math.floor(min(days, self.horizon_days) / self.every_days + 1e-9)
        return self.offline_hours + done * self.hours_per_event

    def to_dict(self, price: float | None) -> dict[str, Any]:
        money = (lambda h: None) if price is None else (lambda h: h * price)
        return {"method": self.method, "offline_hours": self.offline_hours, "events": self.events,
                "hours_per_event": self.hours_per_event, "upkeep_hours": self.upkeep_hours,
                "total_hours": self.total_hours, "offline_cost": money(self.offline_hours),
                "upkeep_cost": money(self.upkeep_hours), "total_cost": money(self.total_hours),
                "deletions": self.deletions, "served_without_downtime": self.served_without_downtime,
                "influence_mean_days": self.influence_mean_days, "influence_max_days": self.influence_max_days,
                "every_days": self.every_days, "detail": self.detail}


@dataclass(frozen=True, eq=False)
class CostReport:
    """What `cost_report` computed: the settings and one `MethodCost` per method (S3T, SISA, full retraining)."""

    plan: Plan
    records: int
    deletions_per_period: float
    periods: int
    period_days: float
    retrain_every_days: float
    restore_below: int
    restore_scope: RestoreScope
    requests: Requests
    trials: int
    seed: int
    throughput: Throughput
    price: float | None
    methods: tuple[MethodCost, ...]

    def method(self, name: str) -> MethodCost:
        for m in self.methods:
            if m.method == name:
                return m
        raise KeyError(f"no method {name!r}; the report has {', '.join(m.method for m in self.methods)}")

    def curve(self, name: str, *, points: int | None = None) -> list[tuple[float, float]]:
        """(period, cumulative machine-hours) at the end of each period, or at `points` even steps."""
        method = self.method(name)
        steps = [k * self.periods / points for k in range(points + 1)] if points else range(self.periods + 1)
        return [(float(t), method.hours_at(t * self.period_days)) for t in steps]

    def to_dict(self) -> dict[str, Any]:
        p = self.plan
        return {"plan": {"num_shards": p.num_shards, "num_slices": p.num_slices, "budget": p.resolved_budget,
                         "epochs": p.epochs, "selection": p.selection, "placement": p.placement},
                "records": self.records, "deletions_per_period": self.deletions_per_period,
                "periods": self.periods, "period_days": self.period_days,
                "retrain_every_days": self.retrain_every_days, "restore_below": self.restore_below,
                "restore_scope": self.restore_scope,
                "requests": self.requests.to_dict(), "trials": self.trials, "seed": self.seed,
                "throughput": self.throughput.to_dict(), "price_per_machine_hour": self.price,
                "methods": [m.to_dict(self.price) for m in self.methods],
                "cumulative_hours": {m.method: [h for _t, h in self.curve(m.method)] for m in self.methods},
                "assumptions": list(ASSUMPTIONS)}


def cost_report(plan: Plan, *, records: int, deletions_per_period: float, periods: int,
                throughput: float | Throughput, price: float | None = None, period_days: float = 30.0,
                retrain_every_days: float = 30.0, restore_below: int = 1, restore_scope: RestoreScope = "all",
                requests: Requests | None = None,
                trials: int = 2000, seed: int = 0) -> CostReport:
    """Compare S3T (`plan`), SISA and periodic full retraining over `periods` periods of `period_days` days.

    `throughput` is training examples per second on one machine (one figure for every depth, or a
    `Throughput` from `s3t.calibration.calibrate`); `price` is money per machine-hour. S3T's restorations
    are simulated with `trials` request sequences (`requests`, default 'cells'); see the module docstring
    and `ASSUMPTIONS` for what is modelled.

        report = cost_report(Plan(num_shards=4, num_slices=4), records=20_000, deletions_per_period=30,
                             periods=12, throughput=240.0, price=3.0)
        report.method("S3T").total_hours, report.method("SISA").total_hours
    """
    if not isinstance(plan, Plan):
        raise PlanError(f"`plan` must be an s3t.Plan; got {type(plan).__name__}. Build one with Plan(...).")
    if plan.method != "s3t":
        raise PlanError(f"`plan.method` must be 's3t' (the report derives SISA itself); got {plan.method!r}.")
    requests = Requests() if requests is None else requests
    if not isinstance(requests, Requests):
        raise PlanError(f"`requests` must be an s3t.capacity.Requests; got {type(requests).__name__}.")
    L, m, E = plan.num_slices, plan.num_shards, plan.epochs
    _int("records", records, low=m * L, fix=f"every one of the plan's {m}x{L} slices needs a record")
    _int("periods", periods, low=1, fix="use the number of periods to compare over, such as 12")
    _int("restore_below", restore_below, low=1, fix="use 1 to restore when a shard drops out")
    if restore_below > L:
        raise PlanError(f"`restore_below` must be a served depth in [1, {L}] (= num_slices); got {restore_below}. "
                        "Use 1 to restore when a shard drops out of the ensemble.")
    if restore_scope not in get_args(RestoreScope):
        raise PlanError(f"`restore_scope` must be 'all' (what restore() does) or 'shard'; got {restore_scope!r}.")
    _int("trials", trials, low=1, fix="use a few thousand, such as 2000")
    _int("seed", seed, low=0, fix="use a non-negative int such as 0")
    _number("deletions_per_period", deletions_per_period, low=0.0, closed=True,
            fix="give the expected number of deletion requests per period, such as 20")
    _number("period_days", period_days, low=0.0, fix="use 30 for months, 7 for weeks")
    _number("retrain_every_days", retrain_every_days, low=0.0, fix="use the full-retraining interval, such as 30")
    if price is not None:
        _number("price", price, low=0.0, closed=True, fix="give the price of one machine-hour, such as 3.0")
        price = float(price)
    if not isinstance(throughput, Throughput):
        throughput = Throughput.uniform(throughput, L)
    if len(throughput.per_depth) != L:
        raise PlanError(f"the throughput has {len(throughput.per_depth)} depths but the plan has `num_slices` = {L}; "
                        "calibrate with this plan.")

    deletions = float(deletions_per_period) * periods
    horizon_days = float(period_days) * periods
    shard_pass = records / m * E  # examples in one epoch-budgeted pass over one shard
    hours = lambda by_depth, trunk=0.0: throughput.seconds(by_depth, trunk_records=trunk) / 3600  # noqa: E731
    at_full = lambda examples: [0.0] * (L - 1) + [examples]  # noqa: E731

    # S3T: every distinct prefix once, stage i on i/L of its shard at depth i; restorations from the simulator.
    offline = [count * m * depth / L * shard_pass for depth, count in enumerate(prefix_counts(plan), 1)]
    cycle = _restoration_cycle(plan, requests, restore_below, restore_scope, trials=trials, seed=seed)
    per_restore = [v * shard_pass for v in cycle["retrain_shard_passes"]]
    restorations = deletions / cycle["requests"]
    s3t = MethodCost(S3T, offline_hours=hours(offline, records), events=restorations,
                     hours_per_event=hours(per_restore), deletions=deletions,
                     served_without_downtime=deletions - restorations * cycle["shard_out"],
                     influence_mean_days=0.0, influence_max_days=0.0, horizon_days=horizon_days,
                     detail={"offline_examples_by_depth": offline, "restore_examples_by_depth": per_restore,
                             "requests_per_restoration": cycle["requests"],
                             "requests_per_restoration_sem": cycle["requests_sem"],
                             "restorations_taking_a_shard_out": cycle["shard_out"]})

    # SISA: (L+1)/2 shard-passes per shard offline; a deletion in slice j retrains stages j..L.
    sisa_offline = (L + 1) / 2 * m * shard_pass
    sisa_per_deletion = shard_pass * (L + 1) * (2 * L + 1) / (6 * L)
    sisa = MethodCost(SISA, offline_hours=hours(at_full(sisa_offline), records), events=deletions,
                      hours_per_event=hours(at_full(sisa_per_deletion)), deletions=deletions,
                      served_without_downtime=deletions * (L - 1) / L, influence_mean_days=0.0,
                      influence_max_days=0.0, horizon_days=horizon_days,
                      detail={"offline_examples": sisa_offline, "retrain_examples_per_deletion": sisa_per_deletion})

    # Full retraining: the fine-tune (N·E examples at full depth) at the start and every interval.
    full_hours = hours(at_full(records * E))
    retrains = math.floor(horizon_days / retrain_every_days + 1e-9)
    wait_days = full_hours / 24   # the retrain itself, on one machine, before the new model serves
    full = MethodCost(FULL, offline_hours=hours(at_full(records * E), records), events=retrains,
                      hours_per_event=full_hours, deletions=deletions, served_without_downtime=0.0,
                      influence_mean_days=retrain_every_days / 2 + wait_days,
                      influence_max_days=retrain_every_days + wait_days, horizon_days=horizon_days,
                      every_days=float(retrain_every_days), detail={"retrain_examples": records * E})
    return CostReport(plan=plan, records=int(records), deletions_per_period=float(deletions_per_period),
                      periods=int(periods), period_days=float(period_days),
                      retrain_every_days=float(retrain_every_days), restore_below=int(restore_below),
                      restore_scope=restore_scope,
                      requests=requests, trials=int(trials), seed=int(seed), throughput=throughput, price=price,
                      methods=(s3t, sisa, full))


def retrain_table(orders: Sequence[Sequence[int]], num_slices: int) -> Any:
    """Shard-passes `restore()` retrains per depth, for every set of hit slices: array (2^L, L).

    Any hit truncates every order of the shard (each order holds every slice); what is retrained are the
    distinct prefixes that hold a hit slice (the others keep their lineage and are reused), a prefix of
    length i costing i/L of the shard at depth i.
    """
    import numpy as np

    prefixes = {tuple(order[:i]) for order in orders for i in range(1, num_slices + 1)}
    table = np.zeros((1 << num_slices, num_slices))
    for mask in range(1 << num_slices):
        for prefix in prefixes:
            if any(mask >> s & 1 for s in prefix):
                table[mask, len(prefix) - 1] += len(prefix) / num_slices
    return table


def _restoration_cycle(plan: Plan, requests: Requests, restore_below: int, scope: RestoreScope, *,
                       trials: int, seed: int) -> dict:
    """Mean requests between restorations, what one retrains (shard-passes per depth, summed over shards), and
    the share of restorations whose trigger took a shard out of the ensemble (served depth 0).

    "all": a cycle ends when some shard falls below `restore_below` and retrains every shard's hit
    prefixes; renewal-reward gives the rates. "shard": each shard is its own renewal process, restored
    alone when it falls below; the rates of the m processes add up.
    """
    import numpy as np

    draw = first_hits(plan, requests=requests, trials=trials, seed=seed, horizon=None)
    first, table = draw.first_hit, draw.depth_table   # (trials, m, L), (m, 2^L)
    _, m, L = first.shape
    hits = np.argsort(first, axis=2, kind="stable")
    times = np.take_along_axis(first, hits, axis=2)
    depth_after = table[np.arange(m)[None, :, None], np.cumsum(np.left_shift(1, hits), axis=2)]
    below = (depth_after < restore_below) & np.isfinite(times)
    # (trials, m): the request after which each shard first fell below the target
    when = np.where(below.any(axis=2), np.take_along_axis(times, np.argmax(below, axis=2)[..., None], 2)[..., 0],
                    np.inf)
    trigger = when.min(axis=1, keepdims=True) if scope == "all" else when   # (trials, 1 or m)
    if not np.isfinite(trigger).all():
        raise PlanError(f"in some of the {trials} simulated trials a shard never fell below served depth "
                        f"{restore_below}, even after every record was deleted (too few records or subjects in "
                        "`requests.population` for this plan); raise the population.")
    mask = ((first <= trigger[..., None]).astype(np.int64) << np.arange(L)).sum(axis=2)   # (trials, m) at the trigger
    retrain = np.zeros((trials, m, L))   # what each shard retrains at its trigger
    tables: dict[tuple, Any] = {}
    for k, orders in enumerate(draw.shard_orders):
        key = tuple(map(tuple, orders))
        if key not in tables:
            tables[key] = retrain_table(orders, L)
        retrain[:, k] = tables[key][mask[:, k]]
    out = table[np.arange(m)[None, :], mask] == 0   # (trials, m): out of the ensemble at the trigger
    if scope == "all":
        cycle = trigger[:, 0]
        return {"requests": float(cycle.mean()),
                "requests_sem": float(cycle.std(ddof=1) / math.sqrt(trials)) if trials > 1 else 0.0,
                "retrain_shard_passes": [float(v) for v in retrain.sum(axis=1).mean(axis=0)],
                "shard_out": float(out.any(axis=1).mean())}
    rates = 1.0 / when.mean(axis=0)   # restorations of each shard per request
    work = retrain.mean(axis=0)       # (m, L) what each shard's restoration retrains
    return {"requests": float(1.0 / rates.sum()), "requests_sem": None,
            "retrain_shard_passes": [float(v) for v in (rates[:, None] * work).sum(axis=0) / rates.sum()],
            "shard_out": float((rates * out.mean(axis=0)).sum() / rates.sum())}


def save_json(report: CostReport, path: str | os.PathLike[str]) -> None:
    """Write the report as sorted JSON, stamped with the s3t version."""
    from s3t import __version__

    with open(path, "w", encoding="utf-8") as f:
        json.dump({"s3t_version": __version__, **report.to_dict()}, f, sort_keys=True, indent=1)
        f.write("\n")


def plot(report: CostReport, path: str | os.PathLike[str]) -> None:
    """Cumulative cost over the horizon per method (money when priced, else machine-hours) and influence time."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scale, unit = ((report.price, f"cost (at {report.price:g} per machine-hour)") if report.price
                   else (1.0, "machine-hours"))
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, width_ratios=(3, 2))
    for k, method in enumerate(report.methods):
        points = report.curve(method.method, points=max(200, 4 * report.periods))
        left.plot([t for t, _ in points], [h * scale for _, h in points], color=f"C{k}",
                  label=f"{method.method}: {method.served_without_downtime:.0f} of {method.deletions:.0f} "
                        "deletions served without downtime")
    left.set_xlabel(f"periods of {report.period_days:g} days")
    left.set_ylabel(f"cumulative {unit}")
    left.set_ylim(bottom=0)
    left.grid(alpha=0.3)
    left.legend(fontsize=8, loc="upper left")
    left.set_title(f"{report.records:,} records, {report.deletions_per_period:g} deletions per period", fontsize=10)
    names = [m.method for m in report.methods]
    means = [m.influence_mean_days for m in report.methods]
    maxes = [m.influence_max_days for m in report.methods]
    bars = right.bar(names, means, color=[f"C{k}" for k in range(len(names))], alpha=0.8, label="mean")
    right.scatter(names, maxes, color="black", marker="_", s=400, zorder=3, label="at most")
    for bar, mean in zip(bars, means):
        right.annotate("0 (deleted at once)" if mean == 0 else f"{mean:.1f} d", (bar.get_x() + bar.get_width() / 2,
                       mean), ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    right.set_ylabel("days")
    right.set_title("time a deleted record keeps\ninfluencing the served model", fontsize=10)
    right.set_ylim(0, max(maxes + [1.0]) * 1.15)
    right.legend(fontsize=8)
    right.grid(alpha=0.3, axis="y")
    p = report.plan
    fig.suptitle(f"Honouring deletions: S3T (m={p.num_shards}, L={p.num_slices}, B={p.resolved_budget}), SISA, "
                 f"full retraining every {report.retrain_every_days:g} days", fontsize=11)
    fig.savefig(os.fspath(path), dpi=100)


def _positive_number(value: object) -> bool:
    return (not isinstance(value, bool) and isinstance(value, numbers.Real) and 0 < value < math.inf)


def _int(name: str, value: object, *, low: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise PlanError(f"`{name}` must be an int >= {low}; got {value!r}: {fix}.")


def _number(name: str, value: object, *, low: float, fix: str, closed: bool = False) -> None:
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
          and (value >= low if closed else value > low))
    if not ok:
        raise PlanError(f"`{name}` must be a number {'>=' if closed else '>'} {low:g}; got {value!r}: {fix}.")
