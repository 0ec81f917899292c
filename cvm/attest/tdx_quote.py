"""Intel TDX DCAP quote layout (v4, and v5 for TD report 1.0/1.5 bodies): parse and build.

Low-level module: it reads and writes bytes and verifies nothing. Verification lives in
:mod:`cvm.attest.verify`; the parser's name says ``unverified`` accordingly.

Layout (Intel TDX DCAP Quoting Library API, appendix "Quote Format"; all integers little-endian)::

    header            48   version u16 (4|5), attestation key type u16 (2 = ECDSA-256-with-P-256),
                           tee type u32 (0x81 = TDX), qe_svn u16, pce_svn u16, qe_vendor_id 16,
                           user_data 20
    [v5 only]          6   body type u16 (2 = TD report 1.0, 3 = TD report 1.5), body size u32
    TD report body   584   tee_tcb_svn 16, mr_seam 48, mr_signer_seam 48, seam_attributes 8,
                           td_attributes 8, xfam 8, mrtd 48, mr_config_id 48, mr_owner 48,
                           mr_owner_config 48, rtmr0..3 4x48, report_data 64
                           (+ tee_tcb_svn2 16, mr_service_td 48 for TD report 1.5: 648)
    signature data len u32
    signature data         quote signature 64 (r‖s over everything before the length),
                           attestation public key 64 (x‖y),
                           certification data: type u16 = 6, size u32, then
                               QE report 384 (SGX enclave report), QE report signature 64,
                               QE auth data: u16 length + bytes,
                               certification data: type u16 = 5 (PCK cert chain), size u32, PEM

Quotes produced by real TDX hosts are often handed out in a fixed-size buffer, so zero bytes after
the signature data are tolerated and counted (``trailing_zero_padding``); any non-zero trailing byte
is refused. Everything else must fit exactly.

Errors: :class:`QuoteFormatError`, under :class:`AttestationError` (the root of the attestation
error tree drawn in :mod:`cvm.attest.verify`; it lives here because this is the lowest layer).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

__all__ = [
    "ATTESTATION_KEY_TYPE_ECDSA_P256",
    "CERT_DATA_PCK_CHAIN",
    "CERT_DATA_QE_REPORT",
    "HEADER_SIZE",
    "QE_REPORT_SIZE",
    "TD_REPORT10_SIZE",
    "TD_REPORT15_SIZE",
    "TEE_TYPE_TDX",
    "AttestationError",
    "QeReport",
    "QuoteFormatError",
    "QuoteHeader",
    "TdReport",
    "TdxQuote",
    "assemble_quote",
    "attestation_public_key",
    "encode_header",
    "encode_qe_report",
    "encode_td_report",
    "ecdsa_der_to_raw",
    "ecdsa_raw_to_der",
    "parse_quote_unverified",
]

HEADER_SIZE = 48
TD_REPORT10_SIZE = 584
TD_REPORT15_SIZE = 648
QE_REPORT_SIZE = 384
ECDSA_SIGNATURE_SIZE = 64
ECDSA_PUBLIC_KEY_SIZE = 64
ATTESTATION_KEY_TYPE_ECDSA_P256 = 2
TEE_TYPE_TDX = 0x81
CERT_DATA_PCK_CHAIN = 5
CERT_DATA_QE_REPORT = 6
_V5_BODY_TYPES = {2: TD_REPORT10_SIZE, 3: TD_REPORT15_SIZE}


class AttestationError(Exception):
    """Root of the attestation error tree (drawn in :mod:`cvm.attest.verify`)."""


class QuoteFormatError(AttestationError):
    """The bytes are not a well-formed TDX quote of a supported version."""


@dataclass(frozen=True)
class QuoteHeader:
    """The 48-byte quote header."""

    version: int
    attestation_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes


@dataclass(frozen=True)
class TdReport:
    """The TD report body (TD report 1.0; the two 1.5 fields are None for 1.0 bodies)."""

    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mrtd: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mr_service_td: bytes | None = None


# Field sizes in wire order; TdReport's dataclass fields follow the same order.
_TD_REPORT10_LAYOUT = (16, 48, 48, 8, 8, 8, 48, 48, 48, 48, 48, 48, 48, 48, 64)
_TD_REPORT15_EXTRA = (16, 48)


@dataclass(frozen=True)
class QeReport:
    """The quoting enclave's SGX report (384 bytes), signed by the PCK key. ``raw`` is what is signed."""

    cpu_svn: bytes
    misc_select: int
    attributes: bytes
    mr_enclave: bytes
    mr_signer: bytes
    isv_prod_id: int
    isv_svn: int
    report_data: bytes
    raw: bytes


@dataclass(frozen=True)
class TdxQuote:
    """A parsed TDX quote. Nothing in it has been verified."""

    header: QuoteHeader
    body: TdReport
    body_type: int
    signed_region: bytes
    quote_signature: bytes
    attestation_key: bytes
    qe_report: QeReport
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_cert_chain_pem: bytes
    trailing_zero_padding: int

    @property
    def debug(self) -> bool:
        """TD_ATTRIBUTES bit 0 (DEBUG): the TD's memory is readable by the host."""
        return bool(self.body.td_attributes[0] & 0x01)

    @property
    def report_data(self) -> bytes:
        return self.body.report_data


class _Reader:
    """Sequential little-endian reader that names what was being read when bytes run out."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.offset = 0

    def take(self, size: int, what: str) -> bytes:
        end = self.offset + size
        if end > len(self._data):
            raise QuoteFormatError(
                f"quote truncated: {what} needs {size} bytes at offset {self.offset}, "
                f"only {len(self._data) - self.offset} left"
            )
        chunk = self._data[self.offset : end]
        self.offset = end
        return chunk

    def u16(self, what: str) -> int:
        return int(struct.unpack("<H", self.take(2, what))[0])

    def u32(self, what: str) -> int:
        return int(struct.unpack("<I", self.take(4, what))[0])

    @property
    def remaining(self) -> bytes:
        return self._data[self.offset :]


def parse_quote_unverified(raw: bytes) -> TdxQuote:
    """Parse a TDX v4/v5 quote with strict length checks. Verifies no signature.

    Raises :class:`QuoteFormatError` for truncation, non-zero trailing bytes, an unsupported
    version, attestation key type, TEE type, body type or certification data type.
    """
    if not isinstance(raw, (bytes, bytearray)):
        raise TypeError("a quote is bytes")
    raw = bytes(raw)
    reader = _Reader(raw)
    header = _parse_header(reader.take(HEADER_SIZE, "header"))
    body_type, body_bytes = _read_body(reader, header.version)
    body = _parse_td_report(body_bytes)
    signed_region = raw[: reader.offset]

    signature_data = reader.take(reader.u32("signature data length"), "signature data")
    padding = reader.remaining
    if any(padding):
        raise QuoteFormatError(f"{len(padding)} trailing bytes after the signature data are not zero padding")

    sig_reader = _Reader(signature_data)
    quote_signature = sig_reader.take(ECDSA_SIGNATURE_SIZE, "quote signature")
    attestation_key = sig_reader.take(ECDSA_PUBLIC_KEY_SIZE, "attestation key")
    qe_cert_data = _read_certification_data(sig_reader, CERT_DATA_QE_REPORT, "QE report certification data")
    _expect_consumed(sig_reader, "signature data")

    qe_reader = _Reader(qe_cert_data)
    qe_report = _parse_qe_report(qe_reader.take(QE_REPORT_SIZE, "QE report"))
    qe_report_signature = qe_reader.take(ECDSA_SIGNATURE_SIZE, "QE report signature")
    qe_auth_data = qe_reader.take(qe_reader.u16("QE auth data length"), "QE auth data")
    pck_chain = _read_certification_data(qe_reader, CERT_DATA_PCK_CHAIN, "PCK certificate chain")
    _expect_consumed(qe_reader, "QE report certification data")

    return TdxQuote(
        header=header,
        body=body,
        body_type=body_type,
        signed_region=signed_region,
        quote_signature=quote_signature,
        attestation_key=attestation_key,
        qe_report=qe_report,
        qe_report_signature=qe_report_signature,
        qe_auth_data=qe_auth_data,
        pck_cert_chain_pem=pck_chain,
        trailing_zero_padding=len(padding),
    )


def _parse_header(data: bytes) -> QuoteHeader:
    version, key_type, tee_type, qe_svn, pce_svn = struct.unpack_from("<HHIHH", data)
    header = QuoteHeader(
        version=version,
        attestation_key_type=key_type,
        tee_type=tee_type,
        qe_svn=qe_svn,
        pce_svn=pce_svn,
        qe_vendor_id=data[12:28],
        user_data=data[28:48],
    )
    if version not in (4, 5):
        raise QuoteFormatError(f"unsupported quote version {version} (supported: 4, 5)")
    if key_type != ATTESTATION_KEY_TYPE_ECDSA_P256:
        raise QuoteFormatError(f"unsupported attestation key type {key_type} (supported: 2, ECDSA P-256)")
    if tee_type != TEE_TYPE_TDX:
        raise QuoteFormatError(f"TEE type {tee_type:#x} is not TDX ({TEE_TYPE_TDX:#x})")
    return header


def _read_body(reader: _Reader, version: int) -> tuple[int, bytes]:
    if version == 4:
        return 2, reader.take(TD_REPORT10_SIZE, "TD report body")
    body_type = reader.u16("v5 body type")
    body_size = reader.u32("v5 body size")
    if body_type not in _V5_BODY_TYPES:
        raise QuoteFormatError(f"unsupported v5 body type {body_type} (supported: 2, 3)")
    if body_size != _V5_BODY_TYPES[body_type]:
        raise QuoteFormatError(f"v5 body type {body_type} must be {_V5_BODY_TYPES[body_type]} bytes, says {body_size}")
    return body_type, reader.take(body_size, "TD report body")


def _parse_td_report(data: bytes) -> TdReport:
    layout = _TD_REPORT10_LAYOUT + (_TD_REPORT15_EXTRA if len(data) == TD_REPORT15_SIZE else ())
    reader = _Reader(data)
    values = [reader.take(size, name.name) for size, name in zip(layout, fields(TdReport))]
    return TdReport(*values)


def _parse_qe_report(data: bytes) -> QeReport:
    # SGX REPORTBODY: cpu_svn 16, misc_select 4, reserved 28, attributes 16, mr_enclave 32,
    # reserved 32, mr_signer 32, reserved 96, isv_prod_id 2, isv_svn 2, reserved 60, report_data 64.
    return QeReport(
        cpu_svn=data[0:16],
        misc_select=int(struct.unpack_from("<I", data, 16)[0]),
        attributes=data[48:64],
        mr_enclave=data[64:96],
        mr_signer=data[128:160],
        isv_prod_id=int(struct.unpack_from("<H", data, 256)[0]),
        isv_svn=int(struct.unpack_from("<H", data, 258)[0]),
        report_data=data[320:384],
        raw=data,
    )


def _read_certification_data(reader: _Reader, expected_type: int, what: str) -> bytes:
    cert_type = reader.u16(f"{what} type")
    if cert_type != expected_type:
        raise QuoteFormatError(f"{what}: certification data type {cert_type}, expected {expected_type}")
    return reader.take(reader.u32(f"{what} size"), what)


def _expect_consumed(reader: _Reader, what: str) -> None:
    if reader.remaining:
        raise QuoteFormatError(f"{len(reader.remaining)} unexpected bytes at the end of the {what}")


# ---- building (used by the simulated platform) -------------------------------------------------


def encode_header(header: QuoteHeader) -> bytes:
    """The 48 header bytes of ``header``."""
    _check_sizes(header, qe_vendor_id=16, user_data=20)
    numbers = (header.version, header.attestation_key_type, header.tee_type, header.qe_svn, header.pce_svn)
    return struct.pack("<HHIHH", *numbers) + header.qe_vendor_id + header.user_data


def encode_td_report(body: TdReport) -> bytes:
    """The 584-byte TD report 1.0 body (builder supports v4 quotes only)."""
    if body.tee_tcb_svn2 is not None or body.mr_service_td is not None:
        raise ValueError("only TD report 1.0 bodies (v4 quotes) can be built")
    parts = [getattr(body, field.name) for field in fields(TdReport)[: len(_TD_REPORT10_LAYOUT)]]
    for part, size, field in zip(parts, _TD_REPORT10_LAYOUT, fields(TdReport)):
        if not isinstance(part, bytes) or len(part) != size:
            raise ValueError(f"TD report field {field.name} must be {size} bytes")
    return b"".join(parts)


def encode_qe_report(
    *,
    mr_enclave: bytes,
    mr_signer: bytes,
    report_data: bytes,
    isv_prod_id: int = 0,
    isv_svn: int = 0,
    cpu_svn: bytes = bytes(16),
    misc_select: int = 0,
    attributes: bytes = bytes(16),
) -> bytes:
    """A 384-byte SGX report for the QE, reserved fields zero (layout in ``_parse_qe_report``)."""
    for name, value, size in (
        ("cpu_svn", cpu_svn, 16),
        ("attributes", attributes, 16),
        ("mr_enclave", mr_enclave, 32),
        ("mr_signer", mr_signer, 32),
        ("report_data", report_data, 64),
    ):
        if len(value) != size:
            raise ValueError(f"QE report {name} must be {size} bytes")
    return b"".join(
        (
            cpu_svn, struct.pack("<I", misc_select), bytes(28), attributes, mr_enclave, bytes(32),
            mr_signer, bytes(96), struct.pack("<HH", isv_prod_id, isv_svn), bytes(60), report_data,
        )
    )


def assemble_quote(
    signed_region: bytes,
    *,
    quote_signature: bytes,
    attestation_key: bytes,
    qe_report: bytes,
    qe_report_signature: bytes,
    qe_auth_data: bytes,
    pck_cert_chain_pem: bytes,
) -> bytes:
    """Append the ECDSA signature data (with type-6 and nested type-5 certification data)."""
    if len(quote_signature) != 64 or len(qe_report_signature) != 64 or len(attestation_key) != 64:
        raise ValueError("signatures and the attestation key are 64 bytes each")
    if len(qe_report) != QE_REPORT_SIZE:
        raise ValueError(f"the QE report is {QE_REPORT_SIZE} bytes")
    pck_cert_data = struct.pack("<HI", CERT_DATA_PCK_CHAIN, len(pck_cert_chain_pem)) + pck_cert_chain_pem
    qe_cert_body = qe_report + qe_report_signature + struct.pack("<H", len(qe_auth_data)) + qe_auth_data + pck_cert_data
    qe_cert_data = struct.pack("<HI", CERT_DATA_QE_REPORT, len(qe_cert_body)) + qe_cert_body
    signature_data = quote_signature + attestation_key + qe_cert_data
    return signed_region + struct.pack("<I", len(signature_data)) + signature_data


def _check_sizes(obj: object, **sizes: int) -> None:
    for name, size in sizes.items():
        value = getattr(obj, name)
        if not isinstance(value, bytes) or len(value) != size:
            raise ValueError(f"{name} must be {size} bytes")


# ---- the quote's ECDSA encodings -----------------------------------------------------------------


def ecdsa_raw_to_der(signature: bytes) -> bytes:
    """Quote signatures are raw ``r‖s`` (32 bytes each, big-endian); pyca wants DER."""
    if len(signature) != 64:
        raise ValueError("a raw P-256 signature is 64 bytes")
    return encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))


def ecdsa_der_to_raw(signature: bytes) -> bytes:
    """DER ECDSA signature → the quote's raw ``r‖s``."""
    r, s = decode_dss_signature(signature)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def attestation_public_key(raw_key: bytes) -> ec.EllipticCurvePublicKey:
    """The quote's 64-byte ``x‖y`` attestation key as a P-256 public key (ValueError if off-curve)."""
    if len(raw_key) != 64:
        raise ValueError("a raw P-256 public key is 64 bytes")
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw_key)
