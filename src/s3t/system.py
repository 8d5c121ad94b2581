"""`S3T`: one run folder holding a sharded, sliced model that can forget records exactly.

    system = S3T.create("runs/bbc", Plan(num_shards=2, num_slices=3), data)
    system.train()
    system.predict(["some text"])          # or images (paths, bytes, PIL images, arrays) for a ViT run
    receipt = system.delete(ids=["bbc-tech-001"])
    system.add(more_data)             # served model unchanged; restore() trains the new records in
    system.restore()
    system.audit(replay=2).passed     # files, lineage, ledger chain, erasure, two stages retrained bit for bit
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from sqlalchemy.exc import SQLAlchemyError

from .errors import (DataError, NeedsRestoreError, NotFoundError, NotTrainedError, PlanError, RunBusyError, RunError,
                     RunExistsError, RunNotFoundError)
from .files import FileLock, create_private, private_dir, shred, write_private
from .ingest import Addition, assign_cells, record_rows
from .keystore import KeyStore
from .orders import select_orders
from .partition import slice_sizes
from .plan import Plan
from .records import Dataset, check_labels, payload
from .registry import Registry, check_schema_name
from .truncation import deletions_to_drop
from .unlearning import Receipt, current_depth, preview, rebuild, restorable, subject_digest, truncated

if TYPE_CHECKING:
    from .batch import DeletionQueue
    from .executors import Executor

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from .audit import AuditReport
    from .environment import NumericEnvironment
    from .registry import AdvisoryLock

__all__ = ["S3T", "Prediction", "Generation", "ShardStatus", "Status"]

# The run folder (0700; every file in it 0600, whatever the umask: see files.py).
RUN_FILE = "run.json"
DB_FILE = "registry.sqlite"
KEYS_FILE = "keys.bin"            # one key per record (and per held request), destroyed on deletion
LEDGER_KEY_FILE = "ledger.key"    # HMAC key of subject digests and request fingerprints: not in the database
RECORD_KIND = "record_kind"       # meta: the kind of record the run trains on (records.KINDS, S3T.kind)
RUN_ID = "run_id"                 # meta: a random name of the run (a Ray worker checks it opened the same run)
SIGNING_KEY_FILE = "signing.key"  # Ed25519 private key that signs the ledger's entries (s3t.ledger)
ARTIFACTS_DIR = "artifacts"
TRAIN_LOCK = "train.lock"         # held by whoever trains (train/restore) for the whole rebuild
RUN_FORMAT = 2                    # 2: sealed content, key file, ledger key file; 1 is refused (no migration)
TRAIN_LOCK_WAIT_S = 5.0           # a sweep holds the training lock briefly: a trainer waits this long for it

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardStatus:
    shard: int
    live_orders: int
    orders: int
    served_order: int | None        # position of the served order within the shard; None if the shard is down
    served_depth: int               # layer groups in use (0 = the shard is out of the ensemble)
    deletions_to_drop: int          # fewest further deletions that take the shard out of the ensemble
    empty_slices: tuple[int, ...] = ()   # slices with no live record: orders starting there are never trained
    unseen_records: int = 0         # live records its served model has not seen (added since, or beyond its depth)


@dataclass(frozen=True)
class Status:
    trained: bool
    live_records: int
    deleted_records: int
    served_version: int
    truncated_orders: int           # orders below the depth training would give them: what `restore()` retrains
    shards: tuple[ShardStatus, ...]
    stale_orders: int = 0           # orders with a trained stage that misses records added since: `restore()` too
    unseen_records: int = 0         # live records no served artifact has seen (`S3T.unseen()` lists them)

    @property
    def serving(self) -> bool:
        """Whether any shard is live, i.e. predictions can be made."""
        return any(s.served_depth > 0 for s in self.shards)


@dataclass(frozen=True)
class Generation:
    """Completions of prompts, with the served-set version that produced them."""

    texts: tuple[str, ...]
    served_version: int


@dataclass(frozen=True)
class Prediction:
    """Predicted labels and class probabilities, with the served-set version that produced them."""

    labels: tuple[str, ...]          # one predicted label name per text
    probabilities: np.ndarray        # (texts, len(S3T.labels)), columns in S3T.labels order
    served_version: int


class S3T:
    """A trained (or trainable) S3T model stored in a run folder. Use `create` or `open`."""

    def __init__(self, run_dir: Path, plan: Plan, registry: Registry, ledger_key: bytes,
                 signing_key: "Ed25519PrivateKey | None" = None) -> None:
        self.run_dir = run_dir
        self.plan = plan
        self.registry = registry
        self.labels: tuple[str, ...] = plan.labels or ()
        self._ledger = ledger_key
        self._signing_key = signing_key
        self._trainer = None
        self._deletions: DeletionQueue | None = None
        self._deletions_lock = threading.Lock()
        self._device: str | None = None
        self._kind: str | None = None

    def __repr__(self) -> str:
        return f"S3T({str(self.run_dir)!r}, {self.plan!r})"

    # -- lifecycle ----------------------------------------------------------------------------------
    @classmethod
    def create(cls, run_dir: str | Path, plan: Plan, data: Dataset, *, database_url: str | None = None,
               database_schema: str | None = None) -> "S3T":
        """Partition `data` by `plan` into a new run folder (nothing is trained yet; call `train()`).

        The registry is SQLite in the run folder unless `database_url` names another database, e.g.
        `postgresql+psycopg://user@host/db` (`pip install 's3t[postgres]'`). On PostgreSQL each run needs
        a schema of its own: `database_schema` (created if missing; default: the connection's, usually
        `public`); a schema that already holds a run is refused. Artifacts, keys and the cache stay in
        the run folder, which replicas of the service share (a shared filesystem).
        """
        from .ledger import create_signing_key
        from .models import count_blocks, family_at, model_digest, resolve_model_path

        run_dir = Path(run_dir)
        if (run_dir / RUN_FILE).exists():
            raise RunExistsError(f"{run_dir} already holds a run; open it with S3T.open({str(run_dir)!r}) "
                                 "or choose a new folder")
        if database_schema is not None:
            if not database_url:
                raise RunError(f"`database_schema` ({database_schema!r}) needs a PostgreSQL `database_url`; "
                               "a SQLite registry lives in the run folder")
            check_schema_name(database_schema)
        if not isinstance(data, Dataset):
            raise DataError(f"`data` must be an s3t.Dataset; got {type(data).__name__}. "
                            "Build one with Dataset.from_records / from_jsonl / from_csv")
        model_path = resolve_model_path(plan.base_model)
        blocks = count_blocks(model_path)
        plan.blocks_for(blocks)
        family = family_at(model_path)
        plan = _resolve(plan, data, family)
        assignment = assign_cells(plan, data)
        sizes = slice_sizes(assignment, num_shards=plan.num_shards, num_slices=plan.num_slices)
        if (sizes == 0).any():   # allowed (see truncation.attainable_depth), but rarely what the user meant
            empty = [f"shard {m} slice {s}" for m, s in np.argwhere(sizes == 0)]
            logger.warning("%d of %d cells get no records (%s%s): orders that start with an empty slice are never "
                           "trained; use fewer shards or slices if that is not what you want", len(empty), sizes.size,
                           ", ".join(empty[:5]), " ..." if len(empty) > 5 else "")
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        private_dir(run_dir)
        url = database_url or f"sqlite:///{(run_dir / DB_FILE).resolve()}"
        keys = registry = None
        try:
            ledger_key = os.urandom(32)
            write_private(run_dir / LEDGER_KEY_FILE, ledger_key)
            signing_key = create_signing_key(run_dir / SIGNING_KEY_FILE)
            keys = KeyStore.create(run_dir / KEYS_FILE)
            if not database_url:
                create_private(run_dir / DB_FILE)   # 0600 before SQLite opens it: its journal takes this mode
            Registry.prepare(url, database_schema)
            candidate = Registry(url, keys, schema=database_schema)
            if database_url and candidate.holds_run():
                candidate.engine.dispose()
                where = f"schema {database_schema!r} of " if database_schema else ""
                raise RunExistsError(f"{where}the database {_safe_url(url)} already holds a run; give the new run "
                                     "a schema of its own (`database_schema=...`, `--database-schema NAME`)")
            registry = candidate
            registry.create_schema()
            with registry.transaction() as conn:
                registry.set_meta(conn, "plan", plan.to_json())
                registry.set_meta(conn, "base_model_digest", model_digest(model_path))
                registry.set_meta(conn, RECORD_KIND, family.kind)   # what `add` accepts, without the model
                registry.set_meta(conn, RUN_ID, uuid.uuid4().hex)
                registry.add_cells(conn, (plan.num_shards, plan.num_slices))
                # sealed by the registry, each under a key of its own
                registry.insert_records(conn, record_rows(data, assignment, ledger_key))
                registry.insert_orders(conn, [
                    dict(shard=shard, position=k, slices=order, depth=0)
                    for shard in range(plan.num_shards) for k, order in enumerate(select_orders(plan, shard))])
                for shard in range(plan.num_shards):
                    registry.set_capacity(conn, shard, 0)   # nothing trained: no deletion capacity yet
        except BaseException as exc:
            if registry is not None:
                if database_url and not isinstance(exc, RunExistsError):
                    registry.drop_schema_tables()   # it held no run before: leave it as it was
                registry.close()   # closes the key file too
            elif keys is not None:
                keys.close()
            shutil.rmtree(run_dir / ARTIFACTS_DIR, ignore_errors=True)
            for name in (DB_FILE, KEYS_FILE, LEDGER_KEY_FILE, SIGNING_KEY_FILE):
                shred(run_dir / name)
            raise
        write_private(run_dir / RUN_FILE, json.dumps({"format": RUN_FORMAT, "database_url": database_url,
                                                      "database_schema": database_schema}, indent=2).encode())
        return cls(run_dir, plan, registry, ledger_key, signing_key)

    @classmethod
    def open(cls, run_dir: str | Path, *, recover: bool = True) -> "S3T":
        """Reopen a run folder written by `create`.

        Before anything else it finishes what a crash may have cut short: it destroys the keys of deleted
        records (a crash between a deletion's commit and its key destruction), then sweeps (`sweep`). A run
        made before the ledger was signed gets its signing key, and its ledger entries their chain.
        `recover=False` opens the run as found and changes nothing (an audit looks at it that way).
        """
        run_dir = Path(run_dir)
        if not (run_dir / RUN_FILE).is_file():
            raise RunNotFoundError(f"no s3t run at {run_dir} (missing {RUN_FILE}); create one with `s3t train`")
        damaged = f"the run at {run_dir} is damaged"
        try:
            info = json.loads((run_dir / RUN_FILE).read_text())
            url = info.get("database_url") or f"sqlite:///{(run_dir / DB_FILE).resolve()}"
            schema = info.get("database_schema")
            version = info.get("format")
        except (OSError, ValueError, AttributeError) as exc:
            raise RunError(f"{damaged}: {RUN_FILE} is unreadable ({exc}); restore the folder from a backup") from None
        if version != RUN_FORMAT:
            raise RunError(f"the run at {run_dir} was created by an older s3t (run format {version}; this version "
                           f"reads format {RUN_FORMAT}, which stores record content encrypted); recreate it with "
                           "`s3t train NEW_RUN_DIR --data ...` (or S3T.create) from the original data"
                           if isinstance(version, int) and version < RUN_FORMAT else
                           f"the run at {run_dir} has run format {version!r}, which this s3t does not read "
                           f"(it reads format {RUN_FORMAT}); open it with the s3t version that created it")
        if not info.get("database_url") and not (run_dir / DB_FILE).is_file():   # never create an empty one
            raise RunError(f"{damaged}: {DB_FILE} is missing; restore the folder from a backup")
        try:
            ledger_key = (run_dir / LEDGER_KEY_FILE).read_bytes()
            signing_key, key_created = _signing_key(run_dir / SIGNING_KEY_FILE, create=recover)
            keys = KeyStore.open(run_dir / KEYS_FILE)
        except (OSError, ValueError) as exc:
            raise RunError(f"{damaged}: {exc}; restore the folder from a backup") from None
        try:
            registry = Registry(url, keys, schema=schema)
        except RunError:
            keys.close()
            raise
        try:
            registry.create_schema()   # adds tables introduced since the run was created (no-op otherwise)
            plan = registry.get_meta("plan")
        except SQLAlchemyError as exc:
            registry.close()
            reason = getattr(exc, "orig", None) or exc
            raise RunError(f"{damaged}: its database cannot be read ({reason}); restore the folder from a backup"
                           ) from None
        if plan is None:
            registry.close()
            raise RunError(f"{damaged}: its database holds no plan; restore the folder from a backup")
        system = cls(run_dir, Plan.from_json(plan), registry, ledger_key, signing_key)
        if recover:
            system._destroy_dead_keys()
            if key_created:   # only the open that migrates an older run chains; see _chain_ledger
                system._chain_ledger()
            system._keep_capacities()
            system._keep_run_id()
            system.sweep()
        return system

    def close(self) -> None:
        if self._deletions is not None:
            self._deletions.close()
        self.registry.close()

    def _keep_capacities(self) -> None:
        """Fill the per-shard capacity table of a run created before it existed (once; cheap)."""
        if self.registry.capacities():
            return
        orders = self.registry.orders()
        if not orders:
            return
        with self.registry.transaction() as conn:
            for shard in sorted({o["shard"] for o in orders}):
                mine = [o for o in orders if o["shard"] == shard]
                self.registry.set_capacity(conn, shard, deletions_to_drop([o["slices"] for o in mine],
                                                                          [o["depth"] for o in mine]))

    def _keep_run_id(self) -> None:
        """Name a run created before runs had a name (once)."""
        if self.registry.get_meta(RUN_ID) is None:
            with self.registry.transaction() as conn:
                self.registry.set_meta(conn, RUN_ID, uuid.uuid4().hex)

    def _lock(self, name: str) -> "FileLock | AdvisoryLock":
        """A run-wide lock: a `flock` file in the run folder (SQLite: one machine), or a PostgreSQL advisory
        lock (replicas on several machines share the database, and may not share flock semantics)."""
        return self.registry.lock(name) if self.registry.postgres else FileLock(self.run_dir / name)

    # -- erasure at rest ----------------------------------------------------------------------------
    def _destroy_dead_keys(self) -> None:
        """Destroy every key that should be gone: those of deleted records and decided held requests (a
        crash can fall between a commit and its key destruction), and slots that no row refers to (a
        crash or rollback between a key's allocation and its commit)."""
        reg, keys = self.registry, self.registry.keys
        destroyed = keys.destroy(reg.dead_key_slots())
        if len(keys) != reg.count_key_slots():
            # Keys are allocated inside write transactions: under the write lock none is about to commit.
            with reg.transaction() as conn:
                destroyed += keys.destroy(set(range(len(keys))) - reg.referenced_key_slots(conn))
        if destroyed:
            logger.warning("destroyed %d keys that a crash left behind in %s", destroyed, self.run_dir)

    def _chain_ledger(self) -> None:
        """Chain (and sign) the ledger entries of an older run, written before the ledger was chained.

        Called only by the open that creates the run's signing key: once the run has a key, an entry
        without a chain position was inserted or edited outside s3t, and signing it at the next open would
        launder a forgery by whoever holds only the database. The audit reports such entries instead.
        """
        from .ledger import chain_unchained

        if not self.registry.ledger_entries(unchained=True):
            return
        with self.registry.transaction() as conn:   # under the write lock: no append interleaves
            chained = chain_unchained(self.registry, conn, signing_key=self._signing_key)
        logger.warning("chained and signed %d ledger entries of %s written before the ledger was chained; from "
                       "now on, editing or removing any of them shows", chained, self.run_dir)

    def sweep(self) -> int:
        """Shred what no registry row accounts for; returns how many files it shredded.

        If no process is training this run: every file under artifacts/ that is not a registered artifact
        (temp files of interrupted saves, stages a crash left unregistered) and every cached state that
        belongs to no live record. In any case: the retired stages queued for shredding. Runs at `open`,
        at the end of every `train`/`restore`, and when the HTTP service starts.
        """
        lock = self._lock(TRAIN_LOCK)
        if not lock.acquire(wait=0):   # a trainer is between saves and registrations: it sweeps when done
            return self._shred_retired()
        try:
            return self._sweep_orphans() + self._shred_retired()
        finally:
            lock.release()

    def _sweep_orphans(self) -> int:
        """Shred unregistered artifact files and cached states of no live record (hold the training lock)."""
        from . import cache
        from .store import ArtifactStore

        shredded = ArtifactStore(self.run_dir / ARTIFACTS_DIR).sweep(self.registry.artifact_lineages())
        if (self.run_dir / cache.CACHE_DIR).is_dir():
            shredded += cache.sweep(self.run_dir, self.registry.live_ids())
        if shredded:
            logger.warning("shredded %d files of %s that no registry row accounts for (left by a crash)",
                           len(shredded), self.run_dir)
        return len(shredded)

    # -- training -----------------------------------------------------------------------------------
    @property
    def trainer(self):
        """The stage trainer with the backbone loaded (lazily: opening a run stays cheap)."""
        if self._trainer is None:
            from .cache import TrunkCache, cache_key
            from .models import count_blocks, load_model, model_digest, resolve_model_path
            from .errors import IntegrityError
            from .store import ArtifactStore
            from .training import Trainer

            path = resolve_model_path(self.plan.base_model)
            digest = self.registry.get_meta("base_model_digest")
            if model_digest(path) != digest:
                raise IntegrityError(f"the base model at {path} changed since this run was created; "
                                     "its artifacts were trained on the old one: create a new run")
            import torch

            p, blocks = self.plan, count_blocks(path)
            groups = p.num_slices if p.method == "s3t" else 1   # SISA: one group over every adapted block
            # One adapter slot for training, one per shard for serving them all at once (see inference).
            model = load_model(path, num_groups=groups, blocks_per_group=p.num_slices * p.blocks_for(blocks) // groups,
                               num_labels=len(self.labels) or None, max_length=p.max_length, lora_rank=p.lora_rank,
                               lora_alpha=p.lora_alpha, lora_dropout=p.lora_dropout, lora_targets=p.lora_targets,
                               slots=1 + p.num_shards, device=self.device, dtype=getattr(torch, p.dtype))
            boundaries = [model.group_start(g) for g in range(1, groups + 1)]
            cache = TrunkCache(self.run_dir, boundaries=boundaries, registry=self.registry,
                               key=cache_key(base_model=digest, max_length=p.max_length, boundaries=boundaries,
                                             environment=self.environment().fingerprint))
            self._trainer = Trainer(run_dir=self.run_dir, model=model, kind=model.kind, registry=self.registry,
                                    cache=cache, store=ArtifactStore(self.run_dir / ARTIFACTS_DIR),
                                    training=p.training_fields(blocks), base_digest=digest,
                                    environment=self.environment(), labels=self.labels,
                                    epochs=p.epochs, learning_rate=p.learning_rate, batch_size=p.batch_size)
        return self._trainer

    def environment(self) -> "NumericEnvironment":
        """The numeric environment this process trains in: the run's pinned thread count, device and dtype on
        this machine's stack. Stages trained in another environment have other lineages and are never reused here."""
        import torch

        from .environment import current

        return current(threads=self.plan.num_threads or torch.get_num_threads(), device=self.device,
                       dtype=self.plan.dtype)

    @property
    def device(self) -> str:
        """The device this process runs the model on ("cpu" or "cuda"): the plan's `device`, resolved here."""
        if self._device is None:
            from .environment import resolve_device

            self._device = resolve_device(self.plan.device)
        return self._device

    @property
    def kind(self) -> str:
        """What the run's records and inputs are: "text", "image" or "prompt", as `create` stored it (a run
        created before it was stored: read from the base model's config). From the registry where it can
        be: the service asks from several threads, and two threads importing transformers at once fail."""
        if self._kind is None:
            self._kind = self.registry.get_meta(RECORD_KIND)
        if self._kind is None:
            from .models import family_at, resolve_model_path

            self._kind = family_at(resolve_model_path(self.plan.base_model)).kind
        return self._kind

    def train(self, *, progress: bool = True, executor: "str | Executor" = "local") -> "S3T":
        """Train every order of every shard to full depth (resumes an interrupted run).

        `executor`: "local" trains in this process; "ray" (or `s3t.RayExecutor(address=...)`) trains the
        shards' prefix trees as Ray tasks in parallel, bit for bit the same (see `s3t.executors`).
        """
        self._rebuild(progress, "training", executor)
        return self

    def restore(self, *, progress: bool = True, executor: "str | Executor" = "local") -> int:
        """Retrain truncated and stale orders on the current data (trains added records in); the served set
        switches after each order. `executor` as for `train`."""
        return self._rebuild(progress, "restoring", executor)

    def _rebuild(self, progress: bool, what: str, executor: "str | Executor" = "local") -> int:
        from .executors import executor_for

        executor = executor_for(executor)   # a wrong name fails before the lock is taken
        # One trainer per run folder: the sweep may only shred unregistered files while nobody trains.
        lock = self._lock(TRAIN_LOCK)
        if not lock.acquire(wait=TRAIN_LOCK_WAIT_S):
            holder = "a PostgreSQL advisory lock" if self.registry.postgres else self.run_dir / TRAIN_LOCK
            raise RunBusyError(f"another process is training the run at {self.run_dir} (it holds {holder}); "
                               "wait for it to finish, then retry")
        try:
            return self._rebuild_holding_lock(progress, what, executor)
        finally:
            lock.release()

    def _rebuild_holding_lock(self, progress: bool, what: str, executor: "Executor") -> int:
        trainer = self.trainer
        todo = restorable(self.registry)
        total = sum(trainer.pending(s, [o for o in todo if o["shard"] == s]) for s in {o["shard"] for o in todo})
        try:
            with _progress(progress, f"{what} {len(todo)} orders", total) as advance:
                done = rebuild(self.registry, trainer, on_stage=advance, executor=executor)
            if done:   # the lineage grew: the deletion path's lookups need fresh statistics
                try:
                    self.registry.analyze()
                except Exception as exc:   # the training is committed; autovacuum will analyze later
                    logger.warning("refreshing the database's statistics after training failed: %s", exc)
            return done
        finally:
            # Stages that saw a record deleted while they trained were retired by `rebuild`; this backstop
            # retires whatever slipped past its checks. Then sweep, still holding the training lock: files
            # a crashed or failed registration left, cached states of deleted records, the retired queue.
            deleted = self.registry.deleted_ids()
            with self.registry.transaction() as conn:   # backstop: whatever slipped past the checks above
                self.registry.retire(conn, self.registry.artifacts_that_saw(conn, deleted))
            self._sweep_orphans()
            self._shred_retired()

    def _shred_retired(self) -> int:
        """Shred the files of retired artifacts, then forget them (a crash in between only repeats it)."""
        entries = self.registry.retired()
        if not entries:
            return 0
        lineages = [lineage for lineage, _at in entries]
        from concurrent.futures import ThreadPoolExecutor

        from .store import ArtifactStore

        store = ArtifactStore(self.run_dir / ARTIFACTS_DIR)
        # Each shred ends in an fsync; issued from several threads, their waits overlap.
        with ThreadPoolExecutor(max_workers=min(8, len(lineages))) as pool:
            list(pool.map(store.shred, lineages))
        if self._trainer is not None:
            self._trainer.forget(lineages)
        with self.registry.transaction() as conn:
            self.registry.forget_retired(conn, entries)
        return len(entries)

    # -- inference ----------------------------------------------------------------------------------
    def predict_proba(self, inputs: Sequence, *, batch_size: int = 64) -> np.ndarray:
        """Class probabilities (len(inputs), len(labels)) from the served shards, aggregated by the plan."""
        return self.classify(inputs, batch_size=batch_size).probabilities

    def classify(self, inputs: Sequence, *, batch_size: int = 64) -> Prediction:
        """Labels and probabilities, with the served-set version used.

        `inputs` are texts, or for an image run images: file paths, PNG/JPEG bytes, PIL images or uint8 arrays
        (each is read and encoded as a record's image is, so the same picture gives the same pixels).
        The served set is read from the registry when the call starts, so a call that starts after a
        deletion returned uses the served set that deletion chose.
        """
        from .inference import aggregate, shard_logits

        self._require_task("classify", "classify")
        inputs = _check_images(inputs) if self.kind == "image" else _check_texts(inputs)
        version, proba = self._with_served(
            lambda components: aggregate(shard_logits(self.trainer.model, components, inputs, load=self.trainer.load,
                                                      batch_size=batch_size), self.plan.aggregation),
            empty=np.zeros((0, len(self.labels)), dtype=np.float32) if not inputs else None)
        return Prediction(tuple(self.labels[k] for k in proba.argmax(axis=1)), proba, version)

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int = 32, temperature: float = 0.0,
                 aggregation: str = "mean_proba", seed: int | None = None) -> list[str]:
        """Completions of `prompts` by the served ensemble (a causal LM run), one token for all shards per step.

        aggregation: "mean_proba" averages the shards' next-token probabilities, "mean_logprob" their
        log-probabilities. temperature 0 decodes greedily; above 0 samples (reproducibly with `seed`). The
        outputs of one prompt are bit-reproducible for the same batch of prompts (CPU kernels block rows).
        """
        return list(self.complete(prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                  aggregation=aggregation, seed=seed).texts)

    def complete(self, prompts: Sequence[str], *, max_new_tokens: int = 32, temperature: float = 0.0,
                 aggregation: str = "mean_proba", seed: int | None = None) -> "Generation":
        """`generate`, with the served-set version used (read when the call starts, as `classify` does)."""
        from .inference import generate

        self._require_task("generate", "generate")
        prompts = _check_texts(prompts, name="prompts")
        _check_generation(max_new_tokens, temperature, aggregation)
        version, texts = self._with_served(
            lambda components: generate(self.trainer.model, components, prompts, load=self.trainer.load,
                                        max_new_tokens=max_new_tokens, temperature=temperature,
                                        aggregation=aggregation, seed=seed),
            empty=[] if not prompts else None)
        return Generation(tuple(texts), version)

    def perplexity(self, data: Dataset, *, batch_size: int = 16) -> float:
        """Perplexity of the served ensemble on held-out prompt/completion records (completion tokens only)."""
        from .inference import perplexity

        self._require_task("generate", "perplexity")
        if not isinstance(data, Dataset) or data.kind != "prompt":
            raise DataError("`perplexity` takes a Dataset of {id, prompt, completion} records")
        records = [r.model_input for r in data]
        return self._with_served(lambda components: perplexity(self.trainer.model, components, records,
                                                               load=self.trainer.load, batch_size=batch_size))[1]

    def _with_served(self, compute, *, empty=None):
        """(served version, compute(components)) on the served set read now, in the run's numeric environment.

        A deletion may switch the served set and retire a stage of the old one mid-call: then the answer
        comes from the new served set. With no switch, a missing served stage is a real fault: it surfaces.
        """
        from .environment import pinned
        from .training import ArtifactRetired

        version, components = self.registry.served()
        if version == 0:
            raise NotTrainedError(f"the run at {self.run_dir} is not trained yet: call train() or `s3t train`")
        if not components:
            raise NeedsRestoreError("deletions took every shard out of the ensemble: the model needs restoring "
                                    "(call restore() or `s3t restore`)")
        if empty is not None:
            return version, empty
        try:
            with pinned(self.trainer.environment):
                return version, compute(components)
        except ArtifactRetired:
            if self.registry.served()[0] == version:
                raise
            return self._with_served(compute)

    @property
    def task(self) -> str:
        """What the run's model does: "classify" (labels) or "generate" (completions)."""
        return "classify" if self.labels else "generate"

    def _require_task(self, task: str, method: str) -> None:
        if self.task != task:
            other = {"classify": "predict / predict_proba / classify", "generate": "generate / perplexity"}
            raise DataError(f"`{method}` needs a run that {'classifies' if task == 'classify' else 'generates text'}; "
                            f"this one {'generates text' if task == 'classify' else 'classifies'}: use "
                            f"{other[self.task]}")

    def predict(self, inputs: Sequence, *, batch_size: int = 64) -> list[str]:
        """Predicted label names (of texts, or of images for an image run)."""
        return [self.labels[k] for k in self.predict_proba(inputs, batch_size=batch_size).argmax(axis=1)]

    def score(self, data: Dataset) -> float:
        """Accuracy on labelled data (texts or images, as the run classifies)."""
        check_labels(data.labels, self.labels)
        predicted = self.predict(list(data.inputs))
        return float(np.mean([p == r.label for p, r in zip(predicted, data)]))

    # -- unlearning ---------------------------------------------------------------------------------
    def locate(self, ids: Sequence[str]) -> dict[str, tuple[int, int]]:
        """Where each record sits: {id: (shard, slice)}; unknown ids are left out."""
        if isinstance(ids, str):
            raise DataError("`ids` must be a list of record ids, not a single string; wrap it: [id]")
        return {i: (shard, sl) for i, (shard, sl, _deleted) in self.registry.locate(list(ids)).items()}

    def delete(self, *, ids: Sequence[str] = (), subjects: Sequence[str] = (), reference: str | None = None,
               idempotency_key: str | None = None, requested_by: str | None = None) -> Receipt:
        """Forget records and/or all records of data subjects, at once and exactly (no training).

        A repeated `idempotency_key` returns the first request's receipt (a different request under
        the same key raises ConflictError); `requested_by` is recorded in the receipt. Calls from several
        threads at once are applied together in one transaction (`deletions`), each with its own receipt.
        """
        _check_request(ids, subjects, postgres=self.registry.postgres)
        # Stored as text in the ledger and the idempotency table: PostgreSQL refuses NUL there.
        for name, value in (("reference", reference), ("idempotency_key", idempotency_key),
                            ("requested_by", requested_by)):
            if value is not None and (not isinstance(value, str) or "\x00" in value):
                raise DataError(f"`{name}` must be a string without NUL characters; got {value!r:.80}")
        ids, subjects = list(ids), list(subjects)
        return self.deletions.submit(lambda batch: batch.delete(
            ids=ids, subjects=subjects, reference=reference, idempotency_key=idempotency_key,
            requested_by=requested_by), ids=ids, keys=[idempotency_key] if idempotency_key else []).result()

    @property
    def deletions(self) -> "DeletionQueue":
        """The run's deletion queue: concurrent requests are applied in one transaction (group commit)."""
        with self._deletions_lock:
            if self._deletions is None:
                from .batch import DeletionQueue
                from .cache import erasing

                self._deletions = DeletionQueue(self.registry, self._ledger_key(), signing_key=self._signing_key,
                                                erase_derived=lambda erased: erasing(self.run_dir, erased),
                                                after_commit=lambda receipts: self._shred_retired())
            return self._deletions

    def add(self, data: Dataset, *, replace_deleted: bool = False, requested_by: str | None = None) -> Addition:
        """Add records to the run without training: the served model stays as it is (exact for the data it
        saw) until `restore()` retrains the orders whose trained prefix gained records (`status()` counts
        them, and the records the served model has not seen yet).

        An id already in the run is refused (ConflictError), and so is the id of a deleted record unless
        `replace_deleted=True` says the record is a new one stored under the old id. Re-adding waits for
        the training lock (RunBusyError if a restore keeps it): no training may be reading the old record.

            system.add(s3t.Dataset.from_jsonl("new.jsonl"))
            system.restore()        # now bit-identical to a fresh training on the union
        """
        from .ingest import add

        if not isinstance(data, Dataset):
            raise DataError(f"`data` must be an s3t.Dataset; got {type(data).__name__}. "
                            "Build one with Dataset.from_records / from_jsonl / from_csv")
        lock = self._lock(TRAIN_LOCK)
        if replace_deleted and not lock.acquire(wait=TRAIN_LOCK_WAIT_S):
            raise RunBusyError(f"another process is training the run at {self.run_dir}; re-adding deleted ids waits "
                               "for it (a training in flight may hold the old record): retry when it is done")
        try:
            return add(self.registry, self._ledger_key(), self.plan, data, kind=self.kind,
                       replace_deleted=replace_deleted, signing_key=self._signing_key, requested_by=requested_by)
        finally:
            lock.release()

    def unseen(self) -> list[str]:
        """Live record ids that no served artifact has seen: added since training, or in slices beyond a
        shard's served depth (`restore()` trains them in), sorted."""
        _version, components = self.registry.served()
        return self.registry.unseen([c["artifacts"][-1] for c in components if c["artifacts"]])

    def preview_delete(self, *, ids: Sequence[str] = (), subjects: Sequence[str] = (), batch=None) -> dict:
        """What `delete` would do to each shard's served depth and capacity, without deleting anything
        (read in `batch`'s transaction if given: a group commit's, with the requests before it applied)."""
        _check_request(ids, subjects, postgres=self.registry.postgres)
        return preview(self.registry, self._ledger_key(), ids=ids, subjects=subjects, batch=batch)

    def receipt(self, request_id: str) -> Receipt:
        """The stored receipt of one deletion request."""
        data = self.registry.receipt(request_id)
        if data is None:
            raise NotFoundError(f"no deletion request {request_id!r} in the ledger of {self.run_dir}; "
                                "list receipts with S3T.receipts()")
        return Receipt.from_dict(data)

    def idempotent_receipt(self, idempotency_key: str) -> Receipt | None:
        """The receipt stored under an idempotency key, or None if the key is new."""
        with self.registry.engine.connect() as conn:
            seen = self.registry.idempotent(conn, idempotency_key)
            return Receipt.from_dict(self.registry.receipt_in(conn, seen["request_id"])) if seen else None

    def _ledger_key(self) -> bytes:
        """The HMAC key of subject digests and request fingerprints (its own 0600 file, not the database)."""
        return self._ledger

    def receipts(self) -> list[Receipt]:
        """Every deletion receipt in the ledger, oldest first."""
        return [Receipt.from_dict(r) for r in self.registry.receipts()]

    def public_key(self) -> str:
        """The PEM public key that verifies this run's ledger entries and exported receipts."""
        from .ledger import public_key_pem

        return public_key_pem(self._signer().public_key())

    def export_receipt(self, request_id: str) -> dict:
        """A signed, self-contained copy of one ledger entry that anyone can check with the run's public key
        and `s3t.verify_receipt` (or `s3t verify-receipt`), without access to the run."""
        from .ledger import export

        rows = self.registry.ledger_entries(request_id=request_id)
        if not rows:
            raise NotFoundError(f"no request {request_id!r} in the ledger of {self.run_dir}; list receipts with "
                                "S3T.receipts()")
        return export(rows[0], self._signer().public_key())

    def _signer(self) -> "Ed25519PrivateKey":
        if self._signing_key is None:
            raise RunError(f"the run at {self.run_dir} has no signing key ({SIGNING_KEY_FILE}) yet: open it once "
                           "without recover=False (any s3t command but `s3t audit` does) to create it")
        return self._signing_key

    def audit(self, *, replay: int | str = 0, seed: int | None = None, public_key: str | None = None) -> "AuditReport":
        """Check the run against its own records: artifact files and hashes, orphans, stored lineage against
        the ledger's deletions, the ledger's chain and signatures, erasure of deleted records, and
        `replay` served stages (an int, or "all") retrained from their stored lineage bit for bit.

        `public_key` (PEM) pins the key the ledger must be signed with (default: the run's own); `seed`
        makes the replay's sample reproducible. See `s3t.audit`.
        """
        from .audit import audit

        return audit(self, replay=replay, seed=seed, public_key=public_key)

    def served(self) -> tuple[int, list[dict]]:
        """(version, components): for each live shard the order, depth and artifact lineages served."""
        return self.registry.served()

    def status(self) -> Status:
        """Per shard: live orders, served depth, how many deletions would take it out, and how many live
        records its served model has not seen; the orders `restore()` would retrain."""
        orders = self.registry.orders()
        version, components = self.registry.served()
        served = {c["shard"]: c for c in components}
        live, deleted = self.registry.count_records()
        counts = self.registry.live_counts()
        examples = self.registry.artifact_examples([a for o in orders for a in o["artifacts"][:o["depth"]]]
                                                   + [c["artifacts"][-1] for c in components if c["artifacts"]])
        shards = []
        for s in range(self.plan.num_shards):
            mine = [o for o in orders if o["shard"] == s]
            depths = [o["depth"] for o in mine]
            seen = examples.get(served[s]["artifacts"][-1], 0) if s in served and served[s]["artifacts"] else 0
            shards.append(ShardStatus(
                shard=s, live_orders=sum(d > 0 for d in depths), orders=len(mine),
                served_order=served[s]["position"] if s in served else None,
                served_depth=served[s]["depth"] if s in served else 0,
                deletions_to_drop=deletions_to_drop([o["slices"] for o in mine], depths),
                empty_slices=tuple(sl for sl in range(self.plan.num_slices) if not counts.get((s, sl))),
                unseen_records=sum(n for (m, _sl), n in counts.items() if m == s) - seen))
        return Status(trained=version > 0, live_records=live, deleted_records=deleted, served_version=version,
                      truncated_orders=sum(truncated(o, counts) for o in orders), shards=tuple(shards),
                      stale_orders=sum(current_depth(o, counts, examples) < o["depth"] for o in orders),
                      unseen_records=sum(sh.unseen_records for sh in shards))

    def remaining_capacity(self, *, trials: int | None = None, seed: int = 0) -> dict:
        """Expected further deletions (one random live record each) until the next shard drops out and until
        none is left, simulated from the current orders and cell sizes (`capacity.remaining`). By default 200
        trials, fewer on large runs: a trial sorts one random key per live record, and one call sorts at
        most 20 million keys (a few seconds), never fewer than 20 trials."""
        from .capacity import remaining

        by_shard: list[list[tuple[tuple[int, ...], int]]] = [[] for _ in range(self.plan.num_shards)]
        for o in self.registry.orders():
            by_shard[o["shard"]].append((tuple(o["slices"]), o["depth"]))
        counts = self.registry.live_counts()
        if trials is None:
            trials = max(20, min(200, 20_000_000 // max(1, sum(counts.values()))))
        return remaining(self.plan.num_slices, by_shard, counts, trials=trials, seed=seed)


def _signing_key(path: Path, *, create: bool) -> "tuple[Ed25519PrivateKey | None, bool]":
    """(the run's signing key, whether this call created it); a run from before signed ledgers gets one
    now (`create`), or has None."""
    from .ledger import create_signing_key, load_signing_key

    if not path.is_file():
        if not create:
            return None, False
        try:
            return create_signing_key(path), True
        except FileExistsError:   # another process opening the run made it first (and chains the ledger)
            pass
    return load_signing_key(path), False


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _resolve(plan: Plan, data: Dataset, family) -> Plan:
    """The plan as the run stores it: label space and thread count fixed, so that a fresh run created with
    the stored plan trains the same task in the same way (whatever data it gets and wherever it runs)."""
    import torch

    if data.kind != family.kind:
        wanted = {"text": "labelled texts {id, text, label}", "prompt": "prompts and completions {id, prompt, "
                  "completion}", "image": "labelled images {id, image, label}"}
        raise DataError(f"the base model ({family.__name__}) trains on {wanted.get(family.kind, family.kind)}, "
                        f"but the data holds {wanted.get(data.kind, data.kind)}")
    if family.task != "classify":
        if plan.labels is not None:
            raise PlanError(f"`labels` applies to classification; the base model ({family.__name__}) generates "
                            "text. Leave `labels` unset")
    elif plan.labels is None:
        plan = plan.replace(labels=data.labels)
    elif unknown := sorted(set(data.labels) - set(plan.labels)):
        raise DataError(f"the data has label(s) {', '.join(map(repr, unknown))} that the plan's `labels` "
                        f"{list(plan.labels)!r} does not declare; add them to `labels` or drop those records")
    if plan.num_threads is None:
        plan = plan.replace(num_threads=torch.get_num_threads())
    return plan


def _check_request(ids: Sequence[str], subjects: Sequence[str], *, postgres: bool) -> None:
    for name, values in (("ids", ids), ("subjects", subjects)):
        if isinstance(values, str) or not all(isinstance(v, str) and v for v in values):
            raise DataError(f"`{name}` must be a list of non-empty strings; got {values!r}")
    # Ids are looked up as text: on PostgreSQL, which stores no NUL, no record's id holds one (a SQLite run's
    # may, and stays deletable). Subjects are only ever compared as keyed digests.
    if postgres and any("\x00" in i for i in ids):
        raise DataError("`ids` hold a NUL character (\\x00), which no record id of a PostgreSQL-backed run can hold")
    if not ids and not subjects:
        raise DataError("a deletion needs at least one id or subject")


def _check_texts(texts: Sequence[str], *, name: str = "texts") -> list[str]:
    if isinstance(texts, str):
        raise DataError(f"`{name}` must be a list of strings, not a single string; wrap it: [{name[:-1]}]")
    texts = list(texts)
    for k, t in enumerate(texts):
        if not isinstance(t, str):
            raise DataError(f"{name[:-1]} {k} must be a string; got {type(t).__name__}: {t!r:.60}")
    return texts


def _check_images(images: Sequence) -> list[bytes]:
    """Images as checked PNG/JPEG bytes (paths are read; arrays and PIL images are encoded to PNG)."""
    from .images import is_one_image, to_bytes

    if is_one_image(images):
        raise DataError("`images` must be a list of images, not a single image; wrap it: [image]")
    return [to_bytes(image, where=f"image {k}") for k, image in enumerate(images)]


def _check_generation(max_new_tokens: int, temperature: float, aggregation: str) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= 4096:
        raise DataError(f"`max_new_tokens` must be an int in [1, 4096]; got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 100:
        raise DataError(f"`temperature` must be a number in [0, 100] (0: greedy); got {temperature!r}")
    if aggregation not in ("mean_proba", "mean_logprob"):
        raise DataError(f"`aggregation` must be 'mean_proba' or 'mean_logprob'; got {aggregation!r}")


class _progress:
    """A rich progress bar for `total` stages, or nothing when disabled."""

    def __init__(self, enabled: bool, description: str, total: int) -> None:
        self.enabled, self.description, self.total = enabled and total > 0, description, total

    def __enter__(self) -> Callable[[str], None]:
        if not self.enabled:
            return lambda done: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("stages"), TimeElapsedColumn())
        self.bar.start()
        task = self.bar.add_task(self.description, total=self.total)
        return lambda done: self.bar.update(task, advance=1, description=f"{self.description}: {done}")

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.bar.stop()
