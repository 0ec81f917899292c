"""kms_client.box: a box sealed to a CVM's ephemeral key opens only there, for that nonce, untampered —
in both forms (the KMS's SealedAnswer and the one-buffer form that carries federated updates)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from kms_client.box import (
    BOX_OVERHEAD,
    BoxOpenFailed,
    SealedAnswer,
    open_answer,
    open_bytes,
    raw_public,
    seal_answer,
    seal_to_bytes,
)

NONCE = b"sealroom-fed-update-box/v1:" + bytes(32)


@pytest.fixture
def cvm_key():
    return X25519PrivateKey.generate()


def test_an_answer_opens_with_the_key_and_nonce_it_was_sealed_to(cvm_key):
    box = seal_answer(b"an app key", nonce=NONCE, cvm_pub=raw_public(cvm_key))
    assert open_answer(box, nonce=NONCE, cvm_key=cvm_key) == b"an app key"


def test_the_one_buffer_form_is_the_same_box(cvm_key):
    data = seal_to_bytes(b"x" * 1000, nonce=NONCE, cvm_pub=raw_public(cvm_key))
    assert len(data) == 1000 + BOX_OVERHEAD
    assert open_bytes(data, nonce=NONCE, cvm_key=cvm_key) == b"x" * 1000
    as_answer = SealedAnswer(bytes(data[:32]), bytes(data[32:44]), bytes(data[44:]))
    assert open_answer(as_answer, nonce=NONCE, cvm_key=cvm_key) == b"x" * 1000


def test_a_buffer_shorter_than_a_box_is_refused(cvm_key):
    with pytest.raises(BoxOpenFailed, match="too short to be a sealed box"):
        open_bytes(bytes(BOX_OVERHEAD - 1), nonce=NONCE, cvm_key=cvm_key)


@pytest.mark.parametrize("change", ["key", "nonce", "sender", "iv", "ciphertext", "tag"])
def test_any_other_key_nonce_or_byte_does_not_open(cvm_key, change):
    data, key, nonce = seal_to_bytes(b"an update", nonce=NONCE, cvm_pub=raw_public(cvm_key)), cvm_key, NONCE
    if change == "key":
        key = X25519PrivateKey.generate()
    elif change == "nonce":
        nonce = NONCE[:-1] + b"\x01"
    else:
        position = {"sender": 0, "iv": 32, "ciphertext": 44, "tag": len(data) - 1}[change]
        data[position] ^= 1
    with pytest.raises(BoxOpenFailed, match="could not be opened"):
        open_bytes(data, nonce=nonce, cvm_key=key)
