"""Every way of damaging or forging a sealed file is refused, with the error named for what happened.

Regions of a sealed file (see cvm/sealed/envelope.py): magic line | head | payload | tail.
A change in the magic line is MalformedSealedFile or UnsupportedFormatVersion; in head or tail,
MalformedSealedFile or EnvelopeSignatureInvalid; in the payload, DecryptionFailed. Any other
exception type (a dependency's error leaking out) fails these tests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from eth_keys import keys
from eth_keys.constants import SECPK1_N
from hypothesis import given, settings
from hypothesis import strategies as st

from cvm.sealed import envelope as _envelope
from cvm.sealed.dataset import (
    DecryptionFailed,
    EnvelopeSignatureInvalid,
    MalformedSealedFile,
    SealedForAnotherRecipe,
    UnsupportedFormatVersion,
    open_sealed,
    read_envelope,
    seal_file,
)
from cvm.sealed.envelope import (
    encode_head,
    encode_tail,
    read_envelope_unverified,
    sign_envelope,
)
from cvm.sealed.keywrap import WrapContext, WrappedKey, unwrap_data_key, wrap_data_key
from cvm.sealed.stream import TAG_BYTES, decrypt_stream, encrypt_stream, payload_length

APP_ID = bytes.fromhex("a11ce" * 8)
COMPOSE_HASH = hashlib.sha256(b"the approved recipe").digest()
KMS_ROOT = "0x8ba1f109551bD432803012645Ac136ddd64DBA72"
CHUNK = 32
PLAINTEXT = b"id,value\n" + b"".join(b"%d,%d\n" % (i, i * i) for i in range(1, 24))  # 5 chunks, last one short


@dataclasses.dataclass(frozen=True)
class Owner:
    signing_key: keys.PrivateKey
    seal_key: X25519PrivateKey


def make_owner(name: bytes) -> Owner:
    return Owner(
        keys.PrivateKey(hashlib.sha256(b"signing " + name).digest()),
        X25519PrivateKey.from_private_bytes(hashlib.sha256(b"sealing " + name).digest()),
    )


ALICE, BOB, MALLORY = make_owner(b"alice"), make_owner(b"bob"), make_owner(b"mallory")


def sealed_bytes(tmp_path: Path, owner: Owner, name: str = "cohort", **overrides: object) -> bytes:
    source = tmp_path / f"{name}.csv"
    source.write_bytes(PLAINTEXT)
    summary = seal_file(
        source,
        tmp_path / f"{name}.sealed",
        app_id=APP_ID,
        compose_hash=COMPOSE_HASH,
        owner_key=owner.signing_key,
        owner_seal_pubkey=owner.seal_key.public_key(),
        kms_root_address=KMS_ROOT,
        chunk_size=CHUNK,
        now=datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC),
        **overrides,  # type: ignore[arg-type]
    )
    return summary.out_path.read_bytes()


def open_bytes(data: bytes, owner: Owner = ALICE, compose_hash: bytes = COMPOSE_HASH, app_id: bytes = APP_ID) -> bytes:
    opened = open_sealed(io.BytesIO(data), owner.seal_key, expected_app_id=app_id, expected_compose_hash=compose_hash)
    return bytes(opened.plaintext)


@pytest.fixture(scope="module")
def alice_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return sealed_bytes(tmp_path_factory.mktemp("alice"), ALICE)


def regions(data: bytes) -> tuple[int, int, int]:
    """(end of magic line, payload start, payload end) of a well-formed file."""
    envelope = read_envelope_unverified(io.BytesIO(data))
    start = envelope.payload_offset
    return len(_envelope.MAGIC_LINE), start, start + payload_length(len(PLAINTEXT), CHUNK)


def expected_errors(data: bytes, position: int) -> tuple[type[Exception], ...]:
    magic_end, payload_start, payload_end = regions(data)
    if position < magic_end:
        return (MalformedSealedFile, UnsupportedFormatVersion)
    if payload_start <= position < payload_end:
        return (DecryptionFailed,)
    return (MalformedSealedFile, EnvelopeSignatureInvalid)


def flip(data: bytes, position: int, bit: int) -> bytes:
    changed = bytearray(data)
    changed[position] ^= 1 << bit
    return bytes(changed)


def chunks(data: bytes) -> list[bytes]:
    _, start, end = regions(data)
    payload = data[start:end]
    return [payload[i : i + CHUNK + TAG_BYTES] for i in range(0, len(payload), CHUNK + TAG_BYTES)]


def with_payload(data: bytes, payload: bytes) -> bytes:
    _, start, end = regions(data)
    return data[:start] + payload + data[end:]


def test_the_untouched_file_opens(alice_file: bytes) -> None:
    assert open_bytes(alice_file) == PLAINTEXT
    assert len(chunks(alice_file)) == 5


def test_a_flipped_bit_at_every_byte_position_is_refused_by_region(alice_file: bytes) -> None:
    seen: set[type[Exception]] = set()
    for position in range(len(alice_file)):
        allowed = expected_errors(alice_file, position)
        with pytest.raises(allowed) as raised:
            open_bytes(flip(alice_file, position, bit=position % 8))
        seen.add(raised.type)
    assert seen == {MalformedSealedFile, UnsupportedFormatVersion, EnvelopeSignatureInvalid, DecryptionFailed}


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_random_bit_flips_are_refused(alice_file: bytes, data: st.DataObject) -> None:
    position = data.draw(st.integers(0, len(alice_file) - 1), label="position")
    bit = data.draw(st.integers(0, 7), label="bit")
    with pytest.raises(expected_errors(alice_file, position)):
        open_bytes(flip(alice_file, position, bit))


def test_truncation_at_every_length_is_refused(alice_file: bytes) -> None:
    for length in range(len(alice_file)):
        with pytest.raises(MalformedSealedFile):
            open_bytes(alice_file[:length])


@settings(max_examples=50, deadline=None)
@given(extra=st.binary(min_size=1, max_size=64))
def test_trailing_data_is_refused(alice_file: bytes, extra: bytes) -> None:
    with pytest.raises(MalformedSealedFile, match="unexpected data after the tail"):
        open_bytes(alice_file + extra)


def test_a_repeated_tail_is_refused(alice_file: bytes) -> None:
    _, _, payload_end = regions(alice_file)
    with pytest.raises(MalformedSealedFile):
        open_bytes(alice_file + alice_file[payload_end:])


def test_reordered_chunks_fail_decryption(alice_file: bytes) -> None:
    first, second, *rest = chunks(alice_file)
    with pytest.raises(DecryptionFailed):
        open_bytes(with_payload(alice_file, b"".join([second, first, *rest])))


def test_a_chunk_spliced_from_another_sealing_of_the_same_data_fails(alice_file: bytes, tmp_path: Path) -> None:
    other = sealed_bytes(tmp_path, ALICE, "again")  # same owner, input and recipe; fresh data key
    mine, theirs = chunks(alice_file), chunks(other)
    with pytest.raises(DecryptionFailed):
        open_bytes(with_payload(alice_file, b"".join([*mine[:2], theirs[2], *mine[3:]])))


def test_a_payload_re_encrypted_under_the_real_data_key_fails_the_signed_digest(tmp_path: Path) -> None:
    # Whoever can unwrap the data key (the KMS, a CVM) can make chunks that authenticate; the owner's
    # signature over ciphertext_sha256 is what still stops them from substituting the data.
    sealed = sealed_bytes(tmp_path, ALICE, rng=lambda n: bytes(range(n)))  # first draw is the data key
    header = read_envelope_unverified(io.BytesIO(sealed)).header
    substitute = io.BytesIO()
    encrypt_stream(
        io.BytesIO(PLAINTEXT.replace(b"4,16", b"4,99")), substitute, data_key=bytes(range(32)), aad=header.digest,
        plaintext_bytes=len(PLAINTEXT), chunk_size=CHUNK, observe=lambda chunk: None,
    )  # fmt: skip
    assert open_bytes(sealed) == PLAINTEXT
    with pytest.raises(DecryptionFailed):
        open_bytes(with_payload(sealed, substitute.getvalue()))


def test_an_envelope_swapped_in_from_another_owners_file_fails(alice_file: bytes, tmp_path: Path) -> None:
    bob_file = sealed_bytes(tmp_path, BOB)
    _, start, end = regions(bob_file)
    bobs_envelope_alices_payload = bob_file[:start] + alice_file[start:end] + bob_file[end:]
    bob = BOB.signing_key.public_key.to_canonical_address()
    assert read_envelope(io.BytesIO(bobs_envelope_alices_payload)).header.owner == bob
    with pytest.raises(DecryptionFailed):
        open_bytes(bobs_envelope_alices_payload, owner=BOB)
    with pytest.raises(DecryptionFailed):
        open_bytes(bobs_envelope_alices_payload, owner=ALICE)


def forge(data: bytes, signer: keys.PrivateKey, **header_changes: object) -> bytes:
    """Rebuild ``data`` with changed header fields, validly signed by ``signer``."""
    envelope = read_envelope_unverified(io.BytesIO(data))
    header = dataclasses.replace(envelope.header, **header_changes)
    resigned = sign_envelope(header, envelope.wrapped_key, envelope.rows, envelope.ciphertext_sha256, signer)
    _, start, end = regions(data)
    return encode_head(header, envelope.wrapped_key) + data[start:end] + encode_tail(resigned)


def test_an_envelope_re_signed_by_someone_other_than_its_owner_is_refused(alice_file: bytes) -> None:
    forged = forge(alice_file, MALLORY.signing_key)
    mallory = MALLORY.signing_key.public_key.to_checksum_address()
    with pytest.raises(EnvelopeSignatureInvalid, match=f"signed by {mallory}, not by the owner"):
        open_bytes(forged)


def test_an_owner_field_replaced_and_re_signed_still_cannot_be_opened(alice_file: bytes) -> None:
    # Mallory claims Alice's data as hers: the signature now verifies (signer == named owner), but the
    # wrap is bound to Alice's address and every chunk to the original header digest.
    mallory = MALLORY.signing_key.public_key.to_canonical_address()
    forged = forge(alice_file, MALLORY.signing_key, owner=mallory)
    assert read_envelope(io.BytesIO(forged)).header.owner == mallory
    with pytest.raises(DecryptionFailed):
        open_bytes(forged, owner=ALICE)


def test_a_changed_recipe_re_signed_by_the_owner_cannot_be_opened(alice_file: bytes) -> None:
    # Even the owner cannot re-target an existing file: the data key is wrapped for the old recipe.
    other_recipe = hashlib.sha256(b"another recipe").digest()
    forged = forge(alice_file, ALICE.signing_key, compose_hash=other_recipe)
    with pytest.raises(DecryptionFailed):
        open_bytes(forged, compose_hash=other_recipe)


def test_an_inconsistent_chunk_count_is_malformed_even_when_signed_by_the_owner(alice_file: bytes) -> None:
    with pytest.raises(MalformedSealedFile, match="chunk_count"):
        open_bytes(forge(alice_file, ALICE.signing_key, chunk_count=6))


def test_a_high_s_twin_of_a_valid_signature_is_refused(alice_file: bytes) -> None:
    envelope = read_envelope_unverified(io.BytesIO(alice_file))
    r, s, v = (int.from_bytes(envelope.signature[:32], "big"), int.from_bytes(envelope.signature[32:64], "big"),
               envelope.signature[64])  # fmt: skip
    twin = keys.Signature(vrs=(1 - v, r, SECPK1_N - s)).to_bytes()
    _, _, end = regions(alice_file)
    forged = alice_file[:end] + encode_tail(dataclasses.replace(envelope, signature=twin))
    with pytest.raises(EnvelopeSignatureInvalid, match="low-s"):
        open_bytes(forged)


def test_a_non_canonical_head_is_refused_even_when_validly_signed(alice_file: bytes) -> None:
    envelope = read_envelope_unverified(io.BytesIO(alice_file))
    head = encode_head(envelope.header, envelope.wrapped_key)
    magic_and_length = len(_envelope.MAGIC_LINE) + 4
    spaced = head[magic_and_length:].replace(b'"chunk_count":', b'"chunk_count": ')
    _, start, end = regions(alice_file)
    rebuilt = _envelope.MAGIC_LINE + len(spaced).to_bytes(4, "big") + spaced + alice_file[start:end]
    forged = rebuilt + encode_tail(envelope)  # the signature covers values, which did not change
    with pytest.raises(MalformedSealedFile, match="canonical"):
        open_bytes(forged)


def test_the_wrong_unwrap_key_fails_decryption(alice_file: bytes) -> None:
    with pytest.raises(DecryptionFailed):
        open_bytes(alice_file, owner=BOB)


def test_another_recipe_is_refused_by_name(alice_file: bytes) -> None:
    with pytest.raises(SealedForAnotherRecipe, match="compose hash"):
        open_bytes(alice_file, compose_hash=hashlib.sha256(b"a different recipe").digest())
    with pytest.raises(SealedForAnotherRecipe):
        open_bytes(alice_file, app_id=bytes(20))


def test_another_format_version_is_unsupported_and_garbage_is_malformed(alice_file: bytes) -> None:
    with pytest.raises(UnsupportedFormatVersion, match="version 2"):
        open_bytes(alice_file.replace(b"sealroom.sealed/v1\n", b"sealroom.sealed/v2\n", 1))
    with pytest.raises(UnsupportedFormatVersion, match="version 10"):
        open_bytes(b"sealroom.sealed/v10\n" + alice_file[len(_envelope.MAGIC_LINE) :])
    with pytest.raises(MalformedSealedFile, match="magic"):
        open_bytes(PLAINTEXT)
    with pytest.raises(MalformedSealedFile):
        read_envelope(io.BytesIO(b""))


# --- the raw stream: final-chunk flag, index binding, zeroing ----------------------------------------

DATA_KEY = bytes(range(32))
AAD = hashlib.sha256(b"header digest").digest()


def raw_stream(plaintext: bytes) -> bytes:
    sink = io.BytesIO()
    encrypt_stream(
        io.BytesIO(plaintext), sink, data_key=DATA_KEY, aad=AAD, plaintext_bytes=len(plaintext),
        chunk_size=CHUNK, observe=lambda chunk: None,
    )  # fmt: skip
    return sink.getvalue()


def raw_open(stream: bytes, plaintext_bytes: int, buffer: bytearray | None = None, aad: bytes = AAD) -> bytes:
    target = bytearray(plaintext_bytes) if buffer is None else buffer
    decrypt_stream(
        io.BytesIO(stream), memoryview(target), data_key=DATA_KEY, aad=aad, chunk_size=CHUNK,
        expected_ciphertext_sha256=hashlib.sha256(stream).digest(),
    )  # fmt: skip
    return bytes(target)


def test_raw_stream_round_trip() -> None:
    assert raw_open(raw_stream(PLAINTEXT), len(PLAINTEXT)) == PLAINTEXT
    assert raw_open(raw_stream(b""), 0) == b""


def test_a_stream_cut_at_a_chunk_boundary_fails_on_the_missing_final_flag() -> None:
    # Even with the digest recomputed for the shorter stream, the new last chunk lacks the final flag.
    two_chunks = raw_stream(PLAINTEXT)[: 2 * (CHUNK + TAG_BYTES)]
    with pytest.raises(DecryptionFailed):
        raw_open(two_chunks, 2 * CHUNK)


def test_a_final_chunk_cannot_stand_in_for_a_middle_one() -> None:
    one_final_chunk = raw_stream(PLAINTEXT[:CHUNK])  # index 0 with the final flag
    full = raw_stream(PLAINTEXT)
    with pytest.raises(DecryptionFailed):
        raw_open(one_final_chunk + full[CHUNK + TAG_BYTES :], len(PLAINTEXT))


def test_chunks_are_bound_to_the_header_digest() -> None:
    with pytest.raises(DecryptionFailed):
        raw_open(raw_stream(PLAINTEXT), len(PLAINTEXT), aad=hashlib.sha256(b"another header").digest())


def test_a_failure_in_the_last_chunk_zeroes_the_chunks_already_decrypted() -> None:
    stream = bytearray(raw_stream(PLAINTEXT))
    stream[-1] ^= 1
    buffer = bytearray(b"\xaa" * len(PLAINTEXT))
    with pytest.raises(DecryptionFailed):
        raw_open(bytes(stream), len(PLAINTEXT), buffer=buffer)
    assert buffer == bytes(len(PLAINTEXT))


WRAP_CONTEXT = WrapContext(APP_ID, COMPOSE_HASH, ALICE.signing_key.public_key.to_canonical_address())


def wrapped_data_key() -> WrappedKey:
    recipient, ephemeral = ALICE.seal_key.public_key(), bytes(range(1, 33))
    return wrap_data_key(DATA_KEY, recipient, WRAP_CONTEXT, AAD, ephemeral_private_bytes=ephemeral, nonce=bytes(12))


def test_the_data_key_unwraps_with_the_same_context() -> None:
    assert unwrap_data_key(wrapped_data_key(), ALICE.seal_key, WRAP_CONTEXT, AAD) == DATA_KEY


@pytest.mark.parametrize(
    "changes",
    [
        {"app_id": bytes(20)},
        {"compose_hash": bytes(32)},
        {"owner": MALLORY.signing_key.public_key.to_canonical_address()},
    ],
)
def test_the_data_key_wrap_is_bound_to_app_recipe_and_owner(changes: dict[str, bytes]) -> None:
    with pytest.raises(DecryptionFailed):
        unwrap_data_key(wrapped_data_key(), ALICE.seal_key, dataclasses.replace(WRAP_CONTEXT, **changes), AAD)


def test_the_data_key_wrap_is_bound_to_the_header_digest() -> None:
    with pytest.raises(DecryptionFailed):
        unwrap_data_key(wrapped_data_key(), ALICE.seal_key, WRAP_CONTEXT, hashlib.sha256(b"other").digest())


def test_a_low_order_ephemeral_key_is_an_opaque_decryption_failure() -> None:
    wrapped = dataclasses.replace(wrapped_data_key(), ephemeral_public_key=bytes(32))
    with pytest.raises(DecryptionFailed):
        unwrap_data_key(wrapped, ALICE.seal_key, WRAP_CONTEXT, AAD)
