"""Artifact store: safetensors files named by lineage hash, written atomically, verified on load."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import IntegrityError
from .files import private_dir, shred, write_private

if TYPE_CHECKING:
    import torch

__all__ = ["ArtifactStore", "file_sha256"]

SUFFIX = ".safetensors"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ArtifactStore:
    """A folder of `<lineage>.safetensors` files, two-level fanned out like git objects."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, lineage: str) -> Path:
        return self.root / lineage[:2] / f"{lineage}{SUFFIX}"

    def save(self, lineage: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
        """Write atomically (temp file, fsync, rename; mode 0600) and return the file's SHA-256.

        A crash mid-write leaves at most a temp file, never a truncated artifact under its real name; the
        run's sweep shreds such leftovers (and files whose registration a crash cut off).
        """
        from safetensors.torch import save

        # One metadata entry, its JSON sorted: safetensors writes its metadata map in an order that differs
        # from process to process (a Rust HashMap), so several entries would give the same tensors other bytes
        # in another process (a Ray worker, an audit's replay) and another SHA-256.
        about = json.dumps({"lineage": lineage, **metadata}, sort_keys=True)
        data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"s3t": about})
        target = self.path(lineage)
        private_dir(target.parent)
        write_private(target, data)
        return hashlib.sha256(data).hexdigest()

    def shred(self, lineage: str) -> None:
        """Erase an artifact's file: weights trained on deleted records must not outlive the deletion."""
        shred(self.path(lineage))

    def sweep(self, registered: set[str]) -> list[Path]:
        """Shred every file that is not a registered artifact (temp files of interrupted saves, stages whose
        registration a crash cut off, anything else); returns what was shredded.

        Only safe while no trainer can be between `save` and its registration: hold the training lock.
        """
        if not self.root.is_dir():
            return []
        shredded = []
        for path in sorted(p for p in self.root.rglob("*") if p.is_file()):
            lineage = path.name.removesuffix(SUFFIX)
            if lineage in registered and path == self.path(lineage):
                continue
            if shred(path):
                shredded.append(path)
        return shredded

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
