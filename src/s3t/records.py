"""Records and datasets: labelled texts, labelled images or prompt/completion pairs with stable ids, an
optional subject (the data owner) and an optional deletion risk (used by prior-aware placement).

Ids are what lineage, partitioning and deletion refer to, so a `Dataset` refuses duplicate or blank ids
up front and every error names the record or file line at fault.

    >>> data = Dataset.from_records([
    ...     {"id": "a", "text": "rates rise", "label": "business"},
    ...     {"id": "b", "text": "cup final", "label": "sport", "subject": "user-1"},
    ... ])
    >>> data
    Dataset(2 records, 2 labels)
    >>> data.without(["a"]).ids
    ('b',)
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Mapping, Sequence

from s3t.errors import DataError

__all__ = ["Record", "PromptRecord", "ImageRecord", "Dataset", "check_labels", "payload", "from_payload", "KINDS"]

_OPTIONAL = ("subject", "risk")
# csv refuses fields over 128 KiB by default, less than a long document; raised only while from_csv reads
# (the limit is process-wide state, so it is restored afterwards rather than changed for the caller).
_CSV_FIELD_LIMIT = 16 << 20


@dataclasses.dataclass(frozen=True)
class Record:
    """One labelled text; `subject` names the data owner, so all of one person's records can be deleted.

    `risk` is an optional deletion prior in [0, 1] (e.g. the estimated probability that the record, or its
    subject, will be asked to be forgotten); `Plan(placement="prior_aware")` puts risky records in the
    slices that every order trains last. All records of one subject must carry the same risk.
    """

    id: str
    text: str
    label: str
    subject: str | None = None
    risk: float | None = None

    KIND: ClassVar[str] = "text"
    CONTENT: ClassVar[tuple[str, str]] = ("text", "label")   # (model input, target) fields
    BINARY_INPUT: ClassVar[bool] = False   # the input is stored as raw bytes, not UTF-8 text

    @property
    def model_input(self) -> str:
        """What the model is given for this record (`LayeredModel.prepare` takes a list of these)."""
        return self.text


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """A prompt and the completion a causal LM should learn to write after it (the loss is on the completion)."""

    id: str
    prompt: str
    completion: str
    subject: str | None = None
    risk: float | None = None

    KIND: ClassVar[str] = "prompt"
    CONTENT: ClassVar[tuple[str, str]] = ("prompt", "completion")

    @property
    def model_input(self) -> tuple[str, str]:
        return self.prompt, self.completion

    label = None   # nothing to classify


@dataclasses.dataclass(frozen=True, repr=False)
class ImageRecord:
    """One labelled image. `image` holds the bytes of a PNG or JPEG file: a path is read (its file's bytes are
    kept as they are), an array or PIL image is encoded losslessly to PNG (see `s3t.images`)."""

    id: str
    image: bytes
    label: str
    subject: str | None = None
    risk: float | None = None

    KIND: ClassVar[str] = "image"
    CONTENT: ClassVar[tuple[str, str]] = ("image", "label")
    BINARY_INPUT: ClassVar[bool] = True

    @property
    def model_input(self) -> bytes:
        return self.image

    def __repr__(self) -> str:
        extra = "".join(f", {k}={getattr(self, k)!r}" for k in _OPTIONAL if getattr(self, k) is not None)
        return f"ImageRecord(id={self.id!r}, image=<{len(self.image):,} bytes>, label={self.label!r}{extra})"


AnyRecord = Record | PromptRecord | ImageRecord
KINDS: dict[str, type] = {cls.KIND: cls for cls in (Record, PromptRecord, ImageRecord)}


def payload(record: AnyRecord) -> tuple[bytes, bytes]:
    """A record's content as (input, target) bytes, as the registry stores them (sealed)."""
    first, second = record.CONTENT
    return _encode(getattr(record, first)), _encode(getattr(record, second))


def from_payload(kind: str, record_id: str, content: tuple[bytes, bytes]) -> AnyRecord:
    """The record of `kind` stored as `payload` gave it (without subject and risk, which are not stored)."""
    cls = KINDS[kind]
    first, second = cls.CONTENT
    return cls(record_id, **{first: content[0] if getattr(cls, "BINARY_INPUT", False) else content[0].decode(),
                             second: content[1].decode()})


def _encode(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


class Dataset:
    """An immutable, validated sequence of records with unique ids.

    Build one from `Record`s, or with `from_records`, `from_jsonl`, `from_csv` or `from_image_folder`.
    """

    __slots__ = ("_records", "_positions")

    def __init__(self, records: Sequence[Record]) -> None:
        self._records = _validate((f"records[{i}]", r) for i, r in enumerate(records))
        self._positions = {r.id: i for i, r in enumerate(self._records)}

    @classmethod
    def _trusted(cls, records: tuple[Record, ...]) -> Dataset:
        # For subsets of an already validated dataset: no need to check again.
        data = cls.__new__(cls)
        data._records = records
        data._positions = {r.id: i for i, r in enumerate(records)}
        return data

    @classmethod
    def from_records(cls, items: Iterable[Mapping[str, Any] | Record]) -> Dataset:
        """Build a dataset from dicts with keys id, text, label (or id, image, label, or id, prompt, completion) and
        optional subject and risk, or from records. An `image` is a path (relative to the working folder), PNG or
        JPEG bytes, a PIL image or a numpy array."""
        return cls._from_rows((f"records[{i}]", item) for i, item in enumerate(items))

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike[str]) -> Dataset:
        """Read one JSON object per line (keys id, text, label, optional subject, risk; or id, image, label with
        `image` a file path relative to the JSONL file's folder); blank lines are skipped."""
        name = os.fspath(path)

        def rows() -> Iterator[tuple[str, object]]:
            with _open(name) as f:
                for n, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"Line {n} of {name} is not valid JSON: {e.msg} "
                                        f"(column {e.colno}). Write one JSON object per line.") from None
                    yield f"line {n} of {name}", row

        return cls._from_rows(rows(), name, base=Path(name).parent)

    @classmethod
    def from_csv(cls, path: str | os.PathLike[str]) -> Dataset:
        """Read a CSV file whose header names id, text, label (or id, image, label: image paths relative to the
        CSV file's folder) and optionally subject and risk (blank = none)."""
        name = os.fspath(path)

        def rows() -> Iterator[tuple[str, object]]:
            with _open(name, newline="") as f:
                reader = csv.DictReader(f)
                start = 1
                try:
                    columns = reader.fieldnames or []
                    kind = _kind_of(dict.fromkeys(columns))
                    required = ("id", *kind.CONTENT)
                    missing = [c for c in required if c not in columns]
                    extra = [c for c in columns if c not in (*required, *_OPTIONAL)]
                    if missing or extra:
                        problem = (f"is missing required column(s) {', '.join(missing)}" if missing
                                   else f"has unknown column(s) {', '.join(map(repr, extra))}")
                        raise DataError(f"{name} {problem}; found columns: "
                                        f"{', '.join(map(repr, columns)) or 'none'}. The header must name id, "
                                        "text, label (or id, image, label, or id, prompt, completion) and optionally "
                                        "subject and risk.")
                    start = reader.line_num + 1
                    for row in reader:
                        where = f"line {start} of {name}"
                        start = reader.line_num + 1  # a quoted field may span several lines
                        if None in row:
                            raise DataError(f"Too many fields at {where}: the header has {len(columns)}. "
                                            "Quote texts that contain commas.")
                        for optional in ("subject", "risk"):
                            if row.get(optional) == "":
                                row[optional] = None
                        yield where, {k: v for k, v in row.items() if v is not None}
                except csv.Error as e:
                    # `start` is where the failing record begins: an unclosed quote there swallows what follows.
                    raise DataError(f"Cannot read the record at line {start} of {name} as CSV: {e}. Close any "
                                    f"unbalanced quote there; fields may hold at most {_CSV_FIELD_LIMIT >> 20} MiB."
                                    ) from None

        old_limit = csv.field_size_limit()
        csv.field_size_limit(max(old_limit, _CSV_FIELD_LIMIT))
        try:
            return cls._from_rows(rows(), name, base=Path(name).parent)  # reads the whole file before returning
        finally:
            csv.field_size_limit(old_limit)

    @classmethod
    def from_image_folder(cls, path: str | os.PathLike[str]) -> Dataset:
        """Read labelled images laid out as `path/<label>/<file>` (PNG or JPEG; files in nested folders count for
        their top folder's label). A record's id is its file's path relative to `path` (`cat/001.png`)."""
        from .images import SUFFIXES

        root = Path(path)
        if not root.is_dir():
            raise DataError(f"No such image folder: {os.fspath(path)!r}. Give a folder with one subfolder per label.")
        classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise DataError(f"{os.fspath(path)!r} has no label subfolders; lay images out as "
                            f"{os.fspath(path)}/<label>/<file>.png")

        def rows() -> Iterator[tuple[str, object]]:
            for folder in classes:
                files = sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES
                               and not any(part.startswith(".") for part in f.relative_to(root).parts))
                if not files:
                    raise DataError(f"The label folder {os.fspath(folder)!r} holds no {'/'.join(SUFFIXES)} files; "
                                    "remove it or add images")
                for f in files:
                    rel = f.relative_to(root).as_posix()
                    yield rel, {"id": rel, "image": f, "label": folder.name}

        return cls._from_rows(rows(), os.fspath(path))

    @classmethod
    def _from_rows(cls, rows: Iterable[tuple[str, object]], name: str | None = None, *,
                   base: Path | None = None) -> Dataset:
        data = cls.__new__(cls)
        data._records = _validate(rows, source=name, base=base)
        data._positions = {r.id: i for i, r in enumerate(data._records)}
        return data

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self._records)

    def __getitem__(self, index: int) -> Record:
        if not isinstance(index, int):
            raise TypeError(f"Dataset indices must be ints; got {type(index).__name__}. "
                            "Use `subset(ids)` to select records by id.")
        return self._records[index]

    def __contains__(self, id: object) -> bool:
        return id in self._positions

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Dataset):
            return NotImplemented
        return self._records == other._records

    def __hash__(self) -> int:
        return hash(self._records)

    def __repr__(self) -> str:
        n, k = len(self._records), len(self.labels)
        what = f"{k} label{'s' * (k != 1)}" if self.kind != "prompt" else f"{self.kind} records"
        return f"Dataset({n} record{'s' * (n != 1)}, {what})"

    @property
    def kind(self) -> str:
        """What the records hold: "text" (labelled texts), "image" (labelled images) or "prompt" (prompt/completion
        pairs)."""
        return self._records[0].KIND

    @property
    def ids(self) -> tuple[str, ...]:
        """Record ids in dataset order."""
        return tuple(r.id for r in self._records)

    @property
    def texts(self) -> tuple[str, ...]:
        """Texts in dataset order."""
        return tuple(r.text for r in self._records)

    @property
    def inputs(self) -> tuple:
        """Model inputs in dataset order: texts, image bytes, or (prompt, completion) pairs."""
        return tuple(r.model_input for r in self._records)

    @property
    def labels(self) -> tuple[str, ...]:
        """The distinct labels, sorted (none for prompt/completion records)."""
        return tuple(sorted({r.label for r in self._records if r.label is not None}))

    def get(self, id: str) -> Record:
        """The record with this id; `DataError` if there is none (use `id in dataset` to test)."""
        try:
            return self._records[self._positions[id]]
        except KeyError:
            raise DataError(f"No record with id {id!r} in this dataset ({len(self)} records). "
                            "`Dataset.ids` lists the valid ids.") from None

    def subset(self, ids: Iterable[str]) -> Dataset:
        """The records with these ids, in dataset order; every id must exist."""
        wanted = self._known(ids, "subset")
        kept = tuple(r for r in self._records if r.id in wanted)
        if not kept:
            raise DataError("`subset` was given no ids; a dataset needs at least one record.")
        return Dataset._trusted(kept)

    def without(self, ids: Iterable[str]) -> Dataset:
        """The records whose ids are not in `ids`, in dataset order; every id must exist."""
        dropped = self._known(ids, "without")
        kept = tuple(r for r in self._records if r.id not in dropped)
        if not kept:
            raise DataError(f"`without` removed all {len(self)} records; a dataset needs at least one.")
        return Dataset._trusted(kept)

    def split(self, *, test_fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
        """Split into (train, test), with round(test_fraction * len) records in test.

        Records are ranked by a hash of (seed, id), so the split does not depend on row order and
        survives reordering; each part keeps dataset order.
        """
        if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) \
                or not 0 < test_fraction < 1:
            raise DataError(f"`test_fraction` must be a float in (0, 1); got {test_fraction!r}. "
                            "Use a value such as 0.2.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise DataError(f"`seed` must be an int; got {seed!r}.")
        n_test = math.floor(test_fraction * len(self) + 0.5)
        if not 0 < n_test < len(self):
            raise DataError(f"`test_fraction` = {test_fraction} of {len(self)} records gives "
                            f"{n_test} test and {len(self) - n_test} training records; both need at "
                            "least one. Change `test_fraction` or add records.")
        ranked = sorted(self._records, key=lambda r: (_rank(seed, r.id), r.id))
        test_ids = {r.id for r in ranked[:n_test]}
        return (Dataset._trusted(tuple(r for r in self._records if r.id not in test_ids)),
                Dataset._trusted(tuple(r for r in self._records if r.id in test_ids)))

    def _known(self, ids: Iterable[str], method: str) -> set[str]:
        if isinstance(ids, str):
            # A lone string would be iterated character by character.
            raise DataError(f"`{method}` takes a list of ids; got the string {ids!r}. Use [{ids!r}].")
        wanted = {str(i) for i in ids}
        unknown = sorted(wanted - self._positions.keys())
        if unknown:
            shown = ", ".join(map(repr, unknown[:5])) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            raise DataError(f"`{method}` got {len(unknown)} id(s) not in this dataset: {shown}. "
                            "`Dataset.ids` lists the valid ids.")
        return wanted


def check_labels(labels: Iterable[str | int], known: Iterable[str]) -> None:
    """Raise `DataError` if any label is not in `known` (the labels a model was trained on)."""
    known_set = {str(k) for k in known}
    unknown = sorted({str(label) for label in labels} - known_set)
    if unknown:
        raise DataError(f"Unknown label(s) {', '.join(map(repr, unknown))}: the model was trained on "
                        f"{', '.join(map(repr, sorted(known_set)))}. Drop those records or retrain with them.")


def _rank(seed: int, id: str) -> bytes:
    # blake2b, not hash(): Python salts str hashes per process.
    return hashlib.blake2b(f"{seed}\0{id}".encode(), digest_size=8).digest()


def _open(name: str, *, newline: str | None = None) -> Any:
    try:
        return open(name, encoding="utf-8-sig", newline=newline)  # -sig: tolerate a BOM from Excel
    except FileNotFoundError:
        raise DataError(f"No such data file: {name!r}. Check the path.") from None
    except OSError as e:
        raise DataError(f"Cannot read the data file {name!r}: {e.strerror}.") from None


def _validate(rows: Iterable[tuple[str, object]], *, source: str | None = None,
              base: Path | None = None) -> tuple[Record, ...]:
    """Check and normalise records; `rows` pairs each item with where it came from, for messages."""
    records: list[Record] = []
    seen: dict[str, str] = {}
    subject_risk: dict[str, tuple[float | None, str]] = {}
    try:
        for where, item in rows:
            record = _record(where, item, base)
            if records and record.KIND != records[0].KIND:
                raise DataError(f"The record at {where} holds {_shape(type(record))}, but the first record holds "
                                f"{_shape(type(records[0]))}: a dataset holds one kind of record.")
            if record.id in seen:
                raise DataError(f"Duplicate id {record.id!r} at {seen[record.id]} and {where}. "
                                "Ids must be unique: deletion and lineage refer to records by id.")
            seen[record.id] = where
            if record.subject is not None:
                # A subject's records share one cell, so they must agree on the risk that places it.
                first = subject_risk.setdefault(record.subject, (record.risk, where))
                if first[0] != record.risk:
                    raise DataError(f"Records of subject {record.subject!r} carry different risks: {first[0]!r} "
                                    f"at {first[1]} and {record.risk!r} at {where}. Give all of a subject's "
                                    "records the same risk (for example the highest).")
            records.append(record)
    except UnicodeDecodeError as e:
        raise DataError(f"{source} is not UTF-8 text ({e.reason}). Re-save it as UTF-8.") from None
    if not records:
        where = f"{source} has no records" if source else "The dataset is empty"
        raise DataError(f"{where}; a dataset needs at least one record.")
    return tuple(records)


def _record(where: str, item: object, base: Path | None = None) -> AnyRecord:
    if isinstance(item, tuple(KINDS.values())):
        values: dict[str, Any] = dataclasses.asdict(item)
    elif isinstance(item, Mapping):
        values = dict(item)
    else:
        raise DataError(f"Expected a record or a mapping with keys id, text, label (or id, image, label, or id, prompt, "
                        f"completion) at {where}; got {type(item).__name__}.")
    cls = _kind_of(values)
    if "id" not in values:
        raise DataError(f"Missing field `id` at {where}. Each record needs an id.")
    for name in cls.CONTENT:
        if name not in values:
            raise DataError(f"Missing field `{name}` at {where}. Each record needs {_shape(cls)}.")
    extra = sorted(str(k) for k in values if k not in ("id", *cls.CONTENT, *_OPTIONAL))
    if extra:
        raise DataError(f"Unknown field(s) {', '.join(f'`{k}`' for k in extra)} at {where}. "
                        f"A record has {_shape(cls)}.")
    first, second = cls.CONTENT
    if cls is ImageRecord:
        from .images import to_bytes

        content = {first: to_bytes(values[first], where=where, base=base)}
    else:
        content = {first: _text(where, first, values[first], blank_ok=cls is PromptRecord)}
    # A label is a name (a key, like an id); a completion is free text and must not be blank.
    content[second] = (_key(where, second, values[second]) if cls is not PromptRecord
                       else _text(where, second, values[second], blank_ok=False))
    subject = values.get("subject")
    return cls(id=_key(where, "id", values["id"]), **content,
               subject=None if subject is None else _key(where, "subject", subject),
               risk=_risk(where, values.get("risk")))


def _kind_of(values: Mapping[str, Any]) -> type:
    """The record class a mapping's fields describe: prompt/completion records, labelled images, else labelled texts."""
    if "prompt" in values or "completion" in values:
        return PromptRecord
    return ImageRecord if "image" in values else Record


def _shape(cls: type) -> str:
    return f"id, {', '.join(cls.CONTENT)} and optionally subject and risk"


def _text(where: str, name: str, value: object, *, blank_ok: bool) -> str:
    if not isinstance(value, str):
        raise DataError(f"`{name}` at {where} must be a string; got {type(value).__name__}.")
    if not blank_ok and not value.strip():
        raise DataError(f"`{name}` at {where} is blank. Drop the record or give it {name}.")
    return value


def _risk(where: str, value: object) -> float | None:
    """A deletion risk as a float in [0, 1], or None; numeric strings (from CSV) are accepted."""
    if value is None:
        return None
    number: float | None = None
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    if number is None or not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise DataError(f"`risk` at {where} must be a number in [0, 1] or absent; got {value!r}. "
                        "Give the estimated probability that the record will be deleted, or leave it out.")
    return number


def _key(where: str, name: str, value: object) -> str:
    """An id, label or subject as a non-blank string; ints are accepted and converted."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(f"`{name}` at {where} must be a string or int; got {value!r} "
                        f"({type(value).__name__}).")
    if not value.strip():
        raise DataError(f"`{name}` at {where} is blank. Give every record a non-blank {name}.")
    return value
