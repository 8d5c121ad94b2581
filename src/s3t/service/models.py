"""Request and response schemas of the HTTP API (they are its OpenAPI document).

Hard limits per request: 256 texts of at most 10,000 characters; 64 images, each base64 of at most 16 MiB
(the server's `max_image_bytes` and `max_image_pixels` bound them further once decoded); 16 prompts and 256 new
tokens; 1,000 ids + subjects of at most 512 characters each; 1,000 records to add, of at most 100,000
characters of content each. Bodies over the server's `max_body_bytes` are refused with 413 before parsing.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr, StringConstraints, model_validator

__all__ = ["PredictRequest", "PredictImagesRequest", "PredictResponse", "GenerateRequest", "GenerateResponse",
           "DeletionRequest", "ReceiptOut", "HeldResponse", "FlagOut",
           "FlagSummaryOut", "FlagPage", "StatusResponse", "RestoreResponse", "ReviewDecision", "ErrorOut",
           "HealthResponse", "RecordIn", "AddRecordsRequest", "AdditionOut", "AuditOut", "PreviewOut", "ReceiptList",
           "CapacityOut", "ExportOut", "WhoAmI",
           "MAX_TEXTS", "MAX_TEXT_CHARS", "MAX_IMAGES", "MAX_IMAGE_BASE64_CHARS", "MAX_ITEMS", "MAX_ID_CHARS",
           "MAX_RECORDS", "MAX_RECORD_CHARS"]

MAX_TEXTS = 256
MAX_PROMPTS = 16          # generation runs the model once per new token: fewer prompts per request
MAX_NEW_TOKENS = 256
MAX_TEXT_CHARS = 10_000
MAX_IMAGES = 64
MAX_IMAGE_BASE64_CHARS = 4 * ((16 << 20) // 3 + 1)   # base64 of 16 MiB
MAX_ITEMS = 1_000
MAX_ID_CHARS = 512        # the registry's column width
MAX_REFERENCE_CHARS = 200
MAX_RECORDS = 1_000        # records per POST /v1/records
MAX_RECORD_CHARS = 100_000


def _encodable(value: str) -> str:
    """Refuse strings that are not valid Unicode text (JSON may carry lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the string holds an unpaired surrogate (\\ud800-\\udfff): send valid UTF-8 text") from None
    return value


def _storable(value: str) -> str:
    """`_encodable`, and no NUL: the registry stores it as text, which PostgreSQL refuses to hold NUL in
    (one such id failed its whole group commit, which was then retried request by request)."""
    if "\x00" in _encodable(value):
        raise ValueError("the string holds a NUL character (\\u0000), which no id, reference or note may hold")
    return value


def _base64(value: str) -> bytes:
    """The bytes a standard base64 string encodes (strict: no whitespace, no URL-safe alphabet, padded)."""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64 (standard alphabet, padded, no line breaks): send the image file's "
                         "bytes base64-encoded") from None


Text = Annotated[StrictStr, StringConstraints(max_length=MAX_TEXT_CHARS), AfterValidator(_encodable)]
ImageBase64 = Annotated[StrictStr, StringConstraints(min_length=1, max_length=MAX_IMAGE_BASE64_CHARS),
                        AfterValidator(_base64)]
Item = Annotated[StrictStr, StringConstraints(min_length=1, max_length=MAX_ID_CHARS), AfterValidator(_storable)]
Reference = Annotated[StrictStr, StringConstraints(max_length=MAX_REFERENCE_CHARS), AfterValidator(_storable)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictRequest(_Strict):
    texts: list[Text] = Field(min_length=1, max_length=MAX_TEXTS, description="Texts to classify.")


class PredictImagesRequest(_Strict):
    images: list[ImageBase64] = Field(min_length=1, max_length=MAX_IMAGES,
                                      description="PNG or JPEG files, each base64-encoded (an image run).")


class GenerateRequest(_Strict):
    prompts: list[Text] = Field(min_length=1, max_length=MAX_PROMPTS, description="Prompts to complete.")
    max_new_tokens: int = Field(default=32, ge=1, le=MAX_NEW_TOKENS, description="Tokens to generate at most.")
    temperature: float = Field(default=0.0, ge=0.0, le=100.0, description="0: greedy decoding; above 0: sampling.")
    aggregation: Literal["mean_proba", "mean_logprob"] = Field(
        default="mean_proba", description="Average the shards' next-token probabilities or log-probabilities.")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, description="Seed for sampling.")


class GenerateResponse(BaseModel):
    served_version: int = Field(description="Version of the served set that produced these completions.")
    completions: list[str]


class PredictionOut(BaseModel):
    label: str
    probabilities: dict[str, float]


class PredictResponse(BaseModel):
    served_version: int = Field(description="Version of the served set that produced these predictions.")
    labels: list[str] = Field(description="All label names, in the order of the model's classes.")
    predictions: list[PredictionOut]


class DeletionRequest(_Strict):
    ids: list[Item] = Field(default_factory=list, max_length=MAX_ITEMS, description="Record ids to forget.")
    subjects: list[Item] = Field(default_factory=list, max_length=MAX_ITEMS,
                                 description="Data subjects whose every record is forgotten.")
    reference: Reference | None = Field(default=None, description="Your reference (e.g. a ticket number).")

    @model_validator(mode="after")
    def _size(self) -> "DeletionRequest":
        if not self.ids and not self.subjects:
            raise ValueError("give at least one of `ids` or `subjects`")
        if len(self.ids) + len(self.subjects) > MAX_ITEMS:
            raise ValueError(f"at most {MAX_ITEMS} ids + subjects per request; split the request")
        return self


Content = Annotated[StrictStr, StringConstraints(max_length=MAX_RECORD_CHARS), AfterValidator(_encodable)]


class RecordIn(_Strict):
    """A record of the kind the run trains on: {id, text, label} (classification) or {id, prompt,
    completion} (a causal LM)."""

    id: Item
    text: Content | None = Field(default=None, description="A labelled text's text (with `label`).")
    label: Item | None = None
    prompt: Content | None = Field(default=None, description="A prompt (with `completion`: a causal-LM run).")
    completion: Content | None = None
    subject: Item | None = Field(default=None, description="The data owner: all of a subject's records share a cell.")
    risk: float | None = Field(default=None, ge=0.0, le=1.0, description="Deletion prior (prior-aware placement).")

    @model_validator(mode="after")
    def _one_kind(self) -> "RecordIn":
        text, prompt = (self.text, self.label), (self.prompt, self.completion)
        if not ((all(v is not None for v in text) and all(v is None for v in prompt))
                or (all(v is not None for v in prompt) and all(v is None for v in text))):
            raise ValueError("a record has either `text` and `label`, or `prompt` and `completion`")
        return self


class AddRecordsRequest(_Strict):
    records: list[RecordIn] = Field(min_length=1, max_length=MAX_RECORDS, description="Records to add.")
    replace_deleted: bool = Field(default=False, description="Store records under the ids of deleted records as "
                                                             "new records (refused with 409 otherwise).")


class CellCount(BaseModel):
    shard: int
    slice: int
    records: int


class AdditionOut(BaseModel):
    """What an addition did, as its ledger entry records it; the model is trained on the records later."""

    request_id: str
    created_at: str
    records: int
    ids_sha256: str = Field(description="SHA-256 of the sorted added ids, one per line.")
    replaced: list[tuple[str, int]] = Field(description="(id, generation) of ids of deleted records re-added.")
    cells: list[CellCount]
    requested_by: str | None = None
    stale_orders: int = Field(description="Orders that miss added records: the background worker retrains them.")
    unseen_records: int = Field(description="Live records the served model has not seen.")


class CheckOut(BaseModel):
    name: str
    status: Literal["passed", "failed", "skipped"]
    summary: str
    looked_at: dict[str, Any]
    failures: list[str]


class AuditOut(BaseModel):
    passed: bool
    checked_at: str
    checks: list[CheckOut]
    failures: list[str] = Field(description="One line per failure, prefixed with its check's name.")


class ShardChange(BaseModel):
    shard: int
    depth_before: int
    depth_after: int


class ReceiptOut(BaseModel):
    """Proof of a deletion, as stored in the ledger (subjects appear only as keyed digests)."""

    request_id: str
    created_at: str
    reference: str | None
    deleted: list[str]
    already_deleted: list[str]
    unknown: list[str]
    subjects: list[str]
    unknown_subjects: list[str]
    shards: list[ShardChange]
    served_version: int
    served_artifacts: list[str]
    lineage_check: str
    duration_ms: float
    requested_by: str | None = None
    retired_artifacts: list[str] = []   # stages that saw the deleted records: unregistered, files shredded


class FlagOut(BaseModel):
    id: str
    created_at: str
    token_id: str | None
    action: Literal["alert", "hold"]
    status: Literal["pending", "applied", "rejected"]
    reason: str
    ids: list[str]
    subjects: int
    request_id: str | None
    decided_at: str | None
    decided_by: str | None
    note: str | None


class FlagSummaryOut(BaseModel):
    """A flagged request in a listing: how many ids and subjects it named, never the ids themselves."""

    id: str
    created_at: str
    token_id: str | None
    action: Literal["alert", "hold"]
    status: Literal["pending", "applied", "rejected"]
    reason: str
    id_count: int | None = Field(description="Ids the request named (null: flagged before counts were kept).")
    subject_count: int | None
    request_id: str | None
    decided_at: str | None
    decided_by: str | None
    note: str | None


class FlagPage(BaseModel):
    flags: list[FlagSummaryOut]
    next: str | None = Field(description="Pass as `after` for the next page; null on the last page.")


class HeldResponse(BaseModel):
    status: Literal["held"] = "held"
    flag: FlagOut


class ReviewDecision(_Strict):
    note: Annotated[StrictStr, StringConstraints(max_length=1000), AfterValidator(_storable)] | None = None


class ShardOut(BaseModel):
    shard: int
    live_orders: int
    orders: int
    served_order: int | None
    served_depth: int
    deletions_to_drop: int
    unseen_records: int = 0


class StatusResponse(BaseModel):
    """Everyone with access sees the first six fields; the rest only a `metrics` or admin token."""

    trained: bool
    serving: bool
    served_version: int
    live_shards: int = Field(description="Shards in the ensemble (served depth > 0).")
    shards_total: int
    model_loaded: bool
    live_records: int | None = None
    deleted_records: int | None = None
    truncated_orders: int | None = None
    stale_orders: int | None = Field(None, description="Orders with a trained stage that misses added records.")
    unseen_records: int | None = Field(None, description="Live records the served model has not seen.")
    capacity_left: int | None = Field(None, description="Fewest deletions that take some live shard out of the "
                                                        "ensemble.")
    shards: list[ShardOut] | None = None
    restoration: dict[str, Any] | None = None
    held_requests: int | None = None
    num_slices: int | None = Field(None, description="Layer groups of a full-depth served model.")
    deletion_latency: dict[str, Any] | None = Field(None, description="The last (up to 50) deletions this server "
                                                                      "applied: count, median_ms, max_ms, last_ms.")


class ShardPreview(BaseModel):
    shard: int
    depth_before: int
    depth_after: int
    capacity_before: int
    capacity_after: int


class PreviewOut(BaseModel):
    """What applying a held request would do now, per shard it touches (nothing is deleted)."""

    records: int = Field(description="Live records the request would delete.")
    shards: list[ShardPreview]


class ReceiptList(BaseModel):
    receipts: list[ReceiptOut] = Field(description="Newest first.")


class DeletionStats(BaseModel):
    mean: float | None
    sem: float | None
    median: float | None
    p05: float | None
    p95: float | None
    censored: int


class ShardExpectation(BaseModel):
    shard: int
    expected_to_drop: float = Field(description="Mean random deletions until this shard drops out (0: out now).")


class ShardWorstCase(BaseModel):
    shard: int
    deletions_to_drop: int = Field(description="Fewest deletions that take the shard out (aimed deletions).")


class CapacityOut(BaseModel):
    """The capacity simulator run from the current state: each request deletes one random live record."""

    model: str
    trials: int
    seed: int
    live_records: int
    live_shards: int
    num_slices: int
    next_drop: DeletionStats = Field(description="Deletions until the next live shard drops out.")
    all_out: DeletionStats = Field(description="Deletions until no shard is left (then `restore` is needed).")
    shards: list[ShardExpectation]
    worst_case: list[ShardWorstCase]


class ExportOut(BaseModel):
    """A signed receipt (`s3t.ledger.export`): check it with `s3t verify-receipt FILE --public-key run.pub`."""

    format: str
    entry: dict[str, Any] = Field(description="The ledger entry: format, seq, prev, kind, receipt.")
    entry_hash: str
    signature: str = Field(description="Ed25519 over the canonical entry, hex.")
    key_id: str


class WhoAmI(BaseModel):
    id: str | None = Field(description="The token's public id; null for an anonymous caller.")
    name: str | None
    roles: list[str]


class RestoreResponse(BaseModel):
    restoration: dict[str, Any]


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    served_version: int
    model_loaded: bool


class ErrorOut(BaseModel):
    error: str = Field(description="The error class, e.g. AuthError, DataError, RateLimitError.")
    detail: Any
