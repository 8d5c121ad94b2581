"""Top-down slice-wise training: one stage per layer group, on cumulative slices, prefix-shared.

Stage i of an order π trains only layer group i's LoRA adapters (and, for classification, the head) on
slices π1..πi; groups 1..i-1 are loaded at the values their own stages reached and stay frozen; deeper
groups are absent. The loss is the model family's: cross-entropy on the label, or on the completion tokens.
A stage is named by its lineage hash, so a prefix shared by several orders (or unchanged by a deletion)
is trained once and reused, and an interrupted run resumes where it stopped. `Trainer.jobs` says what an
order still needs; `s3t.executors` trains it (in this process or on Ray) and `Trainer.register` records it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cache import CacheMiss, TrunkCache
from .environment import NumericEnvironment, pinned
from .errors import IntegrityError
from .lineage import epoch_order, lineage_hash, slice_digest, stage_seed
from .models import LayeredModel
from .records import from_payload
from .registry import Registry
from .store import ArtifactStore
from .truncation import attainable_depth

__all__ = ["Trainer", "StageResult", "StageJob", "OrderJob", "TrainedStage", "ArtifactRetired"]


class ArtifactRetired(KeyError):
    """A stage's artifact was retired: a record it saw was deleted (possibly while training used it)."""


@dataclass
class StageResult:
    """What one stage produced: the tensors to store and the mean loss of each epoch."""

    tensors: dict[str, torch.Tensor]
    epoch_losses: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class StageJob:
    """One stage to train: what a worker needs besides the run itself (see `s3t.executors`)."""

    stage: int
    lineage: str
    parents: tuple[str, ...]    # the lineages of stages 1..stage-1, loaded frozen below it
    ids: tuple[str, ...]        # the records of its cumulative slices
    seed: int


@dataclass(frozen=True)
class OrderJob:
    """One order of a shard to bring to full depth: all its stage lineages, and the stages still to train."""

    shard: int
    order: dict
    lineages: list[str]
    stages: list[StageJob]


@dataclass(frozen=True)
class TrainedStage:
    """A stage whose artifact file is saved and not yet registered."""

    job: StageJob
    sha256: str
    loss: float | None


@dataclass
class Trainer:
    """Trains and registers stage artifacts for the orders of a run."""

    run_dir: Path               # the run folder (workers of another executor open it from the same path)
    model: LayeredModel
    kind: str                   # the records' kind (records.KINDS): how stored content becomes model input
    registry: Registry
    store: ArtifactStore
    training: dict              # plan.training_fields(): what a stage's computation depends on
    base_digest: str
    environment: NumericEnvironment   # the numeric stack stages are trained on (pinned where it can be)
    labels: Sequence[str]
    epochs: int
    learning_rate: float
    batch_size: int
    cache: TrunkCache
    _tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    # -- lineage ------------------------------------------------------------------------------------
    def lineages(self, order: Sequence[int], members: dict[int, list[str]],
                 generations: dict[str, int] | None = None) -> list[str]:
        """Lineage hash of every stage of `order` on the shard's current members (`generations`: of the
        re-added ones; without it, the names a fresh run would give them, which their seeds come from)."""
        digests = [slice_digest(members.get(s, []), generations) for s in order]
        return [lineage_hash(training=self.training, base_model=self.base_digest,
                             environment=self.environment.fingerprint, prefix=digests[:i])
                for i in range(1, len(order) + 1)]

    def load(self, lineage: str, sha256: str | None = None) -> dict[str, torch.Tensor]:
        """An artifact's tensors, verified against the registry's hash the first time it is read."""
        tensors = self._tensors.get(lineage)   # `forget` may run on another thread
        if tensors is None:
            if sha256 is None:
                row = self.registry.artifact(lineage)
                if row is None:
                    raise ArtifactRetired(lineage)
                sha256 = row["sha256"]
            try:
                tensors = self._tensors[lineage] = self.store.load(lineage, sha256)
            except IntegrityError:
                if self.registry.artifact(lineage) is None:   # retired (and shredded) while we read it
                    raise ArtifactRetired(lineage) from None
                raise
        return tensors

    def forget(self, lineages: Sequence[str] | None = None) -> None:
        """Drop retired artifacts' tensors from memory (and make serving slots that hold them reload); None:
        every artifact held."""
        gone = set(self._tensors if lineages is None else lineages)
        for lineage in gone:
            self._tensors.pop(lineage, None)
        for slot, held in list(self.model.slot_contents.items()):
            if gone & set(held):
                self.model.slot_contents.pop(slot, None)

    def _usable(self, lineage: str) -> bool:
        row = self.registry.artifact(lineage)
        return row is not None and self.store.verify(lineage, row["sha256"])

    # -- one stage ----------------------------------------------------------------------------------
    def batch_loss(self, batch: Sequence[str], start: int, targets: dict[str, int] | None) -> torch.Tensor:
        """Loss of a training batch: cached frozen state at block `start`, then the adapted blocks above."""
        hidden, aux = self.cache.load(batch, start, device=self.model.device)
        y = None if targets is None else torch.tensor([targets[i] for i in batch], device=self.model.device)
        return self.model.loss(self.model.top(hidden, aux, start), aux, y)

    def train_stage(self, *, stage: int, lineage: str, parents: Sequence[str], ids: Sequence[str],
                    targets: dict[str, int] | None, seed: int | None = None) -> StageResult:
        """Train layer group `stage` (and the head) on `ids`, on top of the `parents` stages 1..stage-1.

        `targets` maps each id to its label's index (classification); None when the targets are part of
        the model input (a completion's tokens). `seed` is given apart from `lineage` for re-added
        records (see `s3t.lineage`).

        Input is each record's cached frozen hidden state at the bottom of group `stage`: the blocks
        below run no adapter at this stage, so their output is the same for every stage and order.
        """
        bb = self.model
        seed = stage_seed(lineage) if seed is None else seed   # given apart for re-added records (see lineage)
        # S3T: stage i trains group i from a fresh init. SISA (one group): every stage continues group 1.
        group = bb.groups_at(stage)
        # A private, lineage-seeded RNG: LoRA init, head init and dropout never see global RNG state; the
        # thread count is the run's, whatever the process was started with.
        with torch.random.fork_rng(devices=[]), pinned(self.environment):
            torch.manual_seed(seed)
            for parent in parents:          # group i + head of stage i; the last one leaves head = stage-1's
                bb.load_state(self.load(parent))
            if group == stage:
                bb.reset_group(group)
            if stage == 1:
                bb.reset_head()
            bb.set_active(group, train_group=group)
            frozen = {g: bb.group_state(g) for g in range(1, group)}
            start = bb.group_start(group)
            optimizer = torch.optim.AdamW(bb.trainable_parameters(group), lr=self.learning_rate)
            losses = []
            for epoch in range(self.epochs):
                order = epoch_order(ids, seed=seed, epoch=epoch)
                total, count = 0.0, 0
                for b in range(0, len(order), self.batch_size):
                    batch = order[b:b + self.batch_size]
                    loss = self.batch_loss(batch, start, targets)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += loss.item() * len(batch)
                    count += len(batch)
                if count:
                    losses.append(total / count)
            # Isolation: a stage may change only its own group and the head.
            for g, before in frozen.items():
                after = bb.group_state(g)
                assert all(torch.equal(before[k], after[k]) for k in before), f"stage {stage} changed group {g}"
            bb.set_active(0)
            return StageResult({**bb.group_state(group), **bb.head_state()}, losses)

    # -- orders -------------------------------------------------------------------------------------
    def jobs(self, shard: int, orders: Sequence[dict]) -> tuple[list[OrderJob], dict[str, int]]:
        """What bringing `orders` of one shard to full depth on its current live data takes: per order, its
        stage lineages and the stages not trained yet (parents first); and the shard's re-added records'
        generations, which registration records. Orders whose first slice is empty are left out: never
        trained, never served (depth stays 0)."""
        members = self.registry.live_members(shard)
        generations = self.registry.generations(shard)   # fixed while we train (see Registry.generations)
        jobs = []
        for order in orders:
            if not attainable_depth(order["slices"], members):
                continue
            lineages = self.lineages(order["slices"], members, generations)
            seeds = self.lineages(order["slices"], members) if generations else lineages
            stages = [StageJob(stage=k, lineage=lineages[k - 1], parents=tuple(lineages[:k - 1]),
                               ids=tuple(sorted(i for s in order["slices"][:k] for i in members.get(s, []))),
                               seed=stage_seed(seeds[k - 1]))
                      for k in range(1, len(lineages) + 1) if not self._usable(lineages[k - 1])]
            jobs.append(OrderJob(shard=shard, order=order, lineages=lineages, stages=stages))
        return jobs, generations

    def prepare(self, shard: int) -> dict[str, int] | None:
        """Cache the frozen trunk's states of the shard's live records (those not cached yet) and return the
        training targets: each id's label index (classification), None when completions are the targets."""
        _members, rows = self.registry.live_shard(shard)
        records = {i: from_payload(self.kind, i, content) for i, content in rows.items()}
        with pinned(self.environment):   # writes live records only
            self.cache.fill(self.model, sorted(records), lambda i: records[i].model_input)
        if self.model.task != "classify":
            return None
        label_index = {label: k for k, label in enumerate(self.labels)}
        return {i: label_index[r.label] for i, r in records.items()}

    def train(self, job: StageJob, targets: dict[str, int] | None) -> TrainedStage:
        """Train one stage and save its artifact file; registering it is the caller's (`register`)."""
        result = self.train_stage(stage=job.stage, lineage=job.lineage, parents=job.parents, ids=job.ids,
                                  targets=targets, seed=job.seed)
        sha = self.store.save(job.lineage, result.tensors, {"stage": str(job.stage), "examples": str(len(job.ids))})
        self._tensors[job.lineage] = result.tensors   # its children load it before it is registered
        return TrainedStage(job, sha, result.epoch_losses[-1] if result.epoch_losses else None)

    def register(self, trained: TrainedStage, *, generations: dict[str, int] | None = None) -> None:
        """Record a saved stage and its lineage (file first: a crash leaves no dangling row, and a file left
        without its row is shredded by the run's sweep: see `S3T.sweep`). Raises `CacheMiss` when a record
        it saw was deleted meanwhile: the stage is retired and its order's data is stale."""
        job = trained.job
        with self.registry.transaction() as conn:
            self.registry.add_environment(conn, self.environment.fingerprint, self.environment.to_dict())
            self.registry.add_artifact(conn, lineage_hash=job.lineage, sha256=trained.sha256, stage=job.stage,
                                       examples=len(job.ids), loss=trained.loss, record_ids=list(job.ids),
                                       environment=self.environment.fingerprint, generations=generations)
            # Writers are serialised: either a deletion of one of `ids` saw this row and retired it, or it
            # committed before this check, which retires the stage now (the rebuild's sweep shreds the file).
            stale = self.registry.saw_deleted(conn, [job.lineage])
            self.registry.retire(conn, stale)
        if stale:
            self.forget(stale)
            raise CacheMiss(job.lineage)

    def pending(self, shard: int, orders: Sequence[dict]) -> int:
        """Number of distinct stages `complete` would train for these orders (for progress bars)."""
        members, generations = self.registry.live_members(shard), self.registry.generations(shard)
        todo = {h for o in orders if attainable_depth(o["slices"], members)
                for h in self.lineages(o["slices"], members, generations)}
        return sum(not self._usable(h) for h in todo)
