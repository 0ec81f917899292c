"""The site side without a stack: the update wire format, the site's champion state, local training and the
local gate, the report_data binding, and the `seal site` usage errors (transcripts of real invocations)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cvm.aggregator import (
    UpdateUnreadable,
    aggregator_report_data,
    update_from_bytes,
    update_to_bytes,
)
from cvm.analyses.cohorts import generate_site, write_parquet
from cvm.federated import vector_digest
from cvm.federated.task import NUM_PARAMETERS, quality
from sealing_cli.main import app as seal_cli
from sealing_cli.site import SiteState, SiteStateError, load_site_data, train_locally
from tests.test_fed_support import make_contract, make_sites, signed

SITE = make_sites(1)[0]
PARENT = np.zeros(NUM_PARAMETERS, dtype="<f4")


@pytest.fixture(scope="module")
def site_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("site") / "EU-West.parquet"
    write_parquet(generate_site("EU-West", 2_000, seed=5), path)
    return path


# ---------------------------------------------------------------------------------- the update on the wire


def test_an_update_survives_the_wire_bit_for_bit():
    update = signed(SITE, make_contract(PARENT, [SITE], min_participants=1), np.linspace(-0.1, 0.1, NUM_PARAMETERS, dtype="<f4"))
    back = update_from_bytes(update_to_bytes(update))
    assert (back.round, back.site, back.parent_digest, back.num_examples, back.claimed_norm, back.signature) == (
        update.round, update.site, update.parent_digest, update.num_examples, update.claimed_norm, update.signature)
    assert vector_digest(back.vector) == vector_digest(update.vector)


def _framed(header: dict, vector: bytes) -> bytes:
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(4, "big") + encoded + vector


@pytest.mark.parametrize("mutate, what", [
    (lambda header, vector: (header | {"format": "sealroom-fed-update-wire/v1"}, vector), "unknown update format"),
    (lambda header, vector: (header, vector[:-2]), "declared number of float32"),
    (lambda header, vector: (header | {"parameters": header["parameters"] + 1}, vector), "declared number of float32"),
    (lambda header, vector: (header | {"parameters": True}, vector), "declared number of float32"),
    (lambda header, vector: (header | {"signature": "zz"}, vector), "malformed"),
    (lambda header, vector: ({k: v for k, v in header.items() if k != "round"}, vector), "malformed"),
])
def test_a_malformed_update_is_unreadable(mutate, what):
    update = signed(SITE, make_contract(PARENT, [SITE], min_participants=1), np.zeros(NUM_PARAMETERS, dtype="<f4"))
    data = update_to_bytes(update)
    size = int.from_bytes(data[:4], "big")
    header, vector = mutate(json.loads(data[4:4 + size]), data[4 + size:])
    with pytest.raises(UpdateUnreadable, match=what):
        update_from_bytes(_framed(header, vector))


@pytest.mark.parametrize("data", [b"", b"\x00\x00", b"\xff\xff\xff\xff{}", b"\x00\x00\x00\x10{}", b"\x00\x00\x00\x02[]"])
def test_a_truncated_or_misframed_update_is_unreadable(data):
    with pytest.raises(UpdateUnreadable, match="malformed update"):
        update_from_bytes(data)


def test_report_data_binds_the_nonce_and_the_key():
    nonce, key = b"\x01" * 32, b"\x02" * 32
    value = aggregator_report_data(nonce, key)
    assert len(value) == 64
    assert value != aggregator_report_data(b"\x03" * 32, key) and value != aggregator_report_data(nonce, b"\x04" * 32)
    with pytest.raises(ValueError):
        aggregator_report_data(b"short", key)


# ---------------------------------------------------------------------------------- champion state


def test_the_champion_is_checked_against_its_digest(tmp_path):
    state = SiteState(tmp_path, SITE.address)
    with pytest.raises(SiteStateError, match="no champion"):
        state.champion()
    weights = np.arange(NUM_PARAMETERS, dtype="<f4")
    state.set_champion(weights, 1)
    assert vector_digest(state.champion()) == vector_digest(weights)
    (state.folder / "champion.f32").write_bytes((weights + 1).tobytes())
    with pytest.raises(SiteStateError, match="does not match the champion digest"):
        state.champion()


def test_a_round_the_site_did_not_train_cannot_be_decided(tmp_path):
    with pytest.raises(SiteStateError, match="did not take part in round 3"):
        SiteState(tmp_path, SITE.address).round(3)


# ---------------------------------------------------------------------------------- local training


def test_local_training_improves_local_validation(site_data):
    data = load_site_data(site_data)
    trained = train_locally(PARENT, data.train, make_contract(PARENT, [SITE], min_participants=1, local_batch_size=128))
    assert trained.dtype == np.float32 and trained.shape == PARENT.shape
    before, after = quality(PARENT, data.valid), quality(trained, data.valid)
    assert after.loss < before.loss and after.auc > 0.6


def test_the_validation_split_is_the_same_every_time(site_data):
    first, second = load_site_data(site_data), load_site_data(site_data)
    assert bool((first.valid.x == second.valid.x).all()) and len(first.valid) == 400


# ---------------------------------------------------------------------------------- CLI usage


def test_allow_simulated_without_a_pinned_root_is_a_usage_error(site_data, tmp_path):
    compose = tmp_path / "round.json"
    compose.write_text("{}")
    result = CliRunner().invoke(seal_cli, ["site", "train", "--round-compose", str(compose), "--aggregator",
                                           "http://127.0.0.1:9", "--data", str(site_data), "--allow-simulated",
                                           "--state-dir", str(tmp_path)])
    assert result.exit_code == 2 and "needs --simulated-root" in result.output


def test_without_a_stack_the_site_commands_say_so(site_data, tmp_path):
    result = CliRunner().invoke(seal_cli, ["site", "accept", "--round", "1", "--data", str(site_data),
                                           "--state-dir", str(tmp_path)])
    assert result.exit_code == 3 and "no local stack description" in result.output
