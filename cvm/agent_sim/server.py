"""dstack's guest-agent HTTP API over a Unix socket (and optionally loopback TCP), served by uvicorn.

Routes (docs/design.md, "dstack formats"): ``POST /<Method>`` with a JSON body, ``GET /<Method>?<query>``, and
the pRPC aliases ``/prpc/<Method>`` and ``/prpc/DstackGuest.<Method>``, for GetKey, GetQuote, Info,
EmitEvent, Sign, Verify, Version, GetTlsKey and Attest. With ``service="tappd"`` (its own socket, as dstack 0.5.x
serves it) the legacy Tappd service instead: DeriveKey, DeriveK256Key, TdxQuote, RawQuote and Info, also under
``/prpc/Tappd.<Method>`` (:mod:`cvm.agent_sim.extended_api`).
Errors answer ``{"error": "..."}``: 400 for a bad request, 404 for
an unknown method, 413 for a body over 1 MiB, 503 while the app key has not been obtained. A body nested deeper
than 64 levels is a bad request (400), refused before it is decoded.

The socket is created mode 0600 (uvicorn's own ``--uds`` makes it 0666): whoever can connect can
ask for the app's keys.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool

from compose.http_limits import MIB, BodyLimit, guard
from cvm.agent_sim import extended_api, schemas
from cvm.agent_sim.agent import AgentSimError, AppKeyNotReady, GuestAgentSimulator
from cvm.agent_sim.keys import SIGN_ALGORITHMS, normalize_algorithm, verify_data

__all__ = ["SIMULATOR_VERSION", "AgentServer", "create_app"]

SIMULATOR_VERSION = "0.5.4-sealroom-simulated"
_REVISION = "sealroom-agent-sim"
_CLOUD_VENDOR = "Sealroom (SIMULATED TDX)"
# Every method takes a few hex fields (Sign's data, an event's payload); more than this is refused with 413, and
# a body nested deeper than compose.safe_parse.MAX_NESTING with 400, before any JSON is decoded.
MAX_BODY_BYTES = 1 * MIB
_TCB_INFO_FIELDS = (
    "mrtd", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "mr_aggregated", "os_image_hash", "compose_hash", "device_id",
    "event_log", "app_compose",
)


class _BadRequest(Exception):
    pass


def create_app(agent: GuestAgentSimulator, *, service: str = "dstack") -> FastAPI:
    """The FastAPI app serving ``agent`` with dstack's request/response shapes: the DstackGuest service, or with
    ``service="tappd"`` the legacy Tappd one."""
    if service not in ("dstack", "tappd"):
        raise ValueError(f"service must be 'dstack' or 'tappd', not {service!r}")
    guest = _methods(agent)
    if service == "tappd":
        methods = {"Info": guest["Info"], **extended_api.tappd_methods(agent)}
        prefix = "Tappd."
    else:
        methods = {**guest, **extended_api.guest_methods(agent, lambda: _vm_config(agent))}
        prefix = "DstackGuest."
    app = FastAPI(title="dstack guest agent (SIMULATED)", docs_url=None, redoc_url=None, openapi_url=None)

    async def call(method: str, request: Request) -> JSONResponse:
        name = method.removeprefix(prefix)
        if name not in methods:
            return _error(404, f"unknown method {name!r}")
        request_model, handler = methods[name]
        try:
            arguments = await _arguments(request)
            parsed = request_model.model_validate(arguments) if request_model is not None else None
            response = await run_in_threadpool(handler, parsed)
        except ValidationError as invalid:
            return _error(400, "invalid request: " + "; ".join(_describe(e) for e in invalid.errors()))
        except (_BadRequest, ValueError) as bad:
            return _error(400, str(bad))
        except AppKeyNotReady as not_ready:
            return _error(503, str(not_ready))
        except AgentSimError as failure:
            return _error(500, str(failure))
        return JSONResponse(response.model_dump())

    app.add_api_route("/{method}", call, methods=["GET", "POST"])
    app.add_api_route("/prpc/{method}", call, methods=["GET", "POST"])
    return guard(app, lambda _method, _path: BodyLimit(MAX_BODY_BYTES),
                 error_body=lambda _status, message: schemas.ErrorResponse(error=message).model_dump())


Handler = Callable[[Any], BaseModel]


def _methods(agent: GuestAgentSimulator) -> Mapping[str, tuple[type[BaseModel] | None, Handler]]:
    demo_cert = extended_api.DemoCert(agent)

    def get_key(request: schemas.GetKeyRequest) -> BaseModel:
        derived = agent.get_key(request.path, request.purpose, request.algorithm)
        return schemas.GetKeyResponse(key=derived.key.hex(), signature_chain=[s.hex() for s in derived.signature_chain])

    def get_quote(request: schemas.GetQuoteRequest) -> BaseModel:
        quote, event_log = agent.attest(request.report_data)
        return schemas.GetQuoteResponse(
            quote=quote.hex(),
            event_log=event_log,
            report_data=request.report_data.ljust(64, b"\0").hex(),
            vm_config=_vm_config(agent),
        )

    def info(_: None) -> BaseModel:
        values = agent.info()
        tcb_info = {
            key: values[key]
            for key in _TCB_INFO_FIELDS
        }
        return schemas.InfoResponse(
            app_id=values["app_id"],
            instance_id=values["instance_id"],
            app_cert=demo_cert.pem(),  # dstack's demo RA-TLS certificate chain ("" before the app key)
            tcb_info=json.dumps(tcb_info | {"simulated": True}),
            app_name=values["app_name"],
            device_id=values["device_id"],
            mr_aggregated=values["mr_aggregated"],
            os_image_hash=values["os_image_hash"],
            key_provider_info=values["key_provider_info"],
            compose_hash=values["compose_hash"],
            vm_config=_vm_config(agent),
            cloud_vendor=_CLOUD_VENDOR,
            cloud_product=_REVISION,
        )

    def emit_event(request: schemas.EmitEventRequest) -> BaseModel:
        if not request.event:
            raise _BadRequest("event name cannot be empty")
        agent.emit_event(request.event, request.payload)
        return schemas.EmptyResponse()

    def sign(request: schemas.SignRequest) -> BaseModel:
        signed = agent.sign(request.algorithm, request.data)
        return schemas.SignResponse(
            signature=signed.signature.hex(),
            signature_chain=[s.hex() for s in signed.signature_chain],
            public_key=signed.public_key.hex(),
        )

    def verify(request: schemas.VerifyRequest) -> BaseModel:
        algorithm = normalize_algorithm(request.algorithm, SIGN_ALGORITHMS)
        return schemas.VerifyResponse(valid=verify_data(algorithm, request.data, request.signature, request.public_key))

    def version(_: None) -> BaseModel:
        return schemas.VersionResponse(version=SIMULATOR_VERSION, rev=_REVISION)

    return {
        "GetKey": (schemas.GetKeyRequest, get_key),
        "GetQuote": (schemas.GetQuoteRequest, get_quote),
        "Info": (None, info),
        "EmitEvent": (schemas.EmitEventRequest, emit_event),
        "Sign": (schemas.SignRequest, sign),
        "Verify": (schemas.VerifyRequest, verify),
        "Version": (None, version),
    }


def _vm_config(agent: GuestAgentSimulator) -> str:
    return json.dumps({"simulated": True, "os_image_hash": agent.os_image_hash.hex()})


async def _arguments(request: Request) -> dict[str, Any]:
    if request.method == "GET":
        return dict(request.query_params)
    body = await request.body()
    if not body.strip():
        return {}
    try:
        arguments = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _BadRequest("the request body is not JSON") from None
    if not isinstance(arguments, dict):
        raise _BadRequest("the request body is not a JSON object")
    return arguments


def _describe(error: Mapping[str, Any]) -> str:
    # Field and reason only: the offending input could be data the caller wants signed.
    field = ".".join(str(part) for part in error.get("loc", ())) or "body"
    return f"{field}: {error.get('msg', 'invalid')}"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(schemas.ErrorResponse(error=message).model_dump(), status_code=status)


class AgentServer:
    """Serves a :class:`GuestAgentSimulator` on a Unix socket (mode 0600) and optionally on
    ``127.0.0.1:http_port`` (0: any free port), from a background thread (uvicorn then leaves the
    process's signal handling alone). ``service="tappd"`` serves the legacy Tappd service instead (on its own
    socket, as dstack 0.5.x does: dstack-sdk's ``TappdClient`` looks for ``/var/run/tappd.sock``)."""

    def __init__(
        self, agent: GuestAgentSimulator, socket_path: str | os.PathLike[str], *, http_port: int | None = None,
        service: str = "dstack",
    ) -> None:
        self.socket_path = Path(socket_path)
        self._sockets = [_bind_unix_socket(self.socket_path)]
        if http_port is not None:
            self._sockets.append(socket.create_server(("127.0.0.1", http_port)))
        config = uvicorn.Config(create_app(agent, service=service), log_level="warning", access_log=False,
                                lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def http_url(self) -> str | None:
        """``http://127.0.0.1:<port>`` when serving loopback HTTP too."""
        if len(self._sockets) < 2:
            return None
        host, port = self._sockets[1].getsockname()[:2]
        return f"http://{host}:{port}"

    def _run(self) -> None:
        try:
            asyncio.run(self._server.serve(sockets=self._sockets))
        finally:
            self.socket_path.unlink(missing_ok=True)

    def start(self, timeout: float = 10.0) -> None:
        """Serve from a background thread; returns once listening."""
        self._thread = threading.Thread(target=self._run, name="agent-sim", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the simulated guest agent did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop serving and remove the socket file."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> AgentServer:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def _bind_unix_socket(path: Path) -> socket.socket:
    if path.is_symlink() or path.exists():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        if _socket_is_live(path):
            raise FileExistsError(f"{path} is in use by another running agent")
        path.unlink()  # a stale socket left by an earlier run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    os.chmod(path, 0o600)
    return sock


def _socket_is_live(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
