"""kms_client/verify.py: owner sealing keys and dstack signature chains, each check from both sides.

Chains are built here the way dstack's guest agent builds them (GetKey: HKDF of the app key over the path,
the app key signs "{purpose}:{pubkey hex}"; Sign: path "vms", purpose "signing"), signing with coincurve
directly, with the app key and the KMS signature issued by kms.keys.
"""

from __future__ import annotations

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
from kms_client import verify
from kms_client.verify import (
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


# --- an agent, as dstack's guest agent signs ------------------------------------------------------------------


def _sign(private_key: bytes, digest: bytes) -> bytes:
    return coincurve.PrivateKey(private_key).sign_recoverable(digest, hasher=None)


def agent_get_key(root: RootKeys, app_id: bytes, path: str, purpose: str, algorithm: str = "secp256k1"):
    app_key = derive_app_key(root, app_id)
    key = hkdf_derive(app_key, [path.encode()])
    if algorithm == "secp256k1":
        pubkey = k256_public_key_compressed(key)
    else:
        pubkey = Ed25519PrivateKey.from_private_bytes(key).public_key().public_bytes_raw()
    app_signature = _sign(app_key, keccak(f"{purpose}:{pubkey.hex()}".encode()))
    kms_signature = sign_app_key(root, app_id, k256_public_key_compressed(app_key))
    return key, [app_signature, kms_signature]


def agent_sign(root: RootKeys, app_id: bytes, data: bytes, algorithm: str = "secp256k1"):
    key, chain = agent_get_key(root, app_id, "vms", "signing")
    digest = keccak(data) if algorithm == "secp256k1" else data
    return key, [_sign(key, digest), *chain]


def expected_keys(root: RootKeys = ROOT, app_id: bytes = APP_ID):
    key, _ = agent_get_key(root, app_id, "vms", "signing")
    return k256_public_key_compressed(key), k256_public_key_compressed(derive_app_key(root, app_id))


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


def test_sign_chain_recovers_message_app_and_root_keys():
    _, chain = agent_sign(ROOT, APP_ID, MESSAGE)
    message_pubkey, app_pubkey = expected_keys()
    roots = recover_signature_chain(MESSAGE, chain, purpose="signing", app_id=APP_ID)
    assert roots == ChainRoots(message_pubkey=message_pubkey, app_pubkey=app_pubkey,
                               kms_root_pubkey=ROOT.root_public_key_compressed)
    assert roots.kms_root_address == ROOT.root_address


@pytest.mark.parametrize(
    "pinned", [ROOT.root_address, bytes.fromhex(ROOT.root_address[2:]), ROOT.root_public_key_compressed],
    ids=["address", "address bytes", "compressed public key"],
)
def test_sign_chain_verifies_against_the_pinned_root(pinned):
    _, chain = agent_sign(ROOT, APP_ID, MESSAGE)
    message_pubkey, app_pubkey = expected_keys()
    verify_signature_chain(MESSAGE, chain, purpose="signing", app_id=APP_ID, expected_kms_root=pinned)
    verify_signature_chain(MESSAGE, chain, purpose="signing", app_id=APP_ID, expected_kms_root=pinned,
                           expected_message_pubkey=message_pubkey, expected_app_pubkey=app_pubkey)


def test_sign_chain_as_dstack_sdk_returns_it_in_hex():
    key, chain = agent_sign(ROOT, APP_ID, MESSAGE)
    response = SignResponse(signature=chain[0].hex(), signature_chain=[s.hex() for s in chain],
                            public_key=k256_public_key_compressed(key).hex())
    verify_signature_chain(MESSAGE, response.signature_chain, purpose="signing", app_id=APP_ID,
                           expected_kms_root=ROOT.root_address, expected_message_pubkey=response.decode_public_key())
    verify_signature_chain(MESSAGE, ["0x" + s for s in response.signature_chain], purpose="signing", app_id=APP_ID,
                           expected_kms_root=ROOT.root_address)


def test_prehashed_sign_chain_verifies():
    digest = keccak(b"any 32-byte digest the caller computed")
    _, chain = agent_sign(ROOT, APP_ID, digest, algorithm="secp256k1_prehashed")
    verify_signature_chain(digest, chain, purpose="signing", app_id=APP_ID, expected_kms_root=ROOT.root_address,
                           algorithm="secp256k1_prehashed")
    with pytest.raises(SignatureChainMismatch):  # the same chain read as "sign keccak(message)" does not verify
        verify_signature_chain(digest, chain, purpose="signing", app_id=APP_ID, expected_kms_root=ROOT.root_address)


# --- Sign chains: each link fails at the right link ------------------------------------------------------------


def _chain_with(position: int, signature: bytes) -> list[bytes]:
    _, chain = agent_sign(ROOT, APP_ID, MESSAGE)
    chain[position] = signature(chain[position]) if callable(signature) else signature
    return chain


TAMPERED_SIGN_CASES = {
    # name: (message, chain, purpose, app_id, pinned root, link named with all keys pinned)
    "message changed": (MESSAGE + b"!", None, "signing", APP_ID, ROOT.root_address, LINK_MESSAGE),
    "message signature": (MESSAGE, ("msg", flip), "signing", APP_ID, ROOT.root_address, LINK_MESSAGE),
    "app-key signature": (MESSAGE, ("app", flip), "signing", APP_ID, ROOT.root_address, LINK_APP_KEY),
    "purpose": (MESSAGE, None, "ethereum", APP_ID, ROOT.root_address, LINK_APP_KEY),
    "kms signature": (MESSAGE, ("kms", flip), "signing", APP_ID, ROOT.root_address, LINK_KMS),
    "app id": (MESSAGE, None, "signing", OTHER_APP_ID, ROOT.root_address, LINK_KMS),
    "pinned root": (MESSAGE, None, "signing", APP_ID, OTHER_ROOT.root_address, LINK_KMS),
}
_POSITION = {"msg": 0, "app": 1, "kms": 2}


def _tampered(name):
    message, change, purpose, app_id, pinned, link = TAMPERED_SIGN_CASES[name]
    _, chain = agent_sign(ROOT, APP_ID, MESSAGE)
    if change is not None:
        position = _POSITION[change[0]]
        chain[position] = change[1](chain[position])
    return message, chain, purpose, app_id, pinned, link


@pytest.mark.parametrize("name", list(TAMPERED_SIGN_CASES))
def test_tampered_sign_chain_fails_at_the_right_link_when_keys_are_pinned(name):
    message, chain, purpose, app_id, pinned, link = _tampered(name)
    message_pubkey, app_pubkey = expected_keys()
    with pytest.raises(SignatureChainMismatch) as caught:
        verify_signature_chain(message, chain, purpose=purpose, app_id=app_id, expected_kms_root=pinned,
                               expected_message_pubkey=message_pubkey, expected_app_pubkey=app_pubkey)
    assert caught.value.link == link
    assert str(caught.value).startswith(f"{link} link: ")


@pytest.mark.parametrize("name", list(TAMPERED_SIGN_CASES))
def test_tampered_sign_chain_never_reaches_the_pinned_root(name):
    # With only the root pinned, recovery yields other keys and the mismatch shows at the root.
    message, chain, purpose, app_id, pinned, _ = _tampered(name)
    with pytest.raises(SignatureChainMismatch, match="not the pinned KMS root") as caught:
        verify_signature_chain(message, chain, purpose=purpose, app_id=app_id, expected_kms_root=pinned)
    assert caught.value.link == LINK_KMS


@pytest.mark.parametrize(
    "position, link", [(0, LINK_MESSAGE), (1, LINK_APP_KEY), (2, LINK_KMS)], ids=["message", "app-key", "kms"]
)
@pytest.mark.parametrize(
    "malform, match",
    [(lambda s: with_v(s, 2), "malformed signature"), (lambda s: s[:64], "must be 65 bytes"),
     (lambda s: b"\x00" * 65, "malformed signature")],
    ids=["v=2", "64 bytes", "zero r and s"],
)
def test_malformed_signature_is_named_at_its_link(position, link, malform, match):
    chain = _chain_with(position, malform)
    with pytest.raises(SignatureChainMismatch, match=match) as caught:
        verify_signature_chain(MESSAGE, chain, purpose="signing", app_id=APP_ID, expected_kms_root=ROOT.root_address)
    assert caught.value.link == link


@settings(max_examples=150, deadline=None)
@given(position=st.integers(0, 2), index=st.integers(0, 64), bit=st.integers(0, 7))
def test_any_bit_flip_in_the_chain_is_refused(position, index, bit):
    _, chain = agent_sign(ROOT, APP_ID, MESSAGE)
    flipped = bytearray(chain[position])
    flipped[index] ^= 1 << bit
    chain[position] = bytes(flipped)
    with pytest.raises(SignatureChainMismatch):
        verify_signature_chain(MESSAGE, chain, purpose="signing", app_id=APP_ID, expected_kms_root=ROOT.root_address)


@pytest.mark.parametrize(
    "chain, match",
    [
        (lambda c: c[:2], "expected a list of 3 signatures"),
        (lambda c: [*c, c[0]], "expected a list of 3 signatures"),
        (lambda c: b"".join(c), "expected a list of 3 signatures"),
        (lambda c: [c[0].hex(), "zz", c[2].hex()], "not valid hex"),
        (lambda c: [c[0], 7, c[2]], "bytes or hex text"),
    ],
)
def test_malformed_chain_shape_is_refused(chain, match):
    _, good = agent_sign(ROOT, APP_ID, MESSAGE)
    with pytest.raises(SignatureChainMismatch, match=match) as caught:
        verify_signature_chain(MESSAGE, chain(good), purpose="signing", app_id=APP_ID,
                               expected_kms_root=ROOT.root_address)
    assert caught.value.link == LINK_CHAIN


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"algorithm": "ed25519"}, ValueError, "algorithm must be one of"),
        ({"algorithm": "secp256k1_prehashed"}, ValueError, "32-byte digest"),
        ({"app_id": APP_ID + b"\x00"}, ValueError, "app_id must be 20 bytes"),
        ({"message": MESSAGE.decode()}, TypeError, "message must be bytes"),
        ({"purpose": b"signing"}, TypeError, "purpose must be a string"),
        ({"expected_kms_root": "not an address"}, ValueError, "0x-prefixed 20-byte address"),
        ({"expected_message_pubkey": b"\x02" * 32}, ValueError, "must be 33-byte compressed keys"),
        ({"expected_app_pubkey": "02" * 33}, ValueError, "must be 33-byte compressed keys"),
    ],
)
def test_sign_chain_caller_mistakes(kwargs, error, match):
    _, chain = agent_sign(ROOT, APP_ID, MESSAGE)
    arguments = dict(message=MESSAGE, purpose="signing", app_id=APP_ID, expected_kms_root=ROOT.root_address)
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
    assert set(verify.__all__) == {
        "MAX_CLOCK_SKEW_S", "LINK_CHAIN", "LINK_MESSAGE", "LINK_APP_KEY", "LINK_KMS", "KmsClientError", "UntrustedKmsKey",
        "SignatureChainMismatch", "ChainRoots", "verify_owner_seal_pubkey", "recover_signature_chain",
        "verify_signature_chain", "verify_get_key_response",
    }
    assert all(hasattr(verify, name) for name in verify.__all__)
