"""Fixed test vectors for every byte layout Sealroom signs or hashes.

Each expected value is built here by hand from the layout its docstring (and docs/design.md) documents: literal
hex, or an explicit concatenation of literal byte strings, hashed with hashlib / eth_utils.keccak, never with the
code under test. Each layout also has its digest as a literal, computed once from those hand-built bytes, so a
change to a layout, a label or an encoding fails here even if both sides of a comparison changed together.

Addresses are well-known literals: 0x7E5F…5Bdf is the address of the secp256k1 private key 1; 0x5aAeb…BeAed is an
EIP-55 example; 0x5FbDB…0aa3 is the first contract anvil's default account deploys.
"""

from __future__ import annotations

import hashlib
import json
import types
from datetime import UTC, datetime

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from eth_keys import keys as eth_keys
from eth_utils import keccak

from cvm.aggregator import aggregator_report_data
from cvm.federated import sign_update, vector_digest
from cvm.federated.updates import update_message_hash
from cvm.receipt import ChainEvidence, build_envelope, envelope_digest, sign_and_attest
from cvm.sealed.envelope import (
    Envelope,
    EnvelopeHeader,
    encode_head,
    encode_tail,
    sign_envelope,
)
from cvm.sealed.keywrap import WrappedKey
from cvm.sealed.source import SchemaField
from kms.keys import RootKeys, sign_app_key, sign_owner_seal_pubkey
from kms.service import AttestedCaller, KeyManagementService
from kms_client import wire
from kms_client.box import attestation_report_data, raw_public
from kms_client.messages import app_key_issued_digest, owner_seal_pubkey_digest

H = bytes.fromhex

APP_ID = H("5fbdb2315678afecb367f032d93f642f64180aa3")
APP_ID_CHECKSUM = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
COMPOSE_HASH = H("22" * 32)
KEY_ONE = eth_keys.PrivateKey(H("00" * 31 + "01"))            # the secp256k1 private key 1
KEY_ONE_ADDRESS = "0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf"
KEY_ONE_PUBLIC = H("0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798")   # G, compressed
EIP55_ADDRESS = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
NONCE = H("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
PUB = H("202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f")


def recovers_to(signature: bytes, digest: bytes) -> bytes:
    return eth_keys.Signature(signature).recover_public_key_from_msg_hash(digest).to_compressed_bytes()


def test_the_well_known_literals_are_what_they_claim():
    assert KEY_ONE.public_key.to_compressed_bytes() == KEY_ONE_PUBLIC
    assert KEY_ONE.public_key.to_checksum_address() == KEY_ONE_ADDRESS


# ---------------------------------------------------------------------------------- report data


def test_kms_report_data_vector():
    """kms_client/box.py: report_data = sha512(b"sealroom-kms-attest/v1:" ‖ nonce ‖ ephemeral X25519 public key)."""
    expected_bytes = b"sealroom-kms-attest/v1:" + NONCE + PUB
    assert len(expected_bytes) == 23 + 32 + 32
    expected = hashlib.sha512(expected_bytes).digest()
    assert attestation_report_data(NONCE, PUB) == expected
    assert expected.hex() == ("d78c6aa4d95ff56311eda1696ab5797b8165ccfc9d35d556fc084281c7abf379"
                              "0c53f337d901677e59ff659dda020a403bfb82376d0f035841f01856f9cb2f29")


def test_aggregator_report_data_vector():
    """cvm/labels.py, cvm/aggregator.py: report_data = sha512(b"sealroom-fed-aggregator/v1:" ‖ nonce ‖ pubkey)."""
    nonce = H("ab" * 16)
    expected = hashlib.sha512(b"sealroom-fed-aggregator/v1:" + nonce + NONCE).digest()
    assert aggregator_report_data(nonce, NONCE) == expected
    assert expected.hex() == ("57fc00861a0fae24d1e74fe2e48c18f9dea1a7f0973bd862dd858fba87253168"
                              "f2cc83911fbc83ca5e3e6de1dba3f22a157799713e5ff9f146db78ba98d3701d")


# ---------------------------------------------------------------------------------- result envelope

PAYLOAD_JSON = '{"note":"Zürich","output_type":"aggregate_stats","queries":{"mean_age":51.25,"patients":4000}}'
PAYLOAD_SHA256 = "11d886684f6c5211d31d50d4e8e00fff243edc854fbe716b249d371c4811d801"
ENVELOPE_DIGEST = "2a35d73905c8d4b2b2d56da85a076b2b0e74a06fe56c5e2eb6476219f4723899"


def result_envelope() -> dict:
    chain = ChainEvidence(chain_id=31337, dstack_app=APP_ID_CHECKSUM, dstack_kms="0x" + "12" * 20,
                          kms_root_address=KEY_ONE_ADDRESS, block=42, approvals=[])
    payload = {"output_type": "aggregate_stats", "queries": {"patients": 4000, "mean_age": 51.25}, "note": "Zürich"}
    return build_envelope(
        payload=payload, app_id=APP_ID, compose_hash=COMPOSE_HASH, chain=chain, epsilon_spent=0.25,
        epsilon_remaining=0.75, inputs={"EU-West": {"owner": KEY_ONE_ADDRESS, "ciphertext_sha256": "33" * 32}},
        release={"tx": "0x" + "55" * 32, "release_id": "44" * 32}, simulated=True)


def test_result_envelope_digest_vector():
    """cvm/receipt.py: envelope_digest = sha256(b"sealroom-result/v1:" ‖ normalised JSON of the envelope): keys
    sorted at every level, separators "," and ":", UTF-8 as-is; payload_sha256 = sha256(normalised payload)."""
    payload = PAYLOAD_JSON.encode("utf-8")
    assert b"Z\xc3\xbcrich" in payload                                  # UTF-8, not \\u00fc
    assert hashlib.sha256(payload).hexdigest() == PAYLOAD_SHA256
    normalised = (
        b'{"app_id":"0x5fbdb2315678afecb367f032d93f642f64180aa3","block":42,"chain_id":31337,'
        b'"compose_hash":"' + b"22" * 32 + b'","dstack_app":"0x5FbDB2315678afecb367f032d93F642f64180aa3",'
        b'"dstack_kms":"0x' + b"12" * 20 + b'","epsilon_remaining":0.75,"epsilon_spent":0.25,'
        b'"format":"sealroom-result/v1",'
        b'"inputs":{"EU-West":{"ciphertext_sha256":"' + b"33" * 32 + b'","owner":"' + KEY_ONE_ADDRESS.encode() + b'"}},'
        b'"output_type":"aggregate_stats","payload":' + payload
        + b',"payload_sha256":"' + PAYLOAD_SHA256.encode() + b'",'
        b'"release":{"release_id":"' + b"44" * 32 + b'","tx":"0x' + b"55" * 32 + b'"},"simulated":true}'
    )
    envelope = result_envelope()
    expected = hashlib.sha256(b"sealroom-result/v1:" + normalised).digest()
    assert envelope_digest(envelope) == expected
    assert expected.hex() == ENVELOPE_DIGEST
    # The same envelope, parsed back from any spelling of its JSON, has the same digest.
    assert envelope_digest(json.loads(json.dumps(envelope, indent=2))) == expected


def test_the_result_is_signed_and_quoted_over_the_envelope_digest():
    """cvm/receipt.py: the guest agent's Sign (secp256k1) signs the digest, and the quote's report_data is the digest
    (the agent zero-pads it to 64 bytes)."""
    calls = []

    class Agent:
        def sign(self, algorithm, data):
            calls.append(("sign", algorithm, data))
            return types.SimpleNamespace(signature="aa", public_key="bb", signature_chain=["aa", "cc", "dd"])

        def get_quote(self, report_data):
            calls.append(("quote", report_data))
            return types.SimpleNamespace(quote="ee", event_log="[]")

    chain = ChainEvidence(chain_id=31337, dstack_app=APP_ID_CHECKSUM, dstack_kms="0x" + "12" * 20,
                          kms_root_address=KEY_ONE_ADDRESS, block=42, approvals=[])
    attestation = sign_and_attest(result_envelope(), dstack=Agent(), app_compose=b"{}", chain=chain)
    assert calls == [("sign", "secp256k1", H(ENVELOPE_DIGEST)), ("quote", H(ENVELOPE_DIGEST))]
    assert attestation["envelope_digest"] == ENVELOPE_DIGEST


# ---------------------------------------------------------------------------------- what the KMS root signs


def test_app_key_issued_digest_vector():
    """kms_client/messages.py (dstack's k256_signature): keccak256(b"dstack-kms-issued:" ‖ app_id (20) ‖ app
    public key, SEC1 compressed (33))."""
    expected = keccak(b"dstack-kms-issued:" + APP_ID + KEY_ONE_PUBLIC)
    assert app_key_issued_digest(APP_ID, KEY_ONE_PUBLIC) == expected
    assert expected.hex() == "34ec2e79f879f87a209ca1882b1008df5e8e2ae53d5ebc3605e9f1ea16217169"
    # and the KMS root signs exactly that digest
    root = RootKeys(k256_private_bytes=H("00" * 31 + "02"), derivation_secret=H("03" * 32))
    assert recovers_to(sign_app_key(root, APP_ID, KEY_ONE_PUBLIC), expected) == root.root_public_key_compressed


def test_owner_seal_pubkey_digest_vector():
    """kms_client/messages.py: keccak256(b"sealroom-owner-seal-pubkey/v1:" ‖ app_id (20) ‖ compose_hash (32) ‖
    owner (20) ‖ u64_be(timestamp) ‖ X25519 public key (32))."""
    owner, public, timestamp = H("7e5f4552091a69125d5dfcb7b8c2659029395bdf"), H("09" * 32), 1_700_000_000
    expected = keccak(b"sealroom-owner-seal-pubkey/v1:" + APP_ID + COMPOSE_HASH + owner + H("000000006553f100")
                      + public)
    assert owner_seal_pubkey_digest(APP_ID, COMPOSE_HASH, owner, public, timestamp) == expected
    assert expected.hex() == "a6bfb29a14e950e69254c58895ab6763b04035275b808243efeab4c9844fcd82"
    root = RootKeys(k256_private_bytes=H("00" * 31 + "02"), derivation_secret=H("03" * 32))
    signature = sign_owner_seal_pubkey(root, APP_ID, COMPOSE_HASH, owner, public, timestamp)
    assert recovers_to(signature, expected) == root.root_public_key_compressed


# ---------------------------------------------------------------------------------- sealed datasets

HEADER_JSON = (
    b'{"app_id":"0x5FbDB2315678afecb367f032d93F642f64180aa3","chunk_count":2,"chunk_size":64,'
    b'"compose_hash":"' + b"22" * 32 + b'","created_at":"2025-01-02T03:04:05Z",'
    b'"kms_root":"0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed","owner":"0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf",'
    b'"plaintext_bytes":100,"schema":[{"name":"age","type":"int64"},{"name":"n\xc3\xa9v","type":"string"}],'
    b'"source_format":"csv","version":1}'
)
WRAPPED_KEY_JSON = (b'{"ciphertext":"' + b"03" * 48 + b'","ephemeral_public_key":"' + b"01" * 32
                    + b'","nonce":"' + b"02" * 12 + b'"}')
ENVELOPE_MESSAGE = (
    b'sealroom-envelope/v1:'
    b'{"app_id":"0x5FbDB2315678afecb367f032d93F642f64180aa3","chunk_count":2,"chunk_size":64,'
    b'"ciphertext_sha256":"' + b"33" * 32 + b'",'
    b'"compose_hash":"' + b"22" * 32 + b'","created_at":"2025-01-02T03:04:05Z",'
    b'"kms_root":"0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed","owner":"0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf",'
    b'"plaintext_bytes":100,"rows":3,"schema":[{"name":"age","type":"int64"},{"name":"n\xc3\xa9v","type":"string"}],'
    b'"source_format":"csv","version":1,"wrapped_key":' + WRAPPED_KEY_JSON + b'}'
)


def sealed_header() -> EnvelopeHeader:
    return EnvelopeHeader(
        app_id=APP_ID, compose_hash=COMPOSE_HASH, owner=H(KEY_ONE_ADDRESS[2:]), kms_root=H(EIP55_ADDRESS[2:]),
        source_format="csv", schema=(SchemaField("age", "int64"), SchemaField("név", "string")),
        plaintext_bytes=100, chunk_size=64, chunk_count=2, created_at=datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC))


def wrapped_key() -> WrappedKey:
    return WrappedKey(ephemeral_public_key=H("01" * 32), nonce=H("02" * 12), ciphertext=H("03" * 48))


def test_sealed_header_digest_vector():
    """cvm/sealed/envelope.py: header digest = sha256(b"sealroom-header/v1:" ‖ canonical JSON of the header fields):
    sorted keys, no whitespace, UTF-8, addresses EIP-55, bytes lowercase hex, created_at YYYY-MM-DDTHH:MM:SSZ."""
    expected = hashlib.sha256(b"sealroom-header/v1:" + HEADER_JSON).digest()
    assert sealed_header().digest == expected
    assert expected.hex() == "b3d3b16351659a92f1153b88729bdddc34e6407fe8927e58ae797bf42bfcf454"


def test_sealed_head_block_layout():
    """The bytes before the payload: b"sealroom.sealed/v1\\n" ‖ u32_be(H) ‖ head JSON, the header fields and
    "wrapped_key" (which sorts last)."""
    head = HEADER_JSON[:-1] + b',"wrapped_key":' + WRAPPED_KEY_JSON + b"}"
    expected = b"sealroom.sealed/v1\n" + len(head).to_bytes(4, "big") + head
    assert encode_head(sealed_header(), wrapped_key()) == expected


def test_sealed_envelope_digest_and_owner_signature_vector():
    """envelope digest = sha256(b"sealroom-envelope/v1:" ‖ canonical envelope JSON without "signature"); the owner
    signs keccak256 of the same message (65 bytes r ‖ s ‖ v); the tail is u32_be(T) ‖ canonical JSON of rows,
    ciphertext_sha256 and signature."""
    envelope = sign_envelope(sealed_header(), wrapped_key(), 3, H("33" * 32), KEY_ONE)
    assert envelope.digest == hashlib.sha256(ENVELOPE_MESSAGE).digest()
    assert envelope.digest.hex() == "37d90b4af65b4b2fc2254857072a7a16b376a6f08ec8091759c5278cfa2f2aee"
    signed = keccak(ENVELOPE_MESSAGE)
    assert signed.hex() == "d852fb094557a6ccc17f513a5dc15596fbb085b03e7137d8dc61b0a91567559c"
    assert len(envelope.signature) == 65 and envelope.signature[64] in (0, 1)
    assert recovers_to(envelope.signature, signed) == KEY_ONE_PUBLIC
    unsigned_digest = Envelope(sealed_header(), wrapped_key(), 3, H("33" * 32), b"").digest
    assert unsigned_digest == envelope.digest                                    # the signature is not digested
    tail = (b'{"ciphertext_sha256":"' + b"33" * 32 + b'","rows":3,"signature":"' + envelope.signature.hex().encode()
            + b'"}')
    assert encode_tail(envelope) == len(tail).to_bytes(4, "big") + tail


# ---------------------------------------------------------------------------------- federated updates


def test_federated_update_signature_vector():
    """cvm/federated/updates.py: a site signs keccak256(b"sealroom-fed-update/v1:" ‖ u64_be(round) ‖ parent digest
    (32 raw) ‖ sha256(float32 little-endian update bytes) (32 raw) ‖ u64_be(num_examples))."""
    vector = np.array([1.0, -2.0], dtype="<f4")
    assert vector.tobytes() == H("0000803f000000c0")
    update_digest = hashlib.sha256(H("0000803f000000c0")).hexdigest()
    assert vector_digest(vector) == update_digest
    assert update_digest == "ee4ac73c2bd27756ab82780f27c73a7bc4d3f0bb6acb37e008bc27eccd7e588b"
    expected = keccak(b"sealroom-fed-update/v1:" + H("0000000000000003") + H("aa" * 32) + H(update_digest)
                      + H("0000000000000064"))
    assert update_message_hash(3, "aa" * 32, update_digest, 100) == expected
    assert expected.hex() == "e83f04097c3bcc365ae0f7aac38898a10f56f742d270387bcc984fdbb9d92359"
    signed = sign_update(KEY_ONE.to_bytes(), round_number=3, parent_digest="aa" * 32, num_examples=100, vector=vector)
    assert signed.site == KEY_ONE_ADDRESS and recovers_to(signed.signature, expected) == KEY_ONE_PUBLIC


# ---------------------------------------------------------------------------------- KMS release ids


@pytest.fixture
def service(monkeypatch):
    """The KMS's protocol code with its attestation, manifest and chain steps replaced by fixed answers, so that
    the release id it computes is over known bytes; `spends` records the ids handed to the on-chain spend."""
    kms = KeyManagementService(root=RootKeys(H("00" * 31 + "02"), H("03" * 32)), chain=None, registry=None,
                               dev_mode=False, simulated_root_der=None, signer=None)
    caller = AttestedCaller(app_id=APP_ID, compose_hash=COMPOSE_HASH, simulated=True,
                            cvm_pub=raw_public(X25519PrivateKey.generate()), nonce=NONCE)
    kms.spends = []
    kms.kind = "dp_stats"

    def manifest(_caller, _text):
        analysis = types.SimpleNamespace(kind=kms.kind, params={"epsilon_per_round": 1.0})
        return types.SimpleNamespace(analysis=analysis, epsilon=0.25, inputs=[])

    def spend(_caller, _manifest, epsilon, release_id, **_options):
        kms.spends.append(release_id)
        return [KEY_ONE_ADDRESS], {"transactionHash": H("55" * 32)}, {"epsilon_spent": epsilon,
                                                                       "epsilon_remaining": 1.0}

    monkeypatch.setattr(kms, "_attest", lambda _attestation, **_options: caller)
    monkeypatch.setattr(kms, "_attested_manifest", manifest)
    monkeypatch.setattr(kms, "_spend", spend)
    return kms


ATTESTATION = wire.Attestation(quote="", event_log="[]", nonce=NONCE.hex(), ephemeral_pubkey=PUB.hex())


def test_owner_key_release_id_vector(service):
    """kms/service.py: release id = sha256(b"sealroom-release/v1:" ‖ nonce ‖ compose_hash)."""
    expected = hashlib.sha256(b"sealroom-release/v1:" + NONCE + COMPOSE_HASH).digest()
    answer = service.release_owner_keys(wire.OwnerKeysRequest(attestation=ATTESTATION, app_compose="{}"))
    assert service.spends == [expected] and answer.release_id == expected.hex()
    assert expected.hex() == "f031f0799b5fa649a24b94ba088b8d185c832348714c2db707bad45ff8ae2774"


def test_round_release_id_vector(service):
    """kms/service.py: a round's release id = sha256(b"sealroom-round/v1:" ‖ app_id ‖ compose_hash)."""
    service.kind = "fed_round"
    expected = hashlib.sha256(b"sealroom-round/v1:" + APP_ID + COMPOSE_HASH).digest()
    answer = service.record_round_spend(wire.RoundSpendRequest(attestation=ATTESTATION, app_compose="{}",
                                                               epsilon=0.5))
    assert service.spends == [expected] and answer.release_id == expected.hex()
    assert expected.hex() == "face11484b686b9398295a1f8ee39c5f2e5fbe8534b76bd5de2a10fb22177f1e"
