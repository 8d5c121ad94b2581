"""HTTP service under concurrent load: deletion latency (p50/p99) and throughput, prediction throughput.

    python benchmarks/service_load.py                          # 20k records, 8 x 500 deletions
    python benchmarks/service_load.py --clients 4 --per-client 100   # quicker

Builds a run of synthetic records on the embedded MiniLM-L6 (m=4 shards, L=4 slices, B=4 orders), with
stages registered from random weights (benchmarks/stubs.py: training is not what is measured; inference
and the whole deletion path are the library's own), and serves it with `s3t serve` on loopback. Then:

1. one client sends `--sequential` single-record deletions, one after the other (latency unloaded);
2. predictions alone: `--predictors` clients send 8-text requests for `--seconds`;
3. the same prediction clients again, while `--clients` deletion clients each send `--per-client`
   single-record deletions (each with its own idempotency key) as fast as answers come back.

The deleted ids come from one slice of each shard (the slice each shard's longest surviving order
saw last), so every shard keeps serving at depth L-1 for the whole run: with ids drawn at random, all
shards drop out within a few dozen deletions and predictions would only measure 503 answers. Each
deletion is still a full durable transaction (ledger, erasure, cache shredding, truncation, served set,
lineage check). Latencies are measured by the clients (request sent to answer read). The abuse guard
is off (this load is exactly what it flags) and rate limits are raised.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

TEXTS = ["Shares in the carmaker rose five percent after the results beat forecasts",
         "The striker scored twice as the home side won the cup final",
         "A new phone chip promises longer battery life and faster graphics",
         "Ministers will debate the budget proposals in parliament next week",
         "The film won three awards at the festival on Saturday night",
         "Oil prices fell as supply concerns eased across the markets",
         "The coach praised his young squad after a hard-fought draw",
         "Researchers unveiled software that translates speech in real time"]


def build_run(root: Path, records: int):
    import s3t
    from s3t.datasets import synthetic
    from stubs import use_random_weights

    data = synthetic(records, num_labels=4, num_subjects=records // 4, seed=0)
    plan = s3t.Plan(num_shards=4, num_slices=4, budget=4, blocks_per_slice=1, max_length=32, seed=0)
    system = s3t.S3T.create(root / "run", plan, data)
    use_random_weights(system)
    system.train(progress=False)
    pool = []
    for o in (o for o in system.registry.orders() if o["position"] == 0):
        last = o["slices"][-1]   # deleting it leaves this order at depth L-1
        pool += system.registry.live_members(o["shard"])[last]
    system.close()
    return root / "run", plan, pool


def predict_load(server, token: str, clients: int, stop: threading.Event, out: list) -> list[threading.Thread]:
    def run() -> None:
        with server.client(token, timeout=120.0) as c:
            while not stop.is_set():
                t = time.perf_counter()
                r = c.post("/v1/predict", json={"texts": TEXTS})
                out.append((r.status_code, time.perf_counter() - t))
    threads = [threading.Thread(target=run) for _ in range(clients)]
    for t in threads:
        t.start()
    return threads


def main() -> None:
    parser = argparse.ArgumentParser(description="s3t HTTP service load benchmark")
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=8, help="deletion clients")
    parser.add_argument("--per-client", type=int, default=500, help="deletions per client")
    parser.add_argument("--predictors", type=int, default=2, help="prediction clients")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the predictions-alone phase")
    parser.add_argument("--sequential", type=int, default=200, help="deletions sent by a lone client first")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/service_load.json"))
    args = parser.parse_args()

    from servicekit import Server, make_token

    with tempfile.TemporaryDirectory(prefix="s3t-load-") as tmp:
        started = time.perf_counter()
        run_dir, plan, pool = build_run(Path(tmp), args.records)
        print(f"run of {args.records} records built in {time.perf_counter() - started:.0f} s; "
              f"{len(pool)} ids in the deletion pool", flush=True)
        need = args.clients * args.per_client + args.sequential
        if len(pool) < need:
            raise SystemExit(f"the pool has {len(pool)} ids, fewer than {need}: use more --records")
        random.Random(0).shuffle(pool)
        token = make_token(run_dir, "predict", "delete", "metrics", name="load", rate=1e9, quota=10**9)
        with Server(run_dir, "--guard", "off", "--no-worker", "--burst", "1000000", log=Path(tmp) / "server.log") as server:
            with server.client(token) as c:   # warm: the model is loaded and every artifact read once
                for _ in range(3):
                    assert c.post("/v1/predict", json={"texts": TEXTS}).status_code == 200
            # 1. one client, one deletion at a time
            lone: list[float] = []
            with server.client(token) as c:
                for i, rid in enumerate(pool[need - args.sequential:need]):
                    t = time.perf_counter()
                    assert c.post("/v1/deletions", json={"ids": [rid]},
                                  headers={"Idempotency-Key": f"lone-{i}"}).status_code == 200
                    lone.append(time.perf_counter() - t)
            # 2. predictions alone
            alone: list = []
            stop = threading.Event()
            threads = predict_load(server, token, args.predictors, stop, alone)
            t0 = time.perf_counter()
            time.sleep(args.seconds)
            stop.set()
            for t in threads:
                t.join()
            alone_s = time.perf_counter() - t0
            # 3. the same prediction load while the deletion clients run
            mixed: list = []
            stop = threading.Event()
            threads = predict_load(server, token, args.predictors, stop, mixed)
            latencies: list[float] = []
            statuses: list[int] = []
            lock = threading.Lock()

            def delete(k: int) -> None:
                mine = pool[k * args.per_client:(k + 1) * args.per_client]
                with server.client(token, timeout=120.0) as c:
                    for i, rid in enumerate(mine):
                        t = time.perf_counter()
                        r = c.post("/v1/deletions", json={"ids": [rid]}, headers={"Idempotency-Key": f"{k}-{i}"})
                        with lock:
                            latencies.append(time.perf_counter() - t)
                            statuses.append(r.status_code)
            deleters = [threading.Thread(target=delete, args=(k,)) for k in range(args.clients)]
            t0 = time.perf_counter()
            for t in deleters:
                t.start()
            for t in deleters:
                t.join()
            mixed_s = time.perf_counter() - t0
            stop.set()
            for t in threads:
                t.join()
            with server.client(token) as c:
                status = c.get("/v1/status").json()
        assert "Traceback" not in server.log(), server.log()[-3000:]

    ms = np.array(latencies) * 1000
    ok_alone = [d for s, d in alone if s == 200]
    ok_mixed = [d for s, d in mixed if s == 200]
    lone_ms = np.array(lone) * 1000
    figures = {
        "records": args.records,
        "lone_deletions": {"requests": len(lone), "p50_ms": round(float(np.percentile(lone_ms, 50)), 1),
                           "p99_ms": round(float(np.percentile(lone_ms, 99)), 1),
                           "per_s": round(len(lone) / (lone_ms.sum() / 1000), 1)}, "plan": {k: plan.to_dict()[k] for k in ("num_shards", "num_slices", "budget", "max_length")},
        "deletions": {"clients": args.clients, "requests": len(statuses), "acknowledged": statuses.count(200),
                      "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
                      "max_ms": round(float(ms.max()), 1), "per_s": round(statuses.count(200) / mixed_s, 1)},
        "predictions": {"clients": args.predictors, "texts_per_request": len(TEXTS),
                        "alone_texts_per_s": round(len(ok_alone) * len(TEXTS) / alone_s, 1),
                        "under_deletions_texts_per_s": round(len(ok_mixed) * len(TEXTS) / mixed_s, 1),
                        "under_deletions_p50_ms": round(float(np.percentile(ok_mixed, 50)) * 1000, 1) if ok_mixed else None,
                        "non_200_under_deletions": sum(s != 200 for s, _ in mixed)},
        "served_depths_after": [s["served_depth"] for s in status["shards"]],
    }
    figures["predictions"]["ratio_under_load"] = round(
        figures["predictions"]["under_deletions_texts_per_s"] / max(figures["predictions"]["alone_texts_per_s"], 1e-9), 2)
    print(json.dumps(figures, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
