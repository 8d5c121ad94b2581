"""The numeric environment (s3t.environment): the thread count is pinned per run, and stages trained on
another numeric stack are never spliced into an order trained on this one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import s3t
from s3t import datasets, environment
from s3t.inference import shard_logits

from test_exactness import assert_same_model


@pytest.fixture
def five_labels():
    # With 5 classes the head's gradient, summed by 1 or by 2 threads, differs in its last bits on this CPU
    # (with 3 it happens not to): the setting in which an unpinned thread count changes what training gives.
    return datasets.synthetic(96, num_labels=5, num_subjects=24, seed=1)


def artifacts_of(system) -> dict[str, dict[str, torch.Tensor]]:
    return {a: system.trainer.store.load(a, system.registry.artifact(a)["sha256"])
            for c in system.served()[1] for a in c["artifacts"]}


def test_training_uses_the_run_thread_count_whatever_the_process_has(make_run, tiny_plan, five_labels):
    plan = tiny_plan.replace(num_threads=1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = make_run(plan, five_labels, name="two").train(progress=False)
        assert torch.get_num_threads() == 2   # the process gets its own setting back
        torch.set_num_threads(1)
        b = make_run(plan, five_labels, name="one").train(progress=False)
    finally:
        torch.set_num_threads(before)
    assert a.served()[1] == b.served()[1]
    assert_same_model(a, b, a.served()[1], list(five_labels.texts[:8]))


def test_the_thread_count_changes_the_bits_so_it_is_part_of_the_lineage(make_run, tiny_plan, five_labels):
    """Why pinning matters: the same data with 1 and with 2 threads trains to different bits, and the two
    runs name their stages differently, so neither could pass for the other's."""
    one = make_run(tiny_plan.replace(num_threads=1), five_labels, name="one").train(progress=False)
    two = make_run(tiny_plan.replace(num_threads=2), five_labels, name="two").train(progress=False)
    ta, tb = artifacts_of(one), artifacts_of(two)
    assert not ta.keys() & tb.keys()
    pairs = zip(sorted(ta.values(), key=lambda t: sorted(t)), sorted(tb.values(), key=lambda t: sorted(t)))
    assert any(not torch.equal(x[k], y[k]) for x, y in pairs for k in x)


def other_machine(monkeypatch):
    """Pretend this process runs on a CPU whose kernels differ (another vector instruction set)."""
    torch_version, transformers_version, peft_version, _capability = environment._stack()
    monkeypatch.setattr(environment, "_stack", lambda: (torch_version, transformers_version, peft_version, "OTHER"))


def test_a_restore_in_another_environment_retrains_whole_orders(make_run, tiny_plan, tiny_data, monkeypatch):
    trained = make_run(tiny_plan, tiny_data, name="trained").train(progress=False)
    here = trained.environment().fingerprint
    victim = tiny_data[5].id
    shard, _ = trained.locate([victim])[victim]
    trained.delete(ids=[victim])
    untouched = {(o["shard"], o["position"]): o["artifacts"] for o in trained.registry.orders() if o["shard"] != shard}
    kept_prefixes = {a for o in trained.registry.orders(shards=[shard]) for a in o["artifacts"][:o["depth"]]}
    assert kept_prefixes, "the deletion should leave a trained prefix that a splice could reuse"

    other_machine(monkeypatch)
    moved = s3t.S3T.open(trained.run_dir)
    there = moved.environment().fingerprint
    assert there != here
    moved.restore(progress=False)

    envs = {a: moved.registry.artifact(a)["environment"] for o in moved.registry.orders() for a in o["artifacts"]}
    for o in moved.registry.orders():
        assert len({envs[a] for a in o["artifacts"]}) == 1, f"order {o['position']} of shard {o['shard']} is spliced"
        if o["shard"] == shard:
            assert {envs[a] for a in o["artifacts"]} == {there} and not kept_prefixes & set(o["artifacts"])
        else:
            assert o["artifacts"] == untouched[o["shard"], o["position"]]
    assert set(moved.registry.environments()) == {here, there}

    # ... and what it restored is exactly a fresh training there on the reduced data.
    fresh = make_run(trained.plan, tiny_data.without([victim]), name="fresh").train(progress=False)
    restored = [c for c in moved.served()[1] if c["shard"] == shard]
    assert restored == [c for c in fresh.served()[1] if c["shard"] == shard]
    mine, theirs = artifacts_of(moved), artifacts_of(fresh)
    for lineage in {a for c in restored for a in c["artifacts"]}:
        assert all(torch.equal(mine[lineage][k], theirs[lineage][k]) for k in mine[lineage])
    texts = list(tiny_data.texts[:8])
    logits = [shard_logits(s.trainer.model, restored, texts, load=s.trainer.load, batch_size=8) for s in (moved, fresh)]
    assert np.array_equal(*logits)
    moved.close()


def test_environment_fingerprint_names_every_field():
    env = environment.current(threads=2)
    assert env == environment.current(threads=2) and env.fingerprint == environment.current(threads=2).fingerprint
    assert env.fingerprint != environment.current(threads=1).fingerprint
    assert env.differences(environment.current(threads=1)) == ["threads: 2 -> 1"]
    assert set(env.to_dict()) == {"torch", "transformers", "peft", "device", "cpu_capability", "dtype", "threads"}
