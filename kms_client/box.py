"""Encrypting a KMS answer to the ephemeral X25519 key a CVM bound into its quote.

The CVM puts `report_data = sha512(REPORT_DATA_LABEL ‖ nonce ‖ ephemeral_pub)` into a fresh quote, so only the
attested CVM holds the private half. The KMS answers with its own ephemeral key; both sides derive

    key = HKDF-SHA256(salt=b"sealroom-kms-box/v1", ikm=X25519(shared), info=nonce ‖ cvm_pub ‖ kms_pub)

and the answer is AES-256-GCM(key, random 12-byte nonce, plaintext, aad=b"sealroom-kms-box/v1" ‖ nonce).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

BOX_LABEL = b"sealroom-kms-box/v1"
REPORT_DATA_LABEL = b"sealroom-kms-attest/v1:"


class BoxOpenFailed(Exception):
    """The sealed answer did not decrypt: not for this key, or tampered with."""


def raw_public(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def attestation_report_data(nonce: bytes, ephemeral_pub: bytes) -> bytes:
    """The 64 bytes a CVM must put into its quote's report_data when asking the KMS for keys."""
    return hashlib.sha512(REPORT_DATA_LABEL + nonce + ephemeral_pub).digest()


def _key(shared: bytes, nonce: bytes, cvm_pub: bytes, kms_pub: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=BOX_LABEL, info=nonce + cvm_pub + kms_pub).derive(shared)


@dataclass(frozen=True)
class SealedAnswer:
    kms_ephemeral_pub: bytes
    iv: bytes
    ciphertext: bytes

    def to_wire(self) -> dict:
        return {"kms_ephemeral_pub": self.kms_ephemeral_pub.hex(), "iv": self.iv.hex(), "ciphertext": self.ciphertext.hex()}

    @classmethod
    def from_wire(cls, wire: dict) -> SealedAnswer:
        return cls(bytes.fromhex(wire["kms_ephemeral_pub"]), bytes.fromhex(wire["iv"]), bytes.fromhex(wire["ciphertext"]))


def _sender(nonce: bytes, cvm_pub: bytes, rng: Callable[[int], bytes]) -> tuple[bytes, bytes, AESGCM]:
    """A fresh ephemeral key pair's public half, a random IV, and the AEAD keyed for ``cvm_pub``."""
    kms_eph = X25519PrivateKey.from_private_bytes(rng(32))
    kms_pub = raw_public(kms_eph)
    key = _key(kms_eph.exchange(X25519PublicKey.from_public_bytes(cvm_pub)), nonce, cvm_pub, kms_pub)
    return kms_pub, rng(12), AESGCM(key)


def _open(kms_pub: bytes, iv: bytes, ciphertext: bytes | memoryview, nonce: bytes, cvm_key: X25519PrivateKey) -> bytes:
    try:
        shared = cvm_key.exchange(X25519PublicKey.from_public_bytes(kms_pub))
        key = _key(shared, nonce, raw_public(cvm_key), kms_pub)
        return AESGCM(key).decrypt(iv, ciphertext, BOX_LABEL + nonce)
    except (InvalidTag, ValueError):
        raise BoxOpenFailed("the sealed box could not be opened with this CVM's ephemeral key") from None


def seal_answer(plaintext: bytes, *, nonce: bytes, cvm_pub: bytes,
                rng: Callable[[int], bytes] = os.urandom) -> SealedAnswer:
    kms_pub, iv, aead = _sender(nonce, cvm_pub, rng)
    return SealedAnswer(kms_pub, iv, aead.encrypt(iv, plaintext, BOX_LABEL + nonce))


def open_answer(answer: SealedAnswer, *, nonce: bytes, cvm_key: X25519PrivateKey) -> bytes:
    return _open(answer.kms_ephemeral_pub, answer.iv, answer.ciphertext, nonce, cvm_key)


# The binary form, for large plaintexts (federated updates): one buffer, sender's key ‖ IV ‖ ciphertext ‖ tag.
BOX_OVERHEAD = 32 + 12 + 16


def seal_to_bytes(plaintext: bytes, *, nonce: bytes, cvm_pub: bytes,
                  rng: Callable[[int], bytes] = os.urandom) -> bytearray:
    """The box of :func:`seal_answer` as one buffer, encrypted straight into it (no copy of the plaintext)."""
    kms_pub, iv, aead = _sender(nonce, cvm_pub, rng)
    box = bytearray(BOX_OVERHEAD + len(plaintext))
    box[:32], box[32:44] = kms_pub, iv
    aead.encrypt_into(iv, plaintext, BOX_LABEL + nonce, memoryview(box)[44:])
    return box


def open_bytes(box: bytes | bytearray, *, nonce: bytes, cvm_key: X25519PrivateKey) -> bytes:
    """Open :func:`seal_to_bytes`'s buffer; BoxOpenFailed when it is too short, not for this key, or altered."""
    if len(box) < BOX_OVERHEAD:
        raise BoxOpenFailed("too short to be a sealed box")
    view = memoryview(box)
    return _open(bytes(view[:32]), bytes(view[32:44]), view[44:], nonce, cvm_key)
