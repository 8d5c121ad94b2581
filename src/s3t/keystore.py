"""Crypto-shredding: content sealed under per-record keys, and keys that can be destroyed for good.

Ciphertext can outlive a deletion where s3t cannot overwrite it: SQLite's rollback journal copies a page
before changing it and unlinks that copy without zeroing it, and a filesystem may keep freed blocks. So
every record's content (and its cached hidden states) is sealed with AES-GCM under a key of its own, and
a deletion destroys that key: every copy of the ciphertext, wherever it lingers, becomes noise.

The keys live in their own file, `keys.bin`, never in the database (a journaled table would leak a key
the way it leaks the text): a 16-byte header, then one 32-byte slot per key. Destroying a key overwrites
its slot with zeros in place and fsyncs the file; a zero slot reads as destroyed. Slots are never reused.

    keys = KeyStore.create(run_dir / "keys.bin")
    slot, = keys.allocate(1)
    blob = seal(keys.key(slot), b"some text", aad("record", "r1", "text"))
    keys.destroy([slot])          # from here on, nothing can unseal `blob`
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import IntegrityError
from .files import FILE_MODE, fsync_dir

__all__ = ["KeyStore", "KeyDestroyed", "aad", "seal", "unseal"]

MAGIC = b"S3TKEYS\0"
VERSION = 1
SLOT = 32                                        # an AES-256 key
HEADER = len(MAGIC) + 8                          # magic, version, slot size
NONCE = 12                                       # AES-GCM's 96-bit nonce, random per message
ZERO = bytes(SLOT)


class KeyDestroyed(KeyError):
    """The key of a slot was destroyed (or never written): what it sealed is erased."""


def aad(*parts: str) -> bytes:
    """Associated data binding a ciphertext to what it is (e.g. record id and field): unambiguous encoding."""
    return json.dumps(parts).encode()


def seal(key: bytes, data: bytes, associated: bytes) -> bytes:
    """nonce || AES-GCM(key, data, associated): the nonce is random, so sealing twice never repeats one."""
    nonce = os.urandom(NONCE)
    return nonce + AESGCM(key).encrypt(nonce, data, associated)


def unseal(key: bytes, blob: bytes, associated: bytes) -> bytes:
    """The plaintext of `seal`; IntegrityError if the blob was altered or belongs to other associated data."""
    try:
        return AESGCM(key).decrypt(blob[:NONCE], blob[NONCE:], associated)
    except InvalidTag:
        raise IntegrityError("sealed content failed authentication: it was altered, or sealed under another "
                             "key or for another record") from None


class KeyStore:
    """The key file of one run: `allocate` random keys, read them by slot, `destroy` them in place."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = Path(path)
        self._fd = fd
        self._grow = threading.Lock()

    @classmethod
    def create(cls, path: Path) -> "KeyStore":
        """A new, empty key file (mode 0600); refuses to overwrite one."""
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, FILE_MODE)
        os.fchmod(fd, FILE_MODE)
        os.pwrite(fd, MAGIC + struct.pack("<II", VERSION, SLOT), 0)
        os.fsync(fd)
        fsync_dir(Path(path).parent)
        return cls(path, fd)

    @classmethod
    def open(cls, path: Path) -> "KeyStore":
        """An existing key file; ValueError if it is not one."""
        fd = os.open(path, os.O_RDWR)
        header = os.pread(fd, HEADER, 0)
        if header != MAGIC + struct.pack("<II", VERSION, SLOT) or (os.fstat(fd).st_size - HEADER) % SLOT:
            os.close(fd)
            raise ValueError(f"{path} is not an s3t key file (or it was truncated)")
        return cls(path, fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __len__(self) -> int:
        """Slots allocated so far (live or destroyed)."""
        return (os.fstat(self._fd).st_size - HEADER) // SLOT

    def allocate(self, count: int) -> range:
        """Append `count` fresh random keys, durably; returns their slots.

        Callers allocate inside a registry write transaction (serialised across processes), so the open
        sweep, which runs under the same lock, never mistakes a slot about to be committed for a leftover.
        """
        with self._grow:
            start = len(self)
            if count:
                os.pwrite(self._fd, os.urandom(count * SLOT), HEADER + start * SLOT)
                os.fsync(self._fd)
        return range(start, start + count)

    def keys(self, slots: Iterable[int]) -> dict[int, bytes | None]:
        """{slot: key}, None for a destroyed (or never allocated) slot; read from the file every time."""
        slots = sorted(set(slots))
        if len(slots) > 1024:   # one read of the whole file beats many small ones
            data = os.pread(self._fd, os.fstat(self._fd).st_size, 0)
            raw = {s: data[HEADER + s * SLOT:HEADER + (s + 1) * SLOT] for s in slots}
        else:
            raw = {s: os.pread(self._fd, SLOT, HEADER + s * SLOT) for s in slots}
        return {s: k if len(k) == SLOT and k != ZERO else None for s, k in raw.items()}

    def key(self, slot: int) -> bytes:
        key = self.keys([slot])[slot]
        if key is None:
            raise KeyDestroyed(slot)
        return key

    def destroy(self, slots: Iterable[int]) -> int:
        """Overwrite these slots with zeros in place and fsync; returns how many still held a key."""
        live = [s for s, k in self.keys(slots).items() if k is not None]
        for s in live:
            os.pwrite(self._fd, ZERO, HEADER + s * SLOT)
        if live:
            os.fdatasync(self._fd)   # the file's size is unchanged: its data is all that must reach the disk
        return len(live)

    def live_slots(self) -> set[int]:
        """Every slot that still holds a key."""
        return {s for s, k in self.keys(range(len(self))).items() if k is not None}
