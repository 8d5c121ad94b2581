"""The audit (s3t/audit.py): a healthy run passes every check; each kind of tampering is caught by the
check that looks at it, with a line naming what failed; a replay reproduces a served stage bit for bit
and catches weights that were altered and re-hashed; the CLI and the HTTP route are thin shells over it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil

import pytest
from sqlalchemy import delete, select, update
from typer.testing import CliRunner

import s3t
from s3t.cli import app
from s3t.registry import artifacts, ledger, lineage, meta, records
from s3t.store import ArtifactStore
from servicekit import Server, make_token


@pytest.fixture(scope="module")
def audited_dir(trained_dir, tmp_path_factory, tiny_data):
    """The trained tiny run after two deletions in shard 0 (an id, then a subject), so shard 1 still serves
    both stages: read-only, copy it to change it."""
    path = tmp_path_factory.mktemp("audited") / "run"
    shutil.copytree(trained_dir, path)
    system = s3t.S3T.open(path)
    where = system.locate(list(tiny_data.ids))
    in_shard_0 = [r for r in tiny_data if where[r.id][0] == 0]
    subject = next(r.subject for r in in_shard_0 if r.subject)
    system.delete(ids=[next(r.id for r in in_shard_0 if r.subject != subject)])
    system.delete(subjects=[subject])
    system.close()
    return path


@pytest.fixture
def run(audited_dir, tmp_path):
    path = tmp_path / "run"
    shutil.copytree(audited_dir, path)
    system = s3t.S3T.open(path, recover=False)
    yield system
    system.close()


def failed(report, check: str) -> list[str]:
    """The failure lines of one check, after asserting that it (and only it, unless told) failed."""
    assert report.check(check).status == "failed", report.check(check)
    assert not report.passed
    return list(report.check(check).failures)


def served_artifact(system) -> tuple[str, dict]:
    """A served stage-2 artifact and its component (shard 1 keeps both stages: see `audited_dir`)."""
    _, components = system.served()
    component = next(c for c in components if c["depth"] == 2)
    return component["artifacts"][1], component


def test_a_healthy_run_passes_every_check(run):
    report = run.audit()
    assert report.passed, report.failures
    status = {c.name: c.status for c in report.checks}
    assert status == {"artifacts": "passed", "orphans": "passed", "lineage": "passed", "deletions": "passed",
                      "ledger": "passed", "erasure": "passed", "replay": "skipped"}
    registered = len(run.registry.artifact_lineages())
    assert report.check("artifacts").looked_at == {"registered": registered}
    assert report.check("ledger").looked_at["entries"] == 2
    deleted = run.status().deleted_records
    assert deleted > 1 and report.check("deletions").looked_at["deleted_records"] == deleted
    assert report.check("erasure").looked_at["deleted_records"] == deleted


def test_an_altered_artifact_byte_is_caught(run):
    lineage_hash, _ = served_artifact(run)
    path = ArtifactStore(run.run_dir / "artifacts").path(lineage_hash)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    assert failed(run.audit(), "artifacts") == [
        f"artifact {lineage_hash} (stage 2): its file does not match its recorded hash (altered, or partly written)"]


@pytest.mark.parametrize("tamper", ["row removed", "id from another shard", "generation changed"])
def test_an_altered_lineage_row_is_caught(run, tamper):
    lineage_hash, component = served_artifact(run)
    with run.registry.transaction() as conn:
        victim = conn.execute(select(lineage.c.record_id).where(lineage.c.artifact == lineage_hash)).scalars().first()
        row = (lineage.c.artifact == lineage_hash) & (lineage.c.record_id == victim)
        if tamper == "row removed":
            conn.execute(delete(lineage).where(row))
        elif tamper == "id from another shard":
            other = conn.execute(select(records.c.id).where(records.c.shard != component["shard"],
                                                            records.c.deleted_in.is_(None))).scalars().first()
            conn.execute(update(lineage).where(row).values(record_id=other))
        else:
            conn.execute(update(lineage).where(row).values(generation=1))
    lines = failed(run.audit(), "lineage")
    assert len(lines) == 1 and lines[0].startswith(f"artifact {lineage_hash} (shard {component['shard']} order "
                                                   f"{component['position']} stage 2): its stored lineage ")
    assert {"row removed": "records, but it was trained on",
            "id from another shard": "outside the stage's prefix",
            "generation changed": "does not hash to its name: the lineage table was altered"}[tamper] in lines[0]


def test_a_ledger_row_edited_in_place_breaks_the_chain(run):
    with run.registry.transaction() as conn:
        text = conn.execute(select(ledger.c.receipt).where(ledger.c.seq == 1)).scalar()
        receipt = json.loads(text)
        receipt["deleted"] = []   # hide what the first request deleted
        conn.execute(update(ledger).where(ledger.c.seq == 1).values(receipt=json.dumps(receipt, sort_keys=True)))
    report = run.audit()
    first = run.registry.ledger_entries()[0]["request_id"]
    assert failed(report, "ledger") == [f"ledger entry #1 ({first}) was altered: its content no longer hashes to "
                                        "its recorded hash",
                                        f"ledger entry #1 ({first}): its signature does not verify with the run's "
                                        "public key"]
    assert any("which the ledger does not record" in line for line in failed(report, "deletions"))


def test_a_ledger_rewritten_without_the_signing_key_is_caught(run):
    """Whoever holds only the database can recompute every hash after an edit, but cannot sign."""
    from s3t import ledger as chain

    with run.registry.transaction() as conn:
        rows = run.registry.ledger_entries(conn)
        rows[0]["receipt"]["reference"] = "forged"
        prev = chain.GENESIS
        for r in rows:
            r["prev_hash"] = prev
            prev = hashlib.sha256(chain.canonical(chain.entry_of(r))).hexdigest()
            conn.execute(update(ledger).where(ledger.c.request_id == r["request_id"]).values(
                receipt=json.dumps(r["receipt"], sort_keys=True), prev_hash=r["prev_hash"], entry_hash=prev))
        run.registry.set_meta(conn, "ledger.head", f"{rows[-1]['seq']}:{prev}")
    # Hashes and links now agree; the signatures of the edited entry and of the one relinked after it do not.
    assert failed(run.audit(), "ledger") == [
        f"ledger entry #{r['seq']} ({r['request_id']}): its signature does not verify with the run's public key"
        for r in rows]


@pytest.mark.parametrize("which", ["first", "last"])
def test_a_deleted_ledger_row_is_caught(run, which):
    rows = run.registry.ledger_entries()
    gone = rows[0] if which == "first" else rows[-1]
    with run.registry.transaction() as conn:
        conn.execute(delete(ledger).where(ledger.c.request_id == gone["request_id"]))
    report = run.audit()
    lines = failed(report, "ledger")
    if which == "first":
        assert lines == ["ledger entries #1..#1 are missing: the chain jumps from #0 to #2",
                         f"ledger entry #2 ({rows[1]['request_id']}) does not link to the entry before it (its prev "
                         "hash is not that entry's hash): an entry before it was changed, removed or inserted"]
    else:
        assert lines == ["the ledger ends at entry #1 but entry #2 was appended: 1 entries were removed from its end"]
    # Independently of the chain, the records the missing entry deleted still name it.
    assert any(f"marked deleted by request {gone['request_id']}, which the ledger does not record" in line
               for line in failed(report, "deletions"))


def test_the_last_ledger_row_removed_with_its_recorded_head_is_caught(run):
    """Whoever holds only the database can remove the last entry and the head recorded with it: the chain
    that is left is intact, but a ledger with entries and no recorded head was not written by s3t."""
    rows = run.registry.ledger_entries()
    with run.registry.transaction() as conn:
        conn.execute(delete(ledger).where(ledger.c.request_id == rows[-1]["request_id"]))
        conn.execute(delete(meta).where(meta.c.key == "ledger.head"))
    assert failed(run.audit(), "ledger") == [
        f"the ledger has {len(rows) - 1} chained entries but no recorded head (the seq and hash each append "
        "records): it was removed, so entries may have been removed from the ledger's end"]


def test_an_orphan_file_is_caught_and_a_retired_stage_left_on_disk_too(run, tiny_data, monkeypatch):
    orphan = run.run_dir / "artifacts" / "ab" / ("ab" + "0" * 62 + ".safetensors")
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"weights of nobody knows what")
    assert failed(run.audit(), "orphans") == [f"file {orphan.relative_to(run.run_dir)} is not a registered artifact "
                                              "(an orphan: no registry row accounts for it)"]
    orphan.unlink()
    # A deletion whose shredding failed leaves its retired stages queued, and on disk.
    def broken_disk(self, lineage_hash):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(ArtifactStore, "shred", broken_disk)
    receipt = run.delete(ids=[tiny_data[9].id])
    monkeypatch.undo()
    lines = failed(run.audit(), "orphans")
    assert receipt.retired_artifacts and len(lines) == len(receipt.retired_artifacts)
    assert all(line.startswith("retired stage ") and "is still on disk" in line for line in lines)
    run.sweep()
    assert run.audit().passed


def test_a_served_artifact_that_saw_a_ledger_deleted_record_is_caught(run):
    """The auditor trusts the ledger: forge the evidence that a served stage saw a deleted record."""
    lineage_hash, component = served_artifact(run)
    deleted = run.receipts()[0].deleted[0]
    with run.registry.transaction() as conn:
        conn.execute(lineage.insert().values(artifact=lineage_hash, record_id=deleted))
        conn.execute(update(artifacts).where(artifacts.c.lineage == lineage_hash)
                     .values(examples=artifacts.c.examples + 1))
    lines = failed(run.audit(), "deletions")
    assert lines == [f"served artifact {lineage_hash} saw record {deleted!r}, which ledger entry #1 (request "
                     f"{run.receipts()[0].request_id}) deleted"]


def test_erasure_catches_a_key_a_crash_left_and_a_cached_state(trained, tiny_data, monkeypatch, tmp_path):
    from s3t import cache
    from s3t.keystore import KeyStore

    victim = tiny_data[11].id
    path = next((trained.run_dir / "cache").glob(f"*/*/{cache._record_name(victim)}.sealed"))
    kept = path.read_bytes()
    monkeypatch.setattr(KeyStore, "destroy", lambda self, slots: 0)   # the process dies before destroying keys
    trained.delete(ids=[victim])
    monkeypatch.undo()
    path.write_bytes(kept)   # and a copy of its cached state is put back
    run_dir = trained.run_dir
    trained.close()
    as_found = s3t.S3T.open(run_dir, recover=False)
    slot = as_found.registry.key_slots([victim])[victim]
    lines = failed(as_found.audit(), "erasure")
    assert lines == [f"deleted record {victim!r}: its key (slot {slot} of keys.bin) is not destroyed",
                     f"deleted record {victim!r} still has a cached state at {path.relative_to(run_dir)}"]
    as_found.close()
    recovered = s3t.S3T.open(run_dir)   # open finishes the deletion: key destroyed, cache swept
    assert recovered.audit().passed
    recovered.close()


def test_replay_of_healthy_stages_is_bit_identical(run):
    report = run.audit(replay=2, seed=5)
    check = report.check("replay")
    assert report.passed and check.status == "passed", report.failures
    assert [s["result"] for s in check.looked_at["stages"]] == ["bit-identical", "bit-identical"]
    assert check.looked_at["seed"] == 5


def test_replay_catches_weights_altered_and_rehashed(run):
    import torch

    lineage_hash, component = served_artifact(run)
    store = ArtifactStore(run.run_dir / "artifacts")
    tensors = store.load(lineage_hash, run.registry.artifact(lineage_hash)["sha256"])
    name = sorted(k for k in tensors if k.startswith("head."))[0]
    tensors[name] = tensors[name] + torch.full_like(tensors[name], 1e-3)
    sha = store.save(lineage_hash, tensors, {"stage": "2"})
    with run.registry.transaction() as conn:   # a consistent forgery: the hash check alone cannot see it
        conn.execute(update(artifacts).where(artifacts.c.lineage == lineage_hash).values(sha256=sha))
    run.trainer.forget([lineage_hash])
    assert run.audit().passed   # every check but the replay passes
    report = run.audit(replay="all", seed=0)
    assert failed(report, "replay") == [
        f"artifact {lineage_hash} (shard {component['shard']} order {component['position']} stage 2): retrained "
        f"from its stored lineage, it differs from the stored artifact in 1 of {len(tensors)} tensors (e.g. {name})"]
    results = [s["result"] for s in report.check("replay").looked_at["stages"]]
    assert len(results) == len([a for c in run.served()[1] for a in c["artifacts"]])
    assert results.count("bit-identical") == len(results) - 1   # the other stages replay exactly


def test_replay_in_another_numeric_environment_is_skipped_with_the_reason(run):
    env = run.trainer.environment
    run.trainer.environment = dataclasses.replace(env, threads=env.threads + 1)
    check = run.audit(replay=1, seed=0).check("replay")
    assert check.status == "skipped" and not check.failures
    assert check.looked_at["stages"][0]["result"].startswith(
        "skipped: trained in another numeric environment, so a replay here cannot be bit-exact")
    assert f"threads: {env.threads} -> {env.threads + 1}" in check.looked_at["stages"][0]["result"]


def test_cli_audit_exits_1_with_one_line_per_failure(run, tmp_path):
    run_dir = run.run_dir
    pem = tmp_path / "run.pub"
    pem.write_text(run.public_key())
    run.close()
    ok = CliRunner().invoke(app, ["audit", str(run_dir), "--public-key", str(pem)])
    assert ok.exit_code == 0, ok.output
    assert "passed   ledger" in ok.stdout and "FAIL" not in ok.stdout
    report = json.loads(CliRunner().invoke(app, ["audit", str(run_dir), "--json"]).stdout)
    assert report["passed"] and [c["name"] for c in report["checks"]][-1] == "replay"
    for n, orphan in enumerate(["aa" + "1" * 62, "ab" + "2" * 62]):
        (run_dir / "artifacts" / orphan[:2]).mkdir(exist_ok=True)
        (run_dir / "artifacts" / orphan[:2] / f"{orphan}.safetensors").write_bytes(b"x" * (n + 1))
    other = tmp_path / "other.pub"
    from s3t import ledger as chain
    other.write_text(chain.public_key_pem(chain.create_signing_key(tmp_path / "other.key").public_key()))
    bad = CliRunner().invoke(app, ["audit", str(run_dir), "--public-key", str(other)])
    assert bad.exit_code == 1
    fails = [line for line in bad.stdout.splitlines() if line.startswith("FAIL ")]
    assert len(fails) == 2 + 2 and sum(line.startswith("FAIL orphans: file artifacts/") for line in fails) == 2
    assert sum("signature does not verify" in line for line in fails) == 2
    assert (run_dir / "artifacts" / "aa").is_dir() and any((run_dir / "artifacts" / "aa").iterdir()), \
        "the audit must not sweep what it reports"
    usage = CliRunner().invoke(app, ["audit", str(run_dir), "--replay", "some"])
    assert usage.exit_code == 1 and "--replay must be a number of stages or `all`" in usage.stderr


def test_http_audit_is_admin_only_and_replays_only_when_allowed(audited_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(audited_dir, run_dir)
    admin, deleter = make_token(run_dir, "admin"), make_token(run_dir, "delete")
    with Server(run_dir, "--no-worker", "--no-preload") as server:
        assert server.client(deleter).get("/v1/audit").status_code == 403
        body = server.client(admin).get("/v1/audit").json()
        assert body["passed"] and body["failures"] == [] and len(body["checks"]) == 7
        assert str(run_dir) not in json.dumps(body)
        refused = server.client(admin).get("/v1/audit", params={"replay": 1})
        assert refused.status_code == 409 and "s3t audit RUN_DIR --replay" in refused.json()["detail"]
    with Server(run_dir, "--no-worker", "--no-preload", "--audit-replay") as server:
        body = server.client(admin).get("/v1/audit", params={"replay": 1, "seed": 3}).json()
        replay = next(c for c in body["checks"] if c["name"] == "replay")
        assert body["passed"] and replay["status"] == "passed" and replay["looked_at"]["seed"] == 3
        assert server.client(admin).post("/v1/predict", json={"texts": ["after the replay"]}).status_code == 200
    assert "Traceback" not in server.log()
