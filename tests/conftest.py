"""Shared fixtures: a 2-block cut of the embedded MiniLM, a tiny random ViT and small synthetic texts and
images, so tests stay fast. `case` runs a test once per classifying family (text encoder, image encoder).

S3T_TEST_DEVICE=cuda runs the plans of these fixtures on the GPU (benchmarks/gpu_check.py does); by default
they run on the CPU whatever the machine has, so the suite's bits do not depend on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import s3t  # noqa: E402
from s3t import datasets  # noqa: E402

TEST_DEVICE = os.environ.get("S3T_TEST_DEVICE", "cpu")


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
                    learning_rate=5e-3, base_model=tiny_model, seed=0, device=TEST_DEVICE)


@pytest.fixture(scope="session")
def tiny_data() -> s3t.Dataset:
    return datasets.synthetic(96, num_labels=3, num_subjects=24, seed=1)


@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> str:
    """A random 4-block ViT (hidden 32, 16 px RGB in 4 px patches) with an image-processor config that resizes
    the 20 px synthetic images to 16 px and normalises with its own mean and std."""
    from tiny_models import save_tiny_vit

    return str(save_tiny_vit("vit", tmp_path_factory.mktemp("tiny-vit"), layers=4, image_size=16, patch=4))


@pytest.fixture(scope="session")
def tiny_image_plan(tiny_vit) -> s3t.Plan:
    """The tiny plan's layout on the ViT: two shards, two slices of one block each (the top 2 of 4), both orders."""
    return s3t.Plan(num_shards=2, num_slices=2, budget=2, blocks_per_slice=1, epochs=2, batch_size=8,
                    learning_rate=5e-3, base_model=tiny_vit, seed=0, num_threads=1, device=TEST_DEVICE)


@pytest.fixture(scope="session")
def tiny_image_data() -> s3t.Dataset:
    return datasets.synthetic_images(96, num_labels=3, num_subjects=24, seed=1)


@dataclass(frozen=True)
class Case:
    """One classifying family's tiny setting: its plan, its data and inputs to predict (records' and unseen ones)."""

    family: str
    plan: s3t.Plan
    data: s3t.Dataset
    probe: list


@pytest.fixture(params=["text", "image"])
def case(request) -> Case:
    if request.param == "text":
        plan, data = request.getfixturevalue("tiny_plan"), request.getfixturevalue("tiny_data")
        unseen = ["an unseen text about nothing in particular"]
    else:
        plan, data = request.getfixturevalue("tiny_image_plan"), request.getfixturevalue("tiny_image_data")
        unseen = [datasets.synthetic_images(1, seed=99)[0].image]
    return Case(request.param, plan, data, list(data.inputs[:20]) + unseen)


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


@pytest.fixture(scope="session")
def trained_image_dir(tmp_path_factory, tiny_image_plan, tiny_image_data) -> Path:
    """A trained tiny ViT run, read-only for tests."""
    path = tmp_path_factory.mktemp("trained-image") / "run"
    system = s3t.S3T.create(path, tiny_image_plan, tiny_image_data)
    system.train(progress=False)
    system.close()
    return path


@pytest.fixture(params=["text", "image"])
def trained_case(request, tmp_path) -> tuple[s3t.S3T, s3t.Dataset]:
    """(a private copy of a trained tiny run, its data), once per classifying family."""
    import shutil

    source, data = (("trained_dir", "tiny_data") if request.param == "text" else
                    ("trained_image_dir", "tiny_image_data"))
    path = tmp_path / "copy"
    shutil.copytree(request.getfixturevalue(source), path)
    system = s3t.S3T.open(path)
    yield system, request.getfixturevalue(data)
    system.close()
