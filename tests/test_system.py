"""Tests for s3t.system: the `S3T` facade (create/open, predict, locate, delete, receipts, status, restore).

Trained state comes from the session's `trained_dir` (read-only) and `trained` (a private copy); the only
training here is one `restore()` after every order was killed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import s3t
from s3t import datasets
from s3t.errors import (DataError, NeedsRestoreError, NotTrainedError, PlanError, RunError, RunExistsError,
                        RunNotFoundError)
from s3t.partition import partition

TEXTS = ["shares rose at the bank after the profit report", "the team won the match", "a new phone chip",
         "nothing in particular"]


@pytest.fixture(scope="module")
def served(trained_dir):
    """The trained run opened once per module, for read-only inference tests (loads the backbone once)."""
    system = s3t.S3T.open(trained_dir)
    yield system
    system.close()


def subject_with_records(data: s3t.Dataset, at_least: int = 2) -> tuple[str, list[str]]:
    """A subject of `data` with at least `at_least` records, and its record ids."""
    by_subject: dict[str, list[str]] = {}
    for r in data:
        if r.subject is not None:
            by_subject.setdefault(r.subject, []).append(r.id)
    subject = next(s for s, ids in sorted(by_subject.items()) if len(ids) >= at_least)
    return subject, sorted(by_subject[subject])


# -- create / open -------------------------------------------------------------------------------------
def test_create_refuses_an_existing_run_and_leaves_it_alone(trained_dir, tiny_plan, tiny_data):
    before = (trained_dir / "run.json").read_bytes(), (trained_dir / "registry.sqlite").read_bytes()
    with pytest.raises(RunExistsError, match=re.escape(str(trained_dir))):
        s3t.S3T.create(trained_dir, tiny_plan, tiny_data)
    assert ((trained_dir / "run.json").read_bytes(), (trained_dir / "registry.sqlite").read_bytes()) == before


def test_open_a_missing_folder_names_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(RunNotFoundError, match=re.escape(str(missing))):
        s3t.S3T.open(missing)
    assert not missing.exists(), "open must not create the folder"


@pytest.mark.parametrize("damage", ["run.json is not JSON", "run.json is a list", "database deleted",
                                    "database is garbage"])
def test_open_a_damaged_run_says_so(trained_dir, tmp_path, damage):
    import shutil

    from s3t.system import DB_FILE, RUN_FILE

    run = tmp_path / "run"
    shutil.copytree(trained_dir, run)
    if damage == "database deleted":
        (run / DB_FILE).unlink()
    elif damage == "database is garbage":
        (run / DB_FILE).write_bytes(b"not a database " * 100)
    else:
        (run / RUN_FILE).write_text("{not json" if damage == "run.json is not JSON" else "[1, 2]")
    with pytest.raises(RunError, match=f"the run at {re.escape(str(run))} is damaged"):
        s3t.S3T.open(run)
    assert (run / DB_FILE).exists() == (damage != "database deleted"), "open must not create an empty database"


@pytest.mark.parametrize("version, match", [(1, r"created by an older s3t \(run format 1.*recreate it with `s3t train"),
                                            (3, r"run format 3, which this s3t does not read")])
def test_open_refuses_a_run_format_it_does_not_read(trained_dir, tmp_path, version, match):
    import shutil

    from s3t.system import RUN_FILE

    run = tmp_path / "run"
    shutil.copytree(trained_dir, run)
    (run / RUN_FILE).write_text(json.dumps({"format": version, "database_url": None}))
    with pytest.raises(RunError, match=match) as info:
        s3t.S3T.open(run)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("changes", [
    dict(num_slices=2, blocks_per_slice=2),            # 4 blocks needed, the tiny model has 2
    dict(num_slices=1, budget=None, blocks_per_slice=3),
    dict(num_slices=3, budget=None),                   # more layer groups than blocks
])
def test_create_refuses_a_plan_deeper_than_the_model(tmp_path, tiny_plan, tiny_data, changes):
    plan = tiny_plan.replace(**changes)  # valid on its own: only the model makes it impossible
    with pytest.raises(PlanError, match=r"the model has 2"):
        s3t.S3T.create(tmp_path / "run", plan, tiny_data)
    assert not (tmp_path / "run").exists(), "a refused plan must leave no half-made run behind"


def test_create_accepts_empty_cells_and_never_trains_an_order_that_starts_on_one(make_run, tiny_plan, caplog):
    # One subject: every record shares one (shard, slice) cell, so the other three cells are empty. That is
    # what deletions can leave behind too, so a fresh training on such data must be defined: the rule
    # (truncation.attainable_depth) trains only orders whose first slice holds records.
    data = datasets.synthetic(8, num_subjects=1, seed=0)
    shard, slice_ = next(iter(partition(data, seed=tiny_plan.seed, num_shards=2, num_slices=2).values()))
    with caplog.at_level("WARNING", logger="s3t.system"):
        system = make_run(tiny_plan, data)
    assert "3 of 4 cells get no records" in caplog.text
    system.train(progress=False)
    st = system.status()
    assert st.truncated_orders == 0   # nothing left that a restore could train
    other = 1 - shard
    assert st.shards[other].served_depth == 0 and st.shards[other].empty_slices == (0, 1)
    assert st.shards[shard].empty_slices == (1 - slice_,)
    _, components = system.served()
    assert [c["shard"] for c in components] == [shard]
    served = next(o for o in system.registry.orders(shards=[shard]) if o["position"] == components[0]["position"])
    assert served["slices"][0] == slice_ and components[0]["depth"] == 2   # stage 2 trains on slice_ alone
    assert all(o["depth"] == 0 for o in system.registry.orders() if o["slices"][0] != slice_ or o["shard"] != shard)
    assert system.predict_proba(["a text"]).shape == (1, 3)


def test_create_stores_the_label_space_and_thread_count_in_the_plan(make_run, tiny_plan, tiny_data):
    system = make_run(tiny_plan, tiny_data)
    assert system.plan.labels == tiny_data.labels and system.labels == tiny_data.labels
    assert system.plan.num_threads == torch.get_num_threads()
    assert s3t.S3T.open(system.run_dir).plan == system.plan


def test_declared_labels_keep_their_order_and_may_exceed_the_data(make_run, tiny_plan, tiny_data):
    labels = ("label-2", "unused", "label-0", "label-1")
    system = make_run(tiny_plan.replace(labels=labels), tiny_data).train(progress=False)
    assert system.labels == labels and system.predict_proba(["a text"]).shape == (1, 4)


def test_create_refuses_data_with_labels_the_plan_does_not_declare(tmp_path, tiny_plan, tiny_data):
    with pytest.raises(DataError, match=r"label\(s\) 'label-2' that the plan's `labels` \['label-0', 'label-1'\]"):
        s3t.S3T.create(tmp_path / "run", tiny_plan.replace(labels=["label-0", "label-1"]), tiny_data)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("data", [
    [{"id": "a", "text": "some text", "label": "x"}],
    ("some text", "more text"),
])
def test_create_wants_a_dataset(tmp_path, tiny_plan, data):
    with pytest.raises(DataError, match=r"s3t\.Dataset"):
        s3t.S3T.create(tmp_path / "run", tiny_plan, data)


def test_create_wants_a_model_folder_with_a_config(tmp_path, tiny_plan, tiny_data):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\0")
    with pytest.raises(PlanError, match=r"config\.json"):
        s3t.S3T.create(tmp_path / "run", tiny_plan.replace(base_model=str(folder)), tiny_data)
    assert not (tmp_path / "run").exists()


# -- inference -----------------------------------------------------------------------------------------
def test_untrained_run_refuses_to_predict(make_run, tiny_plan, tiny_data):
    system = make_run(tiny_plan, tiny_data)
    status = system.status()
    assert (status.trained, status.serving, status.served_version) == (False, False, 0)
    assert status.truncated_orders == 2 * 2 and status.live_records == len(tiny_data)
    for call in (system.predict, system.predict_proba):
        with pytest.raises(NotTrainedError, match=r"train"):
            call(["some text"])


def test_deleting_from_an_untrained_run_keeps_it_untrained(make_run, tiny_plan, tiny_data):
    system = make_run(tiny_plan, tiny_data)
    system.delete(ids=[tiny_data[0].id])
    assert system.status().trained is False
    with pytest.raises(NotTrainedError):
        system.predict(["some text"])


def test_predict_shapes_labels_and_probabilities(served, tiny_data):
    assert served.labels == tiny_data.labels == ("label-0", "label-1", "label-2")
    proba = served.predict_proba(TEXTS)
    assert proba.shape == (len(TEXTS), 3) and proba.dtype == np.float32
    assert np.all(proba >= 0) and np.allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    predicted = served.predict(TEXTS)
    assert predicted == [served.labels[k] for k in proba.argmax(axis=1)]
    # Batching must not change the result.
    assert np.allclose(served.predict_proba(TEXTS, batch_size=1), proba, atol=1e-6)


def test_predict_uses_labels_in_their_stored_order(served, tiny_data):
    """The model learned the synthetic topics: label names map to the right output columns."""
    assert served.score(tiny_data) > 0.9
    sample = tiny_data.subset(tiny_data.ids[:12])
    assert served.predict(list(sample.texts)) == [r.label for r in sample]


def test_predict_nothing(served):
    empty = served.predict_proba([])
    assert empty.shape == (0, 3)
    assert served.predict([]) == []


@pytest.mark.parametrize("texts, match", [
    ("a single string", r"not a single string"),
    ([1, 2], r"text 0 must be a string; got int"),
    (["fine", None], r"text 1 must be a string; got NoneType"),
    ([b"bytes"], r"text 0 must be a string; got bytes"),
])
def test_predict_rejects_texts_that_are_not_strings(served, texts, match):
    with pytest.raises(DataError, match=match):
        served.predict(texts)
    with pytest.raises(DataError, match=match):
        served.predict_proba(texts)


def test_score_rejects_labels_the_run_does_not_know(served):
    data = s3t.Dataset.from_records([{"id": "z", "text": "the team won", "label": "weather"}])
    with pytest.raises(DataError, match=r"'weather'"):
        served.score(data)


def test_reopen_from_disk_serves_the_same_model(trained, tiny_data):
    trained.delete(ids=[tiny_data[3].id])   # so the reopened state includes a deletion
    path = trained.run_dir
    proba, status, served_set = trained.predict_proba(TEXTS), trained.status(), trained.served()
    receipts, plan, labels = trained.receipts(), trained.plan, trained.labels
    trained.close()
    again = s3t.S3T.open(path)
    try:
        assert np.array_equal(again.predict_proba(TEXTS), proba)
        assert again.status() == status
        assert again.served() == served_set
        assert (again.receipts(), again.plan, again.labels) == (receipts, plan, labels)
    finally:
        again.close()


# -- locate --------------------------------------------------------------------------------------------
def test_locate_matches_the_partition_and_skips_unknown_ids(served, tiny_plan, tiny_data):
    expected = partition(tiny_data, seed=tiny_plan.seed, num_shards=tiny_plan.num_shards,
                         num_slices=tiny_plan.num_slices)
    found = served.locate(list(tiny_data.ids) + ["no-such-id"])
    assert found == expected
    assert all(0 <= sh < tiny_plan.num_shards and 0 <= sl < tiny_plan.num_slices for sh, sl in found.values())
    assert served.locate(["no-such-id", "neither"]) == {}
    assert served.locate([]) == {}


def test_locate_rejects_a_bare_string(served):
    with pytest.raises(DataError):
        served.locate("syn-1")


# -- delete --------------------------------------------------------------------------------------------
def test_delete_reports_unknown_ids(trained, tiny_data):
    victim = tiny_data[0].id
    receipt = trained.delete(ids=[victim, "no-such-id", victim])
    assert receipt.deleted == (victim,)
    assert receipt.unknown == ("no-such-id",)
    assert receipt.already_deleted == ()
    assert "passed" in receipt.lineage_check
    status = trained.status()
    assert (status.live_records, status.deleted_records) == (len(tiny_data) - 1, 1)


def test_delete_twice_changes_nothing_the_second_time(trained, tiny_data):
    victim = tiny_data[1].id
    first = trained.delete(ids=[victim])
    assert first.deleted == (victim,) and len(first.shards) == 1
    served_before, status_before = trained.served(), trained.status()
    second = trained.delete(ids=[victim])
    assert second.deleted == () and second.unknown == ()
    assert second.already_deleted == (victim,)
    assert second.shards == ()
    assert second.served_version == first.served_version
    assert trained.served() == served_before
    assert trained.status() == status_before


def test_delete_truncates_only_the_hit_shard(trained, tiny_plan, tiny_data):
    before = trained.status()
    assert before.truncated_orders == 0 and before.deleted_records == 0
    assert all(s.served_depth == tiny_plan.num_slices and s.live_orders == s.orders == 2 for s in before.shards)
    victim = tiny_data[2].id
    (shard, _slice), = trained.locate([victim]).values()
    receipt = trained.delete(ids=[victim])
    assert receipt.shards == ({"shard": shard, "depth_before": 2, "depth_after": 1},)
    assert receipt.served_version == before.served_version + 1
    after = trained.status()
    assert after.served_version == receipt.served_version
    # Orders (a, b) and (b, a): the one starting with the hit slice dies, the other keeps one stage.
    assert after.truncated_orders == 2
    hit = after.shards[shard]
    assert (hit.live_orders, hit.served_depth, hit.deletions_to_drop) == (1, 1, 1)
    other = after.shards[1 - shard]
    assert other == before.shards[1 - shard]
    assert after.serving


def test_subject_deletion_deletes_every_record_of_the_subject(trained, tiny_data):
    subject, ids = subject_with_records(tiny_data)
    receipt = trained.delete(subjects=[subject])
    assert receipt.deleted == tuple(ids)
    assert receipt.unknown_subjects == () and len(receipt.subjects) == 1
    assert trained.status().deleted_records == len(ids)
    again = trained.delete(subjects=[subject])
    assert again.deleted == () and again.already_deleted == ()
    assert again.unknown_subjects == ()
    assert again.subjects == receipt.subjects   # the same keyed digest, so a repeat is recognised
    assert again.served_version == receipt.served_version
    assert trained.status().deleted_records == len(ids)


def test_subject_deletion_after_one_of_its_records_was_deleted(trained, tiny_data):
    subject, ids = subject_with_records(tiny_data)
    trained.delete(ids=[ids[0]])
    receipt = trained.delete(subjects=[subject])
    assert receipt.deleted == tuple(ids[1:])
    assert receipt.unknown_subjects == ()


def test_unknown_subject_is_reported_as_a_digest_only(trained, tiny_data):
    name = "Jane Q. Nobody-7f3a"
    receipt = trained.delete(subjects=[name], reference="ticket-1")
    assert receipt.deleted == () and receipt.unknown == ()
    assert len(receipt.unknown_subjects) == 1 and receipt.unknown_subjects == receipt.subjects
    assert re.fullmatch(r"[0-9a-f]{64}", receipt.unknown_subjects[0])
    assert name not in json.dumps(receipt.to_dict())
    assert name not in json.dumps([r.to_dict() for r in trained.receipts()])
    assert name.encode() not in (trained.run_dir / "registry.sqlite").read_bytes()
    assert trained.status().deleted_records == 0


def test_deleted_content_does_not_survive_in_the_registry_file(trained, tiny_data):
    import sqlite3

    record = tiny_data[4]
    db = trained.run_dir / "registry.sqlite"
    con = sqlite3.connect(db)
    sealed = con.execute("select input from records where id = ?", (record.id,)).fetchone()[0]
    con.close()
    # The text is stored sealed, never in clear; its sealed bytes are there (guard: the check below can fail).
    assert record.text.encode() not in db.read_bytes() and sealed in db.read_bytes()
    trained.delete(ids=[record.id])
    assert record.text.encode() not in db.read_bytes() and sealed not in db.read_bytes()


@pytest.mark.parametrize("request_, match", [
    (dict(), r"at least one id or subject"),
    (dict(ids=[], subjects=[]), r"at least one id or subject"),
    (dict(ids="syn-1"), r"`ids` must be a list"),
    (dict(subjects="user-1"), r"`subjects` must be a list"),
    (dict(ids=[""]), r"`ids` must be a list of non-empty strings"),
    (dict(ids=[1]), r"`ids` must be a list of non-empty strings"),
    (dict(ids=["syn-1"], reference="ticket\x00"), r"`reference` must be a string without NUL"),
    (dict(ids=["syn-1"], idempotency_key="k\x00"), r"`idempotency_key` must be a string without NUL"),
])
def test_delete_rejects_malformed_requests(trained, request_, match):
    with pytest.raises(DataError, match=match):
        trained.delete(**request_)
    assert trained.receipts() == []
    assert trained.status().deleted_records == 0


def test_receipts_round_trip_from_the_ledger(trained, tiny_data):
    assert trained.receipts() == []
    subject, _ = subject_with_records(tiny_data)
    issued = [trained.delete(ids=[tiny_data[5].id], reference="ticket-1"),
              trained.delete(subjects=[subject], ids=["no-such-id"]),
              trained.delete(ids=[tiny_data[5].id])]
    stored = trained.receipts()
    assert stored == issued
    assert [r.reference for r in stored] == ["ticket-1", None, None]
    assert all(isinstance(r, s3t.Receipt) for r in stored)


# -- losing every order, then restore ------------------------------------------------------------------
def test_needs_restore_when_every_order_is_dead_then_restore(trained, tiny_plan, tiny_data):
    cells: dict[tuple[int, int], str] = {}
    for rid, cell in sorted(trained.locate(list(tiny_data.ids)).items()):
        cells.setdefault(cell, rid)
    assert len(cells) == tiny_plan.num_shards * tiny_plan.num_slices
    receipt = trained.delete(ids=sorted(cells.values()))
    assert all(s["depth_after"] == 0 for s in receipt.shards) and len(receipt.shards) == 2

    status = trained.status()
    assert status.trained and not status.serving
    assert status.truncated_orders == 4
    assert all(s.served_depth == 0 and s.served_order is None and s.live_orders == 0 for s in status.shards)
    assert status.live_records == len(tiny_data) - 4
    with pytest.raises(NeedsRestoreError, match=r"restore"):
        trained.predict(TEXTS)
    with pytest.raises(NeedsRestoreError):
        trained.predict_proba([])

    assert trained.restore(progress=False) == 4
    restored = trained.status()
    assert restored.serving and restored.truncated_orders == 0
    assert all(s.served_depth == tiny_plan.num_slices and s.live_orders == 2 for s in restored.shards)
    assert restored.served_version > status.served_version
    assert (restored.live_records, restored.deleted_records) == (len(tiny_data) - 4, 4)
    assert trained.score(tiny_data.without(list(cells.values()))) > 0.9
    # The retrained artifacts never saw the deleted records.
    served_artifacts = {a for c in trained.served()[1] for a in c["artifacts"]}
    with trained.registry.transaction() as conn:
        assert not trained.registry.tainted(conn, sorted(served_artifacts), sorted(cells.values()))


def test_create_places_risky_records_in_the_last_slice(make_run, tiny_plan):
    # Prior-aware placement through S3T.create: risky records sit in the slice every order trains last.
    rows = [{"id": r.id, "text": r.text, "label": r.label, "risk": 0.9 if i % 4 == 0 else 0.1}
            for i, r in enumerate(datasets.synthetic(48, num_labels=3, seed=4))]
    data = s3t.Dataset.from_records(rows)
    plan = tiny_plan.replace(budget=None, placement="prior_aware")
    system = make_run(plan, data)
    cells = system.locate(list(data.ids))
    assert all(cells[r.id][1] == 1 for r in data if r.risk > 0.5)
    assert cells == partition(data, seed=0, num_shards=2, num_slices=2, placement="prior_aware")
    assert {tuple(o["slices"]) for o in system.registry.orders()} == {(0, 1), (1, 0)}
