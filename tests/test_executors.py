"""The Ray executor against the local one: the same stages bit for bit (train, restore after deletions, on
SQLite and PostgreSQL), a run interrupted mid-training resumes, a worker killed mid-task is retried, a
deletion racing the workers is never served, and a worker in another numeric environment refuses. The
tests whose path touches the registry run on PostgreSQL too (the workers read it over the network).

One local Ray instance (2 CPUs) serves the whole module; `RayExecutor()` joins it.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import s3t
from conftest import copy_run
from s3t.errors import PlanError, RunError

ray = pytest.importorskip("ray", reason="the Ray executor's tests need the ray extra: pip install -e '.[ray]'")


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")   # a loopback instance private to this test
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20)
    yield
    ray.shutdown()


def artifacts(system: s3t.S3T) -> dict[str, str]:
    """Every registered stage: lineage hash -> SHA-256 of its file."""
    return system.registry.artifact_hashes(system.registry.artifact_lineages())


def assert_same_stages(system: s3t.S3T, reference: s3t.S3T) -> None:
    """The same registered stages, the same served set, and every stage's tensors equal bit for bit."""
    mine, theirs = artifacts(system), artifacts(reference)
    assert mine == theirs and mine
    assert system.served()[1] == reference.served()[1]
    for lineage, sha in mine.items():
        a, b = system.trainer.store.load(lineage, sha), reference.trainer.store.load(lineage, sha)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.both_databases
def test_ray_training_is_bit_identical_to_in_process(make_run, tiny_plan, tiny_data, trained_dir):
    system = make_run(tiny_plan, tiny_data, name="ray")
    system.train(progress=False, executor="ray")
    reference = s3t.S3T.open(trained_dir)
    try:
        assert_same_stages(system, reference)
        texts = list(tiny_data.texts[:12])
        assert torch.equal(torch.from_numpy(system.predict_proba(texts)),
                           torch.from_numpy(reference.predict_proba(texts)))
    finally:
        reference.close()


@pytest.mark.both_databases
def test_restore_on_ray_equals_restore_in_process(trained_dir, tmp_path, tiny_data):
    victims = [tiny_data[3].id, tiny_data[40].id]
    local = s3t.S3T.open(copy_run(trained_dir, tmp_path / "local"))
    remote = s3t.S3T.open(copy_run(trained_dir, tmp_path / "remote"))
    try:
        for system in (local, remote):
            system.delete(ids=victims)
        assert remote.status().truncated_orders > 0
        assert local.restore(progress=False) == remote.restore(progress=False, executor=s3t.RayExecutor()) > 0
        assert_same_stages(remote, local)
        assert remote.status().truncated_orders == 0
    finally:
        local.close()
        remote.close()


@pytest.mark.both_databases
def test_an_interrupted_ray_training_resumes_to_the_same_stages(make_run, tiny_plan, tiny_data, trained_dir):
    system = make_run(tiny_plan, tiny_data, name="resume")
    original, calls = system.trainer.register, []

    def interrupt_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return original(*args, **kwargs)

    system.trainer.register = interrupt_after_two
    with pytest.raises(KeyboardInterrupt):
        system.train(progress=False, executor="ray")
    system.trainer.register = original
    reference = s3t.S3T.open(trained_dir)
    try:
        assert 0 < len(artifacts(system)) < len(artifacts(reference))
        system.train(progress=False, executor="ray")
        assert_same_stages(system, reference)
    finally:
        reference.close()


def _tree_workers() -> list[int]:
    """Pids of Ray workers running a prefix-tree task now (Ray titles a worker by the task it runs)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"ray::_train_tree" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_a_worker_killed_mid_task_is_retried_and_the_result_is_unchanged(make_run, tiny_plan, tiny_data,
                                                                        trained_dir):
    system = make_run(tiny_plan, tiny_data, name="killed")
    killed, done = [], threading.Event()

    def kill_the_first_tree_task():
        while not done.is_set() and not killed:
            for pid in _tree_workers():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.01)

    killer = threading.Thread(target=kill_the_first_tree_task)
    killer.start()
    try:
        system.train(progress=False, executor="ray")
    finally:
        done.set()
        killer.join()
    assert killed, "guard: no tree task was seen running, so none was killed"
    reference = s3t.S3T.open(trained_dir)
    try:
        assert_same_stages(system, reference)
    finally:
        reference.close()


@pytest.mark.both_databases
def test_a_deletion_racing_the_workers_is_never_served(trained, tiny_data):
    first, second = tiny_data[1].id, tiny_data[2].id
    trained.delete(ids=[first])
    original = trained.trainer.register

    def delete_after_the_first_registration(stage, **kwargs):
        original(stage, **kwargs)
        if second in stage.job.ids and not trained.registry.locate([second])[second][2]:
            trained.delete(ids=[second])   # the workers trained on it; the driver has not registered it all

    trained.trainer.register = delete_after_the_first_registration
    trained.restore(progress=False, executor="ray")
    trained.trainer.register = original
    served = [a for c in trained.served()[1] for a in c["artifacts"]]
    with trained.registry.transaction() as conn:
        assert not trained.registry.tainted(conn, served, [first, second])
    assert trained.status().truncated_orders > 0   # the raced orders wait for the next restore


def test_a_worker_refuses_another_run_another_version_or_another_numeric_environment(trained_dir, tmp_path):
    from s3t.executors import RunRef, _trainer

    system = s3t.S3T.open(copy_run(trained_dir, tmp_path / "run"))
    try:
        run = RunRef.of(system.trainer)
        assert Path(run.path).is_absolute()
        assert _trainer(run).environment == run.environment
        with pytest.raises(RunError, match=r"finds another run at .*same path"):
            _trainer(replace(run, run_id="another"))
        with pytest.raises(RunError, match=r"runs s3t .*, the driver s3t 0\.0\.0"):
            _trainer(replace(run, version="0.0.0"))
        with pytest.raises(RunError, match=r"another numeric environment.*threads: 7 ->"):
            _trainer(replace(run, environment=replace(run.environment, threads=7)))
    finally:
        _close_worker_runs()
        system.close()


def _close_worker_runs() -> None:
    """Close the runs this process opened as a worker would (`executors._OPEN`)."""
    from s3t import executors

    for system in executors._OPEN.values():
        system.close()
    executors._OPEN.clear()


def test_a_tree_task_keeps_no_weights_in_the_worker(trained, tiny_data):
    """Run as a worker would, in this process: a stage retired later cannot linger in a worker's memory."""
    from s3t import executors
    from s3t.unlearning import restorable

    trained.delete(ids=[tiny_data[0].id])
    registrar = executors.Registrar(trained.trainer, on_stage=lambda done: None, on_order=lambda *a: None)
    tree = registrar.trees({o["shard"]: [o] for o in restorable(trained.registry)})[0]
    try:
        results = executors._train_tree(None, executors.RunRef.of(trained.trainer), tree)
        assert any(trained_stages for _job, trained_stages, _complete in results)
        worker = executors._OPEN[str(trained.run_dir.resolve())]
        assert worker.trainer._tensors == {}
    finally:
        _close_worker_runs()


def test_the_driver_refuses_a_stage_file_it_cannot_read(trained):
    """A worker that saved its file elsewhere (no shared filesystem): the driver says so, registers nothing."""
    from s3t.executors import Registrar
    from s3t.training import OrderJob, StageJob, TrainedStage

    registrar = Registrar(trained.trainer, on_stage=lambda done: None, on_order=lambda *a: None, check_files=True)
    registrar.generations[0] = {}
    job = StageJob(stage=1, lineage="ab" * 32, parents=(), ids=(trained.registry.live_members(0)[0][0],), seed=1)
    order = OrderJob(shard=0, order={"position": 0}, lineages=[job.lineage], stages=[job])
    with pytest.raises(RunError, match="cannot read it .*same path"):
        registrar.stage(order, TrainedStage(job, "0" * 64, None))
    assert trained.registry.artifact(job.lineage) is None


def test_a_worker_failure_is_one_line_with_its_cause():
    from s3t.executors import _reason

    class TaskError(Exception):
        cause = ModuleNotFoundError("No module named 's3t.executors'")

    error = _reason(TaskError("traceback\n  line 1\n  line 2"))
    assert isinstance(error, RunError) and "\n" not in str(error)
    assert "a Ray training task failed (ModuleNotFoundError: No module named 's3t.executors')" in str(error)
    refused = RunError("another numeric environment")
    TaskError.cause = refused
    assert _reason(TaskError()) is refused


@pytest.mark.both_databases
def test_a_relative_run_path_reaches_the_workers_as_the_same_folder(trained_dir, tmp_path, tiny_data, monkeypatch):
    """Ray's workers do not share the driver's working folder: `S3T.open("run")` must still train that run."""
    local = s3t.S3T.open(copy_run(trained_dir, tmp_path / "local"))
    copy_run(trained_dir, tmp_path / "remote")
    monkeypatch.chdir(tmp_path)
    remote = s3t.S3T.open("remote")
    try:
        for system in (local, remote):
            system.delete(ids=[tiny_data[9].id])
        assert remote.restore(progress=False, executor="ray") == local.restore(progress=False) > 0
        assert_same_stages(remote, local)
    finally:
        local.close()
        remote.close()


def test_a_re_added_record_restores_on_ray_as_in_process(trained_dir, tmp_path, tiny_data):
    """A record deleted and added again lives under a new key: workers that cached its old key find the new."""
    victim = tiny_data[5]
    local = s3t.S3T.open(copy_run(trained_dir, tmp_path / "local"))
    remote = s3t.S3T.open(copy_run(trained_dir, tmp_path / "remote"))
    try:
        for system in (local, remote):
            system.delete(ids=[victim.id])
        remote.restore(progress=False, executor="ray")   # warms the workers' caches with the old key
        local.restore(progress=False)
        for system in (local, remote):
            system.add(s3t.Dataset([victim]), replace_deleted=True)
        for _attempt in range(2):   # whichever worker takes which task
            remote.restore(progress=False, executor="ray")
        local.restore(progress=False)
        assert remote.status().stale_orders == remote.status().truncated_orders == 0
        assert_same_stages(remote, local)
    finally:
        local.close()
        remote.close()


def test_executor_names_and_a_missing_ray_are_clear_errors(trained, monkeypatch):
    with pytest.raises(PlanError, match="unknown executor 'spark'; choose one of: local, ray"):
        trained.restore(progress=False, executor="spark")
    monkeypatch.setitem(sys.modules, "ray", None)
    assert trained.restore(progress=False, executor="ray") == 0   # nothing to train: Ray is not needed
    trained.delete(ids=[trained.registry.live_members(0)[0][0]])
    with pytest.raises(RunError, match=r'pip install "s3t\[ray\]"'):
        trained.restore(progress=False, executor="ray")


def test_cli_restore_with_the_ray_executor_and_its_user_errors(trained_dir, tmp_path, tiny_data):
    from typer.testing import CliRunner

    from s3t.cli import app

    local = s3t.S3T.open(copy_run(trained_dir, tmp_path / "local"))
    remote_dir = copy_run(trained_dir, tmp_path / "remote")
    remote = s3t.S3T.open(remote_dir)
    try:
        for system in (local, remote):
            system.delete(ids=[tiny_data[7].id])
        remote.close()
        done = CliRunner().invoke(app, ["restore", str(remote_dir), "--executor", "ray", "--quiet"])
        assert done.exit_code == 0, done.output
        assert f"restored {local.restore(progress=False)} orders" in done.stdout
        remote = s3t.S3T.open(remote_dir)
        assert_same_stages(remote, local)

        wrong = CliRunner().invoke(app, ["restore", str(remote_dir), "--address", "auto"])
        assert wrong.exit_code == 1 and "error: `address` is for the Ray executor" in wrong.stderr
        unknown = CliRunner().invoke(app, ["restore", str(remote_dir), "--executor", "spark"])
        assert unknown.exit_code == 2 and "Traceback" not in unknown.output
    finally:
        local.close()
        remote.close()


def test_the_services_restoration_child_can_train_on_ray(trained, tiny_data, monkeypatch, capsys):
    """`s3t serve --restore-executor ray`: the background worker's child restores through the Ray executor."""
    import json

    from s3t.service import worker
    from s3t.service.settings import ServiceSettings

    trained.delete(ids=[tiny_data[11].id])
    monkeypatch.setattr(os, "nice", lambda increment: None)   # the child lowers its priority; not this test's
    assert worker.main([str(trained.run_dir), "--executor", "ray"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["completed"] > 0
    assert trained.status().truncated_orders == 0

    assert ServiceSettings(restore_executor="ray", ray_address="auto").ray_address == "auto"
    with pytest.raises(PlanError, match="unknown executor 'spark'"):
        ServiceSettings(restore_executor="spark")
    with pytest.raises(PlanError, match="`address` is for the Ray executor"):
        ServiceSettings(ray_address="auto")
