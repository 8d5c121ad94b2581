"""`S3T.sweep` and the training lock: what a crash leaves on disk is shredded at open, at the end of every
rebuild and at service start; unregistered files only while nobody trains the run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import s3t
from s3t.files import FileLock
from s3t.store import ArtifactStore
from s3t.system import ARTIFACTS_DIR, TRAIN_LOCK


def watch(paths):
    """Open each file now; after an unlink, `shredded(handles)` reads what was left in its inode."""
    return [open(p, "rb") for p in paths]


def shredded(handles) -> bool:
    """True if every watched file is unlinked and was overwritten with zeros first."""
    ok = True
    for f in handles:
        f.seek(0)
        data = f.read()
        ok &= not os.path.exists(f.name) and len(data) > 0 and data == bytes(len(data))
        f.close()
    return ok


def registered_files_intact(system) -> bool:
    store = ArtifactStore(system.run_dir / ARTIFACTS_DIR)
    with system.registry.engine.connect() as conn:
        rows = conn.exec_driver_sql("select lineage, sha256 from artifacts").all()
    return bool(rows) and all(store.verify(lineage, sha) for lineage, sha in rows)


CRASH_IN_REGISTER = textwrap.dedent("""
    import os, sys
    import s3t
    from s3t.registry import Registry

    def die(self, conn, **kwargs):   # the stage file is saved; the process dies before its row is written
        os._exit(9)

    Registry.add_artifact = die
    s3t.S3T.open(sys.argv[1]).restore(progress=False)
""")


def test_a_stage_saved_before_a_crash_cut_its_registration_is_shredded_at_open(trained, tiny_data):
    trained.delete(ids=[tiny_data[5].id])   # gives restore work to do
    run = trained.run_dir
    before = set((run / ARTIFACTS_DIR).rglob("*.safetensors"))
    trained.close()
    done = subprocess.run([sys.executable, "-c", CRASH_IN_REGISTER, str(run)], env=dict(os.environ, HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 9, done.stderr[-2000:]
    orphans = sorted(set((run / ARTIFACTS_DIR).rglob("*.safetensors")) - before)
    assert len(orphans) == 1, "guard: the crash left one stage file without its row"
    handles = watch(orphans)

    system = s3t.S3T.open(run)
    assert shredded(handles)
    assert registered_files_intact(system)
    system.close()


def test_temp_files_and_cached_states_of_no_live_record_are_shredded_at_open(trained, tiny_data):
    run = trained.run_dir
    victim = tiny_data[6].id
    trained.delete(ids=[victim])
    artifact = next((run / ARTIFACTS_DIR).rglob("*.safetensors"))
    cached = next((run / "cache").rglob("*.sealed"))
    leftovers = [artifact.parent / ".tmp-interrupted", cached.parent / ".tmp-interrupted",
                 cached.parent / ("0" * 64 + ".sealed")]   # a cached state no live record owns
    for path in leftovers:
        path.write_bytes(b"weights or states of some record")
    handles = watch(leftovers)
    live_cache = sorted((run / "cache").rglob("*.sealed"))
    trained.close()

    system = s3t.S3T.open(run)
    assert shredded(handles)
    assert sorted((run / "cache").rglob("*.sealed")) == [p for p in live_cache if p not in leftovers]
    assert registered_files_intact(system)
    system.close()


def _retire_without_shredding(system, record_id):
    """A deletion that commits, then dies before shredding the stages it retired: they stay queued."""
    from s3t.unlearning import delete

    receipt = delete(system.registry, system._ledger_key(), ids=[record_id])
    files = [ArtifactStore(system.run_dir / ARTIFACTS_DIR).path(h) for h in receipt.retired_artifacts]
    assert files and all(f.is_file() for f in files) and system.registry.retired()
    return watch(files)


def test_retired_stages_are_shredded_at_open(trained, tiny_data):
    handles = _retire_without_shredding(trained, tiny_data[5].id)
    trained.close()
    system = s3t.S3T.open(trained.run_dir)
    assert shredded(handles) and system.registry.retired() == []
    system.close()


def test_retired_stages_are_shredded_at_service_start(trained, tiny_data):
    from s3t.service import Service, ServiceSettings

    service = Service(trained.run_dir, ServiceSettings(worker=False, preload=False))
    try:
        handles = _retire_without_shredding(service.system, tiny_data[5].id)
        service.start()
        assert shredded(handles) and service.system.registry.retired() == []
    finally:
        service.close()


def test_while_another_process_trains_the_sweep_leaves_unregistered_files_but_drains_the_queue(trained, tiny_data):
    run = trained.run_dir
    handles = _retire_without_shredding(trained, tiny_data[5].id)
    artifact = next((run / ARTIFACTS_DIR).rglob("*.safetensors"))
    in_flight = artifact.parent / ".tmp-being-saved"   # a trainer's save in progress
    in_flight.write_bytes(b"a stage being written")
    trainer = FileLock(run / TRAIN_LOCK)
    assert trainer.acquire(wait=0)
    try:
        assert trained.sweep() == len(handles)
        assert shredded(handles) and in_flight.is_file()
    finally:
        trainer.release()
    # Now: the temp file, and the deleted record's cached state (the bare `delete` above left it).
    assert trained.sweep() == 2 and not in_flight.exists()


def test_only_one_process_trains_a_run(trained, tiny_data, monkeypatch):
    from s3t.service import worker

    trained.delete(ids=[tiny_data[5].id])
    monkeypatch.setattr("s3t.system.TRAIN_LOCK_WAIT_S", 0.0)
    monkeypatch.setattr(os, "nice", lambda n: 0)   # worker.main lowers its own priority: not this process's
    other = FileLock(trained.run_dir / TRAIN_LOCK)
    assert other.acquire(wait=0)
    try:
        with pytest.raises(s3t.RunBusyError, match="another process is training"):
            trained.restore(progress=False)
        assert worker.main([str(trained.run_dir)]) == worker.BUSY
    finally:
        other.release()
    assert trained.status().truncated_orders > 0
