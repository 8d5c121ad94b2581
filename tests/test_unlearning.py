"""The deletion path: no training, content erased from every file, checked lineage, all-or-nothing (the tests
taking `trained_case` run once per classifying family: texts and images).

Tests marked `both_databases` also run on PostgreSQL, with the text family (the deletion's reads, writes,
rollback and stored rows, and its races with a restore); the file-level ones (shredding, crash leftovers)
are the same code on either. The group commit of concurrent deletions is tests/test_batch.py's.
"""

from __future__ import annotations

import pytest
from sqlalchemy import insert, inspect, select

import s3t
from s3t.records import payload
from s3t.registry import lineage, records


def run_bytes(system) -> bytes:
    """Every byte s3t keeps for the run: database (and any journal) plus all artifact files."""
    return b"".join(p.read_bytes() for p in sorted(system.run_dir.rglob("*")) if p.is_file())


@pytest.mark.both_databases
def test_delete_truncates_without_training(trained_case, no_training):
    trained, tiny_data = trained_case
    victim = tiny_data[5]
    shard, slice_ = trained.locate([victim.id])[victim.id]
    before = {o["position"]: o["depth"] for o in trained.registry.orders(shards=[shard])}
    receipt = trained.delete(ids=[victim.id])
    after = {o["position"]: o["depth"] for o in trained.registry.orders(shards=[shard])}
    for o in trained.registry.orders(shards=[shard]):
        assert after[o["position"]] == min(before[o["position"]], o["slices"].index(slice_))
    assert receipt.deleted == (victim.id,)
    assert receipt.shards[0]["shard"] == shard
    assert receipt.shards[0]["depth_after"] == max(after.values())
    assert receipt.lineage_check.startswith("passed")


@pytest.mark.both_databases
def test_deleted_content_leaves_every_file(trained_case, no_training):
    trained, tiny_data = trained_case
    victim = tiny_data[3]
    marker = payload(victim)[0]   # the text, or the image file's bytes
    assert sum(r.model_input == victim.model_input for r in tiny_data) == 1
    shard, _ = trained.locate([victim.id])[victim.id]
    assert trained.registry.live_shard(shard)[1][victim.id][0] == marker   # stored, sealed
    assert marker not in run_bytes(trained), "record text is stored in clear"
    with trained.registry.engine.connect() as conn:   # on any database: only ciphertext in the row
        stored = conn.execute(select(records.c.input).where(records.c.id == victim.id)).scalar_one()
    assert stored and marker not in stored
    trained.delete(ids=[victim.id])
    with trained.registry.engine.connect() as conn:
        assert conn.execute(select(records.c.input, records.c.target)
                            .where(records.c.id == victim.id)).one() == (None, None)
    trained.close()
    assert marker not in run_bytes(trained), "deleted text survives in the run's files"


@pytest.mark.both_databases
def test_deleted_subject_is_kept_only_as_a_keyed_digest(trained, tiny_data):
    subject = tiny_data[0].subject
    owned = {r.id for r in tiny_data if r.subject == subject}
    receipt = trained.delete(subjects=[subject])
    assert set(receipt.deleted) == owned and subject not in str(receipt.to_dict())
    # The subject column is gone: a subject is stored only as its keyed digest, from create on.
    assert "subject" not in records.c
    with trained.registry.engine.connect() as conn:
        rows = conn.execute(select(records.c.subject_digest, records.c.input, records.c.target)
                            .where(records.c.id.in_(sorted(owned)))).all()
    assert rows and all(r[1] is None and r[2] is None and len(r[0]) == 64 for r in rows)
    trained.close()
    if not trained.registry.postgres:   # the database file itself (PostgreSQL's files are the server's)
        assert subject.encode() not in (trained.run_dir / "registry.sqlite").read_bytes()


@pytest.mark.both_databases
def test_lineage_check_rolls_back_a_false_claim(trained, tiny_data):
    """If the stored lineage says a served artifact saw the record, the deletion must not be acknowledged."""
    version, components = trained.served()
    victim = tiny_data[0].id
    shard, _ = trained.locate([victim])[victim]
    other = next(c for c in components if c["shard"] != shard)
    with trained.registry.transaction() as conn:   # forge: another shard's served artifact "saw" the victim
        conn.execute(insert(lineage).values(artifact=other["artifacts"][0], record_id=victim))
    with pytest.raises(s3t.IntegrityError):
        trained.delete(ids=[victim])
    assert trained.served() == (version, components)
    assert trained.locate([victim]) and trained.registry.locate([victim])[victim][2] is False
    assert trained.receipts() == []


@pytest.mark.both_databases
def test_deletion_racing_a_restore_is_never_served(trained, tiny_data):
    """A record deleted while restore() trains on it: that result is discarded, not served."""
    first, second = tiny_data[1].id, tiny_data[2].id
    trained.delete(ids=[first])
    trainer = trained.trainer
    original = trainer.register

    def delete_during_training(stage, **kwargs):
        original(stage, **kwargs)
        if second in stage.job.ids and not trained.registry.locate([second])[second][2]:
            trained.delete(ids=[second])

    trainer.register = delete_during_training
    trained.restore(progress=False)
    trainer.register = original
    _, components = trained.served()
    served = [a for c in components for a in c["artifacts"]]
    with trained.registry.transaction() as conn:
        assert not trained.registry.tainted(conn, served, [first, second])
    assert trained.status().truncated_orders > 0   # the raced orders wait for the next restore
    trained.restore(progress=False)
    assert trained.status().truncated_orders == 0


def _artifact_files(system, lineages) -> list:
    from s3t.store import ArtifactStore
    from s3t.system import ARTIFACTS_DIR

    store = ArtifactStore(system.run_dir / ARTIFACTS_DIR)
    return [store.path(h) for h in sorted(lineages)]


def test_delete_retires_and_shreds_every_stage_that_saw_the_record(trained, tiny_data, no_training):
    victim = tiny_data[5]
    with trained.registry.engine.connect() as conn:
        saw = trained.registry.artifacts_that_saw(conn, [victim.id])
    files = _artifact_files(trained, saw)
    assert saw and all(f.is_file() for f in files)
    before = trained.predict_proba(["a text to classify"])

    receipt = trained.delete(ids=[victim.id])
    assert set(receipt.retired_artifacts) == saw
    assert not any(f.exists() for f in files)   # shredded: no weights trained on the record remain
    assert all(trained.registry.artifact(h) is None for h in saw) and trained.registry.retired() == []
    assert not set(receipt.served_artifacts) & saw
    # The other shard's stages and the kept prefixes still serve; the hit shard's model is a shorter one.
    assert trained.predict_proba(["a text to classify"]).shape == before.shape


def test_retired_stages_left_by_a_crash_after_commit_are_shredded_by_the_next_rebuild(trained, tiny_data):
    from s3t.unlearning import delete

    victim = tiny_data[5]
    # The deletion commits, then the process dies before shredding: rows are retired, files remain.
    receipt = delete(trained.registry, trained._ledger_key(), ids=[victim.id])
    files = _artifact_files(trained, receipt.retired_artifacts)
    assert files and all(f.is_file() for f in files)
    assert sorted(h for h, _at in trained.registry.retired()) == sorted(receipt.retired_artifacts)

    trained.restore(progress=False)
    assert not any(f.exists() for f in files) and trained.registry.retired() == []
    with trained.registry.engine.connect() as conn:   # nothing registered saw the deleted record
        assert trained.registry.artifacts_that_saw(conn, [victim.id]) == set()


@pytest.mark.both_databases
def test_a_stage_registered_after_its_record_was_deleted_is_retired(trained, tiny_data):
    # A restore trains from a snapshot; a deletion of one of the stage's records commits before the
    # stage is registered. The registration must see it and retire the stage; restore leaves it unserved.
    located = trained.registry.locate([r.id for r in tiny_data])
    cells: dict = {}
    for rid, (shard, slice_, _deleted) in sorted(located.items()):
        cells.setdefault((shard, slice_), []).append(rid)
    first, second = next(iter(sorted(cells.items())))[1][:2]
    trained.delete(ids=[first])   # gives restore work in that shard
    trainer, raced = trained.trainer, []
    train_stage = trainer.train_stage

    def train_then_delete(**kwargs):
        result = train_stage(**kwargs)
        if not raced and second in kwargs["ids"]:
            raced.append(kwargs["lineage"])
            trained.delete(ids=[second])   # commits before `register` runs
        return result

    trainer.train_stage = train_then_delete
    trained.restore(progress=False)
    assert raced
    files = _artifact_files(trained, raced)
    with trained.registry.engine.connect() as conn:
        assert trained.registry.artifacts_that_saw(conn, [second]) == set()
    assert trained.registry.artifact(raced[0]) is None and not files[0].exists()
    _, components = trained.registry.served()
    assert raced[0] not in {a for c in components for a in c["artifacts"]}


def test_a_failed_shred_after_commit_does_not_fail_the_deletion(trained, tiny_data, monkeypatch):
    from s3t.store import ArtifactStore

    def broken_disk(self, lineage):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(ArtifactStore, "shred", broken_disk)
    victim = tiny_data[5].id
    receipt = trained.delete(ids=[victim])   # applied: it must not be reported as failed
    assert receipt.deleted == (victim,) and receipt.retired_artifacts
    assert sorted(h for h, _at in trained.registry.retired()) == sorted(receipt.retired_artifacts)
    monkeypatch.undo()
    trained.restore(progress=False)   # the queue is shredded by the next rebuild
    assert trained.registry.retired() == [] and not any(f.exists() for f in
                                                         _artifact_files(trained, receipt.retired_artifacts))


@pytest.mark.both_databases
def test_an_older_runs_lineage_gains_the_covering_index_on_open(trained_case, no_training):
    """The deletion path's lineage lookup reads an index on (record_id, artifact) alone. A run made before it
    had one on record_id only: opening it adds the new index (the old one stays: a replica still on the
    older version would build it again), and deletions go on."""
    trained, tiny_data = trained_case
    with trained.registry.engine.begin() as conn:
        conn.exec_driver_sql("DROP INDEX ix_lineage_record_artifact")
        conn.exec_driver_sql("CREATE INDEX ix_lineage_record_id ON lineage (record_id)")
    trained.close()
    reopened = s3t.S3T.open(trained.run_dir)
    try:
        names = {index["name"] for index in inspect(reopened.registry.engine).get_indexes("lineage")}
        assert {"ix_lineage_record_artifact", "ix_lineage_record_id"} <= names, names
        victim = tiny_data[2]
        assert reopened.delete(ids=[victim.id]).deleted == (victim.id,)
    finally:
        reopened.close()


@pytest.mark.both_databases
def test_a_subject_with_a_nul_character_is_deleted_like_any_other(trained):
    """Subjects are kept only as keyed digests, so one holding a NUL is stored on either database, and its
    deletion is not refused."""
    trained.add(s3t.Dataset([s3t.Record(id="nul-subject", text="x", label="label-0", subject="user\x00evil")]))
    assert trained.delete(subjects=["user\x00evil"]).deleted == ("nul-subject",)


def test_a_role_that_may_not_change_the_tables_opens_an_older_run_without_the_new_index(postgres_url, tmp_path,
                                                                                     caplog):
    """Only a table's owner may index it on PostgreSQL: a service role granted reads and writes alone opens
    an older run all the same, with a warning, and its deletions use the older index meanwhile."""
    import postgres
    from sqlalchemy.engine import make_url

    from s3t.keystore import KeyStore
    from s3t.registry import Registry

    schema = postgres.new_schema(postgres_url)
    role = f"writer_{schema[-12:]}"
    owner = Registry(postgres_url, KeyStore.create(tmp_path / "owner.keys"), schema=schema)
    try:
        owner.create_schema()
        with owner.engine.begin() as conn:   # as a run made before the index: only the owner may add it
            conn.exec_driver_sql("DROP INDEX ix_lineage_record_artifact")
            conn.exec_driver_sql(f'CREATE ROLE "{role}" LOGIN')
            conn.exec_driver_sql(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
            conn.exec_driver_sql(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{schema}" TO "{role}"')
        writer = Registry(make_url(postgres_url).set(username=role).render_as_string(hide_password=False),
                          KeyStore.create(tmp_path / "writer.keys"), schema=schema)
        try:
            with caplog.at_level("WARNING", logger="s3t.registry"):
                writer.create_schema()
            assert "ix_lineage_record_artifact could not be added to table lineage" in caplog.text, caplog.text
            with writer.engine.connect() as conn:
                assert writer.saw(conn, ["any-id"]) == {"any-id": {}}   # the run is usable
        finally:
            writer.close()
    finally:
        with owner.engine.begin() as conn:
            conn.exec_driver_sql(f'DROP OWNED BY "{role}"')
            conn.exec_driver_sql(f'DROP ROLE IF EXISTS "{role}"')
        owner.close()
        postgres.drop_schema(postgres_url, schema)
