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
from dataclasses import dataclass

from ..errors import AuthError, DataError, ForbiddenError, NotFoundError
from ..registry import Registry

__all__ = ["ROLES", "Token", "create_token", "list_tokens", "revoke_token", "authenticate", "require"]

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


def authenticate(registry: Registry, authorization: str | None) -> Token:
    """The token presented in an `Authorization: Bearer ...` header; AuthError if absent, unknown or revoked."""
    if not authorization:
        raise AuthError("this endpoint needs a token: send `Authorization: Bearer s3t_...` "
                        "(create one with `s3t token create RUN_DIR`)")
    scheme, _, secret = authorization.partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret.startswith(PREFIX):
        raise AuthError("malformed Authorization header: expected `Bearer s3t_...`")
    row = registry.token_by_secret(_digest(secret))
    if row is None:
        raise AuthError("unknown token: check it, or create one with `s3t token create RUN_DIR`")
    token = Token.from_row(row)
    if token.revoked_at is not None:
        raise AuthError(f"token {token.id} was revoked at {token.revoked_at}")
    return token


def require(token: Token, *roles: str) -> None:
    """ForbiddenError unless the token has one of `roles` (admin has every role)."""
    if not any(token.allows(role) for role in roles):
        needed = " or ".join(f"`{r}`" for r in roles)
        raise ForbiddenError(f"token {token.id} ({token.name!r}) has roles {list(token.roles)}; this endpoint needs "
                             f"{needed}: create a token with `s3t token create RUN_DIR --role {roles[0]}`")
