"""The run folder's files: private whatever the umask, written atomically, shredded, locked.

A run folder holds personal data (sealed record content, cached hidden states, weights trained on it),
so nobody but its owner may read it: folders are 0700 and files 0600. Every file s3t writes is created
with that mode (`os.open(..., 0o600)`, `mkdir(0o700)`, then an explicit chmod, since the umask can only
remove bits and an umask of 0o777 would remove too many). SQLite's rollback journal takes the mode of
its database file, so pre-creating the database with `create_private` covers the journal too.

Locks are `flock`s on files in the run folder. Each `FileLock` opens the file itself, so two of them
conflict even inside one process (flock locks belong to an open file description).
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["DIR_MODE", "FILE_MODE", "TEMP_PREFIX", "FileLock", "create_private", "fsync_dir", "private_dir",
           "shred", "write_private"]

DIR_MODE = 0o700
FILE_MODE = 0o600
TEMP_PREFIX = ".tmp-"   # a file being written; one left behind by a crash is an orphan (see S3T.sweep)


def private_dir(path: Path) -> Path:
    """Create `path` (and its missing parents) with mode 0700; an existing folder is set to 0700 too."""
    path = Path(path)
    if not path.parent.is_dir():
        private_dir(path.parent)
    try:
        path.mkdir(mode=DIR_MODE)
    except FileExistsError:
        if not path.is_dir():
            raise
    os.chmod(path, DIR_MODE)
    return path


def create_private(path: Path) -> None:
    """Create an empty file with mode 0600 if it does not exist (one that exists is set to 0600)."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes, *, durable: bool = True, exclusive: bool = False) -> None:
    """Write `data` to `path` atomically with mode 0600: a temp file beside it, then a rename.

    `durable` also fsyncs the file and the folder (skip it for files that can be recomputed). `exclusive`
    never replaces an existing file (FileExistsError instead: of two processes creating a key, one wins).
    A failure shreds the temp file: it may hold a part of the content.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX)   # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), FILE_MODE)
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)   # fails if `path` exists, atomically
        else:
            os.replace(tmp, path)
    except BaseException:
        shred(Path(tmp))
        raise
    if exclusive:
        os.unlink(tmp)           # not shred: it is `path` under a second name now
    if durable:
        fsync_dir(path.parent)


def shred(path: Path) -> bool:
    """Overwrite a file with zeros, flush that to disk, then unlink it; False if it was gone already."""
    try:
        with open(path, "r+b") as f:
            size = os.fstat(f.fileno()).st_size
            for start in range(0, size, 1 << 20):
                f.write(b"\0" * min(1 << 20, size - start))
            f.flush()
            os.fsync(f.fileno())
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


class FileLock:
    """An exclusive `flock` on a private lock file (created 0600 on first use)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self, *, wait: float | None = None) -> bool:
        """Take the lock: block until free (`wait=None`), or give up after `wait` seconds and return False."""
        assert self._fd is None, f"{self.path} is already held by this FileLock"
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, FILE_MODE)
        deadline = None if wait is None else time.monotonic() + wait
        try:
            os.fchmod(fd, FILE_MODE)
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | (0 if deadline is None else fcntl.LOCK_NB))
                    break
                except BlockingIOError:   # held by another open file (another process, or another FileLock)
                    if time.monotonic() >= deadline:
                        os.close(fd)
                        return False
                time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)   # closing the descriptor releases the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the lock for a block, waiting for it as long as it takes."""
        self.acquire()
        try:
            yield
        finally:
            self.release()
