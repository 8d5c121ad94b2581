"""Bearer tokens with roles for the HTTP service, stored hashed in the run's registry.

A token is `s3t_` + 43 random URL-safe characters, shown once at creation; the registry keeps its
SHA-256 (a high-entropy secret needs no slow hash) and a short public id used in listings, logs and
receipts. Roles: `predict` (predictions, the coarse status), `delete` (deletions, one's own receipts and
held requests), `ingest` (adding records), `metrics` (read-only: /metrics and the detailed status,
per-shard capacity included), `admin` (everything, plus restoration, the audit and the review of held
requests).
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from dataclasses import dataclass

from ..errors import AuthError, DataError, ForbiddenError, NotFoundError
from ..registry import Registry

__all__ = ["ROLES", "Token", "TokenCache", "create_token", "list_tokens", "revoke_token", "authenticate", "require"]

ROLES = ("predict", "delete", "ingest", "metrics", "admin")
PREFIX = "s3t_"


@dataclass(frozen=True)
class Token:
    """A service token as stored (never the secret)."""

    id: str
    name: str
    roles: tuple[str, ...]
    rate: float | None          # requests per second; None: the server's default
    daily_quota: int | None     # deletion items per UTC day; None: the server's default
    created_at: str
    revoked_at: str | None

    def allows(self, role: str) -> bool:
        return "admin" in self.roles or role in self.roles

    @classmethod
    def from_row(cls, row: dict) -> "Token":
        return cls(id=row["id"], name=row["name"], roles=tuple(row["roles"].split(",")), rate=row["rate"],
                   daily_quota=row["daily_quota"], created_at=row["created_at"], revoked_at=row["revoked_at"])


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(registry: Registry, *, name: str, roles: tuple[str, ...] | list[str] = ("predict",),
                 rate: float | None = None, daily_quota: int | None = None) -> tuple[Token, str]:
    """Create a token; returns it and its secret (shown once: only a hash is stored).

        token, secret = create_token(system.registry, name="erasure-desk", roles=["delete"])
    """
    roles = tuple(dict.fromkeys(roles))
    bad = [r for r in roles if r not in ROLES]
    if bad or not roles:
        raise DataError(f"token roles must be among {', '.join(ROLES)}; got {list(roles)!r}")
    if not name or len(name) > 200:
        raise DataError(f"a token needs a name of 1 to 200 characters; got {name!r}")
    if rate is not None and not rate > 0:
        raise DataError(f"token `rate` must be a positive number of requests per second; got {rate!r}")
    if daily_quota is not None and daily_quota < 1:
        raise DataError(f"token `daily_quota` must be >= 1; got {daily_quota!r}")
    secret = PREFIX + secrets.token_urlsafe(32)
    token_id = secrets.token_hex(6)
    with registry.transaction() as conn:
        registry.add_token(conn, id=token_id, name=name, roles=",".join(roles), secret_sha256=_digest(secret),
                           rate=rate, daily_quota=daily_quota)
    return next(t for t in list_tokens(registry) if t.id == token_id), secret


def list_tokens(registry: Registry) -> list[Token]:
    """Every token, revoked ones included, oldest first."""
    return [Token.from_row(r) for r in registry.tokens()]


def revoke_token(registry: Registry, token_id: str) -> None:
    """Revoke a token at once: the next request that presents it gets 401."""
    with registry.transaction() as conn:
        if not registry.revoke_token(conn, token_id):
            raise NotFoundError(f"no live token with id {token_id!r}; list them with `s3t token list RUN_DIR`")


class TokenCache:
    """Live tokens by the SHA-256 of their secret, so a hot path can skip the registry lookup.

    Only for callers that re-check revocation where it matters: the deletion path does, in its group
    commit's transaction (`Registry.token_revoked`), so a revoked token is refused on its next request
    whatever this cache holds. Bounded: cleared when it reaches `max_tokens`.
    """

    def __init__(self, max_tokens: int = 10_000) -> None:
        self.max_tokens = max_tokens
        self._tokens: dict[str, Token] = {}
        self._lock = threading.Lock()

    def get(self, authorization: str) -> Token | None:
        secret = _secret(authorization, strict=False)
        return self._tokens.get(_digest(secret)) if secret else None

    def put(self, digest: str, token: Token) -> None:
        with self._lock:
            if len(self._tokens) >= self.max_tokens:
                self._tokens.clear()
            self._tokens[digest] = token

    def forget(self, token_id: str) -> None:
        with self._lock:
            for digest in [d for d, t in self._tokens.items() if t.id == token_id]:
                del self._tokens[digest]


def _secret(authorization: str | None, *, strict: bool = True) -> str | None:
    """The secret of an `Authorization: Bearer s3t_...` header (AuthError if malformed, or None if not strict)."""
    if not authorization:
        if not strict:
            return None
        raise AuthError("this endpoint needs a token: send `Authorization: Bearer s3t_...` "
                        "(create one with `s3t token create RUN_DIR`)")
    scheme, _, secret = authorization.partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret.startswith(PREFIX):
        if not strict:
            return None
        raise AuthError("malformed Authorization header: expected `Bearer s3t_...`")
    return secret


def authenticate(registry: Registry, authorization: str | None, *, cache: TokenCache | None = None) -> Token:
    """The token presented in an `Authorization: Bearer ...` header; AuthError if absent, unknown or revoked.

    With `cache`, a token found there is returned without asking the registry (see `TokenCache`)."""
    digest = _digest(_secret(authorization))
    if cache is not None and (token := cache._tokens.get(digest)) is not None:
        return token
    row = registry.token_by_secret(digest)
    if row is None:
        raise AuthError("unknown token: check it, or create one with `s3t token create RUN_DIR`")
    token = Token.from_row(row)
    if token.revoked_at is not None:
        raise AuthError(f"token {token.id} was revoked at {token.revoked_at}")
    if cache is not None:
        cache.put(digest, token)
    return token


def require(token: Token, *roles: str) -> None:
    """ForbiddenError unless the token has one of `roles` (admin has every role)."""
    if not any(token.allows(role) for role in roles):
        needed = " or ".join(f"`{r}`" for r in roles)
        raise ForbiddenError(f"token {token.id} ({token.name!r}) has roles {list(token.roles)}; this endpoint needs "
                             f"{needed}: create a token with `s3t token create RUN_DIR --role {roles[0]}`")
