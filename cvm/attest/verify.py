"""One verifier for real and SIMULATED TDX quotes, and for the boot they attest (DESIGN.md §5).

- Real quotes (chain ending at Intel's SGX Root CA, pinned by fingerprint) go through Intel DCAP
  (``dcap_qvl.verify``) with caller-supplied collateral at a caller-supplied time ``now``; the
  claims carry dcap-qvl's TCB status and advisories.
- Either way the PCK chain must be canonical PEM: its bytes are not signed, so no other spelling
  of the same certificates is accepted (a real quote's trailing zero padding is tolerated).
- Simulated quotes (chain ending at a "Sealroom SIMULATED TDX Root CA", see :mod:`cvm.attest.simulated`)
  are refused unless ``allow_simulated=True`` and their root is the pinned ``simulated_root_der``;
  then every signature is checked here (chain, QE report by PCK, attestation-key binding, quote)
  and the claims say ``simulated=True``.
- Both kinds: a debug TD, or a TDX module not signed by Intel (non-zero MRSIGNERSEAM), is refused.

TCB policy: dcap-qvl statuses other than ``UpToDate`` (``OutOfDate``, ``SWHardeningNeeded``, …)
are *claims*, not refusals — ``QuoteClaims.tcb_status`` carries them and the KMS/contract decide
(dstack's ``requireTcbUpToDate``). ``Revoked`` is refused. Anything dcap-qvl itself raises (stale
or expired collateral, a platform below every TCB level Intel lists, a bad signature) is a refusal.

``verify_attestation`` adds the event log (RTMR3 replay, :mod:`cvm.attest.eventlog`), the report_data
check and dstack's BootInfo values (docs/design.md, "dstack formats"; dstack ``decode_app_info``).

Errors (every failure is an :class:`AttestationError`; caller mistakes are TypeError/ValueError)::

    AttestationError
     ├── QuoteFormatError          the bytes are not a well-formed TDX v4/v5 quote
     ├── QuoteRejected(reason)     well-formed, but not trustworthy: DCAP failure, bad signature,
     │    │                        unknown or wrong root, debug TD, revoked TCB
     │    └── SimulatedQuoteNotAllowed   a simulated quote where only real ones are accepted
     ├── EventLogMismatch(reason)  the event log does not replay to RTMR3, or lacks boot values
     └── ReportDataMismatch        the quote does not bind the expected report_data
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import dcap_qvl
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cvm.attest.eventlog import BootEvents, EventLogMismatch, replay_event_log
from cvm.attest.simulated import SIMULATED_DEVICE_ID, SIMULATED_ROOT_CN
from cvm.attest.tdx_quote import (
    AttestationError,
    QuoteFormatError,
    TdxQuote,
    attestation_public_key,
    ecdsa_raw_to_der,
    parse_quote_unverified,
)

__all__ = [
    "AttestationError",
    "EventLogMismatch",
    "Measurements",
    "QuoteClaims",
    "QuoteFormatError",
    "QuoteRejected",
    "ReportDataMismatch",
    "SimulatedQuoteNotAllowed",
    "VerifiedBoot",
    "compute_mr_aggregated",
    "compute_mr_system",
    "verify_attestation",
    "verify_quote",
]

# sha256 of the DER of Intel's "SGX Root CA" certificate, the anchor dcap-qvl verifies chains against.
# dcap-qvl ignores the root copy a quote carries, so pinning it here is what makes those bytes authentic.
INTEL_SGX_ROOT_CA_SHA256 = bytes.fromhex("44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3")
SIMULATED_TCB_STATUS = "UpToDate"
_REFUSED_TCB_STATUSES = frozenset({"Revoked"})
_CERTIFICATE_PARSE_ERRORS = (  # what pyca raises (or warns) on malformed certificate DER
    ValueError,
    TypeError,
    Warning,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    UnsupportedAlgorithm,
)
# dcap-qvl error fragments → what they mean for an operator.
_DCAP_EXPLANATIONS = (
    ("CrlExpired", "a CRL in the collateral has expired at the verification time (stale collateral)"),
    ("TCBInfo expired", "the collateral's TCB info has expired at the verification time (stale collateral)"),
    ("issue date is in the future", "the collateral was issued after the verification time"),
    ("No matching TCB level", "the platform's TCB is below every level in Intel's TCB info"),
)


class QuoteRejected(AttestationError):
    """The quote is well-formed but does not verify, or its TD may not be trusted."""

    def __init__(self, reason: str, *, detail: str | None = None) -> None:
        super().__init__(f"quote rejected: {reason}")
        self.reason = reason
        self.detail = detail


class SimulatedQuoteNotAllowed(QuoteRejected):
    """A SIMULATED quote was presented where simulation is not allowed."""


class ReportDataMismatch(AttestationError):
    """The quote's report_data is not the expected value (it was made for something else)."""


@dataclass(frozen=True)
class QuoteClaims:
    """What a verified quote proves. ``simulated`` claims come from the SIMULATED platform."""

    mrtd: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    report_data: bytes
    tcb_status: str
    advisory_ids: tuple[str, ...]
    debug: bool
    simulated: bool
    device_id: bytes
    fmspc: str | None


@dataclass(frozen=True)
class VerifiedBoot:
    """A verified quote plus the boot it attests, with dstack's BootInfo values."""

    claims: QuoteClaims
    events: BootEvents
    app_id: bytes
    compose_hash: bytes
    instance_id: bytes | None
    device_id: bytes
    mr_system: bytes
    mr_aggregated: bytes
    os_image_hash: bytes | None
    key_provider_info: bytes
    tcb_status: str
    advisory_ids: tuple[str, ...]
    simulated: bool


def verify_quote(
    raw: bytes,
    *,
    collateral: dcap_qvl.QuoteCollateralV3 | str | bytes | None = None,
    now: int,
    allow_simulated: bool = False,
    simulated_root_der: bytes | None = None,
) -> QuoteClaims:
    """Verify a TDX quote, real (Intel DCAP, with ``collateral`` at unix time ``now``) or simulated.

    Simulated quotes need ``allow_simulated=True`` and the pinned simulated root certificate
    (DER). Returns the claims or raises an :class:`AttestationError`.
    """
    if not isinstance(raw, (bytes, bytearray)):
        raise TypeError("raw must be the quote bytes")
    if not isinstance(now, int) or isinstance(now, bool):
        raise TypeError("now must be an int (unix time in seconds)")
    if now < 0:
        raise ValueError("now must be a non-negative unix time in seconds")
    if allow_simulated and not isinstance(simulated_root_der, bytes):
        raise ValueError("allow_simulated=True needs simulated_root_der (the pinned simulated root, DER)")
    raw = bytes(raw)
    quote = parse_quote_unverified(raw)
    chain = _load_chain(quote.pck_cert_chain_pem)
    root_der = chain[-1].public_bytes(serialization.Encoding.DER)
    if hmac.compare_digest(hashlib.sha256(root_der).digest(), INTEL_SGX_ROOT_CA_SHA256):
        claims = _verify_real(raw, quote, collateral, now)
    elif _is_simulated_chain(chain, simulated_root_der):
        if not allow_simulated or simulated_root_der is None:
            raise SimulatedQuoteNotAllowed("this is a SIMULATED TDX quote and simulated quotes are not allowed here")
        claims = _verify_simulated(quote, chain, simulated_root_der, now)
    else:
        raise QuoteRejected("the PCK certificate chain ends neither at Intel's SGX Root CA nor at a simulated root")
    _check_td_is_trustworthy(quote)
    return claims


def verify_attestation(
    quote: bytes,
    event_log: str | bytes | Sequence[Mapping[str, Any]],
    *,
    expected_report_data: bytes | None = None,
    **quote_kwargs: Any,
) -> VerifiedBoot:
    """Verify a quote, its report_data and its event log; return the attested boot.

    ``quote_kwargs`` go to :func:`verify_quote` (``now`` is required). ``expected_report_data``
    (≤ 64 bytes, zero-padded to 64 like dstack's GetQuote) is compared in constant time. The
    event log is replayed against RTMR3 and boot values are read from it only. If MRCONFIGID is
    dstack's V1 form (``0x01 ‖ compose_hash``), it must name the log's compose hash.
    """
    claims = verify_quote(quote, **quote_kwargs)
    if expected_report_data is not None:
        if len(expected_report_data) > 64:
            raise ValueError("expected_report_data is at most 64 bytes")
        if not hmac.compare_digest(expected_report_data.ljust(64, b"\0"), claims.report_data):
            raise ReportDataMismatch("the quote's report_data is not the expected value")
    events = replay_event_log(event_log, claims.rtmr3)
    _check_mr_config_id(claims.mr_config_id, events.compose_hash)
    return VerifiedBoot(
        claims=claims,
        events=events,
        app_id=events.app_id,
        compose_hash=events.compose_hash,
        instance_id=events.instance_id,
        device_id=claims.device_id,
        mr_system=compute_mr_system(claims, events.key_provider_info),
        mr_aggregated=compute_mr_aggregated(claims),
        os_image_hash=events.os_image_hash,
        key_provider_info=events.key_provider_info,
        tcb_status=claims.tcb_status,
        advisory_ids=claims.advisory_ids,
        simulated=claims.simulated,
    )


class Measurements(Protocol):
    """TD measurement registers, as both :class:`QuoteClaims` and a parsed ``TdReport`` hold them."""

    mrtd: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes


def compute_mr_system(measurements: Measurements, key_provider_info: bytes) -> bytes:
    """dstack ``mr_system = sha256(mrtd ‖ rtmr0 ‖ rtmr1 ‖ rtmr2 ‖ mr_key_provider)`` where
    ``mr_key_provider`` is ``sha256(key_provider_info)``, or 32 zero bytes without one."""
    m = measurements
    mr_key_provider = hashlib.sha256(key_provider_info).digest() if key_provider_info else bytes(32)
    return hashlib.sha256(m.mrtd + m.rtmr0 + m.rtmr1 + m.rtmr2 + mr_key_provider).digest()


def compute_mr_aggregated(measurements: Measurements) -> bytes:
    """dstack ``mr_aggregated = sha256(mrtd ‖ rtmr0..3 [‖ mr_config_id ‖ mr_owner ‖ mr_owner_config])``;
    the last three are included only when any of them is non-zero (dstack's backward compatibility)."""
    m = measurements
    parts = [m.mrtd, m.rtmr0, m.rtmr1, m.rtmr2, m.rtmr3]
    owner_parts = [m.mr_config_id, m.mr_owner, m.mr_owner_config]
    if any(any(part) for part in owner_parts):
        parts += owner_parts
    return hashlib.sha256(b"".join(parts)).digest()


# ---- real quotes ---------------------------------------------------------------------------------


def _verify_real(
    raw: bytes, quote: TdxQuote, collateral: dcap_qvl.QuoteCollateralV3 | str | bytes | None, now: int
) -> QuoteClaims:
    verified = _dcap_verify(raw, _load_collateral(collateral), now)
    if verified.status in _REFUSED_TCB_STATUSES:
        raise QuoteRejected(f"the platform's TCB status is {verified.status}")
    _check_parsers_agree(raw, quote)
    return _claims(
        quote,
        tcb_status=verified.status,
        advisory_ids=tuple(verified.advisory_ids),
        simulated=False,
        device_id=hashlib.sha256(verified.ppid).digest(),  # dstack: device_id = sha256(PPID)
        fmspc=_fmspc(raw),
    )


def _load_collateral(collateral: dcap_qvl.QuoteCollateralV3 | str | bytes | None) -> dcap_qvl.QuoteCollateralV3:
    if collateral is None:
        raise QuoteRejected("no DCAP collateral was supplied, so a real TDX quote cannot be verified")
    if isinstance(collateral, dcap_qvl.QuoteCollateralV3):
        return collateral
    if not isinstance(collateral, (str, bytes)):
        raise TypeError("collateral is a dcap_qvl.QuoteCollateralV3 or its JSON")
    try:
        text = collateral.decode() if isinstance(collateral, bytes) else collateral
        return dcap_qvl.QuoteCollateralV3.from_json(text)
    except (ValueError, UnicodeDecodeError) as bad:
        raise QuoteRejected("the DCAP collateral is malformed", detail=str(bad)) from None


def _dcap_verify(raw: bytes, collateral: dcap_qvl.QuoteCollateralV3, now: int) -> dcap_qvl.VerifiedReport:
    try:
        return dcap_qvl.verify(raw, collateral, now)
    except (ValueError, RuntimeError) as failure:
        message = str(failure)
        explanation = next((text for key, text in _DCAP_EXPLANATIONS if key in message), "DCAP verification failed")
        raise QuoteRejected(f"{explanation} (dcap-qvl: {message})", detail=message) from None


def _check_parsers_agree(raw: bytes, quote: TdxQuote) -> None:
    # dcap-qvl verified *its* reading of these bytes; make sure the claims come from the same reading.
    report = dcap_qvl.parse_quote(raw).report
    pairs = (
        (quote.body.mrtd, report.mr_td),
        (quote.body.rtmr0, report.rt_mr0),
        (quote.body.rtmr1, report.rt_mr1),
        (quote.body.rtmr2, report.rt_mr2),
        (quote.body.rtmr3, report.rt_mr3),
        (quote.body.mr_config_id, report.mr_config_id),
        (quote.body.mr_owner, report.mr_owner),
        (quote.body.mr_owner_config, report.mr_owner_config),
        (quote.body.report_data, report.report_data),
        (quote.body.td_attributes, report.td_attributes),
    )
    if any(ours != theirs for ours, theirs in pairs):
        raise QuoteFormatError("this parser and dcap-qvl read different TD report fields")


def _fmspc(raw: bytes) -> str | None:
    try:
        return str(dcap_qvl.parse_quote(raw).fmspc())
    except ValueError:
        return None


# ---- simulated quotes ----------------------------------------------------------------------------


def _load_chain(pem: bytes) -> list[x509.Certificate]:
    # The chain's bytes are covered by no signature, so they must be the one canonical PEM of its
    # certificates (real quotes add a NUL terminator): otherwise whitespace edits would give a
    # different quote with the same meaning.
    without_nul = pem[:-1] if pem.endswith(b"\0") else pem
    try:
        # pyca parses fields lazily and only warns about some malformations: make both fail here.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            chain = x509.load_pem_x509_certificates(without_nul)
            for cert in chain:
                _ = (cert.subject, cert.issuer, cert.extensions, cert.not_valid_before_utc, cert.not_valid_after_utc)
                cert.public_key()
    except _CERTIFICATE_PARSE_ERRORS:
        raise QuoteFormatError("the PCK certificate chain is not a valid PEM chain of X.509 certificates") from None
    if without_nul != b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in chain):
        raise QuoteFormatError("the PCK certificate chain is not in canonical PEM form")
    if len(chain) < 2:
        raise QuoteFormatError("the PCK certificate chain must hold at least a PCK and a root certificate")
    return chain


def _is_simulated_chain(chain: list[x509.Certificate], simulated_root_der: bytes | None) -> bool:
    root = chain[-1]
    names = root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if any(SIMULATED_ROOT_CN in str(name.value) for name in names):
        return True
    return simulated_root_der is not None and _same_der(root, simulated_root_der)


def _verify_simulated(
    quote: TdxQuote, chain: list[x509.Certificate], simulated_root_der: bytes, now: int
) -> QuoteClaims:
    # Simulated quotes come from cvm.attest.simulated, never from a fixed-size hardware buffer.
    if quote.trailing_zero_padding:
        raise QuoteFormatError("a simulated quote carries no padding after its signature data")
    if not _same_der(chain[-1], simulated_root_der):
        raise QuoteRejected("the quote chains to a simulated root that is not the pinned simulated root")
    _verify_chain(chain, now)
    pck_key = chain[0].public_key()
    if not isinstance(pck_key, ec.EllipticCurvePublicKey) or not isinstance(pck_key.curve, ec.SECP256R1):
        raise QuoteRejected("the PCK certificate does not hold a P-256 key")
    if not _ecdsa_ok(pck_key, quote.qe_report_signature, quote.qe_report.raw):
        raise QuoteRejected("the QE report signature does not verify against the PCK certificate")
    expected_binding = hashlib.sha256(quote.attestation_key + quote.qe_auth_data).digest() + bytes(32)
    if not hmac.compare_digest(quote.qe_report.report_data, expected_binding):
        raise QuoteRejected("the QE report does not bind the quote's attestation key")
    try:
        attestation_key = attestation_public_key(quote.attestation_key)
    except ValueError:
        raise QuoteRejected("the attestation key is not a P-256 point") from None
    if not _ecdsa_ok(attestation_key, quote.quote_signature, quote.signed_region):
        raise QuoteRejected("the quote signature does not verify against the attestation key")
    return _claims(
        quote,
        tcb_status=SIMULATED_TCB_STATUS,
        advisory_ids=(),
        simulated=True,
        device_id=SIMULATED_DEVICE_ID,
        fmspc=None,
    )


def _verify_chain(chain: list[x509.Certificate], now: int) -> None:
    moment = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    for cert, issuer in zip(chain, chain[1:] + chain[-1:]):  # the root issues itself
        subject = cert.subject.rfc4514_string()
        if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
            raise QuoteRejected(f"certificate {subject!r} is not valid at the verification time")
        if cert is not issuer and not _is_ca(issuer):
            raise QuoteRejected(f"certificate {issuer.subject.rfc4514_string()!r} is not a CA")
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            raise QuoteRejected(f"certificate {subject!r} is not signed by its issuer in the chain") from None


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _ecdsa_ok(key: ec.EllipticCurvePublicKey, raw_signature: bytes, message: bytes) -> bool:
    try:
        key.verify(ecdsa_raw_to_der(raw_signature), message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _same_der(cert: x509.Certificate, der: bytes) -> bool:
    return hmac.compare_digest(cert.public_bytes(serialization.Encoding.DER), der)


# ---- both kinds ----------------------------------------------------------------------------------


def _check_td_is_trustworthy(quote: TdxQuote) -> None:
    if quote.debug:
        raise QuoteRejected("the TD runs in debug mode (TD_ATTRIBUTES.DEBUG): its memory is open to the host")
    if any(quote.body.mr_signer_seam):
        raise QuoteRejected("MRSIGNERSEAM is not zero: the TDX module is not Intel's")


def _check_mr_config_id(mr_config_id: bytes, compose_hash: bytes) -> None:
    # dstack MRCONFIGID V1 = 0x01 ‖ compose_hash ‖ pad; zero means "not bound" (older guests).
    if mr_config_id[:1] == b"\x01" and not hmac.compare_digest(mr_config_id[1:33], compose_hash):
        raise EventLogMismatch("MRCONFIGID (V1) names a different compose hash than the event log")


def _claims(
    quote: TdxQuote,
    *,
    tcb_status: str,
    advisory_ids: tuple[str, ...],
    simulated: bool,
    device_id: bytes,
    fmspc: str | None,
) -> QuoteClaims:
    body = quote.body
    return QuoteClaims(
        mrtd=body.mrtd,
        rtmr0=body.rtmr0,
        rtmr1=body.rtmr1,
        rtmr2=body.rtmr2,
        rtmr3=body.rtmr3,
        mr_config_id=body.mr_config_id,
        mr_owner=body.mr_owner,
        mr_owner_config=body.mr_owner_config,
        report_data=body.report_data,
        tcb_status=tcb_status,
        advisory_ids=advisory_ids,
        debug=quote.debug,
        simulated=simulated,
        device_id=device_id,
        fmspc=fmspc,
    )
