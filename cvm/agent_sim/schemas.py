"""Wire schemas of dstack's guest-agent API (``guest-agent/rpc/proto/agent_rpc.proto``), as dstack-sdk 0.5.4
sends and parses them: JSON (or GET query strings), bytes as hex without ``0x``, ``event_log`` and
``tcb_info`` as JSON strings. Responses add ``"simulated": true`` wherever the SDK ignores extra fields.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict


def _from_hex(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise ValueError("expected a hex string")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise ValueError("not a hex string") from None


HexBytes = Annotated[bytes, BeforeValidator(_from_hex)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class GetKeyRequest(_Request):
    path: str = ""
    purpose: str = ""
    algorithm: str = "secp256k1"


class GetQuoteRequest(_Request):
    report_data: HexBytes = b""


class EmitEventRequest(_Request):
    event: str
    payload: HexBytes = b""


class SignRequest(_Request):
    algorithm: str
    data: HexBytes


class VerifyRequest(_Request):
    algorithm: str
    data: HexBytes
    signature: HexBytes
    public_key: HexBytes


class _Response(BaseModel):
    simulated: bool = True


class GetKeyResponse(_Response):
    key: str
    signature_chain: list[str]


class GetQuoteResponse(_Response):
    quote: str
    event_log: str
    report_data: str
    vm_config: str


class InfoResponse(_Response):
    app_id: str
    instance_id: str
    app_cert: str
    tcb_info: str
    app_name: str
    device_id: str
    mr_aggregated: str
    os_image_hash: str
    key_provider_info: str
    compose_hash: str
    vm_config: str
    cloud_vendor: str
    cloud_product: str


class SignResponse(_Response):
    signature: str
    signature_chain: list[str]
    public_key: str


class VerifyResponse(_Response):
    valid: bool


class VersionResponse(BaseModel):
    version: str
    rev: str


class EmptyResponse(_Response):
    """EmitEvent's answer (dstack sends an empty body; the SDK parses JSON, so ``{}``-shaped)."""


class ErrorResponse(BaseModel):
    error: str
