"""RA-TLS certificates as dstack's guest agent issues them (``GetTlsKey``, and Tappd's ``DeriveKey``), for the
SIMULATED agent. Pure functions: the agent supplies the app key and the quotes.

dstack's formats (``ra-tls/src/{cert,oids,attestation,kdf}.rs``, 0.5.x; docs/design.md, "dstack formats: RA-TLS"):

- Extensions (non-critical), each value a DER OCTET STRING: ``1.3.6.1.4.1.62397.1.1`` the TDX quote,
  ``…1.2`` the event log (the JSON GetQuote returns, as bytes), ``…1.3`` the app id (20 bytes), ``…1.4`` the
  certificate's special usage (``app:custom`` on a leaf, ``app:ca`` on the app CA).
- The quote in a certificate binds its public key: ``report_data = sha512("ratls-cert:" ‖ SubjectPublicKeyInfo
  DER)`` (dstack's ``QuoteContentType::RaTlsCert``; 64 bytes, so no padding).
- Keys are P-256. dstack's P-256 derivation is ``HKDF-SHA256(ikm, salt "RATLS", info = parts joined)`` read as a
  scalar (refused if 0 or ≥ n). A GetTlsKey key is fresh (random); a Tappd DeriveKey key is derived from the app key
  with ``[path]`` (the same 32 bytes GetKey returns for that path, as in dstack).
- Leaf: CN = the request's subject, DNS SANs = its alt_names, KeyUsage digitalSignature, ExtendedKeyUsage
  serverAuth / clientAuth as asked, the quote and event log only when ``usage_ra_tls``; validity from the request's
  ``not_before``/``not_after`` (Unix seconds) or, as dstack's rcgen does, 1975-01-01 to ten years from now.

The issuer. dstack's KMS signs leaves with an *app CA* whose P-256 key it derives from its root CA key with
``[app_id, "app-ca"]`` (subject "dstack App CA", O "dstack", path length 0, usage ``app:ca``), and returns
``[leaf, app CA, KMS root CA]``; dstack's simulator (local key provider) signs with its "app key" CA and returns
``[leaf, CA]``. Sealroom's KMS has no CA: it hands a CVM only its app k256 key. So here the app CA's key is derived
the dstack way from the key the CVM holds, the app key: ``P-256 key = HKDF(app k256 key, "RATLS", app_id ‖
"app-ca")``, its certificate is self-signed, and the chain is ``[leaf, app CA]``. The CA key is the same on every
boot of the app (its certificate is re-issued per boot), and only the app key's holders (the CVM, or the KMS root
that derives it) can recompute it. The CA also carries keyCertSign, which dstack's omits, so that standard X.509
verifiers accept the chain.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from eth_utils import keccak

__all__ = [
    "APP_CA_SUBJECT",
    "OID_APP_ID",
    "OID_CERT_USAGE",
    "OID_EVENT_LOG",
    "OID_QUOTE",
    "RATLS_CERT_TAG",
    "AppCa",
    "CertConfig",
    "RaTlsExtensions",
    "derive_app_ca",
    "derive_p256_key",
    "issue_leaf",
    "private_key_pem",
    "quote_content_report_data",
    "ratls_extensions",
    "ratls_report_data",
    "spki_der",
]

# dstack's RA-TLS OIDs (ra-tls/src/oids.rs), under Phala's enterprise arc 62397.
OID_QUOTE = x509.ObjectIdentifier("1.3.6.1.4.1.62397.1.1")
OID_EVENT_LOG = x509.ObjectIdentifier("1.3.6.1.4.1.62397.1.2")
OID_APP_ID = x509.ObjectIdentifier("1.3.6.1.4.1.62397.1.3")
OID_CERT_USAGE = x509.ObjectIdentifier("1.3.6.1.4.1.62397.1.4")

RATLS_CERT_TAG = "ratls-cert"
APP_CA_SUBJECT = "dstack App CA"
_APP_CA_LABEL = b"app-ca"
_LEAF_USAGE = "app:custom"
_CA_USAGE = "app:ca"
_RCGEN_NOT_BEFORE = datetime.datetime(1975, 1, 1, tzinfo=datetime.timezone.utc)
_DEFAULT_LIFETIME = datetime.timedelta(days=3650)
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551

# QuoteContentType::to_report_data_with_hash's algorithms. keccak384/512 have no implementation among this
# project's dependencies, so the SIMULATED agent refuses them.
_HASHES = {
    "sha256": lambda data: hashlib.sha256(data).digest(),
    "sha384": lambda data: hashlib.sha384(data).digest(),
    "sha512": lambda data: hashlib.sha512(data).digest(),
    "sha3-256": lambda data: hashlib.sha3_256(data).digest(),
    "sha3-384": lambda data: hashlib.sha3_384(data).digest(),
    "sha3-512": lambda data: hashlib.sha3_512(data).digest(),
    "keccak256": keccak,
}
DEFAULT_HASH_ALGORITHM = "sha512"


def quote_content_report_data(tag: str, content: bytes, hash_algorithm: str = "") -> bytes:
    """dstack's ``QuoteContentType::to_report_data_with_hash``: ``hash(tag ‖ ":" ‖ content)`` zero-padded to 64
    bytes; ``raw`` takes ``content`` as the 64 bytes themselves. An empty algorithm is sha512. ValueError otherwise."""
    algorithm = hash_algorithm or DEFAULT_HASH_ALGORITHM
    if algorithm == "raw":
        if len(content) != 64:
            raise ValueError(f"raw report data must be exactly 64 bytes, got {len(content)}")
        return content
    if algorithm not in _HASHES:
        raise ValueError(f"unsupported hash algorithm {algorithm!r} (supported: raw, {', '.join(_HASHES)})")
    return _HASHES[algorithm](tag.encode("utf-8") + b":" + content).ljust(64, b"\0")


def ratls_report_data(spki: bytes) -> bytes:
    """The report_data of a certificate's quote: ``sha512("ratls-cert:" ‖ SubjectPublicKeyInfo DER)``."""
    return quote_content_report_data(RATLS_CERT_TAG, spki)


def spki_der(public_key: ec.EllipticCurvePublicKey) -> bytes:
    """A public key's SubjectPublicKeyInfo, DER (what rcgen's ``public_key_der`` gives)."""
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def derive_p256_key(ikm: bytes, context: Sequence[bytes]) -> ec.EllipticCurvePrivateKey:
    """dstack's ``derive_ecdsa_key_pair_from_bytes``: HKDF-SHA256(ikm, salt "RATLS", info = parts joined), 32 bytes
    read as a big-endian P-256 scalar. ValueError for the (negligible) outputs that are no valid scalar."""
    if isinstance(context, (bytes, str)) or not all(isinstance(part, bytes) for part in context):
        raise TypeError("context must be a sequence of bytes parts")
    raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=b"RATLS", info=b"".join(context)).derive(ikm)
    scalar = int.from_bytes(raw, "big")
    if not 0 < scalar < _P256_ORDER:
        raise ValueError("the derived bytes are not a valid P-256 private key")
    return ec.derive_private_key(scalar, ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    """PKCS#8 PEM (``-----BEGIN PRIVATE KEY-----``), as rcgen's ``serialize_pem`` writes it."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode("ascii")


@dataclass(frozen=True)
class AppCa:
    """The app's RA-TLS CA: its P-256 key (derived from the app key) and its self-signed certificate."""

    key: ec.EllipticCurvePrivateKey = field(repr=False)
    certificate: x509.Certificate

    @property
    def pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")


@dataclass(frozen=True)
class CertConfig:
    """dstack's ``CertConfig`` (and 0.5.7's validity options): what a GetTlsKey/DeriveKey request asks for."""

    subject: str = ""
    alt_names: tuple[str, ...] = ()
    usage_server_auth: bool = False
    usage_client_auth: bool = False
    ext_quote: bool = False
    org_name: str | None = None
    not_before: int | None = None   # Unix seconds
    not_after: int | None = None


@dataclass(frozen=True)
class RaTlsExtensions:
    """What a certificate's dstack RA-TLS extensions hold (None where absent)."""

    quote: bytes | None
    event_log: bytes | None
    app_id: bytes | None
    usage: str | None


def derive_app_ca(app_key: bytes, app_id: bytes, *, now: datetime.datetime | None = None) -> AppCa:
    """The app CA (see the module docstring): key ``HKDF(app k256 key, "RATLS", app_id ‖ "app-ca")``, a self-signed
    CA certificate (path length 0) with dstack's app-id and ``app:ca`` usage extensions."""
    if not isinstance(app_key, bytes) or len(app_key) != 32:
        raise ValueError("the app key is 32 bytes")
    if not isinstance(app_id, bytes) or len(app_id) != 20:
        raise ValueError("app_id is 20 bytes")
    key = derive_p256_key(app_key, [app_id, _APP_CA_LABEL])
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dstack"),
                      x509.NameAttribute(NameOID.COMMON_NAME, APP_CA_SUBJECT)])
    now = now or datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(_RCGEN_NOT_BEFORE)
        .not_valid_after(now + _DEFAULT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_octets(OID_APP_ID, app_id), critical=False)
        .add_extension(_octets(OID_CERT_USAGE, _CA_USAGE.encode()), critical=False)
    )
    return AppCa(key=key, certificate=builder.sign(key, hashes.SHA256()))


def issue_leaf(
    ca: AppCa,
    public_key: ec.EllipticCurvePublicKey,
    config: CertConfig,
    *,
    app_id: bytes,
    quote: bytes | None = None,
    event_log: bytes | None = None,
    now: datetime.datetime | None = None,
) -> x509.Certificate:
    """A leaf certificate for ``public_key`` signed by ``ca``, as dstack's ``CaCert::sign_csr`` makes it (see the
    module docstring). ``quote``/``event_log`` are embedded only when ``config.ext_quote``. ValueError for a subject,
    alt name or validity X.509 cannot carry."""
    if config.ext_quote and (quote is None or event_log is None):
        raise ValueError("an RA-TLS certificate needs its quote and event log")
    now = now or datetime.datetime.now(datetime.timezone.utc)
    not_before = _time(config.not_before) if config.not_before is not None else _RCGEN_NOT_BEFORE
    not_after = _time(config.not_after) if config.not_after is not None else now + _DEFAULT_LIFETIME
    if not_after <= not_before:
        raise ValueError("not_after must be later than not_before")
    attributes = []
    if config.org_name:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, config.org_name))
    if config.subject:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, config.subject))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca.certificate.subject)
        .public_key(public_key)
        .serial_number(_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    purposes = [oid for wanted, oid in ((config.usage_server_auth, ExtendedKeyUsageOID.SERVER_AUTH),
                                        (config.usage_client_auth, ExtendedKeyUsageOID.CLIENT_AUTH)) if wanted]
    if purposes:
        builder = builder.add_extension(x509.ExtendedKeyUsage(purposes), critical=False)
    if config.alt_names:
        # RFC 5280: with an empty subject, the SAN extension is critical (rcgen does the same).
        builder = builder.add_extension(x509.SubjectAlternativeName([_dns_name(n) for n in config.alt_names]),
                                        critical=not attributes)
    if config.ext_quote:
        builder = builder.add_extension(_octets(OID_QUOTE, quote), critical=False)
        builder = builder.add_extension(_octets(OID_EVENT_LOG, event_log), critical=False)
    builder = builder.add_extension(_octets(OID_APP_ID, app_id), critical=False)
    builder = builder.add_extension(_octets(OID_CERT_USAGE, _LEAF_USAGE.encode()), critical=False)
    return builder.sign(ca.key, hashes.SHA256())


def ratls_extensions(certificate: x509.Certificate) -> RaTlsExtensions:
    """Read dstack's RA-TLS extensions out of a certificate (ValueError if one is not a DER OCTET STRING)."""

    def read(oid: x509.ObjectIdentifier) -> bytes | None:
        try:
            extension = certificate.extensions.get_extension_for_oid(oid)
        except x509.ExtensionNotFound:
            return None
        return _octet_string_content(extension.value.value)

    usage = read(OID_CERT_USAGE)
    return RaTlsExtensions(quote=read(OID_QUOTE), event_log=read(OID_EVENT_LOG), app_id=read(OID_APP_ID),
                           usage=usage.decode("utf-8") if usage is not None else None)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                         encipher_only=False, decipher_only=False)


def _octets(oid: x509.ObjectIdentifier, content: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(oid, _octet_string(content))


def _octet_string(content: bytes) -> bytes:
    """DER ``OCTET STRING``: tag 0x04, the definite length (short or long form), the bytes."""
    n = len(content)
    if n < 0x80:
        return b"\x04" + bytes([n]) + content
    length = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return b"\x04" + bytes([0x80 | len(length)]) + length + content


def _octet_string_content(der: bytes) -> bytes:
    if len(der) < 2 or der[0] != 0x04:
        raise ValueError("an RA-TLS extension is not a DER OCTET STRING")
    first = der[1]
    if first < 0x80:
        length, start = first, 2
    else:
        size = first & 0x7F
        if size == 0 or size > 4 or len(der) < 2 + size or der[2] == 0:
            raise ValueError("an RA-TLS extension has a malformed DER length")
        length, start = int.from_bytes(der[2:2 + size], "big"), 2 + size
        if length < 0x80:
            raise ValueError("an RA-TLS extension has a non-minimal DER length")
    if start + length != len(der):
        raise ValueError("an RA-TLS extension's DER length does not match its content")
    return der[start:]


def _dns_name(name: str) -> x509.DNSName:
    if not isinstance(name, str) or not name or not name.isascii():
        raise ValueError("an alt name is not an ASCII DNS name (dstack's alt names are IA5 DNS names)")
    return x509.DNSName(name)


def _time(seconds: int) -> datetime.datetime:
    try:
        return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):
        raise ValueError("not_before or not_after is not a usable certificate time") from None


def _serial() -> int:
    return int.from_bytes(os.urandom(16), "big") >> 1 or 1
