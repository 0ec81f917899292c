"""Every byte layout the KMS signs, in one place shared by the KMS (``kms.keys``) and the clients that check its
signatures (``kms_client``, the guest agent). Neither side reaches into the other's internals for them.

Every digest is keccak256 over a namespaced message; the KMS root signs them with recoverable secp256k1 ECDSA
(65 bytes ``r ‖ s ‖ v``, ``v`` in {0, 1}: dstack's ``k256_signature`` layout).
"""

from __future__ import annotations

from eth_keys import keys as eth_keys
from eth_keys.exceptions import ValidationError as EthKeysValidationError
from eth_utils import keccak

__all__ = [
    "APP_KEY_ISSUED_PREFIX",
    "ENV_ENCRYPT_PUBKEY_PREFIX",
    "OWNER_SEAL_PUBKEY_PREFIX",
    "app_key_issued_digest",
    "env_encrypt_pubkey_digest",
    "env_encrypt_pubkey_legacy_digest",
    "k256_public_key_compressed",
    "owner_seal_pubkey_digest",
]

APP_KEY_ISSUED_PREFIX = b"dstack-kms-issued:"
OWNER_SEAL_PUBKEY_PREFIX = b"sealroom-owner-seal-pubkey/v1:"
ENV_ENCRYPT_PUBKEY_PREFIX = b"dstack-env-encrypt-pubkey:"

_APP_ID_LEN = 20
_COMPOSE_HASH_LEN = 32
_ADDRESS_LEN = 20
_X25519_PUBKEY_LEN = 32
_U64_MAX = 2**64 - 1


def _require_bytes(value: object, length: int, what: str) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"{what} must be bytes, not {type(value).__name__}")
    if len(value) != length:
        raise ValueError(f"{what} must be {length} bytes, got {len(value)}")
    return value


def k256_public_key_compressed(private_bytes: bytes) -> bytes:
    """The 33-byte SEC1-compressed secp256k1 public key of a 32-byte private key."""
    _require_bytes(private_bytes, 32, "private key")
    try:
        return eth_keys.PrivateKey(private_bytes).public_key.to_compressed_bytes()
    except EthKeysValidationError as exc:
        raise ValueError("not a valid secp256k1 private key (must be 1 <= k < n)") from exc


def app_key_issued_digest(app_id: bytes, app_pubkey_compressed: bytes) -> bytes:
    """The digest the root signs to issue an app key, as dstack does.

    Bytes hashed: ``b"dstack-kms-issued:" ‖ app_id (20) ‖ app public key, SEC1 compressed (33)``;
    digest = keccak256 of those bytes.
    """
    _require_bytes(app_id, _APP_ID_LEN, "app_id")
    _require_bytes(app_pubkey_compressed, 33, "app public key (SEC1 compressed)")
    return keccak(APP_KEY_ISSUED_PREFIX + app_id + app_pubkey_compressed)


def owner_seal_pubkey_digest(
    app_id: bytes, compose_hash: bytes, owner_address: bytes, pubkey: bytes, timestamp: int
) -> bytes:
    """The digest the root signs to vouch for an owner sealing public key.

    Bytes hashed: ``b"sealroom-owner-seal-pubkey/v1:" ‖ app_id (20) ‖ compose_hash (32) ‖ owner_address (20)
    ‖ u64_be(timestamp) (8) ‖ X25519 public key (32)``; digest = keccak256 of those bytes. Modelled on dstack's
    ``signature_v1`` for env-encrypt keys, with the recipe and the owner added to the context.
    """
    _require_bytes(app_id, _APP_ID_LEN, "app_id")
    _require_bytes(compose_hash, _COMPOSE_HASH_LEN, "compose_hash")
    _require_bytes(owner_address, _ADDRESS_LEN, "owner_address")
    _require_bytes(pubkey, _X25519_PUBKEY_LEN, "X25519 public key")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int):
        raise TypeError("timestamp must be an int (Unix seconds)")
    if not 0 <= timestamp <= _U64_MAX:
        raise ValueError("timestamp must fit in an unsigned 64-bit integer")
    return keccak(
        OWNER_SEAL_PUBKEY_PREFIX + app_id + compose_hash + owner_address + timestamp.to_bytes(8, "big") + pubkey
    )


def env_encrypt_pubkey_digest(app_id: bytes, pubkey: bytes, timestamp: int) -> bytes:
    """The digest the root signs to vouch for an app's env-encrypt public key: dstack's ``signature_v1``.

    Bytes hashed: ``b"dstack-env-encrypt-pubkey:" ‖ app_id (20) ‖ u64_be(timestamp) (8) ‖ X25519 public key
    (32)``; digest = keccak256 of those bytes. Exactly what dstack's KMS signs in ``GetAppEnvEncryptPubKey`` and what
    ``dstack_sdk.verify_env_encrypt_public_key`` recovers.
    """
    _require_bytes(app_id, _APP_ID_LEN, "app_id")
    _require_bytes(pubkey, _X25519_PUBKEY_LEN, "X25519 public key")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int):
        raise TypeError("timestamp must be an int (Unix seconds)")
    if not 0 <= timestamp <= _U64_MAX:
        raise ValueError("timestamp must fit in an unsigned 64-bit integer")
    return keccak(ENV_ENCRYPT_PUBKEY_PREFIX + app_id + timestamp.to_bytes(8, "big") + pubkey)


def env_encrypt_pubkey_legacy_digest(app_id: bytes, pubkey: bytes) -> bytes:
    """dstack's legacy (untimestamped) env-key signature digest: ``keccak256("dstack-env-encrypt-pubkey:" ‖ app_id ‖
    X25519 public key)``. Served for old dstack clients only; Sealroom's client checks the timestamped one."""
    _require_bytes(app_id, _APP_ID_LEN, "app_id")
    _require_bytes(pubkey, _X25519_PUBKEY_LEN, "X25519 public key")
    return keccak(ENV_ENCRYPT_PUBKEY_PREFIX + app_id + pubkey)
