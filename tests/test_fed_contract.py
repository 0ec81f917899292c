"""RoundContract: parsing, canonical bytes and digest, and one refusal per field."""

from __future__ import annotations

import json

import numpy as np
import pytest

import cvm.federated as federated
from cvm.federated import RoundContract
from tests.test_fed_support import make_contract, make_sites

PARENT = np.arange(8, dtype=np.float32)
SITES = make_sites(3)


def contract(**overrides) -> RoundContract:
    return make_contract(PARENT, SITES, **overrides)


def test_params_round_trip_through_json():
    original = contract(aggregator="trimmed_mean", trim_fraction=0.2)
    params = json.loads(json.dumps(original.to_params()))
    assert RoundContract.from_params(params) == original
    assert params["format"] == "sealroom-fed-round/v1"


def test_canonical_json_is_sorted_and_compact_and_digest_is_its_sha256():
    import hashlib

    value = contract()
    text = value.canonical_json().decode()
    assert " " not in text
    assert list(json.loads(text)) == sorted(json.loads(text))
    assert value.digest() == hashlib.sha256(value.canonical_json()).hexdigest()


@pytest.mark.parametrize(
    "field, value",
    [("round", 2), ("clip_norm", 2.0), ("noise_multiplier", 1.1), ("aggregator", "coordinate_median"), ("deadline", 5),
     ("evaluation_sha256", "ab" * 32)],
)
def test_every_field_changes_the_digest(field, value):
    assert contract(**{field: value}).digest() != contract().digest()


def test_lowercase_addresses_are_accepted_and_stored_checksummed():
    value = contract(eligible_sites=[site.address.lower() for site in SITES])
    assert value.eligible_sites == tuple(site.address for site in SITES)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"round": 0}, "round must be at least 1"),
        ({"round": True}, "round"),
        ({"round": "1"}, "round"),
        ({"parent_digest": "AB" * 32}, "parent_digest"),
        ({"parent_digest": "ab" * 31}, "parent_digest"),
        ({"eligible_sites": []}, "must not be empty"),
        ({"eligible_sites": ["0x1234"]}, "not an Ethereum address"),
        ({"eligible_sites": [SITES[0].address, SITES[0].address]}, "lists a site twice"),
        ({"local_epochs": 0}, "local_epochs"),
        ({"local_batch_size": 0}, "local_batch_size"),
        ({"clip_norm": 0.0}, "clip_norm must be positive"),
        ({"clip_norm": float("nan")}, "clip_norm"),
        ({"clip_norm": float("inf")}, "clip_norm"),
        ({"noise_multiplier": 0.0}, "noise_multiplier must be positive"),
        ({"noise": "numpy"}, "noise"),
        ({"aggregator": "krum"}, "aggregator"),
        ({"aggregator": "trimmed_mean"}, "trim_fraction in"),
        ({"aggregator": "trimmed_mean", "trim_fraction": 0.5}, "trim_fraction in"),
        ({"aggregator": "fedavg", "trim_fraction": 0.1}, "applies to trimmed_mean only"),
        ({"min_participants": 0}, "min_participants"),
        ({"min_participants": 4}, "exceeds the number of eligible sites"),
        ({"deadline": -1}, "deadline"),
        ({"epsilon_per_round": 0.0}, "epsilon_per_round must be positive"),
        ({"epsilon_total": 5.0}, "must not exceed epsilon_total"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"evaluation_sha256": "AB" * 32}, "evaluation_sha256"),
        ({"evaluation_sha256": "reference.parquet"}, "evaluation_sha256"),
        ({"format": "sealroom-fed-round/v2"}, "format"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_each_bad_field_is_refused_with_a_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        contract(**overrides)


def test_a_wrong_checksum_is_refused():
    address = SITES[0].address
    letter = next(i for i, char in enumerate(address) if i >= 2 and char.isalpha())
    tampered = address[:letter] + address[letter].swapcase() + address[letter + 1 :]
    with pytest.raises(ValueError, match="checksum"):
        contract(eligible_sites=[tampered])


def test_contract_is_frozen():
    value = contract()
    with pytest.raises(ValueError):
        value.round = 2


def test_from_params_refuses_a_non_mapping():
    with pytest.raises(TypeError):
        RoundContract.from_params([("round", 1)])


def test_public_surface_is_exactly_all():
    public = {name for name in dir(federated) if not name.startswith("_")}
    modules = {"accountant", "dp", "errors", "record", "robust", "round_contract", "rounds", "site", "strategies", "task",
               "updates", "validation", "vectors"}
    assert public - modules == set(federated.__all__)
