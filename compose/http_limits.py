"""Request limits shared by Sealroom's HTTP services (the KMS, the analysts' API, the simulated guest agent).

No input may crash a service or make it echo the input back. :func:`guard` puts, in front of a FastAPI app:

- a body cap per route, applied before the body is read: a declared ``Content-Length`` over the cap is
  answered 413 at once; a body that grows past it while arriving is answered 413 (or, for a streamed route,
  the reader gets ``HTTPException(413)``) and the connection is closed;
- for routes that are not streamed (every JSON route), the whole body is read (it is small: capped) and refused
  with 400 when its arrays/objects nest deeper than ``compose.safe_parse.MAX_NESTING``, before any JSON
  decoder sees it;
- a validation-error handler that answers FastAPI's 422 without the ``input`` (and ``ctx``) FastAPI puts
  there: a refusal never carries the request body back.

Each service shapes its own error bodies (``error_body``): ``{"detail": ...}`` for the API, the KMS's
``{"error", "reason"}``, the agent's ``{"error"}``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from compose.safe_parse import MAX_NESTING, json_nesting

__all__ = ["KIB", "MIB", "BodyLimit", "RequestGuard", "guard", "validation_error_without_input"]

KIB, MIB = 1 << 10, 1 << 20
_LOC_PART_CHARS = 64  # a field name taken from the body is cut to this in a 422's "loc"


@dataclass(frozen=True)
class BodyLimit:
    """The most bytes a route's request body may have. ``streamed`` routes read their (large, non-JSON) body
    themselves as it arrives, counted against the cap; the others get it whole, checked for nesting."""

    max_bytes: int
    streamed: bool = False


LimitFor = Callable[[str, str], BodyLimit]        # (method, path) -> the route's limit
ErrorBody = Callable[[int, str], dict[str, Any]]  # (status, message) -> the service's error JSON


def _detail(_status: int, message: str) -> dict[str, Any]:
    return {"detail": message}


class _TooLarge(Exception):
    pass


class RequestGuard:
    """ASGI middleware enforcing :class:`BodyLimit` per route and the JSON nesting limit (see the module)."""

    def __init__(self, app: ASGIApp, *, limit_for: LimitFor, error_body: ErrorBody = _detail,
                 max_depth: int = MAX_NESTING) -> None:
        self.app = app
        self.limit_for = limit_for
        self.error_body = error_body
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["method"], scope["path"])
        declared = _content_length(scope)
        if declared is None or declared > limit.max_bytes:
            what = "a Content-Length that is not a number" if declared is None else f"{declared} bytes"
            await self._refuse(scope, send, 413 if declared is not None else 400,
                               f"the request body has {what}; this route takes at most {limit.max_bytes} bytes")
            return
        if limit.streamed:
            await self.app(scope, _counted(receive, limit.max_bytes), send)
            return
        try:
            body = await _read_body(receive, limit.max_bytes)
        except _TooLarge:
            await self._refuse(scope, send, 413,
                               f"the request body is over {limit.max_bytes} bytes, the most this route takes")
            return
        if body and _too_deep(body, self.max_depth):
            await self._refuse(scope, send, 400, f"the request body nests deeper than {self.max_depth} levels")
            return
        await self.app(scope, _replay(body, receive), send)

    async def _refuse(self, scope: Scope, send: Send, status: int, message: str) -> None:
        # Connection: close, so that whatever the client still sends is never read.
        await JSONResponse(self.error_body(status, message), status_code=status,
                           headers={"Connection": "close"})(scope, _no_receive, send)


def _content_length(scope: Scope) -> int | None:
    """The declared length; 0 when none is declared (chunked: counted as it arrives); None when invalid."""
    values = [value for name, value in scope.get("headers", ()) if name == b"content-length"]
    if not values:
        return 0
    if len(set(values)) != 1 or not values[0].isdigit():
        return None
    return int(values[0])


def _too_deep(body: bytes, max_depth: int) -> bool:
    try:
        return json_nesting(body) > max_depth
    except UnicodeDecodeError:
        return False  # not text, so never decoded as JSON: nothing nests


async def _read_body(receive: Receive, max_bytes: int) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _counted(receive: Receive, max_bytes: int) -> Receive:
    size = 0

    async def counted() -> Message:
        nonlocal size
        message = await receive()
        if message["type"] == "http.request":
            size += len(message.get("body", b""))
            if size > max_bytes:
                raise HTTPException(413, f"the request body is over {max_bytes} bytes, the most this route takes",
                                    headers={"Connection": "close"})
        return message

    return counted


async def _no_receive() -> Message:  # pragma: no cover - a JSONResponse never receives
    return {"type": "http.disconnect"}


async def validation_error_without_input(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, less what it echoes of the request: each error keeps its type, location and message."""
    errors = [{"type": error.get("type"), "msg": error.get("msg"),
               "loc": [part[:_LOC_PART_CHARS] if isinstance(part, str) else part for part in error.get("loc", ())]}
              for error in exc.errors()]
    return JSONResponse(status_code=422, content={"detail": jsonable_encoder(errors)})


def guard(app: FastAPI, limit_for: LimitFor, *, error_body: ErrorBody = _detail,
          max_depth: int = MAX_NESTING) -> FastAPI:
    """Put the body caps, the nesting limit and the input-free 422 handler in front of ``app``; returns it."""
    app.add_exception_handler(RequestValidationError, validation_error_without_input)
    app.add_middleware(RequestGuard, limit_for=limit_for, error_body=error_body, max_depth=max_depth)
    return app
