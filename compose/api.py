"""The analysts' REST API: submit a study compose, follow its approval, run it, fetch the signed result.

DESIGN.md §6 steps 1 and 3. OpenAPI is served at ``/openapi.json`` (and ``/docs``)::

    POST /composes                          docker-compose YAML + study manifest -> app-compose.json, compose hash,
                                            and the on-chain proposal the API makes with its own account
    GET  /composes/{hash}                   the compose's approval state, read from the DstackApp contract
    GET  /composes/{hash}/app-compose.json  the verbatim measured bytes; public, since this URL is the URI proposed
                                            on-chain for the owners to review
    POST /composes/{hash}/runs              start a run on an allowed compose: multipart upload of the sealed files
    GET  /runs/{run_id}                     state, progress, isolation, refusal reason
    GET  /runs/{run_id}/result              attestation.json verbatim (it holds the Sign-RPC envelope), once done

Every other route needs ``Authorization: Bearer <token>`` with a token from ``compose.auth.issue_token``; anyone
else gets 401. A run belongs to the analyst who started it; others get 404 for it.

A run goes ``queued -> booting`` (the CVM's agent measures the recipe and gets its app key from the KMS)
``-> running`` (unwrap, analysis) ``-> signing -> done``, or ``failed`` with the reason (a KMS or chain refusal,
the output gate, a timeout). A compose that the chain does not allow (pending, revoked) never starts: 409 with
the contract's own reason. Runs execute one at a time in a background thread; they are kept in memory (a
restarted API forgets them; their folders stay under ``runs/``).

The local backend runs on SIMULATED TDX: run views say ``"simulated": true``, result responses carry
``X-Sealroom-Simulated: true`` and the receipt itself says ``"simulated": true``.

Status codes: 401 not an analyst; 404 unknown compose or run; 409 the chain refuses (already proposed,
pending, revoked) or the result is not ready; 422 an invalid request (bad YAML, manifest, file count);
503 the chain is unreachable.

    python -m compose.api --stack-state-dir DIR --port PORT --proposer-keystore FILE [--state-dir DIR/api]

reads the local stack's description (``stack.json``) and the proposer keystore's password from
``SEALROOM_API_PROPOSER_PASSWORD``.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from fastapi import Depends, FastAPI, File, HTTPException, Request, Response, UploadFile
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from compose.app_compose import (
    build_app_compose,
    compose_hash,
    manifest_from_app_compose,
    normalized_json_bytes,
)
from compose.auth import AnalystTokens, Unauthenticated
from compose.backends import (
    TERMINAL_STATES,
    Backend,
    LaunchFailed,
    LocalProcessBackend,
    RunHandle,
    RunState,
)
from compose.manifest import StudyManifest
from compose.stack_file import StackDescription, StackError, read_keystore
from contracts.chain import (
    Chain,
    ChainError,
    ChainUnreachable,
    ContractReverted,
    DstackApp,
)
from cvm.sealed.dataset import SealedFileError, read_envelope

__all__ = [
    "PROPOSER_PASSWORD_ENV", "ApiConfig", "create_app", "main",
    # wire schemas
    "ComposeSubmission", "Approval", "Proposal", "ComposeView", "SubmittedCompose", "RunInput", "Progress", "RunView",
]

PROPOSER_PASSWORD_ENV = "SEALROOM_API_PROPOSER_PASSWORD"
_HASH_RE = re.compile(r"[0-9a-f]{64}")
_RUN_ID_RE = re.compile(r"[0-9a-f]{16}")
_ZERO20, _ZERO32 = b"\0" * 20, b"\0" * 32


# --- wire schemas -------------------------------------------------------------------------------------------------

class ComposeSubmission(BaseModel):
    """A study compose: the analyst's docker-compose YAML and the study manifest to measure with it."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, description="the app's name in app-compose.json")
    docker_compose: str = Field(min_length=1, description="docker-compose YAML; the manifest is added to it")
    manifest: StudyManifest
    study_service: str | None = Field(default=None, description="the service that runs the study, when several")


class Approval(BaseModel):
    state: str = Field(description="not proposed | pending | allowed | revoked")
    approvals: int
    threshold: int
    owners: list[str]
    approvers: list[str]
    uri: str
    epsilon_budget: float
    epsilon_spent: float
    epsilon_remaining: float


class Proposal(BaseModel):
    tx: str
    block: int
    proposer: str
    uri: str


class ComposeView(BaseModel):
    compose_hash: str = Field(description="sha256 of app_compose's UTF-8 bytes, 64 hex")
    app_id: str = Field(description="the DstackApp contract address")
    app_compose_url: str
    approval: Approval


class SubmittedCompose(ComposeView):
    app_compose: str = Field(description="app-compose.json verbatim: hash exactly these bytes (UTF-8)")
    proposal: Proposal


class RunInput(BaseModel):
    file: str = Field(description="the uploaded file's name, as the analyst gave it")
    bytes: int
    owner: str = Field(description="the data owner who sealed and signed it")
    ciphertext_sha256: str = Field(description="the sealed payload's digest, as the receipt will list it")


class Progress(BaseModel):
    state: str
    at: float = Field(description="Unix time the run entered this state")


class RunView(BaseModel):
    run_id: str
    compose_hash: str
    state: RunState
    reason: str | None = Field(description="why the run failed (the refusal), when it did")
    progress: list[Progress]
    inputs: list[RunInput]
    simulated: bool = Field(description="true: the CVM runs on the SIMULATED TDX platform")
    isolated: bool
    isolation: str
    result_url: str | None


# --- runs -------------------------------------------------------------------------------------------------------

@dataclass
class _Run:
    run_id: str
    compose_hash: str
    analyst: str
    run_dir: Path
    sealed: list[Path]
    inputs: list[RunInput]
    state: RunState = "queued"
    reason: str | None = None
    progress: list[Progress] = field(default_factory=list)
    result_path: Path | None = None


class _RunQueue:
    """Runs studies on a backend, one at a time, in a background thread; follows each to done or failed."""

    def __init__(self, backend: Backend, *, clock: Callable[[], float], timeout_s: float, poll_s: float = 0.2):
        self.backend = backend
        self._clock = clock
        self._timeout_s = timeout_s
        self._poll_s = poll_s
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="study-run")

    def get(self, run_id: str) -> _Run | None:
        with self._lock:
            return self._runs.get(run_id)

    def view(self, run: _Run) -> RunView:
        """A consistent snapshot of the run, as the API shows it."""
        isolation = self.backend.isolation
        with self._lock:
            return RunView(run_id=run.run_id, compose_hash=run.compose_hash, state=run.state, reason=run.reason,
                           progress=list(run.progress), inputs=run.inputs, simulated=self.backend.simulated,
                           isolated=isolation.isolated, isolation=isolation.description,
                           result_url=f"/runs/{run.run_id}/result" if run.state == "done" else None)

    def submit(self, run: _Run, app_compose_path: Path) -> RunView:
        """Queue the run and return its view as queued (the worker may move it on at once)."""
        with self._lock:
            self._runs[run.run_id] = run
        self._advance(run, "queued")
        queued = self.view(run)
        self._executor.submit(self._execute, run, app_compose_path)
        return queued

    def _advance(self, run: _Run, state: RunState, reason: str | None = None) -> None:
        with self._lock:
            if run.progress and run.state == state:
                return
            run.state, run.reason = state, reason
            run.progress.append(Progress(state=state, at=self._clock()))

    def _execute(self, run: _Run, app_compose_path: Path) -> None:
        if self._closing.is_set():
            self._advance(run, "failed", "the API stopped before the run started")
            return
        self._advance(run, "booting")
        try:
            handle = self.backend.launch(run.run_dir, app_compose_path, run.sealed)
        except LaunchFailed as failure:
            self._advance(run, "failed", failure.reason)
            return
        try:
            self._follow(run, handle)
        finally:
            handle.stop()

    def _follow(self, run: _Run, handle: RunHandle) -> None:
        deadline = time.monotonic() + self._timeout_s
        while True:
            status = handle.poll()
            if status.state in TERMINAL_STATES:
                run.result_path = handle.result_path if status.state == "done" else None
                self._advance(run, status.state, status.reason)
                return
            self._advance(run, status.state)
            if time.monotonic() > deadline:
                self._advance(run, "failed", f"the run did not finish within {self._timeout_s:.0f} s and was stopped")
                return
            if self._closing.wait(self._poll_s):
                self._advance(run, "failed", "the API stopped during the run")
                return

    def close(self) -> None:
        self._closing.set()
        self._executor.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            never_started = [run for run in self._runs.values() if run.state == "queued"]
        for run in never_started:
            self._advance(run, "failed", "the API stopped before the run started")


# --- the app ----------------------------------------------------------------------------------------------------

@dataclass
class ApiConfig:
    """What the API needs: its state folder, its public URL (written into proposals), the study's DstackApp, the
    funded account it proposes with, and the backend runs go to."""

    state_dir: Path
    public_url: str
    study: DstackApp
    proposer: LocalAccount
    backend: Backend
    clock: Callable[[], float] = time.time
    run_timeout_s: float = 900.0


def _hash_param(compose_hash_hex: str) -> str:
    if not _HASH_RE.fullmatch(compose_hash_hex):
        raise HTTPException(422, "a compose hash is 64 lowercase hex digits (no 0x)")
    return compose_hash_hex


def _chain_call(call: Callable[[], Any]) -> Any:
    """Run a chain call; the chain's refusals become 409 with its reason, an unreachable chain 503."""
    try:
        return call()
    except ChainUnreachable as down:
        raise HTTPException(503, str(down)) from None
    except ContractReverted as refused:
        raise HTTPException(409, str(refused)) from None
    except ChainError as failure:
        raise HTTPException(503, f"chain error: {failure}") from None


def create_app(config: ApiConfig) -> FastAPI:
    """The FastAPI application for one study (one DstackApp) and one backend."""
    composes_dir, runs_dir = config.state_dir / "composes", config.state_dir / "runs"
    for folder in (composes_dir, runs_dir):
        folder.mkdir(parents=True, exist_ok=True)
    tokens = AnalystTokens(config.state_dir)
    runs = _RunQueue(config.backend, clock=config.clock, timeout_s=config.run_timeout_s)
    study = config.study
    propose_lock = threading.Lock()      # one proposer account: keep its nonces in order

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        runs.close()

    app = FastAPI(title="Sealroom analysts' API", version="1", lifespan=lifespan,
                  description="Submit study composes, follow their on-chain approval, run them on attested "
                              "(here SIMULATED) CVMs and fetch the signed DP result.")
    bearer = HTTPBearer(auto_error=False, description="an analyst's API token")

    def analyst(request: Request, _credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
        try:
            return tokens.authenticate(request.headers.get("authorization"))
        except Unauthenticated as refused:
            raise HTTPException(401, refused.reason, headers={"WWW-Authenticate": "Bearer"}) from None

    def stored_compose(h: str) -> bytes:
        path = composes_dir / f"{h}.json"
        if not path.exists():
            raise HTTPException(404, f"no compose {h} was submitted to this API")
        return path.read_bytes()

    def compose_view(h: str) -> dict[str, Any]:
        status = _chain_call(lambda: study.status(bytes.fromhex(h)))
        budget = _chain_call(study.budget)
        state = ("revoked" if status.revoked else "allowed" if status.allowed else
                 "pending" if status.proposed else "not proposed")
        approval = Approval(state=state, approvals=status.approvals, threshold=status.threshold,
                            owners=list(status.owners), approvers=list(status.approvers), uri=status.uri,
                            **budget.to_json())
        return {"compose_hash": h, "app_id": study.address, "approval": approval,
                "app_compose_url": f"{config.public_url}/composes/{h}/app-compose.json"}

    @app.post("/composes", response_model=SubmittedCompose, status_code=201)
    def submit_compose(submission: ComposeSubmission, _analyst: str = Depends(analyst)) -> dict[str, Any]:
        """Build app-compose.json (the manifest inside the measured YAML), store it and propose its hash on-chain."""
        try:
            app_compose = build_app_compose(submission.name, submission.docker_compose, submission.manifest,
                                            study_service=submission.study_service)
        except ValueError as bad:
            raise HTTPException(422, str(bad)) from None
        body = normalized_json_bytes(app_compose)
        h = compose_hash(body).hex()
        (composes_dir / f"{h}.json").write_bytes(body)
        uri = f"{config.public_url}/composes/{h}/app-compose.json"
        with propose_lock:
            receipt = _chain_call(lambda: study.propose(bytes.fromhex(h), uri, config.proposer))
        proposal = Proposal(tx="0x" + receipt["transactionHash"].hex().removeprefix("0x"),
                            block=receipt["blockNumber"], proposer=config.proposer.address, uri=uri)
        return {**compose_view(h), "app_compose": body.decode("utf-8"), "proposal": proposal}

    @app.get("/composes/{compose_hash_hex}", response_model=ComposeView)
    def get_compose(compose_hash_hex: str, _analyst: str = Depends(analyst)) -> dict[str, Any]:
        """The compose's approval state and the study's privacy budget, as the DstackApp contract has them now."""
        h = _hash_param(compose_hash_hex)
        stored_compose(h)
        return compose_view(h)

    @app.get("/composes/{compose_hash_hex}/app-compose.json", response_class=Response,
             responses={200: {"content": {"application/json": {}}}})
    def get_app_compose(compose_hash_hex: str) -> Response:
        """app-compose.json exactly as measured (public: owners review it before approving)."""
        return Response(stored_compose(_hash_param(compose_hash_hex)), media_type="application/json")

    def store_inputs(folder: Path, uploads: list[UploadFile], h: str,
                     manifest: StudyManifest) -> tuple[list[Path], list[RunInput]]:
        """Save the uploads under our own names and refuse, before any CVM boots, files that could never open:
        not a sealed file, a bad owner signature, sealed for another recipe, or not one file per manifest owner.
        (The CVM checks all of this again; this only saves a doomed run.)"""
        folder.mkdir(parents=True)
        paths, inputs = [], []
        for index, upload in enumerate(uploads):
            # The analyst's file name is not trusted as a path; only our own names touch the disk.
            path = folder / f"input-{index}.sealed"
            with path.open("wb") as out:
                shutil.copyfileobj(upload.file, out, 1 << 20)
            label = f"sealed file {index} ({upload.filename or 'unnamed'})"
            try:
                envelope = read_envelope(path)
            except SealedFileError as unusable:
                raise HTTPException(422, f"{label} is not usable: {unusable}") from None
            if envelope.header.app_id != study.app_id or envelope.header.compose_hash.hex() != h:
                raise HTTPException(422, f"{label} is sealed for another recipe (compose hash "
                                         f"{envelope.header.compose_hash.hex()}), not for {h}")
            paths.append(path)
            inputs.append(RunInput(file=upload.filename or path.name, bytes=path.stat().st_size,
                                   owner=to_checksum_address(envelope.header.owner),
                                   ciphertext_sha256=envelope.ciphertext_sha256.hex()))
        if sorted(i.owner for i in inputs) != sorted(i.owner for i in manifest.inputs):
            raise HTTPException(422, "the sealed files must be one per input owner of the manifest: got owners "
                                     f"{sorted(i.owner for i in inputs)}, the manifest lists "
                                     f"{sorted(i.owner for i in manifest.inputs)}")
        return paths, inputs

    @app.post("/composes/{compose_hash_hex}/runs", response_model=RunView, status_code=202)
    def start_run(compose_hash_hex: str, response: Response, sealed: list[UploadFile] = File(...),
                  who: str = Depends(analyst)) -> RunView:
        """Start a run of an allowed compose on the uploaded sealed files (one per manifest input)."""
        h = _hash_param(compose_hash_hex)
        manifest = manifest_from_app_compose(stored_compose(h))
        if len(sealed) != len(manifest.inputs):
            raise HTTPException(422, f"the manifest lists {len(manifest.inputs)} inputs; upload one sealed file "
                                     f"for each, got {len(sealed)}")
        # The TCB status belongs to the CVM and is judged by the KMS at release; here only the recipe is asked about.
        boot_info = (study.address, bytes.fromhex(h), _ZERO20, _ZERO32, _ZERO32, _ZERO32, _ZERO32, "UpToDate", [])
        allowed, reason = _chain_call(lambda: study.is_app_allowed(boot_info))
        if not allowed:
            raise HTTPException(409, f"the DstackApp contract does not allow compose {h}: {reason}; "
                                     "the run was not started")
        run_id = secrets.token_hex(8)
        run_dir = runs_dir / run_id
        try:
            paths, inputs = store_inputs(run_dir / "inputs", sealed, h, manifest)
        except HTTPException:
            shutil.rmtree(run_dir)
            raise
        run = _Run(run_id=run_id, compose_hash=h, analyst=who, run_dir=run_dir, sealed=paths, inputs=inputs)
        response.headers["Location"] = f"/runs/{run_id}"
        return runs.submit(run, composes_dir / f"{h}.json")

    def owned_run(run_id: str, who: str) -> _Run:
        run = runs.get(run_id) if _RUN_ID_RE.fullmatch(run_id) else None
        if run is None or run.analyst != who:
            raise HTTPException(404, f"no run {run_id} started by {who}")
        return run

    @app.get("/runs/{run_id}", response_model=RunView)
    def get_run(run_id: str, who: str = Depends(analyst)) -> RunView:
        """The run's state, its progress so far and, when it failed, the reason (a refusal says who refused)."""
        return runs.view(owned_run(run_id, who))

    @app.get("/runs/{run_id}/result", response_class=Response, responses={200: {"content": {"application/json": {}}}})
    def get_result(run_id: str, who: str = Depends(analyst)) -> Response:
        """attestation.json verbatim: the Sign-RPC envelope with the DP result and everything to verify it."""
        run = owned_run(run_id, who)
        if run.state != "done" or run.result_path is None:
            why = f" ({run.reason})" if run.reason else ""
            raise HTTPException(409, f"run {run_id} is {run.state}{why}; a result exists only once it is done")
        return Response(run.result_path.read_bytes(), media_type="application/json",
                        headers={"X-Sealroom-Simulated": "true" if config.backend.simulated else "false"})

    return app


# --- `python -m compose.api` -----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compose.api", description="Serve the analysts' REST API for "
                                     "the local stack (runs on SIMULATED TDX).")
    parser.add_argument("--stack-state-dir", type=Path, required=True, help="the local stack's state folder")
    parser.add_argument("--state-dir", type=Path, help="the API's own folder (default: STACK_STATE_DIR/api)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--proposer-keystore", type=Path, required=True,
                        help="keystore of the funded account that proposes composes; its password in "
                             f"${PROPOSER_PASSWORD_ENV}")
    args = parser.parse_args(argv)
    stack_dir = args.stack_state_dir.resolve()
    state_dir = (args.state_dir or stack_dir / "api").resolve()
    # Taken out of the environment so that no child (a study run) inherits it.
    password = os.environ.pop(PROPOSER_PASSWORD_ENV, None)
    if password is None:
        print(f"error: set {PROPOSER_PASSWORD_ENV} to the proposer keystore's password", file=sys.stderr)
        return 2
    try:
        stack = StackDescription.load(stack_dir)
        proposer = read_keystore(args.proposer_keystore, password)
    except (StackError, OSError, ValueError) as unusable:
        print(f"error: {unusable}", file=sys.stderr)
        return 2
    backend = LocalProcessBackend(app_id=stack.dstack_app, kms_url=stack.services["kms"]["url"],
                                  rpc_url=stack.rpc_url, dstack_kms=stack.dstack_kms,
                                  simulated_tdx_dir=stack_dir / "simulated-tdx", bwrap=shutil.which("bwrap"),
                                  hidden=[stack_dir, state_dir])
    if not backend.isolation.isolated:
        print(f"warning: study runs are {backend.isolation.description}", file=sys.stderr, flush=True)
    try:
        chain = Chain(stack.rpc_url)
    except ChainError as down:
        print(f"error: {down}", file=sys.stderr)
        return 2
    with chain:
        config = ApiConfig(state_dir=state_dir, public_url=f"http://{args.host}:{args.port}",
                           study=DstackApp(chain, stack.dstack_app), proposer=proposer, backend=backend)
        uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
