"""Raw wrap/unwrap of the data key to the owner sealing key (DESIGN.md §4). Low level: use ``cvm.sealed.dataset``.

Wrap, ECIES-style:

1. an ephemeral X25519 key pair; ``shared = X25519(ephemeral_private, owner_seal_public)``;
2. ``kek = HKDF-SHA256(ikm=shared, salt=b"sealroom-wrap/v1",
   info=app_id(20) ‖ compose_hash(32) ‖ owner(20) ‖ ephemeral_public(32) ‖ owner_seal_public(32), L=32)``
   — fixed-length parts, so the concatenation is unambiguous; a key wrapped for one recipe, owner or
   recipient cannot be unwrapped as another;
3. ``wrapped = AES-256-GCM(kek, random 12-byte nonce, data_key, aad)`` where the caller passes the
   digest of the envelope header (every header field except the wrapped key itself).

Unwrap is the reverse with the owner sealing private key, which the KMS releases only to a CVM
running the approved recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from .errors import DecryptionFailed

WRAP_SALT = b"sealroom-wrap/v1"
DATA_KEY_BYTES = 32
WRAP_NONCE_BYTES = 12


@dataclass(frozen=True)
class WrapContext:
    """What the wrapping key is bound to: app_id (20 bytes), compose_hash (32), owner address (20)."""

    app_id: bytes
    compose_hash: bytes
    owner: bytes


@dataclass(frozen=True)
class WrappedKey:
    """The data key as stored in the envelope: ephemeral X25519 public key, GCM nonce, ciphertext‖tag."""

    ephemeral_public_key: bytes
    nonce: bytes
    ciphertext: bytes


def wrap_data_key(
    data_key: bytes,
    owner_seal_pubkey: X25519PublicKey,
    context: WrapContext,
    aad: bytes,
    *,
    ephemeral_private_bytes: bytes,
    nonce: bytes,
) -> WrappedKey:
    """Wrap ``data_key`` to ``owner_seal_pubkey`` (module docstring, steps 1-3); the caller supplies randomness."""
    ephemeral = X25519PrivateKey.from_private_bytes(ephemeral_private_bytes)
    ephemeral_public = _raw(ephemeral.public_key())
    try:
        shared = ephemeral.exchange(owner_seal_pubkey)
    except ValueError:
        raise ValueError("owner_seal_pubkey is a low-order X25519 point, not a sealing key") from None
    kek = _derive_kek(shared, context, ephemeral_public, _raw(owner_seal_pubkey))
    return WrappedKey(ephemeral_public, nonce, AESGCM(kek).encrypt(nonce, data_key, aad))


def unwrap_data_key(
    wrapped: WrappedKey, owner_seal_private_key: X25519PrivateKey, context: WrapContext, aad: bytes
) -> bytes:
    """Recover the data key, or raise ``DecryptionFailed`` (wrong key, wrong context, altered fields)."""
    try:
        shared = owner_seal_private_key.exchange(X25519PublicKey.from_public_bytes(wrapped.ephemeral_public_key))
        kek = _derive_kek(shared, context, wrapped.ephemeral_public_key, _raw(owner_seal_private_key.public_key()))
        return AESGCM(kek).decrypt(wrapped.nonce, wrapped.ciphertext, aad)
    except (InvalidTag, ValueError):
        # ValueError: a low-order ephemeral point. Same opaque outcome as a tag failure.
        raise DecryptionFailed() from None


def _derive_kek(shared: bytes, context: WrapContext, ephemeral_public: bytes, recipient_public: bytes) -> bytes:
    info = context.app_id + context.compose_hash + context.owner + ephemeral_public + recipient_public
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=WRAP_SALT, info=info).derive(shared)


def _raw(public_key: X25519PublicKey) -> bytes:
    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
