"""Commands over one run: the demo, train, predict, delete, add, status and restore."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Literal, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import S3TError
from .common import AsJson, RunDir, app, console, depths, open_run, user_errors


def _load_data(path: str):
    from ..datasets import bbc_news
    from ..errors import DataError
    from ..records import Dataset

    if path == "bbc-news":
        return bbc_news()
    if Path(path).is_dir():
        return Dataset.from_image_folder(path)
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return Dataset.from_jsonl(path)
    if suffix == ".csv":
        return Dataset.from_csv(path)
    raise DataError(f"--data {path!r}: use a .jsonl or .csv file, a folder of images (one subfolder per label), "
                    "or `bbc-news` for the bundled set")


ExecutorName = Annotated[Literal["local", "ray"], typer.Option(
    help="Where stages train: in this process, or as Ray tasks (pip install \"s3t[ray]\"); bit for bit the same.")]
RayAddress = Annotated[Optional[str], typer.Option(
    help="With --executor ray: the cluster to join (auto, ray://HOST:10001); default: a local one for this command.")]


def _lines(path: Path) -> list[str]:
    from ..errors import DataError

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

    from ..demo import run_demo

    with tempfile.TemporaryDirectory(prefix="s3t-demo-") as tmp:
        run_demo(run_dir or Path(tmp) / "run", deletions=deletions, console=console)


@app.command()
@user_errors
def train(run_dir: RunDir,
          data: Annotated[Optional[str], typer.Option(help="Records: .jsonl or .csv with id,text,label[,subject] (or id,image,label), a folder of images LABEL/FILE, or `bbc-news`.")] = None,
          plan: Annotated[Optional[Path], typer.Option(help="Plan TOML file (default: s3t.Plan()).")] = None,
          database_url: Annotated[Optional[str], typer.Option(help="Keep the registry in this database, e.g. postgresql+psycopg://user@host/db (default: SQLite in the run folder).")] = None,
          database_schema: Annotated[Optional[str], typer.Option(help="PostgreSQL schema of the run's tables (created if missing; one run per schema).")] = None,
          executor: ExecutorName = "local",
          address: RayAddress = None,
          quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False) -> None:
    """Create a run from --data and train it, or resume training an existing run.

    Example: s3t train runs/news --data train.jsonl --plan plan.toml --database-url postgresql+psycopg://s3t@db/s3t --database-schema news

    On a Ray cluster (every worker must reach the run folder at the same path): s3t train runs/news --executor ray --address auto
    """
    from ..executors import executor_for
    from ..plan import Plan
    from ..system import RUN_FILE, S3T

    runner = executor_for(executor, address=address)   # a wrong combination fails before a run is created
    if (run_dir / RUN_FILE).exists():
        if data is not None or plan is not None or database_url is not None or database_schema is not None:
            raise S3TError(f"{run_dir} already holds a run; resume it with `s3t train {run_dir}` "
                           "(no --data/--plan/--database-*) or choose a new folder")
        system = S3T.open(run_dir)
    elif data is None:
        raise S3TError(f"no run at {run_dir} yet: give --data FILE to create one")
    else:
        system = S3T.create(run_dir, Plan.from_toml(plan) if plan else Plan(), _load_data(data),
                            database_url=database_url, database_schema=database_schema)
    system.train(progress=not quiet, executor=runner)
    console.print(f"trained {run_dir}: {depths(system)}", markup=False)


@app.command()
@user_errors
def predict(run_dir: RunDir, texts: Annotated[Optional[list[str]], typer.Argument(help="Texts to classify (image files for an image run).")] = None,
            file: Annotated[Optional[Path], typer.Option(help="Read texts (or image paths) from a file, one per line ('-': stdin).")] = None,
            as_json: AsJson = False) -> None:
    """Predict labels with the served ensemble: texts, or image files for an image run.

    Example: s3t predict runs/news "Shares rose sharply after the results"
    """
    items = list(texts or []) + (_lines(file) if file else [])
    if not items:
        raise S3TError("give texts to classify (image files, for an image run) as arguments or with --file")
    system = open_run(run_dir)
    proba = system.predict_proba(items)
    labels = [system.labels[k] for k in proba.argmax(axis=1)]
    if as_json:
        print(json.dumps([{"label": lab, "probabilities": dict(zip(system.labels, map(float, p)))}
                          for lab, p in zip(labels, proba)], indent=2))
    else:
        for lab in labels:
            print(lab)


Aggregation = Literal["mean_proba", "mean_logprob"]


@app.command()
@user_errors
def generate(run_dir: RunDir,
             prompts: Annotated[Optional[list[str]], typer.Argument(help="Prompts to complete.")] = None,
             file: Annotated[Optional[Path], typer.Option(help="Read prompts from a file, one per line ('-': stdin).")] = None,
             max_new_tokens: Annotated[int, typer.Option(min=1, max=4096, help="Tokens to generate at most.")] = 32,
             temperature: Annotated[float, typer.Option(min=0.0, max=100.0, help="0: greedy; above 0: sample.")] = 0.0,
             aggregation: Annotated[Aggregation, typer.Option(help="Average the shards' next-token probabilities or log-probabilities.")] = "mean_proba",
             seed: Annotated[Optional[int], typer.Option(help="Seed for sampling (same seed, same text).")] = None,
             as_json: AsJson = False) -> None:
    """Complete prompts with the served ensemble of a causal LM run (one token for all shards per step).

    Example: s3t generate runs/lm "The minister said" --max-new-tokens 20
    """
    items = list(prompts or []) + (_lines(file) if file else [])
    if not items:
        raise S3TError("give prompts to complete as arguments or with --file")
    result = open_run(run_dir).complete(items, max_new_tokens=max_new_tokens, temperature=temperature,
                                        aggregation=aggregation, seed=seed)
    if as_json:
        print(json.dumps({"served_version": result.served_version, "completions": list(result.texts)}, indent=2))
    else:
        for text in result.texts:
            print(text.replace("\n", " "))


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
    receipt = open_run(run_dir).delete(ids=ids, subjects=list(subject or []), reference=reference)
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
def add(run_dir: RunDir,
        data: Annotated[str, typer.Option(help="New records of the run's kind: .jsonl or .csv with id,text,label (or id,image,label, or id,prompt,completion; and subject, risk), or a folder of images (one subfolder per label).")],
        replace_deleted: Annotated[bool, typer.Option(help="Store records under the ids of deleted ones as new records (refused otherwise).")] = False,
        as_json: AsJson = False) -> None:
    """Add records without training: the served model stays as it is until `s3t restore` trains them in.

    Example: s3t add runs/news --data new.jsonl && s3t restore runs/news
    """
    system = open_run(run_dir)
    addition = system.add(_load_data(data), replace_deleted=replace_deleted)
    if as_json:
        print(json.dumps(addition.to_dict(), indent=2))
        return
    st = system.status()
    console.print(f"request {addition.request_id}: added {addition.records} records ({len(addition.replaced)} under "
                  f"ids of deleted records) to {len(addition.cells)} cells; the served model has not seen "
                  f"{st.unseen_records} live records; {st.stale_orders} stale orders: `s3t restore {run_dir}` trains "
                  "them in", markup=False)


@app.command()
@user_errors
def status(run_dir: RunDir, as_json: AsJson = False) -> None:
    """Show shards, live orders, served depths and how many deletions each shard can still absorb.

    Example: s3t status runs/news
    """
    from dataclasses import asdict

    st = open_run(run_dir).status()
    if as_json:
        print(json.dumps(asdict(st) | {"serving": st.serving}, indent=2))
        return
    table = Table("shard", "live orders", "served order", "served depth", "deletions to drop", "unseen records",
                  title=f"{escape(str(run_dir))}: {st.live_records} live / {st.deleted_records} deleted records, "
                        f"served set v{st.served_version}")
    for s in st.shards:
        table.add_row(str(s.shard), f"{s.live_orders}/{s.orders}", str(s.served_order), str(s.served_depth),
                      str(s.deletions_to_drop), str(s.unseen_records))
    console.print(table)
    if not st.trained:
        console.print(f"not trained yet: run `s3t train {run_dir}`", markup=False)
    else:
        if st.truncated_orders:
            console.print(f"{st.truncated_orders} truncated orders: `s3t restore {run_dir}` retrains them", markup=False)
        if st.stale_orders:
            console.print(f"{st.stale_orders} stale orders (records were added since they were trained): "
                          f"`s3t restore {run_dir}` retrains them", markup=False)
        if st.unseen_records:
            console.print(f"the served model has not seen {st.unseen_records} live records", markup=False)


@app.command()
@user_errors
def restore(run_dir: RunDir, executor: ExecutorName = "local", address: RayAddress = None,
            quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False) -> None:
    """Retrain truncated and stale orders on the current data, switching each in when done.

    Example: s3t restore runs/news (or, on a Ray cluster: s3t restore runs/news --executor ray --address auto)
    """
    from ..executors import executor_for

    runner = executor_for(executor, address=address)
    system = open_run(run_dir)
    done = system.restore(progress=not quiet, executor=runner)
    console.print(f"restored {done} orders: {depths(system)}", markup=False)

