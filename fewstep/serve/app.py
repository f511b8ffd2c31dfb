"""`create_app`: the FastAPI app of `fewstep serve`, with A1111's routes (`routes`), the web page (`ui`), its
error shape, and the server's guards: HTTP basic auth on every path (A1111's --api-auth), a request body
limit, and one log line per request.

A1111 answers errors as {"error": type, "detail": ..., "body": ..., "errors": ...} (`modules/api/api.py`,
`handle_exception`); so does this app, with a one-line message, for every status: 4xx for what the client
can fix (a FewstepError is 422), 503 with Retry-After for a full queue, 500 only for a bug.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import logging
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..api import load
from ..errors import FewstepError
from ..pipeline import Pipeline
from ..version import __version__
from . import catalog
from .limits import MAX_BODY, MAX_QUEUE, MAX_WORK
from .routes import router
from .ui import router as page
from .worker import Busy, Worker

log = logging.getLogger("fewstep.serve")


@dataclass
class Settings:
    """What the routes read: the worker and the server's folders and limits."""

    worker: Worker
    models_dir: Path | None
    lora_dir: Path | None
    max_work: int
    outdir: Path | None
    options: dict = field(default_factory=lambda: {"CLIP_stop_at_last_layers": 1})


def create_app(model: str | Path | Pipeline | None = None, models_dir: str | Path | None = None,
               lora_dir: str | Path | None = None, api_auth: str | None = None, queue: int = 4,
               max_work: int = MAX_WORK, max_body: int = MAX_BODY, outdir: str | Path | None = None,
               batch: int = 8) -> FastAPI:
    """The app serving `model` (a loaded Pipeline, a name from `models_dir`, a path or hub id; None: the
    built-in shapes-turbo). `api_auth`: "user:pass" (several comma-separated) required on every path.
    `queue`: requests that may wait behind the running one (more: 503). `max_work`: the largest
    width x height x images x steps of one request. `max_body`: bytes. `outdir`: where save_images writes.
    `batch`: images per model call when waiting txt2img requests of the same settings run together (1: never)."""
    if not 0 <= queue <= MAX_QUEUE:
        raise FewstepError(f"queue={queue} must be from 0 to {MAX_QUEUE}")
    if not 1 <= batch <= 64:
        raise FewstepError(f"batch={batch} must be from 1 to 64")
    users = _credentials(api_auth)  # checked before the model loads
    models_dir = None if models_dir is None else Path(models_dir)
    pipe, title = _load(model, models_dir)
    pipe.lora_dir = None if lora_dir is None else Path(lora_dir)
    app = FastAPI(title="fewstep", version=__version__, description="AUTOMATIC1111-compatible API (docs/serving.md)")
    app.state.serve = Settings(Worker(pipe, title, queue, batch), models_dir, pipe.lora_dir, max_work,
                               None if outdir is None else Path(outdir))
    app.include_router(router)
    app.include_router(page)
    _errors(app)
    app.add_middleware(BodyLimit, limit=max_body)
    app.add_middleware(Guard, users=users)  # the outermost
    return app


def _load(model, models_dir: Path | None) -> tuple[Pipeline, str]:
    """The starting pipeline and its title: a listed model by name, else `model` as a path or hub id."""
    if isinstance(model, Pipeline):
        return model, model.name or "custom"
    try:
        found = catalog.find(model or catalog.BUILT_IN[0], models_dir)
    except FewstepError:
        if model is None:
            raise
        return load(model), Path(str(model)).name
    return load(found.path), found.title


def _credentials(api_auth: str | None) -> list[tuple[str, str]]:
    if api_auth is None:
        return []
    pairs = [tuple(part.split(":", 1)) for part in api_auth.split(",")]
    if not all(len(p) == 2 and p[0] for p in pairs):
        raise FewstepError("--api-auth must be user:password (several separated by commas)")
    return pairs


def error(status: int, kind: str, message: str, headers: dict | None = None) -> JSONResponse:
    """A1111's error body, with a one-line message."""
    line = " ".join(str(message).split())
    return JSONResponse({"error": kind, "detail": line, "body": "", "errors": line}, status, headers)


def _validation_message(e: RequestValidationError) -> str:
    """Pydantic's first complaint as one line: `steps: Input should be greater than or equal to 1`."""
    first = e.errors()[0]
    if first.get("type") == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}"
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return f"{where}: {first['msg']}" if where else first["msg"]


def _errors(app: FastAPI) -> None:
    handlers = {
        RequestValidationError: lambda r, e: error(422, "RequestValidationError", _validation_message(e)),
        FewstepError: lambda r, e: error(422, "FewstepError", str(e)),
        Busy: lambda r, e: error(503, "Busy", str(e), {"Retry-After": str(e.retry_after)}),
        HTTPException: lambda r, e: error(e.status_code, "HTTPException", e.detail, getattr(e, "headers", None)),
        Exception: lambda r, e: error(500, type(e).__name__, f"internal error: {e}"),
    }
    for kind, handler in handlers.items():
        app.add_exception_handler(kind, handler)


class Guard:
    """Basic auth before anything else (the OpenAPI docs and the page included), then one log line per
    request. Plain ASGI: Starlette's BaseHTTPMiddleware would hide a client's disconnect from the routes."""

    def __init__(self, app, users: list[tuple[str, str]]):
        self.app, self.users, self.ids = app, users, itertools.count(1)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        n, start, status = next(self.ids), time.perf_counter(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            if self.users and not _authorized(dict(scope["headers"]).get(b"authorization", b""), self.users):
                denied = error(401, "HTTPException", "Incorrect username or password", {"WWW-Authenticate": "Basic"})
                return await denied(scope, receive, sending)
            return await self.app(scope, receive, sending)
        finally:
            summary = scope.get("state", {}).get("summary", "")
            log.info("#%d %s %s %d %s%.2f s", n, scope["method"], scope["path"], status[0],
                     f"{summary}, " if summary else "", time.perf_counter() - start)


def _authorized(header: bytes, users: list[tuple[str, str]]) -> bool:
    scheme, _, value = header.decode("latin-1").partition(" ")
    try:
        user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
    except (binascii.Error, ValueError):
        return False
    ok = [secrets.compare_digest(user.encode(), u.encode()) & secrets.compare_digest(password.encode(), p.encode())
          for u, p in users]
    return scheme.lower() == "basic" and any(ok)


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413: by Content-Length at once, else while reading."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        too_big = not length.isdigit() or int(length) > self.limit
        if not too_big and length == b"0" and dict(scope["headers"]).get(b"transfer-encoding"):
            body, more = b"", True
            while more and len(body) <= self.limit:
                message = await receive()
                body, more = body + message.get("body", b""), message.get("more_body", False)
            too_big = len(body) > self.limit
            receive = _replay(body, receive)
        if too_big:
            return await error(413, "HTTPException", f"request body over {self.limit} bytes")(scope, receive, send)
        return await self.app(scope, receive, send)


def _replay(body: bytes, then):
    """A `receive` that gives the body read already, then what the client sends next (its disconnect)."""
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return await then()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}
    return receive
