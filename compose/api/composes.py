"""Routes for study composes: submit one (built, stored and proposed on-chain), read its approval state, and
serve its measured bytes to the owners who review it."""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import APIRouter, HTTPException, Response

from compose.api.deps import (
    Analyst,
    ApiState,
    State,
    chain_call,
    hash_param,
    stored_compose,
)
from compose.api.schemas import (
    Approval,
    ComposeSubmission,
    ComposeView,
    Proposal,
    SubmittedCompose,
)
from compose.app_compose import build_app_compose, compose_hash, normalized_json_bytes
from compose.manifest import ManifestInvalid, validate_manifest
from compose.safe_parse import TooDeeplyNested

__all__ = ["compose_view", "get_app_compose", "get_compose", "list_composes", "router", "submit_compose"]

router = APIRouter(tags=["composes"])

_HASH_FILE = re.compile(r"[0-9a-f]{64}\.json")


def compose_view(state: ApiState, h: str) -> dict[str, Any]:
    """The compose's approval state and the study's privacy budget, read from the DstackApp contract now."""
    status = chain_call(lambda: state.study.status(bytes.fromhex(h)))
    budget = chain_call(state.study.budget)
    approval_state = ("revoked" if status.revoked else "allowed" if status.allowed else
                      "pending" if status.proposed else "not proposed")
    approval = Approval(state=approval_state, approvals=status.approvals, threshold=status.threshold,
                        owners=list(status.owners), approvers=list(status.approvers), uri=status.uri,
                        **budget.to_json())
    try:
        name = json.loads(stored_compose(state, h)).get("name")
    except (HTTPException, ValueError, AttributeError):
        name = None
    return {"compose_hash": h, "app_id": state.study.address, "approval": approval,
            "app_compose_url": state.app_compose_url(h), "name": name}


@router.post("/composes", response_model=SubmittedCompose, status_code=201)
def submit_compose(submission: ComposeSubmission, state: State, _analyst: Analyst) -> dict[str, Any]:
    """Build app-compose.json (the manifest inside the measured YAML), store it and propose its hash on-chain.
    A manifest its analysis could never run (an unknown setting, a wrong type, a bound out of range) is refused
    here, before anything is proposed, so that no owner approves and no budget is spent on it; so is a compose
    whose services do not name an allowed study image by its digest (a tag, the all-zero placeholder, another
    repository, a digest that is not a known build: 422 with the reason)."""
    try:
        validate_manifest(submission.manifest)
    except ManifestInvalid as bad:
        raise HTTPException(422, str(bad)) from None
    try:
        app_compose = build_app_compose(submission.name, submission.docker_compose, submission.manifest,
                                        study_service=submission.study_service)
    except TooDeeplyNested as deep:
        raise HTTPException(400, f"docker_compose: {deep}") from None
    except ValueError as bad:
        raise HTTPException(422, str(bad)) from None
    refused = state.images.refusal(app_compose, echo=False)
    if refused is not None:
        raise HTTPException(422, f"docker_compose: the study image is refused: {refused}")
    body = normalized_json_bytes(app_compose)
    h = compose_hash(body).hex()
    (state.composes_dir / f"{h}.json").write_bytes(body)
    uri = state.app_compose_url(h)
    with state.propose_lock:
        receipt = chain_call(lambda: state.study.propose(bytes.fromhex(h), uri, state.proposer))
    proposal = Proposal(tx="0x" + receipt["transactionHash"].hex().removeprefix("0x"),
                        block=receipt["blockNumber"], proposer=state.proposer.address, uri=uri)
    return {**compose_view(state, h), "app_compose": body.decode("utf-8"), "proposal": proposal}


@router.get("/composes", response_model=list[ComposeView])
def list_composes(state: State, _analyst: Analyst) -> list[dict[str, Any]]:
    """Every compose submitted to this API, newest first, with its approval state as the chain has it now."""
    stored = sorted(state.composes_dir.glob("*.json"), key=lambda path: path.stat().st_mtime, reverse=True)
    return [compose_view(state, path.stem) for path in stored if _HASH_FILE.fullmatch(path.name)]


@router.get("/composes/{compose_hash_hex}", response_model=ComposeView)
def get_compose(compose_hash_hex: str, state: State, _analyst: Analyst) -> dict[str, Any]:
    """The compose's approval state and the study's privacy budget, as the DstackApp contract has them now."""
    h = hash_param(compose_hash_hex)
    stored_compose(state, h)
    return compose_view(state, h)


@router.get("/composes/{compose_hash_hex}/app-compose.json", response_class=Response,
            responses={200: {"content": {"application/json": {}}}})
def get_app_compose(compose_hash_hex: str, state: State) -> Response:
    """app-compose.json exactly as measured (public: owners review it before approving)."""
    return Response(stored_compose(state, hash_param(compose_hash_hex)), media_type="application/json")
