"""Artifact store: safetensors files named by lineage hash, written atomically, verified on load."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import IntegrityError

if TYPE_CHECKING:
    import torch

__all__ = ["ArtifactStore", "file_sha256", "shred_file"]

SUFFIX = ".safetensors"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shred_file(path: Path) -> None:
    """Overwrite a file with zeros, flush it to disk, then unlink it (nothing if it is gone already)."""
    try:
        size = path.stat().st_size
        with path.open("r+b") as f:
            f.write(b"\0" * size)
            f.flush()
            os.fsync(f.fileno())
        path.unlink()
    except FileNotFoundError:
        pass


class ArtifactStore:
    """A folder of `<lineage>.safetensors` files, two-level fanned out like git objects."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, lineage: str) -> Path:
        return self.root / lineage[:2] / f"{lineage}{SUFFIX}"

    def save(self, lineage: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
        """Write atomically (temp file, fsync, rename) and return the file's SHA-256.

        A crash mid-write leaves at most a temp file, never a truncated artifact under its real name.
        """
        from safetensors.torch import save_file

        target = self.path(lineage)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=SUFFIX)
        os.close(fd)
        try:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"lineage": lineage, **metadata})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            digest = file_sha256(Path(tmp))
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return digest

    def shred(self, lineage: str) -> None:
        """Erase an artifact's file: weights trained on deleted records must not outlive the deletion."""
        shred_file(self.path(lineage))

    def verify(self, lineage: str, sha256: str) -> bool:
        try:
            return file_sha256(self.path(lineage)) == sha256
        except FileNotFoundError:   # never written, or shredded by a deletion
            return False

    def load(self, lineage: str, sha256: str) -> dict[str, torch.Tensor]:
        """Load an artifact after checking its bytes against the registry's hash."""
        from safetensors.torch import load

        path = self.path(lineage)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise IntegrityError(f"artifact {lineage} is missing from {self.root}: run `s3t restore` to retrain it"
                                 ) from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise IntegrityError(
                f"artifact {lineage} at {path} does not match its recorded hash: it was altered or partially "
                "written; delete the file and run `s3t restore` to retrain it"
            )
        return load(data)
