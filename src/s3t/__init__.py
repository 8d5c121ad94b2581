"""s3t: exact machine unlearning for fine-tuned transformers (S3T: sequence-aware sharded sliced training).

    import s3t
    plan = s3t.Plan(num_shards=2, num_slices=3, budget=3)
    system = s3t.S3T.create("runs/bbc", plan, s3t.datasets.bbc_news())
    system.train()
    receipt = system.delete(ids=["bbc-tech-001"])
    system.audit(replay=2).passed
    s3t.verify_receipt(system.export_receipt(receipt.request_id), system.public_key())   # anyone, offline

Importing s3t is cheap: torch and transformers load only when a model is trained or used.
"""

from __future__ import annotations

from . import datasets
from .errors import (AuthError, BusyError, ConflictError, DataError, ForbiddenError, IntegrityError,
                     NeedsRestoreError, NotFoundError, NotTrainedError, PlanError, RateLimitError, RunBusyError,
                     RunError, RunExistsError, RunNotFoundError, S3TError)
from .plan import Plan
from .records import Dataset, PromptRecord, Record

__version__ = "0.1.0"

__all__ = [
    "S3T", "Plan", "Dataset", "Record", "PromptRecord", "Receipt", "Prediction", "Generation", "Status", "ShardStatus",
    "DeletionQueue", "LocalExecutor", "RayExecutor", "datasets", "Addition", "AuditReport", "Check", "verify_receipt",
    "S3TError", "PlanError", "DataError", "RunError", "RunExistsError", "RunNotFoundError", "RunBusyError",
    "NotTrainedError",
    "NeedsRestoreError", "IntegrityError", "NotFoundError", "ConflictError", "AuthError", "ForbiddenError",
    "RateLimitError", "BusyError",
    "simulate", "expected_capacity", "Requests", "CapacityResult", "plan_capacity", "Candidate",
    "cost_report", "CostReport", "MethodCost", "Throughput", "calibrate",
]

_LAZY = {"S3T": "system", "Status": "system", "ShardStatus": "system", "Prediction": "system", "Generation": "system",
         "Receipt": "unlearning", "DeletionQueue": "batch", "LocalExecutor": "executors", "RayExecutor": "executors", "Addition": "ingest", "AuditReport": "audit",
         "Check": "audit", "verify_receipt": "ledger",
         # deletion capacity: the simulator and the planner
         "simulate": "capacity", "expected_capacity": "capacity", "Requests": "capacity",
         "CapacityResult": "capacity", "plan_capacity": "planner", "Candidate": "planner",
         # the cost/benefit report over a horizon, and the throughput it needs
         "cost_report": "cost", "CostReport": "cost", "MethodCost": "cost", "Throughput": "cost",
         "calibrate": "calibration"}


def __getattr__(name: str):
    # S3T pulls in torch; load it on first use so `import s3t` and `s3t --help` stay fast.
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 's3t' has no attribute {name!r}")
