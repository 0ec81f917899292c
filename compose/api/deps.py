"""What the API's routes share: the per-app state, and the FastAPI dependencies that read it (the analyst behind
a request, a checked compose hash, a stored compose) or turn chain outcomes into HTTP answers."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from eth_account.signers.local import LocalAccount
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from compose.api.queue import RunQueue
from compose.auth import AnalystTokens, Unauthenticated
from compose.image.policy import ImageAllowlist
from contracts.chain import ChainError, ChainUnreachable, ContractReverted, DstackApp

__all__ = ["Analyst", "ApiState", "State", "analyst", "api_state", "chain_call", "hash_param", "stored_compose"]

_HASH_RE = re.compile(r"[0-9a-f]{64}")


@dataclass
class ApiState:
    """One app's shared state, made by ``create_app`` and kept on ``app.state.api``."""

    study: DstackApp
    proposer: LocalAccount
    public_url: str
    composes_dir: Path
    runs_dir: Path
    tokens: AnalystTokens
    runs: RunQueue
    propose_lock: threading.Lock     # one proposer account: keep its nonces in order
    images: ImageAllowlist           # the study image digests a compose's services may name

    def app_compose_url(self, compose_hash_hex: str) -> str:
        return f"{self.public_url}/composes/{compose_hash_hex}/app-compose.json"


def api_state(request: Request) -> ApiState:
    return request.app.state.api


State = Annotated[ApiState, Depends(api_state)]

bearer = HTTPBearer(auto_error=False, description="an analyst's API token")


def analyst(request: Request, state: State,
            _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
    """The analyst whose token the request carries; 401 for anyone else."""
    try:
        return state.tokens.authenticate(request.headers.get("authorization"))
    except Unauthenticated as refused:
        raise HTTPException(401, refused.reason, headers={"WWW-Authenticate": "Bearer"}) from None


Analyst = Annotated[str, Depends(analyst)]


def hash_param(compose_hash_hex: str) -> str:
    if not _HASH_RE.fullmatch(compose_hash_hex):
        raise HTTPException(422, "a compose hash is 64 lowercase hex digits (no 0x)")
    return compose_hash_hex


def stored_compose(state: ApiState, compose_hash_hex: str) -> bytes:
    """The app-compose.json bytes submitted under this hash; 404 when none was."""
    path = state.composes_dir / f"{compose_hash_hex}.json"
    if not path.exists():
        raise HTTPException(404, f"no compose {compose_hash_hex} was submitted to this API")
    return path.read_bytes()


def chain_call(call: Callable[[], Any]) -> Any:
    """Run a chain call; the chain's refusals become 409 with its reason, an unreachable chain 503."""
    try:
        return call()
    except ChainUnreachable as down:
        raise HTTPException(503, str(down)) from None
    except ContractReverted as refused:
        raise HTTPException(409, str(refused)) from None
    except ChainError as failure:
        raise HTTPException(503, f"chain error: {failure}") from None
