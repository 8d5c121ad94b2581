"""Verification on load: a changed base model or an altered artifact is refused, never served."""

from __future__ import annotations

import shutil

import pytest

import s3t


def test_changed_base_model_is_refused(tmp_path, tiny_model, tiny_plan, tiny_data):
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    system = s3t.S3T.create(tmp_path / "run", tiny_plan.replace(base_model=str(model)), tiny_data)
    system.close()
    config = model / "config.json"
    config.write_text(config.read_text().replace("}", ', "s3t_test_marker": 1}', 1))
    reopened = s3t.S3T.open(tmp_path / "run")
    with pytest.raises(s3t.IntegrityError, match="changed since this run was created"):
        reopened.train(progress=False)
    reopened.close()


def test_altered_artifact_is_refused(trained, tiny_data):
    _, components = trained.served()
    lineage = components[0]["artifacts"][0]
    path = trained.run_dir / "artifacts" / lineage[:2] / f"{lineage}.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01   # flip one bit of the last weight
    path.write_bytes(bytes(data))
    fresh = s3t.S3T.open(trained.run_dir)   # a new process would verify on first load
    with pytest.raises(s3t.IntegrityError, match="does not match its recorded hash"):
        fresh.predict(list(tiny_data.texts[:2]))
    fresh.close()


SAVE_IN_A_NEW_PROCESS = """
import sys, torch
from pathlib import Path
from s3t.store import ArtifactStore
weights = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4)}
print(ArtifactStore(Path(sys.argv[1])).save("ab" * 32, weights, {"stage": "2", "examples": "40"}))
"""


def test_the_same_stage_saved_by_different_processes_has_the_same_bytes(tmp_path):
    """An artifact's SHA-256 names its tensors, whichever process saved them (a Ray worker, an audit's
    replay): the file carries no per-process ordering (safetensors writes a metadata map in hash order)."""
    import subprocess
    import sys

    shas = {subprocess.run([sys.executable, "-c", SAVE_IN_A_NEW_PROCESS, str(tmp_path / f"store{k}")], check=True,
                           capture_output=True, text=True).stdout.strip() for k in range(5)}
    assert len(shas) == 1, shas
