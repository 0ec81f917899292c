"""The KMS over HTTP: dstack-style pRPC routes (`POST /prpc/<Method>`, JSON) in front of `KeyManagementService`.

Run it with `python -m kms --state-dir DIR --rpc-url URL --dstack-kms ADDR [--dev --simulated-root CERT]`.
The root passphrase comes from SEALROOM_KMS_PASSPHRASE; the signer keystore password (for budget spends)
from SEALROOM_KMS_SIGNER_PASSWORD. Neither is ever logged.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from compose.http_limits import KIB, MIB, BodyLimit, guard
from kms.service import KeyManagementService, Refused, Unavailable
from kms_client import wire

# Request bodies: an attestation carries a quote (~10 KB of hex), its event log, DCAP collateral (~20 KB) and
# app-compose.json; the other methods take a few addresses at most. Over the cap: 413; nested deeper than
# compose.safe_parse.MAX_NESTING: 400. Both answered as a `bad_request` refusal, before any JSON is decoded.
ATTESTED_BODY_BYTES = 1 * MIB
SMALL_BODY_BYTES = 16 * KIB
_ATTESTED_METHODS = frozenset({"/prpc/GetAppKey", "/prpc/ReleaseOwnerKeys", "/prpc/RecordRoundSpend"})


def _body_limit(_method: str, path: str) -> BodyLimit:
    return BodyLimit(ATTESTED_BODY_BYTES if path in _ATTESTED_METHODS else SMALL_BODY_BYTES)


def _bad_request(_status: int, message: str) -> dict[str, Any]:
    return wire.Refusal(error=message, reason="bad_request").model_dump()


def create_app(service: KeyManagementService) -> FastAPI:
    app = FastAPI(title="Sealroom KMS", version="1",
                  description="Releases keys only to attested CVMs whose recipe the chain allows.")
    guard(app, _body_limit, error_body=_bad_request)

    @app.exception_handler(Refused)
    async def refused(_request: Request, exc: Refused) -> JSONResponse:
        return JSONResponse(status_code=403, content=wire.Refusal(error=str(exc), reason=exc.code).model_dump())

    @app.exception_handler(Unavailable)
    async def unavailable(_request: Request, exc: Unavailable) -> JSONResponse:
        # The chain is down (or did not take the spend): nothing was released; the caller sends the same request again.
        return JSONResponse(status_code=503, content=wire.Refusal(error=str(exc), reason=exc.code).model_dump(),
                            headers={"Retry-After": "1"})

    @app.post("/prpc/GetMeta")
    def get_meta() -> wire.Meta:
        return service.meta()

    @app.post("/prpc/GetNonce")
    def get_nonce() -> wire.Nonce:
        return service.issue_nonce()

    @app.post("/prpc/GetOwnerSealKey")
    def get_owner_seal_key(request: wire.OwnerSealKeyRequest) -> wire.OwnerSealKey:
        return service.owner_seal_key(request)

    @app.post("/prpc/GetAppEnvEncryptPubKey")
    def get_app_env_encrypt_pub_key(request: wire.AppIdRequest) -> wire.EnvEncryptPubKey:
        return service.env_encrypt_pubkey(request)

    @app.post("/prpc/GetAppKey")
    def get_app_key(attestation: wire.Attestation) -> wire.AppKeyResponse:
        return service.get_app_key(attestation)

    @app.post("/prpc/ReleaseOwnerKeys")
    def release_owner_keys(request: wire.OwnerKeysRequest) -> wire.OwnerKeysResponse:
        return service.release_owner_keys(request)

    @app.post("/prpc/RecordRoundSpend")
    def record_round_spend(request: wire.RoundSpendRequest) -> wire.RoundSpendResponse:
        return service.record_round_spend(request)

    return app
