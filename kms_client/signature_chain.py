"""Client-side checks of KMS-issued material: owner sealing keys and dstack signature chains.

Used by data owners (before sealing to a key), auditors (on a run's receipt) and CVMs (on their own keys).
Everything here is verify-or-raise; nothing talks to the network.

* Owner sealing public keys (DESIGN.md §3): the KMS root signs
  ``keccak256(b"sealroom-owner-seal-pubkey/v1:" ‖ app_id ‖ compose_hash ‖ owner ‖ u64_be(timestamp)
  ‖ pubkey)`` (``kms.keys.owner_seal_pubkey_digest``); :func:`verify_owner_seal_pubkey` checks signer and
  freshness.
* Signature chains (docs/design.md, "dstack formats": "Guest agent" and "Signature chain"; dstack's
  ``guest-agent/src/rpc_service.rs``): a ``Sign`` result carries ``signature``, ``public_key`` (pK2) and
  ``signature_chain = [signature, app-key signature, KMS signature]``; a ``GetKey`` result carries the key
  and the last two. The message signature is checked against pK2 as dstack's agent makes it: secp256k1 is
  64-byte low-s ``r ‖ s`` ECDSA over ``sha256(data)`` (k256's default digest), ``secp256k1_prehashed`` the
  same over the given 32-byte digest, ``ed25519`` a plain Ed25519 signature. The other two links are
  65-byte recoverable secp256k1 (``r ‖ s ‖ v``, ``v`` in {0, 1}) and recovered in turn::

      pK1 = recover(S_app, keccak256(f"{purpose}:{hex(pK2)}"))     # pK2 SEC1-compressed, or raw ed25519
      pK0 = recover(S_kms, keccak256(b"dstack-kms-issued:" ‖ app_id ‖ pK1 compressed))

  and pK0 must be the pinned KMS root. Recovery always yields *some* key, so a wrong app-key or KMS
  signature is noticed only where a recovered key is compared with an expected one: both surface at the
  root unless the caller also pins the app key.

Errors::

    KmsClientError
    ├── UntrustedKmsKey(reason)               an owner sealing key the pinned KMS root did not vouch for
    └── SignatureChainMismatch(link, reason)  a chain that does not lead to the pinned root; ``link`` is
                                              "chain" (malformed), "message", "app-key" or "kms" (LINK_*)

Material received from the KMS or an agent (signatures, public keys, timestamps) that is malformed is
reported with these errors; caller mistakes (wrong-length app_id, an unknown algorithm) are
``ValueError``/``TypeError``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from eth_keys import keys as eth_keys
from eth_keys.exceptions import BadSignature
from eth_keys.exceptions import ValidationError as EthKeysValidationError
from eth_utils import keccak, to_checksum_address

from kms_client.messages import (
    app_key_issued_digest,
    env_encrypt_pubkey_digest,
    k256_public_key_compressed,
    owner_seal_pubkey_digest,
)

__all__ = [
    "MAX_CLOCK_SKEW_S",
    "LINK_CHAIN",
    "LINK_MESSAGE",
    "LINK_APP_KEY",
    "LINK_KMS",
    "KmsClientError",
    "UntrustedKmsKey",
    "SignatureChainMismatch",
    "ChainRoots",
    "verify_owner_seal_pubkey",
    "verify_env_encrypt_pubkey",
    "recover_signature_chain",
    "verify_signature_chain",
    "verify_get_key_response",
]

LINK_CHAIN = "chain"  # the chain's shape: signature count, encoding, the returned key
LINK_MESSAGE = "message"  # the derived key's (pK2's) signature over the message
LINK_APP_KEY = "app-key"  # the app key's signature over "{purpose}:{derived pubkey hex}"
LINK_KMS = "kms"  # the KMS root's signature over the app key

# As dstack-sdk's verify_env_encrypt_public_key: a KMS clock up to a minute ahead of ours is tolerated.
MAX_CLOCK_SKEW_S = 60
_SIGN_ALGORITHMS = ("secp256k1", "secp256k1_prehashed", "ed25519")
_DOES_NOT_VERIFY = "the signature does not verify under the given public key (or the message differs)"
_SECP256K1_HALF_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0
_GET_KEY_ALGORITHMS = ("secp256k1", "ed25519")
_ADDRESS_RE = re.compile(r"0x[0-9a-fA-F]{40}")


class KmsClientError(Exception):
    """Base of the outcomes of kms_client."""


class UntrustedKmsKey(KmsClientError):
    """The KMS-issued key is not vouched for by the pinned KMS root (wrong signer, stale, future, malformed)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SignatureChainMismatch(KmsClientError):
    """A signature chain does not lead to the pinned KMS root; ``link`` names the first link found wrong."""

    def __init__(self, link: str, reason: str) -> None:
        super().__init__(f"{link} link: {reason}")
        self.link = link
        self.reason = reason


@dataclass(frozen=True)
class ChainRoots:
    """The keys of a signature chain: pK1 and pK0 33-byte SEC1-compressed secp256k1."""

    message_pubkey: bytes  # pK2: the derived key that signed the message (33 bytes, or 32 for ed25519)
    app_pubkey: bytes  # pK1: the app key (derived by the KMS from its root for this app_id)
    kms_root_pubkey: bytes  # pK0: the KMS root key

    @property
    def kms_root_address(self) -> str:
        """The KMS root's Ethereum address (0x + checksum)."""
        return eth_keys.PublicKey.from_compressed_bytes(self.kms_root_pubkey).to_checksum_address()


def _pinned_address(pinned: bytes | str, what: str) -> str:
    """Normalise a pinned KMS identity to a checksum address: 0x-address text, 20 raw bytes or a 33-byte key."""
    if isinstance(pinned, str):
        if not _ADDRESS_RE.fullmatch(pinned):
            raise ValueError(f"{what} must be a 0x-prefixed 20-byte address")
        return to_checksum_address(pinned)
    if isinstance(pinned, bytes) and len(pinned) == 20:
        return to_checksum_address(pinned)
    if isinstance(pinned, bytes) and len(pinned) == 33:
        try:
            return eth_keys.PublicKey.from_compressed_bytes(pinned).to_checksum_address()
        except (EthKeysValidationError, ValueError) as exc:
            raise ValueError(f"{what} is not a valid compressed secp256k1 public key") from exc
    raise TypeError(f"{what} must be an address (0x text or 20 bytes) or a 33-byte compressed public key")


def _recover(digest: bytes, signature: bytes) -> eth_keys.PublicKey:
    """Recover the signer of a 65-byte ``r ‖ s ‖ v`` signature; ValueError (with a reason) if malformed."""
    if len(signature) != 65:
        raise ValueError(f"signature must be 65 bytes (r ‖ s ‖ v), got {len(signature)}")
    try:
        return eth_keys.Signature(signature_bytes=signature).recover_public_key_from_msg_hash(digest)
    except (BadSignature, EthKeysValidationError) as exc:
        raise ValueError(f"malformed signature: {exc}") from exc


def verify_owner_seal_pubkey(
    app_id: bytes,
    compose_hash: bytes,
    owner: bytes,
    pubkey: bytes,
    timestamp: int,
    signature: bytes,
    *,
    pinned_root_address: bytes | str,
    now: int,
    max_age_s: int = 300,
) -> None:
    """Check that the pinned KMS root vouched, recently, for ``pubkey`` as the owner's sealing key.

    ``app_id`` (20), ``compose_hash`` (32) and ``owner`` (20) are what the caller expects; ``pubkey``
    (X25519, 32), ``timestamp`` (Unix seconds) and ``signature`` (65) come from the KMS. Refuses with
    :class:`UntrustedKmsKey` a malformed key or signature, a signature by anyone but the pinned root (which
    also covers any other app, recipe or owner), a timestamp older than ``max_age_s`` or more than
    ``MAX_CLOCK_SKEW_S`` ahead of ``now`` (both Unix seconds).
    """
    expected_signer = _pinned_address(pinned_root_address, "pinned_root_address")
    if not isinstance(pubkey, bytes) or len(pubkey) != 32:
        raise UntrustedKmsKey("malformed sealing public key: expected 32 bytes of X25519")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int) or not 0 <= timestamp < 2**64:
        raise UntrustedKmsKey("malformed timestamp")
    if not isinstance(signature, bytes):
        raise UntrustedKmsKey("malformed signature: expected bytes")
    # With the KMS's parts checked above, an error here is a caller mistake (ValueError/TypeError).
    digest = owner_seal_pubkey_digest(app_id, compose_hash, owner, pubkey, timestamp)
    try:
        signer = _recover(digest, signature)
    except ValueError as exc:
        raise UntrustedKmsKey(str(exc)) from exc
    if signer.to_checksum_address() != expected_signer:
        raise UntrustedKmsKey(
            f"signed by {signer.to_checksum_address()}, not the pinned KMS root {expected_signer} "
            "(or for another app, recipe or owner)"
        )
    if now - timestamp > max_age_s:
        raise UntrustedKmsKey(f"stale: signed {now - timestamp} s ago, more than the {max_age_s} s allowed")
    if timestamp - now > MAX_CLOCK_SKEW_S:
        raise UntrustedKmsKey(f"signed {timestamp - now} s in the future; check the KMS and local clocks")


def verify_env_encrypt_pubkey(
    app_id: bytes,
    pubkey: bytes,
    timestamp: int,
    signature_v1: bytes,
    *,
    pinned_root_address: bytes | str,
    now: int,
    max_age_s: int = 300,
) -> None:
    """Check that the pinned KMS root vouched, recently, for ``pubkey`` as the app's env-encrypt key (dstack's
    ``signature_v1``: ``kms_client.messages.env_encrypt_pubkey_digest``), as ``dstack_sdk``'s
    ``verify_env_encrypt_public_key`` does, but against a pinned root. Refuses with :class:`UntrustedKmsKey` what
    :func:`verify_owner_seal_pubkey` refuses."""
    expected_signer = _pinned_address(pinned_root_address, "pinned_root_address")
    if not isinstance(pubkey, bytes) or len(pubkey) != 32:
        raise UntrustedKmsKey("malformed env-encrypt public key: expected 32 bytes of X25519")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int) or not 0 <= timestamp < 2**64:
        raise UntrustedKmsKey("malformed timestamp")
    if not isinstance(signature_v1, bytes):
        raise UntrustedKmsKey("malformed signature: expected bytes")
    digest = env_encrypt_pubkey_digest(app_id, pubkey, timestamp)
    try:
        signer = _recover(digest, signature_v1)
    except ValueError as exc:
        raise UntrustedKmsKey(str(exc)) from exc
    if signer.to_checksum_address() != expected_signer:
        raise UntrustedKmsKey(
            f"signed by {signer.to_checksum_address()}, not the pinned KMS root {expected_signer} (or for another app)"
        )
    if now - timestamp > max_age_s:
        raise UntrustedKmsKey(f"stale: signed {now - timestamp} s ago, more than the {max_age_s} s allowed")
    if timestamp - now > MAX_CLOCK_SKEW_S:
        raise UntrustedKmsKey(f"signed {timestamp - now} s in the future; check the KMS and local clocks")


def _agent_bytes(item: object, what: str) -> bytes:
    """Bytes from an agent response field given as bytes or hex text (as dstack-sdk responses carry them)."""
    if isinstance(item, str):
        try:
            return bytes.fromhex(item.removeprefix("0x"))
        except ValueError as exc:
            raise SignatureChainMismatch(LINK_CHAIN, f"{what} is not valid hex") from exc
    if not isinstance(item, bytes):
        raise SignatureChainMismatch(LINK_CHAIN, f"{what} must be bytes or hex text")
    return item


def _signatures(signature_chain: Sequence[bytes | str], count: int) -> list[bytes]:
    if isinstance(signature_chain, (bytes, str)) or len(signature_chain) != count:
        raise SignatureChainMismatch(LINK_CHAIN, f"expected a list of {count} signatures")
    return [_agent_bytes(item, "a signature") for item in signature_chain]


def _recover_link(link: str, digest: bytes, signature: bytes) -> bytes:
    try:
        return _recover(digest, signature).to_compressed_bytes()
    except ValueError as exc:
        raise SignatureChainMismatch(link, str(exc)) from exc


def _recover_app_and_root(
    derived_pubkey_hex: str, app_signature: bytes, kms_signature: bytes, purpose: str, app_id: bytes
) -> tuple[bytes, bytes]:
    """(pK1, pK0) from the two links every chain shares (the guest agent's GetKey chain)."""
    if not isinstance(purpose, str):
        raise TypeError("purpose must be a string")
    app_pubkey = _recover_link(LINK_APP_KEY, keccak(f"{purpose}:{derived_pubkey_hex}".encode()), app_signature)
    root_pubkey = _recover_link(LINK_KMS, app_key_issued_digest(app_id, app_pubkey), kms_signature)
    return app_pubkey, root_pubkey


def _check_message_signature(algorithm: str, message: bytes, signature: bytes, pubkey: bytes) -> None:
    """dstack's ``Verify`` for a ``Sign`` result: ``signature`` over ``message`` by ``pubkey``, or raise."""
    if algorithm == "ed25519":
        if len(pubkey) != 32:
            raise SignatureChainMismatch(LINK_MESSAGE, "an ed25519 public key is 32 bytes")
        try:
            Ed25519PublicKey.from_public_bytes(pubkey).verify(signature, message)
        except (InvalidSignature, ValueError):
            raise SignatureChainMismatch(LINK_MESSAGE, _DOES_NOT_VERIFY) from None
        return
    digest = hashlib.sha256(message).digest() if algorithm == "secp256k1" else message
    if len(signature) != 64:
        raise SignatureChainMismatch(LINK_MESSAGE, f"a secp256k1 signature is 64 bytes (r ‖ s), got {len(signature)}")
    try:
        parsed = eth_keys.NonRecoverableSignature(signature_bytes=signature)
        signer = eth_keys.PublicKey.from_compressed_bytes(pubkey)
    except (BadSignature, EthKeysValidationError, ValueError) as exc:
        raise SignatureChainMismatch(LINK_MESSAGE, f"malformed signature or public key: {exc}") from exc
    # dstack's k256 accepts only low-s signatures; so do we, so that both agree on what is valid.
    if parsed.s > _SECP256K1_HALF_ORDER or not signer.verify_msg_hash(digest, parsed):
        raise SignatureChainMismatch(LINK_MESSAGE, _DOES_NOT_VERIFY)


def recover_signature_chain(
    message: bytes,
    signature_chain: Sequence[bytes | str],
    *,
    message_pubkey: bytes | str,
    app_id: bytes,
    purpose: str = "signing",
    algorithm: str = "secp256k1",
) -> ChainRoots:
    """Check a ``Sign`` result's message signature and recover the rest of its chain, **without** judging the root.

    ``signature_chain`` is ``[signature, app-key signature, KMS signature]`` and ``message_pubkey`` the
    response's ``public_key`` (bytes or hex, as dstack-sdk's ``SignResponse`` carries them). ``purpose`` is
    ``"signing"`` for dstack's ``Sign`` (the key at path ``vms``). For ``"secp256k1_prehashed"``,
    ``message`` is the 32-byte digest that was signed. The result proves nothing until its
    ``kms_root_pubkey`` is compared with a pinned root: use :func:`verify_signature_chain`.
    """
    if algorithm not in _SIGN_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {_SIGN_ALGORITHMS}")
    if not isinstance(message, bytes):
        raise TypeError("message must be bytes")
    if algorithm == "secp256k1_prehashed" and len(message) != 32:
        raise ValueError("secp256k1_prehashed needs the 32-byte digest as message")
    message_signature, app_signature, kms_signature = _signatures(signature_chain, 3)
    pubkey = _agent_bytes(message_pubkey, "message_pubkey")
    _check_message_signature(algorithm, message, message_signature, pubkey)
    app_pubkey, root_pubkey = _recover_app_and_root(pubkey.hex(), app_signature, kms_signature, purpose, app_id)
    return ChainRoots(message_pubkey=pubkey, app_pubkey=app_pubkey, kms_root_pubkey=root_pubkey)


def _check_root(recovered_root: bytes, expected: str, hint: str) -> None:
    recovered = eth_keys.PublicKey.from_compressed_bytes(recovered_root).to_checksum_address()
    if recovered != expected:
        raise SignatureChainMismatch(
            LINK_KMS, f"chain ends at {recovered}, not the pinned KMS root {expected} ({hint})"
        )


def verify_signature_chain(
    message: bytes,
    signature_chain: Sequence[bytes | str],
    *,
    message_pubkey: bytes | str,
    app_id: bytes,
    expected_kms_root: bytes | str,
    purpose: str = "signing",
    algorithm: str = "secp256k1",
    expected_app_pubkey: bytes | None = None,
) -> None:
    """Check that ``message`` was signed by a key the pinned KMS root issued to ``app_id`` (dstack.md §6).

    Arguments as :func:`recover_signature_chain`. ``expected_kms_root`` is the pinned root: a 0x address,
    20 address bytes or the 33-byte compressed key (DstackKms ``kmsInfo.k256Pubkey``). Optionally pin the
    app key (33-byte compressed) to learn whether a wrong chain broke at the app-key or the KMS link.
    Raises :class:`SignatureChainMismatch` naming the first wrong link, checked from the message up.
    """
    expected_root = _pinned_address(expected_kms_root, "expected_kms_root")
    if expected_app_pubkey is not None and (
        not isinstance(expected_app_pubkey, bytes) or len(expected_app_pubkey) != 33
    ):
        raise ValueError("expected_app_pubkey must be a 33-byte compressed key")
    roots = recover_signature_chain(message, signature_chain, message_pubkey=message_pubkey, app_id=app_id,
                                    purpose=purpose, algorithm=algorithm)
    if expected_app_pubkey is not None and roots.app_pubkey != expected_app_pubkey:
        raise SignatureChainMismatch(LINK_APP_KEY, "not signed by the expected app key (or the purpose differs)")
    if expected_app_pubkey is None:
        hint = "the app-key or KMS signature, the public key, the purpose or the app_id differs"
    else:
        hint = "the KMS signature or the app_id differs"
    _check_root(roots.kms_root_pubkey, expected_root, hint)


def verify_get_key_response(
    key: bytes | str,
    signature_chain: Sequence[bytes | str],
    purpose: str,
    app_id: bytes,
    expected_kms_root: bytes | str,
    *,
    algorithm: str = "secp256k1",
) -> None:
    """Check a guest agent ``GetKey`` answer: ``[app-key signature, KMS signature]`` leads to the pinned root.

    ``key`` is the returned 32-byte derived private key (bytes or hex, as ``GetKeyResponse.key``). Its public
    key (SEC1 compressed for secp256k1, raw 32 bytes for ed25519) is what the app key signed, with
    ``purpose``. Raises :class:`SignatureChainMismatch`.
    """
    if algorithm not in _GET_KEY_ALGORITHMS:
        raise ValueError(f"algorithm must be one of {_GET_KEY_ALGORITHMS}")
    expected_root = _pinned_address(expected_kms_root, "expected_kms_root")
    key = _agent_bytes(key, "the key")
    if len(key) != 32:
        raise SignatureChainMismatch(LINK_CHAIN, "the key must be 32 bytes")
    try:
        if algorithm == "secp256k1":
            derived_pubkey = k256_public_key_compressed(key)
        else:
            derived_pubkey = Ed25519PrivateKey.from_private_bytes(key).public_key().public_bytes_raw()
    except ValueError as exc:
        raise SignatureChainMismatch(LINK_CHAIN, "the key is not a valid private key") from exc
    app_signature, kms_signature = _signatures(signature_chain, 2)
    _, root_pubkey = _recover_app_and_root(derived_pubkey.hex(), app_signature, kms_signature, purpose, app_id)
    _check_root(root_pubkey, expected_root, "a signature, the key, the purpose or the app_id differs")
