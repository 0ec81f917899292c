"""Site-side clip/sign and the aggregator's checks: every rejection reason from both sides.

Vectors (expected outcome in each test name): a good update is accepted; each tampering is rejected with
exactly one reason code.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from eth_keys import keys
from eth_utils import keccak

from cvm.federated import (
    Reason,
    SignedUpdate,
    clip,
    sign_update,
    validate_updates,
    vector_digest,
)
from cvm.federated.updates import update_message_hash
from cvm.federated.validation import NORM_TOLERANCE
from tests.test_fed_support import make_contract, make_sites, signed, small_updates

SIZE = 32
PARENT = np.zeros(SIZE, dtype=np.float32)
SITES = make_sites(3)
OUTSIDER = make_sites(1, seed=9)[0]
CONTRACT = make_contract(PARENT, SITES, round=2)
VECTORS = small_updates(4, SIZE)


def outcome(*updates: SignedUpdate):
    return validate_updates(CONTRACT, list(updates), num_parameters=SIZE)


def reasons(*updates: SignedUpdate) -> list[Reason]:
    return [r.reason for r in outcome(*updates).rejected]


def resigned(update: SignedUpdate, key: bytes, **fields) -> SignedUpdate:
    """``update`` with ``fields`` replaced and a fresh, valid signature by ``key`` over the new content."""
    changed = dataclasses.replace(update, **fields)
    message = update_message_hash(changed.round, changed.parent_digest, vector_digest(changed.vector), changed.num_examples)
    return dataclasses.replace(changed, signature=keys.PrivateKey(key).sign_msg_hash(message).to_bytes())


# ----------------------------------------------------------------------------------------- site side


def test_signed_bytes_are_the_documented_layout():
    digest = vector_digest(VECTORS[0])
    expected = keccak(
        b"sealroom-fed-update/v1:"
        + (2).to_bytes(8, "big")
        + bytes.fromhex(CONTRACT.parent_digest)
        + bytes.fromhex(digest)
        + (10).to_bytes(8, "big")
    )
    assert update_message_hash(2, CONTRACT.parent_digest, digest, 10) == expected
    update = signed(SITES[0], CONTRACT, VECTORS[0])
    recovered = keys.Signature(update.signature).recover_public_key_from_msg_hash(expected)
    assert recovered.to_checksum_address() == SITES[0].address == update.site


def test_clip_scales_long_updates_to_the_norm_and_leaves_short_ones():
    long = np.full(100, 1.0, dtype=np.float32)  # norm 10
    clipped = clip(long, 1.0)
    assert np.linalg.norm(clipped.astype(np.float64)) == pytest.approx(1.0, rel=1e-6)
    assert np.allclose(clipped, long / 10)
    short = VECTORS[0]
    assert np.array_equal(clip(short, 1.0), short)


@pytest.mark.parametrize("bad", [np.array([np.nan, 1.0], dtype=np.float32), np.array([np.inf], dtype=np.float32)])
def test_clip_and_sign_refuse_non_finite_updates(bad):
    with pytest.raises(ValueError, match="NaN or infinite"):
        clip(bad, 1.0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        sign_update(SITES[0].key, round_number=1, parent_digest=CONTRACT.parent_digest, num_examples=1, vector=bad)


def test_sign_update_refuses_caller_mistakes():
    arguments = {"round_number": 1, "parent_digest": CONTRACT.parent_digest, "num_examples": 1, "vector": VECTORS[0]}
    with pytest.raises(TypeError, match="32 bytes"):
        sign_update(b"short", **arguments)
    with pytest.raises(ValueError, match="private key"):
        sign_update(bytes(32), **arguments)
    with pytest.raises(ValueError, match="num_examples"):
        sign_update(SITES[0].key, **(arguments | {"num_examples": 0}))
    with pytest.raises(TypeError, match="float32"):
        sign_update(SITES[0].key, **(arguments | {"vector": VECTORS[0].astype(np.float64)}))
    with pytest.raises(ValueError, match="parent_digest"):
        sign_update(SITES[0].key, **(arguments | {"parent_digest": "00"}))


# ----------------------------------------------------------------------------------------- accepted


def test_good_updates_are_accepted_with_their_digests_and_bytes_counted():
    updates = [signed(site, CONTRACT, vector) for site, vector in zip(SITES, VECTORS)]
    result = outcome(*updates)
    assert result.rejected == ()
    assert [a.site for a in result.accepted] == [site.address for site in SITES]
    assert [a.digest for a in result.accepted] == [vector_digest(v) for v in VECTORS[:3]]
    assert result.bytes_in == 3 * (SIZE * 4 + 65)


# ----------------------------------------------------------------------------------------- each reason


def test_forged_signature_another_key_claiming_the_site():
    forged = dataclasses.replace(signed(OUTSIDER, CONTRACT, VECTORS[0]), site=SITES[0].address)
    assert reasons(forged) == [Reason.FORGED_SIGNATURE]


def test_forged_signature_vector_changed_after_signing():
    update = signed(SITES[0], CONTRACT, VECTORS[0])
    assert reasons(dataclasses.replace(update, vector=VECTORS[1])) == [Reason.FORGED_SIGNATURE]


def test_forged_signature_num_examples_changed_after_signing():
    update = signed(SITES[0], CONTRACT, VECTORS[0], num_examples=10)
    assert reasons(dataclasses.replace(update, num_examples=10_000)) == [Reason.FORGED_SIGNATURE]


@pytest.mark.parametrize(
    "signature",
    [
        bytes(65),  # r = s = 0
        b"\xff" * 64 + b"\x00",  # r, s above the curve order
        bytes(range(64)) + b"\x02",  # v outside {0, 1}
    ],
)
def test_forged_signature_garbage_bytes_do_not_leak_eth_keys_errors(signature):
    update = dataclasses.replace(signed(SITES[0], CONTRACT, VECTORS[0]), signature=signature)
    assert reasons(update) == [Reason.FORGED_SIGNATURE]


def test_not_eligible_a_valid_signature_from_an_outsider():
    assert reasons(signed(OUTSIDER, CONTRACT, VECTORS[0])) == [Reason.NOT_ELIGIBLE]


@pytest.mark.parametrize("round_number", [1, 3])
def test_stale_round_earlier_or_later(round_number):
    update = resigned(signed(SITES[0], CONTRACT, VECTORS[0]), SITES[0].key, round=round_number)
    assert reasons(update) == [Reason.STALE_ROUND]


def test_wrong_parent_trained_on_another_model():
    other = vector_digest(np.ones(SIZE, dtype=np.float32))
    update = resigned(signed(SITES[0], CONTRACT, VECTORS[0]), SITES[0].key, parent_digest=other)
    assert reasons(update) == [Reason.WRONG_PARENT]


def test_replayed_same_update_twice_only_the_first_counts():
    update = signed(SITES[0], CONTRACT, VECTORS[0])
    result = outcome(update, update)
    assert len(result.accepted) == 1
    assert [r.reason for r in result.rejected] == [Reason.REPLAYED]


def test_replayed_a_second_different_update_from_the_same_site():
    result = outcome(signed(SITES[0], CONTRACT, VECTORS[0]), signed(SITES[0], CONTRACT, VECTORS[1]))
    assert [a.digest for a in result.accepted] == [vector_digest(VECTORS[0])]
    assert [r.reason for r in result.rejected] == [Reason.REPLAYED]


def test_replayed_another_sites_vector_copied_and_signed():
    result = outcome(signed(SITES[0], CONTRACT, VECTORS[0]), signed(SITES[1], CONTRACT, VECTORS[0]))
    assert [r.site for r in result.rejected] == [SITES[1].address]
    assert [r.reason for r in result.rejected] == [Reason.REPLAYED]


def test_a_stale_update_does_not_block_the_sites_current_one():
    stale = resigned(signed(SITES[0], CONTRACT, VECTORS[1]), SITES[0].key, round=1)
    result = outcome(stale, signed(SITES[0], CONTRACT, VECTORS[0]))
    assert [r.reason for r in result.rejected] == [Reason.STALE_ROUND]
    assert len(result.accepted) == 1


def test_over_norm_above_the_clip_norm():
    big = np.full(SIZE, 1.5 / np.sqrt(SIZE), dtype=np.float32)
    assert reasons(signed(SITES[0], CONTRACT, big)) == [Reason.OVER_NORM]


def test_norm_boundary_inside_and_outside_the_tolerance():
    unit = np.full(SIZE, 1 / np.sqrt(SIZE), dtype=np.float64)
    inside = (unit * (1 + NORM_TOLERANCE / 4)).astype(np.float32)
    outside = (unit * (1 + 10 * NORM_TOLERANCE)).astype(np.float32)
    assert reasons(signed(SITES[0], CONTRACT, inside)) == []
    assert reasons(signed(SITES[0], CONTRACT, outside)) == [Reason.OVER_NORM]
    assert reasons(signed(SITES[1], CONTRACT, clip(np.full(SIZE, 7.0, dtype=np.float32), 1.0))) == []


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"vector": np.zeros(SIZE + 1, dtype=np.float32)}, id="wrong length"),
        pytest.param({"vector": np.zeros(SIZE, dtype=np.float64)}, id="float64"),
        pytest.param({"vector": np.zeros((2, SIZE // 2), dtype=np.float32)}, id="2-D"),
        pytest.param({"vector": [0.0] * SIZE}, id="not an ndarray"),
        pytest.param({"num_examples": 0}, id="no examples"),
        pytest.param({"num_examples": 2**64}, id="examples overflow u64"),
        pytest.param({"round": True}, id="bool round"),
        pytest.param({"round": -1}, id="negative round"),
        pytest.param({"parent_digest": "XYZ"}, id="parent not hex"),
        pytest.param({"signature": bytes(64)}, id="short signature"),
        pytest.param({"claimed_norm": "0.1"}, id="norm not a number"),
    ],
)
def test_malformed_fields(change):
    update = dataclasses.replace(signed(SITES[0], CONTRACT, VECTORS[0]), **change)
    assert reasons(update) == [Reason.MALFORMED]


@pytest.mark.parametrize("site", ["0x1234", 42, SITES[0].address.lower()[:-1]])
def test_malformed_site_is_recorded_as_unknown(site):
    update = dataclasses.replace(signed(SITES[0], CONTRACT, VECTORS[0]), site=site)
    result = outcome(update)
    assert [(r.site, r.reason) for r in result.rejected] == [("unknown", Reason.MALFORMED)]


@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf])
def test_malformed_non_finite_values_even_when_properly_signed(poison):
    vector = VECTORS[0].copy()
    vector[3] = poison
    update = resigned(signed(SITES[0], CONTRACT, VECTORS[0]), SITES[0].key, vector=vector)
    assert reasons(update) == [Reason.MALFORMED]


def test_malformed_claimed_norm_that_disagrees_with_the_vector():
    update = signed(SITES[0], CONTRACT, VECTORS[0])
    assert reasons(dataclasses.replace(update, claimed_norm=update.claimed_norm * 0.5)) == [Reason.MALFORMED]
    assert reasons(dataclasses.replace(update, claimed_norm=float("nan"))) == [Reason.MALFORMED]


def test_validate_updates_refuses_caller_mistakes():
    with pytest.raises(TypeError):
        validate_updates("contract", [], num_parameters=SIZE)
    with pytest.raises(TypeError):
        validate_updates(CONTRACT, [object()], num_parameters=SIZE)
