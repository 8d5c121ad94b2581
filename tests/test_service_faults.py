"""Crash safety: kill -9 the real server at random moments under a deletion load, 20 times.

After every kill the run is opened offline, as a restart would open it, and checked against what the
clients saw: every acknowledged deletion is in the ledger and its records are gone (lost = 0), no served
artifact's lineage holds a deleted id (tainted = 0), every served artifact matches its recorded hash,
no key produced two ledger entries, and no restoration child outlived its server. The server restores in
the background whenever a shard is truncated, so kills also land on restorations. The seed is random
(printed on failure; set S3T_FAULT_SEED to replay one); benchmarks/service_faults.py runs >= 100 kills.
Four clients keep the deletion queue busy, so kills land on group commits (`grouped` counts requests
that shared a transaction: it must not be 0), on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import os
import time

import pytest

from conftest import copy_run
from servicekit import fault_injection, make_token

pytestmark = pytest.mark.both_databases


def test_kill_9_under_deletion_load_loses_nothing_and_serves_nothing_tainted(trained_dir, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    copy_run(trained_dir, run_dir)
    token = make_token(run_dir, "delete", "predict", "metrics", name="faults", rate=1e6, quota=10**9)
    seed = int(os.environ.get("S3T_FAULT_SEED", time.time_ns() % 2**32))
    figures = fault_injection(run_dir, token, kills=20, seed=seed, ids=[r.id for r in tiny_data], clients=4,
                              long_every=20, short_s=(0.2, 1.0), long_s=(6.0, 9.0), log=tmp_path / "server.log")
    summary = figures.summary() | {"seed": seed}
    print(summary)
    assert figures.kills == 20 and figures.acknowledged > 20, summary
    assert figures.errors == [], (summary, figures.errors[:5])
    assert (figures.lost, figures.tainted, figures.corrupt, figures.duplicates, figures.orphans) == (0, 0, 0, 0, 0), summary
    assert figures.unanswered == 0, summary
    assert figures.grouped > 0, ("no two requests ever shared a group commit: the kills did not test it", summary)
