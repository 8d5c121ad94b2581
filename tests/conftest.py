"""Shared fixtures: a 2-block cut of the embedded MiniLM, a tiny random ViT and small synthetic texts and
images, so tests stay fast. `case` runs a test once per classifying family (text encoder, image encoder).

S3T_TEST_DEVICE=cuda runs the plans of these fixtures on the GPU (benchmarks/gpu_check.py does); by default
they run on the CPU whatever the machine has, so the suite's bits do not depend on it.

Databases: runs are SQLite in their folder unless a test is marked `both_databases` (or parametrizes
`database` itself), which then also runs on PostgreSQL, each run in a schema of its own; on the text
family only (an image run's registry path is the same). The server is S3T_TEST_POSTGRES_URL's (`.ci/run`
starts one), or else one this session starts in a temp folder (tests/postgres.py) when PostgreSQL's
binaries are installed; with neither, or with S3T_TEST_POSTGRES=off, the PostgreSQL cases are skipped and
say why.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import postgres  # noqa: E402  (tests/postgres.py)
import s3t  # noqa: E402
from s3t import datasets  # noqa: E402

TEST_DEVICE = os.environ.get("S3T_TEST_DEVICE", "cpu")
DATABASES = ("sqlite", "postgresql")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "both_databases: run the module's tests on SQLite and on PostgreSQL")


def pytest_generate_tests(metafunc) -> None:
    """`database` is parametrized for every test that uses it: SQLite, and PostgreSQL too where marked
    `both_databases` (a test that parametrizes `database` itself is left alone). One parameter for all,
    so a module-scoped fixture (e.g. a server) is shared by marked and unmarked tests on SQLite."""
    if "database" not in metafunc.fixturenames:
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        if "database" in ([n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)):
            return
    kinds = DATABASES if metafunc.definition.get_closest_marker("both_databases") else ("sqlite",)
    metafunc.parametrize("database", kinds, indirect=True, scope="session")


@dataclass(frozen=True)
class Database:
    """Where the tests' runs keep their registry: SQLite in the run folder, or a fresh PostgreSQL schema."""

    kind: str
    url: str | None = None

    @property
    def postgres(self) -> bool:
        return self.kind == "postgresql"

    def create_args(self) -> dict:
        """`S3T.create` keyword arguments for a new run (a schema of its own on PostgreSQL)."""
        if not self.postgres:
            return {}
        return {"database_url": self.url, "database_schema": postgres.new_schema(self.url)}

    def create(self, path: Path, plan: s3t.Plan, data: s3t.Dataset) -> s3t.S3T:
        return s3t.S3T.create(path, plan, data, **self.create_args())


def copy_run(source: Path, dest: Path) -> Path:
    """A private copy of a run: its folder, and on PostgreSQL its schema (never shared with the original)."""
    import json

    shutil.copytree(source, dest)
    info = json.loads((dest / "run.json").read_text())
    if info.get("database_schema"):
        info["database_schema"] = postgres.clone_schema(info["database_url"], info["database_schema"])
        (dest / "run.json").write_text(json.dumps(info, indent=2))
    return dest


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """The test PostgreSQL server's URL (started for this session if none is given); skips without one."""
    if os.environ.get("S3T_TEST_POSTGRES", "").lower() == "off":
        pytest.skip("PostgreSQL cases skipped: S3T_TEST_POSTGRES=off")
    if url := os.environ.get(postgres.ENV):
        yield url
        return
    if postgres.binaries() is None:
        pytest.skip(f"PostgreSQL cases skipped: no server. Set {postgres.ENV}=postgresql+psycopg://USER@HOST:PORT/DB "
                    "or install PostgreSQL (initdb, pg_ctl and postgres on PATH); `.ci/run` starts one")
    folder = Path(tempfile.mkdtemp(prefix="s3t-pg-"))
    os.chmod(folder, 0o711)   # the server may run as another user (PostgreSQL refuses root)
    try:
        url = postgres.start(folder / "cluster")
    except Exception as exc:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"PostgreSQL cases skipped: could not start a server ({exc})")
    try:
        yield url
    finally:
        postgres.stop(folder / "cluster")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def database(request) -> Database:
    """SQLite, unless the test is parametrized with "postgresql" (modules marked `both_databases`)."""
    kind = getattr(request, "param", "sqlite")
    if kind == "postgresql":
        return Database(kind, request.getfixturevalue("postgres_url"))
    return Database(kind)


def pytest_collection_modifyitems(config, items) -> None:
    """PostgreSQL variants run on the text family only: deselect their image cases."""
    keep, drop = [], []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        image = "image" in (params.get("case"), params.get("trained_case"))
        (drop if image and params.get("database") == "postgresql" else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


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
def make_run(tmp_path, database):
    """Create (and clean up) runs in a temporary folder: make_run(plan, data, name="a")."""
    created = []

    def make(plan: s3t.Plan, data: s3t.Dataset, name: str = "run") -> s3t.S3T:
        system = database.create(tmp_path / name, plan, data)
        created.append(system)
        return system

    yield make
    for system in created:
        system.close()


@pytest.fixture(scope="session")
def _trained_runs() -> dict:
    """Trained tiny runs by database kind, built once per session (a fixture switching its database
    parameter back and forth must not retrain)."""
    return {}


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory, tiny_plan, tiny_data, database, _trained_runs) -> Path:
    """A trained tiny run, read-only for tests (copy it with `copy_run` before changing it)."""
    if database.kind not in _trained_runs:
        path = tmp_path_factory.mktemp(f"trained-{database.kind}") / "run"
        system = database.create(path, tiny_plan, tiny_data)
        system.train(progress=False)
        system.close()
        _trained_runs[database.kind] = path
    return _trained_runs[database.kind]


@pytest.fixture
def trained(trained_dir, tmp_path) -> s3t.S3T:
    """A private copy of the trained tiny run."""
    system = s3t.S3T.open(copy_run(trained_dir, tmp_path / "copy"))
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
def trained_case(request, tmp_path, database) -> tuple[s3t.S3T, s3t.Dataset]:
    """(a private copy of a trained tiny run, its data), once per classifying family (the text run on the
    test's database; the image run on SQLite, see `pytest_collection_modifyitems`)."""
    source, data = (("trained_dir", "tiny_data") if request.param == "text" else
                    ("trained_image_dir", "tiny_image_data"))
    system = s3t.S3T.open(copy_run(request.getfixturevalue(source), tmp_path / "copy"))
    yield system, request.getfixturevalue(data)
    system.close()


@pytest.fixture
def no_training(monkeypatch):
    """Make any training step fail loudly: for paths that must never train (deletion, adding records)."""
    from s3t.training import Trainer

    def refuse(*args, **kwargs):
        raise AssertionError("a path that must never train tried to")

    monkeypatch.setattr(Trainer, "train_stage", refuse)
    monkeypatch.setattr(Trainer, "train", refuse)
    monkeypatch.setattr(Trainer, "prepare", refuse)
