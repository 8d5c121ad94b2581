"""HTTP routes over `Service`: FastAPI request/response models in, library calls, JSON out.

Every route is a few lines: one call on `Service`, run in its lane (`lanes`: predictions, writes and
reads each have their own threads, so a flood of predictions cannot delay a deletion or /healthz) or,
for deletions and review decisions, queued for the run's group commit and awaited as a future;
errors map to statuses in one table (`STATUS`): bad input 422 (duplicate JSON keys included), body too
large 413, no or unknown token 401, missing role 403, unknown id 404 (also for another token's), a
conflicting idempotency key, a decided held request, an id already in the run or a re-add while a
restore runs 409, rate limit, quota or held-request cap 429
(with Retry-After), prediction queue full, model not trained or every shard deleted away 503. Error
messages never name the server's paths. See `core` for the concurrency and visibility semantics.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures, whose dependency
# aliases (Predictor, Deleter, Admin) are local to `create_app`.
import asyncio
import gc
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Header, Path as PathParam, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import (AuthError, BusyError, ConflictError, DataError, ForbiddenError, NeedsRestoreError,
                      NotFoundError, NotTrainedError, RateLimitError, RunBusyError, S3TError)
from .auth import ROLES, Token
from .core import Service
from .metrics import CONTENT_TYPE
from .models import (MAX_REFERENCE_CHARS, AdditionOut, AddRecordsRequest, AuditOut, CapacityOut, DeletionRequest,
                     ErrorOut, ExportOut, FlagOut, FlagPage, GenerateRequest, GenerateResponse, HealthResponse,
                     HeldResponse, PredictImagesRequest, PredictRequest, PredictResponse, PreviewOut, ReceiptList,
                     ReceiptOut, RestoreResponse, ReviewDecision, StatusResponse, WhoAmI)
from .settings import ServiceSettings

__all__ = ["create_app", "serve", "uvicorn_config"]

log = logging.getLogger("s3t.service")

# One place maps library errors to HTTP: (status, metric reason). Order matters: subclasses first.
STATUS: list[tuple[type[S3TError], int, str]] = [
    (ForbiddenError, 403, "forbidden"),
    (AuthError, 401, "unauthenticated"),
    (RateLimitError, 429, "rate_limited"),
    (BusyError, 503, "busy"),
    (NotFoundError, 404, "not_found"),
    (ConflictError, 409, "conflict"),
    (RunBusyError, 409, "conflict"),
    (DataError, 422, "invalid"),
    (NotTrainedError, 503, "unavailable"),
    (NeedsRestoreError, 503, "unavailable"),
]
ERRORS = {code: {"model": ErrorOut} for code in (401, 403, 404, 409, 413, 422, 429, 503)}
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=200,
                                              pattern=r"^[!-~]+$",
                                              description="Any printable ASCII string; a repeat returns the "
                                                          "first request's result instead of deleting again.")]
FlagId = Annotated[str, PathParam(max_length=64)]

# The console (`/console`): static files shipped in the package, served with a policy that lets the page
# run only its own script and talk only to this origin, so a token typed into it cannot be sent elsewhere.
CONSOLE_FILES = {"index.html": "text/html; charset=utf-8", "console.js": "text/javascript; charset=utf-8",
                 "console.css": "text/css; charset=utf-8", "favicon.svg": "image/svg+xml"}
CONSOLE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def create_app(run_dir: str | Path, settings: ServiceSettings | None = None) -> FastAPI:
    """The FastAPI app serving one run folder (opens it now; starts the worker with the app)."""
    service = Service(run_dir, settings)
    scrub = _scrubber(service)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        service.start()
        try:
            yield
        finally:
            service.close()

    docs = service.settings.docs
    app = FastAPI(title="s3t", version=__version__, lifespan=lifespan, responses=ERRORS,
                  docs_url="/docs" if docs else None, redoc_url=None,
                  description="Exact machine unlearning (S3T): predictions, deletions with receipts, "
                              "background restoration. Auth: `Authorization: Bearer <token>` "
                              "(`s3t token create RUN_DIR`).")
    app.router.route_class = StrictJSONRoute
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=service.settings.max_body_bytes,
                       on_reject=lambda: service.metrics.rejected.labels("too_large").inc())
    bearer = HTTPBearer(auto_error=False, description="A token from `s3t token create RUN_DIR --role ROLE`.")
    reads, writes, model = service.read_lane, service.write_lane, service.model_lane

    def caller(*roles: str, cached: bool = False) -> Callable[..., Token | None]:
        async def dependency(request: Request, _scheme=Depends(bearer)) -> Token | None:
            authorization = request.headers.get("authorization")
            if cached and (token := service.authorize_in_memory(authorization, *roles)) is not None:
                return token   # no I/O: no thread hop
            client = request.client.host if request.client else "unknown"
            return await reads.run(service.authorize, authorization, *roles, client=client, cached=cached)
        return dependency

    Predictor = Annotated[Token | None, Depends(caller("predict"))]
    Viewer = Annotated[Token | None, Depends(caller("predict", "metrics"))]
    Deleter = Annotated[Token, Depends(caller("delete"))]
    Eraser = Annotated[Token, Depends(caller("delete", cached=True))]   # its group commit re-checks revocation
    Ingester = Annotated[Token, Depends(caller("ingest"))]
    Watcher = Annotated[Token, Depends(caller("metrics"))]
    Admin = Annotated[Token, Depends(caller("admin"))]
    Anyone = Annotated[Token | None, Depends(caller(*ROLES))]

    @app.exception_handler(S3TError)
    async def library_error(_request: Request, exc: S3TError) -> JSONResponse:
        code, reason = next(((c, r) for cls, c, r in STATUS if isinstance(exc, cls)), (500, "error"))
        if code == 500:
            log.error("unmapped s3t error: %r", exc)
        service.metrics.rejected.labels(reason).inc()
        headers = {"WWW-Authenticate": "Bearer"} if code == 401 else {}
        if isinstance(exc, (RateLimitError, BusyError)):
            headers["Retry-After"] = str(max(1, round(exc.retry_after)))
        return JSONResponse({"error": type(exc).__name__, "detail": scrub(str(exc))}, status_code=code,
                            headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        service.metrics.rejected.labels("invalid").inc()
        detail = [{"loc": list(e.get("loc", ())), "msg": _message(e), "type": str(e.get("type", ""))}
                  for e in exc.errors()]
        return JSONResponse({"error": "ValidationError", "detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:   # an unparsable optional body: bad input is 422 everywhere
            service.metrics.rejected.labels("invalid").inc()
            return JSONResponse({"error": "ValidationError", "detail": str(exc.detail)}, status_code=422)
        return JSONResponse({"error": "HTTPError", "detail": exc.detail}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def crash(_request: Request, exc: Exception) -> JSONResponse:   # a bug: logged with its traceback
        service.metrics.rejected.labels("error").inc()
        return JSONResponse({"error": "InternalError", "detail": "internal error; see the server log"},
                            status_code=500)

    @app.post("/v1/predict", response_model=PredictResponse, tags=["predictions"])
    async def predict(body: PredictRequest, _token: Predictor) -> PredictResponse:
        """Classify texts with the served ensemble; reports the served-set version used."""
        return _predictions(await model.run(service.predict, body.texts), service.system.labels)

    @app.post("/v1/predict/images", response_model=PredictResponse, tags=["predictions"])
    async def predict_images(body: PredictImagesRequest, _token: Predictor) -> PredictResponse:
        """Classify base64-encoded PNG/JPEG images with the served ensemble (an image run); reports the
        served-set version used. Each image at most `max_image_bytes` decoded and `max_image_pixels` pixels."""
        return _predictions(await model.run(service.predict_images, body.images), service.system.labels)

    @app.post("/v1/generate", response_model=GenerateResponse, tags=["predictions"])
    async def generate(body: GenerateRequest, _token: Predictor) -> GenerateResponse:
        """Complete prompts with the served ensemble of a causal LM run; reports the served-set version used."""
        g = await model.run(service.generate, body.prompts, max_new_tokens=body.max_new_tokens,
                            temperature=body.temperature, aggregation=body.aggregation, seed=body.seed)
        return GenerateResponse(served_version=g.served_version, completions=list(g.texts))

    @app.post("/v1/deletions", response_model=ReceiptOut, tags=["deletions"],
              responses={202: {"model": HeldResponse, "description": "Held for an admin's review."}})
    async def delete(body: DeletionRequest, token: Eraser, idempotency_key: IdempotencyKey = None) -> Response:
        """Forget records and/or subjects now; answers once the deletion is durably committed."""
        result = await asyncio.wrap_future(service.submit_delete(
            token, ids=body.ids, subjects=body.subjects, reference=body.reference, idempotency_key=idempotency_key))
        if result.outcome == "held":
            return JSONResponse({"status": "held", "flag": result.flag.to_dict()}, status_code=202)
        return JSONResponse(result.receipt.to_dict(),
                            headers={"Idempotent-Replayed": "true"} if result.outcome == "replayed" else {})

    @app.get("/v1/deletions", response_model=ReceiptList, tags=["deletions"])
    async def receipts(token: Deleter,
                       reference: str | None = Query(None, min_length=1, max_length=MAX_REFERENCE_CHARS,
                                                     description="Only receipts with this reference."),
                       limit: int = Query(20, ge=1, le=200, description="Receipts to return.")) -> dict:
        """Receipts newest first, or those with a `reference` (a non-admin token sees its own requests only)."""
        found = await reads.run(service.receipts, token, reference=reference, limit=limit)
        return {"receipts": [r.to_dict() for r in found]}

    @app.get("/v1/deletions/{request_id}/export", response_model=ExportOut, tags=["deletions"])
    async def export(request_id: Annotated[str, PathParam(max_length=64)], token: Deleter) -> dict:
        """The signed receipt: one ledger entry with its hash and Ed25519 signature, for `s3t verify-receipt`
        with the run's public key (`s3t receipt RUN_DIR --public-key`), by anyone, without the run. A non-admin
        token exports its own requests only; an entry made before the run had a signing key is 409."""
        return await reads.run(service.export_receipt, token, request_id)

    @app.get("/v1/deletions/{request_id}", response_model=ReceiptOut, tags=["deletions"])
    async def receipt(request_id: Annotated[str, PathParam(max_length=64)], token: Deleter) -> dict:
        """The stored receipt of a deletion request (a non-admin token sees its own requests only)."""
        return (await reads.run(service.receipt, token, request_id)).to_dict()

    @app.post("/v1/records", response_model=AdditionOut, tags=["records"])
    async def add_records(body: AddRecordsRequest, token: Ingester) -> dict:
        """Add records (ingest): no training here; the served model is unchanged until the background worker
        (or `s3t restore`) trains them in. An id already in the run, or of a deleted record without
        `replace_deleted`, is refused with 409."""
        from ..records import Dataset

        data = Dataset.from_records([r.model_dump(exclude_none=True) for r in body.records])
        # Beside the reads, not in the write lane: a re-add may wait for the training lock, deletions never do.
        addition = await reads.run(service.add, token, data, replace_deleted=body.replace_deleted)
        st = await reads.run(service.system.status)
        return addition.to_dict() | {"stale_orders": st.stale_orders, "unseen_records": st.unseen_records}

    @app.get("/v1/audit", response_model=AuditOut, tags=["audit"])
    async def audit(_admin: Admin,
                    replay: str = Query("0", pattern=r"^(all|[0-9]{1,6})$",
                                        description="Served stages to retrain bit for bit: a number or `all` "
                                                    "(a server started with --audit-replay; it holds the model, "
                                                    "so predictions wait)."),
                    seed: int | None = Query(None, ge=0, description="Seed of the replay's sample.")) -> dict:
        """Audit the run (admin): files and hashes, orphans, stored lineage against the ledger's deletions,
        the ledger's hash chain and signatures, erasure, and optionally stages replayed bit for bit."""
        count = replay if replay == "all" else int(replay)
        lane = model if count and service.settings.audit_replay else reads
        report = await lane.run(service.audit, replay=count, seed=seed)
        return {"passed": report.passed, "checked_at": report.checked_at, "failures": report.failures,
                "checks": [asdict(c) for c in report.checks]}

    @app.get("/v1/status", response_model=StatusResponse, tags=["status"])
    async def status(token: Viewer) -> Response:
        """Serving, served version and live shards; with a `metrics` or admin token also per-shard depths
        and capacity, records, restoration state and pending holds (the other fields are left out)."""
        return JSONResponse(await reads.run(service.status, token))

    @app.post("/v1/restore", response_model=RestoreResponse, status_code=202, tags=["restoration"])
    async def restore(_admin: Admin) -> dict:
        """Start restoring truncated orders in the background (admin)."""
        return {"restoration": await writes.run(service.restore)}

    @app.get("/v1/review", response_model=FlagPage, tags=["review"])
    async def flags(_admin: Admin, status: Literal["pending", "applied", "rejected"] | None = Query(None),
                    limit: int = Query(100, ge=1, le=1000, description="Flagged requests per page."),
                    after: str | None = Query(None, max_length=64,
                                              description="The `next` of the previous page.")) -> dict:
        """Flagged deletion requests, oldest first, a page at a time, with counts (not ids); `?status=pending`
        lists the holds waiting for a decision (admin)."""
        page, following = await reads.run(service.flags, status=status, limit=limit, after=after)
        return {"flags": [f.to_dict() for f in page], "next": following}

    @app.get("/v1/review/{flag_id}", response_model=FlagOut, tags=["review"])
    async def flag(flag_id: FlagId, token: Deleter) -> dict:
        """One flagged request with its ids while pending (its submitter or an admin)."""
        return (await reads.run(service.flag, token, flag_id)).to_dict()

    @app.get("/v1/review/{flag_id}/preview", response_model=PreviewOut, tags=["review"])
    async def preview(flag_id: FlagId, _admin: Admin) -> dict:
        """What applying a pending held request would do to each shard now; nothing is deleted (admin)."""
        return await reads.run(service.preview_flag, flag_id)

    @app.post("/v1/review/{flag_id}/apply", response_model=ReceiptOut, tags=["review"])
    async def apply(flag_id: FlagId, admin: Admin, body: ReviewDecision | None = None) -> dict:
        """Apply a held deletion request (admin); answers with its receipt."""
        return (await asyncio.wrap_future(service.submit_apply(admin, flag_id, note=body.note if body else None))
                ).to_dict()

    @app.post("/v1/review/{flag_id}/reject", response_model=FlagOut, tags=["review"])
    async def reject(flag_id: FlagId, admin: Admin, body: ReviewDecision | None = None) -> dict:
        """Reject a held deletion request (admin): nothing is deleted, the decision is kept."""
        return (await asyncio.wrap_future(service.submit_reject(admin, flag_id, note=body.note if body else None))
                ).to_dict()

    @app.get("/v1/capacity", response_model=CapacityOut, tags=["status"])
    async def capacity(_token: Watcher) -> dict:
        """Expected further deletions from the current state (the capacity simulator: each request deletes one
        random live record; restoration not counted), beside each shard's worst case (metrics or admin)."""
        return await service.capacity_lane.run(service.capacity)

    @app.get("/v1/whoami", response_model=WhoAmI, tags=["status"])
    async def whoami(token: Anyone) -> dict:
        """The presented token's id, name and roles (any role): what the console may offer."""
        if token is None:
            return {"id": None, "name": None, "roles": []}
        return {"id": token.id, "name": token.name, "roles": list(token.roles)}

    console = _console_files()

    @app.get("/console", include_in_schema=False)
    async def console_page() -> Response:
        """The operator console (no token needed for the page; it asks for one and calls the API with it)."""
        return Response(console["index.html"], media_type=CONSOLE_FILES["index.html"], headers=CONSOLE_HEADERS)

    @app.get("/console/{name}", include_in_schema=False)
    async def console_asset(name: Annotated[str, PathParam(max_length=64)]) -> Response:
        if name not in console:   # a fixed set of names: nothing else of the package or disk is reachable
            return JSONResponse({"error": "HTTPError", "detail": "Not Found"}, status_code=404,
                                headers=CONSOLE_HEADERS)
        return Response(console[name], media_type=CONSOLE_FILES[name], headers=CONSOLE_HEADERS)

    @app.get("/healthz", response_model=HealthResponse, tags=["status"])
    async def healthz() -> dict:
        """Liveness: the registry answers. No token needed; never waits for predictions or deletions."""
        return await reads.run(service.health)

    @app.get("/metrics", tags=["status"], response_class=Response)
    async def metrics(_token: Watcher) -> Response:
        """Prometheus metrics (a `metrics` or admin token: they include per-shard capacity)."""
        return Response(await reads.run(service.metrics.render), media_type=CONTENT_TYPE)

    return app


def _console_files() -> dict[str, bytes]:
    """The console's files, read once from the package (they are package data: see pyproject.toml)."""
    from importlib.resources import files

    folder = files("s3t.service").joinpath("console")
    return {name: folder.joinpath(name).read_bytes() for name in CONSOLE_FILES}


def _message(error: dict) -> str:
    """A validation error's message; for malformed JSON, with the parser's reason (e.g. a duplicate key)."""
    message = str(error.get("msg", ""))
    if error.get("type") == "json_invalid" and "error" in (error.get("ctx") or {}):
        message += f": {error['ctx']['error']}"
    return message


def _scrubber(service: Service) -> Callable[[str], str]:
    """A function that replaces the server's own paths (the run folder, the base model's folder) in an
    error message: library messages name them for the operator, but a client has no business knowing."""
    run_dir = Path(service.system.run_dir)
    private = {str(run_dir.resolve()): "<run>", str(run_dir.absolute()): "<run>", str(run_dir): "<run>"}
    model = str(getattr(service.system.plan, "base_model", "") or "")
    if model.startswith("/"):
        private[model] = "<model>"
    ordered = sorted((p for p in private if len(p) > 1), key=len, reverse=True)   # longest first

    def scrub(message: str) -> str:
        for path in ordered:
            message = message.replace(path, private[path])
        return message
    return scrub


class DuplicateKeyError(ValueError):
    """A JSON object names the same key twice."""


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(f"duplicate key {key!r} in a JSON object; send each key once")
        out[key] = value
    return out


class StrictJSONRequest(Request):
    """A request whose JSON body may not repeat a key (json.loads keeps the last silently)."""

    async def json(self):
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = json.loads(body, object_pairs_hook=_refuse_duplicates)
            except DuplicateKeyError as exc:   # reported as malformed JSON: 422 with the key named
                raise json.JSONDecodeError(str(exc), body.decode("utf-8", "replace"), 0) from None
        return self._json


class StrictJSONRoute(APIRoute):
    """Routes that parse JSON bodies with `StrictJSONRequest` (the body is parsed once, here)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive, request._send))
        return strict


def _predictions(p, labels) -> PredictResponse:
    labels = list(labels)
    return PredictResponse(served_version=p.served_version, labels=labels, predictions=[
        {"label": label, "probabilities": dict(zip(labels, map(float, row)))}
        for label, row in zip(p.labels, p.probabilities)])


class BodyLimit:
    """ASGI middleware: refuse request bodies over `max_bytes` with 413, by header or by counting."""

    def __init__(self, app, *, max_bytes: int, on_reject: Callable[[], None]) -> None:
        self.app, self.max_bytes, self.on_reject = app, max_bytes, on_reject

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._refuse(send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        self.on_reject()
        body = json.dumps({"error": "PayloadTooLarge",
                           "detail": f"request body over {self.max_bytes} bytes; split the request"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def uvicorn_config(app, *, host: str, port: int, trusted_proxies: tuple[str, ...] | list[str] = (),
                   log_level: str = "info"):
    """uvicorn's settings for the service: X-Forwarded-For and X-Forwarded-Proto are believed only from
    `trusted_proxies` (none by default: a client could otherwise pick its own address, and with it a
    fresh anonymous rate-limit bucket per request). HTTP is parsed by httptools with a bounded request head
    (`protocol`) and the event loop is uvloop where it installs (not Windows): together about 20% less of
    the server's CPU per deletion than uvicorn's h11 and asyncio's loop, and the server's CPU is what
    bounds a group commit's rate."""
    import uvicorn

    from .protocol import BoundedHttpToolsProtocol

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                          http=BoundedHttpToolsProtocol, loop="auto", proxy_headers=bool(trusted_proxies),
                          forwarded_allow_ips=list(trusted_proxies) or None)


def freeze_heap(service: Service) -> None:
    """Take what is alive now (torch and the rest of the stack, imported by `create_app`), and the model
    once it is loaded, out of the garbage collector's full collections. A full collection walks every
    tracked object; with torch imported one took ~140 ms, every few thousand requests, holding the GIL, so
    it landed on the requests in flight: the 99th percentile of deletions at 32 clients went from 162 ms to
    36 ms with the heap frozen. Objects frozen are never collected as cycles: they live as long as the
    process anyway. For the serving process only (`serve`), not for a library user's."""
    gc.collect()
    gc.freeze()

    def after_model_loads() -> None:
        service.model_ready.wait()
        gc.collect(1)   # the young garbage of the load, not another full walk
        gc.freeze()

    threading.Thread(target=after_model_loads, name="s3t-freeze-heap", daemon=True).start()


def serve(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, settings: ServiceSettings | None = None,
          trusted_proxies: tuple[str, ...] | list[str] = (), log_level: str = "info") -> None:
    """Run the service until interrupted (SIGINT/SIGTERM stop it cleanly)."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(run_dir, settings)
    freeze_heap(app.state.service)
    uvicorn.Server(uvicorn_config(app, host=host, port=port, trusted_proxies=trusted_proxies,
                                  log_level=log_level)).run()
