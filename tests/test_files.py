"""The run folder is private whatever the umask, the ledger key lives outside the database, locks conflict."""

from __future__ import annotations

import os
import stat

import pytest

import s3t
from s3t import datasets
from s3t.files import FileLock, shred, write_private


def modes(root) -> dict[str, int]:
    """{path relative to root: permission bits} of the root and everything under it."""
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root)) + ("/" if path.is_dir() else "")] = stat.S_IMODE(path.stat().st_mode)
    return found


@pytest.mark.parametrize("umask", [0o022, 0o000])
def test_every_folder_is_0700_and_every_file_0600_whatever_the_umask(tmp_path, tiny_plan, umask):
    data = datasets.synthetic(32, num_labels=3, seed=2)
    old = os.umask(umask)
    try:
        system = s3t.S3T.create(tmp_path / "runs" / "run", tiny_plan.replace(epochs=1), data)
        system.train(progress=False)
        system.delete(ids=[data[0].id])
        journal = system.run_dir / "registry.sqlite-journal"
        with system.registry.transaction() as conn:   # SQLite's journal exists while a write is in progress
            system.registry.set_meta(conn, "probe", "x" * 5000)
            assert journal.is_file() and stat.S_IMODE(journal.stat().st_mode) == 0o600
        run = system.run_dir
        system.close()
        s3t.S3T.open(run).close()
    finally:
        os.umask(old)
    found = modes(run)
    kinds = {name.split("/")[0] for name in found}
    assert {"registry.sqlite", "keys.bin", "ledger.key", "run.json", "artifacts", "cache", "train.lock",
            "cache.lock"} <= kinds, sorted(kinds)
    wrong = {name: oct(mode) for name, mode in found.items()
             if mode != (0o700 if name == "." or name.endswith("/") else 0o600)}
    assert not wrong, f"not private under umask {oct(umask)}: {wrong}"


def test_the_ledger_key_is_not_in_the_database(trained):
    key = (trained.run_dir / "ledger.key").read_bytes()
    assert len(key) == 32 and trained._ledger_key() == key
    db = (trained.run_dir / "registry.sqlite").read_bytes()
    assert key not in db and key.hex().encode() not in db
    assert trained.registry.get_meta("ledger_key") is None


def test_a_run_without_its_ledger_key_is_damaged(trained):
    run = trained.run_dir
    trained.close()
    (run / "ledger.key").unlink()
    with pytest.raises(s3t.RunError, match="is damaged"):
        s3t.S3T.open(run)


def test_write_private_is_atomic_and_shred_zeroes_before_unlinking(tmp_path):
    target = tmp_path / "f"
    write_private(target, b"secret")
    assert target.read_bytes() == b"secret" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["f"]
    with open(target, "rb") as still_open:   # the inode outlives the unlink: read what shred left in it
        assert shred(target) and not target.exists()
        assert still_open.read() == b"\0" * 6
    assert shred(target) is False


def test_two_locks_on_one_file_conflict_even_in_one_process(tmp_path):
    first, second = FileLock(tmp_path / "x.lock"), FileLock(tmp_path / "x.lock")
    assert first.acquire(wait=0)
    assert second.acquire(wait=0) is False and not second.held
    first.release()
    assert second.acquire(wait=0)
    second.release()
