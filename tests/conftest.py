"""Shared fixtures: a 2-block cut of the embedded MiniLM and small synthetic data, so tests stay fast."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import s3t  # noqa: E402
from s3t import datasets  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A local Hugging Face folder: the embedded MiniLM-L6 cut to its first 2 blocks."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers import logging as hf_logging

    from s3t.models import default_model_path

    hf_logging.set_verbosity_error()
    source = default_model_path()
    out = tmp_path_factory.mktemp("tiny-minilm")
    config = AutoConfig.from_pretrained(source, num_hidden_layers=2)
    AutoModel.from_pretrained(source, config=config).save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def tiny_plan(tiny_model) -> s3t.Plan:
    """Two shards, two slices (one block each), both orders: every path of the method, in seconds."""
    return s3t.Plan(num_shards=2, num_slices=2, budget=2, epochs=2, max_length=24, batch_size=8,
                    learning_rate=5e-3, base_model=tiny_model, seed=0)


@pytest.fixture(scope="session")
def tiny_data() -> s3t.Dataset:
    return datasets.synthetic(96, num_labels=3, num_subjects=24, seed=1)


@pytest.fixture
def make_run(tmp_path):
    """Create (and clean up) runs in a temporary folder: make_run(plan, data, name="a")."""
    created = []

    def make(plan: s3t.Plan, data: s3t.Dataset, name: str = "run") -> s3t.S3T:
        system = s3t.S3T.create(tmp_path / name, plan, data)
        created.append(system)
        return system

    yield make
    for system in created:
        system.close()


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory, tiny_plan, tiny_data) -> Path:
    """A trained tiny run, read-only for tests (copy it with `copy_run` before changing it)."""
    path = tmp_path_factory.mktemp("trained") / "run"
    system = s3t.S3T.create(path, tiny_plan, tiny_data)
    system.train(progress=False)
    system.close()
    return path


@pytest.fixture
def trained(trained_dir, tmp_path) -> s3t.S3T:
    """A private copy of the trained tiny run."""
    import shutil

    path = tmp_path / "copy"
    shutil.copytree(trained_dir, path)
    system = s3t.S3T.open(path)
    yield system
    system.close()
