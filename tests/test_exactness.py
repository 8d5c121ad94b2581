"""The exactness contract, bit for bit: after deletions the served model IS the model a from-scratch
training on the reduced data produces (truncated the same way), and after restore() it is that
training's full-depth model. Compared with torch.equal / numpy.array_equal, never closeness. The suites that
take `case` run for every classifying family: the text encoder and the ViT (images)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from s3t.environment import pinned
from s3t.inference import aggregate, shard_logits

# The contract holds whichever database keeps the registry: the full cycle (deletions, then restore, each
# compared with fresh training) runs on PostgreSQL too; the other tests exercise training and truncation
# logic that no database query decides differently.


def served_tensors(system, components):
    """The tensors of every served artifact, loaded from the system's own store (hash-verified)."""
    return {a: system.trainer.store.load(a, system.registry.artifact(a)["sha256"])
            for c in components for a in c["artifacts"]}


def assert_same_model(a, b, components, texts):
    """`b`'s own artifacts for `components` equal `a`'s, and so do the resulting probabilities (of `texts`: the
    runs' model inputs, texts or images)."""
    ta, tb = served_tensors(a, components), served_tensors(b, components)
    assert ta.keys() == tb.keys() and ta
    for lineage in ta:
        assert ta[lineage].keys() == tb[lineage].keys()
        for name in ta[lineage]:
            assert torch.equal(ta[lineage][name], tb[lineage][name]), (lineage, name)
    pa = a.predict_proba(texts)
    with pinned(b.trainer.environment):   # the run's thread count, as predict_proba runs with
        logits_b = shard_logits(b.trainer.model, components, texts, load=b.trainer.load, batch_size=64)
    assert np.array_equal(pa, aggregate(logits_b, b.plan.aggregation))


@pytest.mark.parametrize("method,database", [("s3t", "sqlite"), ("sisa", "sqlite"), ("s3t", "postgresql")],
                         indirect=["database"])
def test_deletions_then_restore_equal_fresh_training_on_reduced_data(method, database, make_run, case):
    tiny_plan, tiny_data = case.plan.replace(method=method), case.data
    trained = make_run(tiny_plan, tiny_data, name="trained").train(progress=False)
    rng = random.Random(7)
    deleted = rng.sample(list(tiny_data.ids), 3)
    subject = next(r.subject for r in tiny_data if r.id not in deleted and r.subject)
    deleted += [r.id for r in tiny_data if r.subject == subject and r.id not in deleted]
    trained.delete(ids=deleted[:2])
    trained.delete(ids=deleted[2:3])
    trained.delete(subjects=[subject])

    torch.manual_seed(12345)   # global RNG state must not matter: seeds come from the lineage
    fresh = make_run(tiny_plan, tiny_data.without(deleted), name="fresh")
    fresh.train(progress=False)

    texts = case.probe
    _, truncated = trained.served()
    assert any(c["depth"] < tiny_plan.num_slices for c in truncated), "the deletions should truncate something"
    assert_same_model(trained, fresh, truncated, texts)

    trained.restore(progress=False)
    _, restored = trained.served()
    assert restored == fresh.served()[1]
    assert all(c["depth"] == tiny_plan.num_slices for c in restored)
    assert_same_model(trained, fresh, restored, texts)
    assert np.array_equal(trained.predict_proba(texts), fresh.predict_proba(texts))


def test_served_model_differs_from_undeleted_model(trained, trained_dir, tiny_data):
    """Guard against a vacuous equality: deleting changes what is served."""
    import s3t

    original = s3t.S3T.open(trained_dir)
    texts = list(tiny_data.texts[:10])
    before = original.predict_proba(texts)
    victim = tiny_data[0].id
    trained.delete(ids=[victim])
    assert not np.array_equal(before, trained.predict_proba(texts))
    original.close()


def test_same_lineage_trains_to_identical_bits(make_run, case):
    a = make_run(case.plan, case.data, name="a").train(progress=False)
    torch.manual_seed(999)
    b = make_run(case.plan, case.data, name="b").train(progress=False)
    components = a.served()[1]
    assert components == b.served()[1]
    assert_same_model(a, b, components, case.probe[:8])


def test_deleting_every_record_of_a_label_equals_fresh_training_with_the_same_plan(make_run, tiny_plan, tiny_data):
    """The label space belongs to the plan: a label whose records are all deleted keeps its column, so the
    served model still equals a fresh training (with the stored plan) on data that lacks the label."""
    import s3t

    rare = [s3t.Record(id=f"rare-{k}", text=f"a rare topic number {k} about comets", label="label-rare")
            for k in range(2)]
    data = s3t.Dataset(list(tiny_data) + rare)
    trained = make_run(tiny_plan, data, name="trained").train(progress=False)
    assert "label-rare" in trained.labels
    trained.delete(ids=[r.id for r in rare])
    fresh = make_run(trained.plan, data.without([r.id for r in rare]), name="fresh").train(progress=False)
    assert fresh.labels == trained.labels

    texts = list(tiny_data.texts[:12]) + ["comets again"]
    assert_same_model(trained, fresh, trained.served()[1], texts)
    assert trained.predict_proba(texts).shape == (len(texts), len(trained.labels))
    trained.restore(progress=False)
    assert trained.served()[1] == fresh.served()[1]
    assert_same_model(trained, fresh, trained.served()[1], texts)


@pytest.mark.parametrize("emptied", ["shard", "first slice"])
def test_emptied_data_is_never_trained_or_served_and_equals_fresh_training(emptied, make_run, tiny_plan, tiny_data):
    """Delete every record of a shard (or of one slice): restore() must not train on nothing; the result is
    what a fresh training on the reduced data gives (orders starting on an empty slice are never trained)."""
    trained = make_run(tiny_plan, tiny_data, name="trained").train(progress=False)
    where = trained.locate(list(tiny_data.ids))
    victims = [i for i, (shard, slice_) in where.items() if shard == 0 and (emptied == "shard" or slice_ == 0)]
    trained.delete(ids=victims)
    trained.restore(progress=False)
    fresh = make_run(trained.plan, tiny_data.without(victims), name="fresh").train(progress=False)

    st = trained.status()
    assert st.truncated_orders == 0 and st.shards == fresh.status().shards
    _, components = trained.served()
    assert components == fresh.served()[1]
    if emptied == "shard":
        assert [c["shard"] for c in components] == [1] and st.shards[0].served_depth == 0
    else:   # the order that starts on slice 1 trains stage 2 on slice 1 alone; the one starting on slice 0 is dead
        shard0 = {o["slices"]: o["depth"] for o in trained.registry.orders(shards=[0])}
        assert shard0 == {(0, 1): 0, (1, 0): 2}
    texts = list(tiny_data.texts[:12])
    assert_same_model(trained, fresh, components, texts)
    assert np.array_equal(trained.predict_proba(texts), fresh.predict_proba(texts))
