"""Deletion throughput and latency over HTTP against the number of clients: SQLite and PostgreSQL, a commit
per request (`--max-batch 1`) against group commit, all measured in the same run.

    python benchmarks/scale.py                                  # 1, 8, 32, 64 clients; both databases
    python benchmarks/scale.py --clients 32 --seconds 5 --databases sqlite

For each database it builds a run of `--records` synthetic records on the embedded MiniLM-L6 (m=4, L=4,
B=4; stages registered with random weights: training is not what is measured, the deletion path is the
library's own) and serves it with `s3t serve` on loopback, once per commit mode. PostgreSQL is
`--postgres-url`, or a private server started in a temp folder (tests/postgres.py), fsync on. Every
deletion is a single record from one slice per shard (each shard keeps serving at depth L-1, as in
benchmarks/service_load.py), with its own idempotency key, through the whole path: auth, quota, replay
check, erasure, cache shred, truncation, served set, lineage check, ledger entry, key destruction. The
abuse guard is off (this load is what it exists to flag) except in the `guard` rows; rate limits are
raised out of the way.

The load client is one asyncio process speaking HTTP/1.1 over keep-alive sockets (one connection per
client, one request in flight each), so it costs the 2-core machine little; the CPU seconds of the
client, of the server and of PostgreSQL are reported per request, to show where the time goes. Each
point runs `--seconds` after a short warm-up; latency is request written to response read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

CLK = os.sysconf("SC_CLK_TCK")


def build_run(root: Path, records: int, create_args: dict) -> tuple[Path, list[str]]:
    """A served run whose deletion pool is one slice per shard (the last of each shard's first order)."""
    import s3t
    from s3t.datasets import synthetic
    from stubs import use_random_weights

    data = synthetic(records, num_labels=4, num_subjects=records // 4, seed=0)
    plan = s3t.Plan(num_shards=4, num_slices=4, budget=4, blocks_per_slice=1, max_length=32, seed=0)
    system = s3t.S3T.create(root / "run", plan, data, **create_args)
    use_random_weights(system)
    system.train(progress=False)
    pool = []
    for o in (o for o in system.registry.orders() if o["position"] == 0):
        pool += system.registry.live_members(o["shard"])[o["slices"][-1]]
    system.close()
    random.Random(0).shuffle(pool)
    return root / "run", pool


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])   # utime, stime
    return total / CLK


def tree(pid: int) -> list[int]:
    """A process and its descendants (PostgreSQL: the postmaster and its backends)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


async def load(port: int, token: str, pool: list[str], clients: int, seconds: float, prefix: str) -> dict:
    """`clients` keep-alive connections, each sending single-record deletions back to back for `seconds`."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    stop_at = time.perf_counter() + seconds

    async def client(k: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            n = 0
            while time.perf_counter() < stop_at and pool:
                rid = pool.pop()
                body = json.dumps({"ids": [rid]}).encode()
                head = (f"POST /v1/deletions HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n"
                        f"Idempotency-Key: {prefix}-{k}-{n}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode()
                t = time.perf_counter()
                writer.write(head + body)
                status_line = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - t)
                code = int(status_line.split()[1])
                statuses[code] = statuses.get(code, 0) + 1
                n += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "acknowledged": statuses.get(200, 0), "statuses": statuses,
            "seconds": round(elapsed, 3), "per_s": round(statuses.get(200, 0) / elapsed, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def measure(server, token: str, pool: list[str], clients: int, seconds: float, label: str,
            postmaster: int | None) -> dict:
    asyncio.run(load(server.port, token, pool, min(clients, 8), 0.5, f"warm-{label}"))   # warm connections
    server_pids = tree(server.proc.pid)
    db_pids = tree(postmaster) if postmaster else []   # after the warm-up: the server's backends exist
    before = (time.process_time(), cpu_seconds(server_pids), cpu_seconds(db_pids))
    figures = asyncio.run(load(server.port, token, pool, clients, seconds, label))
    after = (time.process_time(), cpu_seconds(server_pids), cpu_seconds(db_pids))
    n = max(figures["requests"], 1)
    figures["cpu_ms_per_request"] = {"client": round((after[0] - before[0]) * 1000 / n, 3),
                                     "server": round((after[1] - before[1]) * 1000 / n, 3),
                                     "database": round((after[2] - before[2]) * 1000 / n, 3)}
    return figures


def batches_seen(server, token: str) -> tuple[int, int]:
    import httpx

    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {token}"}).text
    values = {}
    for line in text.splitlines():
        for name in ("s3t_deletion_batches_total", "s3t_deletion_batched_requests_total"):
            if line.startswith(name + " "):
                values[name] = int(float(line.split()[1]))
    return values.get("s3t_deletion_batches_total", 0), values.get("s3t_deletion_batched_requests_total", 0)


def main() -> None:
    parser = argparse.ArgumentParser(description="s3t deletion throughput vs clients, databases and commit modes")
    parser.add_argument("--records", type=int, default=40_000)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each measured point")
    parser.add_argument("--databases", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"])
    parser.add_argument("--postgres-url", default=os.environ.get("S3T_TEST_POSTGRES_URL"),
                        help="a PostgreSQL server to use (default: start a private one)")
    parser.add_argument("--guard-clients", type=int, default=32, help="one extra group-commit point with the guard on")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scale.json"))
    args = parser.parse_args()

    import postgres
    from servicekit import Server, make_token

    results: dict = {"records": args.records, "seconds_per_point": args.seconds, "clients": args.clients,
                     "cpus": os.cpu_count(), "points": [],
                     "load_average": {"start": [round(x, 2) for x in os.getloadavg()]}}   # other jobs' share
    with tempfile.TemporaryDirectory(prefix="s3t-scale-") as tmp:
        tmp = Path(tmp)
        pg_folder, url = None, args.postgres_url
        if "postgresql" in args.databases and not url:
            pg_folder = tmp / "pg"
            pg_folder.mkdir()
            os.chmod(tmp, 0o711)
            os.chmod(pg_folder, 0o711)
            url = postgres.start(pg_folder / "cluster")
        try:
            for database in args.databases:
                create_args = ({} if database == "sqlite" else
                               {"database_url": url, "database_schema": postgres.new_schema(url, "bench")})
                started = time.perf_counter()
                run_dir, pool = build_run(tmp / database, args.records, create_args)
                print(f"{database}: run of {args.records} records built in {time.perf_counter() - started:.0f} s, "
                      f"{len(pool)} ids to delete", flush=True)
                token = make_token(run_dir, "delete", "metrics", name="bench", rate=1e9, quota=10**9)
                postmaster = (int((pg_folder / "cluster" / "data" / "postmaster.pid").read_text().split()[0])
                              if database == "postgresql" and pg_folder else None)
                modes = [("per-request commit", "1", "off"), ("group commit", "256", "off")]
                for mode, max_batch, guard in modes + [("group commit, guard on", "256", "hold")]:
                    counts = args.clients if guard == "off" else [args.guard_clients]
                    extra = () if guard == "off" else ("--guard-token-share", "1", "--guard-total-share", "1",
                                                       "--no-protect-last-order", "--guard-ratio", "1000000")
                    with Server(run_dir, "--guard", guard, "--no-worker", "--no-preload", "--burst", "1000000",
                                "--max-batch", max_batch, "--log-level", "warning", *extra,
                                log=tmp / f"{database}.log") as server:
                        for clients in counts:
                            if len(pool) < 200:
                                print("  the deletion pool is spent: use more --records", flush=True)
                                break
                            b0 = batches_seen(server, token)
                            figures = measure(server, token, pool, clients, args.seconds,
                                              f"{database}-{max_batch}-{guard}-{clients}", postmaster)
                            b1 = batches_seen(server, token)
                            figures["mean_batch"] = round((b1[1] - b0[1]) / max(1, b1[0] - b0[0]), 1)
                            point = {"database": database, "mode": mode, "clients": clients} | figures
                            results["points"].append(point)
                            print(f"  {mode:24s} {clients:3d} clients: {figures['per_s']:8.1f}/s  p50 "
                                  f"{figures['p50_ms']:7.2f} ms  p99 {figures['p99_ms']:7.2f} ms  batch "
                                  f"{figures['mean_batch']:5.1f}  cpu ms/req {figures['cpu_ms_per_request']}",
                                  flush=True)
                    assert "Traceback" not in server.log(), server.log()[-3000:]
        finally:
            if pg_folder is not None:
                postgres.stop(pg_folder / "cluster")
                shutil.rmtree(pg_folder, ignore_errors=True)
    for database in args.databases:   # group commit over a commit per request, same clients, same run
        for clients in args.clients:
            rate = {p["mode"]: p["per_s"] for p in results["points"]
                    if p["database"] == database and p["clients"] == clients}
            if "per-request commit" in rate and "group commit" in rate:
                results.setdefault("speedup", {}).setdefault(database, {})[str(clients)] = round(
                    rate["group commit"] / max(rate["per-request commit"], 1e-9), 1)
    results["load_average"]["end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(results.get("speedup", {}), indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
