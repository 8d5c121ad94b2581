"""Planning commands: simulate deletion capacity and recommend a plan."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Column, Table

from ..errors import S3TError
from .common import app, console, user_errors


@app.command()
@user_errors
def simulate(shards: Annotated[int, typer.Option("--shards", "-m", help="Shards (m).")] = 5,
             slices: Annotated[int, typer.Option("--slices", "-L", help="Slices per shard (L).")] = 6,
             budget: Annotated[Optional[list[int]], typer.Option("--budget", "-B", help="Orders per shard (repeatable; default 1, ceil(L/2), L).")] = None,
             selection: Annotated[Optional[list[str]], typer.Option(help="cyclic, bms, random or prior_aware (repeatable; default cyclic).")] = None,
             distribution: Annotated[Optional[list[str]], typer.Option(help="Requests: cells, uniform, zipf or hot (repeatable; default cells).")] = None,
             population: Annotated[int, typer.Option(help="Records (uniform) or subjects (zipf, hot) requests draw from.")] = 10_000,
             zipf_exponent: Annotated[float, typer.Option(help="zipf: weight of the subject of rank r is r^-a.")] = 1.0,
             hot_fraction: Annotated[float, typer.Option(help="hot: share of subjects that are hot.")] = 0.1,
             hot_share: Annotated[float, typer.Option(help="hot: share of requests the hot subjects send.")] = 0.5,
             risky_slices: Annotated[int, typer.Option(help="prior_aware: slices per shard that hold risky data.")] = 1,
             risk_threshold: Annotated[float, typer.Option(help="prior_aware: risk above which data is risky.")] = 0.5,
             trials: Annotated[int, typer.Option(min=1, help="Monte Carlo trials per configuration.")] = 2000,
             seed: Annotated[int, typer.Option(min=0, help="Random seed (same seed, same figures).")] = 0,
             out_json: Annotated[Optional[Path], typer.Option(help="Write results and curves as JSON here.")] = None,
             out_png: Annotated[Optional[Path], typer.Option(help="Plot live shards and served depth here (PNG).")] = None) -> None:
    """Simulate deletion capacity through the engine's truncation rules, next to the closed form.

    Example: s3t simulate -m 5 -L 6 -B 1 -B 3 -B 6 --out-png capacity.png
    """
    from ..capacity import Requests, plot, save_json, sweep

    outputs = {"--out-json": (out_json, save_json), "--out-png": (out_png, plot)}
    for option, (path, _) in outputs.items():   # before simulating, which may take minutes
        if path is not None:
            _check_out_path(option, path)
    requests = [Requests(d, population=population, zipf_exponent=zipf_exponent, hot_fraction=hot_fraction,
                         hot_share=hot_share) for d in distribution or ["cells"]]
    results = sweep(num_shards=shards, num_slices=slices, budgets=budget or sorted({1, -(-slices // 2), slices}),
                    selections=selection or ["cyclic"], requests=requests, trials=trials, seed=seed,
                    risky_slices=risky_slices, risk_threshold=risk_threshold)
    for option, (path, write) in outputs.items():
        if path is not None:
            try:
                write(results, path)
            except OSError as e:
                raise S3TError(f"cannot write {option} {path}: {e.strerror or e}; check that the folder is "
                               "writable and has space, or pick another path") from None
    table = Table("requests", "selection", "B", "first dies", "all die", "closed form", "SISA",
                  title=f"deletions until the first / all shards drop out, m={shards}, L={slices}, {trials} trials "
                        "(mean ± s.e.; closed form and SISA: all die)")
    for r in results:
        summary = r.summary()
        first, last = summary["first_death"], summary["all_dead"]
        table.add_row(r.requests.distribution, r.label.split()[0], str(r.plan.resolved_budget), _mean(first),
                      _mean(last), _num(r.closed_form), _num(r.sisa_closed_form))
    console.print(table)


@app.command("plan-capacity")
@user_errors
def plan_capacity(records: Annotated[int, typer.Option(help="Training records (N).")],
                  deletions: Annotated[int, typer.Option(help="Deletion requests to absorb before restoring (D).")],
                  confidence: Annotated[float, typer.Option(help="Probability that every shard meets the target.")] = 0.95,
                  min_depth: Annotated[Optional[int], typer.Option(help="Served depth every shard must keep (default: just stay live).")] = None,
                  throughput: Annotated[Optional[float], typer.Option(help="Measured training examples per second, for wall time.")] = None,
                  epochs: Annotated[int, typer.Option(help="Epochs per stage.")] = 1,
                  distribution: Annotated[str, typer.Option(help="Requests: cells, uniform, zipf or hot.")] = "cells",
                  population: Annotated[int, typer.Option(help="Records (uniform) or subjects (zipf, hot) requests draw from.")] = 10_000,
                  selection: Annotated[str, typer.Option(help="cyclic, bms, random or prior_aware.")] = "cyclic",
                  max_shards: Annotated[int, typer.Option(help="Most shards to consider.")] = 32,
                  max_slices: Annotated[int, typer.Option(help="Most slices to consider.")] = 8,
                  min_records_per_slice: Annotated[int, typer.Option(help="Fewest records a slice may hold.")] = 10,
                  trials: Annotated[int, typer.Option(min=1, help="Monte Carlo trials per check.")] = 1000,
                  seed: Annotated[int, typer.Option(min=0, help="Random seed.")] = 0) -> None:
    """Recommend shards, slices and budget that absorb D deletions, with their offline training cost.

    Example: s3t plan-capacity --records 20000 --deletions 100 --throughput 240
    """
    from ..capacity import Requests
    from ..planner import plan_capacity as recommend

    found = recommend(records, deletions, confidence=confidence, min_depth=min_depth, throughput=throughput,
                      epochs=epochs, requests=Requests(distribution, population=population), selection=selection,
                      max_shards=max_shards, max_slices=max_slices, min_records_per_slice=min_records_per_slice,
                      trials=trials, seed=seed)
    if not found:
        raise S3TError(f"no plan with at most {max_shards} shards and {max_slices} slices keeps every shard "
                       f"{'live' if min_depth is None else f'at depth >= {min_depth}'} through {deletions} deletions "
                       f"with probability {confidence} (and at least {min_records_per_slice} records per slice); raise "
                       "--max-shards or --max-slices, lower --min-records-per-slice, or plan to restore sooner")
    table = Table("m", "L", "B", "survival", "rec/slice", "passes/epoch", "examples", "time", title=f"plans for {records:,} records that absorb {deletions} deletions "
                                      f"(simulated, {trials} trials)")
    for c in found:
        table.add_row(str(c.num_shards), str(c.num_slices), str(c.budget), f"{c.survival:.3f}",
                      f"{c.records_per_slice:.0f}", f"{c.shard_passes:g}", f"{c.training_examples:,}",
                      "-" if c.seconds is None else _duration(c.seconds))
    console.print(table)



@app.command("cost")
@user_errors
def cost(deletions: Annotated[float, typer.Option(help="Expected deletion requests per period.")],
         records: Annotated[Optional[int], typer.Option(help="Training records (N); default with --calibrate RUN_DIR: its live records.")] = None,
         periods: Annotated[int, typer.Option(help="Horizon, in periods.")] = 12,
         period_days: Annotated[float, typer.Option(help="Days per period (30: deletions per month).")] = 30.0,
         throughput: Annotated[Optional[list[float]], typer.Option(help="Measured training examples per second: once (every depth), or once per depth 1..L (as a calibration prints them).")] = None,
         trunk_throughput: Annotated[Optional[float], typer.Option(help="With --throughput: records per second of the one-off frozen forward that fills the trunk cache (as a calibration prints it); default: not counted.")] = None,
         calibrate: Annotated[Optional[Path], typer.Option(help="Measure the throughput on this run's model and data (a few batches per depth, in a temporary copy); its plan is the default plan.")] = None,
         calibrate_data: Annotated[Optional[str], typer.Option(help="Measure the throughput on these records (.jsonl, .csv or `bbc-news`) with the plan's model.")] = None,
         calibrate_batches: Annotated[int, typer.Option(help="Batches timed per depth when calibrating.")] = 4,
         price: Annotated[Optional[float], typer.Option(help="Price of one machine-hour (any currency); without it, machine-hours only.")] = None,
         plan_file: Annotated[Optional[Path], typer.Option("--plan", help="S3T plan TOML (default: --calibrate's run plan, else Plan()).")] = None,
         shards: Annotated[Optional[int], typer.Option("--shards", "-m", help="Override the plan's shards (m).")] = None,
         slices: Annotated[Optional[int], typer.Option("--slices", "-L", help="Override the plan's slices (L).")] = None,
         budget: Annotated[Optional[int], typer.Option("--budget", "-B", help="Override the plan's orders per shard (B).")] = None,
         epochs: Annotated[Optional[int], typer.Option(help="Override the plan's epochs per stage.")] = None,
         recommend: Annotated[bool, typer.Option("--recommend", help="Take m, L, B from `s3t plan-capacity`'s cheapest plan that absorbs one period's deletions.")] = False,
         retrain_every: Annotated[float, typer.Option(help="Full retraining: days between retrains.")] = 30.0,
         restore_below: Annotated[int, typer.Option(help="S3T: restore when a shard's served depth falls below this (1: when a shard drops out).")] = 1,
         restore_scope: Annotated[str, typer.Option(help="S3T: restore everything truncated (all: what `s3t restore` does) or only the shard that fell below (shard: not in the engine yet).")] = "all",
         distribution: Annotated[str, typer.Option(help="Requests: cells, uniform, zipf or hot (as in s3t simulate).")] = "cells",
         population: Annotated[int, typer.Option(help="Records (uniform) or subjects (zipf, hot) requests draw from.")] = 10_000,
         trials: Annotated[int, typer.Option(help="Monte Carlo trials for S3T's restorations.")] = 2000,
         seed: Annotated[int, typer.Option(help="Random seed (same seed, same figures).")] = 0,
         out_json: Annotated[Optional[Path], typer.Option(help="Write the report as JSON here.")] = None,
         out_png: Annotated[Optional[Path], typer.Option(help="Plot cumulative cost and influence time here (PNG).")] = None) -> None:
    """Compare the cost of honouring deletions over a horizon: S3T vs SISA vs periodic full retraining.

    Machine-hours (and money, given --price) to train once and to keep up with the expected deletions,
    deletions served without downtime, and how long a deleted record keeps influencing the served model.
    S3T truncates at once and restores everything truncated (or, with --restore-scope shard, only that
    shard) when a shard's served depth falls below --restore-below (how often, and what it retrains,
    simulated on the engine's rules); SISA retrains the hit shard from the hit slice after every deletion,
    and a hit in a shard's first slice takes that shard out meanwhile; full retraining retrains one fine-tune every
    --retrain-every days, so a deleted record stays in the model half that interval on average. Modelled:
    expected values, equal slices, one machine, examples / throughput per stage depth (one figure for every
    depth unless calibrated, which overstates S3T against the others). Not modelled: accuracy, requests
    arriving during a restoration, inference and storage.

    Example: s3t cost --records 20000 --deletions 30 --periods 12 --throughput 240 --price 3 --out-png cost.png
    """
    from ..calibration import calibrate_run, run_info
    from ..calibration import calibrate as time_training
    from ..capacity import Requests
    from ..cost import ASSUMPTIONS, Throughput, cost_report, plot, save_json
    from ..plan import Plan
    from ..planner import recommended_plan
    from .run import _load_data as load_data

    for option, path in {"--out-json": out_json, "--out-png": out_png}.items():   # before any work
        if path is not None:
            _check_out_path(option, path)
    sources = [name for name, value in (("--throughput", throughput), ("--calibrate", calibrate),
                                        ("--calibrate-data", calibrate_data)) if value is not None]
    if len(sources) != 1:
        raise S3TError(f"give exactly one of --throughput, --calibrate RUN_DIR or --calibrate-data FILE; got "
                       f"{', '.join(sources) or 'none'}")
    if trunk_throughput is not None and throughput is None:
        raise S3TError("--trunk-throughput goes with --throughput (a calibration measures both)")
    if recommend and any(v is not None for v in (shards, slices, budget)):
        raise S3TError("--recommend chooses m, L and B itself; drop -m/-L/-B, or drop --recommend")
    base, live = (run_info(calibrate) if calibrate else (None, None))
    plan = Plan.from_toml(plan_file) if plan_file else base or Plan()
    records = live if records is None else records
    if records is None:
        raise S3TError("--records is required (the number of training records), unless --calibrate RUN_DIR gives it")
    requests = Requests(distribution, population=population)
    if recommend:   # fit the model when it will be trained for timing
        plan = recommended_plan(plan.replace(epochs=epochs or plan.epochs), records, max(1, math.ceil(deletions)),
                                requests=requests, fit_model=bool(calibrate or calibrate_data),
                                trials=min(trials, 1000), seed=seed)
    overrides = {k: v for k, v in dict(num_shards=shards, num_slices=slices, budget=budget, epochs=epochs).items()
                 if v is not None}
    if "num_slices" in overrides and "budget" not in overrides and plan.budget is not None:
        overrides["budget"] = min(plan.budget, overrides["num_slices"])
    plan = plan.replace(**overrides)
    if calibrate is not None:
        console.print(f"calibrating on {calibrate} ...")
        throughput = calibrate_run(calibrate, plan=plan, batches=calibrate_batches)
    elif calibrate_data is not None:
        console.print(f"calibrating on {calibrate_data} ...")
        throughput = time_training(plan, load_data(calibrate_data), batches=calibrate_batches)
    else:
        throughput = Throughput.of(throughput, plan.num_slices, trunk=trunk_throughput)
    report = cost_report(plan, records=records, deletions_per_period=deletions, periods=periods,
                         throughput=throughput, price=price, period_days=period_days,
                         retrain_every_days=retrain_every, restore_below=restore_below,
                         restore_scope=restore_scope, requests=requests,
                         trials=trials, seed=seed)
    for option, (path, write) in {"--out-json": (out_json, save_json), "--out-png": (out_png, plot)}.items():
        if path is not None:
            try:
                write(report, path)
            except OSError as e:
                raise S3TError(f"cannot write {option} {path}: {e.strerror or e}; check that the folder is "
                               "writable and has space, or pick another path") from None
    _print_cost(report, ASSUMPTIONS)


def _check_out_path(option: str, path: Path) -> None:
    # os.path.isdir, not Path.is_dir: it answers False rather than raising on, e.g., too long a name
    if os.path.isdir(path):
        raise S3TError(f"{option} {path} is a folder; give a file path in it, such as {path / 'capacity'}"
                       f"{'.json' if option == '--out-json' else '.png'}")
    if not os.path.isdir(path.parent):
        raise S3TError(f"{option} {path}: no folder {path.parent}; create it first (mkdir -p {path.parent}) "
                       "or pick another path")


def _mean(stats: dict) -> str:
    if stats["mean"] is None:
        return f"> horizon ({stats['censored']} trials)"
    return f"{stats['mean']:.1f} ± {stats['sem']:.1f}" if stats["sem"] is not None else f"{stats['mean']:.1f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _print_cost(report, assumptions) -> None:
    p, t = report.plan, report.throughput
    money = report.price is not None
    console.print(f"{report.records:,} records, {report.deletions_per_period:g} deletion requests per "
                  f"{report.period_days:g} days, over {report.periods} periods; S3T m={p.num_shards} L={p.num_slices} "
                  f"B={p.resolved_budget}, {p.epochs} epoch(s); {', '.join(f'{r:.1f}' for r in t.per_depth)} "
                  f"training examples/s by depth"
                  + ("" if t.trunk is None else f", {t.trunk:.1f} records/s through the frozen trunk")
                  + f" ({t.source})")
    table = Table(Column("method", no_wrap=True), "train once", "upkeep", "total", *(["cost"] if money else []),
                  "no downtime", "influence",
                  caption="machine-hours to train once and to keep up with deletions (upkeep); no downtime: deletions "
                          "served at once with every shard still serving; influence: days a deleted record stays in "
                          "the served model, mean (max)")
    notes = []
    for m in report.methods:
        if m.method == "S3T":
            notes.append(f"S3T: {m.events:.1f} restorations of {'every truncated order' if report.restore_scope == 'all' else 'one shard'} "
                         f"(one per {m.detail['requests_per_restoration']:.1f} requests), {_hours(m.hours_per_event)} "
                         "each; deletions truncate at once")
        elif m.method == "SISA":
            notes.append(f"SISA: one shard retrain per deletion, {_hours(m.hours_per_event)} each")
        else:
            notes.append(f"full retraining: {m.events:.0f} retrains (every {m.every_days:g} days), "
                         f"{_hours(m.hours_per_event)} each")
        influence = "0" if m.influence_max_days == 0 else \
            f"{m.influence_mean_days:.1f} ({m.influence_max_days:.1f})"
        table.add_row(m.method, _hours(m.offline_hours), _hours(m.upkeep_hours), _hours(m.total_hours),
                      *([f"{m.total_hours * report.price:,.2f}"] if money else []),
                      f"{m.served_without_downtime:.0f} of {m.deletions:.0f}", influence)
    console.print(table)
    for note in notes:
        console.print(note)
    console.print("Expected values under a model; assumptions (also in `s3t cost --help` and --out-json): "
                  + " ".join(assumptions))


def _hours(hours: float) -> str:
    return f"{hours * 60:.1f} min" if hours < 1 else f"{hours:,.1f} h"
