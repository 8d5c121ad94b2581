"""The ledger: every deletion (and addition) as one entry of a signed hash chain, and receipts that a data
subject can verify offline, without the run.

`append` adds one entry inside the transaction that makes the change it records, so the ledger and the
data never disagree. Writers are serialised (`Registry.transaction`), so the chain is linear:

    entry      = {"format": 1, "seq": n, "prev": <entry_hash of entry n-1, or GENESIS for n = 1>,
                  "kind": "deletion" | "addition", "receipt": {...}}
    entry_hash = SHA-256 of canonical(entry)       (sorted keys, no spaces, ASCII: one byte string per entry)
    signature  = Ed25519 over canonical(entry), with the run's signing key (`signing.key`, mode 0600)

Editing an entry in place changes its hash and voids its signature; removing or inserting one breaks the
next entry's `prev` and the sequence. Rewriting the chain after an edit needs the private key to sign it
again, and that key lives in the run folder, not in the database: whoever holds only the database (a
PostgreSQL administrator, a replica, a backup) cannot forge entries. `export` writes one entry with its
hash and signature; `verify_export` checks it against the run's public key.

    entry = append(registry, conn, receipt.to_dict(), signing_key=key)   # once per request, in order
    doc = export(registry.ledger_entry(request_id), key.public_key())
    verify_export(doc, load_public_key(pem))                             # anyone, anywhere
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import DataError, IntegrityError
from .files import write_private

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
    from sqlalchemy.engine import Connection

    from .registry import Registry

__all__ = ["GENESIS", "EXPORT_FORMAT", "append", "next_entry", "canonical", "entry_of", "chain_unchained",
           "verify_chain", "export", "verify_export", "verify_receipt", "create_signing_key", "load_signing_key", "public_key_pem",
           "load_public_key", "key_id"]

GENESIS = "0" * 64                 # the `prev` of the first entry
ENTRY_FORMAT = 1
EXPORT_FORMAT = "s3t-receipt/1"


def canonical(entry: dict) -> bytes:
    """The one byte string an entry is hashed and signed as."""
    return json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def entry_of(row: dict) -> dict:
    """The signed entry of a stored ledger row (as `Registry.ledger_entries` returns it)."""
    return {"format": ENTRY_FORMAT, "seq": row["seq"], "prev": row["prev_hash"], "kind": row["kind"],
            "receipt": row["receipt"]}


def append(registry: "Registry", conn: "Connection", receipt: dict, *, kind: str = "deletion",
           signing_key: "Ed25519PrivateKey | None" = None) -> dict:
    """Append one entry to the ledger in the caller's write transaction; returns {seq, prev, entry_hash}.

    Call it once per request, in the order the requests are applied, inside the transaction that applies
    them: the chain's head is read and extended under the write lock, so two writers can never both
    extend the same head. (A group commit builds its entries with `next_entry` and writes them at once.)
    """
    row = next_entry(registry.ledger_head(conn), receipt, kind=kind, signing_key=signing_key)
    registry.add_ledger_entries(conn, [row])
    return {"seq": row["seq"], "prev": row["prev_hash"], "entry_hash": row["entry_hash"]}


def next_entry(head: tuple[int, str] | None, receipt: dict, *, kind: str = "deletion",
               signing_key: "Ed25519PrivateKey | None" = None) -> dict:
    """The ledger row that extends the chain whose last entry is `head` ((seq, entry_hash), None if empty)
    with `receipt`, signed: what `Registry.add_ledger_entries` writes. Its (seq, entry_hash) is the next head."""
    seq, prev = (head[0] + 1, head[1]) if head else (1, GENESIS)
    body = canonical({"format": ENTRY_FORMAT, "seq": seq, "prev": prev, "kind": kind, "receipt": receipt})
    return {"request_id": receipt["request_id"], "created_at": receipt["created_at"],
            "receipt": json.dumps(receipt, sort_keys=True), "seq": seq, "kind": kind, "prev_hash": prev,
            "entry_hash": hashlib.sha256(body).hexdigest(),
            "signature": signing_key.sign(body).hex() if signing_key is not None else None}


def chain_unchained(registry: "Registry", conn: "Connection", *,
                    signing_key: "Ed25519PrivateKey | None" = None) -> int:
    """Give the entries written before the ledger was chained (older runs) their place at the end of the
    chain, oldest first, signed now; returns how many. Call it in a write transaction."""
    head = registry.ledger_head(conn)
    seq, prev = head if head else (0, GENESIS)
    rows = registry.ledger_entries(conn, unchained=True)
    for row in rows:
        row.update(seq=seq + 1, prev_hash=prev)
        body = canonical(entry_of(row))
        seq, prev = seq + 1, hashlib.sha256(body).hexdigest()
        registry.chain_entry(conn, row["request_id"], seq=seq, kind=row["kind"], prev_hash=row["prev_hash"],
                             entry_hash=prev, signature=signing_key.sign(body).hex() if signing_key else None)
    return len(rows)


def verify_chain(rows: Sequence[dict], public_key: "Ed25519PublicKey | None", *,
                 head: tuple[int, str] | None = None) -> list[str]:
    """One line per break in the stored ledger (empty: intact): sequence, links, hashes, signatures.

    `rows` are `Registry.ledger_entries()`; `head` the (seq, entry_hash) the registry recorded with the
    last append, which exposes entries removed from the end. Without `public_key` signatures are not checked.
    """
    from cryptography.exceptions import InvalidSignature

    failures = []
    unchained = [r for r in rows if r["seq"] is None]
    failures += [f"ledger entry {r['request_id']} has no chain position: it was inserted or edited outside s3t"
                 for r in unchained]
    prev_seq, prev_hash = 0, GENESIS
    for r in sorted((r for r in rows if r["seq"] is not None), key=lambda r: r["seq"]):
        name = f"ledger entry #{r['seq']} ({r['request_id']})"
        if r["seq"] != prev_seq + 1:
            failures.append(f"ledger entries #{prev_seq + 1}..#{r['seq'] - 1} are missing: the chain jumps from "
                            f"#{prev_seq} to #{r['seq']}")
        if r["prev_hash"] != prev_hash:
            failures.append(f"{name} does not link to the entry before it (its prev hash is not that entry's "
                            "hash): an entry before it was changed, removed or inserted")
        body = canonical(entry_of(r))
        if hashlib.sha256(body).hexdigest() != r["entry_hash"]:
            failures.append(f"{name} was altered: its content no longer hashes to its recorded hash")
        if (r["receipt"].get("request_id"), r["receipt"].get("created_at")) != (r["request_id"], r["created_at"]):
            failures.append(f"{name}: its request id or time columns disagree with its signed content")
        if public_key is not None:
            if not r["signature"]:
                failures.append(f"{name} is not signed")
            else:
                try:
                    public_key.verify(bytes.fromhex(r["signature"]), body)
                except (InvalidSignature, ValueError):
                    failures.append(f"{name}: its signature does not verify with the run's public key")
        prev_seq, prev_hash = r["seq"], r["entry_hash"]
    if head is not None and head[0] > prev_seq:
        failures.append(f"the ledger ends at entry #{prev_seq} but entry #{head[0]} was appended: "
                        f"{head[0] - prev_seq} entries were removed from its end")
    elif head is not None and head[0] == prev_seq and head[1] != prev_hash:
        failures.append(f"the last ledger entry #{prev_seq} is not the one that was appended as #{head[0]}")
    return failures


# -- exported receipts -------------------------------------------------------------------------------
def export(row: dict, public_key: "Ed25519PublicKey") -> dict:
    """A self-contained, signed copy of one ledger entry, for `verify_export` (by anyone, without the run)."""
    if not row["signature"] or row["seq"] is None:
        raise IntegrityError(f"ledger entry {row['request_id']} is not signed (it was made before this run had "
                             "a signing key), so it cannot be exported for offline verification")
    return {"format": EXPORT_FORMAT, "entry": entry_of(row), "entry_hash": row["entry_hash"],
            "signature": row["signature"], "key_id": key_id(public_key)}


def verify_export(doc: object, public_key: "Ed25519PublicKey") -> dict:
    """The entry of an exported receipt if it is intact and signed by `public_key`; IntegrityError if not
    (DataError if `doc` is not an exported receipt at all)."""
    from cryptography.exceptions import InvalidSignature

    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        raise DataError(f"not an s3t receipt (expected a JSON object with \"format\": {EXPORT_FORMAT!r}); "
                        "export one with `s3t receipt RUN_DIR REQUEST_ID --export receipt.json`")
    entry, signature = doc.get("entry"), doc.get("signature")
    if not isinstance(entry, dict) or not isinstance(signature, str) or not isinstance(entry.get("receipt"), dict):
        raise DataError("the receipt lacks its `entry` or `signature`: it is incomplete")
    try:
        body = canonical(entry)
    except ValueError as exc:
        raise IntegrityError(f"the receipt's entry cannot be serialised ({exc}): it was altered") from None
    if hashlib.sha256(body).hexdigest() != doc.get("entry_hash"):
        raise IntegrityError("the receipt was altered: its entry does not hash to its recorded entry_hash")
    try:
        public_key.verify(bytes.fromhex(signature), body)
    except (InvalidSignature, ValueError):
        given = key_id(public_key)
        if doc.get("key_id") not in (None, given):
            raise IntegrityError(f"the receipt was signed by key {doc.get('key_id')}, not by the public key given "
                                 f"({given}): get the public key of the run that issued it") from None
        raise IntegrityError("the signature does not verify with the public key given: the receipt was altered, "
                             "or another run issued it") from None
    return entry


def verify_receipt(receipt: "str | Path | dict", public_key: "str | Path") -> dict:
    """Check an exported receipt offline: intact, and signed by the run whose public key is given.

    `receipt` is the exported JSON's path (or its parsed object); `public_key` the PEM text or its file's
    path. Returns the verified entry ({seq, prev, kind, receipt}); IntegrityError if it does not verify.

        entry = s3t.verify_receipt("receipt.json", "run.pub")
        entry["receipt"]["deleted"]
    """
    if not isinstance(receipt, dict):
        try:
            receipt = json.loads(Path(receipt).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read the receipt {receipt}: {exc}") from None
        except ValueError as exc:
            raise DataError(f"the receipt {receipt} is not JSON ({exc}); export one with "
                            "`s3t receipt RUN_DIR REQUEST_ID --export receipt.json`") from None
    text = str(public_key)
    if "-----BEGIN" not in text:
        try:
            text = Path(public_key).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read the public key {public_key}: {exc}") from None
    return verify_export(receipt, load_public_key(text))


# -- keys ---------------------------------------------------------------------------------------------
def create_signing_key(path: Path) -> "Ed25519PrivateKey":
    """A new Ed25519 key in its own file (PKCS#8 PEM, mode 0600); FileExistsError if the file exists."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    key = Ed25519PrivateKey.generate()
    write_private(Path(path), key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()), exclusive=True)
    return key


def load_signing_key(path: Path) -> "Ed25519PrivateKey":
    """The run's signing key; ValueError if the file holds something else."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key = load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} does not hold an Ed25519 private key")
    return key


def public_key_pem(public_key: "Ed25519PublicKey") -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return public_key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()


def load_public_key(pem: str | bytes) -> "Ed25519PublicKey":
    """An Ed25519 public key from its PEM text (`s3t receipt RUN_DIR --public-key` prints it)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, Ed25519PublicKey):
        raise DataError("the public key is not an Ed25519 public key in PEM form (-----BEGIN PUBLIC KEY-----); "
                        "get it with `s3t receipt RUN_DIR --public-key`")
    return key


def key_id(public_key: "Ed25519PublicKey") -> str:
    """A short name for a public key: the first 16 hex digits of the SHA-256 of its raw bytes."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return hashlib.sha256(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()[:16]
