"""Routes for runs: start one on an allowed compose with the owners' sealed files, follow it, fetch its result."""

from __future__ import annotations

import re
import secrets
import shutil
from pathlib import Path

from eth_utils import to_checksum_address
from fastapi import APIRouter, HTTPException, Request, Response
from starlette.concurrency import run_in_threadpool

from compose.api.deps import (
    Analyst,
    ApiState,
    State,
    chain_call,
    hash_param,
    stored_compose,
)
from compose.api.queue import Run
from compose.api.schemas import RunInput, RunView
from compose.api.uploads import (
    UPLOAD_OPENAPI,
    TooManyFiles,
    Upload,
    receive_sealed_files,
)
from compose.app_compose import manifest_from_app_compose
from compose.manifest import ManifestRefused, StudyManifest, check_inputs_against_manifest
from cvm.sealed.dataset import SealedFileError, verify_payload

__all__ = ["check_inputs", "get_result", "get_run", "list_runs", "owned_run", "router", "start_run"]

router = APIRouter(tags=["runs"])

_RUN_ID_RE = re.compile(r"[0-9a-f]{16}")
_ZERO20, _ZERO32 = b"\0" * 20, b"\0" * 32


def _wrong_count(expected: int, got: str) -> HTTPException:
    return HTTPException(422, f"the manifest lists {expected} inputs; upload one sealed file for each, got {got}")


def check_inputs(state: ApiState, uploads: list[Upload], h: str,
                 manifest: StudyManifest) -> tuple[list[Path], list[RunInput]]:
    """Refuse, before any CVM boots, files that could never open or never run: not a sealed file, a bad owner
    signature, a damaged payload, sealed for another recipe, not one file per manifest owner, or columns and row
    counts that do not fit the manifest. (The CVM checks all of this again; this only
    saves a doomed run.)"""
    paths, inputs, envelopes = [], [], []
    for index, upload in enumerate(uploads):
        label = f"sealed file {index} ({upload.filename or 'unnamed'})"
        try:
            envelope = verify_payload(upload.path)   # the signature, and the ciphertext against its signed digest
        except SealedFileError as unusable:
            raise HTTPException(422, f"{label} is not usable: {unusable}") from None
        if envelope.header.app_id != state.study.app_id or envelope.header.compose_hash.hex() != h:
            raise HTTPException(422, f"{label} is sealed for another recipe (compose hash "
                                     f"{envelope.header.compose_hash.hex()}), not for {h}")
        paths.append(upload.path)
        envelopes.append(envelope)
        inputs.append(RunInput(file=upload.filename or upload.path.name, bytes=upload.path.stat().st_size,
                               owner=to_checksum_address(envelope.header.owner),
                               ciphertext_sha256=envelope.ciphertext_sha256.hex()))
    if sorted(i.owner for i in inputs) != sorted(i.owner for i in manifest.inputs):
        raise HTTPException(422, "the sealed files must be one per input owner of the manifest: got owners "
                                 f"{sorted(i.owner for i in inputs)}, the manifest lists "
                                 f"{sorted(i.owner for i in manifest.inputs)}")
    try:
        check_inputs_against_manifest(manifest, envelopes)
    except ManifestRefused as bad:
        raise HTTPException(422, f"the sealed files cannot run compose {h}: {bad}") from None
    return paths, inputs


def _allowed(state: ApiState, h: str) -> None:
    # The TCB status belongs to the CVM and is judged by the KMS at release; here only the recipe is asked about.
    boot_info = (state.study.address, bytes.fromhex(h), _ZERO20, _ZERO32, _ZERO32, _ZERO32, _ZERO32, "UpToDate", [])
    allowed, reason = chain_call(lambda: state.study.is_app_allowed(boot_info))
    if not allowed:
        raise HTTPException(409, f"the DstackApp contract does not allow compose {h}: {reason}; "
                                 "the run was not started")


@router.post("/composes/{compose_hash_hex}/runs", response_model=RunView, status_code=202,
             openapi_extra=UPLOAD_OPENAPI)
async def start_run(compose_hash_hex: str, request: Request, response: Response, state: State,
                    who: Analyst) -> RunView:
    """Start a run of an allowed compose on the uploaded sealed files (multipart, one ``sealed`` part per
    manifest input). The files are streamed to the run's folder as they arrive, under the API's upload cap."""
    h = hash_param(compose_hash_hex)
    manifest = await run_in_threadpool(lambda: manifest_from_app_compose(stored_compose(state, h)))
    expected = len(manifest.inputs)
    run_id = secrets.token_hex(8)
    run_dir = state.runs_dir / run_id
    try:
        try:
            uploads = await receive_sealed_files(request, run_dir / "inputs", max_files=expected)
        except TooManyFiles:
            raise _wrong_count(expected, f"more than {expected}") from None
        if len(uploads) != expected:
            raise _wrong_count(expected, str(len(uploads)))
        await run_in_threadpool(_allowed, state, h)
        paths, inputs = await run_in_threadpool(check_inputs, state, uploads, h, manifest)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    run = Run(run_id=run_id, compose_hash=h, analyst=who, run_dir=run_dir, sealed=paths, inputs=inputs,
              epochs=_epochs(manifest))
    response.headers["Location"] = f"/runs/{run_id}"
    return state.runs.submit(run, state.composes_dir / f"{h}.json")


def _epochs(manifest: StudyManifest) -> int | None:
    """A DP-SGD run's epochs, for its progress (the manifest was validated when it was submitted)."""
    if manifest.analysis.kind != "dp_sgd":
        return None
    from cvm.analyses.params import TrainingParams

    try:
        return TrainingParams.parse(manifest.analysis.params, "analysis.params").epochs
    except ValueError:
        return None


def owned_run(state: ApiState, run_id: str, who: str) -> Run:
    """The run, when ``who`` started it; 404 otherwise (another analyst's run is not found either)."""
    run = state.runs.get(run_id) if _RUN_ID_RE.fullmatch(run_id) else None
    if run is None or run.analyst != who:
        raise HTTPException(404, f"no run {run_id} started by {who}")
    return run


@router.get("/runs", response_model=list[RunView])
def list_runs(state: State, who: Analyst) -> list[RunView]:
    """The runs this analyst started (since the API last started), newest first."""
    return [state.runs.view(run) for run in state.runs.of(who)]


@router.get("/runs/{run_id}", response_model=RunView)
def get_run(run_id: str, state: State, who: Analyst) -> RunView:
    """The run's state, its progress so far and, when it failed, the reason (a refusal says who refused)."""
    return state.runs.view(owned_run(state, run_id, who))


@router.get("/runs/{run_id}/result", response_class=Response, responses={200: {"content": {"application/json": {}}}})
def get_result(run_id: str, state: State, who: Analyst) -> Response:
    """attestation.json verbatim: the Sign-RPC envelope with the DP result and everything to verify it."""
    run = owned_run(state, run_id, who)
    if run.state != "done" or run.result_path is None:
        why = f" ({run.reason})" if run.reason else ""
        raise HTTPException(409, f"run {run_id} is {run.state}{why}; a result exists only once it is done")
    return Response(run.result_path.read_bytes(), media_type="application/json",
                    headers={"X-Sealroom-Simulated": "true" if state.runs.backend.simulated else "false"})
