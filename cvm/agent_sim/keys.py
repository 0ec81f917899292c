"""Key derivation and signatures of dstack's guest agent (``guest-agent/src/rpc_service.rs``, 0.5.x).

Exact bytes, as dstack does them (docs/design.md, "dstack formats"):

- GetKey: ``key = HKDF-SHA256(salt="RATLS", ikm=app k256 key, info=path, 32)`` for secp256k1 and
  ed25519 alike (the algorithm does not separate keys);
  ``sig0`` = recoverable secp256k1 signature (r‖s‖v, v ∈ {0,1}) by the app key over
  ``keccak256(f"{purpose}:{hex(pubkey)}")``, pubkey SEC1-compressed (secp256k1) or raw 32 (ed25519).
- KMS issuance (checked when the app key arrives): the KMS root signs
  ``keccak256(b"dstack-kms-issued:" ‖ app_id ‖ app pubkey compressed)``, recoverable.
- Sign: ed25519 signs ``data``; secp256k1 is ECDSA over ``sha256(data)`` (k256's default digest);
  secp256k1_prehashed signs the given 32-byte digest. secp256k1 signatures are 64 bytes r‖s, low-s.
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from eth_keys import keys
from eth_keys.exceptions import BadSignature, ValidationError
from eth_utils import keccak

__all__ = [
    "GET_KEY_ALGORITHMS",
    "SIGN_ALGORITHMS",
    "derive_path_key",
    "normalize_algorithm",
    "public_key_of",
    "purpose_hash",
    "recover_signer",
    "sign_data",
    "sign_recoverable",
    "verify_data",
]

GET_KEY_ALGORITHMS = ("secp256k1", "ed25519")
SIGN_ALGORITHMS = ("secp256k1", "secp256k1_prehashed", "ed25519")
_SECP256K1_HALF_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0


def normalize_algorithm(algorithm: str, allowed: tuple[str, ...]) -> str:
    """dstack's names: ``k256`` is an alias of ``secp256k1``, and GetKey's empty default is secp256k1."""
    name = {"k256": "secp256k1", "": "secp256k1"}.get(algorithm, algorithm)
    if name not in allowed:
        raise ValueError(f"unsupported algorithm {algorithm!r} (supported: {', '.join(allowed)})")
    return name


def derive_path_key(app_key: bytes, path: str) -> bytes:
    """dstack ``derive_key(app_key, [path], 32)``: HKDF-SHA256, salt ``RATLS``, info = the path's UTF-8 bytes."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"RATLS", info=path.encode("utf-8")).derive(app_key)


def public_key_of(algorithm: str, private_key: bytes) -> bytes:
    """SEC1-compressed secp256k1 public key (33 bytes) or raw ed25519 public key (32 bytes)."""
    if algorithm == "ed25519":
        return Ed25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes_raw()
    return _k256(private_key).public_key.to_compressed_bytes()


def purpose_hash(purpose: str, public_key: bytes) -> bytes:
    """What the app key signs for a derived key: ``keccak256(f"{purpose}:{hex(pubkey)}")``."""
    return keccak(f"{purpose}:{public_key.hex()}".encode("utf-8"))


def sign_recoverable(private_key: bytes, message_hash: bytes) -> bytes:
    """Recoverable secp256k1 signature ``r ‖ s ‖ v`` (65 bytes, v ∈ {0,1}), deterministic (RFC 6979)."""
    return bytes(_k256(private_key).sign_msg_hash(message_hash).to_bytes())


def recover_signer(signature: bytes, message_hash: bytes) -> bytes:
    """The compressed public key that made a 65-byte recoverable signature (ValueError if malformed)."""
    try:
        return bytes(keys.Signature(signature).recover_public_key_from_msg_hash(message_hash).to_compressed_bytes())
    except (BadSignature, ValidationError, ValueError):
        raise ValueError("not a valid recoverable secp256k1 signature") from None


def sign_data(algorithm: str, private_key: bytes, data: bytes) -> tuple[bytes, bytes]:
    """dstack Sign: ``(signature, public_key)`` for ``algorithm`` in :data:`SIGN_ALGORITHMS`."""
    if algorithm == "ed25519":
        signer = Ed25519PrivateKey.from_private_bytes(private_key)
        return signer.sign(data), signer.public_key().public_bytes_raw()
    digest = _secp256k1_digest(algorithm, data)
    key = _k256(private_key)
    return bytes(key.sign_msg_hash(digest).to_bytes()[:64]), key.public_key.to_compressed_bytes()


def verify_data(algorithm: str, data: bytes, signature: bytes, public_key: bytes) -> bool:
    """dstack Verify. Malformed keys or signatures raise ValueError; a wrong signature returns False.

    secp256k1 signatures must be low-s, as k256 requires.
    """
    if algorithm == "ed25519":
        if len(signature) != 64 or len(public_key) != 32:
            raise ValueError("ed25519 signatures are 64 bytes and public keys 32")
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
        except InvalidSignature:
            return False
        return True
    digest = _secp256k1_digest(algorithm, data)
    if len(signature) != 64:
        raise ValueError("secp256k1 signatures are 64 bytes (r ‖ s)")
    try:
        verifying_key = keys.PublicKey.from_compressed_bytes(public_key)
        parsed = keys.NonRecoverableSignature(signature_bytes=signature)
    except (ValidationError, ValueError, BadSignature):
        raise ValueError("not a valid secp256k1 public key or signature") from None
    if parsed.s > _SECP256K1_HALF_ORDER:
        return False
    return bool(verifying_key.verify_msg_hash(digest, parsed))


def _secp256k1_digest(algorithm: str, data: bytes) -> bytes:
    if algorithm == "secp256k1_prehashed":
        if len(data) != 32:
            raise ValueError(f"pre-hashed signing needs a 32-byte digest, got {len(data)} bytes")
        return data
    return hashlib.sha256(data).digest()


def _k256(private_key: bytes) -> keys.PrivateKey:
    try:
        return keys.PrivateKey(private_key)
    except ValidationError:
        raise ValueError("not a valid secp256k1 private key") from None
