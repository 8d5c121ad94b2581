"""The HTTP service and its bearer tokens."""

from __future__ import annotations

import json
from typing import Annotated, Literal, Optional

import typer
from rich.markup import escape
from rich.table import Table

from .common import AsJson, RunDir, app, console, open_run, user_errors

# Choices, so that Click rejects a typo before the run is opened (logging would raise a ValueError mid-start).
GuardAction = Literal["alert", "hold", "off"]
LogLevel = Literal["debug", "info", "warning", "error"]


@app.command()
@user_errors
def serve(run_dir: RunDir,
          host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
          port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port.")] = 8000,
          public_predict: Annotated[bool, typer.Option(help="Let /v1/predict and /v1/status answer without a token.")] = False,
          max_body_bytes: Annotated[int, typer.Option(min=1, help="Larger request bodies get 413.")] = 1 << 20,
          rate: Annotated[float, typer.Option(help="Requests per second per token (a token may override).")] = 20.0,
          burst: Annotated[int, typer.Option(min=1, help="Requests a token may send at once before --rate applies.")] = 40,
          quota: Annotated[int, typer.Option(min=1, help="Deletion ids + subjects per token per UTC day.")] = 10_000,
          guard: Annotated[GuardAction, typer.Option(help="Capacity guard policy: hold (wait for an admin), alert (apply, record) or off.")] = "hold",
          guard_window: Annotated[float, typer.Option(help="Seconds of history the guard weighs.")] = 3600.0,
          guard_min_spent: Annotated[int, typer.Option(min=1, help="Capacity units a token may always take per window (and of one shard before the ratio applies).")] = 2,
          guard_ratio: Annotated[float, typer.Option(help="Flag at this many times the capacity random deletions would consume of one shard.")] = 3.0,
          guard_token_share: Annotated[float, typer.Option(help="Share of the ensemble's deletion capacity one token may consume per window without review.")] = 0.25,
          guard_total_share: Annotated[float, typer.Option(help="Share of the ensemble's deletion capacity all tokens together may consume per window without review.")] = 0.5,
          protect_last_order: Annotated[bool, typer.Option(help="Flag requests that would take a shard out of the ensemble.")] = True,
          max_held: Annotated[int, typer.Option(min=1, help="Held requests pending per token; beyond, 429 until an admin decides.")] = 100,
          idempotency_ttl: Annotated[float, typer.Option(help="Seconds an idempotency key is remembered (default 30 days); then a repeat is a new request.")] = 30 * 86400.0,
          prediction_queue: Annotated[int, typer.Option(min=1, help="Predictions waiting for or using the model; beyond, 503 with Retry-After.")] = 64,
          max_batch: Annotated[int, typer.Option(min=1, help="Deletion requests applied per transaction (group commit; 1: a commit per request).")] = 256,
          deletion_queue: Annotated[int, typer.Option(min=1, help="Deletion requests waiting for a group commit; beyond, 503 with Retry-After.")] = 10_000,
          max_image_bytes: Annotated[int, typer.Option(min=1, help="Bytes per image sent to /v1/predict/images (decoded from base64); beyond, 422.")] = 1 << 20,
          max_image_pixels: Annotated[int, typer.Option(min=1, help="Pixels (width x height) per image sent to /v1/predict/images; beyond, 422.")] = 2048 * 2048,
          trusted_proxy: Annotated[Optional[list[str]], typer.Option("--trusted-proxy", help="Address of a reverse proxy whose X-Forwarded-For is believed (repeatable; default: none).")] = None,
          docs: Annotated[bool, typer.Option(help="Serve interactive docs at /docs (Swagger UI, loaded from a CDN by the browser).")] = False,
          restore_below: Annotated[Optional[int], typer.Option(min=1, help="Restore in the background when a shard's served depth is below this (default: only on POST /v1/restore).")] = None,
          train_added: Annotated[bool, typer.Option(help="Train added records in in the background (restore stale orders).")] = True,
          audit_replay: Annotated[bool, typer.Option(help="Let GET /v1/audit?replay=N retrain stages in this process (predictions wait meanwhile).")] = False,
          restore_poll: Annotated[float, typer.Option(help="Seconds between the restoration worker's policy checks.")] = 2.0,
          restore_executor: Annotated[Literal["local", "ray"], typer.Option(help="Where background restorations train: in the worker's child process, or as Ray tasks (pip install \"s3t[ray]\").")] = "local",
          ray_address: Annotated[Optional[str], typer.Option(help="With --restore-executor ray: the cluster to join (auto, ray://HOST:10001); default: a local Ray per restoration.")] = None,
          worker: Annotated[bool, typer.Option(help="Run the background restoration worker.")] = True,
          preload: Annotated[bool, typer.Option(help="Load the model at startup rather than on the first prediction.")] = True,
          log_level: Annotated[LogLevel, typer.Option(case_sensitive=False, help="Server log verbosity.")] = "info") -> None:
    """Serve predictions, deletions, additions and the audit over HTTP (FastAPI; OpenAPI document at /openapi.json).

    Example: s3t serve runs/news --port 8000 --guard hold --restore-below 2
    """
    from ..service.app import serve as run_server
    from ..service.settings import GuardPolicy, ServiceSettings

    settings = ServiceSettings(
        public_predict=public_predict, max_body_bytes=max_body_bytes, rate=rate, burst=burst, daily_quota=quota,
        guard=GuardPolicy(action=guard, window_s=guard_window, min_spent=guard_min_spent, max_ratio=guard_ratio,
                          protect_last_order=protect_last_order, token_share=guard_token_share,
                          total_share=guard_total_share),
        max_held=max_held, idempotency_ttl_s=idempotency_ttl, prediction_queue=prediction_queue, docs=docs,
        max_batch=max_batch, deletion_queue=deletion_queue,
        max_image_bytes=max_image_bytes, max_image_pixels=max_image_pixels,
        restore_below=restore_below, train_added=train_added, audit_replay=audit_replay, restore_poll_s=restore_poll,
        restore_executor=restore_executor, ray_address=ray_address, worker=worker, preload=preload)
    run_server(run_dir, host=host, port=port, settings=settings, trusted_proxies=trusted_proxy or (),
               log_level=log_level)


token_app = typer.Typer(no_args_is_help=True, add_completion=False)
app.add_typer(token_app, name="token")


@token_app.callback()
def token() -> None:
    """Create, list and revoke the HTTP service's bearer tokens (stored hashed in the run).

    Example: s3t token create runs/news --name erasure-desk --role delete
    """


@token_app.command("create")
@user_errors
def token_create(run_dir: RunDir,
                 name: Annotated[str, typer.Option(help="What the token is for (shown in listings).")] = "token",
                 role: Annotated[Optional[list[str]], typer.Option("--role", help="predict, delete, ingest (add records), metrics (read-only: /metrics, detailed status) or admin (repeatable; admin implies all).")] = None,
                 rate: Annotated[Optional[float], typer.Option(help="Requests per second (default: the server's --rate).")] = None,
                 quota: Annotated[Optional[int], typer.Option(help="Deletion items per UTC day (default: the server's --quota).")] = None,
                 as_json: AsJson = False) -> None:
    """Create a token and print its secret (shown once: only a hash is stored).

    Example: s3t token create runs/news --name erasure-desk --role delete
    """
    from ..service.auth import create_token

    tok, secret = create_token(open_run(run_dir).registry, name=name, roles=role or ["predict"], rate=rate,
                               daily_quota=quota)
    if as_json:
        print(json.dumps({"id": tok.id, "name": tok.name, "roles": list(tok.roles), "token": secret}))
        return
    console.print(f"token {tok.id} ({tok.name}, roles {', '.join(tok.roles)}):", markup=False)
    print(secret)


@token_app.command("list")
@user_errors
def token_list(run_dir: RunDir, as_json: AsJson = False) -> None:
    """List tokens: id, name, roles, limits, created and revoked times (never secrets).

    Example: s3t token list runs/news
    """
    from dataclasses import asdict

    from ..service.auth import list_tokens

    tokens = list_tokens(open_run(run_dir).registry)
    if as_json:
        print(json.dumps([asdict(t) for t in tokens], indent=2))
        return
    table = Table("id", "name", "roles", "rate", "quota", "created", "revoked")
    for t in tokens:
        table.add_row(t.id, escape(t.name), ",".join(t.roles), str(t.rate or "default"), str(t.daily_quota or "default"),
                      t.created_at, t.revoked_at or "")
    console.print(table)


@token_app.command("revoke")
@user_errors
def token_revoke(run_dir: RunDir, token_id: Annotated[str, typer.Argument(help="The token's id (from `s3t token list`).")]) -> None:
    """Revoke a token: a running server refuses it from its next request.

    Example: s3t token revoke runs/news 3f9a1c2b7d4e
    """
    from ..service.auth import revoke_token

    revoke_token(open_run(run_dir).registry, token_id)
    console.print(f"revoked token {token_id}", markup=False)
