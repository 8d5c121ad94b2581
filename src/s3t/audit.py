"""The audit: check a run against its own evidence, and retrain sampled stages bit for bit.

Each check reports what it looked at and passes, fails (one line per failure) or is skipped with a reason:

- artifacts: every registered artifact's file exists and matches its recorded SHA-256;
- orphans: no file under artifacts/ that the registry does not account for, no retired stage on disk;
- lineage: every stage an order uses has stored lineage (its record ids, grouped by their cells in the
  order's prefix) that hashes to the stage's name: the lineage table says what the stage saw;
- deletions: no served or registered artifact's stored lineage holds a record *the ledger* says was
  deleted (the auditor trusts the signed ledger, not the records table), and the records table's
  tombstones agree with the ledger;
- ledger: the hash chain is intact and every entry is signed by the run's key (or a pinned public key);
- erasure: deleted records have no ciphertext in the registry, destroyed key slots, no cached state (and
  no cached state or key outlives its record);
- replay: sampled served stages, retrained from their stored lineage (record ids from the lineage table,
  their stored content, the parent stages, the recorded numeric environment), equal the stored
  artifacts bit for bit (`torch.equal`). A stage trained in another numeric environment cannot be
  reproduced bit for bit here: it is skipped, with the differences named.

The registry is read in one snapshot, with the run's training lock held (nothing is saved but not yet
registered meanwhile: a stage in that state would look like an orphan); without the lock (a restore is
running) the orphan scan and the replay are skipped. Deletions go on while an audit runs: what a
deletion in flight retires or destroys after the snapshot is looked at again before it is reported.

    report = S3T.open("runs/news", recover=False).audit(replay=2)
    report.passed, report.failures
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import select

from . import ledger
from .errors import DataError
from .files import FileLock
from .registry import artifacts, environments, lineage, meta, records, retired_artifacts, utcnow
from .store import SUFFIX, ArtifactStore, file_sha256

if TYPE_CHECKING:
    from .system import S3T

__all__ = ["AuditReport", "Check", "audit"]

SETTLE_S = 2.0   # how long a finding that a deletion in flight would resolve is looked at again


@dataclass(frozen=True)
class Check:
    """One check of an audit: passed, failed (one line per failure) or skipped (the summary says why)."""

    name: str
    status: str                          # passed | failed | skipped
    summary: str                         # what it looked at, in words
    looked_at: dict = field(default_factory=dict)   # counts and ids
    failures: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuditReport:
    run_dir: str
    checked_at: str
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        return not any(c.status == "failed" for c in self.checks)

    @property
    def failures(self) -> list[str]:
        """One line per failure, prefixed with its check's name."""
        return [f"{c.name}: {f}" for c in self.checks for f in c.failures]

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)

    def to_dict(self) -> dict:
        return asdict(self) | {"passed": self.passed}


def audit(system: "S3T", *, replay: int | str = 0, seed: int | None = None,
          public_key: str | None = None) -> AuditReport:
    """Audit a run (see the module docstring). `replay`: how many served stages to retrain (or "all");
    `seed`: makes their sample reproducible (default: fresh randomness, so nobody can predict it);
    `public_key`: PEM key the ledger must be signed with (default: the run's own)."""
    from .system import TRAIN_LOCK, TRAIN_LOCK_WAIT_S

    if not (replay == "all" or (isinstance(replay, int) and not isinstance(replay, bool) and replay >= 0)):
        raise DataError(f"`replay` must be a number of stages >= 0 or 'all'; got {replay!r}")
    key = ledger.load_public_key(public_key) if public_key is not None else (
        system._signing_key.public_key() if system._signing_key is not None else None)
    lock = FileLock(system.run_dir / TRAIN_LOCK)
    held = lock.acquire(wait=TRAIN_LOCK_WAIT_S)
    try:
        with system.registry.engine.connect() as conn:   # one snapshot of the registry
            snap = _Snapshot.read(system, conn)
        checks = [_artifacts(system, snap), _orphans(system, snap, held), _lineage(system, snap),
                  _deletions(snap), _ledger(snap, key, pinned=public_key is not None), _erasure(system, snap),
                  _replay(system, snap, replay, seed, held)]
    finally:
        lock.release()
    return AuditReport(run_dir=str(system.run_dir), checked_at=utcnow(), checks=tuple(checks))


@dataclass
class _Snapshot:
    orders: list[dict]
    served: list[dict]
    artifacts: dict[str, dict]                        # registered: lineage -> row
    lineage: dict[str, list[tuple[str, int]]]         # artifact -> [(record id, generation)]
    records: dict[str, dict]                          # id -> {shard, slice, deleted_in, generation, key_slot, content}
    entries: list[dict]                               # ledger rows, in chain order
    head: tuple[int, str] | None
    retired: dict[str, str]                           # queued for shredding: lineage -> retired_at
    environments: dict[str, dict]
    referenced_slots: set[int]
    base_digest: str | None

    @classmethod
    def read(cls, system: "S3T", conn) -> "_Snapshot":
        reg = system.registry
        arts = {r.lineage: r._asdict() for r in conn.execute(select(artifacts))}
        _version, served = reg.served(conn)
        wanted = sorted(set(arts) | {a for c in served for a in c["artifacts"]})
        rows: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for start in range(0, len(wanted), 900):
            for a, rid, gen in conn.execute(select(lineage.c.artifact, lineage.c.record_id, lineage.c.generation)
                                            .where(lineage.c.artifact.in_(wanted[start:start + 900]))):
                rows[a].append((rid, gen or 0))
        content = (records.c.input.is_not(None) | records.c.target.is_not(None)).label("content")
        recs = {r.id: dict(shard=r.shard, slice=r.slice, deleted_in=r.deleted_in, generation=r.generation or 0,
                           key_slot=r.key_slot, content=bool(r.content))
                for r in conn.execute(select(records.c.id, records.c.shard, records.c.slice, records.c.deleted_in,
                                             records.c.generation, records.c.key_slot, content))}
        return cls(orders=reg.orders(conn), served=served, artifacts=arts, lineage=dict(rows), records=recs,
                   entries=reg.ledger_entries(conn), head=reg.ledger_recorded_head(conn),
                   retired=dict(conn.execute(select(retired_artifacts.c.lineage, retired_artifacts.c.retired_at)).all()),
                   environments={fp: json.loads(d) for fp, d in conn.execute(select(environments))},
                   referenced_slots=reg.referenced_key_slots(conn),
                   base_digest=conn.execute(select(meta.c.value).where(meta.c.key == "base_model_digest")).scalar())

    def deleted_by_ledger(self) -> dict[tuple[str, int], tuple[str, int | None]]:
        """{(record id, generation): (request id, ledger seq)} of every deletion the ledger records: a
        deletion removes the generation of the id that the ledger's additions had brought in by then."""
        generation: dict[str, int] = defaultdict(int)
        deleted = {}
        for e in self.entries:
            if e["kind"] == "addition":
                for rid, gen in e["receipt"].get("replaced", ()):
                    generation[rid] = gen
            else:
                for rid in e["receipt"].get("deleted", ()):
                    deleted[rid, generation[rid]] = (e["request_id"], e["seq"])
        return deleted


# -- the checks ----------------------------------------------------------------------------------------
def _artifacts(system: "S3T", snap: _Snapshot) -> Check:
    store = _store(system)
    bad = {}
    for h in sorted(snap.artifacts):
        path = store.path(h)
        if not path.is_file():
            bad[h] = "its file is missing"
        elif file_sha256(path) != snap.artifacts[h]["sha256"]:
            bad[h] = "its file does not match its recorded hash (altered, or partly written)"
    still = system.registry.artifact_hashes(bad)   # a deletion may have retired (and shredded) some since
    failures = [f"artifact {h} (stage {snap.artifacts[h]['stage']}): {why}" for h, why in bad.items() if h in still]
    return _result("artifacts", f"{len(snap.artifacts)} registered artifacts: file present and hash verified for "
                   f"{len(snap.artifacts) - len(failures)}", {"registered": len(snap.artifacts)}, failures)


def _orphans(system: "S3T", snap: _Snapshot, held: bool) -> Check:
    store = _store(system)
    files = sorted(p for p in store.root.rglob("*") if p.is_file()) if store.root.is_dir() else []

    def on_disk(lineages: list[str]) -> list[str]:
        queued = dict(system.registry.retired())
        return [h for h in lineages if h in queued and store.path(h).exists()]
    retired = _settled(on_disk, [h for h in sorted(snap.retired) if store.path(h).exists()])
    failures = [f"retired stage {h} is still on disk at {store.path(h).relative_to(system.run_dir)} (it saw a "
                "deleted record; the next sweep shreds it: `s3t restore` or reopening the run)" for h in retired]
    looked = {"files": len(files), "registered": len(snap.artifacts), "retired_queued": len(snap.retired)}
    if not held:
        return _result("orphans", f"{len(snap.retired)} retired stages checked; the scan for unregistered files "
                       "was skipped: another process is training the run (a stage it has saved but not yet "
                       "registered would look like an orphan); audit again when it is done", looked, failures,
                       skipped=True)
    orphans = [p for p in files if p.name.removesuffix(SUFFIX) not in snap.retired
               and not (p.name.removesuffix(SUFFIX) in snap.artifacts and p == store.path(p.name.removesuffix(SUFFIX)))]
    failures += [f"file {p.relative_to(system.run_dir)} is not a registered artifact (an orphan: no registry row "
                 "accounts for it)" for p in orphans]
    return _result("orphans", f"{len(files)} files under artifacts/ against {len(snap.artifacts)} registered "
                   f"artifacts; {len(snap.retired)} retired stages queued for shredding", looked, failures)


def _lineage(system: "S3T", snap: _Snapshot) -> Check:
    try:
        training = _training_fields(system)
    except Exception as exc:   # the base model moved: names cannot be recomputed here
        return _result("lineage", f"skipped: the plan's training fields need the base model ({exc})", {}, [],
                       skipped=True)
    failures, checked, rows = [], set(), 0
    for o in snap.orders:
        for i, h in enumerate(o["artifacts"][:o["depth"]], start=1):
            where = f"shard {o['shard']} order {o['position']} stage {i}"
            if h not in snap.artifacts:
                failures.append(f"{where} uses artifact {h}, which is not registered")
                continue
            if h in checked:
                continue
            checked.add(h)
            seen = snap.lineage.get(h, [])
            rows += len(seen)
            if len(seen) != snap.artifacts[h]["examples"]:
                failures.append(f"artifact {h} ({where}): its stored lineage lists {len(seen)} records, but it was "
                                f"trained on {snap.artifacts[h]['examples']}: the lineage table was altered")
                continue
            name, _seed, problem = _names(training, snap, o, i, seen, snap.artifacts[h]["environment"])
            if problem:
                failures.append(f"artifact {h} ({where}): its stored lineage {problem}")
            elif name != h:
                failures.append(f"artifact {h} ({where}): its stored lineage ({len(seen)} record ids) does not hash "
                                "to its name: the lineage table was altered")
    return _result("lineage", f"{len(checked)} stages in use by the orders: stored lineage ({rows} rows) hashed "
                   "and compared with each stage's name", {"stages": len(checked), "lineage_rows": rows}, failures)


def _deletions(snap: _Snapshot) -> Check:
    deleted = snap.deleted_by_ledger()
    served = {a for c in snap.served for a in c["artifacts"]}
    failures = []
    for h in sorted(served | set(snap.artifacts)):
        what = "served artifact" if h in served else "registered artifact"
        for rid, gen in snap.lineage.get(h, []):
            if (rid, gen) in deleted:
                request, seq = deleted[rid, gen]
                failures.append(f"{what} {h} saw record {rid!r}, which ledger entry #{seq} (request {request}) deleted")
    by_request = {e["request_id"]: e for e in snap.entries}
    for rid, rec in sorted(snap.records.items()):
        entry = by_request.get(rec["deleted_in"]) if rec["deleted_in"] else None
        if rec["deleted_in"] and (entry is None or rid not in entry["receipt"].get("deleted", ())):
            failures.append(f"record {rid!r} is marked deleted by request {rec['deleted_in']}, which the ledger does "
                            "not record (a ledger entry was removed or altered)")
    for (rid, gen), (request, seq) in sorted(deleted.items()):
        rec = snap.records.get(rid)
        if rec is None:
            failures.append(f"record {rid!r}, deleted by ledger entry #{seq}, has no tombstone in the registry")
        elif rec["deleted_in"] is None and rec["generation"] == gen:
            failures.append(f"record {rid!r} is live in the registry, but ledger entry #{seq} (request {request}) "
                            "deleted it")
    requests = sum(e["kind"] == "deletion" for e in snap.entries)
    return _result("deletions", f"{len(deleted)} deleted records in {requests} ledger deletions against the stored "
                   f"lineage of {len(served)} served and {len(snap.artifacts)} registered artifacts, and "
                   f"{sum(bool(r['deleted_in']) for r in snap.records.values())} tombstones",
                   {"deleted_records": len(deleted), "deletion_requests": requests, "served_artifacts": len(served),
                    "registered_artifacts": len(snap.artifacts)}, failures)


def _ledger(snap: _Snapshot, key, *, pinned: bool) -> Check:
    failures = ledger.verify_chain(snap.entries, key, head=snap.head)
    last = max((e for e in snap.entries if e["seq"] is not None), key=lambda e: e["seq"], default=None)
    if last is not None and snap.head is None:   # every append (and the chaining of an older run) records it
        chained = sum(e["seq"] is not None for e in snap.entries)
        failures.append(f"the ledger has {chained} chained entries but no recorded head (the seq and hash each "
                        "append records): it was removed, so entries may have been removed from the ledger's end")
    looked = {"entries": len(snap.entries), "head": f"{last['seq']}:{last['entry_hash']}" if last else None,
              "key_id": ledger.key_id(key) if key is not None else None}
    signed = (f"signatures verified with {'the pinned key' if pinned else 'the run' + chr(39) + 's key'} {looked['key_id']}"
              if key is not None else "signatures not checked: the run has no signing key and none was given")
    return _result("ledger", f"{len(snap.entries)} ledger entries: sequence, links and hashes checked from the "
                   f"genesis value; {signed}" + (f"; head #{looked['head']}" if last else ""), looked, failures)


def _erasure(system: "S3T", snap: _Snapshot) -> Check:
    from . import cache

    reg, keys = system.registry, system.registry.keys
    ledger_deleted = snap.deleted_by_ledger()
    deleted = sorted({rid for rid, r in snap.records.items() if r["deleted_in"]}
                     | {rid for (rid, gen) in ledger_deleted
                        if rid in snap.records and snap.records[rid]["generation"] == gen})
    failures = [f"deleted record {rid!r} still has ciphertext in the registry" for rid in deleted
                if snap.records[rid]["content"]]
    slots = {snap.records[rid]["key_slot"]: rid for rid in deleted}
    # A deletion destroys its keys just after its commit: look again before reporting one.
    live_keys = _settled(lambda s: [k for k, v in keys.keys(s).items() if v is not None], sorted(slots))
    failures += [f"deleted record {slots[s]!r}: its key (slot {s} of keys.bin) is not destroyed" for s in live_keys]
    def unreferenced_live(candidates: list[int]) -> list[int]:   # a write in flight commits its slots in a moment
        referenced = reg.referenced_key_slots()
        return [k for k, v in keys.keys(candidates).items() if v is not None and k not in referenced]
    stray = _settled(unreferenced_live, sorted(set(range(len(keys))) - snap.referenced_slots))
    failures += [f"key slot {s} of keys.bin belongs to no record or held request but is not destroyed" for s in stray]
    base, files = system.run_dir / cache.CACHE_DIR, 0
    with cache.cache_lock(system.run_dir).hold():   # fills and deletions write the cache under this lock
        live = {cache._record_name(i) for i in reg.live_ids()}
        gone = {cache._record_name(i): i for i in reg.deleted_ids()}
        for path in sorted(p for p in base.rglob("*") if p.is_file()) if base.is_dir() else []:
            files += 1
            name = path.name.removesuffix(cache.SUFFIX)
            if name in gone:
                failures.append(f"deleted record {gone[name]!r} still has a cached state at "
                                f"{path.relative_to(system.run_dir)}")
            elif name not in live:
                failures.append(f"cached state {path.relative_to(system.run_dir)} belongs to no live record")
    return _result("erasure", f"{len(deleted)} deleted records: registry content, {len(slots)} key slots and "
                   f"{files} cached files checked; {len(keys)} key slots in keys.bin",
                   {"deleted_records": len(deleted), "key_slots": len(keys), "cache_files": files}, failures)


def _replay(system: "S3T", snap: _Snapshot, replay: int | str, seed: int | None, held: bool) -> Check:
    stages = [(c, i) for c in snap.served for i in range(1, len(c["artifacts"]) + 1)]
    if replay == 0:
        return _result("replay", "not asked for (--replay N or all)", {"served_stages": len(stages)}, [],
                       skipped=True)
    if not held:
        return _result("replay", "skipped: another process is training the run (a replay fills the trunk cache, "
                       "which must not race a training); audit again when it is done",
                       {"served_stages": len(stages)}, [], skipped=True)
    seed = random.SystemRandom().randrange(2 ** 32) if seed is None else seed
    sample = stages if replay == "all" else random.Random(seed).sample(stages, min(replay, len(stages)))
    sample.sort(key=lambda ci: (ci[0]["shard"], ci[1]))
    outcomes, failures, skipped = [], [], 0
    for component, stage in sample:
        h = component["artifacts"][stage - 1]
        outcome = _replay_stage(system, snap, component, stage)
        outcomes.append({"artifact": h, "shard": component["shard"], "order": component["position"],
                         "stage": stage, "result": outcome})
        where = f"artifact {h} (shard {component['shard']} order {component['position']} stage {stage})"
        if outcome.startswith("skipped"):
            skipped += 1
        elif outcome != "bit-identical":
            failures.append(f"{where}: {outcome}")
    summary = (f"{len(sample)} of {len(stages)} served stages retrained from their stored lineage (sample seed "
               f"{seed}): {len(sample) - skipped - len(failures)} bit-identical, {len(failures)} different, "
               f"{skipped} skipped")
    return _result("replay", summary, {"served_stages": len(stages), "seed": seed, "stages": outcomes}, failures,
                   skipped=bool(sample) and skipped == len(sample))


def _replay_stage(system: "S3T", snap: _Snapshot, component: dict, stage: int) -> str:
    """"bit-identical", what differs, or "skipped: why" for one served stage."""
    import torch

    from .environment import NumericEnvironment, pinned
    from .lineage import stage_seed
    from .records import from_payload

    h = component["artifacts"][stage - 1]
    row = snap.artifacts.get(h)
    if row is None:
        return "not registered: nothing to compare with"
    trainer = system.trainer
    here = trainer.environment
    if row["environment"] != here.fingerprint:
        recorded = snap.environments.get(row["environment"])
        differences = (NumericEnvironment(**recorded).differences(here) if recorded else
                       [f"environment {row['environment']} is not described in the registry"])
        return ("skipped: trained in another numeric environment, so a replay here cannot be bit-exact ("
                + "; ".join(differences) + ")")
    order = next(o for o in snap.orders if o["shard"] == component["shard"] and o["position"] == component["position"])
    seen = snap.lineage.get(h, [])
    name, seed_name, problem = _names(_training_fields(system), snap, order, stage, seen, row["environment"])
    if problem or name != h:
        return f"its stored lineage {problem or 'does not hash to its name'}: nothing to replay from"
    _members, content = system.registry.live_shard(component["shard"])
    missing = [rid for rid, gen in seen if rid not in content or snap.records[rid]["generation"] != gen]
    if missing:
        return (f"its stored lineage names {len(missing)} records whose content is no longer stored (deleted, or "
                f"replaced by a new record under the same id; e.g. {missing[0]!r})")
    ids = sorted(rid for rid, _gen in seen)
    recs = {i: from_payload(trainer.kind, i, content[i]) for i in ids}   # as `Trainer.complete` reads them
    label_index = {label: k for k, label in enumerate(system.labels)}
    targets = {i: label_index[r.label] for i, r in recs.items()} if trainer.model.task == "classify" else None
    parents = component["artifacts"][:stage - 1]
    trainer.forget([h, *parents])   # parents are read from disk again, checked against their recorded hashes
    with pinned(trainer.environment):
        trainer.cache.fill(trainer.model, ids, lambda i: recs[i].model_input)
    result = trainer.train_stage(stage=stage, lineage=h, parents=parents, ids=ids, targets=targets,
                                 seed=stage_seed(seed_name))
    stored = trainer.store.load(h, row["sha256"])
    if stored.keys() != result.tensors.keys():
        return "the retrained stage has other tensors than the stored artifact"
    different = sorted(k for k in stored if not torch.equal(stored[k], result.tensors[k]))
    if different:
        return (f"retrained from its stored lineage, it differs from the stored artifact in {len(different)} of "
                f"{len(stored)} tensors (e.g. {different[0]})")
    return "bit-identical"


# -- helpers ---------------------------------------------------------------------------------------------
def _names(training: dict, snap: _Snapshot, order: dict, stage: int, seen: list[tuple[str, int]],
           environment: str) -> tuple[str | None, str | None, str | None]:
    """(name, seed name, problem) of stage `stage` of `order` as its stored lineage gives it: the record
    ids grouped by their cells in the order's prefix (with generations: the name; without: its seed's)."""
    from .lineage import lineage_hash, slice_digest

    prefix = order["slices"][:stage]
    by_slice: dict[int, list[str]] = defaultdict(list)
    generations = {}
    for rid, gen in seen:
        rec = snap.records.get(rid)
        if rec is None:
            return None, None, f"names record {rid!r}, which the registry does not hold"
        if rec["shard"] != order["shard"] or rec["slice"] not in prefix:
            return None, None, (f"names record {rid!r} of shard {rec['shard']} slice {rec['slice']}, outside the "
                                f"stage's prefix (shard {order['shard']} slices {list(prefix)})")
        by_slice[rec["slice"]].append(rid)
        if gen:
            generations[rid] = gen

    def name(gens) -> str:
        return lineage_hash(training=training, base_model=snap.base_digest, environment=environment,
                            prefix=[slice_digest(by_slice.get(s, []), gens) for s in prefix])
    return name(generations), name(None), None


def _training_fields(system: "S3T") -> dict:
    if system._trainer is not None:   # loaded (the service's): no config to read again
        return system._trainer.training
    from .models import count_blocks, resolve_model_path

    return system.plan.training_fields(count_blocks(resolve_model_path(system.plan.base_model)))


def _settled(still_failing: Callable[[list], list], items: list) -> list:
    """Findings that a deletion in flight may resolve in a moment (a key destroyed just after its commit,
    a retired file being shredded): looked at again for up to SETTLE_S before they count."""
    deadline = time.monotonic() + SETTLE_S
    items = still_failing(items) if items else items
    while items and time.monotonic() < deadline:
        time.sleep(0.05)
        items = still_failing(items)
    return items


def _result(name: str, summary: str, looked_at: dict, failures: list[str], *, skipped: bool = False) -> Check:
    status = "failed" if failures else "skipped" if skipped else "passed"
    return Check(name=name, status=status, summary=summary, looked_at=looked_at, failures=tuple(failures))


def _store(system: "S3T") -> ArtifactStore:
    from .system import ARTIFACTS_DIR

    return ArtifactStore(system.run_dir / ARTIFACTS_DIR)
