"""HTTP routes over `Service`: FastAPI request/response models in, library calls, JSON out.

Every route is a few lines; errors map to statuses in one table (`STATUS`): bad input 422, body too
large 413, no or unknown token 401, missing role 403, unknown id 404, conflicting idempotency key or a
decided held request 409, rate limit or quota 429 (with Retry-After), model not trained or every shard
deleted away 503. See `core` for the concurrency and visibility semantics.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures, whose dependency
# aliases (Predictor, Deleter, Admin) are local to `create_app`.
import json
import logging
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Header, Path as PathParam, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import (AuthError, ConflictError, DataError, ForbiddenError, NeedsRestoreError, NotFoundError,
                      NotTrainedError, RateLimitError, S3TError)
from .auth import Token
from .core import Service
from .metrics import CONTENT_TYPE
from .models import (DeletionRequest, ErrorOut, FlagOut, HealthResponse, HeldResponse, PredictRequest,
                     PredictResponse, ReceiptOut, RestoreResponse, ReviewDecision, StatusResponse)
from .settings import ServiceSettings

__all__ = ["create_app", "serve"]

log = logging.getLogger("s3t.service")

# One place maps library errors to HTTP: (status, metric reason). Order matters: subclasses first.
STATUS: list[tuple[type[S3TError], int, str]] = [
    (ForbiddenError, 403, "forbidden"),
    (AuthError, 401, "unauthenticated"),
    (RateLimitError, 429, "rate_limited"),
    (NotFoundError, 404, "not_found"),
    (ConflictError, 409, "conflict"),
    (DataError, 422, "invalid"),
    (NotTrainedError, 503, "unavailable"),
    (NeedsRestoreError, 503, "unavailable"),
]
ERRORS = {code: {"model": ErrorOut} for code in (401, 403, 404, 409, 413, 422, 429, 503)}
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=200,
                                              pattern=r"^[!-~]+$",
                                              description="Any printable ASCII string; a repeat returns the "
                                                          "first request's result instead of deleting again.")]


def create_app(run_dir: str | Path, settings: ServiceSettings | None = None) -> FastAPI:
    """The FastAPI app serving one run folder (opens it now; starts the worker with the app)."""
    service = Service(run_dir, settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        service.start()
        try:
            yield
        finally:
            service.close()

    app = FastAPI(title="s3t", version=__version__, lifespan=lifespan, responses=ERRORS,
                  description="Exact machine unlearning (S3T): predictions, deletions with receipts, "
                              "background restoration. Auth: `Authorization: Bearer <token>` "
                              "(`s3t token create RUN_DIR`).")
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=service.settings.max_body_bytes,
                       on_reject=lambda: service.metrics.rejected.labels("too_large").inc())
    bearer = HTTPBearer(auto_error=False, description="A token from `s3t token create RUN_DIR --role ROLE`.")

    def caller(role: str) -> Callable[..., Token | None]:
        def dependency(request: Request, _scheme=Depends(bearer)) -> Token | None:
            client = request.client.host if request.client else "unknown"
            return service.authorize(request.headers.get("authorization"), role, client=client)
        return dependency

    Predictor = Annotated[Token | None, Depends(caller("predict"))]
    Deleter = Annotated[Token, Depends(caller("delete"))]
    Admin = Annotated[Token, Depends(caller("admin"))]

    @app.exception_handler(S3TError)
    async def library_error(_request: Request, exc: S3TError) -> JSONResponse:
        code, reason = next(((c, r) for cls, c, r in STATUS if isinstance(exc, cls)), (500, "error"))
        if code == 500:
            log.error("unmapped s3t error: %r", exc)
        service.metrics.rejected.labels(reason).inc()
        headers = {"WWW-Authenticate": "Bearer"} if code == 401 else {}
        if isinstance(exc, RateLimitError):
            headers["Retry-After"] = str(max(1, round(exc.retry_after)))
        return JSONResponse({"error": type(exc).__name__, "detail": str(exc)}, status_code=code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        service.metrics.rejected.labels("invalid").inc()
        detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
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
    def predict(body: PredictRequest, _token: Predictor) -> PredictResponse:
        """Classify texts with the served ensemble; reports the served-set version used."""
        p = service.predict(body.texts)
        labels = list(service.system.labels)
        return PredictResponse(served_version=p.served_version, labels=labels, predictions=[
            {"label": label, "probabilities": dict(zip(labels, map(float, row)))}
            for label, row in zip(p.labels, p.probabilities)])

    @app.post("/v1/deletions", response_model=ReceiptOut, tags=["deletions"],
              responses={202: {"model": HeldResponse, "description": "Held for an admin's review."}})
    def delete(body: DeletionRequest, token: Deleter, idempotency_key: IdempotencyKey = None) -> Response:
        """Forget records and/or subjects now; answers once the deletion is durably committed."""
        result = service.delete(token, ids=body.ids, subjects=body.subjects, reference=body.reference,
                                idempotency_key=idempotency_key)
        if result.outcome == "held":
            return JSONResponse({"status": "held", "flag": result.flag.to_dict()}, status_code=202)
        return JSONResponse(result.receipt.to_dict(),
                            headers={"Idempotent-Replayed": "true"} if result.outcome == "replayed" else {})

    @app.get("/v1/deletions/{request_id}", response_model=ReceiptOut, tags=["deletions"])
    def receipt(request_id: Annotated[str, PathParam(max_length=64)], token: Deleter) -> dict:
        """The stored receipt of a deletion request (a non-admin token sees its own requests only)."""
        return service.receipt(token, request_id).to_dict()

    @app.get("/v1/status", response_model=StatusResponse, tags=["status"])
    def status(_token: Predictor) -> dict:
        """Shards, live orders, served depths, capacity left, restoration state, pending holds."""
        return service.status()

    @app.post("/v1/restore", response_model=RestoreResponse, status_code=202, tags=["restoration"])
    def restore(_admin: Admin) -> dict:
        """Start restoring truncated orders in the background (admin)."""
        return {"restoration": service.restore()}

    @app.get("/v1/review", response_model=list[FlagOut], tags=["review"])
    def flags(_admin: Admin, status: Literal["pending", "applied", "rejected"] | None = Query(None)) -> list[dict]:
        """Flagged deletion requests; `?status=pending` lists the holds waiting for a decision (admin)."""
        return [f.to_dict() for f in service.flags(status=status)]

    @app.get("/v1/review/{flag_id}", response_model=FlagOut, tags=["review"])
    def flag(flag_id: Annotated[str, PathParam(max_length=64)], token: Deleter) -> dict:
        """One flagged request (its submitter or an admin)."""
        return service.flag(token, flag_id).to_dict()

    @app.post("/v1/review/{flag_id}/apply", response_model=ReceiptOut, tags=["review"])
    def apply(flag_id: Annotated[str, PathParam(max_length=64)], admin: Admin,
              body: ReviewDecision | None = None) -> dict:
        """Apply a held deletion request (admin); answers with its receipt."""
        return service.apply(admin, flag_id, note=body.note if body else None).to_dict()

    @app.post("/v1/review/{flag_id}/reject", response_model=FlagOut, tags=["review"])
    def reject(flag_id: Annotated[str, PathParam(max_length=64)], admin: Admin,
               body: ReviewDecision | None = None) -> dict:
        """Reject a held deletion request (admin): nothing is deleted, the decision is kept."""
        return service.reject(admin, flag_id, note=body.note if body else None).to_dict()

    @app.get("/healthz", response_model=HealthResponse, tags=["status"])
    def healthz() -> dict:
        """Liveness: the registry answers. No token needed."""
        version, _ = service.system.served()
        return {"status": "ok", "served_version": version, "model_loaded": service.model_ready.is_set()}

    @app.get("/metrics", tags=["status"], response_class=Response)
    def metrics() -> Response:
        """Prometheus metrics. No token needed."""
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    return app


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


def serve(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, settings: ServiceSettings | None = None,
          log_level: str = "info") -> None:
    """Run the service until interrupted (SIGINT/SIGTERM stop it cleanly)."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(run_dir, settings)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False)).run()
