"""Site updates: the signed record a site sends, and the site-side helpers that clip and sign it.

Spec: DESIGN.md §7 ("sites send signed, clipped updates"). An update is the site's model delta for one
round (its locally trained weights minus the parent's), a flat float32 vector; the aggregator adds the
aggregate of the deltas to the parent.

What a site signs (secp256k1, recoverable, 65 bytes ``r ‖ s ‖ v`` with ``v`` in {0, 1}, like the KMS's
app-key signature) is ``keccak256`` of exactly these bytes::

    b"sealroom-fed-update/v1:"           23 bytes, the label and version
    round                                8 bytes, unsigned big-endian
    parent digest                        32 raw bytes (the contract's parent_digest, unhexed)
    sha256(canonical update bytes)       32 raw bytes (float32 little-endian, see ``vectors``)
    num_examples                         8 bytes, unsigned big-endian

The site's address is not in the message: recovering the signer proves it. The round and the parent
digest make an update useless in any other round or on any other model lineage; ``claimed_norm`` is not
signed, the aggregator recomputes the norm and only compares.
"""

from __future__ import annotations

from dataclasses import dataclass

import eth_keys
import numpy as np
from eth_keys.exceptions import BadSignature
from eth_keys.exceptions import ValidationError as EthKeysValidationError
from eth_utils import keccak

from cvm.federated import vectors
from cvm.federated.round_contract import check_hex_digest

UPDATE_SIGNATURE_LABEL = b"sealroom-fed-update/v1:"
SIGNATURE_LENGTH = 65
_U64_MAX = 2**64 - 1


@dataclass(frozen=True, eq=False)
class SignedUpdate:
    """One site's update for one round, as received. Nothing in it is trusted until the aggregator validates it.

    ``site`` is the address the sender claims (0x + checksum); ``vector`` the float32 delta;
    ``claimed_norm`` the L2 norm the site computed; ``signature`` 65 bytes over :func:`update_message_hash`.
    """

    round: int
    site: str
    parent_digest: str
    num_examples: int
    vector: np.ndarray
    claimed_norm: float
    signature: bytes


def update_message_hash(round_number: int, parent_digest: str, vector_digest: str, num_examples: int) -> bytes:
    """keccak256 of the signed bytes listed in the module docstring (32 bytes)."""
    for name, value in (("round", round_number), ("num_examples", num_examples)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int")
        if not 0 <= value <= _U64_MAX:
            raise ValueError(f"{name} must fit in an unsigned 64-bit integer")
    parent = bytes.fromhex(check_hex_digest(parent_digest, "parent_digest"))
    update = bytes.fromhex(check_hex_digest(vector_digest, "update digest"))
    return keccak(
        UPDATE_SIGNATURE_LABEL
        + round_number.to_bytes(8, "big")
        + parent
        + update
        + num_examples.to_bytes(8, "big")
    )


def recover_signer(message_hash: bytes, signature: bytes) -> str | None:
    """The checksummed address that produced ``signature`` over ``message_hash``, or None if it is not a valid
    recoverable secp256k1 signature (wrong length, ``v`` not in {0, 1}, r or s out of range, no point)."""
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_LENGTH:
        return None
    try:
        public_key = eth_keys.keys.Signature(signature).recover_public_key_from_msg_hash(message_hash)
    except (BadSignature, EthKeysValidationError):
        return None
    return public_key.to_checksum_address()


def clip(update: np.ndarray, clip_norm: float) -> np.ndarray:
    """``update`` scaled by ``min(1, clip_norm / ‖update‖₂)``, as a new float32 vector (site side).

    This is the per-site clipping of DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private
    Recurrent Language Models", Alg. 1). Refuses NaN/Inf, which no clipping can bound.
    """
    vector = vectors.canonical(update)
    if isinstance(clip_norm, bool) or not isinstance(clip_norm, (int, float)) or not 0 < clip_norm < np.inf:
        raise ValueError("clip_norm must be a positive finite number")
    norm = vectors.l2_norm(vector)
    if not np.isfinite(norm):
        raise ValueError("the update holds NaN or infinite values")
    if norm <= clip_norm:
        return vector.copy()
    return (vector * np.float32(clip_norm / norm)).astype(vectors.CANONICAL_DTYPE)


def sign_update(
    private_key: bytes,
    *,
    round_number: int,
    parent_digest: str,
    num_examples: int,
    vector: np.ndarray,
) -> SignedUpdate:
    """Sign a (clipped) update with the site's secp256k1 key; the returned record is ready to send.

    ``num_examples`` (≥ 1) is the number of local training examples, FedAvg's weight.
    """
    if not isinstance(private_key, bytes) or len(private_key) != 32:
        raise TypeError("private_key must be 32 bytes")
    try:
        key = eth_keys.keys.PrivateKey(private_key)
    except EthKeysValidationError as error:
        raise ValueError("not a valid secp256k1 private key") from error
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError("num_examples must be a positive int")
    canonical = vectors.canonical(vector)
    norm = vectors.l2_norm(canonical)
    if not np.isfinite(norm):
        raise ValueError("the update holds NaN or infinite values")
    message = update_message_hash(round_number, parent_digest, vectors.digest(canonical), num_examples)
    return SignedUpdate(
        round=round_number,
        site=key.public_key.to_checksum_address(),
        parent_digest=parent_digest,
        num_examples=num_examples,
        vector=canonical,
        claimed_norm=norm,
        signature=key.sign_msg_hash(message).to_bytes(),
    )

