"""Commands that let others check a run: the audit, deletion receipts, and their offline verification."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..errors import DataError
from .common import AsJson, RunDir, app, console, open_run, user_errors


@app.command()
@user_errors
def audit(run_dir: RunDir,
          replay: Annotated[str, typer.Option(help="Served stages to retrain from their stored lineage and compare bit for bit: a number, or `all`.")] = "0",
          seed: Annotated[Optional[int], typer.Option(help="Seed of the replay's sample, to repeat it (default: fresh randomness).")] = None,
          public_key: Annotated[Optional[Path], typer.Option(help="PEM file of the public key the ledger must be signed with (default: the run's own).")] = None,
          as_json: AsJson = False) -> None:
    """Check a run against its own evidence; exit 1 with one line per failure.

    Files and hashes, orphans, stored lineage, the ledger's deletions, hash chain and signatures, erasure
    of deleted records, and (with --replay) stages retrained bit for bit. The run is opened as found.

    Example: s3t audit runs/news --replay 2 --public-key run.pub
    """
    from ..system import S3T

    if replay != "all" and not (replay.isdigit() and replay.isascii()):
        raise DataError(f"--replay must be a number of stages or `all`; got {replay!r}")
    key = _read(public_key, "public key") if public_key is not None else None
    system = S3T.open(run_dir, recover=False)   # an audit looks; it does not repair
    try:
        report = system.audit(replay=replay if replay == "all" else int(replay), seed=seed, public_key=key)
    finally:
        system.close()
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for c in report.checks:
            console.print(f"{c.status:<8} {c.name:<10} {c.summary}", markup=False)
        for line in report.failures:
            console.print(f"FAIL {line}", markup=False)
    if not report.passed:
        raise typer.Exit(1)


@app.command()
@user_errors
def receipt(run_dir: RunDir,
            request_id: Annotated[Optional[str], typer.Argument(help="The request's id (default: list the receipts).")] = None,
            export: Annotated[Optional[Path], typer.Option(help="Write the signed receipt here, for `s3t verify-receipt`.")] = None,
            public_key: Annotated[bool, typer.Option("--public-key", help="Print the run's public key (PEM), which verifies its receipts.")] = False,
            as_json: AsJson = False) -> None:
    """Show, list or export deletion receipts, or print the run's public key.

    Example: s3t receipt runs/news 5f0c9e... --export receipt.json && s3t receipt runs/news --public-key > run.pub
    """
    system = open_run(run_dir)
    if public_key:
        print(system.public_key(), end="")
    elif request_id is None:
        receipts = system.receipts()
        if as_json:
            print(json.dumps([r.to_dict() for r in receipts], indent=2))
            return
        table = Table("request", "time", "deleted", "reference")
        for r in receipts:
            table.add_row(r.request_id, r.created_at, str(len(r.deleted)), r.reference or "")
        console.print(table)
    elif export is not None:
        doc = system.export_receipt(request_id)
        try:
            export.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        except OSError as exc:
            raise DataError(f"cannot write --export {export}: {exc.strerror or exc}") from None
        console.print(f"wrote {export}: ledger entry #{doc['entry']['seq']}, signed by key {doc['key_id']}; anyone can "
                      f"check it with `s3t verify-receipt {export} --public-key KEY`", markup=False)
    else:
        print(json.dumps(system.receipt(request_id).to_dict(), indent=2))


@app.command("verify-receipt")
@user_errors
def verify_receipt(receipt: Annotated[Path, typer.Argument(help="A receipt written by `s3t receipt RUN_DIR ID --export`.")],
                   public_key: Annotated[Path, typer.Option("--public-key", help="PEM file of the issuing run's public key (`s3t receipt RUN_DIR --public-key`).")],
                   as_json: AsJson = False) -> None:
    """Check an exported receipt offline: intact, and signed by the run whose public key is given.

    Example: s3t verify-receipt receipt.json --public-key run.pub
    """
    from ..ledger import verify_receipt as verify

    entry = verify(receipt, _read(public_key, "public key"))
    if as_json:
        print(json.dumps(entry, indent=2, sort_keys=True))
        return
    r = entry["receipt"]
    what = (f"deletion {r['request_id']} of {r['created_at']}: {len(r.get('deleted', ()))} records deleted, "
            f"{len(r.get('subjects', ()))} subjects" if entry["kind"] == "deletion" else
            f"addition {r['request_id']} of {r['created_at']}: {r.get('records')} records")
    console.print(f"valid: {what}; ledger entry #{entry['seq']} (previous entry's hash {entry['prev'][:16]}...)",
                  markup=False)


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the {what} {path}: {exc}") from None
