"""The verifier, from both sides: real Intel quotes through DCAP at a pinned time, SIMULATED quotes only when
allowed and pinned, every tampered region refused, and the boot (event log, report_data) checked on top."""

import dataclasses
import hashlib
import json
import os
import stat
import time
from pathlib import Path

import dcap_qvl
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cvm.attest.eventlog import RuntimeEvent, event_log_json, replay_rtmr
from cvm.attest.simulated import (
    SIMULATED_DEVICE_ID,
    SIMULATED_MRTD,
    SIMULATED_ROOT_CN,
    SIMULATED_RTMR0,
    SIMULATED_RTMR1,
    SIMULATED_RTMR2,
    SimulatedTdx,
    mr_config_id_v1,
)
from cvm.attest.tdx_quote import (
    assemble_quote,
    ecdsa_der_to_raw,
    parse_quote_unverified,
)
from cvm.attest.verify import (
    AttestationError,
    EventLogMismatch,
    QuoteFormatError,
    QuoteRejected,
    ReportDataMismatch,
    SimulatedQuoteNotAllowed,
    verify_attestation,
    verify_quote,
)

_REPO = Path(__file__).resolve().parents[1]
FIXTURES = _REPO / "tests" / "fixtures" / "tdx"  # real Intel TDX samples, vendored (see its README.md)
FIXTURE_NOW = 1750331763  # tdx_quote_collateral's TCB issueDate + 1 h (fixtures/tdx/README.md)
OUTDATED_NOW = 1771459200  # inside tdx_quote_outdated_collateral's window (2026-02-19)
SIM_NOW = 1_780_000_000  # the simulated platforms below are dated from this moment

APP_ID = bytes.fromhex("5fbdb2315678afecb367f032d93f642f64180aa3")
COMPOSE_BYTES = b'{"manifest_version":2,"name":"study","runner":"docker-compose"}'
COMPOSE_HASH = hashlib.sha256(COMPOSE_BYTES).digest()
KEY_PROVIDER = json.dumps({"name": "kms", "id": "03" + "cd" * 32}, separators=(",", ":")).encode()
REPORT_DATA = hashlib.sha512(b"envelope digest").digest()


def real_quote() -> bytes:
    return (FIXTURES / "tdx_quote").read_bytes()


def real_collateral() -> str:
    return (FIXTURES / "tdx_quote_collateral.json").read_text()


@pytest.fixture(scope="module")
def platform(tmp_path_factory) -> SimulatedTdx:
    return SimulatedTdx.load_or_create(tmp_path_factory.mktemp("sim-a"), now=SIM_NOW)


@pytest.fixture(scope="module")
def other_platform(tmp_path_factory) -> SimulatedTdx:
    return SimulatedTdx.load_or_create(tmp_path_factory.mktemp("sim-b"), now=SIM_NOW)


def boot_log() -> list[RuntimeEvent]:
    names = [
        ("system-preparing", b""),
        ("app-id", APP_ID),
        ("compose-hash", COMPOSE_HASH),
        ("instance-id", hashlib.sha256(b"seed" + APP_ID).digest()[:20]),
        ("boot-mr-done", b""),
        ("key-provider", KEY_PROVIDER),
        ("system-ready", b""),
    ]
    return [RuntimeEvent.measure(name, payload) for name, payload in names]


def attested_boot(platform: SimulatedTdx, events: list[RuntimeEvent] | None = None, **quote_args) -> tuple[bytes, str]:
    events = boot_log() if events is None else events
    rtmr3 = replay_rtmr(e.digest for e in events)
    quote_args.setdefault("mr_config_id", mr_config_id_v1(COMPOSE_HASH))
    return platform.make_quote(REPORT_DATA, rtmr3=rtmr3, **quote_args), event_log_json(events)


def simulated_ok(platform: SimulatedTdx) -> dict:
    return {"now": SIM_NOW, "allow_simulated": True, "simulated_root_der": platform.root_der}


# ---- real quotes -----------------------------------------------------------------------------------


def test_real_quote_verifies_up_to_date_at_the_pinned_time():
    claims = verify_quote(real_quote(), collateral=real_collateral(), now=FIXTURE_NOW)
    parsed = parse_quote_unverified(real_quote())
    assert (claims.tcb_status, claims.advisory_ids, claims.simulated, claims.debug) == ("UpToDate", (), False, False)
    assert claims.fmspc == "B0C06F000000"
    assert claims.device_id == hashlib.sha256(bytes.fromhex("811dca2a26b952e85bb6448b097ba4fd")).digest()  # PPID
    assert (claims.mrtd, claims.rtmr3, claims.report_data) == (parsed.body.mrtd, parsed.body.rtmr3, parsed.report_data)


def test_real_quote_accepts_a_collateral_object_and_ignores_the_simulation_pin(platform):
    collateral = dcap_qvl.QuoteCollateralV3.from_json(real_collateral())
    claims = verify_quote(real_quote(), collateral=collateral, **simulated_ok(platform) | {"now": FIXTURE_NOW})
    assert claims.tcb_status == "UpToDate" and not claims.simulated


def test_real_quote_with_stale_collateral_now_is_refused_in_clear_words():
    with pytest.raises(QuoteRejected, match="CRL in the collateral has expired") as refused:
        verify_quote(real_quote(), collateral=real_collateral(), now=int(time.time()))
    assert "CrlExpired" in refused.value.detail


def test_outdated_platform_is_never_up_to_date():
    # dcap-qvl 0.7.0 finds no TCB level at all for this platform (it is older than every level Intel lists),
    # so the answer is a refusal rather than an OutOfDate claim.
    raw = (FIXTURES / "tdx_quote_outdated").read_bytes()
    collateral = (FIXTURES / "tdx_quote_outdated_collateral.json").read_text()
    with pytest.raises(QuoteRejected, match="below every level") as refused:
        verify_quote(raw, collateral=collateral, now=OUTDATED_NOW)
    assert "No matching TCB level" in refused.value.detail


@pytest.mark.parametrize(
    "collateral, reason",
    [
        (None, "no DCAP collateral"),
        ("{not json", "collateral is malformed"),
        (lambda: (FIXTURES / "tdx_quote_outdated_collateral.json").read_text(), "DCAP verification failed|dcap-qvl"),
    ],
    ids=["missing", "malformed", "another platform's"],
)
def test_real_quote_needs_its_own_collateral(collateral, reason):
    collateral = collateral() if callable(collateral) else collateral
    with pytest.raises(QuoteRejected, match=reason):
        verify_quote(real_quote(), collateral=collateral, now=FIXTURE_NOW)


def test_every_region_of_a_real_quote_is_protected():
    quote, collateral = real_quote(), dcap_qvl.QuoteCollateralV3.from_json(real_collateral())
    # + a PEM newline (whitespace: same DER) and a character of the embedded Intel root, which dcap-qvl ignores
    for position in region_edges(quote) + [2000, 4035, len(quote) - 1]:
        for mask in (0x01, 0x80):
            tampered = bytearray(quote)
            tampered[position] ^= mask
            with pytest.raises(AttestationError):
                verify_quote(bytes(tampered), collateral=collateral, now=FIXTURE_NOW)


def test_the_embedded_intel_root_must_be_intels():
    tampered = bytearray(real_quote())
    tampered[4035] ^= 0x01  # still parses as a certificate, but no longer the Intel SGX Root CA
    with pytest.raises(QuoteRejected, match="neither at Intel's SGX Root CA nor at a simulated root"):
        verify_quote(bytes(tampered), collateral=real_collateral(), now=FIXTURE_NOW)


def test_caller_mistakes_are_type_and_value_errors(platform):
    quote, _ = attested_boot(platform)
    with pytest.raises(TypeError):
        verify_quote(quote.hex(), now=SIM_NOW)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="now"):
        verify_quote(quote, now=-1)
    with pytest.raises(ValueError, match="simulated_root_der"):
        verify_quote(quote, now=SIM_NOW, allow_simulated=True)
    with pytest.raises(TypeError, match="collateral"):
        verify_quote(real_quote(), collateral=42, now=FIXTURE_NOW)  # type: ignore[arg-type]


# ---- simulated quotes ------------------------------------------------------------------------------


def test_simulated_quote_verifies_only_when_allowed_and_pinned(platform):
    quote, _ = attested_boot(platform)
    claims = verify_quote(quote, **simulated_ok(platform))
    assert claims.simulated and claims.tcb_status == "UpToDate" and claims.advisory_ids == ()
    assert (claims.mrtd, claims.rtmr0, claims.rtmr1, claims.rtmr2) == (
        SIMULATED_MRTD, SIMULATED_RTMR0, SIMULATED_RTMR1, SIMULATED_RTMR2,
    )
    assert claims.device_id == SIMULATED_DEVICE_ID and claims.fmspc is None
    assert claims.report_data == REPORT_DATA
    with pytest.raises(SimulatedQuoteNotAllowed, match="SIMULATED"):
        verify_quote(quote, now=SIM_NOW)
    with pytest.raises(SimulatedQuoteNotAllowed):
        verify_quote(quote, now=SIM_NOW, simulated_root_der=platform.root_der)


def test_simulated_quote_from_another_simulated_root_is_refused(platform, other_platform):
    quote, _ = attested_boot(other_platform)
    with pytest.raises(QuoteRejected, match="not the pinned simulated root"):
        verify_quote(quote, **simulated_ok(platform))


def test_simulated_debug_td_is_refused(platform):
    quote, _ = attested_boot(platform, td_attributes=1)
    with pytest.raises(QuoteRejected, match="debug"):
        verify_quote(quote, **simulated_ok(platform))


def test_simulated_chain_must_be_valid_at_now(platform):
    quote, _ = attested_boot(platform)
    with pytest.raises(QuoteRejected, match="not valid at the verification time"):
        verify_quote(quote, **simulated_ok(platform) | {"now": SIM_NOW + 20 * 365 * 86400})
    with pytest.raises(QuoteRejected, match="not valid at the verification time"):
        verify_quote(quote, **simulated_ok(platform) | {"now": SIM_NOW - 2 * 86400})


def resigned(quote: bytes, *, attestation_key: ec.EllipticCurvePrivateKey, rebind: bool = False) -> bytes:
    """The same quote signed by ``attestation_key``; the QE report (and its PCK signature) is kept."""
    parsed = parse_quote_unverified(quote)
    point = attestation_key.public_key().public_numbers()
    raw_key = point.x.to_bytes(32, "big") + point.y.to_bytes(32, "big")
    signature = ecdsa_der_to_raw(attestation_key.sign(parsed.signed_region, ec.ECDSA(hashes.SHA256())))
    return assemble_quote(
        parsed.signed_region,
        quote_signature=signature,
        attestation_key=raw_key,
        qe_report=parsed.qe_report.raw,
        qe_report_signature=parsed.qe_report_signature,
        qe_auth_data=parsed.qe_auth_data,
        pck_cert_chain_pem=parsed.pck_cert_chain_pem,
    )


def test_each_signature_in_a_simulated_quote_is_checked(platform, other_platform):
    ok = simulated_ok(platform)
    cases = {
        # the QE report is signed by a PCK key that is not the certificate's
        "QE report signature does not verify": dataclasses.replace(platform, pck_key=other_platform.pck_key),
        # a PCK certificate from another platform under this platform's CA name
        "not signed by its issuer": dataclasses.replace(
            platform, pck_cert=other_platform.pck_cert, pck_key=other_platform.pck_key
        ),
    }
    for reason, forged_platform in cases.items():
        with pytest.raises(QuoteRejected, match=reason):
            verify_quote(attested_boot(forged_platform)[0], **ok)
    quote, _ = attested_boot(platform)
    stranger = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(QuoteRejected, match="does not bind the quote's attestation key"):
        verify_quote(resigned(quote, attestation_key=stranger), **ok)
    forged = bytearray(resigned(quote, attestation_key=stranger))
    forged[700:764] = parse_quote_unverified(quote).attestation_key  # genuine key, stranger's signature
    with pytest.raises(QuoteRejected, match="quote signature does not verify"):
        verify_quote(bytes(forged), **ok)


def region_edges(quote: bytes) -> list[int]:
    """First and last byte of every region of a v4 quote: header fields, body fields, signature data."""
    parsed = parse_quote_unverified(quote)
    auth = len(parsed.qe_auth_data)
    starts = [0, 2, 4, 8, 10, 12, 28]  # header: version, key type, tee type, qe_svn, pce_svn, vendor, user data
    starts += [48 + o for o in (0, 16, 64, 112, 120, 128, 136, 184, 232, 280, 328, 376, 424, 472, 520)]  # body
    starts += [632, 636, 700, 764, 766, 770, 1154, 1218, 1220, 1220 + auth, 1222 + auth, 1226 + auth]
    end_of_chain = len(quote) - parsed.trailing_zero_padding
    ends = starts[1:] + [end_of_chain]
    middle_of_chain = (1226 + auth + end_of_chain) // 2
    return sorted({edge for start, end in zip(starts, ends) for edge in (start, end - 1)} | {middle_of_chain})


def test_every_region_of_a_simulated_quote_is_protected(platform):
    quote, _ = attested_boot(platform)
    for position in region_edges(quote):
        for mask in (0x01, 0x80):
            tampered = bytearray(quote)
            tampered[position] ^= mask
            with pytest.raises(AttestationError):
                verify_quote(bytes(tampered), **simulated_ok(platform))


def test_padding_and_non_canonical_pem_are_refused_for_simulated_quotes(platform):
    quote, _ = attested_boot(platform)
    with pytest.raises(QuoteFormatError, match="no padding"):
        verify_quote(quote + bytes(4), **simulated_ok(platform))
    parsed = parse_quote_unverified(quote)
    crlf = assemble_quote(
        parsed.signed_region,
        quote_signature=parsed.quote_signature,
        attestation_key=parsed.attestation_key,
        qe_report=parsed.qe_report.raw,
        qe_report_signature=parsed.qe_report_signature,
        qe_auth_data=parsed.qe_auth_data,
        pck_cert_chain_pem=parsed.pck_cert_chain_pem.replace(b"\n", b"\r\n"),
    )
    with pytest.raises(QuoteFormatError, match="canonical PEM"):
        verify_quote(crlf, **simulated_ok(platform))


@pytest.mark.parametrize("kind", ["simulated", "real"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_flipped_byte_is_refused(platform, kind, data):
    if kind == "real":
        quote, options = real_quote(), {"collateral": real_collateral(), "now": FIXTURE_NOW}
    else:
        quote, options = attested_boot(platform)[0], simulated_ok(platform)
    position = data.draw(st.integers(0, len(quote) - 1), label="position")
    mask = data.draw(st.integers(1, 255), label="mask")
    tampered = bytearray(quote)
    tampered[position] ^= mask
    with pytest.raises(AttestationError):
        verify_quote(bytes(tampered), **options)


# ---- the simulated platform's state ----------------------------------------------------------------


def test_simulated_platform_persists_with_private_keys_0600(tmp_path):
    first = SimulatedTdx.load_or_create(tmp_path / "state", now=SIM_NOW)
    again = SimulatedTdx.load_or_create(tmp_path / "state")
    assert again.root_der == first.root_der
    assert again.simulated_root_fingerprint() == hashlib.sha256(first.root_der).digest()
    assert SIMULATED_ROOT_CN in first.root_cert.subject.rfc4514_string()
    key_files = [p for p in (tmp_path / "state").iterdir() if b"PRIVATE KEY" in p.read_bytes()]
    assert len(key_files) == 1 and stat.S_IMODE(os.stat(key_files[0]).st_mode) == 0o600
    quote, _ = attested_boot(first)
    assert verify_quote(quote, **simulated_ok(again)).simulated


def test_simulated_platform_checks_its_inputs(platform):
    with pytest.raises(ValueError, match="64 bytes"):
        platform.make_quote(b"short", rtmr3=bytes(48))
    with pytest.raises(ValueError, match="32 bytes"):
        mr_config_id_v1(bytes(20))
    assert mr_config_id_v1(COMPOSE_HASH) == b"\x01" + COMPOSE_HASH + bytes(15)


# ---- the attested boot -----------------------------------------------------------------------------


def test_verify_attestation_returns_the_boot_from_the_log(platform):
    quote, log = attested_boot(platform)
    boot = verify_attestation(quote, log, expected_report_data=REPORT_DATA, **simulated_ok(platform))
    claims = boot.claims
    assert (boot.app_id, boot.compose_hash, boot.simulated) == (APP_ID, COMPOSE_HASH, True)
    assert boot.instance_id == hashlib.sha256(b"seed" + APP_ID).digest()[:20]
    assert boot.key_provider_info == KEY_PROVIDER and boot.events.key_provider["name"] == "kms"
    assert boot.device_id == SIMULATED_DEVICE_ID and boot.tcb_status == "UpToDate" and boot.os_image_hash is None
    # dstack's formulas (docs/design.md, "dstack formats"), computed here independently:
    assert boot.mr_system == hashlib.sha256(
        SIMULATED_MRTD + SIMULATED_RTMR0 + SIMULATED_RTMR1 + SIMULATED_RTMR2 + hashlib.sha256(KEY_PROVIDER).digest()
    ).digest()
    assert boot.mr_aggregated == hashlib.sha256(
        SIMULATED_MRTD + SIMULATED_RTMR0 + SIMULATED_RTMR1 + SIMULATED_RTMR2 + claims.rtmr3
        + mr_config_id_v1(COMPOSE_HASH) + bytes(48) + bytes(48)
    ).digest()


def test_mr_aggregated_leaves_out_all_zero_owner_fields(platform):
    quote, log = attested_boot(platform, mr_config_id=bytes(48))
    boot = verify_attestation(quote, log, **simulated_ok(platform))
    c = boot.claims
    assert boot.mr_aggregated == hashlib.sha256(c.mrtd + c.rtmr0 + c.rtmr1 + c.rtmr2 + c.rtmr3).digest()


def test_short_expected_report_data_is_zero_padded_like_get_quote(platform):
    quote = platform.make_quote(b"nonce".ljust(64, b"\0"), rtmr3=replay_rtmr(e.digest for e in boot_log()))
    assert verify_attestation(quote, event_log_json(boot_log()), expected_report_data=b"nonce", **simulated_ok(platform))


def test_report_data_mismatch_is_refused(platform):
    quote, log = attested_boot(platform)
    with pytest.raises(ReportDataMismatch):
        verify_attestation(quote, log, expected_report_data=hashlib.sha512(b"other").digest(), **simulated_ok(platform))
    with pytest.raises(ValueError, match="64 bytes"):
        verify_attestation(quote, log, expected_report_data=bytes(65), **simulated_ok(platform))


def test_event_log_must_replay_to_the_quoted_rtmr3(platform):
    quote, log = attested_boot(platform)
    entries = json.loads(log)
    tampered = [dict(e) for e in entries]
    tampered[2]["event_payload"] = hashlib.sha256(b"another recipe").hexdigest()
    reordered = [entries[0], entries[2], entries[1], *entries[3:]]
    extra = entries + [RuntimeEvent.measure("late", b"x").to_entry()]
    for bad_log, reason in (
        (json.dumps(tampered), "does not match its payload"),
        (json.dumps(reordered), "does not give the quote's RTMR3"),
        (json.dumps(extra), "does not give the quote's RTMR3"),
        (json.dumps(entries[:-1]), "does not give the quote's RTMR3"),
    ):
        with pytest.raises(EventLogMismatch, match=reason):
            verify_attestation(quote, bad_log, **simulated_ok(platform))


def test_mr_config_id_v1_must_name_the_logged_compose_hash(platform):
    quote, log = attested_boot(platform, mr_config_id=mr_config_id_v1(hashlib.sha256(b"other compose").digest()))
    with pytest.raises(EventLogMismatch, match="MRCONFIGID"):
        verify_attestation(quote, log, **simulated_ok(platform))


def test_the_error_tree():
    assert issubclass(SimulatedQuoteNotAllowed, QuoteRejected)
    for error in (QuoteFormatError, QuoteRejected, EventLogMismatch, ReportDataMismatch):
        assert issubclass(error, AttestationError)
    assert not issubclass(AttestationError, (ValueError, TypeError))
