"""The frozen-trunk cache: batch-independent values, erased on deletion, invalidated by its key."""

from __future__ import annotations

import hashlib
import threading

import pytest
import torch

from s3t.cache import CACHE_DIR, CacheMiss, TrunkCache, cache_key, erase_records
from s3t.environment import pinned


def test_cached_value_equals_the_record_computed_alone(trained_case):
    trained, tiny_data = trained_case
    trainer = trained.trainer
    bb, cache = trainer.model, trainer.cache
    rid = tiny_data[0].id
    cache.fill(bb, [r.id for r in tiny_data], lambda i: tiny_data.get(i).model_input)
    bb.set_active(0)
    batch = bb.prepare([tiny_data[0].model_input])
    for boundary in cache.boundaries:
        with torch.no_grad(), pinned(trainer.environment):   # the run's thread count, as the fill runs with
            alone = bb.run_blocks(bb.embed(batch), batch, 0, boundary)[0]
        cached, aux = cache.load([rid], boundary)
        assert torch.equal(cached[0], alone)
        assert set(aux) == set(bb.aux_fields)
        for field in bb.aux_fields:
            assert torch.equal(aux[field][0], batch[field][0])


def test_cache_is_shredded_on_deletion(trained_case):
    trained, tiny_data = trained_case
    cache = trained.trainer.cache
    rid = tiny_data[4].id
    cache.fill(trained.trainer.model, [rid], lambda i: tiny_data.get(i).model_input)
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
    old.fill(trainer.model, [tiny_data[0].id], lambda i: tiny_data.get(i).text)
    assert old.root.is_dir()
    new_key = cache_key(base_model="another model", max_length=32, boundaries=old.boundaries, environment="e" * 16)
    fresh = TrunkCache(trained.run_dir, key=new_key, boundaries=old.boundaries, registry=trained.registry)
    assert not old.root.exists()
    assert fresh.missing([tiny_data[0].id]) == [tiny_data[0].id]


def cached_files(run_dir, record_id: str) -> list:
    """Every file under the run's cache named after this record (whatever its suffix or cache key)."""
    name = hashlib.sha256(record_id.encode()).hexdigest()
    return sorted((run_dir / CACHE_DIR).rglob(f"{name}*"))


def test_a_deletion_committed_while_fill_computes_a_batch_leaves_no_cached_state(trained, tiny_data, monkeypatch):
    trainer = trained.trainer
    cache, bb = trainer.cache, trainer.model
    victim, other = tiny_data[12].id, tiny_data[13].id
    erase_records(trained.run_dir, [victim, other])   # cold: the fill below computes both
    run_blocks, raced = bb.run_blocks, []

    def delete_mid_batch(*args, **kwargs):   # the batch is being computed from the victim's text
        if not raced:
            raced.append(trained.delete(ids=[victim]))
            assert cached_files(trained.run_dir, victim) == []   # acknowledged with no copy behind
        return run_blocks(*args, **kwargs)

    monkeypatch.setattr(bb, "run_blocks", delete_mid_batch)
    cache.fill(bb, [victim, other], lambda i: tiny_data.get(i).text)
    assert raced and raced[0].deleted == (victim,)
    assert cached_files(trained.run_dir, victim) == [], "the fill wrote a state the deletion had erased"
    assert len(cached_files(trained.run_dir, other)) == 1 and cache.missing([other]) == []


def test_a_deletion_waiting_on_a_fills_write_shreds_what_it_wrote(trained, tiny_data, monkeypatch):
    import s3t.cache as cache_module

    trainer = trained.trainer
    cache, bb = trainer.cache, trainer.model
    victim = tiny_data[14].id
    erase_records(trained.run_dir, [victim])
    write_private, started, receipts = cache_module.write_private, threading.Event(), []

    def deletion():
        started.set()
        receipts.append(trained.delete(ids=[victim]))   # reaches the cache lock while the fill holds it

    def write_then_let_the_deletion_in(path, data, **kwargs):
        # The fill checked the victim is live and holds the cache lock: the deletion must wait for it.
        thread = threading.Thread(target=deletion)
        thread.start()
        threads.append(thread)
        assert started.wait(60)
        write_private(path, data, **kwargs)

    threads: list = []
    monkeypatch.setattr(cache_module, "write_private", write_then_let_the_deletion_in)
    cache.fill(bb, [victim], lambda i: tiny_data.get(i).text)
    threads[0].join(60)
    assert receipts and receipts[0].deleted == (victim,)
    assert cached_files(trained.run_dir, victim) == []
    with pytest.raises(CacheMiss):
        cache.load([victim], cache.boundaries[0])


def test_a_record_added_again_is_read_under_its_new_key_by_a_cache_that_knew_the_old(trained, tiny_data):
    """Deleted, then added again with `replace_deleted`: the record is sealed under a new key slot. A cache
    object that read it before (a Ray worker's, kept between tasks) must find the new key, not miss."""
    import s3t

    victim = tiny_data[4]
    trainer = trained.trainer
    shard = trained.locate([victim.id])[victim.id][0]
    trainer.prepare(shard)   # fills the cache of the shard's records
    boundary = trainer.cache.boundaries[0]
    before, _ = trainer.cache.load([victim.id], boundary)
    worker = TrunkCache(trained.run_dir, key=trainer.cache.name, boundaries=trainer.cache.boundaries,
                        registry=trained.registry)
    worker.load([victim.id], boundary)   # remembers the record's key slot
    trained.delete(ids=[victim.id])
    with pytest.raises(CacheMiss):
        worker.load([victim.id], boundary)
    trained.add(s3t.Dataset([victim]), replace_deleted=True)
    trainer.prepare(shard)   # another process fills it again, under the new key
    after, _ = worker.load([victim.id], boundary)
    assert torch.equal(after, before)
