"""Deletion latency and throughput on a registry of 100,000 synthetic records.

    python benchmarks/deletion_speed.py                  # 100k records, m=4, L=4, B=4
    python benchmarks/deletion_speed.py --records 20000  # quicker

Training is replaced by a stub that writes random adapter weights (training 100k records on 2 CPU cores
would take hours and is not what is measured); partitioning, orders, lineage hashing and registration, and
the whole deletion path (ledger, erasure with secure_delete and cache shredding, truncation, served set,
lineage check, receipt) are the library's own. Single deletions are uniform over the records: the first
few dozen truncate orders and switch the served set (the slowest case) until every shard has lost its
orders, the rest only erase and record; both kinds are reported apart.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description="s3t deletion latency on a large registry")
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--singles", type=int, default=1000, help="single-record deletions to time")
    parser.add_argument("--batches", type=int, default=10, help="batched deletions to time")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/deletion.json"))
    args = parser.parse_args()

    import s3t
    from s3t.datasets import synthetic
    from stubs import use_random_weights

    data = synthetic(args.records, num_labels=4, num_subjects=args.records // 4, seed=0)
    plan = s3t.Plan(num_shards=4, num_slices=4, budget=4, blocks_per_slice=1, max_length=32, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        system = s3t.S3T.create(Path(tmp) / "run", plan, data)
        use_random_weights(system)
        system.train(progress=False)
        setup = time.perf_counter() - started
        print(f"registry of {len(data)} records built and 'trained' in {setup:.0f} s", flush=True)

        ids = list(data.ids)
        random.Random(0).shuffle(ids)
        singles, ids = ids[:args.singles], ids[args.singles:]
        latencies, switched = [], []
        for rid in singles:
            t = time.perf_counter()
            receipt = system.delete(ids=[rid])
            latencies.append((time.perf_counter() - t) * 1000)
            switched.append(any(s["depth_before"] != s["depth_after"] for s in receipt.shards))
        batch_seconds = []
        for b in range(args.batches):
            chunk = ids[b * args.batch_size:(b + 1) * args.batch_size]
            t = time.perf_counter()
            receipt = system.delete(ids=chunk)
            batch_seconds.append(time.perf_counter() - t)
            assert len(receipt.deleted) == len(chunk)
        system.close()

    def summary(ms: list[float]) -> dict:
        if not ms:
            return {"count": 0}
        return {"count": len(ms), "p50": round(float(np.percentile(ms, 50)), 2),
                "p99": round(float(np.percentile(ms, 99)), 2), "max": round(max(ms), 2)}

    figures = {
        "records": len(data), "plan": plan.to_dict(), "setup_s": round(setup, 1),
        "single_ms": summary(latencies),
        "single_ms_switching_served_set": summary([ms for ms, sw in zip(latencies, switched) if sw]),
        "single_ms_erase_only": summary([ms for ms, sw in zip(latencies, switched) if not sw]),
        "batched": {"batches": args.batches, "batch_size": args.batch_size,
                    "ids_per_s": round(args.batches * args.batch_size / sum(batch_seconds))},
    }
    print(json.dumps(figures, indent=2))
    print(f"single-record p99 {figures['single_ms']['p99']} ms (target <= 20 ms); "
          f"batched {figures['batched']['ids_per_s']} ids/s (target >= 1,000)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
