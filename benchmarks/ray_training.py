"""Training wall time with the Ray executor on a local Ray against in-process training, and a model of the
speed-up on k workers, checked against the measured run.

    python benchmarks/ray_training.py                              # 600 BBC records, m=4, L=3, B=2
    python benchmarks/ray_training.py --records 200 --workers 1 2 4 8 16 32

Three runs of the same data on the embedded MiniLM-L6 (m=4 shards, L=3 slices of 2 blocks, B=2 orders):
- in-process, 1 thread: `train()` with the local executor, the plan pinned to one thread;
- Ray, --cpus CPUs: `train(executor="ray")` on a local Ray started here (its start-up timed apart), the
  same plan, so each task takes one CPU and --cpus tasks run at once; its artifact files must have the same
  SHA-256 as the in-process run's (checked, the run fails otherwise);
- in-process, --cpus threads: the fair one-machine baseline (another plan: the thread count is part of
  every lineage, so its bits differ; only its time is compared).

The model: while the in-process run trains, every piece of work the Ray executor would make a task of is
timed (each shard's trunk-cache fill, each prefix tree's stages). List scheduling of those tasks on k
workers (a tree waits for its shard's fill; longest first) gives a makespan; wall(k) = makespan(k) + the
cost of opening the run in a worker (paid once per worker, in parallel) + a fixed overhead. The fixed
overhead is what the measured Ray run took beyond its own makespan and opening, so the model is exact at
k = --cpus by construction: what it predicts elsewhere is only as good as its assumptions (workers as fast
as this machine's cores, a shared filesystem as fast as the local disk, no straggler).
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def timed_train(system) -> tuple[float, list[dict]]:
    """Train in process; return the wall time and the tasks the Ray executor would have made of it."""
    trainer = system.trainer
    tree_of, tasks = {}, {}
    for shard in sorted({o["shard"] for o in system.registry.orders()}):
        jobs, _ = trainer.jobs(shard, system.registry.orders(shards=[shard]))
        tasks[("fill", shard)] = {"name": f"fill shard {shard}", "shard": shard, "needs": None, "seconds": 0.0}
        for job in jobs:
            key = ("tree", job.lineages[0])
            tasks.setdefault(key, {"name": f"tree shard {shard} from order {job.order['position']}", "shard": shard,
                                   "needs": ("fill", shard), "seconds": 0.0})
            for stage in job.stages:
                tree_of[stage.lineage] = key
    prepare, train = trainer.prepare, trainer.train

    def timed_prepare(shard):
        t = time.perf_counter()
        try:
            return prepare(shard)
        finally:
            tasks[("fill", shard)]["seconds"] += time.perf_counter() - t

    def timed_stage(job, targets):
        t = time.perf_counter()
        try:
            return train(job, targets)
        finally:
            tasks[tree_of[job.lineage]]["seconds"] += time.perf_counter() - t

    trainer.prepare, trainer.train = timed_prepare, timed_stage
    start = time.perf_counter()
    system.train(progress=False)
    return time.perf_counter() - start, [{"key": list(k), **v} for k, v in tasks.items()]


def makespan(tasks: list[dict], workers: int) -> float:
    """List scheduling on `workers`: a tree starts once its shard's fill is done; longest ready task first."""
    done_at: dict[tuple, float] = {}
    free = [0.0] * workers
    pending = sorted(tasks, key=lambda t: -t["seconds"])
    while pending:
        ready = [t for t in pending if t["needs"] is None or tuple(t["needs"]) in done_at]
        task = ready[0]   # the longest of the ready ones
        pending.remove(task)
        start = max(heapq.heappop(free), done_at.get(tuple(task["needs"] or ()), 0.0))
        done_at[tuple(task["key"])] = start + task["seconds"]
        heapq.heappush(free, start + task["seconds"])
    return max(done_at.values(), default=0.0)


def open_cost(run_dir: Path) -> float:
    """What a fresh worker pays before its first task: import s3t's stack, open the run read-only, load the
    model (timed in a new process, as a worker starts)."""
    import subprocess

    code = ("import time; t = time.perf_counter(); import s3t; s = s3t.S3T.open(__import__('sys').argv[1], "
            "recover=False); s.trainer; print(time.perf_counter() - t)")
    done = subprocess.run([sys.executable, "-c", code, str(run_dir)], check=True, capture_output=True, text=True)
    return float(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description="Ray executor vs in-process training, and a speed-up model")
    parser.add_argument("--records", type=int, default=600)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (and threads of the baseline)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/ray_training.json"))
    args = parser.parse_args()

    import ray

    import s3t
    from s3t.datasets import bbc_news

    data = bbc_news()
    data = data.subset([r.id for r in data][:: max(1, len(data) // args.records)][:args.records])
    plan = s3t.Plan(num_shards=4, num_slices=3, budget=2, blocks_per_slice=2, epochs=2, max_length=64, batch_size=16,
                    learning_rate=2e-3, lora_rank=8, seed=0, num_threads=1)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        local = s3t.S3T.create(Path(tmp) / "local", plan, data)
        local_s, tasks = timed_train(local)
        print(f"in-process, 1 thread: {local_s:.1f} s", flush=True)

        start = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20)
        ray_start_s = time.perf_counter() - start
        remote = s3t.S3T.create(Path(tmp) / "ray", plan, data)
        start = time.perf_counter()
        remote.train(progress=False, executor="ray")
        ray_s = time.perf_counter() - start
        ray.shutdown()
        hashes = [s.registry.artifact_hashes(s.registry.artifact_lineages()) for s in (local, remote)]
        if hashes[0] != hashes[1]:
            sys.exit("the Ray run's artifacts differ from the in-process run's: not bit-identical")
        print(f"Ray on {args.cpus} CPUs: {ray_s:.1f} s (+ {ray_start_s:.1f} s to start Ray); "
              f"{len(hashes[0])} artifacts, SHA-256 equal to in-process", flush=True)

        baseline = s3t.S3T.create(Path(tmp) / "threads", plan.replace(num_threads=args.cpus), data)
        start = time.perf_counter()
        baseline.train(progress=False)
        threads_s = time.perf_counter() - start
        print(f"in-process, {args.cpus} threads: {threads_s:.1f} s", flush=True)
        opening = open_cost(local.run_dir)
        for system in (local, remote, baseline):
            system.close()

    fixed = max(0.0, ray_s - makespan(tasks, args.cpus) - opening)

    def predicted(k: int) -> float:
        return makespan(tasks, k) + opening + fixed

    model = {k: {"makespan_s": round(makespan(tasks, k), 1), "predicted_wall_s": round(predicted(k), 1),
                 "speedup_over_in_process": round(local_s / predicted(k), 2)} for k in sorted(set(args.workers))}
    result = {
        "records": len(data), "plan": json.loads(plan.to_json()), "cpus": args.cpus, "load_at_start": round(load, 2),
        "in_process_1_thread_s": round(local_s, 1), "ray_s": round(ray_s, 1), "ray_start_s": round(ray_start_s, 1),
        f"in_process_{args.cpus}_threads_s": round(threads_s, 1), "bit_identical": True,
        "ray_over_in_process": round(ray_s / local_s, 2), f"ray_over_{args.cpus}_threads": round(ray_s / threads_s, 2),
        "worker_open_s": round(opening, 1), "fixed_overhead_s": round(fixed, 1),
        "tasks": [{k: v for k, v in t.items() if k != "key"} | {"seconds": round(t["seconds"], 2)} for t in tasks],
        "model": model,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    serial = sum(t["seconds"] for t in tasks)
    print(f"\n{len(tasks)} tasks, {serial:.1f} s of work in all (longest {max(t['seconds'] for t in tasks):.1f} s); "
          f"a worker opens the run in {opening:.1f} s; fixed overhead {fixed:.1f} s")
    print(f"{'workers':>8} {'makespan s':>11} {'wall s':>8} {'speed-up':>9}")
    for k, row in model.items():
        print(f"{k:>8} {row['makespan_s']:>11} {row['predicted_wall_s']:>8} {row['speedup_over_in_process']:>8}x")
    print(f"\nmeasured: Ray {ray_s:.1f} s, {local_s / ray_s:.2f}x faster than in-process at 1 thread and "
          f"{threads_s / ray_s:.2f}x faster than at {args.cpus} threads (load {load:.1f} at start) -> {args.out}")


if __name__ == "__main__":
    main()
