"""The KMS over HTTP: dstack-style pRPC routes (`POST /prpc/<Method>`, JSON) in front of `KeyManagementService`.

Run it with `python -m kms --state-dir DIR --rpc-url URL --dstack-kms ADDR [--dev --simulated-root CERT]`.
The root passphrase comes from SEALROOM_KMS_PASSPHRASE; the signer keystore password (for budget spends)
from SEALROOM_KMS_SIGNER_PASSWORD. Neither is ever logged.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from kms.service import KeyManagementService, Refused
from kms_client import wire


def create_app(service: KeyManagementService) -> FastAPI:
    app = FastAPI(title="Sealroom KMS", version="1",
                  description="Releases keys only to attested CVMs whose recipe the chain allows.")

    @app.exception_handler(Refused)
    async def refused(_request: Request, exc: Refused) -> JSONResponse:
        return JSONResponse(status_code=403, content=wire.Refusal(error=str(exc), reason=exc.code).model_dump())

    @app.post("/prpc/GetMeta")
    def get_meta() -> wire.Meta:
        return service.meta()

    @app.post("/prpc/GetNonce")
    def get_nonce() -> wire.Nonce:
        return service.issue_nonce()

    @app.post("/prpc/GetOwnerSealKey")
    def get_owner_seal_key(request: wire.OwnerSealKeyRequest) -> wire.OwnerSealKey:
        return service.owner_seal_key(request)

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
