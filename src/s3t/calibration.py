"""Throughput measured on the user's own model and data: a few training batches at every stage depth.

`calibrate` builds a throw-away run (one shard, one order, one epoch) on a small sample of the data, in a
temporary folder, and times the real trainer: the frozen forward that fills the trunk cache, then
`Trainer.train_stage` at each depth 1..L (stage i trains layer group i with groups 1..i-1 active above
the cached trunk, exactly as training and restoration do). The result feeds `cost.cost_report`.

    throughput = calibrate(Plan.from_toml("plan.toml"), Dataset.from_jsonl("train.jsonl"), batches=4)
    throughput.per_depth      # examples/s at depth 1..L
"""

from __future__ import annotations

import hashlib
import math
import tempfile
import time
from pathlib import Path

from s3t.cost import Throughput
from s3t.errors import DataError, PlanError
from s3t.partition import partition
from s3t.plan import Plan
from s3t.records import Dataset, from_payload

__all__ = ["calibrate", "calibrate_run", "run_info"]

# Any 64-hex string: the timing stages are never registered, their lineage only seeds their RNG.
_TIMING_LINEAGE = "0" * 64


def calibrate(plan: Plan, data: Dataset, *, batches: int = 4) -> Throughput:
    """Examples/s of `plan`'s training at each stage depth, and records/s of the trunk fill, on `data`.

    Times `batches` batches of `plan.batch_size` records per depth (after one warm-up batch per depth), the
    depths taking turns, and keeps each depth's fastest batch; with the plan's base model, LoRA settings
    and sequence length. Nothing is written outside a temporary folder. Other work on the machine still
    adds noise: calibrate when it is otherwise idle, with more batches when it is not.
    """
    from s3t.system import S3T

    if not isinstance(plan, Plan):
        raise PlanError(f"`plan` must be an s3t.Plan; got {type(plan).__name__}.")
    if not isinstance(data, Dataset):
        raise DataError(f"`data` must be an s3t.Dataset; got {type(data).__name__}. Load one with Dataset.from_jsonl.")
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise PlanError(f"`batches` must be an int >= 1; got {batches!r}. Use 4 for a quick measure.")
    L = plan.num_slices
    warm, timed = plan.batch_size, batches * plan.batch_size
    if len(data) < max(L, warm + 1):
        raise DataError(f"calibration needs at least {max(L, warm + 1)} records (one per slice, one warm-up batch "
                        f"of `batch_size` = {plan.batch_size}, then some to time); got {len(data)}.")
    # One shard, one order, one epoch: the same stages, fewer of them. Hash placement keeps the sample's cells
    # computable here, so the sample can hold a record of every slice (an empty one would never be trained).
    probe = plan.replace(num_shards=1, budget=1, epochs=1, selection="cyclic", deletion_prior=None, placement="hash")
    sample = _sample(data, probe, warm + timed)
    with tempfile.TemporaryDirectory(prefix="s3t-calibrate-") as tmp:
        system = S3T.create(Path(tmp) / "run", probe, sample)
        try:
            trainer = system.trainer
            ids = list(sample.ids)
            model_input = {r.id: r.model_input for r in sample}
            targets = ({r.id: system.labels.index(r.label) for r in sample}
                       if trainer.model.task == "classify" else None)   # a completion's tokens are its targets
            warm_ids, timed_ids = ids[:warm], ids[warm:]
            trainer.cache.fill(trainer.model, warm_ids, model_input.__getitem__)   # untimed: first calls are slow
            started = time.perf_counter()
            trainer.cache.fill(trainer.model, timed_ids, model_input.__getitem__)
            trunk = len(timed_ids) / (time.perf_counter() - started)
            for depth in range(1, L + 1):
                # One untimed batch first: the first backward through a depth allocates its buffers.
                trainer.train_stage(stage=depth, lineage=_TIMING_LINEAGE, parents=(), ids=warm_ids, targets=targets)
            # Depths take turns batch by batch, so a burst of other work slows them alike; each depth keeps
            # its fastest batch, since interference only ever adds time.
            per_example: dict[int, float] = {}
            for b in range(0, len(timed_ids), plan.batch_size):
                batch = timed_ids[b:b + plan.batch_size]
                for depth in range(1, L + 1):
                    started = time.perf_counter()
                    trainer.train_stage(stage=depth, lineage=_TIMING_LINEAGE, parents=(), ids=batch, targets=targets)
                    elapsed = (time.perf_counter() - started) / len(batch)
                    per_example[depth] = min(per_example.get(depth, math.inf), elapsed)
            rates = [1.0 / per_example[depth] for depth in range(1, L + 1)]
        finally:
            system.close()
    return Throughput(tuple(rates), trunk, source=f"calibrated: fastest of {-(-len(timed_ids) // plan.batch_size)} "
                                                  f"batches per depth")


def run_info(run_dir: str | Path) -> tuple[Plan, int]:
    """(plan, live records) of an existing run."""
    from s3t.system import S3T

    system = S3T.open(run_dir)
    try:
        return system.plan, system.registry.count_records()[0]
    finally:
        system.close()


def calibrate_run(run_dir: str | Path, *, plan: Plan | None = None, batches: int = 4) -> Throughput:
    """`calibrate` on a sample of an existing run's live records, with its plan (or `plan`, same base model).

    The run itself is only read: the timing happens in a temporary run built from the plan and the sample.
    """
    from s3t.system import S3T

    system = S3T.open(run_dir)
    try:
        plan = system.plan if plan is None else plan
        need = 4 * (batches + 1) * plan.batch_size
        rows: list = []
        for shard in range(system.plan.num_shards):   # the first shards are enough: each holds every slice
            _members, content = system.registry.live_shard(shard)
            rows += [from_payload(system.kind, i, stored) for i, stored in content.items()]
            if len(rows) >= need:
                break
    finally:
        system.close()
    if not rows:
        raise DataError(f"the run at {run_dir} has no live records to time training on")
    return calibrate(plan, Dataset(rows), batches=batches)


def _sample(data: Dataset, plan: Plan, size: int) -> Dataset:
    """About `size` records of `data`, dealt round-robin from every slice the plan's partition gives them."""
    cells = partition(data, seed=plan.seed, num_shards=1, num_slices=plan.num_slices)
    by_slice: dict[int, list[str]] = {}
    # A seeded hash order, not file order: files are often sorted by label.
    for rid in sorted(data.ids, key=lambda i: hashlib.sha256(f"{plan.seed}:{i}".encode()).digest()):
        by_slice.setdefault(cells[rid][1], []).append(rid)
    picked: list[str] = []
    while len(picked) < size and any(by_slice.values()):
        for ids in by_slice.values():
            if ids and len(picked) < size:
                picked.append(ids.pop())
    return data.subset(picked)
