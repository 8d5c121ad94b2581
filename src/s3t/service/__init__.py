"""The HTTP service: `s3t serve RUN_DIR` puts predictions, deletions and restoration behind an
authenticated API (FastAPI + uvicorn).

    from s3t.service import ServiceSettings, create_app, serve
    serve("runs/bbc", host="127.0.0.1", port=8000, settings=ServiceSettings(public_predict=True))

Modules, one concept each: `settings` (limits and policies), `auth` (bearer tokens and roles), `guard`
(rate limits, quotas, the capacity guard), `review` (flagged requests: alerts and holds), `worker`
(background restoration in a child process), `metrics` (Prometheus), `lanes` (executors per kind of work,
so predictions cannot starve deletions), `core` (the service's operations, independent of HTTP), `models`
(request/response schemas), `app` (routes). Importing this package is cheap; FastAPI loads with
`create_app`.
"""

from __future__ import annotations

__all__ = ["ServiceSettings", "GuardPolicy", "Service", "create_app", "serve",
           "create_token", "list_tokens", "revoke_token", "Token", "ROLES"]

_LAZY = {"ServiceSettings": "settings", "GuardPolicy": "settings", "Service": "core", "create_app": "app",
         "serve": "app", "create_token": "auth", "list_tokens": "auth", "revoke_token": "auth", "Token": "auth",
         "ROLES": "auth"}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 's3t.service' has no attribute {name!r}")
