"""`s3t` command line: a thin shell over the library. Errors print one line and exit non-zero."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import S3TError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Exact machine unlearning for fine-tuned transformers (S3T).")
# soft_wrap: one message stays one line when piped; highlight off: output is data, not decoration
console = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)

RunDir = Annotated[Path, typer.Argument(help="The run folder.")]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def user_errors(command):
    """Turn s3t errors (user mistakes, bad data, missing runs) into one line on stderr and exit code 1."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except S3TError as exc:
            err.print(f"[red]error:[/] {escape(str(exc))}")
            raise typer.Exit(1) from None
    return wrapper


def _open(run_dir: Path):
    from .system import S3T

    return S3T.open(run_dir)


def _load_data(path: str):
    from .datasets import bbc_news
    from .errors import DataError
    from .records import Dataset

    if path == "bbc-news":
        return bbc_news()
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return Dataset.from_jsonl(path)
    if suffix == ".csv":
        return Dataset.from_csv(path)
    raise DataError(f"--data {path!r}: use a .jsonl or .csv file, or `bbc-news` for the bundled set")


def _lines(path: Path) -> list[str]:
    from .errors import DataError

    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


@app.command()
@user_errors
def demo(run_dir: Annotated[Optional[Path], typer.Option(help="Keep the run here (default: a temp folder).")] = None,
         deletions: Annotated[int, typer.Option(min=1, help="Single-record deletions to make.")] = 5) -> None:
    """Train on BBC News with the embedded MiniLM, delete records and a subject, restore.

    Example: s3t demo
    """
    import tempfile

    from .demo import run_demo

    with tempfile.TemporaryDirectory(prefix="s3t-demo-") as tmp:
        run_demo(run_dir or Path(tmp) / "run", deletions=deletions, console=console)


@app.command()
@user_errors
def train(run_dir: RunDir,
          data: Annotated[Optional[str], typer.Option(help="Records: .jsonl or .csv with id,text,label[,subject], or `bbc-news`.")] = None,
          plan: Annotated[Optional[Path], typer.Option(help="Plan TOML file (default: s3t.Plan()).")] = None,
          quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False) -> None:
    """Create a run from --data and train it, or resume training an existing run.

    Example: s3t train runs/news --data train.jsonl --plan plan.toml
    """
    from .plan import Plan
    from .system import RUN_FILE, S3T

    if (run_dir / RUN_FILE).exists():
        if data is not None or plan is not None:
            raise S3TError(f"{run_dir} already holds a run; resume it with `s3t train {run_dir}` "
                           "(no --data/--plan) or choose a new folder")
        system = S3T.open(run_dir)
    elif data is None:
        raise S3TError(f"no run at {run_dir} yet: give --data FILE to create one")
    else:
        system = S3T.create(run_dir, Plan.from_toml(plan) if plan else Plan(), _load_data(data))
    system.train(progress=not quiet)
    console.print(f"trained {run_dir}: {_depths(system)}", markup=False)


@app.command()
@user_errors
def predict(run_dir: RunDir, texts: Annotated[Optional[list[str]], typer.Argument(help="Texts to classify.")] = None,
            file: Annotated[Optional[Path], typer.Option(help="Read texts from a file, one per line ('-': stdin).")] = None,
            as_json: AsJson = False) -> None:
    """Predict labels with the served ensemble.

    Example: s3t predict runs/news "Shares rose sharply after the results"
    """
    items = list(texts or []) + (_lines(file) if file else [])
    if not items:
        raise S3TError("give texts to classify as arguments or with --file")
    system = _open(run_dir)
    proba = system.predict_proba(items)
    labels = [system.labels[k] for k in proba.argmax(axis=1)]
    if as_json:
        print(json.dumps([{"label": lab, "probabilities": dict(zip(system.labels, map(float, p)))}
                          for lab, p in zip(labels, proba)], indent=2))
    else:
        for lab in labels:
            print(lab)


@app.command()
@user_errors
def delete(run_dir: RunDir,
           id: Annotated[Optional[list[str]], typer.Option("--id", help="Record id to delete (repeatable).")] = None,
           subject: Annotated[Optional[list[str]], typer.Option("--subject", help="Delete all records of this data subject (repeatable).")] = None,
           file: Annotated[Optional[Path], typer.Option(help="File of record ids, one per line ('-': stdin).")] = None,
           reference: Annotated[Optional[str], typer.Option(help="Your reference for the request (ticket number).")] = None,
           as_json: AsJson = False) -> None:
    """Forget records or data subjects at once and exactly; prints the receipt.

    Example: s3t delete runs/news --id rec-17 --subject user-42
    """
    ids = list(id or []) + (_lines(file) if file else [])
    receipt = _open(run_dir).delete(ids=ids, subjects=list(subject or []), reference=reference)
    if as_json:
        print(json.dumps(receipt.to_dict(), indent=2))
        return
    console.print(f"request {receipt.request_id}: deleted {len(receipt.deleted)}, already deleted "
                  f"{len(receipt.already_deleted)}, unknown ids {list(receipt.unknown)}, unknown subjects "
                  f"{len(receipt.unknown_subjects)}; served set v{receipt.served_version}; {receipt.duration_ms:.1f} ms",
                  markup=False)
    for s in receipt.shards:
        console.print(f"  shard {s['shard']}: depth {s['depth_before']} -> {s['depth_after']}")
    console.print(f"  lineage check {receipt.lineage_check}")


@app.command()
@user_errors
def status(run_dir: RunDir, as_json: AsJson = False) -> None:
    """Show shards, live orders, served depths and how many deletions each shard can still absorb.

    Example: s3t status runs/news
    """
    from dataclasses import asdict

    st = _open(run_dir).status()
    if as_json:
        print(json.dumps(asdict(st) | {"serving": st.serving}, indent=2))
        return
    table = Table("shard", "live orders", "served order", "served depth", "deletions to drop",
                  title=f"{escape(str(run_dir))}: {st.live_records} live / {st.deleted_records} deleted records, "
                        f"served set v{st.served_version}")
    for s in st.shards:
        table.add_row(str(s.shard), f"{s.live_orders}/{s.orders}", str(s.served_order), str(s.served_depth),
                      str(s.deletions_to_drop))
    console.print(table)
    if not st.trained:
        console.print(f"not trained yet: run `s3t train {run_dir}`", markup=False)
    elif st.truncated_orders:
        console.print(f"{st.truncated_orders} truncated orders: `s3t restore {run_dir}` retrains them", markup=False)


@app.command()
@user_errors
def restore(run_dir: RunDir, quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False) -> None:
    """Retrain truncated orders on the current data, switching each in when done.

    Example: s3t restore runs/news
    """
    system = _open(run_dir)
    done = system.restore(progress=not quiet)
    console.print(f"restored {done} orders: {_depths(system)}", markup=False)


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
    from .capacity import Requests, plot, save_json, sweep

    requests = [Requests(d, population=population, zipf_exponent=zipf_exponent, hot_fraction=hot_fraction,
                         hot_share=hot_share) for d in distribution or ["cells"]]
    results = sweep(num_shards=shards, num_slices=slices, budgets=budget or sorted({1, -(-slices // 2), slices}),
                    selections=selection or ["cyclic"], requests=requests, trials=trials, seed=seed,
                    risky_slices=risky_slices, risk_threshold=risk_threshold)
    if out_json:
        save_json(results, out_json)
    if out_png:
        plot(results, out_png)
    table = Table("requests", "selection", "B", "first dies", "all die", "closed form", "SISA",
                  title=f"deletions until the first / all shards drop out, m={shards}, L={slices}, {trials} trials "
                        "(mean ± s.e.; closed form and SISA: all die)")
    for r in results:
        first, last = r.summary()["first_death"], r.summary()["all_dead"]
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
    from .capacity import Requests
    from .planner import plan_capacity as recommend

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


@app.command()
@user_errors
def serve(run_dir: RunDir,
          host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
          port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
          public_predict: Annotated[bool, typer.Option(help="Let /v1/predict and /v1/status answer without a token.")] = False,
          max_body_bytes: Annotated[int, typer.Option(min=1, help="Larger request bodies get 413.")] = 1 << 20,
          rate: Annotated[float, typer.Option(help="Requests per second per token (a token may override).")] = 20.0,
          burst: Annotated[int, typer.Option(min=1, help="Requests a token may send at once before --rate applies.")] = 40,
          quota: Annotated[int, typer.Option(min=1, help="Deletion ids + subjects per token per UTC day.")] = 10_000,
          guard: Annotated[str, typer.Option(help="Capacity guard policy: alert (apply, record), hold (wait for an admin) or off.")] = "alert",
          guard_window: Annotated[float, typer.Option(help="Seconds of a token's history the guard weighs.")] = 3600.0,
          guard_min_spent: Annotated[int, typer.Option(min=1, help="Capacity units of one shard before the guard judges a token.")] = 2,
          guard_ratio: Annotated[float, typer.Option(help="Flag at this many times the capacity random deletions would consume.")] = 3.0,
          protect_last_order: Annotated[bool, typer.Option(help="Also flag requests that would take a shard out of the ensemble.")] = False,
          restore_below: Annotated[Optional[int], typer.Option(min=1, help="Restore in the background when a shard's served depth is below this (default: only on POST /v1/restore).")] = None,
          restore_poll: Annotated[float, typer.Option(help="Seconds between the restoration worker's policy checks.")] = 2.0,
          worker: Annotated[bool, typer.Option(help="Run the background restoration worker.")] = True,
          preload: Annotated[bool, typer.Option(help="Load the model at startup rather than on the first prediction.")] = True,
          log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info") -> None:
    """Serve predictions and deletions over HTTP (FastAPI; OpenAPI docs at /docs).

    Example: s3t serve runs/news --port 8000 --guard hold --restore-below 2
    """
    from .service.app import serve as run_server
    from .service.settings import GuardPolicy, ServiceSettings

    settings = ServiceSettings(
        public_predict=public_predict, max_body_bytes=max_body_bytes, rate=rate, burst=burst, daily_quota=quota,
        guard=GuardPolicy(action=guard, window_s=guard_window, min_spent=guard_min_spent, max_ratio=guard_ratio,
                          protect_last_order=protect_last_order),
        restore_below=restore_below, restore_poll_s=restore_poll, worker=worker, preload=preload)
    run_server(run_dir, host=host, port=port, settings=settings, log_level=log_level)


token_app = typer.Typer(no_args_is_help=True, add_completion=False)
app.add_typer(token_app, name="token")


@token_app.callback()
def token() -> None:
    """Create, list and revoke the HTTP service's bearer tokens (stored hashed in the run).

    Example: s3t token create runs/news --name erasure-desk --role delete
    """


@token_app.command("create")
@user_errors
def token_create(run_dir: RunDir,
                 name: Annotated[str, typer.Option(help="What the token is for (shown in listings).")] = "token",
                 role: Annotated[Optional[list[str]], typer.Option("--role", help="predict, delete or admin (repeatable; admin implies all).")] = None,
                 rate: Annotated[Optional[float], typer.Option(help="Requests per second (default: the server's --rate).")] = None,
                 quota: Annotated[Optional[int], typer.Option(help="Deletion items per UTC day (default: the server's --quota).")] = None,
                 as_json: AsJson = False) -> None:
    """Create a token and print its secret (shown once: only a hash is stored).

    Example: s3t token create runs/news --name erasure-desk --role delete
    """
    from .service.auth import create_token

    tok, secret = create_token(_open(run_dir).registry, name=name, roles=role or ["predict"], rate=rate,
                               daily_quota=quota)
    if as_json:
        print(json.dumps({"id": tok.id, "name": tok.name, "roles": list(tok.roles), "token": secret}))
        return
    console.print(f"token {tok.id} ({tok.name}, roles {', '.join(tok.roles)}):", markup=False)
    print(secret)


@token_app.command("list")
@user_errors
def token_list(run_dir: RunDir, as_json: AsJson = False) -> None:
    """List tokens: id, name, roles, limits, created and revoked times (never secrets).

    Example: s3t token list runs/news
    """
    from dataclasses import asdict

    from .service.auth import list_tokens

    tokens = list_tokens(_open(run_dir).registry)
    if as_json:
        print(json.dumps([asdict(t) for t in tokens], indent=2))
        return
    table = Table("id", "name", "roles", "rate", "quota", "created", "revoked")
    for t in tokens:
        table.add_row(t.id, escape(t.name), ",".join(t.roles), str(t.rate or "default"), str(t.daily_quota or "default"),
                      t.created_at, t.revoked_at or "")
    console.print(table)


@token_app.command("revoke")
@user_errors
def token_revoke(run_dir: RunDir, token_id: Annotated[str, typer.Argument(help="The token's id (from `s3t token list`).")]) -> None:
    """Revoke a token: a running server refuses it from its next request.

    Example: s3t token revoke runs/news 3f9a1c2b7d4e
    """
    from .service.auth import revoke_token

    revoke_token(_open(run_dir).registry, token_id)
    console.print(f"revoked token {token_id}", markup=False)


def _depths(system) -> str:
    return "served depth per shard " + ", ".join(f"{s.shard}: {s.served_depth}" for s in system.status().shards)


if __name__ == "__main__":  # pragma: no cover
    app()
