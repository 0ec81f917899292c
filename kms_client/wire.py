"""Wire schemas of the KMS API, shared by the service (`kms`) and its client (`kms_client`).

pRPC-style like dstack's KMS: `POST {kms_url}/prpc/<Method>` with a JSON body; bytes are hex without 0x,
Ethereum addresses are 0x-prefixed. A refusal is HTTP 403 with `Refusal` as the body; a KMS that cannot reach its
chain answers HTTP 503 with a `Refusal` whose reason is ``chain_unavailable`` (send the same request again).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

RefusalCode = Literal[
    "not_approved",        # the chain says the compose hash is not allowed
    "revoked",             # an owner revoked the compose hash
    "unknown_app",         # the app is not registered in DstackKms, or its OS image is not allowed
    "bad_quote",           # the quote, its event log or its report_data did not verify
    "simulated_quote_refused",  # a simulated quote presented to a KMS not in dev mode
    "stale_nonce",         # the nonce is unknown, already used or expired
    "owner_not_consenting",  # a requested owner did not approve this compose hash
    "budget_exhausted",    # the study's privacy budget cannot cover the request
    "chain_unavailable",   # HTTP 503: the chain is unreachable (or did not take the spend); retry the same request
    "bad_request",
]


class Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Refusal(Wire):
    error: str
    reason: RefusalCode


class Meta(Wire):
    k256_pubkey: str              # KMS root, SEC1-compressed, hex
    root_address: str             # its Ethereum address, what auditors pin
    chain_id: int
    kms_contract_address: str
    is_dev: bool                  # dev mode accepts SIMULATED quotes; everything downstream says so
    simulated_tdx_root_sha256: str | None = None
    app_auth_implementation: str = "DstackApp k-of-n multi-sig"


class Nonce(Wire):
    nonce: str
    expires_at: int


class Attestation(Wire):
    """A fresh quote whose report_data = sha512(label ‖ nonce ‖ ephemeral_pub), and its event log."""

    quote: str
    event_log: str                # dstack's event log, as the JSON string the guest agent returns
    nonce: str
    ephemeral_pubkey: str         # X25519, raw 32 bytes hex
    collateral: str | None = None  # DCAP collateral JSON for a real quote (Intel-signed, so any transport will do)


class SealedBox(Wire):
    kms_ephemeral_pub: str
    iv: str
    ciphertext: str


class AppKeyResponse(Wire):
    """`box` opens to JSON {"k256_key": hex, "k256_signature": hex}."""

    box: SealedBox
    simulated: bool


class OwnerSealKeyRequest(Wire):
    app_id: str
    compose_hash: str
    owner: str


class OwnerSealKey(Wire):
    """The owner's X25519 sealing public key, signed by the KMS root over a timestamped, labelled message."""

    app_id: str
    compose_hash: str
    owner: str
    public_key: str
    timestamp: int
    signature: str


class OwnerKeysRequest(Wire):
    """The owners and the ε come from the study manifest inside `app_compose` (verbatim bytes, UTF-8), which
    must hash to the compose hash the quote's event log proves; nothing in the request body is trusted."""

    attestation: Attestation
    app_compose: str


class OwnerKeysResponse(Wire):
    """`box` opens to JSON {owner address: X25519 private key hex}; the release is recorded on-chain first."""

    box: SealedBox
    release_id: str
    release_tx: str
    epsilon_spent: float
    epsilon_remaining: float
    simulated: bool


class RoundSpendRequest(Wire):
    """A federated round's ε, claimed by the attested aggregator and capped by its measured round contract."""

    attestation: Attestation
    app_compose: str
    epsilon: float


class RoundSpendResponse(Wire):
    release_id: str
    release_tx: str
    epsilon_spent: float
    epsilon_remaining: float
    simulated: bool


class AppIdRequest(Wire):
    """dstack's ``AppId``: the app id as hex (``0x`` optional), e.g. ``{"app_id": "5fbd…"}``."""

    app_id: str


class EnvEncryptPubKey(Wire):
    """dstack's ``PublicKeyResponse`` for GetAppEnvEncryptPubKey: the app's X25519 env-encrypt public key, the root's
    timestamped ``signature_v1`` (kms_client.messages.env_encrypt_pubkey_digest) and dstack's legacy ``signature``."""

    public_key: str
    signature: str
    timestamp: int
    signature_v1: str
