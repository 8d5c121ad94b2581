"""The frozen-trunk cache: batch-independent values, erased on deletion, invalidated by its key."""

from __future__ import annotations

import torch

from s3t.cache import CACHE_DIR, TrunkCache, cache_key


def test_cached_value_equals_the_record_computed_alone(trained, tiny_data):
    trainer = trained.trainer
    bb, cache = trainer.backbone, trainer.cache
    rid = tiny_data[0].id
    cache.fill(bb, [r.id for r in tiny_data], lambda i: tiny_data.get(i).text)
    bb.set_depth(0)
    input_ids, mask = bb.tokenize([tiny_data[0].text])
    for boundary in cache.boundaries:
        alone = bb.trunk(input_ids, mask, boundary)[0]
        cached, cached_mask = cache.load([rid], boundary)
        assert torch.equal(cached[0], alone)
        assert torch.equal(cached_mask[0], mask[0])


def test_cache_is_shredded_on_deletion(trained, tiny_data):
    cache = trained.trainer.cache
    rid = tiny_data[4].id
    cache.fill(trained.trainer.backbone, [rid], lambda i: tiny_data.get(i).text)
    assert cache.missing([rid]) == []
    trained.delete(ids=[rid])
    assert cache.missing([rid]) == [rid]
    assert not any(p.suffix == ".tmp" for p in (trained.run_dir / CACHE_DIR).rglob("*"))


def test_cache_key_changes_with_model_length_boundaries_and_environment():
    key = dict(base_model="a" * 64, max_length=32, boundaries=[1, 0], environment="e" * 16)
    base = cache_key(**key)
    assert base == cache_key(**dict(key))
    for change in (dict(base_model="b" * 64), dict(max_length=64), dict(boundaries=[1]), dict(environment="f" * 16)):
        assert base != cache_key(**(key | change)), change


def test_a_new_key_wipes_the_stale_cache(trained, tiny_data):
    trainer = trained.trainer
    old = trainer.cache
    old.fill(trainer.backbone, [tiny_data[0].id], lambda i: tiny_data.get(i).text)
    assert old.root.is_dir()
    new_key = cache_key(base_model="another model", max_length=32, boundaries=old.boundaries, environment="e" * 16)
    fresh = TrunkCache(trained.run_dir, key=new_key, boundaries=old.boundaries)
    assert not old.root.exists()
    assert fresh.missing([tiny_data[0].id]) == [tiny_data[0].id]
