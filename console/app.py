"""The owners' approval console: a FastAPI app serving static pages (plain HTML, vanilla JS, CSS shipped in this
package; no CDN, no build step) and the JSON they read. It reads the study's DstackApp contract and the stored
app-compose.json files, and relays owners' EIP-712 approvals (`approveComposeHashBySig`) from its own funded
account. It never holds an owner's key: owners sign in their own wallet (an EIP-1193 provider), and revoke by
sending the transaction from their own account (the contract has no signature-based revoke)."""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from web3.exceptions import TransactionNotFound

from compose.app_compose import InvalidAppCompose, manifest_from_app_compose
from contracts.chain import (
    EPSILON_SCALE,
    ChainError,
    ContractReverted,
    DstackApp,
)

__all__ = ["CSP", "ConsoleConfig", "create_app"]

STATIC = Path(__file__).parent / "static"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
APPROVAL_TTL_S = 3600
_HASH = re.compile(r"(0x)?[0-9a-fA-F]{64}")


@dataclass
class ConsoleConfig:
    study: DstackApp
    composes_dir: Path                   # where the analysts' API stores app-compose.json as <hash>.json
    owner_names: dict[str, str] = field(default_factory=dict)   # checksummed address -> name
    relayer: LocalAccount | None = None  # funded account that relays signed approvals; None: relay refused
    clock: Any = time.time


class SignedApproval(BaseModel):
    owner: str
    deadline: int
    signature: str


def _hash(value: str) -> str:
    if not _HASH.fullmatch(value):
        raise HTTPException(404, "not a compose hash (64 hex digits)")
    return value.lower().removeprefix("0x")


def _chain(call):
    try:
        return call()
    except ContractReverted as reverted:
        raise HTTPException(409, str(reverted)) from None
    except ChainError as down:
        raise HTTPException(503, f"chain unavailable: {down}") from None


def _images(app_compose: dict) -> list[str]:
    try:
        services = yaml.safe_load(app_compose.get("docker_compose_file", "")).get("services", {})
        return sorted({str(s["image"]) for s in services.values() if isinstance(s, dict) and "image" in s})
    except (yaml.YAMLError, AttributeError, TypeError):
        return []


def create_app(config: ConsoleConfig) -> FastAPI:
    study = config.study
    relay_lock = threading.Lock()
    app = FastAPI(title="Sealroom owners' console", version="1", docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    names = {address.lower(): name for address, name in config.owner_names.items()}

    def name_of(address: str) -> str:
        return names.get(str(address).lower(), "")

    def who(addresses) -> list[dict]:
        return [{"address": to_checksum_address(a), "name": name_of(a)} for a in addresses]

    def stored(h: str) -> bytes | None:
        try:
            return (config.composes_dir / f"{h}.json").read_bytes()
        except OSError:
            return None

    def proposals() -> list[dict]:
        logs = _chain(lambda: study.contract.events.ComposeHashProposed().get_logs(from_block=0, to_block="latest"))
        return [{"compose_hash": bytes(log["args"]["composeHash"]).hex(), "proposer": log["args"]["proposer"],
                 "uri": log["args"]["uri"], "tx": "0x" + log["transactionHash"].hex().removeprefix("0x"),
                 "block": log["blockNumber"]} for log in logs]

    def recipe(h: str, proposal: dict | None = None) -> dict:
        status = _chain(lambda: study.status(bytes.fromhex(h)))
        if not status.proposed:
            raise HTTPException(404, f"compose hash 0x{h} was never proposed to this study")
        budget = _chain(study.budget)
        body = stored(h)
        manifest, images, name, problem = None, [], None, None
        if body is None:
            problem = "app-compose.json is not stored with this console"
        else:
            try:
                parsed = json.loads(body)
                name = parsed.get("name")
                images = _images(parsed)
                manifest = manifest_from_app_compose(body).model_dump(mode="json")
            except (InvalidAppCompose, ValueError, AttributeError) as bad:
                problem = f"not a Sealroom app-compose.json: {bad}"
        approvers = {a.lower() for a in status.approvers}
        input_owners = [i["owner"] for i in manifest["inputs"]] if manifest else []
        criteria = {
            "threshold_met": status.approvals >= status.threshold,
            "inputs_consented": bool(input_owners) and all(o.lower() in approvers for o in input_owners),
            "budget_left": manifest is not None and round(manifest["epsilon"] * EPSILON_SCALE) <= budget.remaining_micro,
            "not_revoked": not status.revoked,
        }
        met = sum(criteria.values())
        state = ("revoked" if status.revoked else "allowed" if status.allowed else
                 "approved" if status.approvals else "proposed")
        if manifest is not None:
            manifest = {**manifest, "inputs": [{**i, "owner_name": name_of(i["owner"]),
                                                "approved": i["owner"].lower() in approvers}
                                               for i in manifest["inputs"]]}
        return {
            "compose_hash": "0x" + h, "name": name, "state": state, "approvals": status.approvals,
            "threshold": status.threshold, "owners": len(status.owners), "approvers": who(status.approvers),
            "allowed": status.allowed, "revoked": status.revoked, "uri": status.uri,
            "criteria": criteria, "verdict": "match" if met == 4 else "miss" if met == 0 else "partial",
            "manifest": manifest, "images": images, "problem": problem, "proposal": proposal,
            "app_compose_url": f"api/recipes/0x{h}/app-compose.json",
        }

    def typed_data(h: str, deadline: int) -> dict:
        typed = study.approval_typed_data(h, deadline)   # the contract binding's, so both sign the same bytes
        return {**typed, "message": {"composeHash": "0x" + h, "deadline": deadline}}   # JSON for the wallet

    # --- pages ------------------------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def overview_page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/recipe", include_in_schema=False)
    def recipe_page() -> FileResponse:
        return FileResponse(STATIC / "recipe.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # --- JSON ---------------------------------------------------------------------------------------------------

    @app.get("/api/consortium")
    def consortium() -> dict:
        owners = _chain(study.owners)
        budget = _chain(study.budget)
        return {"app_id": study.address, "chain_id": study.chain.chain_id, "threshold": _chain(study.threshold),
                "owners": who(owners), "relay": config.relayer is not None, **budget.to_json()}

    @app.get("/api/budget")
    def budget_spends() -> dict:
        budget = _chain(study.budget)
        logs = _chain(lambda: study.contract.events.BudgetSpent().get_logs(from_block=0, to_block="latest"))
        spends = [{"release_id": "0x" + bytes(log["args"]["releaseId"]).hex(),
                   "compose_hash": "0x" + bytes(log["args"]["composeHash"]).hex(),
                   "owners": who(log["args"]["owners"]), "epsilon": log["args"]["epsilon"] / EPSILON_SCALE,
                   "remaining": log["args"]["remaining"] / EPSILON_SCALE,
                   "tx": "0x" + log["transactionHash"].hex().removeprefix("0x"), "block": log["blockNumber"]}
                  for log in logs]
        return {**budget.to_json(), "spends": spends}

    @app.get("/api/recipes")
    def recipes() -> list[dict]:
        seen, out = set(), []
        for proposal in reversed(proposals()):
            if proposal["compose_hash"] not in seen:
                seen.add(proposal["compose_hash"])
                out.append(recipe(proposal["compose_hash"], proposal))
        return out

    @app.get("/api/recipes/{compose_hash}")
    def recipe_detail(compose_hash: str) -> dict:
        h = _hash(compose_hash)
        proposal = next((p for p in proposals() if p["compose_hash"] == h), None)
        return recipe(h, proposal)

    @app.get("/api/recipes/{compose_hash}/app-compose.json", response_class=Response)
    def app_compose(compose_hash: str) -> Response:
        body = stored(_hash(compose_hash))
        if body is None:
            raise HTTPException(404, "app-compose.json is not stored with this console")
        return Response(body, media_type="application/json")

    @app.get("/api/recipes/{compose_hash}/typed-data")
    def approval_typed_data(compose_hash: str) -> dict:
        """The EIP-712 approval an owner signs, valid for an hour from now."""
        return typed_data(_hash(compose_hash), int(config.clock()) + APPROVAL_TTL_S)

    @app.get("/api/recipes/{compose_hash}/revoke-call")
    def revoke_call(compose_hash: str) -> dict:
        """The transaction an owner sends from their own account to revoke (final)."""
        h = _hash(compose_hash)
        data = study.contract.encode_abi("revokeComposeHash", args=[bytes.fromhex(h)])
        return {"to": study.address, "data": data, "chainId": hex(study.chain.chain_id)}

    @app.post("/api/recipes/{compose_hash}/approvals")
    def relay_approval(compose_hash: str, signed: SignedApproval) -> dict:
        """Relay an owner's EIP-712 approval on-chain (`approveComposeHashBySig`) from the console's account."""
        h = _hash(compose_hash)
        if config.relayer is None:
            raise HTTPException(503, "this console has no relayer account; approve with `seal owner approve`")
        try:
            owner = to_checksum_address(signed.owner)
            signature = bytes.fromhex(signed.signature.removeprefix("0x"))
        except ValueError:
            raise HTTPException(422, "owner must be an address and signature hex") from None
        if len(signature) != 65:
            raise HTTPException(422, "signature must be 65 bytes")
        with relay_lock:
            receipt = _chain(lambda: study.approve_signed(bytes.fromhex(h), owner, signed.deadline, signature,
                                                          config.relayer))
        return {"tx": "0x" + receipt["transactionHash"].hex().removeprefix("0x"), "block": receipt["blockNumber"],
                "recipe": recipe(h)}

    @app.get("/api/tx/{tx_hash}")
    def transaction(tx_hash: str) -> dict:
        if not re.fullmatch(r"0x[0-9a-fA-F]{64}", tx_hash):
            raise HTTPException(404, "not a transaction hash")
        try:
            receipt = study.chain.w3.eth.get_transaction_receipt(tx_hash)
        except TransactionNotFound:   # not mined yet (or unknown to the node)
            return {"tx": tx_hash, "mined": False}
        return {"tx": tx_hash, "mined": True, "success": receipt["status"] == 1, "block": receipt["blockNumber"]}

    return app
