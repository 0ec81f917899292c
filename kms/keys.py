"""KMS key material: the root keys, every derivation from them, and the signatures the KMS issues.

Spec: DESIGN.md §3 and dstack's KMS (``ra-tls/src/kdf.rs``, ``kms/src/crypto.rs``; see
docs/design.md, "dstack formats: KMS keys and BootInfo"). Everything is derived, nothing per-app is stored:

    derive(ikm, context) = HKDF-SHA256(ikm, salt=b"RATLS", info=context[0] ‖ context[1] ‖ …)

    app key (secp256k1)          = derive(root k256 private bytes, [app_id, b"app-key"])            # dstack's
    owner sealing key (X25519)   = derive(derivation secret, [app_id, compose_hash, owner, b"owner-seal-key"])
    env-encrypt key (X25519)     = derive(derivation secret, [app_id, b"env-encrypt-key"])   # dstack's context

Context parts are concatenated without length prefixes, as dstack does; that is unambiguous here because
every part but the trailing label has a fixed length (app_id 20, compose_hash 32, owner 20 bytes), which
the functions below enforce.

Signatures are recoverable secp256k1 ECDSA by the root k256 key, 65 bytes ``r ‖ s ‖ v`` with ``v`` in
{0, 1} (dstack's ``k256_signature`` layout), over a keccak256 digest of a namespaced message; the exact
bytes are given by ``kms_client.messages`` (shared with the clients that check them).

Errors: this module only raises ``TypeError``/``ValueError`` for caller mistakes (wrong lengths, a
private key outside the secp256k1 range). It has no outcomes of its own to report.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from eth_keys import keys as eth_keys
from eth_keys.exceptions import ValidationError as EthKeysValidationError

from kms_client.messages import (
    APP_KEY_ISSUED_PREFIX,
    OWNER_SEAL_PUBKEY_PREFIX,
    app_key_issued_digest,
    env_encrypt_pubkey_digest,
    env_encrypt_pubkey_legacy_digest,
    k256_public_key_compressed,
    owner_seal_pubkey_digest,
)

__all__ = [
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
]

HKDF_SALT = b"RATLS"

_APP_KEY_LABEL = b"app-key"
_OWNER_SEAL_KEY_LABEL = b"owner-seal-key"
_ENV_ENCRYPT_KEY_LABEL = b"env-encrypt-key"
_APP_ID_LEN = 20
_COMPOSE_HASH_LEN = 32
_ADDRESS_LEN = 20
_SECRET_LEN = 32
# Rejection sampling for a k256 scalar fails with probability ~2^-128 per draw; this many failures in a
# row means the rng is broken, not unlucky.
_MAX_SCALAR_DRAWS = 16


def _require_bytes(value: object, length: int, what: str) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"{what} must be bytes, not {type(value).__name__}")
    if len(value) != length:
        raise ValueError(f"{what} must be {length} bytes, got {len(value)}")
    return value


def _k256_private_key(private_bytes: bytes) -> eth_keys.PrivateKey:
    try:
        return eth_keys.PrivateKey(private_bytes)
    except EthKeysValidationError as exc:
        raise ValueError("not a valid secp256k1 private key (must be 1 <= k < n)") from exc


def hkdf_derive(ikm: bytes, context: Sequence[bytes], length: int = 32) -> bytes:
    """dstack's ``derive_key``: HKDF-SHA256 with salt ``b"RATLS"`` and info = the context parts concatenated."""
    if not isinstance(ikm, bytes):
        raise TypeError("ikm must be bytes")
    if isinstance(context, (bytes, str)) or not all(isinstance(part, bytes) for part in context):
        raise TypeError("context must be a sequence of bytes parts")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=length, salt=HKDF_SALT, info=b"".join(context))
    return hkdf.derive(ikm)


@dataclass(frozen=True, repr=False)
class RootKeys:
    """The KMS root: a secp256k1 signing key (the identity auditors pin) and a 32-byte derivation secret.

    ``repr`` shows only the public address, so the secrets never reach a log by accident.
    """

    k256_private_bytes: bytes
    derivation_secret: bytes

    def __post_init__(self) -> None:
        _require_bytes(self.k256_private_bytes, _SECRET_LEN, "k256_private_bytes")
        _require_bytes(self.derivation_secret, _SECRET_LEN, "derivation_secret")
        _k256_private_key(self.k256_private_bytes)

    @property
    def root_public_key_compressed(self) -> bytes:
        """The 33-byte SEC1-compressed root public key (what DstackKms stores as ``kmsInfo.k256Pubkey``)."""
        return k256_public_key_compressed(self.k256_private_bytes)

    @property
    def root_address(self) -> str:
        """The root key's Ethereum address, 0x + EIP-55 checksum: the identity owners and auditors pin."""
        return _k256_private_key(self.k256_private_bytes).public_key.to_checksum_address()

    def __repr__(self) -> str:
        return f"RootKeys(root_address={self.root_address})"


def generate_root_keys(rng: Callable[[int], bytes] = os.urandom) -> RootKeys:
    """Fresh root material from ``rng`` (``os.urandom`` unless a test injects one)."""
    for _ in range(_MAX_SCALAR_DRAWS):
        candidate = rng(_SECRET_LEN)
        try:
            _k256_private_key(candidate)
        except ValueError:
            continue
        return RootKeys(k256_private_bytes=candidate, derivation_secret=rng(_SECRET_LEN))
    raise ValueError("rng produced no valid secp256k1 private key; it is broken")


def derive_app_key(root: RootKeys, app_id: bytes) -> bytes:
    """The app's secp256k1 private key: ``HKDF(root k256 private bytes, [app_id, b"app-key"], 32)``.

    Identical to dstack's ``derive_k256_key`` (kms/src/crypto.rs). The guest agent derives every ``GetKey``
    key from it.
    """
    _require_bytes(app_id, _APP_ID_LEN, "app_id")
    return hkdf_derive(root.k256_private_bytes, [app_id, _APP_KEY_LABEL])


def sign_app_key(root: RootKeys, app_id: bytes, app_pubkey_compressed: bytes) -> bytes:
    """dstack's ``k256_signature``: the root's recoverable signature over :func:`app_key_issued_digest`.

    Returns 65 bytes ``r ‖ s ‖ v``, ``v`` in {0, 1}.
    """
    digest = app_key_issued_digest(app_id, app_pubkey_compressed)
    try:
        eth_keys.PublicKey.from_compressed_bytes(app_pubkey_compressed)
    except (EthKeysValidationError, ValueError) as exc:  # eth_keys' own error, or coincurve's ValueError
        raise ValueError("app public key is not a valid SEC1-compressed secp256k1 point") from exc
    return _k256_private_key(root.k256_private_bytes).sign_msg_hash(digest).to_bytes()


def derive_owner_seal_key(
    root: RootKeys, app_id: bytes, compose_hash: bytes, owner_address: bytes
) -> X25519PrivateKey:
    """The owner's sealing key for one recipe (DESIGN §3).

    ``X25519 private key = HKDF(derivation secret, [app_id, compose_hash, owner_address, b"owner-seal-key"], 32)``.
    Changing the recipe (compose hash), the app or the owner gives an unrelated key.
    """
    _require_bytes(app_id, _APP_ID_LEN, "app_id")
    _require_bytes(compose_hash, _COMPOSE_HASH_LEN, "compose_hash")
    _require_bytes(owner_address, _ADDRESS_LEN, "owner_address")
    secret = hkdf_derive(root.derivation_secret, [app_id, compose_hash, owner_address, _OWNER_SEAL_KEY_LABEL])
    return X25519PrivateKey.from_private_bytes(secret)


def sign_owner_seal_pubkey(
    root: RootKeys, app_id: bytes, compose_hash: bytes, owner_address: bytes, pubkey: bytes, timestamp: int
) -> bytes:
    """The root's recoverable signature (65 bytes ``r ‖ s ‖ v``, ``v`` in {0, 1}) over
    :func:`owner_seal_pubkey_digest`. Owners check it with ``kms_client.signature_chain.verify_owner_seal_pubkey``.
    """
    digest = owner_seal_pubkey_digest(app_id, compose_hash, owner_address, pubkey, timestamp)
    return _k256_private_key(root.k256_private_bytes).sign_msg_hash(digest).to_bytes()


def derive_env_encrypt_key(root: RootKeys, app_id: bytes) -> X25519PrivateKey:
    """The app's env-encrypt key (dstack ``GetAppEnvEncryptPubKey``): what deployers encrypt environment to.

    ``X25519 private key = HKDF(derivation secret, [app_id, b"env-encrypt-key"], 32)``. dstack uses the same context
    but derives from its P-256 root CA key (``derive_dh_secret``); this KMS has no CA, so the derivation secret
    stands in for it. One key per app, as in dstack: every recipe of the app shares it.
    """
    _require_bytes(app_id, _APP_ID_LEN, "app_id")
    return X25519PrivateKey.from_private_bytes(hkdf_derive(root.derivation_secret, [app_id, _ENV_ENCRYPT_KEY_LABEL]))


def sign_env_encrypt_pubkey(root: RootKeys, app_id: bytes, pubkey: bytes, timestamp: int) -> tuple[bytes, bytes]:
    """The root's two signatures over an env-encrypt public key, as dstack's KMS answers: ``(signature_v1 over
    env_encrypt_pubkey_digest (timestamped), legacy signature over env_encrypt_pubkey_legacy_digest)``, each 65
    bytes ``r ‖ s ‖ v``."""
    key = _k256_private_key(root.k256_private_bytes)
    v1 = key.sign_msg_hash(env_encrypt_pubkey_digest(app_id, pubkey, timestamp)).to_bytes()
    legacy = key.sign_msg_hash(env_encrypt_pubkey_legacy_digest(app_id, pubkey)).to_bytes()
    return v1, legacy
