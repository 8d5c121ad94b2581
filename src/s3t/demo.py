"""The end-to-end demo on the embedded default: BBC News on all-MiniLM-L6-v2, offline.

Train S3T, measure held-out accuracy, delete a few records and one data subject (printing receipts and
served depths), measure again, restore, measure again. The test split is never used for any choice.
"""

from __future__ import annotations

import hashlib
import random
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .datasets import bbc_news
from .errors import DataError
from .plan import Plan
from .records import Dataset

__all__ = ["DEMO_PLAN", "demo_data", "run_demo"]

# 2 shards x 3 slices, every cyclic order. One MiniLM block per layer group: the top 3 blocks are adapted
# and the bottom 3 stay frozen, as in the paper's runs (RoBERTa-large adapts 14 of 24 blocks); their
# output is computed once per record (the trunk cache) and shared by every stage, order and shard.
DEMO_PLAN = Plan(num_shards=2, num_slices=3, budget=3, blocks_per_slice=1, epochs=1, max_length=64, batch_size=16,
                 learning_rate=2e-3, lora_rank=8, seed=0)
NUM_SUBJECTS = 150


def demo_data(*, test_fraction: float = 0.2) -> tuple[Dataset, Dataset]:
    """BBC News split into train/test, each article given one of 150 synthetic data owners."""
    def owner(record_id: str) -> str:
        return f"reader-{int(hashlib.sha256(record_id.encode()).hexdigest(), 16) % NUM_SUBJECTS}"

    data = Dataset.from_records([dict(id=r.id, text=r.text, label=r.label, subject=owner(r.id)) for r in bbc_news()])
    return data.split(test_fraction=test_fraction, seed=0)


def run_demo(run_dir: Path, *, plan: Plan = DEMO_PLAN, deletions: int = 5, console: Console | None = None) -> dict:
    """Run the demo in `run_dir` (must not hold a run yet); returns the measured figures."""
    from .system import S3T

    console = console or Console()
    train, test = demo_data()
    # Checked before training, not by random.sample after it; one record must survive the single-record
    # deletions, to own the subject deleted after them.
    if not 0 <= deletions < len(train):
        raise DataError(f"`deletions` (--deletions) must be between 0 and {len(train) - 1}: the demo trains on "
                        f"{len(train)} records and one must remain for the subject request; got {deletions}.")
    console.print(f"[bold]s3t demo[/]: BBC News, {len(train)} train / {len(test)} test articles, "
                  f"{len(train.labels)} classes; {plan!r}")
    started = time.perf_counter()
    system = S3T.create(run_dir, plan, train)
    system.train()
    figures = {"train_seconds": round(time.perf_counter() - started, 1)}
    figures["accuracy_full"] = system.score(test)
    console.print(f"trained in {figures['train_seconds']} s; held-out accuracy at full depth: "
                  f"[bold]{figures['accuracy_full']:.3f}[/]")

    rng = random.Random(0)
    victims = rng.sample(list(train.ids), deletions)
    subject = rng.choice(sorted({r.subject for r in train if r.id not in victims}))
    receipts = [system.delete(ids=[v], reference=f"demo request {k + 1}") for k, v in enumerate(victims)]
    receipts.append(system.delete(subjects=[subject], reference="demo subject request"))
    table = Table("request", "records deleted", "shard: depth before → after", "took (ms)", "lineage check")
    for r in receipts:
        table.add_row(r.reference, str(len(r.deleted)),
                      ", ".join(f"{s['shard']}: {s['depth_before']}→{s['depth_after']}" for s in r.shards),
                      f"{r.duration_ms:.1f}", r.lineage_check.split(":")[0])
    console.print(table)
    console.print(f"subject {subject!r} owned {len(receipts[-1].deleted)} training records")
    _print_status(console, system)
    figures["accuracy_after_deletions"] = system.score(test) if system.status().serving else None
    console.print(f"held-out accuracy after deletions: {_accuracy(figures['accuracy_after_deletions'])}")

    started = time.perf_counter()
    system.restore()
    figures["restore_seconds"] = round(time.perf_counter() - started, 1)
    figures["accuracy_restored"] = system.score(test)
    console.print(f"restored in {figures['restore_seconds']} s; held-out accuracy: "
                  f"[bold]{figures['accuracy_restored']:.3f}[/]")
    _print_status(console, system)
    system.close()
    return figures


def _accuracy(value: float | None) -> str:
    """An accuracy for the console; None means deletions left no shard to score with."""
    return "no live shard (needs restore)" if value is None else f"[bold]{value:.3f}[/]"


def _print_status(console: Console, system) -> None:
    table = Table("shard", "live orders", "served order", "served depth", "deletions to drop")
    for s in system.status().shards:
        table.add_row(str(s.shard), f"{s.live_orders}/{s.orders}", str(s.served_order), str(s.served_depth),
                      str(s.deletions_to_drop))
    console.print(table)
