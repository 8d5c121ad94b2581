"""Crash safety of the HTTP service: kill -9 the real server >= 100 times under a deletion load.

    python benchmarks/service_faults.py               # 100 kills (~20 minutes on 2 cores)
    python benchmarks/service_faults.py --kills 300
    python benchmarks/service_faults.py --kills 20 --database postgresql   # a private PostgreSQL server
    python benchmarks/service_faults.py --kills 20 --guard alert           # the guard's windows written too

Trains a tiny run (the embedded MiniLM cut to 2 blocks, 96 synthetic records, 2 shards x 2 slices), then
runs tests/servicekit.py's fault-injection loop: clients send deletions with idempotency keys, the server
restores in the background whenever a shard is truncated, and it is killed at a random moment; after
every kill the run is opened offline and checked against what the clients saw acknowledged. Every 5th
cycle runs 20-30 s, long enough for a restoration to finish (a child process imports the model stack,
~6 s, then trains), so kills also land on training and on restoration commits. Prints
and saves the figures: kills, requests, acknowledged, lost, tainted (must be 0), ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def tiny_run(root: Path, create_args: dict) -> tuple[Path, list[str]]:
    """A trained tiny run, as the tests' fixtures build it."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers import logging as hf_logging

    import s3t
    from s3t.models import default_model_path
    from s3t.datasets import synthetic

    hf_logging.set_verbosity_error()
    model = root / "tiny-minilm"
    config = AutoConfig.from_pretrained(default_model_path(), num_hidden_layers=2)
    AutoModel.from_pretrained(default_model_path(), config=config).save_pretrained(model)
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(model)
    plan = s3t.Plan(num_shards=2, num_slices=2, budget=2, epochs=2, max_length=24, batch_size=8,
                    learning_rate=5e-3, base_model=str(model), seed=0)
    data = synthetic(96, num_labels=3, num_subjects=24, seed=1)
    system = s3t.S3T.create(root / "run", plan, data, **create_args)
    system.train(progress=False)
    system.close()
    return root / "run", list(data.ids)


def main() -> None:
    parser = argparse.ArgumentParser(description="kill -9 the s3t server under deletion load")
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite",
                        help="the registry: SQLite in the run folder, or a private PostgreSQL server")
    parser.add_argument("--guard", choices=["off", "alert"], default="off",
                        help="the capacity guard: off, or alert (it judges and records every deletion, holds none)")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/service_faults[_postgresql][_guard].json")
    args = parser.parse_args()
    args.out = args.out or Path("benchmarks/results/service_faults" +
                                ("" if args.database == "sqlite" else f"_{args.database}") +
                                ("" if args.guard == "off" else "_guard") + ".json")

    import postgres
    from servicekit import fault_injection, make_token

    with tempfile.TemporaryDirectory(prefix="s3t-faults-") as tmp, ExitStack() as stack:
        create_args = {}
        if args.database == "postgresql":
            os.chmod(tmp, 0o711)   # the server may run as another user (PostgreSQL refuses root)
            cluster = Path(tmp) / "pg" / "cluster"
            cluster.parent.mkdir(mode=0o711)
            url = postgres.start(cluster)
            stack.callback(postgres.stop, cluster)
            create_args = {"database_url": url, "database_schema": postgres.new_schema(url, "faults")}
        run_dir, ids = tiny_run(Path(tmp), create_args)
        token = make_token(run_dir, "delete", "predict", "metrics", name="faults", rate=1e6, quota=10**9)
        started = time.monotonic()
        figures = fault_injection(
            run_dir, token, kills=args.kills, seed=args.seed, ids=ids, long_every=5, short_s=(0.3, 2.0),
            long_s=(20.0, 30.0), log=Path(tmp) / "server.log", guard=args.guard,
            progress=lambda f: print(f"kill {f.kills}: requests {f.requests}, acknowledged {f.acknowledged}, "
                                     f"lost {f.lost}, tainted {f.tainted}, orphans {f.orphans}, restorations "
                                     f"{f.restorations} ({time.monotonic() - started:.0f} s)",
                                     flush=True))
    summary = figures.summary() | {"seed": args.seed, "database": args.database, "guard": args.guard}
    print(json.dumps(summary, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2, sort_keys=True))
    if figures.errors or any(summary[k] for k in ("lost", "tainted", "corrupt", "duplicates", "orphans", "unanswered")):
        print("FAILED:", figures.errors[:5])
        raise SystemExit(1)


if __name__ == "__main__":
    main()
