"""Adding data (s3t/ingest.py, `S3T.add`, `s3t add`, POST /v1/records): records go to their cells without
training and without changing the served model; `restore()` brings them in, after which the model is
bit-identical to a fresh training on the union; a deleted id comes back only as a new record, whose
stages are never taken for stages that saw the deleted one; deleting a record not yet trained in is exact
and costs nothing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from sqlalchemy import select, update
from typer.testing import CliRunner

import s3t
from s3t import datasets
from s3t.cli import app
from s3t.ingest import assign_cells
from s3t.registry import lineage
from servicekit import Server, make_token, wait_for
from test_exactness import assert_same_model, served_tensors

TEXTS = ["shares rose at the bank", "the team won the match", "a new phone chip", "nothing in particular"]


def new_records(n: int, *, seed: int = 9, prefix: str = "new", subject: str | None = None) -> s3t.Dataset:
    """`n` records with ids that are not in the tiny data (`<prefix>-<k>`); the last one of `subject`."""
    base = list(datasets.synthetic(n, num_labels=3, seed=seed))
    return s3t.Dataset([s3t.Record(id=f"{prefix}-{k}", text=r.text + f" extra {k}", label=r.label,
                                   subject=subject if subject and k == n - 1 else None) for k, r in enumerate(base)])




def test_added_records_go_to_their_cells_without_training_or_changing_the_served_model(trained, tiny_data,
                                                                                      no_training):
    version, components = trained.served()
    before = trained.predict_proba(TEXTS)
    located = trained.locate(list(tiny_data.ids))
    subject = next(r.subject for r in tiny_data if r.subject)
    new = new_records(8, subject=subject)

    addition = trained.add(new)
    assert addition.records == 8 and addition.replaced == ()
    cells = assign_cells(trained.plan, new)
    assert trained.locate(list(new.ids)) == cells                        # the run's partition function
    assert trained.locate(list(tiny_data.ids)) == located                # nothing else moved
    assert cells["new-7"] == located[next(r.id for r in tiny_data if r.subject == subject)]   # a subject, one cell
    assert sum(c["records"] for c in addition.cells) == 8
    assert trained.served() == (version, components)                     # the served model is what it was
    assert np.array_equal(trained.predict_proba(TEXTS), before)

    status = trained.status()
    hit_shards = {shard for shard, _slice in cells.values()}
    assert status.live_records == len(tiny_data) + 8
    assert status.unseen_records == 8 and trained.unseen() == sorted(new.ids)
    assert {s.shard for s in status.shards if s.unseen_records} == hit_shards
    assert status.stale_orders > 0 and status.truncated_orders == 0
    entry = trained.registry.ledger_entries()[-1]
    assert entry["kind"] == "addition" and entry["receipt"]["records"] == 8
    assert all(r.text.encode() not in (trained.run_dir / "registry.sqlite").read_bytes() for r in new)   # sealed


def test_adding_refuses_ids_in_the_run_labels_outside_the_plan_and_a_subject_split(trained, tiny_data, make_run,
                                                                                    tiny_plan):
    trained.delete(ids=[tiny_data[3].id])
    before = trained.status()
    with pytest.raises(s3t.ConflictError, match=r"already in the run \('syn-4'\)"):
        trained.add(s3t.Dataset([tiny_data[4]]))
    with pytest.raises(s3t.ConflictError, match="replace_deleted=True"):
        trained.add(s3t.Dataset([tiny_data[3]]))
    with pytest.raises(s3t.DataError, match="'label-9' are not in the run's label space"):
        trained.add(s3t.Dataset([s3t.Record(id="n-1", text="x", label="label-9")]))
    after = trained.status()
    assert (after.live_records, after.deleted_records, after.stale_orders) == (
        before.live_records, before.deleted_records, before.stale_orders)
    assert [e["kind"] for e in trained.registry.ledger_entries()] == ["deletion"]

    # Prior-aware placement puts risky records in the last slice: a subject's new record with another
    # risk would split the subject over two cells.
    plan = tiny_plan.replace(placement="prior_aware", risky_slices=1)
    data = s3t.Dataset([s3t.Record(id=f"p-{k}", text=f"text {k}", label=f"label-{k % 3}", subject=f"s-{k % 6}",
                                   risk=0.1) for k in range(24)])
    run = make_run(plan, data, name="prior")
    with pytest.raises(s3t.DataError, match="a subject's records share one cell"):
        run.add(s3t.Dataset([s3t.Record(id="p-new", text="t", label="label-0", subject="s-1", risk=0.9)]))


def test_restore_after_adding_equals_fresh_training_on_the_union(make_run, tiny_plan, tiny_data):
    trained = make_run(tiny_plan, tiny_data, name="trained").train(progress=False)
    removed = [tiny_data[1].id, tiny_data[2].id]
    trained.delete(ids=removed)
    new = new_records(12)
    trained.add(new)

    # An added record deleted before any stage saw it: nothing served changes, and nothing is truncated.
    served = trained.served()
    receipt = trained.delete(ids=["new-0"])
    assert receipt.deleted == ("new-0",) and receipt.shards == () and receipt.retired_artifacts == ()
    assert trained.served() == served
    assert trained.audit().passed

    trained.restore(progress=False)
    status = trained.status()
    assert (status.stale_orders, status.truncated_orders, status.unseen_records) == (0, 0, 0)
    union = s3t.Dataset([r for r in tiny_data if r.id not in removed] + [r for r in new if r.id != "new-0"])
    torch.manual_seed(4321)
    fresh = make_run(trained.plan, union, name="fresh").train(progress=False)
    _, components = trained.served()
    assert components == fresh.served()[1]
    assert_same_model(trained, fresh, components, TEXTS + list(new.texts[:4]))
    assert np.array_equal(trained.predict_proba(TEXTS), fresh.predict_proba(TEXTS))
    # The stages the restore superseded are gone: every file on disk is a registered, used artifact.
    report = trained.audit(replay=1, seed=0)
    assert report.passed, report.failures
    assert len(list((trained.run_dir / "artifacts").rglob("*.safetensors"))) == len(trained.registry.artifact_lineages())


def test_a_deleted_id_comes_back_only_as_a_new_record(make_run, tiny_plan, tiny_data, monkeypatch):
    trained = make_run(tiny_plan, tiny_data, name="trained").train(progress=False)
    victim = tiny_data[6]
    first = trained.delete(ids=[victim.id])
    again = s3t.Dataset([s3t.Record(id=victim.id, text="an entirely new text about chips and phones",
                                    label=victim.label)])
    with pytest.raises(s3t.ConflictError, match="replace_deleted=True"):
        trained.add(again)

    # Re-adding waits for the training lock: no training in flight may still hold the old record.
    from s3t import system as system_module
    from s3t.files import FileLock

    monkeypatch.setattr(system_module, "TRAIN_LOCK_WAIT_S", 0.1)
    busy = FileLock(trained.run_dir / "train.lock")
    assert busy.acquire(wait=0)
    with pytest.raises(s3t.RunBusyError, match="re-adding deleted ids waits"):
        trained.add(again, replace_deleted=True)
    busy.release()

    addition = trained.add(again, replace_deleted=True)
    assert addition.replaced == ((victim.id, 1),)
    trained.restore(progress=False)
    _, components = trained.served()
    served = {a for c in components for a in c["artifacts"]}
    assert not served & set(first.retired_artifacts), "a new stage is named like one that saw the deleted record"
    with trained.registry.engine.connect() as conn:
        rows = conn.execute(select(lineage.c.artifact, lineage.c.generation)
                            .where(lineage.c.record_id == victim.id, lineage.c.artifact.in_(served))).all()
    assert rows and {g for _a, g in rows} == {1}
    report = trained.audit()
    assert report.passed, report.failures
    assert report.check("deletions").looked_at["deleted_records"] == 1

    # Bit for bit what a fresh run on the union trains; only the names of the new record's stages differ.
    union = s3t.Dataset([r for r in tiny_data if r.id != victim.id] + list(again))
    fresh = make_run(trained.plan, union, name="fresh").train(progress=False)
    theirs = {(c["shard"], c["position"]): c for c in fresh.served()[1]}
    renamed = 0
    for c in components:
        other = theirs[c["shard"], c["position"]]
        assert c["depth"] == other["depth"]
        for mine, their in zip(c["artifacts"], other["artifacts"]):
            a = trained.trainer.store.load(mine, trained.registry.artifact(mine)["sha256"])
            b = fresh.trainer.store.load(their, fresh.registry.artifact(their)["sha256"])
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            renamed += mine != their
    assert renamed > 0
    assert np.array_equal(trained.predict_proba(TEXTS), fresh.predict_proba(TEXTS))

    # The check is not vacuous: evidence that a served stage saw the deleted generation is caught.
    with trained.registry.transaction() as conn:
        conn.execute(update(lineage).where(lineage.c.record_id == victim.id, lineage.c.artifact == rows[0][0])
                     .values(generation=None))
    assert any(f"saw record {victim.id!r}, which ledger entry #1" in line
               for line in trained.audit().check("deletions").failures)
    with trained.registry.transaction() as conn:
        conn.execute(update(lineage).where(lineage.c.record_id == victim.id, lineage.c.artifact == rows[0][0])
                     .values(generation=1))

    # Deleting it again retires its stages, and the ledger accounts for both generations.
    second = trained.delete(ids=[victim.id])
    assert set(second.retired_artifacts) >= {a for a, _g in rows}
    assert trained.audit().passed


def test_cli_add_and_status(trained_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_dir, run_dir)
    rows = [{"id": r.id, "text": r.text, "label": r.label} for r in new_records(5)]
    data = tmp_path / "new.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    runner = CliRunner()
    out = runner.invoke(app, ["add", str(run_dir), "--data", str(data)])
    assert out.exit_code == 0, out.output
    assert "added 5 records" in out.stdout and "has not seen 5 live records" in out.stdout
    again = runner.invoke(app, ["add", str(run_dir), "--data", str(data)])
    assert again.exit_code == 1 and again.stderr.startswith("error: ") and "already in the run" in again.stderr
    status = json.loads(runner.invoke(app, ["status", str(run_dir), "--json"]).stdout)
    assert status["unseen_records"] == 5 and status["stale_orders"] > 0
    assert "stale orders" in runner.invoke(app, ["status", str(run_dir)]).stdout


def test_http_records_need_the_ingest_role_and_the_worker_trains_them_in(trained_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_dir, run_dir)
    ingest, deleter, admin = make_token(run_dir, "ingest"), make_token(run_dir, "delete"), make_token(run_dir, "admin")
    body = {"records": [{"id": r.id, "text": r.text, "label": r.label} for r in new_records(6)]}
    with Server(run_dir, "--restore-poll", "0.5") as server:
        assert server.client(deleter).post("/v1/records", json=body).status_code == 403
        r = server.client(ingest).post("/v1/records", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["records"] == 6 and r.json()["stale_orders"] > 0
        assert server.client(ingest).post("/v1/records", json=body).status_code == 409
        bad = {"records": [{"id": "x-1", "text": "t", "label": "no-such-label"}]}
        assert server.client(ingest).post("/v1/records", json=bad).status_code == 422

        def trained_in():   # the worker's run has finished and the registry shows nothing left to train in
            st = server.client(admin).get("/v1/status").json()
            done = st["restoration"]["runs"]["completed"] >= 1 and st["restoration"]["state"] == "idle"
            return st if done and st["unseen_records"] == 0 and st["stale_orders"] == 0 else None
        status = wait_for(trained_in, timeout=600, what="the worker to train the added records in")
        assert status["live_records"] == 96 + 6 and status["restoration"]["policy"]["train_added"]
        audit = server.client(admin).get("/v1/audit").json()
        assert audit["passed"], audit["failures"]
    assert "Traceback" not in server.log(), server.log()[-3000:]


def test_adding_prompt_records_to_a_causal_lm_run_is_exact_after_restore(make_run, tmp_path):
    """The same contract for a causal-LM run: prompt/completion records go in through the same sealed
    insert, and after `restore()` every served stage is bit-identical to a fresh training on the union
    (and generation too); a labelled text is refused with one line."""
    from tiny_models import bbc_texts, save_tiny, train_bpe

    llama = str(save_tiny("llama", tmp_path / "llama", train_bpe(bbc_texts(200), vocab_size=512), layers=4))
    base = s3t.datasets.synthetic(40, num_labels=3, num_subjects=10, seed=3)
    data = s3t.Dataset.from_records([dict(id=r.id, prompt=f"topic {r.label}:", completion=" " + r.text,
                                          subject=r.subject) for r in base])
    first, added = data.subset(data.ids[:30]), data.subset(data.ids[30:])
    plan = s3t.Plan(num_shards=2, num_slices=2, budget=2, blocks_per_slice=1, epochs=1, max_length=24, batch_size=8,
                    learning_rate=5e-3, base_model=llama, seed=0, num_threads=1)
    trained = make_run(plan, first, name="trained").train(progress=False)
    assert trained.kind == "prompt" == trained.registry.get_meta("record_kind")   # stored: no model needed
    with pytest.raises(s3t.DataError, match="the run trains on prompts and completions"):
        trained.add(s3t.Dataset([s3t.Record(id="t-1", text="a text", label="label-0")]))

    served = trained.served()
    addition = trained.add(added)
    assert addition.records == 10 and trained.served() == served
    assert trained.status().unseen_records == 10 and trained.unseen() == sorted(added.ids)
    assert all(r.completion.encode() not in (trained.run_dir / "registry.sqlite").read_bytes() for r in added)

    trained.restore(progress=False)
    assert (trained.status().stale_orders, trained.status().unseen_records) == (0, 0)
    fresh = make_run(trained.plan, data, name="fresh").train(progress=False)
    _, components = trained.served()
    assert components == fresh.served()[1]
    mine, theirs = served_tensors(trained, components), served_tensors(fresh, components)
    assert mine and all(torch.equal(mine[a][k], theirs[a][k]) for a in mine for k in mine[a])
    prompts = ["topic label-0:", "an unseen prompt"]
    assert trained.generate(prompts, max_new_tokens=4) == fresh.generate(prompts, max_new_tokens=4)
    report = trained.audit(replay=1, seed=0)
    assert report.passed and report.check("replay").looked_at["stages"][0]["result"] == "bit-identical", \
        report.failures


def test_http_records_take_either_kind_but_never_a_mix():
    """POST /v1/records' body: {id, text, label} or {id, prompt, completion}; the library then checks that
    the kind is the run's (`test_adding_prompt_records_to_a_causal_lm_run_is_exact_after_restore`)."""
    from pydantic import ValidationError

    from s3t.records import Dataset
    from s3t.service.models import AddRecordsRequest

    body = AddRecordsRequest.model_validate({"records": [{"id": "p-1", "prompt": "topic:", "completion": " text"}]})
    assert Dataset.from_records([r.model_dump(exclude_none=True) for r in body.records]).kind == "prompt"
    body = AddRecordsRequest.model_validate({"records": [{"id": "t-1", "text": "a text", "label": "label-0"}]})
    assert Dataset.from_records([r.model_dump(exclude_none=True) for r in body.records]).kind == "text"
    for record in ({"id": "m-1", "text": "a text", "completion": " text"}, {"id": "m-2", "prompt": "topic:"},
                   {"id": "m-3", "text": "a", "label": "b", "prompt": "c", "completion": "d"}):
        with pytest.raises(ValidationError, match="either `text` and `label`, or `prompt` and `completion`"):
            AddRecordsRequest.model_validate({"records": [record]})


def test_adding_images_to_an_image_run_is_exact_after_restore(make_run, tiny_image_plan, tiny_image_data):
    """Image records go in through the same sealed insert (their PNG bytes never in clear in the database);
    after `restore()` every served tensor equals a fresh training on the union; a text is refused."""
    first, added = tiny_image_data.subset(tiny_image_data.ids[:72]), tiny_image_data.subset(tiny_image_data.ids[72:])
    trained = make_run(tiny_image_plan, first, name="trained").train(progress=False)
    assert trained.kind == "image"
    with pytest.raises(s3t.DataError, match="the run trains on labelled images"):
        trained.add(s3t.Dataset([s3t.Record(id="t-1", text="a text", label=trained.labels[0])]))
    served = trained.served()
    assert trained.add(added).records == 24 and trained.served() == served
    assert trained.status().unseen_records == 24
    database = (trained.run_dir / "registry.sqlite").read_bytes()
    assert all(r.image[-64:] not in database for r in added)   # sealed

    trained.restore(progress=False)
    fresh = make_run(trained.plan, tiny_image_data, name="fresh").train(progress=False)
    _, components = trained.served()
    assert components == fresh.served()[1] and trained.status().unseen_records == 0
    mine, theirs = served_tensors(trained, components), served_tensors(fresh, components)
    assert mine and all(torch.equal(mine[a][k], theirs[a][k]) for a in mine for k in mine[a])
    report = trained.audit(replay=1, seed=0)
    assert report.passed and report.check("replay").looked_at["stages"][0]["result"] == "bit-identical", \
        report.failures
