"""Figures for the core: the demo plan's accuracy next to a plain full-data LoRA fine-tune of the same
model on the same split, and the latency of single-record deletions on the trained demo run.

    python benchmarks/core_figures.py --out benchmarks/results/core.json

Both models are trained in this run on the same machine; nothing is copied from elsewhere.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np

import s3t
from s3t.demo import DEMO_PLAN, demo_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/core.json"))
    parser.add_argument("--deletions", type=int, default=100)
    args = parser.parse_args()
    train, test = demo_data()
    out: dict = {"plan": DEMO_PLAN.to_dict(), "train_records": len(train), "test_records": len(test)}
    with tempfile.TemporaryDirectory() as tmp:
        # Plain LoRA fine-tune: one shard, one slice, one group spanning all 6 blocks, all data.
        full = DEMO_PLAN.replace(num_shards=1, num_slices=1, budget=1, blocks_per_slice=6)
        started = time.perf_counter()
        baseline = s3t.S3T.create(Path(tmp) / "full", full, train).train()
        out["full_finetune"] = {"plan": full.to_dict(), "seconds": round(time.perf_counter() - started, 1),
                                "accuracy": baseline.score(test)}
        print("full fine-tune", out["full_finetune"])
        started = time.perf_counter()
        system = s3t.S3T.create(Path(tmp) / "s3t", DEMO_PLAN, train).train()
        out["s3t"] = {"seconds": round(time.perf_counter() - started, 1), "accuracy": system.score(test)}
        print("s3t", out["s3t"])
        victims = random.Random(1).sample(list(train.ids), args.deletions)
        latencies = []
        for victim in victims:
            started = time.perf_counter()
            system.delete(ids=[victim])
            latencies.append((time.perf_counter() - started) * 1000)
        out["single_deletions_ms"] = {"count": len(latencies), "p50": round(float(np.median(latencies)), 2),
                                      "p99": round(float(np.percentile(latencies, 99)), 2),
                                      "max": round(max(latencies), 2)}
        print("deletions", out["single_deletions_ms"])
        system.close()
        baseline.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
