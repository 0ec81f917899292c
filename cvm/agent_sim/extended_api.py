"""The rest of dstack's guest API that apps use, for the SIMULATED agent: ``GetTlsKey`` and ``Attest`` on the
DstackGuest service, and the legacy Tappd service (``DeriveKey``, ``DeriveK256Key``, ``TdxQuote``, ``RawQuote``;
``Info`` is shared) that dstack 0.5.x still serves on its own socket (dstack-sdk's ``TappdClient``, path prefix
``/prpc/Tappd.``). :mod:`cvm.agent_sim.server` puts these handlers on HTTP.

Wire shapes are dstack's (``guest-agent/rpc/proto/agent_rpc.proto``; docs/design.md, "dstack formats: Guest agent"):

- ``GetTlsKey{subject, alt_names, usage_ra_tls, usage_server_auth, usage_client_auth, not_before?, not_after?,
  with_app_info}`` → ``{key: PKCS#8 PEM, certificate_chain: [leaf PEM, app CA PEM]}``: a fresh P-256 key and its
  certificate (:mod:`cvm.agent_sim.ratls`). ``with_app_info`` (dstack 0.5.7's app-info extension) is refused.
- ``Attest{report_data ≤ 64}`` → ``{attestation: hex}``: ``VersionedAttestation::V0``
  (:mod:`cvm.attest.versioned_attestation`) over a fresh quote with that report_data, zero-padded.
- Tappd ``DeriveKey{path, subject, alt_names, usage_*, random_seed}`` → GetTlsKey's shape, the key derived from the
  app key with ``[path]`` unless ``random_seed``; ``DeriveK256Key`` = GetKey as ``{k256_key,
  k256_signature_chain}``; ``TdxQuote{report_data, hash_algorithm, prefix}`` → ``{quote, event_log,
  hash_algorithm, prefix}`` with ``report_data = hash(prefix or "app-data" ‖ ":" ‖ data)`` (``raw``: the 64 bytes
  as given); ``RawQuote{report_data}`` = TdxQuote with ``raw``.

Unlike dstack's simulator, which leaves the quote out of RA-TLS certificates, every quote here is a real-layout
SIMULATED quote that :func:`cvm.attest.verify.verify_attestation` verifies when simulation is allowed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Annotated, Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import BaseModel, ConfigDict, Field, field_validator

from cvm.agent_sim import ratls
from cvm.agent_sim.agent import AppKeyNotReady, GuestAgentSimulator
from cvm.agent_sim.schemas import GetQuoteRequest, HexBytes
from cvm.attest import versioned_attestation
from cvm.attest.eventlog import parse_event_log

__all__ = ["DemoCert", "guest_methods", "issue_tls_key", "tappd_methods"]

Handler = Callable[[Any], BaseModel]
Methods = Mapping[str, tuple[type[BaseModel] | None, Handler]]
_APP_DATA_TAG = "app-data"
_Seconds = Annotated[int, Field(ge=0, lt=2**64)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    @field_validator("*")
    @classmethod
    def _encodable(cls, value: Any) -> Any:
        # JSON can carry lone surrogates (\ud800) that no UTF-8 field can hold: refuse them without echoing them.
        for text in (value if isinstance(value, list) else [value]):
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError("text that is not valid Unicode") from None
        return value


class GetTlsKeyRequest(_Request):
    subject: str = ""
    alt_names: list[str] = []
    usage_ra_tls: bool = False
    usage_server_auth: bool = False
    usage_client_auth: bool = False
    not_before: _Seconds | None = None
    not_after: _Seconds | None = None
    with_app_info: bool = False


class DeriveKeyRequest(_Request):
    path: str = ""
    subject: str = ""
    alt_names: list[str] = []
    usage_ra_tls: bool = False
    usage_server_auth: bool = False
    usage_client_auth: bool = False
    random_seed: bool = False


class DeriveK256KeyRequest(_Request):
    path: str = ""
    purpose: str = ""
    algorithm: str = "secp256k1"


class TdxQuoteRequest(_Request):
    report_data: HexBytes = b""
    hash_algorithm: str = ""
    prefix: str = ""


class _Response(BaseModel):
    simulated: bool = True


class GetTlsKeyResponse(_Response):
    key: str
    certificate_chain: list[str]


class AttestResponse(_Response):
    attestation: str


class DeriveK256KeyResponse(_Response):
    k256_key: str
    k256_signature_chain: list[str]


class TdxQuoteResponse(_Response):
    quote: str
    event_log: str
    hash_algorithm: str
    prefix: str


def issue_tls_key(agent: GuestAgentSimulator, key: ec.EllipticCurvePrivateKey,
                  config: ratls.CertConfig) -> GetTlsKeyResponse:
    """``key`` with its certificate from the app CA; with ``config.ext_quote``, a fresh quote whose report_data is
    ``sha512("ratls-cert:" ‖ the key's SubjectPublicKeyInfo)`` and the event log go into the certificate."""
    ca = agent.app_ca()
    quote = event_log = None
    if config.ext_quote:
        quote, log = agent.attest(ratls.ratls_report_data(ratls.spki_der(key.public_key())))
        event_log = log.encode("utf-8")
    leaf = ratls.issue_leaf(ca, key.public_key(), config, app_id=agent.app_id, quote=quote, event_log=event_log)
    return GetTlsKeyResponse(key=ratls.private_key_pem(key),
                             certificate_chain=[leaf.public_bytes(serialization.Encoding.PEM).decode("ascii"), ca.pem])


class DemoCert:
    """Info's ``app_cert``: dstack's demo certificate (subject ``demo-cert``, client auth, RA-TLS), issued once, on
    first use, as the chain's PEM joined by newlines; empty while the app key is not there yet."""

    def __init__(self, agent: GuestAgentSimulator) -> None:
        self._agent = agent
        self._pem: str | None = None
        self._lock = threading.Lock()

    def pem(self) -> str:
        with self._lock:
            if self._pem is None:
                config = ratls.CertConfig(subject="demo-cert", usage_client_auth=True, ext_quote=True)
                try:
                    issued = issue_tls_key(self._agent, ec.generate_private_key(ec.SECP256R1()), config)
                except AppKeyNotReady:
                    return ""
                self._pem = "\n".join(issued.certificate_chain)
            return self._pem


def guest_methods(agent: GuestAgentSimulator, vm_config: Callable[[], str]) -> Methods:
    """GetTlsKey and Attest, for the DstackGuest service."""

    def get_tls_key(request: GetTlsKeyRequest) -> BaseModel:
        if request.with_app_info:
            raise ValueError("with_app_info (dstack 0.5.7's app-info certificate extension) is not supported by the "
                             "SIMULATED agent")
        config = ratls.CertConfig(
            subject=request.subject, alt_names=tuple(request.alt_names), usage_server_auth=request.usage_server_auth,
            usage_client_auth=request.usage_client_auth, ext_quote=request.usage_ra_tls,
            not_before=request.not_before, not_after=request.not_after,
        )
        return issue_tls_key(agent, ec.generate_private_key(ec.SECP256R1()), config)

    def attest(request: GetQuoteRequest) -> BaseModel:
        if len(request.report_data) > 64:
            raise ValueError(f"report_data is at most 64 bytes, got {len(request.report_data)}")
        report_data = request.report_data.ljust(64, b"\0")
        quote, event_log = agent.attest(report_data)
        attestation = versioned_attestation.VersionedAttestationV0(
            quote=quote, event_log=tuple(parse_event_log(event_log)), report_data=report_data, config=vm_config())
        return AttestResponse(attestation=versioned_attestation.encode(attestation).hex())

    return {"GetTlsKey": (GetTlsKeyRequest, get_tls_key), "Attest": (GetQuoteRequest, attest)}


def tappd_methods(agent: GuestAgentSimulator) -> Methods:
    """The legacy Tappd service's own methods (its Info is DstackGuest's)."""

    def derive_key(request: DeriveKeyRequest) -> BaseModel:
        key = ec.generate_private_key(ec.SECP256R1()) if request.random_seed else agent.path_tls_key(request.path)
        config = ratls.CertConfig(
            subject=request.subject, alt_names=tuple(request.alt_names), usage_server_auth=request.usage_server_auth,
            usage_client_auth=request.usage_client_auth, ext_quote=request.usage_ra_tls,
        )
        return issue_tls_key(agent, key, config)

    def derive_k256_key(request: DeriveK256KeyRequest) -> BaseModel:
        derived = agent.get_key(request.path, request.purpose, request.algorithm)
        return DeriveK256KeyResponse(k256_key=derived.key.hex(),
                                     k256_signature_chain=[s.hex() for s in derived.signature_chain])

    def quote(report_data: bytes, hash_algorithm: str, prefix: str) -> TdxQuoteResponse:
        algorithm = hash_algorithm or ratls.DEFAULT_HASH_ALGORITHM
        tag = prefix or _APP_DATA_TAG
        quoted, event_log = agent.attest(ratls.quote_content_report_data(tag, report_data, algorithm))
        return TdxQuoteResponse(quote=quoted.hex(), event_log=event_log, hash_algorithm=algorithm,
                                prefix="" if algorithm == "raw" else tag)

    def tdx_quote(request: TdxQuoteRequest) -> BaseModel:
        return quote(request.report_data, request.hash_algorithm, request.prefix)

    def raw_quote(request: GetQuoteRequest) -> BaseModel:
        return quote(request.report_data, "raw", "")

    return {
        "DeriveKey": (DeriveKeyRequest, derive_key),
        "DeriveK256Key": (DeriveK256KeyRequest, derive_k256_key),
        "TdxQuote": (TdxQuoteRequest, tdx_quote),
        "RawQuote": (GetQuoteRequest, raw_quote),
    }
