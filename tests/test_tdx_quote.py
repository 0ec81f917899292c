"""TDX quote layout: real quotes (Intel-signed samples) and simulated ones parse the same as dcap-qvl reads
them; the parser is strict about lengths and types; the builder writes exactly the bytes it parses."""

import hashlib
import struct
from pathlib import Path

import dcap_qvl
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from cvm.attest.simulated import (
    SIMULATED_QUOTE_USER_DATA,
    SIMULATED_ROOT_CN,
    SimulatedTdx,
)
from cvm.attest.tdx_quote import (
    QuoteFormatError,
    attestation_public_key,
    ecdsa_der_to_raw,
    ecdsa_raw_to_der,
    encode_header,
    encode_td_report,
    parse_quote_unverified,
)

_REPO = Path(__file__).resolve().parents[1]
FIXTURES = _REPO / "tests" / "fixtures" / "tdx"  # real Intel TDX samples, vendored (see its README.md)
REAL_QUOTES = {
    "tdx_quote (v4)": lambda: (FIXTURES / "tdx_quote").read_bytes(),
    "tdx_quote_outdated (v5, TD report 1.5)": lambda: (FIXTURES / "tdx_quote_outdated").read_bytes(),
    "quote-from-tappd (v4, dstack CVM)": lambda: bytes.fromhex((FIXTURES / "quote-from-tappd.hex").read_text().strip()),
}
HEADER_FIELDS = ("version", "attestation_key_type", "tee_type", "qe_svn", "pce_svn", "qe_vendor_id", "user_data")
# our TdReport field -> dcap-qvl's report property
BODY_FIELDS = {
    "tee_tcb_svn": "tee_tcb_svn", "mr_seam": "mr_seam", "mr_signer_seam": "mr_signer_seam",
    "seam_attributes": "seam_attributes", "td_attributes": "td_attributes", "xfam": "xfam", "mrtd": "mr_td",
    "mr_config_id": "mr_config_id", "mr_owner": "mr_owner", "mr_owner_config": "mr_owner_config",
    "rtmr0": "rt_mr0", "rtmr1": "rt_mr1", "rtmr2": "rt_mr2", "rtmr3": "rt_mr3", "report_data": "report_data",
}


@pytest.fixture(scope="module")
def simulated_quote(tmp_path_factory) -> bytes:
    platform = SimulatedTdx.load_or_create(tmp_path_factory.mktemp("sim-tdx"))
    return platform.make_quote(bytes(range(64)), rtmr3=hashlib.sha384(b"rtmr3").digest())


def assert_same_as_dcap_qvl(raw: bytes) -> None:
    ours, theirs = parse_quote_unverified(raw), dcap_qvl.parse_quote(raw)
    for name in HEADER_FIELDS:
        assert getattr(ours.header, name) == getattr(theirs.header, name), name
    for our_name, their_name in BODY_FIELDS.items():
        assert getattr(ours.body, our_name) == getattr(theirs.report, their_name), our_name
    if ours.body.tee_tcb_svn2 is not None:
        assert (ours.body.tee_tcb_svn2, ours.body.mr_service_td) == (theirs.report.tee_tcb_svn2, theirs.report.mr_service_td)
    assert ours.pck_cert_chain_pem.rstrip(b"\0") == theirs.cert_chain_pem_bytes()


@pytest.mark.parametrize("name", REAL_QUOTES)
def test_real_quotes_parse_like_dcap_qvl(name):
    raw = REAL_QUOTES[name]()
    assert_same_as_dcap_qvl(raw)
    quote = parse_quote_unverified(raw)
    assert quote.header.tee_type == 0x81 and quote.header.attestation_key_type == 2
    assert not quote.debug
    assert quote.pck_cert_chain_pem.count(b"-----BEGIN CERTIFICATE-----") == 3
    # DCAP's binding of the attestation key: QE report_data = sha256(attestation key ‖ QE auth data) ‖ zeros.
    binding = hashlib.sha256(quote.attestation_key + quote.qe_auth_data).digest() + bytes(32)
    assert quote.qe_report.report_data == binding


def test_real_v4_quote_details():
    quote = parse_quote_unverified(REAL_QUOTES["tdx_quote (v4)"]())
    assert (quote.header.version, quote.body_type, len(quote.signed_region)) == (4, 2, 48 + 584)
    assert quote.trailing_zero_padding == 70  # the sample was cut from a fixed 5006-byte buffer
    assert encode_header(quote.header) + encode_td_report(quote.body) == quote.signed_region


def test_real_v5_quote_details():
    quote = parse_quote_unverified(REAL_QUOTES["tdx_quote_outdated (v5, TD report 1.5)"]())
    assert (quote.header.version, quote.body_type, len(quote.signed_region)) == (5, 3, 48 + 6 + 648)
    assert quote.trailing_zero_padding == 0
    with pytest.raises(ValueError, match="TD report 1.0"):
        encode_td_report(quote.body)


def test_simulated_quote_parses_like_dcap_qvl(simulated_quote):
    assert_same_as_dcap_qvl(simulated_quote)
    quote = parse_quote_unverified(simulated_quote)
    assert quote.header.user_data == SIMULATED_QUOTE_USER_DATA
    root = x509.load_pem_x509_certificates(quote.pck_cert_chain_pem)[-1]
    assert SIMULATED_ROOT_CN in root.subject.rfc4514_string()
    assert quote.report_data == bytes(range(64))
    assert quote.trailing_zero_padding == 0


def test_debug_is_td_attributes_bit_0(tmp_path):
    platform = SimulatedTdx.load_or_create(tmp_path)
    assert parse_quote_unverified(platform.make_quote(bytes(64), rtmr3=bytes(48), td_attributes=1)).debug
    assert not parse_quote_unverified(platform.make_quote(bytes(64), rtmr3=bytes(48), td_attributes=0x10)).debug


# ---- strictness ------------------------------------------------------------------------------------


def region_boundaries(raw: bytes) -> list[int]:
    """Offsets where each region of a v4 quote starts (see the layout in cvm.attest.tdx_quote)."""
    auth_len = struct.unpack_from("<H", raw, 1218)[0]
    return [0, 48, 632, 636, 700, 764, 766, 770, 1154, 1218, 1220, 1220 + auth_len, 1222 + auth_len, 1226 + auth_len]


def test_truncation_anywhere_is_refused(simulated_quote):
    cuts = {b + d for b in region_boundaries(simulated_quote) for d in (0, 1)} | {len(simulated_quote) - 1}
    for cut in sorted(cuts):
        with pytest.raises(QuoteFormatError):
            parse_quote_unverified(simulated_quote[:cut])


def test_trailing_bytes(simulated_quote):
    assert parse_quote_unverified(simulated_quote + bytes(5)).trailing_zero_padding == 5
    with pytest.raises(QuoteFormatError, match="not zero padding"):
        parse_quote_unverified(simulated_quote + b"\x00\x01")


def patched(raw: bytes, offset: int, fmt: str, value: int) -> bytes:
    data = bytearray(raw)
    struct.pack_into(fmt, data, offset, value)
    return bytes(data)


MALFORMED = {
    "version 3": (0, "<H", 3, "unsupported quote version 3"),
    "attestation key type 3 (ECDSA P-384)": (2, "<H", 3, "unsupported attestation key type 3"),
    "TEE type SGX": (4, "<I", 0, "is not TDX"),
    "signature data length too long": (632, "<I", 10_000, "truncated"),
    "signature data length too short": (632, "<I", 4000, "truncated|unexpected bytes"),
    "outer certification data type 5": (764, "<H", 5, "type 5, expected 6"),
    "outer certification data size short": (766, "<I", 500, "unexpected bytes at the end of the signature data"),
    "QE auth data length off": (1218, "<H", 40, "certification data type|truncated"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_fields_are_refused(simulated_quote, case):
    offset, fmt, value, reason = MALFORMED[case]
    with pytest.raises(QuoteFormatError, match=reason):
        parse_quote_unverified(patched(simulated_quote, offset, fmt, value))


def test_inner_certification_data_must_be_a_pck_chain(simulated_quote):
    auth_len = struct.unpack_from("<H", simulated_quote, 1218)[0]
    with pytest.raises(QuoteFormatError, match="type 3, expected 5"):
        parse_quote_unverified(patched(simulated_quote, 1220 + auth_len, "<H", 3))


def test_v5_body_descriptor_is_checked():
    raw = REAL_QUOTES["tdx_quote_outdated (v5, TD report 1.5)"]()
    with pytest.raises(QuoteFormatError, match="unsupported v5 body type 4"):
        parse_quote_unverified(patched(raw, 48, "<H", 4))
    with pytest.raises(QuoteFormatError, match="must be 648 bytes"):
        parse_quote_unverified(patched(raw, 50, "<I", 584))


def test_parser_wants_bytes():
    with pytest.raises(TypeError):
        parse_quote_unverified("04000200")  # type: ignore[arg-type]


# ---- encodings -------------------------------------------------------------------------------------


def test_raw_ecdsa_signatures_round_trip_and_verify():
    key = ec.generate_private_key(ec.SECP256R1())
    der = key.sign(b"quote", ec.ECDSA(hashes.SHA256()))
    raw = ecdsa_der_to_raw(der)
    assert len(raw) == 64 and ecdsa_raw_to_der(raw) == der
    with pytest.raises(ValueError):
        ecdsa_raw_to_der(raw[:63])


def test_attestation_key_must_be_on_the_curve():
    with pytest.raises(ValueError):
        attestation_public_key(b"\x01" * 64)
    with pytest.raises(ValueError):
        attestation_public_key(b"\x01" * 63)
