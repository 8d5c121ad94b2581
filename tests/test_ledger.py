"""The ledger (s3t/ledger.py): a hash chain from a fixed genesis value, Ed25519-signed entries, receipts
exported for a data subject and verified offline (library and CLI), and older runs' ledgers chained."""

from __future__ import annotations

import hashlib
import json
import stat

import pytest
from sqlalchemy import update
from typer.testing import CliRunner

import s3t
from s3t import ledger
from s3t.cli import app
from s3t.registry import ledger as ledger_table


@pytest.fixture
def deleted(trained, tiny_data):
    """The trained copy after three deletions (two by id, one by subject): three ledger entries."""
    subject = next(r.subject for r in tiny_data if r.subject)
    receipts = [trained.delete(ids=[tiny_data[5].id], reference="ticket-1"),
                trained.delete(ids=[tiny_data[7].id, "no-such-id"]),
                trained.delete(subjects=[subject])]
    return trained, receipts


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_entries_form_a_signed_chain_from_the_genesis_value(deleted):
    system, receipts = deleted
    rows = system.registry.ledger_entries()
    assert [r["seq"] for r in rows] == [1, 2, 3]
    assert [r["request_id"] for r in rows] == [r.request_id for r in receipts]
    assert rows[0]["prev_hash"] == ledger.GENESIS == "0" * 64
    for before, after in zip(rows, rows[1:]):
        assert after["prev_hash"] == before["entry_hash"]
    public = ledger.load_public_key(system.public_key())
    for r in rows:
        body = ledger.canonical(ledger.entry_of(r))
        assert hashlib.sha256(body).hexdigest() == r["entry_hash"]
        public.verify(bytes.fromhex(r["signature"]), body)   # raises if the signature is wrong
    assert ledger.verify_chain(rows, public, head=(3, rows[-1]["entry_hash"])) == []
    assert [r.request_id for r in system.receipts()] == [r.request_id for r in receipts]


def test_the_signing_key_is_private_and_not_in_the_database(trained):
    path = trained.run_dir / "signing.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert b"PRIVATE KEY" not in (trained.run_dir / "registry.sqlite").read_bytes()
    assert trained.public_key().startswith("-----BEGIN PUBLIC KEY-----")


def test_an_exported_receipt_verifies_offline(deleted, tmp_path):
    system, receipts = deleted
    doc = system.export_receipt(receipts[1].request_id)
    pem = system.public_key()
    run_dir = system.run_dir
    system.close()   # nothing of the run is needed from here on: only the file and the public key
    entry = s3t.verify_receipt(doc, pem)
    assert entry["seq"] == 2 and entry["kind"] == "deletion"
    assert entry["receipt"]["deleted"] == [receipts[1].deleted[0]] and entry["receipt"]["unknown"] == ["no-such-id"]
    assert entry["prev"] == doc["entry"]["prev"] != ledger.GENESIS

    # The same from the CLI, as a data subject would run it.
    (tmp_path / "receipt.json").write_text(json.dumps(doc))
    (tmp_path / "run.pub").write_text(pem)
    out = invoke("verify-receipt", tmp_path / "receipt.json", "--public-key", tmp_path / "run.pub")
    assert out.exit_code == 0, out.output
    assert f"valid: deletion {receipts[1].request_id}" in out.stdout and "ledger entry #2" in out.stdout
    assert str(run_dir) not in out.stdout


def test_cli_exports_a_receipt_and_prints_the_public_key(deleted, tmp_path):
    system, receipts = deleted
    run_dir = system.run_dir
    system.close()
    exported = tmp_path / "receipt.json"
    out = invoke("receipt", run_dir, receipts[0].request_id, "--export", exported)
    assert out.exit_code == 0, out.output
    pem = invoke("receipt", run_dir, "--public-key")
    assert pem.exit_code == 0 and pem.stdout.startswith("-----BEGIN PUBLIC KEY-----")
    (tmp_path / "run.pub").write_text(pem.stdout)
    assert s3t.verify_receipt(exported, tmp_path / "run.pub")["receipt"]["reference"] == "ticket-1"


@pytest.mark.parametrize("change", ["deleted id", "time", "chain position"])
def test_a_modified_receipt_fails(deleted, tmp_path, change):
    system, receipts = deleted
    doc = system.export_receipt(receipts[0].request_id)
    pem = system.public_key()
    if change == "deleted id":
        doc["entry"]["receipt"]["deleted"] = ["someone-else"]
    elif change == "time":
        doc["entry"]["receipt"]["created_at"] = "2020-01-01T00:00:00.000000+00:00"
    else:
        doc["entry"]["seq"] = 7
    with pytest.raises(s3t.IntegrityError, match="altered"):
        s3t.verify_receipt(doc, pem)
    # Recomputing the hash does not help: the signature covers the entry.
    doc["entry_hash"] = hashlib.sha256(ledger.canonical(doc["entry"])).hexdigest()
    with pytest.raises(s3t.IntegrityError, match="signature does not verify"):
        s3t.verify_receipt(doc, pem)
    (tmp_path / "receipt.json").write_text(json.dumps(doc))
    (tmp_path / "run.pub").write_text(pem)
    out = invoke("verify-receipt", tmp_path / "receipt.json", "--public-key", tmp_path / "run.pub")
    assert out.exit_code == 1 and out.stderr.startswith("error: ") and "signature does not verify" in out.stderr


def test_a_wrong_public_key_fails(deleted, tmp_path):
    system, receipts = deleted
    doc = system.export_receipt(receipts[0].request_id)
    other = ledger.create_signing_key(tmp_path / "other.key")
    with pytest.raises(s3t.IntegrityError, match=f"signed by key {doc['key_id']}, not by the public key given "
                                                 f"\\({ledger.key_id(other.public_key())}\\)"):
        s3t.verify_receipt(doc, ledger.public_key_pem(other.public_key()))
    with pytest.raises(s3t.DataError, match="not an Ed25519 public key"):
        s3t.verify_receipt(doc, "-----BEGIN PUBLIC KEY-----\nnonsense\n-----END PUBLIC KEY-----\n")


def test_additions_are_entries_of_the_same_chain_but_not_deletion_receipts(deleted):
    system, receipts = deleted
    addition = system.add(s3t.Dataset([s3t.Record(id="added-1", text="a new text", label=system.labels[0])]))
    rows = system.registry.ledger_entries()
    assert [(r["seq"], r["kind"]) for r in rows][-1] == (4, "addition")
    assert rows[-1]["receipt"]["records"] == 1 and rows[-1]["request_id"] == addition.request_id
    assert len(system.receipts()) == 3   # deletion receipts only
    with pytest.raises(s3t.NotFoundError):
        system.receipt(addition.request_id)
    assert s3t.verify_receipt(system.export_receipt(addition.request_id), system.public_key())["kind"] == "addition"


def test_an_older_runs_ledger_is_chained_and_signed_when_it_is_opened(deleted):
    """A run from before the chain: no signing key, entries without chain columns. Opening it chains them
    (oldest first) and signs them; opening it as found (`recover=False`, the audit's way) changes nothing."""
    system, receipts = deleted
    run_dir = system.run_dir
    with system.registry.transaction() as conn:
        conn.execute(update(ledger_table).values(seq=None, kind=None, prev_hash=None, entry_hash=None, signature=None))
    system.close()
    (run_dir / "signing.key").unlink()

    as_found = s3t.S3T.open(run_dir, recover=False)
    assert not (run_dir / "signing.key").exists()
    report = as_found.audit()
    assert report.check("ledger").status == "failed"   # unchained entries are reported, not fixed
    with pytest.raises(s3t.RunError, match="no signing key"):
        as_found.public_key()
    as_found.close()

    reopened = s3t.S3T.open(run_dir)
    rows = reopened.registry.ledger_entries()
    assert [r["request_id"] for r in rows] == [r.request_id for r in receipts] and [r["seq"] for r in rows] == [1, 2, 3]
    assert stat.S_IMODE((run_dir / "signing.key").stat().st_mode) == 0o600
    report = reopened.audit()
    assert report.passed and report.check("ledger").status == "passed", report.failures
    assert s3t.verify_receipt(reopened.export_receipt(receipts[2].request_id), reopened.public_key())["seq"] == 3
    reopened.close()


def test_an_entry_forged_in_the_database_is_not_signed_when_the_run_is_reopened(deleted):
    """Whoever holds only the database can insert a row without a chain position (the shape of an older
    run's entries). Only the open that creates an older run's signing key chains such rows; any later
    open must leave it unchained, so the audit keeps reporting it instead of signing the forgery."""
    system, receipts = deleted
    run_dir = system.run_dir
    forged = {"request_id": "f" * 32, "created_at": "2026-01-01T00:00:00+00:00", "deleted": ["syn-999"]}
    with system.registry.transaction() as conn:
        conn.execute(ledger_table.insert().values(request_id=forged["request_id"], created_at=forged["created_at"],
                                                  receipt=json.dumps(forged, sort_keys=True)))
    system.close()

    reopened = s3t.S3T.open(run_dir)
    rows = reopened.registry.ledger_entries()
    assert [r["seq"] for r in rows if r["request_id"] == forged["request_id"]] == [None]
    assert [r["seq"] for r in rows if r["seq"] is not None] == [1, 2, 3]
    report = reopened.audit()
    assert report.check("ledger").failures == (f"ledger entry {forged['request_id']} has no chain position: it was "
                                               "inserted or edited outside s3t",)
    with pytest.raises(s3t.IntegrityError, match="not signed"):
        reopened.export_receipt(forged["request_id"])
    reopened.close()
