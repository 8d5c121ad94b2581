"""Planning commands: simulate deletion capacity and recommend a plan."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

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
