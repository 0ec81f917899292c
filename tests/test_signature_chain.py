"""kms_client/signature_chain.py: owner sealing keys and dstack signature chains, each check from both sides.

Chains are built here the way dstack's guest agent builds them (guest-agent/src/rpc_service.rs — GetKey:
HKDF of the app key over the path, the app key signs keccak256("{purpose}:{pubkey hex}"); Sign: the key at
path "vms", purpose "signing", secp256k1 over sha256(data)), signing with coincurve and cryptography
directly; the app key and the KMS signature are issued by kms.keys.
"""

from __future__ import annotations

import hashlib

import coincurve
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from dstack_sdk.dstack_client import GetKeyResponse, SignResponse
from eth_utils import keccak
from hypothesis import given, settings
from hypothesis import strategies as st

from kms.keys import (
    RootKeys,
    derive_app_key,
    derive_owner_seal_key,
    hkdf_derive,
    k256_public_key_compressed,
    sign_app_key,
    sign_owner_seal_pubkey,
)
from kms_client import signature_chain
from kms_client.signature_chain import (
    LINK_APP_KEY,
    LINK_CHAIN,
    LINK_KMS,
    LINK_MESSAGE,
    ChainRoots,
    KmsClientError,
    SignatureChainMismatch,
    UntrustedKmsKey,
    recover_signature_chain,
    verify_get_key_response,
    verify_owner_seal_pubkey,
    verify_signature_chain,
)

ROOT = RootKeys(k256_private_bytes=b"\x01" * 32, derivation_secret=b"\x02" * 32)
OTHER_ROOT = RootKeys(k256_private_bytes=b"\x03" * 32, derivation_secret=b"\x04" * 32)
APP_ID = bytes.fromhex("5fbdb2315678afecb367f032d93f642f64180aa3")
OTHER_APP_ID = b"\x66" * 20
COMPOSE_HASH = b"\x33" * 32
OWNER = b"\x44" * 20
NOW = 1_700_000_000
MESSAGE = b"sealroom aggregate: mean age 51.3 (simulated)"
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


# --- an agent, as dstack's guest agent signs ------------------------------------------------------------------


def _sign_recoverable(private_key: bytes, digest: bytes) -> bytes:
    return coincurve.PrivateKey(private_key).sign_recoverable(digest, hasher=None)


def agent_get_key(root: RootKeys, app_id: bytes, path: str, purpose: str, algorithm: str = "secp256k1"):
    """GetKey: (key, [app-key signature, KMS signature])."""
    app_key = derive_app_key(root, app_id)
    key = hkdf_derive(app_key, [path.encode()])
    if algorithm == "secp256k1":
        pubkey = k256_public_key_compressed(key)
    else:
        pubkey = Ed25519PrivateKey.from_private_bytes(key).public_key().public_bytes_raw()
    app_signature = _sign_recoverable(app_key, keccak(f"{purpose}:{pubkey.hex()}".encode()))
    kms_signature = sign_app_key(root, app_id, k256_public_key_compressed(app_key))
    return key, [app_signature, kms_signature]


def agent_sign(root: RootKeys, app_id: bytes, data: bytes, algorithm: str = "secp256k1"):
    """Sign: (public_key, [signature, app-key signature, KMS signature]); key at path "vms", purpose "signing".

    secp256k1 is low-s r ‖ s over sha256(data) (libsecp256k1 signs low-s), prehashed over data itself.
    """
    key_algorithm = "ed25519" if algorithm == "ed25519" else "secp256k1"
    key, chain = agent_get_key(root, app_id, "vms", "signing", key_algorithm)
    if algorithm == "ed25519":
        signer = Ed25519PrivateKey.from_private_bytes(key)
        return signer.public_key().public_bytes_raw(), [signer.sign(data), *chain]
    digest = hashlib.sha256(data).digest() if algorithm == "secp256k1" else data
    return k256_public_key_compressed(key), [_sign_recoverable(key, digest)[:64], *chain]


APP_PUBKEY = k256_public_key_compressed(derive_app_key(ROOT, APP_ID))
OTHER_PUBKEY = k256_public_key_compressed(b"\x07" * 32)


def flip(signature: bytes, index: int = 40) -> bytes:
    """Change one bit of s: still a well-formed signature, but by nobody in particular."""
    return signature[:index] + bytes([signature[index] ^ 0x01]) + signature[index + 1:]


def with_v(signature: bytes, v: int) -> bytes:
    return signature[:64] + bytes([v])


# --- owner sealing public key ------------------------------------------------------------------------------


def owner_seal_signed(root=ROOT, app_id=APP_ID, compose_hash=COMPOSE_HASH, owner=OWNER, timestamp=NOW):
    pubkey = derive_owner_seal_key(root, app_id, compose_hash, owner).public_key().public_bytes_raw()
    return pubkey, sign_owner_seal_pubkey(root, app_id, compose_hash, owner, pubkey, timestamp)


@pytest.mark.parametrize(
    "pinned", [ROOT.root_address, ROOT.root_address.lower(), bytes.fromhex(ROOT.root_address[2:]),
               ROOT.root_public_key_compressed],
    ids=["checksum address", "lowercase address", "address bytes", "compressed public key"],
)
def test_owner_seal_pubkey_verifies_against_the_pinned_root(pinned):
    pubkey, signature = owner_seal_signed()
    verify_owner_seal_pubkey(APP_ID, COMPOSE_HASH, OWNER, pubkey, NOW, signature, pinned_root_address=pinned, now=NOW)


@pytest.mark.parametrize("now", [NOW + 300, NOW - 60], ids=["oldest accepted", "newest accepted"])
def test_owner_seal_pubkey_freshness_bounds_accept(now):
    pubkey, signature = owner_seal_signed()
    verify_owner_seal_pubkey(APP_ID, COMPOSE_HASH, OWNER, pubkey, NOW, signature,
                             pinned_root_address=ROOT.root_address, now=now)


def _expect_untrusted(match, *, pubkey=None, timestamp=NOW, signature=None, now=NOW, app_id=APP_ID,
                      compose_hash=COMPOSE_HASH, owner=OWNER, max_age_s=300):
    good_pubkey, good_signature = owner_seal_signed()
    with pytest.raises(UntrustedKmsKey, match=match):
        verify_owner_seal_pubkey(
            app_id, compose_hash, owner, good_pubkey if pubkey is None else pubkey, timestamp,
            good_signature if signature is None else signature,
            pinned_root_address=ROOT.root_address, now=now, max_age_s=max_age_s,
        )


def test_owner_seal_pubkey_from_another_root_is_refused():
    pubkey, signature = owner_seal_signed(root=OTHER_ROOT)
    _expect_untrusted(f"signed by {OTHER_ROOT.root_address}, not the pinned KMS root", pubkey=pubkey,
                      signature=signature)


@pytest.mark.parametrize(
    "changes",
    [{"app_id": OTHER_APP_ID}, {"compose_hash": b"\x34" * 32}, {"owner": b"\x45" * 20}],
    ids=["another app", "another recipe", "another owner"],
)
def test_owner_seal_pubkey_for_another_context_is_refused(changes):
    _expect_untrusted("not the pinned KMS root", **changes)


def test_owner_seal_pubkey_swapped_key_or_timestamp_is_refused():
    other_pubkey, _ = owner_seal_signed(owner=b"\x45" * 20)
    _expect_untrusted("not the pinned KMS root", pubkey=other_pubkey)
    _expect_untrusted("not the pinned KMS root", timestamp=NOW + 1, now=NOW + 1)


@pytest.mark.parametrize(
    "now, max_age_s, match",
    [(NOW + 301, 300, r"stale: signed 301 s ago"), (NOW + 11, 10, "stale"), (NOW - 61, 300, "61 s in the future")],
)
def test_owner_seal_pubkey_stale_or_future_is_refused(now, max_age_s, match):
    _expect_untrusted(match, now=now, max_age_s=max_age_s)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pubkey": b"\x00" * 31}, "malformed sealing public key"),
        ({"pubkey": "00" * 32}, "malformed sealing public key"),
        ({"timestamp": -1}, "malformed timestamp"),
        ({"timestamp": "1700000000"}, "malformed timestamp"),
        ({"timestamp": True}, "malformed timestamp"),
        ({"signature": b"\x00" * 64}, "signature must be 65 bytes"),
        ({"signature": "ab" * 65}, "malformed signature: expected bytes"),
        ({"signature": with_v(owner_seal_signed()[1], 27)}, "malformed signature"),
        ({"signature": b"\x00" * 65}, "malformed signature"),
    ],
)
def test_owner_seal_pubkey_malformed_material_is_refused(kwargs, match):
    _expect_untrusted(match, **kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"app_id": APP_ID[:19]}, ValueError, "app_id must be 20 bytes"),
        ({"compose_hash": COMPOSE_HASH.hex()}, TypeError, "compose_hash must be bytes"),
        ({"pinned_root_address": "0x1234"}, ValueError, "0x-prefixed 20-byte address"),
        ({"pinned_root_address": b"\x02" + b"\xff" * 32}, ValueError, "not a valid compressed"),
        ({"pinned_root_address": 7}, TypeError, "must be an address"),
    ],
)
def test_owner_seal_pubkey_caller_mistakes(kwargs, error, match):
    pubkey, signature = owner_seal_signed()
    arguments = dict(app_id=APP_ID, compose_hash=COMPOSE_HASH, owner=OWNER, pubkey=pubkey, timestamp=NOW,
                     signature=signature, pinned_root_address=ROOT.root_address, now=NOW)
    arguments.update(kwargs)
    with pytest.raises(error, match=match):
        verify_owner_seal_pubkey(**arguments)


# --- Sign chains: success -----------------------------------------------------------------------------------


def verify_sign(message, pubkey, chain, **kwargs):
    arguments = dict(message_pubkey=pubkey, app_id=APP_ID, expected_kms_root=ROOT.root_address)
    arguments.update(kwargs)
    verify_signature_chain(message, chain, **arguments)


@pytest.mark.parametrize("algorithm", ["secp256k1", "ed25519"])
def test_sign_chain_recovers_message_app_and_root_keys(algorithm):
    pubkey, chain = agent_sign(ROOT, APP_ID, MESSAGE, algorithm)
    roots = recover_signature_chain(MESSAGE, chain, message_pubkey=pubkey, app_id=APP_ID, algorithm=algorithm)
    assert roots == ChainRoots(message_pubkey=pubkey, app_pubkey=APP_PUBKEY,
                               kms_root_pubkey=ROOT.root_public_key_compressed)
    assert roots.kms_root_address == ROOT.root_address


@pytest.mark.parametrize(
    "pinned", [ROOT.root_address, bytes.fromhex(ROOT.root_address[2:]), ROOT.root_public_key_compressed],
    ids=["address", "address bytes", "compressed public key"],
)
def test_sign_chain_verifies_against_the_pinned_root(pinned):
    pubkey, chain = agent_sign(ROOT, APP_ID, MESSAGE)
    verify_sign(MESSAGE, pubkey, chain, expected_kms_root=pinned)
    verify_sign(MESSAGE, pubkey, chain, expected_kms_root=pinned, expected_app_pubkey=APP_PUBKEY)


@pytest.mark.parametrize("algorithm", ["secp256k1", "secp256k1_prehashed", "ed25519"])
def test_sign_chain_as_dstack_sdk_returns_it_in_hex(algorithm):
    data = hashlib.sha256(MESSAGE).digest() if algorithm == "secp256k1_prehashed" else MESSAGE
    pubkey, chain = agent_sign(ROOT, APP_ID, data, algorithm)
    response = SignResponse(signature=chain[0].hex(), signature_chain=[s.hex() for s in chain],
                            public_key=pubkey.hex())
    verify_sign(data, response.public_key, response.signature_chain, algorithm=algorithm)
    verify_sign(data, "0x" + response.public_key, ["0x" + s for s in response.signature_chain], algorithm=algorithm)


def test_secp256k1_message_digest_is_sha256_as_in_dstack():
    # A signature over keccak256(message) (the Ethereum habit) is not dstack's Sign and does not verify.
    pubkey, chain = agent_sign(ROOT, APP_ID, keccak(MESSAGE), "secp256k1_prehashed")
    with pytest.raises(SignatureChainMismatch, match="does not verify") as caught:
        verify_sign(MESSAGE, pubkey, chain)
    assert caught.value.link == LINK_MESSAGE
    # A prehashed signature is over the digest itself, not over sha256(digest).
    digest = hashlib.sha256(b"some digest").digest()
    pubkey, chain = agent_sign(ROOT, APP_ID, digest, "secp256k1_prehashed")
    with pytest.raises(SignatureChainMismatch, match="does not verify"):
        verify_sign(digest, pubkey, chain, algorithm="secp256k1")


def test_high_s_message_signature_is_refused_as_dstack_does():
    pubkey, chain = agent_sign(ROOT, APP_ID, MESSAGE)
    r, s_value = int.from_bytes(chain[0][:32], "big"), int.from_bytes(chain[0][32:], "big")
    chain[0] = r.to_bytes(32, "big") + (SECP256K1_N - s_value).to_bytes(32, "big")  # same signature, high s
    with pytest.raises(SignatureChainMismatch, match="does not verify") as caught:
        verify_sign(MESSAGE, pubkey, chain)
    assert caught.value.link == LINK_MESSAGE


# --- Sign chains: each link fails at the right link ------------------------------------------------------------

# name: (what to change, link named with the app key pinned, link named with only the root pinned)
TAMPERED_SIGN_CASES = {
    "message changed": ({"message": MESSAGE + b"!"}, LINK_MESSAGE, LINK_MESSAGE),
    "message signature": ({0: flip}, LINK_MESSAGE, LINK_MESSAGE),
    "another public key": ({"message_pubkey": OTHER_PUBKEY}, LINK_MESSAGE, LINK_MESSAGE),
    "app-key signature": ({1: flip}, LINK_APP_KEY, LINK_KMS),
    "purpose": ({"purpose": "ethereum"}, LINK_APP_KEY, LINK_KMS),
    "kms signature": ({2: flip}, LINK_KMS, LINK_KMS),
    "app id": ({"app_id": OTHER_APP_ID}, LINK_KMS, LINK_KMS),
    "pinned root": ({"expected_kms_root": OTHER_ROOT.root_address}, LINK_KMS, LINK_KMS),
}


def _tampered_sign(changes):
    pubkey, chain = agent_sign(ROOT, APP_ID, MESSAGE)
    arguments = dict(message=MESSAGE, message_pubkey=pubkey, purpose="signing", app_id=APP_ID,
                     expected_kms_root=ROOT.root_address)
    for name, change in changes.items():
        if isinstance(name, int):
            chain[name] = change(chain[name])
        else:
            arguments[name] = change
    return arguments.pop("message"), chain, arguments


@pytest.mark.parametrize("name", list(TAMPERED_SIGN_CASES))
def test_tampered_sign_chain_fails_at_the_right_link_with_the_app_key_pinned(name):
    changes, link, _ = TAMPERED_SIGN_CASES[name]
    message, chain, arguments = _tampered_sign(changes)
    with pytest.raises(SignatureChainMismatch) as caught:
        verify_signature_chain(message, chain, expected_app_pubkey=APP_PUBKEY, **arguments)
    assert caught.value.link == link
    assert str(caught.value).startswith(f"{link} link: ")


@pytest.mark.parametrize("name", list(TAMPERED_SIGN_CASES))
def test_tampered_sign_chain_fails_with_only_the_root_pinned(name):
    changes, _, link = TAMPERED_SIGN_CASES[name]
    message, chain, arguments = _tampered_sign(changes)
    with pytest.raises(SignatureChainMismatch) as caught:
        verify_signature_chain(message, chain, **arguments)
    assert caught.value.link == link
    if link == LINK_KMS:
        assert "not the pinned KMS root" in str(caught.value)


@pytest.mark.parametrize(
    "position, malform, link, match",
    [
        (0, lambda s: s + b"\x00", LINK_MESSAGE, "64 bytes"),
        (0, lambda s: b"\xff" * 64, LINK_MESSAGE, "malformed signature or public key"),
        (0, lambda s: b"\x00" * 64, LINK_MESSAGE, "does not verify"),
        (1, lambda s: with_v(s, 2), LINK_APP_KEY, "malformed signature"),
        (1, lambda s: s[:64], LINK_APP_KEY, "must be 65 bytes"),
        (1, lambda s: b"\x00" * 65, LINK_APP_KEY, "malformed signature"),
        (2, lambda s: with_v(s, 27), LINK_KMS, "malformed signature"),
        (2, lambda s: s[:64], LINK_KMS, "must be 65 bytes"),
        (2, lambda s: b"\x00" * 65, LINK_KMS, "malformed signature"),
    ],
    ids=["message 65 bytes", "message r,s out of range", "message zero", "app v=2", "app 64 bytes", "app zero",
         "kms v=27", "kms 64 bytes", "kms zero"],
)
def test_malformed_signature_is_named_at_its_link(position, malform, link, match):
    message, chain, arguments = _tampered_sign({position: malform})
    with pytest.raises(SignatureChainMismatch, match=match) as caught:
        verify_signature_chain(message, chain, **arguments)
    assert caught.value.link == link


@pytest.mark.parametrize(
    "pubkey, algorithm, link, match",
    [
        ("zz", "secp256k1", LINK_CHAIN, "message_pubkey is not valid hex"),
        (7, "secp256k1", LINK_CHAIN, "message_pubkey must be bytes or hex text"),
        (b"\x02" + b"\xff" * 32, "secp256k1", LINK_MESSAGE, "malformed signature or public key"),
        (APP_PUBKEY, "ed25519", LINK_MESSAGE, "an ed25519 public key is 32 bytes"),
    ],
)
def test_malformed_message_pubkey_is_refused(pubkey, algorithm, link, match):
    _, chain = agent_sign(ROOT, APP_ID, MESSAGE, algorithm)
    with pytest.raises(SignatureChainMismatch, match=match) as caught:
        verify_sign(MESSAGE, pubkey, chain, algorithm=algorithm)
    assert caught.value.link == link


@settings(max_examples=150, deadline=None)
@given(position=st.integers(0, 2), index=st.integers(0, 64), bit=st.integers(0, 7))
def test_any_bit_flip_in_the_chain_is_refused(position, index, bit):
    pubkey, chain = agent_sign(ROOT, APP_ID, MESSAGE)
    flipped = bytearray(chain[position])
    flipped[index % len(flipped)] ^= 1 << bit
    chain[position] = bytes(flipped)
    with pytest.raises(SignatureChainMismatch):
        verify_sign(MESSAGE, pubkey, chain)


@pytest.mark.parametrize(
    "chain, match",
    [
        (lambda c: c[:2], "expected a list of 3 signatures"),
        (lambda c: [*c, c[0]], "expected a list of 3 signatures"),
        (lambda c: b"".join(c), "expected a list of 3 signatures"),
        (lambda c: [c[0].hex(), "zz", c[2].hex()], "a signature is not valid hex"),
        (lambda c: [c[0], 7, c[2]], "a signature must be bytes or hex text"),
    ],
)
def test_malformed_chain_shape_is_refused(chain, match):
    pubkey, good = agent_sign(ROOT, APP_ID, MESSAGE)
    with pytest.raises(SignatureChainMismatch, match=match) as caught:
        verify_sign(MESSAGE, pubkey, chain(good))
    assert caught.value.link == LINK_CHAIN


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"algorithm": "rsa"}, ValueError, "algorithm must be one of"),
        ({"algorithm": "secp256k1_prehashed"}, ValueError, "32-byte digest"),
        ({"app_id": APP_ID + b"\x00"}, ValueError, "app_id must be 20 bytes"),
        ({"message": MESSAGE.decode()}, TypeError, "message must be bytes"),
        ({"purpose": b"signing"}, TypeError, "purpose must be a string"),
        ({"expected_kms_root": "not an address"}, ValueError, "0x-prefixed 20-byte address"),
        ({"expected_app_pubkey": APP_PUBKEY[:32]}, ValueError, "expected_app_pubkey must be a 33-byte"),
        ({"expected_app_pubkey": APP_PUBKEY.hex()}, ValueError, "expected_app_pubkey must be a 33-byte"),
    ],
)
def test_sign_chain_caller_mistakes(kwargs, error, match):
    pubkey, chain = agent_sign(ROOT, APP_ID, MESSAGE)
    arguments = dict(message=MESSAGE, message_pubkey=pubkey, app_id=APP_ID, expected_kms_root=ROOT.root_address)
    arguments.update(kwargs)
    message = arguments.pop("message")
    with pytest.raises(error, match=match):
        verify_signature_chain(message, chain, **arguments)


# --- GetKey chains ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["secp256k1", "ed25519"])
def test_get_key_response_verifies(algorithm):
    key, chain = agent_get_key(ROOT, APP_ID, "wallet/eth", "ethereum", algorithm)
    response = GetKeyResponse(key=key.hex(), signature_chain=[s.hex() for s in chain])
    verify_get_key_response(response.key, response.signature_chain, "ethereum", APP_ID, ROOT.root_address,
                            algorithm=algorithm)
    verify_get_key_response(response.decode_key(), response.decode_signature_chain(), "ethereum", APP_ID,
                            ROOT.root_public_key_compressed, algorithm=algorithm)


def _get_key_case(**changes):
    key, chain = agent_get_key(ROOT, APP_ID, "wallet/eth", "ethereum")
    case = dict(key=key, signature_chain=chain, purpose="ethereum", app_id=APP_ID,
                expected_kms_root=ROOT.root_address)
    for name, change in changes.items():
        case[name] = change(case[name]) if callable(change) else change
    return case


@pytest.mark.parametrize(
    "changes, link, match",
    [
        ({"key": agent_get_key(ROOT, APP_ID, "wallet/other", "ethereum")[0]}, LINK_KMS, "not the pinned KMS root"),
        ({"purpose": "signing"}, LINK_KMS, "not the pinned KMS root"),
        ({"app_id": OTHER_APP_ID}, LINK_KMS, "not the pinned KMS root"),
        ({"expected_kms_root": OTHER_ROOT.root_address}, LINK_KMS, "not the pinned KMS root"),
        ({"signature_chain": lambda c: [flip(c[0]), c[1]]}, LINK_KMS, "not the pinned KMS root"),
        ({"signature_chain": lambda c: [c[0], flip(c[1])]}, LINK_KMS, "not the pinned KMS root"),
        (dict(zip(("key", "signature_chain"), agent_get_key(OTHER_ROOT, APP_ID, "wallet/eth", "ethereum"))),
         LINK_KMS, f"chain ends at {OTHER_ROOT.root_address}"),
        ({"signature_chain": lambda c: [with_v(c[0], 3), c[1]]}, LINK_APP_KEY, "malformed signature"),
        ({"signature_chain": lambda c: [c[0], c[1][:60]]}, LINK_KMS, "must be 65 bytes"),
        ({"signature_chain": lambda c: c[:1]}, LINK_CHAIN, "expected a list of 2 signatures"),
        ({"key": "not hex"}, LINK_CHAIN, "not valid hex"),
        ({"key": b"\x01" * 31}, LINK_CHAIN, "must be 32 bytes"),
        ({"key": b"\x00" * 32}, LINK_CHAIN, "not a valid private key"),
    ],
    ids=["another key", "purpose", "app id", "pinned root", "app-key signature", "kms signature", "another KMS",
         "malformed app-key signature", "short kms signature", "one signature", "key not hex", "short key",
         "zero key"],
)
def test_get_key_response_refusals(changes, link, match):
    with pytest.raises(SignatureChainMismatch, match=match) as caught:
        verify_get_key_response(**_get_key_case(**changes))
    assert caught.value.link == link


def test_get_key_caller_mistakes():
    with pytest.raises(ValueError, match="algorithm must be one of"):
        verify_get_key_response(**_get_key_case(), algorithm="secp256k1_prehashed")
    with pytest.raises(ValueError, match="app_id must be 20 bytes"):
        verify_get_key_response(**_get_key_case(app_id=b"\x01"))


# --- the error tree and the public surface -------------------------------------------------------------------


def test_errors_form_one_tree():
    assert issubclass(UntrustedKmsKey, KmsClientError) and issubclass(SignatureChainMismatch, KmsClientError)
    assert not issubclass(KmsClientError, ValueError)


def test_public_surface():
    assert set(signature_chain.__all__) == {
        "MAX_CLOCK_SKEW_S", "LINK_CHAIN", "LINK_MESSAGE", "LINK_APP_KEY", "LINK_KMS", "KmsClientError",
        "UntrustedKmsKey", "SignatureChainMismatch", "ChainRoots", "verify_owner_seal_pubkey", "recover_signature_chain",
        "verify_signature_chain", "verify_get_key_response", "verify_env_encrypt_pubkey",
    }
    assert all(hasattr(signature_chain, name) for name in signature_chain.__all__)
