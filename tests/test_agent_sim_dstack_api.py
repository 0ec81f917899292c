"""The rest of dstack's guest API on the SIMULATED agent, exercised through dstack-sdk 0.5.4's own clients: GetTlsKey
(RA-TLS certificates: dstack's OIDs, a quote binding the certificate key, a chain to the app's CA derived from the
app key), Attest (dstack's versioned attestation, V0 SCALE), and the legacy Tappd socket (DeriveKey, TdxQuote,
Info). Everything the tests check is recomputed here, from the test KMS root, not read back from the agent."""

from __future__ import annotations

import datetime
import hashlib
import json
import time

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store
from dstack_sdk import DstackClient, TappdClient
from eth_keys import keys
from eth_utils import keccak

from cvm.agent_sim import AgentServer, AppKeyGrant, GuestAgentSimulator
from cvm.attest import versioned_attestation
from cvm.attest.simulated import SimulatedTdx
from cvm.attest.verify import verify_attestation

APP_ID = bytes.fromhex("7a2b9e4c1d3f5a6b8c9d0e1f2a3b4c5d6e7f8091")
APP_COMPOSE = json.dumps({"manifest_version": 2, "name": "ratls-study", "runner": "docker-compose",
                          "docker_compose_file": "services: {}"}, separators=(",", ":"), sort_keys=True).encode()
KMS_ROOT = keys.PrivateKey(hashlib.sha256(b"test KMS root for the RA-TLS tests").digest())
OID = {name: x509.ObjectIdentifier(f"1.3.6.1.4.1.62397.1.{n}")
       for name, n in (("quote", 1), ("event_log", 2), ("app_id", 3), ("usage", 4))}
TAPPD = pytest.mark.filterwarnings("ignore:.*deprecated.*:DeprecationWarning")


def hkdf(ikm: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"RATLS", info=info).derive(ikm)


def app_key() -> bytes:
    return hkdf(KMS_ROOT.to_bytes(), APP_ID + b"app-key")


class TestKms:
    """Issues the app key the dstack way: derived from the root, signed over dstack-kms-issued."""

    def kms_root_pubkey(self) -> bytes:
        return KMS_ROOT.public_key.to_compressed_bytes()

    def get_app_key(self, attest) -> AppKeyGrant:
        public = keys.PrivateKey(app_key()).public_key.to_compressed_bytes()
        signature = KMS_ROOT.sign_msg_hash(keccak(b"dstack-kms-issued:" + APP_ID + public)).to_bytes()
        return AppKeyGrant(k256_key=app_key(), k256_signature=signature, kms_root_pubkey=self.kms_root_pubkey())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    state_dir = tmp_path_factory.mktemp("ratls-agent")
    agent = GuestAgentSimulator.boot(APP_COMPOSE, APP_ID, TestKms(), state_dir)
    pinned_root = SimulatedTdx.load_or_create(state_dir).root_der
    with AgentServer(agent, state_dir / "dstack.sock") as guest, \
            AgentServer(agent, state_dir / "tappd.sock", service="tappd") as tappd:
        yield guest.socket_path, tappd.socket_path, pinned_root


@pytest.fixture
def client(served, monkeypatch):
    monkeypatch.setenv("DSTACK_SIMULATOR_ENDPOINT", str(served[0]))
    dstack = DstackClient()
    with dstack:  # (the SDK's __enter__ returns its async twin, so keep our own reference)
        yield dstack


@pytest.fixture
def tappd(served, monkeypatch):
    monkeypatch.setenv("TAPPD_SIMULATOR_ENDPOINT", str(served[1]))
    with pytest.warns(DeprecationWarning):
        legacy = TappdClient()
    with legacy:
        yield legacy


def der_octets(der: bytes) -> bytes:
    """An independent DER OCTET STRING reader (short and long lengths)."""
    assert der[0] == 0x04
    if der[1] < 0x80:
        length, start = der[1], 2
    else:
        size = der[1] & 0x7F
        length, start = int.from_bytes(der[2:2 + size], "big"), 2 + size
    assert len(der) == start + length
    return der[start:]


def extension(cert: x509.Certificate, name: str) -> bytes | None:
    try:
        return der_octets(cert.extensions.get_extension_for_oid(OID[name]).value.value)
    except x509.ExtensionNotFound:
        return None


def chain_of(response) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(pem.encode()) for pem in response.certificate_chain]


def expected_app_ca_public() -> bytes:
    """The app CA's key, derived here from the app key: HKDF(app key, "RATLS", app_id ‖ "app-ca"), a P-256 scalar."""
    scalar = int.from_bytes(hkdf(app_key(), APP_ID + b"app-ca"), "big")
    return ec.derive_private_key(scalar, ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)


def spki(cert_or_key) -> bytes:
    key = cert_or_key.public_key()
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def check_chains_to_the_app_key(leaf: x509.Certificate, ca: x509.Certificate) -> None:
    leaf.verify_directly_issued_by(ca)
    ca.verify_directly_issued_by(ca)
    assert ca.public_key().public_bytes(serialization.Encoding.X962,
                                        serialization.PublicFormat.CompressedPoint) == expected_app_ca_public()
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value == x509.BasicConstraints(True, 0)
    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dstack App CA"
    assert extension(ca, "app_id") == APP_ID and extension(ca, "usage") == b"app:ca"


def verified_quote(cert: x509.Certificate, pinned_root: bytes):
    """The certificate's quote verifies as simulated, and its report_data is dstack's RA-TLS binding of the
    certificate's key: sha512("ratls-cert:" ‖ SubjectPublicKeyInfo DER)."""
    return verify_attestation(extension(cert, "quote"), extension(cert, "event_log").decode(),
                              expected_report_data=hashlib.sha512(b"ratls-cert:" + spki(cert)).digest(),
                              now=int(time.time()), allow_simulated=True, simulated_root_der=pinned_root)


# ---- GetTlsKey -----------------------------------------------------------------------------------------------------


def test_ra_tls_certificate_carries_a_quote_binding_its_key_and_chains_to_the_app_ca(client, served):
    response = client.get_tls_key(subject="study.example", alt_names=["study.example", "api.study.example"],
                                  usage_ra_tls=True, usage_server_auth=True, usage_client_auth=True)
    key = serialization.load_pem_private_key(response.key.encode(), password=None)
    assert response.key.startswith("-----BEGIN PRIVATE KEY-----") and len(response.as_uint8array()) > 0
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1)
    leaf, ca = chain_of(response)
    assert spki(leaf) == spki(key)
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "study.example"
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName) == ["study.example", "api.study.example"]
    assert set(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert extension(leaf, "app_id") == APP_ID and extension(leaf, "usage") == b"app:custom"
    boot = verified_quote(leaf, served[2])
    assert boot.simulated and boot.app_id == APP_ID and boot.compose_hash == hashlib.sha256(APP_COMPOSE).digest()
    assert boot.events.key_provider["id"] == KMS_ROOT.public_key.to_compressed_bytes().hex()
    check_chains_to_the_app_key(leaf, ca)
    # a standard X.509 path validation (cryptography's, webpki rules) accepts it for the server name
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName("api.study.example"))
    assert verifier.verify(leaf, [])[-1] == ca


def test_each_call_gets_a_fresh_key_under_the_same_app_ca(client):
    first, second = client.get_tls_key(), client.get_tls_key()
    assert first.key != second.key
    assert first.certificate_chain[1] == second.certificate_chain[1]


def test_the_request_flags_are_honoured(client):
    plain = chain_of(client.get_tls_key())[0]   # the SDK's defaults: server auth, no RA-TLS, no subject
    assert extension(plain, "quote") is None and extension(plain, "event_log") is None
    assert list(plain.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    assert list(plain.subject) == []
    with pytest.raises(x509.ExtensionNotFound):
        plain.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    client_only = chain_of(client.get_tls_key("peer", usage_server_auth=False, usage_client_auth=True))[0]
    assert list(client_only.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    neither = chain_of(client.get_tls_key("bare", usage_server_auth=False))[0]
    with pytest.raises(x509.ExtensionNotFound):
        neither.extensions.get_extension_for_class(x509.ExtendedKeyUsage)


def test_validity_options_are_honoured_and_bad_ones_refused(client):
    start, end = 1_900_000_000, 1_900_086_400
    leaf = chain_of(client.get_tls_key("timed", not_before=start, not_after=end))[0]
    assert (leaf.not_valid_before_utc, leaf.not_valid_after_utc) == (
        datetime.datetime.fromtimestamp(start, datetime.timezone.utc),
        datetime.datetime.fromtimestamp(end, datetime.timezone.utc))
    for kwargs, said in (({"not_before": end, "not_after": start}, "not_after must be later"),
                         ({"with_app_info": True}, "with_app_info")):
        with pytest.raises(httpx.HTTPStatusError) as refused:
            client.get_tls_key("x", **kwargs)
        assert refused.value.response.status_code == 400 and said in refused.value.response.json()["error"]


def test_info_carries_the_demo_certificate(client, served):
    leaf, ca = (x509.load_pem_x509_certificate(b) for b in _pem_blocks(client.info().app_cert))
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "demo-cert"
    verified_quote(leaf, served[2])
    check_chains_to_the_app_key(leaf, ca)


def _pem_blocks(text: str) -> list[bytes]:
    end = "-----END CERTIFICATE-----"
    return [(block + end).strip().encode() for block in text.split(end) if block.strip()]


# ---- Attest --------------------------------------------------------------------------------------------------------


def test_attest_returns_dstacks_versioned_attestation(client, served):
    raw = client.attest(b"fresh nonce").decode_attestation()
    assert raw[:2] == b"\x00\x00"   # VersionedAttestation::V0, AttestationQuote::DstackTdx
    attestation = versioned_attestation.decode(raw)
    assert attestation.report_data == b"fresh nonce".ljust(64, b"\0")
    assert json.loads(attestation.config) == {"simulated": True, "os_image_hash": client.info().os_image_hash}
    assert attestation.runtime_events == ()
    log = json.dumps([event.to_entry() for event in attestation.event_log])
    boot = verify_attestation(attestation.quote, log, expected_report_data=b"fresh nonce", now=int(time.time()),
                              allow_simulated=True, simulated_root_der=served[2])
    assert boot.app_id == APP_ID
    assert versioned_attestation.encode(attestation) == raw
    with pytest.raises(versioned_attestation.AttestationFormatError):
        versioned_attestation.decode(raw + b"\0")
    with pytest.raises(versioned_attestation.AttestationFormatError):
        versioned_attestation.decode(raw[:-1])


# ---- the legacy Tappd socket ---------------------------------------------------------------------------------------


@TAPPD
def test_tappd_derive_key_is_the_app_keys_path_key_with_a_certificate(tappd):
    first = tappd.derive_key("tls/server", subject="server", alt_names=["server.example"])
    again = tappd.derive_key("tls/server", subject="server")
    assert first.key == again.key
    key = serialization.load_pem_private_key(first.key.encode(), password=None)
    assert key.private_numbers().private_value == int.from_bytes(hkdf(app_key(), b"tls/server"), "big")
    leaf, ca = chain_of(first)
    assert spki(leaf) == spki(key)
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "server"
    assert extension(leaf, "quote") is None   # Tappd's usage_ra_tls defaults to false
    check_chains_to_the_app_key(leaf, ca)
    assert tappd.derive_key("tls/other").key != first.key


@TAPPD
def test_tappd_tdx_quote_hashes_or_passes_report_data_like_dstack(tappd, served):
    raw = tappd.tdx_quote(b"hello", "raw")   # the SDK zero-fills raw report data on the left to 64 bytes
    hashed = tappd.tdx_quote(b"hello", "sha256")
    for response, expected in ((raw, b"hello".rjust(64, b"\0")),
                               (hashed, hashlib.sha256(b"app-data:hello").digest())):
        boot = verify_attestation(response.decode_quote(), response.event_log, expected_report_data=expected,
                                  now=int(time.time()), allow_simulated=True, simulated_root_der=served[2])
        assert boot.app_id == APP_ID
    # without an algorithm the SDK sends "raw" without filling: like dstack's, the agent wants exactly 64 bytes
    for algorithm in (None, "md5"):
        with pytest.raises(httpx.HTTPStatusError) as refused:
            tappd.tdx_quote(b"hello", algorithm)
        assert refused.value.response.status_code == 400


@TAPPD
def test_tappd_info_and_the_two_services_stay_apart(tappd, client, served):
    info = tappd.info()
    assert info.app_id == APP_ID.hex() and info.tcb_info.mrtd == client.info().tcb_info.mrtd
    with pytest.raises(httpx.HTTPStatusError) as missing:
        tappd.get_tls_key()   # DstackGuest's method is not on the Tappd socket ...
    assert missing.value.response.status_code == 404
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(served[0])), base_url="http://localhost") as guest:
        # ... and Tappd's are not on the DstackGuest one
        assert guest.post("/prpc/Tappd.TdxQuote", json={"report_data": "00"}).status_code == 404
        assert guest.post("/TdxQuote", json={"report_data": "00"}).status_code == 404
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(served[1])), base_url="http://localhost") as legacy:
        answer = legacy.post("/prpc/Tappd.TdxQuote", json={"report_data": "61"}).json()   # dstack's defaults
        assert (answer["hash_algorithm"], answer["prefix"]) == ("sha512", "app-data")
        assert legacy.post("/prpc/Tappd.DeriveK256Key", json={"path": "p", "purpose": "q"}).json()["k256_key"] == \
            hkdf(app_key(), b"p").hex()


def test_versioned_attestation_lengths_use_scales_compact_forms():
    from cvm.attest.eventlog import RuntimeEvent

    event = RuntimeEvent.measure("app-id", APP_ID)
    for size, prefix in ((63, bytes([63 << 2])), (64, ((64 << 2) | 1).to_bytes(2, "little")),
                         (20_000, ((20_000 << 2) | 2).to_bytes(4, "little"))):
        attestation = versioned_attestation.VersionedAttestationV0(
            quote=b"q" * size, event_log=(event,), report_data=bytes(64), config="{}")
        raw = versioned_attestation.encode(attestation)
        assert raw[2:2 + len(prefix)] == prefix
        assert versioned_attestation.decode(raw) == attestation
    # a length written in a longer form than it needs is refused (one encoding per attestation)
    padded = b"\x00\x00" + ((5 << 2) | 1).to_bytes(2, "little") + b"q" * 5
    with pytest.raises(versioned_attestation.AttestationFormatError, match="shortest form"):
        versioned_attestation.decode(padded)
