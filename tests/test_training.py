"""Training stages: isolation between layer groups, blocks chosen by index, LoRA really learns (text encoder
and ViT alike: the tests taking `trained_case` run once per classifying family)."""

from __future__ import annotations

import torch

import s3t
from s3t.lineage import epoch_order
from s3t.records import from_payload


def test_groups_are_selected_by_block_index_top_down(tiny_model):
    plan = s3t.Plan(num_slices=2, base_model=tiny_model)
    from s3t.models import load_model, resolve_model_path

    bb = load_model(resolve_model_path(tiny_model), num_groups=2, blocks_per_group=1, num_labels=3, max_length=16,
                    lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_targets=plan.lora_targets)
    assert bb.group_blocks == {1: [1], 2: [0]}   # group 1 is the top block
    for group, blocks in bb.group_blocks.items():
        names = bb.group_state(group)
        assert names and all(f"layer.{blocks[0]}." in n for n in names)
        assert len(names) == 4   # lora_A and lora_B of query and value


def _stage_inputs(trained, shard):
    """The shard's live members and label targets, with the trunk cache filled for them."""
    trainer = trained.trainer
    members, rows = trained.registry.live_shard(shard)
    records = {i: from_payload(trainer.kind, i, content) for i, content in rows.items()}
    trainer.cache.fill(trainer.model, sorted(records), lambda i: records[i].model_input)
    return members, {i: trained.labels.index(r.label) for i, r in records.items()}


def test_stage_changes_only_its_group_and_head(trained_case):
    trained, _data = trained_case
    trainer = trained.trainer
    order = trained.registry.orders(shards=[0])[0]
    members, targets = _stage_inputs(trained, 0)
    lineages = trainer.lineages(order["slices"], members)
    stage1 = trainer.load(lineages[0])
    result = trainer.train_stage(stage=2, lineage="f" * 64, parents=lineages[:1], ids=sorted(targets),
                                 targets=targets)
    bb = trainer.model
    # group 1 in the backbone still holds exactly stage 1's values
    for name, value in bb.group_state(1).items():
        assert torch.equal(value, stage1[name])
    # the result holds group 2 and the head only, and group 2 moved away from its zero-initialised B
    assert set(result.tensors) == set(bb.group_state(2)) | {"head.weight", "head.bias"}   # a stage's artifact
    assert any(t.abs().sum() > 0 for n, t in result.tensors.items() if "lora_B" in n)
    # the frozen backbone is untouched: only LoRA and head parameters exist as trainables at all
    bb.set_active(2, train_group=2)
    trainable = {n for n, p in bb.named_parameters() if p.requires_grad}
    assert trainable == {"model." + n for n in bb.group_state(2)} | {"heads.0.weight", "heads.0.bias"}
    bb.set_active(0)


def test_lora_trains_and_loss_falls(trained_case):
    trained, _data = trained_case
    trainer = trained.trainer
    _, targets = _stage_inputs(trained, 1)
    trainer.epochs = 6
    try:
        result = trainer.train_stage(stage=1, lineage="e" * 64, parents=[], ids=sorted(targets), targets=targets)
    finally:
        trainer.epochs = trained.plan.epochs
    losses = result.epoch_losses
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0], losses


def test_epoch_order_depends_on_ids_not_positions():
    ids = [f"r{i}" for i in range(50)]
    full = epoch_order(ids, seed=3, epoch=0)
    reduced = epoch_order([i for i in reversed(ids) if i != "r7"], seed=3, epoch=0)
    assert reduced == [i for i in full if i != "r7"]
    assert epoch_order(ids, seed=3, epoch=1) != full


def test_interrupted_training_resumes_with_identical_artifacts(make_run, tiny_plan, tiny_data, trained_dir):
    import numpy as np

    system = make_run(tiny_plan, tiny_data, name="resume")
    calls = {"n": 0}
    original = system.trainer.register

    def crash_after_three(*args, **kwargs):
        if calls["n"] == 3:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(*args, **kwargs)

    system.trainer.register = crash_after_three
    try:
        system.train(progress=False)
    except KeyboardInterrupt:
        pass
    system.trainer.register = original
    assert system.trainer.pending(0, system.registry.orders(shards=[0])) + \
        system.trainer.pending(1, system.registry.orders(shards=[1])) > 0
    system.train(progress=False)
    reference = s3t.S3T.open(trained_dir)
    texts = list(tiny_data.texts[:10])
    assert system.served()[1] == reference.served()[1]
    assert np.array_equal(system.predict_proba(texts), reference.predict_proba(texts))
    reference.close()
