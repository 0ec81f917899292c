"""kms/keys.py: fixed test vectors for every derivation and signature, dstack's app-key formula, refusals."""

from __future__ import annotations

import coincurve
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from eth_keys import keys as eth_keys
from eth_utils import keccak

from kms import keys
from kms.keys import (
    RootKeys,
    app_key_issued_digest,
    derive_app_key,
    derive_owner_seal_key,
    generate_root_keys,
    hkdf_derive,
    k256_public_key_compressed,
    owner_seal_pubkey_digest,
    sign_app_key,
    sign_owner_seal_pubkey,
)

# Fixed inputs. The expected outputs below were computed once with cryptography's HKDF and coincurve directly
# (not through kms.keys) and are pinned here, so any change to a derivation, a label or a signed layout fails.
ROOT = RootKeys(k256_private_bytes=b"\x01" * 32, derivation_secret=b"\x02" * 32)
APP_ID = bytes.fromhex("5fbdb2315678afecb367f032d93f642f64180aa3")
COMPOSE_HASH = b"\x33" * 32
OWNER = b"\x44" * 20
TIMESTAMP = 1_700_000_000

ROOT_PUBKEY = "031b84c5567b126440995d3ed5aaba0565d71e1834604819ff9c17f5e9d5dd078f"
ROOT_ADDRESS = "0x1a642f0E3c3aF545E7AcBD38b07251B3990914F1"
APP_KEY = "978f36ffd8a609ae1848d5375ffb544666219295abeda9e5086973bc2831b8b9"
APP_PUBKEY = "027cfd67ce552aaa360eeab5982600a75a2fb1827f829801f64e776997e2d65cae"
APP_KEY_SIGNATURE = (
    "94ac5786c28ef43afbbfa91806c3a8bf2489f681cc1bb9d93a5e56e4b1292744"
    "53411ac6e989bad60019f4f80613886d1ce57ff12d0ab6625d8ecdabc025f9c0"
    "01"
)
OWNER_SEAL_KEY = "168f7538b892bb18c2dad719d3d158984b548ab71718cc8bc90f01635c0b2976"
OWNER_SEAL_PUBKEY = "7286f48afa433936fad543ac32a2814a0b876a8890e557a6fdc773c01392ff20"
OWNER_SEAL_SIGNATURE = (
    "52a3297f439a99a6c2ced55661737a23ac2a7482adc04c4dffdc5fb3a33e47ad"
    "73d64e064199b0c5dcd6ba004f183dff12638a79fce56d82c65ab3468661e2c1"
    "00"
)


def _reference_hkdf(ikm: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"RATLS", info=info).derive(ikm)


def _raw(private_key: X25519PrivateKey) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


# --- vectors: success -------------------------------------------------------------------------------------


def test_root_identity_vector():
    assert ROOT.root_public_key_compressed.hex() == ROOT_PUBKEY
    assert ROOT.root_address == ROOT_ADDRESS


def test_app_key_vector_matches_dstack_formula():
    # dstack kms/src/crypto.rs derive_k256_key: HKDF-SHA256(ikm=root k256 scalar bytes, salt "RATLS",
    # info = app_id ‖ "app-key", 32 bytes).
    expected = _reference_hkdf(b"\x01" * 32, APP_ID + b"app-key")
    assert expected.hex() == APP_KEY
    assert derive_app_key(ROOT, APP_ID) == expected
    assert k256_public_key_compressed(expected).hex() == APP_PUBKEY


def test_app_key_signature_vector_matches_dstack_layout():
    app_pubkey = bytes.fromhex(APP_PUBKEY)
    # dstack sign_message: keccak256("dstack-kms-issued" ‖ ":" ‖ app_id ‖ sec1-compressed pubkey), r‖s‖recid.
    digest = keccak(b"dstack-kms-issued" + b":" + APP_ID + app_pubkey)
    assert app_key_issued_digest(APP_ID, app_pubkey) == digest
    independent = coincurve.PrivateKey(b"\x01" * 32).sign_recoverable(digest, hasher=None)
    assert independent.hex() == APP_KEY_SIGNATURE
    signature = sign_app_key(ROOT, APP_ID, app_pubkey)
    assert signature == independent
    assert signature[64] in (0, 1)
    recovered = eth_keys.Signature(signature).recover_public_key_from_msg_hash(digest)
    assert recovered.to_checksum_address() == ROOT_ADDRESS


def test_owner_seal_key_vector():
    expected = _reference_hkdf(b"\x02" * 32, APP_ID + COMPOSE_HASH + OWNER + b"owner-seal-key")
    assert expected.hex() == OWNER_SEAL_KEY
    key = derive_owner_seal_key(ROOT, APP_ID, COMPOSE_HASH, OWNER)
    assert _raw(key) == expected
    assert key.public_key().public_bytes_raw().hex() == OWNER_SEAL_PUBKEY


def test_owner_seal_signature_vector_and_exact_bytes():
    pubkey = bytes.fromhex(OWNER_SEAL_PUBKEY)
    message = (
        b"sealroom-owner-seal-pubkey/v1:" + APP_ID + COMPOSE_HASH + OWNER + TIMESTAMP.to_bytes(8, "big") + pubkey
    )
    assert len(message) == 30 + 20 + 32 + 20 + 8 + 32
    assert owner_seal_pubkey_digest(APP_ID, COMPOSE_HASH, OWNER, pubkey, TIMESTAMP) == keccak(message)
    signature = sign_owner_seal_pubkey(ROOT, APP_ID, COMPOSE_HASH, OWNER, pubkey, TIMESTAMP)
    assert signature.hex() == OWNER_SEAL_SIGNATURE
    assert signature == coincurve.PrivateKey(b"\x01" * 32).sign_recoverable(keccak(message), hasher=None)


def test_hkdf_derive_concatenates_context_parts():
    assert hkdf_derive(b"ikm", [b"a", b"bc"]) == _reference_hkdf(b"ikm", b"abc")
    assert hkdf_derive(b"ikm", [b"abc"], length=64) == HKDF(
        algorithm=hashes.SHA256(), length=64, salt=b"RATLS", info=b"abc"
    ).derive(b"ikm")


# --- the key changes when any part of its context changes ---------------------------------------------------


@pytest.mark.parametrize(
    "app_id, compose_hash, owner",
    [
        (b"\x00" * 20, COMPOSE_HASH, OWNER),
        (APP_ID, COMPOSE_HASH[:-1] + b"\x34", OWNER),  # another recipe
        (APP_ID, COMPOSE_HASH, b"\x45" * 20),
    ],
    ids=["other app", "other recipe", "other owner"],
)
def test_owner_seal_key_depends_on_every_context_part(app_id, compose_hash, owner):
    changed = derive_owner_seal_key(ROOT, app_id, compose_hash, owner)
    assert _raw(changed).hex() != OWNER_SEAL_KEY


def test_keys_depend_on_the_root():
    other = RootKeys(k256_private_bytes=b"\x03" * 32, derivation_secret=b"\x04" * 32)
    assert derive_app_key(other, APP_ID).hex() != APP_KEY
    assert _raw(derive_owner_seal_key(other, APP_ID, COMPOSE_HASH, OWNER)).hex() != OWNER_SEAL_KEY


def test_app_key_and_seal_key_use_separate_secrets():
    # The sealing key comes from the derivation secret alone: changing the signing key leaves it unchanged.
    same_secret = RootKeys(k256_private_bytes=b"\x05" * 32, derivation_secret=b"\x02" * 32)
    assert _raw(derive_owner_seal_key(same_secret, APP_ID, COMPOSE_HASH, OWNER)).hex() == OWNER_SEAL_KEY


# --- root generation --------------------------------------------------------------------------------------


def test_generate_root_keys_uses_the_injected_rng():
    stream = iter([b"\x07" * 32, b"\x08" * 32])
    root = generate_root_keys(rng=lambda n: next(stream))
    assert root == RootKeys(k256_private_bytes=b"\x07" * 32, derivation_secret=b"\x08" * 32)


def test_generate_root_keys_skips_out_of_range_scalars():
    stream = iter([b"\x00" * 32, b"\xff" * 32, b"\x07" * 32, b"\x08" * 32])
    root = generate_root_keys(rng=lambda n: next(stream))
    assert root.k256_private_bytes == b"\x07" * 32


def test_generate_root_keys_refuses_a_broken_rng():
    with pytest.raises(ValueError, match="rng produced no valid secp256k1 private key"):
        generate_root_keys(rng=lambda n: b"\x00" * n)


def test_generate_root_keys_default_is_random():
    assert generate_root_keys() != generate_root_keys()


def test_root_repr_hides_secrets():
    text = repr(ROOT) + str(ROOT)
    assert ROOT_ADDRESS in text
    assert (b"\x01" * 32).hex() not in text and (b"\x02" * 32).hex() not in text


# --- refusals (caller mistakes) ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k256, secret, error, match",
    [
        (b"\x01" * 31, b"\x02" * 32, ValueError, "k256_private_bytes must be 32 bytes"),
        (b"\x01" * 32, b"\x02" * 33, ValueError, "derivation_secret must be 32 bytes"),
        (b"\x00" * 32, b"\x02" * 32, ValueError, "not a valid secp256k1 private key"),
        (b"\xff" * 32, b"\x02" * 32, ValueError, "not a valid secp256k1 private key"),
        ("01" * 32, b"\x02" * 32, TypeError, "k256_private_bytes must be bytes"),
    ],
)
def test_root_keys_refuse_bad_material(k256, secret, error, match):
    with pytest.raises(error, match=match):
        RootKeys(k256_private_bytes=k256, derivation_secret=secret)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: derive_app_key(ROOT, APP_ID[:19]), "app_id must be 20 bytes"),
        (lambda: derive_owner_seal_key(ROOT, APP_ID, COMPOSE_HASH[:31], OWNER), "compose_hash must be 32 bytes"),
        (lambda: derive_owner_seal_key(ROOT, APP_ID, COMPOSE_HASH, OWNER + b"\x00"), "owner_address must be 20"),
        (lambda: sign_app_key(ROOT, APP_ID, bytes.fromhex(APP_PUBKEY)[:32]), "app public key .* must be 33"),
        (lambda: sign_app_key(ROOT, APP_ID, b"\x05" + b"\x01" * 32), "not a valid SEC1-compressed"),
        (lambda: sign_app_key(ROOT, APP_ID, b"\x02" + b"\xff" * 32), "not a valid SEC1-compressed"),
        (lambda: sign_owner_seal_pubkey(ROOT, APP_ID, COMPOSE_HASH, OWNER, b"\x00" * 31, 1), "must be 32 bytes"),
        (lambda: sign_owner_seal_pubkey(ROOT, APP_ID, COMPOSE_HASH, OWNER, b"\x00" * 32, -1), "unsigned 64-bit"),
        (lambda: sign_owner_seal_pubkey(ROOT, APP_ID, COMPOSE_HASH, OWNER, b"\x00" * 32, 2**64), "unsigned 64-bit"),
        (lambda: k256_public_key_compressed(b"\x00" * 32), "not a valid secp256k1 private key"),
    ],
)
def test_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: hkdf_derive("ikm", [b"a"]), "ikm must be bytes"),
        (lambda: hkdf_derive(b"ikm", b"app-key"), "sequence of bytes parts"),
        (lambda: hkdf_derive(b"ikm", [b"a", "b"]), "sequence of bytes parts"),
        (lambda: derive_app_key(ROOT, APP_ID.hex()), "app_id must be bytes"),
        (lambda: sign_owner_seal_pubkey(ROOT, APP_ID, COMPOSE_HASH, OWNER, b"\x00" * 32, 1.5), "must be an int"),
        (lambda: sign_owner_seal_pubkey(ROOT, APP_ID, COMPOSE_HASH, OWNER, b"\x00" * 32, True), "must be an int"),
    ],
)
def test_type_errors(call, match):
    with pytest.raises(TypeError, match=match):
        call()


def test_public_surface():
    assert all(hasattr(keys, name) for name in keys.__all__)
    assert set(keys.__all__) == {
        "HKDF_SALT",
        "APP_KEY_ISSUED_PREFIX",
        "OWNER_SEAL_PUBKEY_PREFIX",
        "RootKeys",
        "hkdf_derive",
        "generate_root_keys",
        "k256_public_key_compressed",
        "derive_app_key",
        "app_key_issued_digest",
        "sign_app_key",
        "derive_owner_seal_key",
        "owner_seal_pubkey_digest",
        "sign_owner_seal_pubkey",
        "derive_env_encrypt_key",
        "sign_env_encrypt_pubkey",
    }
