"""The analysts' API application: its configuration and ``create_app``, which wires the routers
(``compose.api.composes``, ``compose.api.runs``), the shared state they depend on, and the request limits."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from eth_account.signers.local import LocalAccount
from fastapi import FastAPI

from compose.api import composes, runs
from compose.api.deps import ApiState
from compose.api.queue import RunQueue
from compose.auth import AnalystTokens
from compose.backends import Backend
from compose.image.policy import ImageAllowlist
from compose.stack_file import default_state_dir
from compose.http_limits import KIB, MIB, BodyLimit, guard
from contracts.chain import DstackApp

__all__ = ["COMPOSE_BODY_BYTES", "DEFAULT_MAX_UPLOAD_BYTES", "ApiConfig", "create_app"]

COMPOSE_BODY_BYTES = 1 * MIB              # POST /composes: the docker-compose YAML and the manifest, as JSON
DEFAULT_MAX_UPLOAD_BYTES = 4 << 30        # POST /composes/{hash}/runs: all of a run's sealed files together
_OTHER_BODY_BYTES = 64 * KIB              # every other route takes no body
_RUNS_PATH = re.compile(r"/composes/[^/]+/runs")


@dataclass
class ApiConfig:
    """What the API needs: its state folder, its public URL (written into proposals), the study's DstackApp, the
    funded account it proposes with, the backend runs go to, and the study images a compose may name (default:
    the current study image built in the default state folder, ``STATE/study-image``)."""

    state_dir: Path
    public_url: str
    study: DstackApp
    proposer: LocalAccount
    backend: Backend
    clock: Callable[[], float] = time.time
    run_timeout_s: float = 900.0
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    images: ImageAllowlist | None = None


def _body_limits(max_upload_bytes: int) -> Callable[[str, str], BodyLimit]:
    def limit_for(method: str, path: str) -> BodyLimit:
        if method == "POST" and path == "/composes":
            return BodyLimit(COMPOSE_BODY_BYTES)
        if method == "POST" and _RUNS_PATH.fullmatch(path):
            return BodyLimit(max_upload_bytes, streamed=True)
        return BodyLimit(_OTHER_BODY_BYTES)

    return limit_for


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    app.state.api.runs.close()       # queued runs fail; the one in flight is stopped


def create_app(config: ApiConfig) -> FastAPI:
    """The FastAPI application for one study (one DstackApp) and one backend."""
    composes_dir, runs_dir = config.state_dir / "composes", config.state_dir / "runs"
    for folder in (composes_dir, runs_dir):
        folder.mkdir(parents=True, exist_ok=True)
    queue = RunQueue(config.backend, clock=config.clock, timeout_s=config.run_timeout_s)
    app = FastAPI(title="Sealroom analysts' API", version="1", lifespan=_lifespan,
                  description="Submit study composes, follow their on-chain approval, run them on attested "
                              "(here SIMULATED) CVMs and fetch the signed DP result.")
    app.state.api = ApiState(study=config.study, proposer=config.proposer, public_url=config.public_url,
                             composes_dir=composes_dir, runs_dir=runs_dir, tokens=AnalystTokens(config.state_dir),
                             runs=queue, propose_lock=threading.Lock(),
                             images=config.images or ImageAllowlist(state_dir=default_state_dir()))
    app.include_router(composes.router)
    app.include_router(runs.router)
    return guard(app, _body_limits(config.max_upload_bytes))
