"""Crypto-shredding: content sealed under per-record keys; a deletion destroys the key, crash or not."""

from __future__ import annotations

import hashlib
import sqlite3
import struct

import pytest

import s3t
from s3t.keystore import HEADER, SLOT, KeyDestroyed, KeyStore, aad, seal, unseal


def slot_bytes(run_dir, slot: int) -> bytes:
    """The raw bytes of one key slot, read straight from the file (no s3t code involved)."""
    with open(run_dir / "keys.bin", "rb") as f:
        f.seek(HEADER + slot * SLOT)
        return f.read(SLOT)


def cache_name(record_id: str) -> str:
    return hashlib.sha256(record_id.encode()).hexdigest()


def every_byte(run_dir) -> bytes:
    """Everything under the run folder: database (and any journal), key file, cache, artifacts, run.json."""
    return b"".join(p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file())


def test_keys_seal_and_are_destroyed_in_place(tmp_path):
    keys = KeyStore.create(tmp_path / "keys.bin")
    first, second = keys.allocate(2)
    blob = seal(keys.key(first), b"some text", aad("record", "r1", "text"))
    assert unseal(keys.key(first), blob, aad("record", "r1", "text")) == b"some text"
    with pytest.raises(s3t.IntegrityError):   # bound to its record and field
        unseal(keys.key(first), blob, aad("record", "r2", "text"))
    size = (tmp_path / "keys.bin").stat().st_size
    assert keys.destroy([first]) == 1 and keys.destroy([first]) == 0
    assert (tmp_path / "keys.bin").stat().st_size == size, "destroyed in place, not appended or rewritten"
    assert slot_bytes(tmp_path, first) == bytes(SLOT) and slot_bytes(tmp_path, second) != bytes(SLOT)
    with pytest.raises(KeyDestroyed):
        keys.key(first)
    assert keys.keys([first, second, 99]) == {first: None, second: keys.key(second), 99: None}
    keys.close()
    again = KeyStore.open(tmp_path / "keys.bin")
    assert len(again) == 2 and again.live_slots() == {second}
    again.close()
    (tmp_path / "bad.bin").write_bytes(b"not keys" + struct.pack("<II", 1, 32))
    with pytest.raises(ValueError, match="not an s3t key file"):
        KeyStore.open(tmp_path / "bad.bin")


def test_after_deletion_the_key_slot_is_zero_and_nothing_under_the_run_decrypts_the_text(trained, tiny_data):
    victim = tiny_data[7]
    run = trained.run_dir
    slot = trained.registry.key_slots([victim.id])[victim.id]
    key = trained.registry.keys.key(slot)
    con = sqlite3.connect(run / "registry.sqlite")
    sealed_text, sealed_label = con.execute("select input, target from records where id = ?", (victim.id,)).fetchone()
    con.close()
    cached, = (run / "cache").rglob(cache_name(victim.id) + "*")   # its sealed hidden states, from training
    # Guards: the content is really stored, sealed under this key, and the key is in the key file.
    assert unseal(key, sealed_text, aad("record", victim.id, "input")).decode() == victim.text
    assert unseal(key, sealed_label, aad("record", victim.id, "target")).decode() == victim.label
    assert cached.is_file() and key in every_byte(run) and sealed_text in every_byte(run)

    trained.delete(ids=[victim.id])
    trained.close()

    assert slot_bytes(run, slot) == bytes(SLOT), "the record's key slot is not zeroed"
    everything = every_byte(run)
    assert key not in everything, "the deleted record's key survives under the run folder"
    assert victim.text.encode() not in everything
    assert sealed_text not in everything and not cached.exists()
    reopened = s3t.S3T.open(run)
    with pytest.raises(KeyDestroyed):
        reopened.registry.keys.key(slot)
    reopened.close()


class Crash(BaseException):
    """The process dies here (nothing after this point runs)."""


def test_a_crash_between_commit_and_key_destruction_is_finished_at_the_next_open(trained, tiny_data, monkeypatch):
    victim = tiny_data[9]
    run = trained.run_dir
    slot = trained.registry.key_slots([victim.id])[victim.id]

    def die(self, slots):
        raise Crash

    monkeypatch.setattr(KeyStore, "destroy", die)
    with pytest.raises(Crash):
        trained.delete(ids=[victim.id])
    monkeypatch.undo()
    assert trained.registry.locate([victim.id])[victim.id][2] is True, "the deletion committed"
    assert slot_bytes(run, slot) != bytes(SLOT), "guard: the crash left the key alive"
    trained.close()

    reopened = s3t.S3T.open(run)   # first thing after open: the key is gone
    assert slot_bytes(run, slot) == bytes(SLOT)
    reopened.close()


def test_a_key_allocated_by_a_rolled_back_transaction_is_destroyed_with_the_rollback(trained):
    """Destroyed before the write lock is released (a process that dies first leaves it to the sweep at
    open: `S3T.open` destroys every allocated slot no committed row refers to)."""
    class Rollback(Exception):
        pass

    before = len(trained.registry.keys)
    with pytest.raises(Rollback):
        with trained.registry.transaction() as conn:
            trained.registry.add_flagged(conn, id="f1", action="hold", status="pending", reason="test",
                                         request='{"ids": ["a"], "subjects": [], "reference": null}')
            assert slot_bytes(trained.run_dir, before) != bytes(SLOT)   # allocated, sealing the request
            raise Rollback
    assert len(trained.registry.keys) == before + 1
    assert slot_bytes(trained.run_dir, before) == bytes(SLOT)

    crashed, = trained.registry.keys.allocate(1)   # as a process that died inside its transaction leaves it
    trained.close()
    s3t.S3T.open(trained.run_dir).close()
    assert slot_bytes(trained.run_dir, crashed) == bytes(SLOT)


@pytest.mark.parametrize("decision", ["apply", "reject"])
def test_a_held_request_is_sealed_and_its_key_destroyed_by_the_decision(trained, tiny_data, decision):
    from s3t.service import review

    name, rid = "Jane Q. Heldperson", tiny_data[11].id
    flag = trained.deletions.submit(lambda batch: review.hold(
        trained, batch, token_id="tok", ids=[rid], subjects=[name], reference="ticket-9", reason="test",
        idempotency_key="k")).result()
    assert flag.ids == (rid,) and flag.subjects == 1   # readable while pending
    row, = trained.registry.flagged(flag_id=flag.id)
    slot = row["key_slot"]
    db = (trained.run_dir / "registry.sqlite").read_bytes()
    assert name.encode() not in db and b"ticket-9" not in db, "held content is stored in clear"
    assert slot_bytes(trained.run_dir, slot) != bytes(SLOT)

    if decision == "apply":
        review.apply(trained, flag.id, decided_by="admin")
    else:
        review.reject(trained, flag.id, decided_by="admin")
    assert slot_bytes(trained.run_dir, slot) == bytes(SLOT)
    decided = review.get_flag(trained, flag.id)
    assert decided.status == ("applied" if decision == "apply" else "rejected") and decided.ids == ()
