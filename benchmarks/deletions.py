"""Accuracy under deletion: S3T against SISA, full retraining and a plain fine-tune, on the same requests.

    python benchmarks/deletions.py                 # BBC News, demo plan (m=2, L=3), 15 requests, every 3
    python benchmarks/deletions.py --quick         # 240 records, 4 requests: an end-to-end check (~3 min)
    python benchmarks/deletions.py --data my.jsonl --plan plan.toml --deletions 20 --every 4

Methods, all on the engine (the plan's m and L, trained on the same training split):
- fine-tune:    one plain LoRA fine-tune on all the data (m=1, L=1, one group over every block S3T adapts);
                the "near full training" reference. It cannot forget, so it is measured before deletions only;
- SISA:         `method="sisa"`, one order per shard; every deletion is followed at once by `restore()`,
                which retrains the hit shard from its last clean slice checkpoint (latency = delete + restore);
- S3T B=b:      b in {1, ceil(L/2), L}; a deletion only truncates (latency = the receipt's time, no training);
- full retrain: the fine-tune retrained from scratch on the reduced data. To fit the budget it is retrained
                only at the evaluation checkpoints; each request is charged the retrain time measured there.
- S3T B=L BMS, S3T B=L prior-aware: trained knowing the hot sequence's prior (BMS from each slice's share of
                the request weight; prior-aware placement from each subject's risk) and replayed on it only.

Two request sequences, applied identically to every method: one record at a time, uniform over the training
records; and whole data subjects, where 10% of the subjects send 50% of the requests (the capacity
simulator's "hot" model). Data without subjects gets synthetic ones, as `s3t.demo.demo_data` does.
Accuracy is measured on the held-out test split (never used for any choice) after every `--every` requests;
an S3T system with no live shard has no accuracy (recorded as missing). Everything random is seeded.
The core is `run_experiment`; `main` adds data loading, the capacity simulation, CSV/JSON, plots and the
report (`deletions_report.py`).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import s3t
from s3t import Dataset, Plan

FINE_TUNE, SISA, RETRAIN = "fine-tune", "SISA", "full retrain"
UNIFORM, HOT = "uniform records", "hot subjects"
HOT_FRACTION, HOT_SHARE = 0.1, 0.5   # the skewed sequence: 10% of subjects send 50% of requests
QUICK_RECORDS, QUICK_TEST = 240, 100


@dataclass(frozen=True)
class Request:
    """One deletion request: a record id or a data subject."""

    kind: str     # "id" | "subject"
    target: str

    def kwargs(self) -> dict:
        return {"ids": [self.target]} if self.kind == "id" else {"subjects": [self.target]}


# -- data and request sequences ------------------------------------------------------------------------------
def with_subjects(data: Dataset, num_subjects: int) -> Dataset:
    """`data`, each record without a subject given one of `num_subjects` synthetic owners (hash of its id)."""
    def owner(record_id: str) -> str:
        return f"owner-{int(hashlib.sha256(record_id.encode()).hexdigest(), 16) % num_subjects}"

    return Dataset.from_records([dict(id=r.id, text=r.text, label=r.label, subject=r.subject or owner(r.id),
                                      risk=r.risk) for r in data])


def hot_weights(train: Dataset, *, seed: int) -> dict[str, float]:
    """Request weight of every subject under the skewed model: a seeded 10% of them send 50% of requests.

    The weights are the capacity simulator's (`Requests(distribution="hot")`), so the two agree.
    """
    from s3t.capacity import Requests

    subjects = sorted({r.subject for r in train if r.subject is not None})
    random.Random(seed + 1).shuffle(subjects)   # which subjects are hot
    weights = Requests(distribution="hot", population=len(subjects), hot_fraction=HOT_FRACTION,
                       hot_share=HOT_SHARE).weights()
    return dict(zip(subjects, weights.tolist()))


def deletion_sequences(train: Dataset, n: int, *, seed: int) -> dict[str, list[Request]]:
    """The two request sequences: uniform over records, and hot subjects (whole subjects, skewed)."""
    import numpy as np

    ids = sorted(train.ids)
    weights = hot_weights(train, seed=seed)
    if n > len(ids) or n > len(weights):
        raise s3t.DataError(f"{n} requests per sequence is more than the {len(ids)} records or {len(weights)} "
                            "subjects of the training split; lower --deletions")
    uniform = [Request("id", i) for i in random.Random(seed).sample(ids, n)]
    # Without replacement, probability proportional to weight: sort by exponential keys E / w.
    subjects, w = list(weights), np.array(list(weights.values()))
    keys = np.random.default_rng(seed).exponential(size=len(subjects)) / w
    hot = [Request("subject", subjects[k]) for k in np.argsort(keys, kind="stable")[:n]]
    return {UNIFORM: uniform, HOT: hot}


def with_hot_prior(train: Dataset, weights: dict[str, float]) -> Dataset:
    """`train` with each record's `risk` set from its subject's request weight w: w / (w + mean w).

    This is the simulator's risk (0.5 for everyone under a uniform prior); hot subjects' records get about
    0.83 and the others about 0.36, so prior-aware placement moves exactly the hot subjects' records.
    """
    mean = sum(weights.values()) / len(weights)
    return Dataset.from_records([dict(id=r.id, text=r.text, label=r.label, subject=r.subject,
                                      risk=weights[r.subject] / (weights[r.subject] + mean)) for r in train])


def method_plans(plan: Plan, *, budgets: Sequence[int] | None = None) -> dict[str, Plan]:
    """The plan of every trained method, derived from the S3T plan (same m, L, LoRA and optimiser)."""
    L = plan.num_slices
    adapted = L * _blocks_per_slice(plan.base_model, plan)
    base = plan.replace(method="s3t", selection="cyclic", deletion_prior=None, placement="hash")
    plans = {FINE_TUNE: base.replace(num_shards=1, num_slices=1, budget=1, blocks_per_slice=adapted),
             SISA: base.replace(method="sisa", budget=1)}
    for b in sorted(set(budgets or (1, math.ceil(L / 2), L))):
        plans[f"S3T B={b}"] = base.replace(budget=b)
    return plans


def prior_plans(plan: Plan, train: Dataset, weights: dict[str, float]) -> dict[str, Plan]:
    """S3T B=L under the skewed prior: BMS given the per-slice prior the requests imply, and prior-aware placement.

    BMS gets what the capacity simulator gives it: each slice's share of the request weight, summed over
    shards, on the plan's hash placement. Both are compared with cyclic "S3T B=L" on the hot sequence.
    """
    from s3t.partition import partition

    L = plan.num_slices
    base = plan.replace(method="s3t", budget=L, selection="cyclic", deletion_prior=None, placement="hash")
    cells = partition(train, seed=base.seed, num_shards=base.num_shards, num_slices=L)
    mass, seen = [0.0] * L, set()
    for r in train:   # a subject's records share one cell: count each subject's weight once
        if r.subject not in seen:
            seen.add(r.subject)
            mass[cells[r.id][1]] += weights[r.subject]
    return {f"S3T B={L} BMS": base.replace(selection="bms", deletion_prior=tuple(mass)),
            f"S3T B={L} prior-aware": base.replace(placement="prior_aware")}


# -- measuring ------------------------------------------------------------------------------------------------
def _artifacts(system) -> dict[str, dict]:
    from sqlalchemy import select

    from s3t.registry import artifacts

    with system.registry.engine.connect() as conn:
        return {r.lineage: r._asdict() for r in conn.execute(select(artifacts))}


def _work(system, rows: Sequence[dict]) -> tuple[int, int]:
    """(stage-examples, block-examples) of trained artifacts: examples x epochs, and x the blocks each stage runs.

    An S3T stage i runs groups 1..i (i x blocks_per_slice blocks); a SISA stage runs every adapted block.
    """
    p = system.plan
    bps = _blocks_per_slice(p.base_model, p)
    stage_ex = sum(r["examples"] for r in rows) * p.epochs
    blocks = (lambda stage: p.num_slices * bps) if p.method == "sisa" else (lambda stage: stage * bps)
    return stage_ex, sum(r["examples"] * blocks(r["stage"]) for r in rows) * p.epochs


@functools.cache
def _num_blocks(base_model: str | None) -> int:
    from s3t.models import count_blocks, resolve_model_path

    return count_blocks(resolve_model_path(base_model))


def _blocks_per_slice(base_model: str | None, plan: Plan) -> int:
    return plan.blocks_for(_num_blocks(base_model))


class _Scorer:
    """Held-out accuracy of a system, memoised by served-set version (same served set, same predictions)."""

    def __init__(self, test: Dataset) -> None:
        self.test, self.memo = test, {}

    def __call__(self, system, key: tuple) -> tuple[float | None, int]:
        status = system.status()
        live = sum(s.served_depth > 0 for s in status.shards)
        if not live:
            return None, 0
        memo_key = (*key, status.served_version)
        if memo_key not in self.memo:
            self.memo[memo_key] = system.score(self.test)
        return self.memo[memo_key], live


def _copy_run(src: Path, dst: Path, *, with_cache: bool) -> Path:
    from s3t.cache import CACHE_DIR

    # S3T never trains after a deletion, so its copies skip the (large) frozen-trunk cache.
    shutil.copytree(src, dst, ignore=lambda d, names: [CACHE_DIR] if Path(d) == src and not with_cache else [])
    return dst


# -- the experiment -------------------------------------------------------------------------------------------
def run_experiment(train: Dataset, test: Dataset, plan: Plan, sequences: dict[str, list[Request]], *,
                   every: int, work_dir: Path, budgets: Sequence[int] | None = None,
                   hot_prior: dict[str, float] | None = None, log: Callable[[str], None] = print) -> dict:
    """Train every method once, replay each request sequence on a copy of each, and measure.

    With `hot_prior` (subject -> request weight of the hot sequence), S3T B=L with BMS and with prior-aware
    placement are trained for that prior and replayed on the hot sequence only.
    Returns JSON-ready {"plans", "sequences_of", "training", "accuracy", "requests"}: per-method offline
    cost; accuracy rows (sequence, method, deletions, accuracy or None with a note); one row per request and
    method (latency, retraining work, live shards after it).
    """
    started = time.perf_counter()

    def say(message: str) -> None:
        log(f"[{time.perf_counter() - started:7.1f} s] {message}")

    plans = method_plans(plan, budgets=budgets)
    data = dict.fromkeys(plans, train)
    sequences_of = {name: list(sequences) for name in [*plans, RETRAIN]}
    if hot_prior is not None and HOT in sequences:
        prior = prior_plans(plan, train, hot_prior)
        plans |= prior
        data |= dict.fromkeys(prior, with_hot_prior(train, hot_prior))
        sequences_of |= dict.fromkeys(prior, [HOT])
    score = _Scorer(test)
    training, runs = [], {}
    for name, p in plans.items():
        run_dir = work_dir / "trained" / name.replace(" ", "_").replace("=", "")
        system = s3t.S3T.create(run_dir, p, data[name])
        t0 = time.perf_counter()
        system.train(progress=False)
        seconds = time.perf_counter() - t0
        stage_ex, block_ex = _work(system, list(_artifacts(system).values()))
        accuracy, _ = score(system, (run_dir.name,))
        training.append({"method": name, "seconds": round(seconds, 2), "stage_examples": stage_ex,
                         "block_examples": block_ex, "accuracy": accuracy})
        say(f"trained {name}: {seconds:.1f} s, {stage_ex} stage-examples, accuracy {accuracy:.4f}")
        system.close()
        runs[name] = run_dir

    accuracy_rows, deletion_rows = [], []
    for fine in (t for t in training if t["method"] == FINE_TUNE):
        for seq in sequences:
            accuracy_rows.append(dict(sequence=seq, method=FINE_TUNE, deletions=0, accuracy=fine["accuracy"],
                                      live_shards=1, note="reference: cannot forget, not measured after deletions"))
    for seq_name, requests in sequences.items():
        for name in [n for n in plans if n != FINE_TUNE and seq_name in sequences_of[n]] + [RETRAIN]:
            source = runs[FINE_TUNE if name == RETRAIN else name]
            copy = _copy_run(source, work_dir / "replay" / f"{seq_name}-{source.name}".replace(" ", "_"),
                             with_cache=name in (SISA, RETRAIN))
            system = s3t.S3T.open(copy)
            acc, dels = _replay(system, name, seq_name, requests, every=every, score=score, source=source.name)
            system.close()
            shutil.rmtree(copy, ignore_errors=True)
            accuracy_rows += acc
            deletion_rows += dels
            final = acc[-1]
            say(f"{seq_name} / {name}: {len(requests)} requests, accuracy after them "
                f"{'missing (no live shard)' if final['accuracy'] is None else round(final['accuracy'], 4)}")
    return {"plans": {n: p.to_dict() for n, p in plans.items()}, "sequences_of": sequences_of, "training": training,
            "accuracy": accuracy_rows, "requests": deletion_rows}


def _replay(system, name: str, seq_name: str, requests: Sequence[Request], *, every: int, score: _Scorer,
            source: str) -> tuple[list[dict], list[dict]]:
    """Apply `requests` to one trained system (a private copy of run `source`), measuring as the method prescribes."""
    acc_rows, del_rows, pending = [], [], []

    def checkpoint(t: int) -> None:
        # Before any request the copy serves what its source served: reuse that accuracy.
        accuracy, live = score(system, (source,) if t == 0 else (name, seq_name))
        acc_rows.append(dict(sequence=seq_name, method=name, deletions=t, accuracy=accuracy, live_shards=live,
                             note="" if accuracy is not None else "missing: no live shard (needs restore)"))

    checkpoint(0)
    for t, request in enumerate(requests, 1):
        before = set(_artifacts(system)) if name != RETRAIN or t % every == 0 or t == len(requests) else None
        t0 = time.perf_counter()
        receipt = system.delete(**request.kwargs(), reference=f"{seq_name} #{t}")
        delete_s = time.perf_counter() - t0
        row = dict(sequence=seq_name, method=name, request=t, kind=request.kind, target=request.target,
                   records_deleted=len(receipt.deleted), receipt_ms=receipt.duration_ms,
                   delete_wall_ms=round(delete_s * 1000, 3))
        if name == SISA:   # restore at once: the shard serves a model without the data only after retraining
            system.restore(progress=False)
            latency_s = time.perf_counter() - t0
            stage_ex, block_ex = _work(system, [r for h, r in _artifacts(system).items() if h not in before])
            row.update(latency_ms=round(latency_s * 1000, 3), latency_kind="delete + restore",
                       retrain_stage_examples=stage_ex, retrain_block_examples=block_ex)
        elif name == RETRAIN:
            pending.append(row)
        else:
            row.update(latency_ms=receipt.duration_ms, latency_kind="receipt", retrain_stage_examples=0,
                       retrain_block_examples=0)
        if name == RETRAIN and (t % every == 0 or t == len(requests)):
            t1 = time.perf_counter()
            system.restore(progress=False)   # a fresh training of the fine-tune plan on the reduced data
            retrain_s = time.perf_counter() - t1
            stage_ex, block_ex = _work(system, [r for h, r in _artifacts(system).items() if h not in before])
            for p in pending:   # each request is charged one full retrain, as measured at this checkpoint
                p.update(latency_ms=round(p["delete_wall_ms"] + retrain_s * 1000, 3),
                         latency_kind=f"delete + retrain measured at checkpoint {t}",
                         retrain_stage_examples=stage_ex, retrain_block_examples=block_ex)
            pending = []
        status = system.status()
        row.update(live_shards=sum(s.served_depth > 0 for s in status.shards),
                   served_depths=[s.served_depth for s in status.shards])
        del_rows.append(row)
        if t % every == 0 or t == len(requests):
            checkpoint(t)
    return acc_rows, del_rows


# -- command line -------------------------------------------------------------------------------------------
def load_data(args) -> tuple[Dataset, Dataset, str]:
    """(train, test, description) from --data (or BBC News), with subjects and the --quick sample."""
    if args.data is None:
        from s3t.demo import demo_data

        train, test = demo_data()
        name = "BBC News (bundled), `s3t.demo.demo_data()` split (20% test, 150 synthetic subjects)"
    else:
        data = Dataset.from_jsonl(args.data)
        if any(r.subject is None for r in data):
            data = with_subjects(data, args.subjects or max(2, len(data) // 15))
        train, test = data.split(test_fraction=args.test_fraction, seed=args.seed)
        name = f"`{args.data}`, `Dataset.split(test_fraction={args.test_fraction}, seed={args.seed})`"
    # Seeded samples (the BBC files are sorted by class, so never the first N).
    if args.records and args.records < len(train):
        train = train.subset(random.Random(args.seed).sample(list(train.ids), args.records))
        name += f", a seeded sample of {args.records} training records"
    if args.test_records and args.test_records < len(test):
        test = test.subset(random.Random(args.seed).sample(list(test.ids), args.test_records))
        name += f", a seeded sample of {args.test_records} test records"
    return train, test, name


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Accuracy under deletion: S3T vs SISA vs full retraining")
    parser.add_argument("--data", type=Path, help="JSONL dataset (id, text, label[, subject]); default BBC News")
    parser.add_argument("--plan", type=Path, help="S3T plan TOML (default: the demo plan, m=2 L=3)")
    parser.add_argument("--deletions", type=int, help="requests per sequence (default 15; --quick 4)")
    parser.add_argument("--every", type=int, help="evaluate after every K requests (default 3; --quick 2)")
    parser.add_argument("--budgets", type=int, nargs="+", help="S3T budgets (default 1, ceil(L/2), L)")
    parser.add_argument("--subjects", type=int, help="synthetic subjects for --data without them "
                                                     "(default: one per 15 records)")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="held-out share of --data")
    parser.add_argument("--seed", type=int, default=0, help="seed of the request sequences and samples")
    parser.add_argument("--trials", type=int, default=2000, help="capacity simulator trials")
    parser.add_argument("--records", type=int, help="use a seeded sample of N training records")
    parser.add_argument("--test-records", type=int, help="use a seeded sample of N test records")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_RECORDS} train / {QUICK_TEST} test records,"
                                                             " 4 deletions: an end-to-end check")
    parser.add_argument("--out-dir", type=Path, help="default benchmarks/results/deletions (--quick: "
                                                     "benchmarks/results/deletions-quick)")
    parser.add_argument("--report", type=Path, help="markdown report (default docs/results.md; --quick: "
                                                    "OUT_DIR/results.md)")
    parser.add_argument("--work-dir", type=Path, help="keep the trained runs here (default: a temp folder)")
    args = parser.parse_args(argv)
    if args.quick:
        args.records, args.test_records = args.records or QUICK_RECORDS, args.test_records or QUICK_TEST
    args.deletions = args.deletions or (4 if args.quick else 15)
    args.every = args.every or (2 if args.quick else 3)
    if args.deletions < 1 or args.every < 1:
        parser.error("--deletions and --every must be >= 1")
    args.out_dir = args.out_dir or Path("benchmarks/results/deletions" + ("-quick" if args.quick else ""))
    args.report = args.report or (args.out_dir / "results.md" if args.quick else Path("docs/results.md"))

    import os
    import tempfile

    import deletions_report as report   # beside this script

    from s3t.demo import DEMO_PLAN

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    command = " ".join(["python", "benchmarks/deletions.py", *(sys.argv[1:] if argv is None else argv)])
    machine = report.machine_facts()
    try:
        plan = Plan.from_toml(args.plan) if args.plan else DEMO_PLAN
        train, test, data_name = load_data(args)
        sequences = deletion_sequences(train, args.deletions, seed=args.seed)
    except s3t.S3TError as e:
        parser.exit(1, f"error: {e}\n")
    print(f"{data_name}: {len(train)} train / {len(test)} test records; plan {plan!r}; "
          f"{args.deletions} requests per sequence, accuracy every {args.every}; load average "
          f"{machine['load_average_1m']} on {machine['cpu_count']} cores", flush=True)
    started = time.perf_counter()
    capacity = report.simulate_capacity(plan, train, trials=args.trials, seed=args.seed,
                                        hot=(HOT_FRACTION, HOT_SHARE))
    with tempfile.TemporaryDirectory(prefix="s3t-deletions-") as tmp:
        work_dir = args.work_dir or Path(tmp)
        results = run_experiment(train, test, plan, sequences, every=args.every, work_dir=work_dir,
                                 budgets=args.budgets, hot_prior=hot_weights(train, seed=args.seed),
                                 log=lambda m: print(m, flush=True))
    machine["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    results.update(
        command=command, machine=machine, plan=plan.to_dict(), plan_toml=report.plan_toml(plan), data=data_name,
        train_records=len(train), test_records=len(test), requests_per_sequence=args.deletions,
        every=args.every, seed=args.seed, total_seconds=round(time.perf_counter() - started, 1), capacity=capacity,
        sequences={k: [asdict(r) for r in v] for k, v in sequences.items()},
        s3t_version=s3t.__version__)
    report.write_all(results, out_dir=args.out_dir, report_path=args.report)
    print(f"done in {results['total_seconds']:.0f} s; results in {args.out_dir}, report {args.report}", flush=True)


if __name__ == "__main__":
    main()
