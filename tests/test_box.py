"""kms_client.box: an answer sealed to a CVM's ephemeral key opens only there, for that nonce, untampered."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from kms_client.box import BoxOpenFailed, SealedAnswer, open_answer, raw_public, seal_answer

NONCE = b"sealroom-fed-update-box/v1:" + bytes(32)


@pytest.fixture
def cvm_key():
    return X25519PrivateKey.generate()


def sealed_to(key: X25519PrivateKey, plaintext: bytes = b"an update") -> SealedAnswer:
    return seal_answer(plaintext, nonce=NONCE, cvm_pub=raw_public(key))


def test_the_answer_opens_with_the_key_and_nonce_it_was_sealed_to(cvm_key):
    assert open_answer(sealed_to(cvm_key), nonce=NONCE, cvm_key=cvm_key) == b"an update"


def test_the_binary_form_round_trips_and_carries_the_fixed_overhead(cvm_key):
    box = sealed_to(cvm_key, b"x" * 1000)
    data = box.to_bytes()
    assert len(data) == 1000 + SealedAnswer.OVERHEAD and SealedAnswer.from_bytes(data) == box


def test_a_body_shorter_than_a_box_is_refused():
    with pytest.raises(ValueError, match="too short to be a sealed box"):
        SealedAnswer.from_bytes(bytes(SealedAnswer.OVERHEAD - 1))


@pytest.mark.parametrize("change", ["key", "nonce", "ciphertext", "iv", "sender"])
def test_any_other_key_nonce_or_byte_does_not_open(cvm_key, change):
    box, key, nonce = sealed_to(cvm_key), cvm_key, NONCE
    if change == "key":
        key = X25519PrivateKey.generate()
    elif change == "nonce":
        nonce = NONCE[:-1] + b"\x01"
    elif change == "ciphertext":
        box = SealedAnswer(box.kms_ephemeral_pub, box.iv, bytes([box.ciphertext[0] ^ 1]) + box.ciphertext[1:])
    elif change == "iv":
        box = SealedAnswer(box.kms_ephemeral_pub, bytes(12), box.ciphertext)
    else:
        box = SealedAnswer(raw_public(X25519PrivateKey.generate()), box.iv, box.ciphertext)
    with pytest.raises(BoxOpenFailed, match="could not be opened"):
        open_answer(box, nonce=nonce, cvm_key=key)
