"""A typed client for the analysts' REST API (``compose.api``, docs/api.md), over httpx, sync and async.

    with SealroomClient("http://127.0.0.1:8000", token) as api:
        submitted = api.submit(recipe.submission)            # app-compose.json built and proposed on-chain
        api.compose(submitted.compose_hash).approval.state  # "pending" until k owners approve
        run = api.start_run(submitted.compose_hash, ["EU-West.sealed", "APAC.sealed"])   # streamed uploads
        done = api.wait(run.run_id, on_progress=print)      # stages, and epochs for DP-SGD
        receipt = api.result(run.run_id)                    # attestation.json, verbatim

:class:`AsyncSealroomClient` has the same methods, awaitable. Every answer is parsed into the API's own wire
models (``compose.api.schemas``: ``SubmittedCompose``, ``ComposeView``, ``RunView``). The bytes that count are
checked, not trusted: a submitted or downloaded app-compose.json must hash to its compose hash, and a submitted
one must carry exactly the manifest that was sent.

Errors (the server's own reason is the message; ``status`` is the HTTP status, None without an answer)::

    ApiError
    ├── ApiUnreachable        no answer: connection refused, timed out, or cut (status None)
    ├── BadRequest            400: a body nested too deep
    ├── Unauthorized          401: no token, or one no analyst holds (revoked, mistyped, another API's)
    ├── NotFound              404: no such compose, or no such run of yours
    ├── Conflict              409: the chain refuses (already proposed, pending, revoked), or no result yet
    ├── PayloadTooLarge       413: over the route's body cap
    ├── InvalidRequest        422: ``problems`` as (field, reason), e.g. ("manifest.epsilon", "…")
    ├── ServerError           5xx
    │   └── ServiceUnavailable   503: the chain is unreachable
    └── ResponseInvalid       the answer is not what the API promises (bytes that do not hash to their hash, …)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import httpx
from pydantic import BaseModel, TypeAdapter, ValidationError

from compose.api.schemas import ComposeSubmission, ComposeView, RunView, SubmittedCompose

__all__ = [
    "TERMINAL_STATES",
    "UPLOAD_FIELD",
    "ApiError",
    "ApiUnreachable",
    "AsyncSealroomClient",
    "BadRequest",
    "Conflict",
    "InvalidRequest",
    "NotFound",
    "PayloadTooLarge",
    "ResponseInvalid",
    "RunResult",
    "SealroomClient",
    "ServerError",
    "ServiceUnavailable",
    "Unauthorized",
    "error_for",
]

TERMINAL_STATES = frozenset({"done", "failed"})
UPLOAD_FIELD = "sealed"                        # compose.api.uploads.FIELD: one part per sealed file
_M = TypeVar("_M", bound=BaseModel)


# ----------------------------------------------------------------------------------------- errors

class ApiError(Exception):
    """The API refused, failed, or did not answer. ``reason``: the server's words (or the transport's)."""

    def __init__(self, reason: str, *, status: int | None = None,
                 problems: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.problems = list(problems)

    @property
    def field(self) -> str | None:
        """The first field at fault, when the API named one (422)."""
        return self.problems[0][0] if self.problems else None


class ApiUnreachable(ApiError):
    """No answer from the API: nothing listens there, the connection was cut, or it timed out."""


class BadRequest(ApiError):
    """400: a body or docker-compose YAML nested deeper than the API accepts."""


class Unauthorized(ApiError):
    """401: no token, or a token no analyst holds."""


class NotFound(ApiError):
    """404: no such compose, or no run of this analyst by that id."""


class Conflict(ApiError):
    """409: the chain refuses (already proposed, pending, revoked), or the run has no result yet."""


class PayloadTooLarge(ApiError):
    """413: the body is over the route's cap."""


class InvalidRequest(ApiError):
    """422: the request is invalid; ``problems`` name the fields."""


class ServerError(ApiError):
    """5xx: the API failed."""


class ServiceUnavailable(ServerError):
    """503: the API cannot reach the chain."""


class ResponseInvalid(ApiError):
    """The answer is not what the API promises (wrong bytes for a hash, not the manifest sent, not JSON)."""


_BY_STATUS: dict[int, type[ApiError]] = {400: BadRequest, 401: Unauthorized, 404: NotFound, 409: Conflict,
                                         413: PayloadTooLarge, 422: InvalidRequest, 503: ServiceUnavailable}


def _problems_of(detail: Any) -> tuple[str, list[tuple[str, str]]]:
    """The reason and (field, reason) problems of an error body's ``detail`` (a string, or FastAPI's list)."""
    if isinstance(detail, str):
        problems = []
        for part in detail.split("; "):
            field, sep, reason = part.partition(": ")
            if sep and field and " " not in field:      # "analysis.params.max_rows: required setting is missing"
                problems.append((field, reason))
        return detail, problems
    if isinstance(detail, list):
        problems = []
        for item in detail:
            if not isinstance(item, dict):
                continue
            loc = [part for part in item.get("loc", []) if part != "body"]
            field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")
            problems.append((field or "body", str(item.get("msg", "invalid"))))
        return "; ".join(f"{field}: {reason}" for field, reason in problems) or "invalid request", problems
    return "the API gave no reason", []


def error_for(response: httpx.Response) -> ApiError:
    """The typed error for a 4xx/5xx answer, with the server's reason."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = response.text.strip()[:500] or None
    reason, problems = _problems_of(detail)
    status = response.status_code
    kind = _BY_STATUS.get(status) or (ServerError if status >= 500 else ApiError)
    return kind(f"{reason} (HTTP {status})", status=status, problems=problems)


def _check(response: httpx.Response) -> httpx.Response:
    if response.is_success:
        return response
    raise error_for(response)


def _model(model: type[_M] | TypeAdapter, response: httpx.Response) -> Any:
    try:
        if isinstance(model, TypeAdapter):
            return model.validate_json(response.content)
        return model.model_validate_json(response.content)
    except ValidationError as bad:
        raise ResponseInvalid(f"the API's answer to {response.request.method} {response.request.url.path} is not "
                              f"what it promises: {bad.error_count()} problem(s), first: "
                              f"{bad.errors()[0]['msg']}") from None


_COMPOSES = TypeAdapter(list[ComposeView])
_RUNS = TypeAdapter(list[RunView])


def _submission_body(recipe: ComposeSubmission | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(recipe, ComposeSubmission):
        return recipe.model_dump(mode="json", exclude_none=True)
    return dict(recipe)


def _checked_submission(sent: dict[str, Any], submitted: SubmittedCompose) -> SubmittedCompose:
    """The API built and proposed these bytes: they must hash to the hash, and hold the manifest sent."""
    from compose.app_compose import manifest_from_app_compose
    from compose.manifest import StudyManifest

    body = submitted.app_compose.encode("utf-8")
    if hashlib.sha256(body).hexdigest() != submitted.compose_hash:
        raise ResponseInvalid(f"the API answered app-compose.json bytes that do not hash to compose hash "
                              f"{submitted.compose_hash}")
    try:
        measured = manifest_from_app_compose(body)
        wanted = StudyManifest.model_validate(sent["manifest"])
    except (ValueError, KeyError, TypeError) as bad:
        raise ResponseInvalid(f"the API's app-compose.json does not carry a readable manifest: {bad}") from None
    if measured != wanted:
        raise ResponseInvalid("the API's app-compose.json carries another manifest than the one submitted")
    return submitted


def _checked_app_compose(h: str, body: bytes) -> bytes:
    if hashlib.sha256(body).hexdigest() != h:
        raise ResponseInvalid(f"the API served app-compose.json bytes that do not hash to {h}")
    return body


def _hash(compose_hash: str) -> str:
    h = compose_hash.removeprefix("0x").lower()
    if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
        raise ValueError(f"a compose hash is 64 hex digits (0x optional), got {compose_hash!r}")
    return h


@dataclass(frozen=True)
class RunResult:
    """A run's attestation.json, verbatim (verify it with `seal verify`), and whether its CVM was SIMULATED."""

    attestation: bytes
    simulated: bool

    def json(self) -> dict[str, Any]:
        return json.loads(self.attestation)

    @property
    def payload(self) -> dict[str, Any]:
        """The released DP result (the signed envelope's payload)."""
        return self.json()["envelope"]["payload"]


def _result(response: httpx.Response) -> RunResult:
    simulated = response.headers.get("x-sealroom-simulated", "").lower() == "true"
    return RunResult(response.content, simulated)


class _CountingFile:
    """A sealed file as httpx streams it (64 KiB reads), reporting each read to ``seen(n)``."""

    def __init__(self, file: BinaryIO, seen: Callable[[int], None]) -> None:
        self._file = file
        self._seen = seen

    def read(self, size: int = -1) -> bytes:
        chunk = self._file.read(size)
        self._seen(len(chunk))
        return chunk

    def fileno(self) -> int:
        return self._file.fileno()

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._file.seek(offset, whence)

    def tell(self) -> int:
        return self._file.tell()


@contextmanager
def _upload_parts(files: Sequence[str | os.PathLike],
                  on_upload: Callable[[int, int], None] | None) -> Iterator[list[tuple[str, tuple[str, Any, str]]]]:
    """The multipart parts of a run's sealed files, opened for streaming (never read whole into memory)."""
    paths = [Path(f) for f in files]
    total = sum(path.stat().st_size for path in paths)
    sent = 0

    def seen(n: int) -> None:
        nonlocal sent
        sent += n
        if on_upload is not None and n:
            on_upload(min(sent, total), total)

    with ExitStack() as opened:
        yield [(UPLOAD_FIELD, (path.name, _CountingFile(opened.enter_context(path.open("rb")), seen),
                               "application/octet-stream")) for path in paths]


def _changed(before: RunView | None, now: RunView) -> bool:
    if before is None:
        return True
    return (before.state, before.reason, before.training) != (now.state, now.reason, now.training)


def _transport_error(base_url: str, error: httpx.TransportError) -> ApiUnreachable:
    what = "timed out" if isinstance(error, httpx.TimeoutException) else "did not answer"
    return ApiUnreachable(f"the analysts' API at {base_url} {what}: {type(error).__name__}: {error}")


# ----------------------------------------------------------------------------------------- sync

class SealroomClient:
    """The analysts' API, synchronously. ``token``: the analyst's (``seal analyst-token NAME``); ``timeout``:
    seconds per network operation (an upload may take longer as a whole)."""

    def __init__(self, base_url: str, token: str | None, *, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> SealroomClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return _check(self._http.request(method, path, **kwargs))
        except httpx.TransportError as error:
            raise _transport_error(self.base_url, error) from None

    def openapi(self) -> dict[str, Any]:
        """The API's OpenAPI document."""
        return self._request("GET", "/openapi.json").json()

    def submit(self, recipe: ComposeSubmission | Mapping[str, Any]) -> SubmittedCompose:
        """``POST /composes``: build app-compose.json from the recipe, store it, propose its hash on-chain."""
        body = _submission_body(recipe)
        return _checked_submission(body, _model(SubmittedCompose, self._request("POST", "/composes", json=body)))

    def composes(self) -> list[ComposeView]:
        """``GET /composes``: every compose submitted to this API, newest first, with its approval state."""
        return _model(_COMPOSES, self._request("GET", "/composes"))

    def compose(self, compose_hash: str) -> ComposeView:
        """``GET /composes/{hash}``: the approval state and the study's budget, as the chain has them now."""
        return _model(ComposeView, self._request("GET", f"/composes/{_hash(compose_hash)}"))

    def app_compose(self, compose_hash: str) -> bytes:
        """``GET /composes/{hash}/app-compose.json``: the measured bytes, checked against the hash."""
        h = _hash(compose_hash)
        return _checked_app_compose(h, self._request("GET", f"/composes/{h}/app-compose.json").content)

    def start_run(self, compose_hash: str, sealed_files: Sequence[str | os.PathLike], *,
                  on_upload: Callable[[int, int], None] | None = None) -> RunView:
        """``POST /composes/{hash}/runs``: upload the sealed files (streamed from disk) and start a run.
        ``on_upload(sent, total)`` follows the upload in bytes."""
        h = _hash(compose_hash)
        with _upload_parts(sealed_files, on_upload) as parts:
            return _model(RunView, self._request("POST", f"/composes/{h}/runs", files=parts))

    def runs(self) -> list[RunView]:
        """``GET /runs``: this analyst's runs, newest first."""
        return _model(_RUNS, self._request("GET", "/runs"))

    def run(self, run_id: str) -> RunView:
        """``GET /runs/{id}``: state, stages so far, epochs for DP-SGD, isolation, the reason it failed."""
        return _model(RunView, self._request("GET", f"/runs/{run_id}"))

    def wait(self, run_id: str, *, poll_s: float = 0.5, timeout_s: float | None = None,
             on_progress: Callable[[RunView], None] | None = None) -> RunView:
        """Follow a run until it is done or failed and return its last view (a failed run is not an exception).
        ``on_progress(view)`` sees each change of state, reason or epochs. ``TimeoutError`` after ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last = None
        while True:
            view = self.run(run_id)
            if on_progress is not None and _changed(last, view):
                on_progress(view)
            last = view
            if view.state in TERMINAL_STATES:
                return view
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} is still {view.state} after {timeout_s:g} s")
            time.sleep(poll_s)

    def result(self, run_id: str) -> RunResult:
        """``GET /runs/{id}/result``: attestation.json verbatim, once the run is done (409 before)."""
        return _result(self._request("GET", f"/runs/{run_id}/result"))


# ----------------------------------------------------------------------------------------- async

class AsyncSealroomClient:
    """The analysts' API, asynchronously: :class:`SealroomClient`'s methods, awaitable."""

    def __init__(self, base_url: str, token: str | None, *, timeout: float = 60.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout,
                                       transport=transport)

    async def __aenter__(self) -> AsyncSealroomClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return _check(await self._http.request(method, path, **kwargs))
        except httpx.TransportError as error:
            raise _transport_error(self.base_url, error) from None

    async def openapi(self) -> dict[str, Any]:
        return (await self._request("GET", "/openapi.json")).json()

    async def submit(self, recipe: ComposeSubmission | Mapping[str, Any]) -> SubmittedCompose:
        body = _submission_body(recipe)
        return _checked_submission(body, _model(SubmittedCompose, await self._request("POST", "/composes",
                                                                                      json=body)))

    async def composes(self) -> list[ComposeView]:
        return _model(_COMPOSES, await self._request("GET", "/composes"))

    async def compose(self, compose_hash: str) -> ComposeView:
        return _model(ComposeView, await self._request("GET", f"/composes/{_hash(compose_hash)}"))

    async def app_compose(self, compose_hash: str) -> bytes:
        h = _hash(compose_hash)
        return _checked_app_compose(h, (await self._request("GET", f"/composes/{h}/app-compose.json")).content)

    async def start_run(self, compose_hash: str, sealed_files: Sequence[str | os.PathLike], *,
                        on_upload: Callable[[int, int], None] | None = None) -> RunView:
        h = _hash(compose_hash)
        with _upload_parts(sealed_files, on_upload) as parts:
            return _model(RunView, await self._request("POST", f"/composes/{h}/runs", files=parts))

    async def runs(self) -> list[RunView]:
        return _model(_RUNS, await self._request("GET", "/runs"))

    async def run(self, run_id: str) -> RunView:
        return _model(RunView, await self._request("GET", f"/runs/{run_id}"))

    async def wait(self, run_id: str, *, poll_s: float = 0.5, timeout_s: float | None = None,
                   on_progress: Callable[[RunView], None] | None = None) -> RunView:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last = None
        while True:
            view = await self.run(run_id)
            if on_progress is not None and _changed(last, view):
                on_progress(view)
            last = view
            if view.state in TERMINAL_STATES:
                return view
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {run_id} is still {view.state} after {timeout_s:g} s")
            await asyncio.sleep(poll_s)

    async def result(self, run_id: str) -> RunResult:
        return _result(await self._request("GET", f"/runs/{run_id}/result"))
