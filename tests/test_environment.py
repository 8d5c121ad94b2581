"""The numeric environment (s3t.environment): the thread count is pinned per run, the device (with the GPU's
name and compute capability) and dtype are recorded, and stages trained on another numeric stack are never
spliced into an order trained on this one."""

from __future__ import annotations

import dataclasses

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


# -- devices and dtypes ----------------------------------------------------------------------------
def test_device_and_dtype_are_recorded_and_change_the_fingerprint(monkeypatch):
    cpu = environment.current(threads=1)
    assert (cpu.device, cpu.dtype) == ("cpu", "float32")
    bf16 = environment.current(threads=1, dtype="bfloat16")
    assert bf16.fingerprint != cpu.fingerprint and cpu.differences(bf16) == ["dtype: float32 -> bfloat16"]
    # a GPU is named with its model and compute capability: stages from an H100 never pass for an A100's
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    environment._device_name.cache_clear()
    try:
        gpu = environment.current(threads=1, device="cuda")
    finally:
        environment._device_name.cache_clear()
    assert gpu.device == "cuda NVIDIA H100 80GB HBM3 sm_90" and gpu.fingerprint != cpu.fingerprint


def test_device_resolution(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert environment.resolve_device("auto") == environment.resolve_device("cpu") == "cpu"
    with pytest.raises(s3t.PlanError, match=r"`device` = 'cuda', but this process sees no CUDA device"):
        environment.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert environment.resolve_device("auto") == environment.resolve_device("cuda") == "cuda"
    assert environment.resolve_device("cpu") == "cpu"
    import os

    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")   # set by `import s3t.models` at the latest


def test_pinned_turns_deterministic_algorithms_on_for_cuda_only_and_back_off():
    cpu = environment.current(threads=1)
    cuda = dataclasses.replace(cpu, device="cuda NVIDIA X sm_90")
    assert not torch.are_deterministic_algorithms_enabled()
    with environment.pinned(cpu):
        assert not torch.are_deterministic_algorithms_enabled()
    with environment.pinned(cuda):
        assert torch.are_deterministic_algorithms_enabled()
    assert not torch.are_deterministic_algorithms_enabled()


def test_bfloat16_runs_are_bit_identical_and_never_pass_for_float32_ones(make_run, tiny_image_plan, tiny_image_data,
                                                                          tiny_plan, tiny_data):
    """bf16 on the CPU: two runs with the same plan give the same bits (text encoder and ViT); a float32 run of
    the same data has other lineages (the dtype is in the environment) and other weights."""
    for family, plan, data in (("image", tiny_image_plan, tiny_image_data), ("text", tiny_plan, tiny_data)):
        plan = plan.replace(dtype="bfloat16", num_threads=1, epochs=1)
        a = make_run(plan, data, name=f"{family}-a").train(progress=False)
        torch.manual_seed(5)
        b = make_run(plan, data, name=f"{family}-b").train(progress=False)
        assert a.environment().dtype == "bfloat16" and a.trainer.model.model.dtype == torch.bfloat16
        assert a.served()[1] == b.served()[1]
        assert_same_model(a, b, a.served()[1], list(data.inputs[:8]))
        fp32 = make_run(plan.replace(dtype="float32"), data, name=f"{family}-fp32").train(progress=False)
        ta, tf = artifacts_of(a), artifacts_of(fp32)
        assert ta and not ta.keys() & tf.keys()
        assert all(t.dtype == torch.float32 for tensors in ta.values() for t in tensors.values())   # adapters, head
        assert not np.array_equal(a.predict_proba(list(data.inputs[:8])), fp32.predict_proba(list(data.inputs[:8])))
