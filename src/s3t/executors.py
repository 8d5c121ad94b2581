"""Where training runs: in this process (the default), or as Ray tasks on a cluster.

An executor brings the restorable orders of each shard to full depth for `unlearning.rebuild`, which is how
a run is trained and restored. Both executors run the same two halves:

- `train_tree` trains one *prefix tree*: the orders of a shard whose first stage is the same, so whatever
  prefix they share is trained once. It caches the frozen trunk's states of the shard's live records
  (those not cached yet), trains each missing stage and saves its artifact file. Trees never share a stage:
  a stage's lineage names its whole prefix, and different first slices hold different records.
- `Registrar` is the driver's half: it registers each stage (with its lineage, and the check that no
  record it saw was deleted meanwhile) and switches the served set once an order is complete, in the same
  transactions whichever executor trained. A stage whose record was deleted is retired and its order left
  truncated for the next restore.

`LocalExecutor` runs the trees one after another and registers each stage as soon as it is trained (an
interrupted run loses at most the stage in progress). `RayExecutor` runs each shard's cache fill as a task,
then each tree as a task that waits for it, in parallel; the driver registers a tree's stages when its task
returns. A worker opens the run read-only from the same absolute path (on a cluster, a shared filesystem:
the run folder holds the key store, the trunk cache and the artifact store; the registry is the run's
SQLite file or its PostgreSQL database) and never writes the registry. It checks that it opened the same
run, with the same s3t version and numeric environment as the driver, and refuses otherwise; the driver
checks each artifact file is where it can read it before registering it. So results are bit-identical to
the local executor's, and an interrupted run resumes like a local one: registered stages are reused, files
saved but never registered are shredded by the run's sweep. Ray retries a task whose worker died
(`max_retries`); a retried task saves the same bytes under the same names.

Ray is an optional extra: `pip install "s3t[ray]"`.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .errors import PlanError, RunError, S3TError
from .training import ArtifactRetired, CacheMiss, OrderJob, StageJob, TrainedStage

if TYPE_CHECKING:
    from .environment import NumericEnvironment
    from .system import S3T
    from .training import Trainer

__all__ = ["Executor", "LocalExecutor", "RayExecutor", "Registrar", "executor_for", "train_tree", "EXECUTORS"]

EXECUTORS = ("local", "ray")
OnStage = Callable[[str], None]
OnOrder = Callable[[dict, list[str]], None]
TreeResult = list[tuple[OrderJob, list[TrainedStage], bool]]   # per order: stages trained, complete or not


class Executor(Protocol):
    def complete(self, trainer: "Trainer", shards: dict[int, list[dict]], *, on_stage: OnStage,
                 on_order: OnOrder) -> None:
        """Bring the given orders of each shard to full depth: register every stage through `trainer` and
        call `on_order(order, lineages)` once an order is complete (not for one whose data went stale)."""


class Registrar:
    """The driver's half of training: registers each trained stage once, parents first, and serves an order
    (`on_order`) once all its stages are registered. Orders with nothing left to train are served at once."""

    def __init__(self, trainer: "Trainer", *, on_stage: OnStage, on_order: OnOrder, check_files: bool = False) -> None:
        self.trainer = trainer
        self.on_stage = on_stage
        self.on_order = on_order
        self.check_files = check_files   # another process saved the files: are they where we read them?
        self.generations: dict[int, dict[str, int]] = {}
        self._registered: set[str] = set()
        self._stale: set[str] = set()    # retired at registration: a record they saw was deleted meanwhile

    def trees(self, shards: dict[int, list[dict]]) -> list[list[OrderJob]]:
        """The prefix trees to train, shard by shard."""
        trees = []
        for shard, orders in sorted(shards.items()):
            jobs, self.generations[shard] = self.trainer.jobs(shard, orders)
            by_first = defaultdict(list)
            for job in jobs:
                if job.stages:
                    by_first[job.lineages[0]].append(job)
                else:
                    self.order(job)   # every stage is registered already
            trees += by_first.values()
        return trees

    def stage(self, job: OrderJob, trained: TrainedStage) -> bool:
        """Register one stage (once); False if it is stale, and with it the order."""
        lineage = trained.job.lineage
        if lineage in self._registered:
            return True   # shared with an order registered before
        if lineage in self._stale:
            return False
        if self.check_files and not self.trainer.store.verify(lineage, trained.sha256):
            raise RunError(f"a Ray worker saved stage {lineage[:12]}… where this process cannot read it (under "
                           f"{self.trainer.store.root}): every worker must see the run folder at the same path "
                           "(a shared filesystem)")
        try:
            self.trainer.register(trained, generations=self.generations[job.shard])
        except CacheMiss:
            self._stale.add(lineage)
            return False
        self._registered.add(lineage)
        self.on_stage(f"shard {job.shard} order {job.order['position']} stage {trained.job.stage}")
        return True

    def order(self, job: OrderJob) -> None:
        self.on_order(job.order, job.lineages)

    def tree(self, results: TreeResult) -> None:
        """Register what a tree's task trained, as `train_tree` would have in process."""
        for job, trained, complete in results:
            if all(self.stage(job, t) for t in trained) and complete:
                self.order(job)


def train_tree(trainer: "Trainer", jobs: Sequence[OrderJob], registrar: Registrar | None = None) -> TreeResult:
    """Train the missing stages of one prefix tree, saving their files; with a `registrar`, register each
    stage as it is trained and serve each order once complete (in process). Returns, per order, the stages
    it trained (parents first) and whether it is complete (False when a record it needs was deleted)."""
    targets = trainer.prepare(jobs[0].shard)
    done: dict[str, TrainedStage] = {}
    results = []
    for job in jobs:
        trained, complete = [], True
        try:
            for stage in job.stages:
                if stage.lineage not in done:
                    done[stage.lineage] = trainer.train(stage, targets)
                trained.append(done[stage.lineage])
                if registrar is not None and not registrar.stage(job, done[stage.lineage]):
                    complete = False
                    break
        except (CacheMiss, ArtifactRetired):
            complete = False   # a record was deleted mid-training: this order's data is stale, leave it truncated
        if registrar is not None and complete:
            registrar.order(job)
        results.append((job, trained, complete))
    return results


class LocalExecutor:
    """Train in this process, tree after tree, registering each stage as it is trained."""

    def complete(self, trainer: "Trainer", shards: dict[int, list[dict]], *, on_stage: OnStage,
                 on_order: OnOrder) -> None:
        registrar = Registrar(trainer, on_stage=on_stage, on_order=on_order)
        for tree in registrar.trees(shards):
            train_tree(trainer, tree, registrar)

    def __repr__(self) -> str:
        return "LocalExecutor()"


class RayExecutor:
    """Train shards' prefix trees as Ray tasks, in parallel; register them here.

    `address`: the Ray cluster to join ("auto", "ray://host:10001", ...); None joins the one this process
    already initialised, or starts a local one for the call (on `num_cpus` CPUs, default all) and stops it
    after. A process that already initialised Ray uses that instance, whatever `address` says. Each task
    asks for the run's pinned thread count in CPUs. `max_retries`: how often a task whose worker died is
    run again.
    """

    def __init__(self, address: str | None = None, *, num_cpus: int | None = None, max_retries: int = 3) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self.max_retries = max_retries

    def __repr__(self) -> str:
        return f"RayExecutor(address={self.address!r})"

    def complete(self, trainer: "Trainer", shards: dict[int, list[dict]], *, on_stage: OnStage,
                 on_order: OnOrder) -> None:
        registrar = Registrar(trainer, on_stage=on_stage, on_order=on_order, check_files=True)
        trees = registrar.trees(shards)
        if not trees:
            return   # nothing to train: no Ray needed
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
            self._run(ray, trainer, trees, registrar)
        finally:
            if started:
                ray.shutdown()

    def _run(self, ray, trainer: "Trainer", trees: list[list[OrderJob]], registrar: Registrar) -> None:
        threads = trainer.environment.threads
        largest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=0)
        if largest < threads:   # its tasks would wait for ever
            raise RunError(f"the run trains with {threads} threads (its plan's num_threads) and each Ray task asks "
                           f"for as many CPUs, but no node of the Ray cluster has more than {largest:g}")
        options = dict(num_cpus=threads, max_retries=self.max_retries)
        prepare, train = ray.remote(**options)(_prepare_shard), ray.remote(**options)(_train_tree)
        run = RunRef.of(trainer)
        filled = {shard: prepare.remote(run, shard) for shard in sorted({tree[0].shard for tree in trees})}
        pending = [train.remote(filled[tree[0].shard], run, tree) for tree in trees]
        failure = None
        try:
            while pending:
                [ready], pending = ray.wait(pending, num_returns=1)
                try:
                    results = ray.get(ready)
                except ray.exceptions.RayError as exc:   # register the other tasks' work first, then raise
                    failure = failure or _reason(exc)
                    continue
                registrar.tree(results)
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


def _reason(exc: Exception) -> S3TError:
    """A failed task as one line: the worker's own s3t error as it was raised, anything else named."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, S3TError):
        return cause
    what = cause if isinstance(cause, BaseException) else exc
    reason = f"{type(what).__name__}: {what}".splitlines()[0]
    error = RunError(f"a Ray training task failed ({reason}); registered stages are kept: run the same "
                     "command again to resume")
    error.__cause__ = exc
    return error


# -- on the workers ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunRef:
    """What a worker needs to open the driver's run and check it is the same one, trained the same way."""

    path: str                          # absolute: a worker's working folder is not the driver's
    run_id: str
    version: str                       # s3t's: the training code
    environment: "NumericEnvironment"

    @classmethod
    def of(cls, trainer: "Trainer") -> "RunRef":
        from . import __version__
        from .system import RUN_ID

        return cls(str(Path(trainer.run_dir).resolve()), trainer.registry.get_meta(RUN_ID), __version__,
                   trainer.environment)


_OPEN: dict[str, "S3T"] = {}   # per worker process: the run it has open (one at a time: each holds a model)


def _trainer(run: RunRef) -> "Trainer":
    """This worker's trainer for `run`, opened read-only once per worker process (reopened when the folder
    holds another run now), after checking it is the driver's run, code and numeric environment."""
    from . import __version__
    from .system import RUN_ID, S3T

    host = os.uname().nodename
    system = _OPEN.get(run.path)
    if system is None or system.registry.get_meta(RUN_ID) != run.run_id:
        for old in _OPEN.values():
            old.close()
        _OPEN.clear()
        system = S3T.open(run.path, recover=False)
        if system.registry.get_meta(RUN_ID) != run.run_id:
            system.close()
            raise RunError(f"the Ray worker on {host} finds another run at {run.path}: every worker must see the "
                           "driver's run folder at the same path (a shared filesystem)")
        _OPEN[run.path] = system
    if __version__ != run.version:
        raise RunError(f"the Ray worker on {host} runs s3t {__version__}, the driver s3t {run.version}: install "
                       "the same version on every node")
    here = system.environment()
    if here != run.environment:
        raise RunError(f"the Ray worker on {host} trains in another numeric environment than the driver "
                       f"({'; '.join(run.environment.differences(here))}): its stages would not be bit-identical "
                       "to the driver's; give the workers the same library versions, CPU type and device")
    return system.trainer


def _prepare_shard(run: RunRef, shard: int) -> None:
    """Cache the trunk states of one shard's live records (the shard's tree tasks wait for this one)."""
    _trainer(run).prepare(shard)


def _train_tree(_filled: None, run: RunRef, jobs: Sequence[OrderJob]) -> TreeResult:
    """One prefix tree on a worker. It keeps no weights between tasks: parents load from their files,
    verified against the registry, and a stage retired since cannot linger in a worker's memory."""
    trainer = _trainer(run)
    trainer.forget()
    try:
        return train_tree(trainer, jobs)
    finally:
        trainer.forget()
