"""Where training runs: in this process (the default), or as Ray tasks on a cluster.

An executor brings the restorable orders of each shard to full depth for `unlearning.rebuild`, which is how
a run is trained and restored. The driver (the process that called `train` or `restore`) keeps every
registry write, in the same transactions whichever executor trains: a stage is registered (with its lineage
and the check that none of its records was deleted meanwhile), and the served set switches after each order.

`LocalExecutor` trains the shards one after another in this process. `RayExecutor` runs them as Ray tasks:

- per shard, one task caches the frozen trunk's states of the shard's live records (shards hold disjoint
  records, so this work splits across workers with nothing done twice);
- then one task per *prefix tree*: the orders of a shard whose first stage is the same (so whatever prefix
  they share is trained once, in one task). Trees never share a stage: a stage's lineage names its whole
  prefix, and different first slices hold different records.

A worker opens the run from the same path (a shared filesystem on a cluster: the run folder holds the key
store, the trunk cache and the artifact store; the registry is the run's SQLite file or its PostgreSQL
database), reads what it needs, saves each stage's artifact file and returns the stages' hashes: it never
writes the registry. So results are bit-identical to the local executor's (the same stage computation on
the same inputs, in the same pinned numeric environment: a worker whose environment differs refuses), and an
interrupted run resumes like a local one: registered stages are reused, files saved but never registered
are shredded by the run's sweep. Ray retries a task whose worker died (`max_retries`); a retried task
saves the same bytes under the same names.

Ray is an optional extra: `pip install "s3t[ray]"`.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .errors import PlanError, RunError, S3TError
from .training import ArtifactRetired, CacheMiss, OrderJob, TrainedStage, describe

if TYPE_CHECKING:
    from .environment import NumericEnvironment
    from .system import S3T
    from .training import Trainer

__all__ = ["Executor", "LocalExecutor", "RayExecutor", "executor_for", "EXECUTORS"]

EXECUTORS = ("local", "ray")
OnStage = Callable[[str], None]
OnOrder = Callable[[dict, list[str]], None]


class Executor(Protocol):
    def complete(self, trainer: "Trainer", shards: dict[int, list[dict]], *, on_stage: OnStage,
                 on_order: OnOrder) -> None:
        """Bring the given orders of each shard to full depth: register every stage through `trainer` and
        call `on_order(order, lineages)` once an order is complete (not for one whose data went stale)."""


class LocalExecutor:
    """Train in this process, shard after shard."""

    def complete(self, trainer: "Trainer", shards: dict[int, list[dict]], *, on_stage: OnStage,
                 on_order: OnOrder) -> None:
        for shard, orders in sorted(shards.items()):
            trainer.complete(shard, orders, on_stage=on_stage, on_order=on_order)

    def __repr__(self) -> str:
        return "LocalExecutor()"


class RayExecutor:
    """Train shards' prefix trees as Ray tasks, in parallel; register them here.

    `address`: the Ray cluster to join ("auto", "ray://host:10001", ...); None joins the one this process
    already initialised, or starts a local one for the call (on `num_cpus` CPUs, default all) and stops it
    after. Each task asks for the run's pinned thread count in CPUs. `max_retries`: how often a task whose
    worker died is run again.
    """

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None, max_retries: int = 3) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.max_retries = max_retries

    def __repr__(self) -> str:
        return f"RayExecutor(address={self.address!r})"

    def complete(self, trainer: "Trainer", shards: dict[int, list[dict]], *, on_stage: OnStage,
                 on_order: OnOrder) -> None:
        ray = _import_ray()
        started = False
        if not ray.is_initialized():
            try:
                if self.address is None:   # a private local instance for this call: small, quiet, stopped after
                    ray.init(num_cpus=self.num_cpus, include_dashboard=False, log_to_driver=False,
                             object_store_memory=OBJECT_STORE_BYTES)
                else:
                    ray.init(address=self.address, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"the Ray cluster at {self.address}" if self.address else "a local Ray instance"
                raise RunError(f"cannot start or join {where}: {exc}") from None
            started = True
        try:
            self._complete(ray, trainer, shards, on_stage=on_stage, on_order=on_order)
        finally:
            if started:
                ray.shutdown()

    def _complete(self, ray, trainer: "Trainer", shards: dict[int, list[dict]], *, on_stage: OnStage,
                  on_order: OnOrder) -> None:
        threads = trainer.environment.threads
        largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=0)
        if largest < threads:   # its tasks would wait for ever
            raise RunError(f"the run trains with {threads} threads (its plan's num_threads) and each Ray task asks "
                           f"for as many CPUs, but no node of the Ray cluster has more than {largest:g}")
        options = dict(num_cpus=threads, max_retries=self.max_retries)
        prepare, train = ray.remote(**options)(_prepare_shard), ray.remote(**options)(_train_tree)
        run = (str(trainer.run_dir), trainer.environment)
        generations_of, pending = {}, {}
        for shard, orders in sorted(shards.items()):
            jobs, generations_of[shard] = trainer.jobs(shard, orders)
            trees = defaultdict(list)   # orders sharing their first stage share whatever prefix they have
            for job in jobs:
                if job.stages:
                    trees[job.lineages[0]].append(job)
                else:
                    on_order(job.order, job.lineages)   # nothing to train: serve it now
            if trees:
                prepared = prepare.remote(*run, shard)
                for tree in trees.values():
                    pending[train.remote(prepared, *run, tree)] = shard
        registered: set[str] = set()
        stale: set[str] = set()   # retired at registration: a record they saw was deleted since the worker read it

        def register(job: OrderJob, trained: list[TrainedStage], generations: dict[str, int]) -> bool:
            """Register an order's new stages, parents first; False when one is stale (the order stays truncated)."""
            for stage in trained:
                lineage = stage.job.lineage
                if lineage in registered:
                    continue   # shared with an order registered before
                if lineage in stale:
                    return False
                try:
                    trainer.register(stage, generations=generations)
                except CacheMiss:
                    stale.add(lineage)
                    return False
                registered.add(lineage)
                on_stage(describe(job, stage.job))
            return True

        failure = None
        try:
            while pending:
                [ready], _ = ray.wait(list(pending), num_returns=1)
                shard = pending.pop(ready)
                try:
                    results = ray.get(ready)
                except ray.exceptions.RayError as exc:   # register the other tasks' work first, then raise
                    cause = getattr(exc, "cause", None)   # a worker's own error, e.g. another environment
                    failure = failure or (cause if isinstance(cause, S3TError) else exc)
                    continue
                for job, trained, complete in results:
                    if register(job, trained, generations_of[shard]) and complete:
                        on_order(job.order, job.lineages)
        finally:
            for ref in pending:   # interrupted: nothing more is saved for a registration that will not come
                ray.cancel(ref, force=True)
        if failure is not None:
            raise failure


def executor_for(executor: "str | Executor", *, address: str | None = None) -> "Executor":
    """The executor a name means ("local" or "ray", with `address` for Ray), or the one given."""
    if not isinstance(executor, str):
        return executor
    if executor == "local":
        if address is not None:
            raise PlanError("`address` is for the Ray executor; pass executor='ray' with it")
        return LocalExecutor()
    if executor == "ray":
        return RayExecutor(address)
    raise PlanError(f"unknown executor {executor!r}; choose one of: {', '.join(EXECUTORS)}")


OBJECT_STORE_BYTES = 100 * 2**20   # tasks pass job descriptions and hashes, never tensors or record content


def _import_ray():
    try:
        import ray
    except ImportError:
        raise RunError('the Ray executor needs Ray: pip install "s3t[ray]" (or choose executor="local")') from None
    return ray


# -- on the workers ---------------------------------------------------------------------------------
_OPEN: dict[str, tuple[tuple[int, int], "S3T"]] = {}   # run folder -> (identity of its run.json, open run)


def _trainer(run_dir: str, environment: "NumericEnvironment") -> "Trainer":
    """This worker's trainer for the run at `run_dir`, opened read-only once per worker process (reopened if
    the folder now holds another run), after checking it trains in the driver's numeric environment."""
    from .system import RUN_FILE, S3T

    stat = (Path(run_dir) / RUN_FILE).stat()
    identity = (stat.st_ino, stat.st_mtime_ns)
    held = _OPEN.get(run_dir)
    if held is None or held[0] != identity:
        for _identity, old in _OPEN.values():   # one run at a time: each holds a model
            old.close()
        _OPEN.clear()
        held = _OPEN[run_dir] = (identity, S3T.open(run_dir, recover=False))
    system = held[1]
    here = system.environment()
    if here != environment:
        raise RunError(f"the Ray worker on {os.uname().nodename} trains in another numeric environment than the "
                       f"driver ({'; '.join(environment.differences(here))}): its stages would not be bit-identical "
                       "to the driver's; give the workers the same library versions, CPU type and device")
    return system.trainer


def _prepare_shard(run_dir: str, environment: "NumericEnvironment", shard: int) -> None:
    """Cache the trunk states of one shard's live records (the shard's tree tasks wait for this one)."""
    _trainer(run_dir, environment).prepare(shard)


def _train_tree(_prepared: None, run_dir: str, environment: "NumericEnvironment",
                jobs: Sequence[OrderJob]) -> list[tuple[OrderJob, list[TrainedStage], bool]]:
    """Train the missing stages of one prefix tree, saving their files: per order, the stages it trained
    (parents first) and whether the order is complete (False when a record it needs was deleted)."""
    trainer = _trainer(run_dir, environment)
    targets = trainer.prepare(jobs[0].shard)   # computes nothing: `_prepare_shard` cached the states
    done: dict[str, TrainedStage] = {}
    results = []
    for job in jobs:
        trained, complete = [], True
        try:
            for stage in job.stages:
                if stage.lineage not in done:
                    done[stage.lineage] = trainer.train(stage, targets)
                trained.append(done[stage.lineage])
        except (CacheMiss, ArtifactRetired):
            complete = False
        results.append((job, trained, complete))
    return results
