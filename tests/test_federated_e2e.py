"""A federated round end to end on a real local stack: anvil, the KMS, a SIMULATED CVM running cvm.aggregator.

The sites attest the aggregator before sending (and send nothing when it fails), bad updates are named in the
signed round record, the ε in the record equals the accountant's and the on-chain spend, and a site that
rejects the candidate stays on its champion.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from compose.backends.launcher import ManagedProcess, ServiceStartError
from compose.stack_file import read_keystore
from contracts.chain import DstackApp, to_micro_epsilon
from cvm.aggregator import (
    RoundRecordInvalid,
    build_round_compose,
    verify_round_attestation,
)
from cvm.analyses.cohorts import generate_site, write_parquet
from cvm.attest.simulated import SimulatedTdx
from cvm.federated import (
    AccountantState,
    Reason,
    RoundContract,
    epsilon_spent,
    sign_update,
    vector_digest,
)
from cvm.federated.task import NUM_PARAMETERS, ReferenceCohort
from sealing_cli.demo_federated import start_round_aggregator, wait_for_result
from sealing_cli.main import app as seal_cli
from sealing_cli.site import (
    AggregatorNotTrusted,
    RoundNotPublished,
    SiteState,
    attest_aggregator,
    send_update,
)
from sealing_cli.stack import LocalStack

SITES = ("EU-West", "APAC", "CH")
IMAGE_DIGEST = "sha256:" + "7a" * 32   # the aggregator runs as a host process here, not from the image
# C's only in-round update is over the norm, so C never has a valid update and the round closes at its deadline
# (run_round closes early only when every eligible site has one): short, but long enough for the checks before.
DEADLINE_S = 40
OUTSIDER = "US-East"          # an owner of the DstackApp, but not eligible in the round contract


@dataclass
class World:
    stack: LocalStack
    accounts: dict
    data: dict[str, Path]
    contract: RoundContract
    compose: bytes
    compose_path: Path
    reference: ReferenceCohort
    aggregator: ManagedProcess
    url: str

    @property
    def state_dir(self) -> Path:
        return self.stack.state_dir

    @property
    def root_path(self) -> Path:
        return self.state_dir / "simulated-tdx" / "root.der"

    @property
    def app(self) -> DstackApp:
        return DstackApp(self.stack.chain, self.stack.description.dstack_app)

    def attest(self, site: str, **kwargs):
        kwargs.setdefault("allow_simulated", True)
        kwargs.setdefault("simulated_root_der", self.root_path.read_bytes())
        kwargs.setdefault("app_compose", self.compose)
        with httpx.Client(base_url=self.url, timeout=30.0) as http:
            return attest_aggregator(http, app=self.app, site=self.accounts[site].address, now=int(time.time()),
                                     **kwargs)

    def received(self) -> int:
        return httpx.get(f"{self.url}/result", timeout=10.0).json()["received"]

    def seal(self, *args: str):
        return CliRunner().invoke(seal_cli, [*args, "--state-dir", str(self.state_dir)])

    def simulated(self) -> list[str]:
        return ["--allow-simulated", "--simulated-root", str(self.root_path)]


def build_world(state: Path) -> tuple[LocalStack, World]:
    """Four owners; a round-1 recipe for three of them, approved by those three; its aggregator running."""
    stack = LocalStack(state, owner_names=(*SITES, OUTSIDER), threshold=3, epsilon_budget=10.0).__enter__()
    d = stack.description
    accounts = {o.name: read_keystore(o.keystore, d.dev_keystore_password) for o in d.owners}
    data = {}
    for i, name in enumerate((*SITES, OUTSIDER)):
        data[name] = state / f"{name}.parquet"
        write_parquet(generate_site(name, 1_500, seed=40 + i), data[name])
    reference_path = state / "reference.parquet"
    write_parquet(pa.concat_tables([generate_site(name, 1_000, seed=7) for name in SITES]), reference_path)
    reference = ReferenceCohort.load(reference_path)
    parent = np.zeros(NUM_PARAMETERS, dtype="<f4")
    parent_path = state / "parent.f32"
    parent_path.write_bytes(parent.tobytes())
    contract = RoundContract(
        round=1, parent_digest=vector_digest(parent), eligible_sites=tuple(accounts[s].address for s in SITES),
        local_epochs=1, local_batch_size=128, clip_norm=1.0, noise_multiplier=1.0, noise="opendp",
        aggregator="fedavg", min_participants=2, deadline=int(time.time()) + DEADLINE_S, epsilon_per_round=5.0,
        epsilon_total=10.0, delta=1e-5, evaluation_sha256=reference.sha256)
    compose = build_round_compose("fed-test", contract, {s: accounts[s].address for s in SITES},
                                  image_digest=IMAGE_DIGEST)
    compose_path = state / "round-1.app-compose.json"
    compose_path.write_bytes(compose)
    app = DstackApp(stack.chain, d.dstack_app)
    compose_hash = hashlib.sha256(compose).digest()
    app.propose(compose_hash, compose_path.as_uri(), accounts[SITES[0]])
    for site in SITES:
        app.approve(compose_hash, accounts[site])
    process, url = start_round_aggregator(stack, compose_path, parent_path, state / "rounds", name="round-1",
                                          evaluation=reference_path)
    return stack, World(stack, accounts, data, contract, compose, compose_path, reference, process, url)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    stack, built = build_world(tmp_path_factory.mktemp("fed-e2e"))
    try:
        yield built
    finally:
        built.aggregator.stop()
        stack.stop()


# ---------------------------------------------------------------------------------- sites send nothing unless…


def test_a_simulated_aggregator_gets_nothing_when_simulation_is_not_allowed(world):
    received = world.received()
    with pytest.raises(AggregatorNotTrusted, match="SIMULATED TDX quote"):
        world.attest(SITES[0], allow_simulated=False, simulated_root_der=None)
    assert world.received() == received


def test_an_aggregator_under_another_simulated_root_gets_nothing(world, tmp_path):
    other_root = SimulatedTdx.load_or_create(tmp_path / "other-tdx").root_der
    received = world.received()
    with pytest.raises(AggregatorNotTrusted, match="quote rejected"):
        world.attest(SITES[0], simulated_root_der=other_root)
    assert world.received() == received


def test_an_aggregator_running_another_compose_than_the_one_given_gets_nothing(world):
    other = build_round_compose("fed-test", world.contract.model_copy(update={"min_participants": 3}),
                                {s: world.accounts[s].address for s in SITES}, image_digest=IMAGE_DIGEST)
    received = world.received()
    with pytest.raises(AggregatorNotTrusted, match="not the round compose given"):
        world.attest(SITES[0], app_compose=other)
    assert world.received() == received


def test_a_site_the_contract_does_not_name_sends_nothing(world):
    received = world.received()
    with pytest.raises(AggregatorNotTrusted, match="does not name this site"):
        world.attest(OUTSIDER)
    result = world.seal("site", "train", "--round-compose", str(world.compose_path), "--aggregator", world.url,
                        "--data", str(world.data[OUTSIDER]), "--owner", OUTSIDER, *world.simulated())
    assert result.exit_code == 1 and "does not name this site" in result.output
    assert world.received() == received


def test_an_attested_aggregator_passes_every_check(world):
    attested = world.attest(SITES[0])
    assert attested.contract == world.contract and attested.simulated
    assert len(attested.public_key) == 32


def test_the_aggregator_refuses_unsealed_and_oversized_bodies_unread(world):
    octets = {"content-type": "application/octet-stream"}
    received = world.received()
    garbage = httpx.post(f"{world.url}/update", content=b"\x00" * 100, headers=octets, timeout=10.0)
    assert garbage.status_code == 400 and "not sealed to this round's attested key" in garbage.text
    limit = 60 + 4 + 4096 + 4 * NUM_PARAMETERS
    oversized = httpx.post(f"{world.url}/update", content=b"\x00" * (limit + 1), headers=octets, timeout=10.0)
    assert oversized.status_code == 413 and f"at most {limit} bytes" in oversized.text
    assert world.received() == received


# ---------------------------------------------------------------------------------- the round


def _update(world, site: str, vector: np.ndarray, *, round_number: int = 1):
    return sign_update(bytes(world.accounts[site].key), round_number=round_number,
                       parent_digest=world.contract.parent_digest, num_examples=100, vector=vector)


@pytest.fixture(scope="module")
def published(world):
    """Bad updates first (forged, replayed, over-norm, stale), then the last site's honest one through the CLI."""
    a, b, c = SITES
    rng = np.random.default_rng(3)
    small = lambda: (0.1 * rng.standard_normal(NUM_PARAMETERS)).astype("<f4")  # noqa: E731
    honest_a = _update(world, a, small())
    forged_b = dataclasses.replace(_update(world, c, small()), site=world.accounts[b].address)
    over_norm_c = _update(world, c, (5 * np.ones(NUM_PARAMETERS)).astype("<f4"))
    stale_c = _update(world, c, small(), round_number=2)
    attested = world.attest(a)
    with httpx.Client(base_url=world.url, timeout=30.0) as http:
        for update in (forged_b, honest_a, honest_a, over_norm_c, stale_c):
            send_update(http, attested, update)
    assert httpx.get(f"{world.url}/result").json()["state"] == "open"   # before the deadline, b and c missing
    result = world.seal("site", "train", "--round-compose", str(world.compose_path), "--aggregator", world.url,
                        "--data", str(world.data[b]), "--owner", b, *world.simulated())
    assert result.exit_code == 0, result.output
    assert "aggregator attested (SIMULATED TEE)" in result.output
    status = wait_for_result(world.url, DEADLINE_S + 30)
    assert status["state"] == "published", status
    return status


def test_bad_updates_are_rejected_and_named_in_the_signed_record(world, published):
    a, b, c = (world.accounts[s].address for s in SITES)
    round_ = verify_round_attestation(published["attestation"], app_id=world.app.app_id, now=int(time.time()),
                                      allow_simulated=True, simulated_root_der=world.root_path.read_bytes())
    record = round_.record
    assert [(r.site, r.reason) for r in record.rejected] == [
        (b, Reason.FORGED_SIGNATURE), (a, Reason.REPLAYED), (c, Reason.OVER_NORM), (c, Reason.STALE_ROUND)]
    assert [j.site for j in record.joined] == [a, b]
    assert record.dropped == () and record.simulated and published["attestation"]["simulated"]
    weights = np.frombuffer(bytes.fromhex(published["weights"]), "<f4")
    assert vector_digest(weights) == record.aggregate_digest == record.lineage.child
    assert record.lineage.parent == world.contract.parent_digest
    assert (world.state_dir / "rounds" / "round-1.attestation.json").exists()


def test_the_record_carries_the_central_evaluation_on_the_contracts_reference_cohort(world, published):
    metrics = published["attestation"]["envelope"]["payload"]["record"]["metrics"]
    weights = np.frombuffer(bytes.fromhex(published["weights"]), "<f4").copy()
    after, before = world.reference.evaluate(weights), world.reference.evaluate(np.zeros(NUM_PARAMETERS, "<f4"))
    assert metrics["global_quality"] == after.quality and metrics["parent_global_quality"] == before.quality == 0.5
    assert (metrics["per_site_min"], metrics["per_site_max"]) == (min(after.per_site.values()),
                                                                  max(after.per_site.values()))
    assert metrics["worst_site_regression"]["site"] in SITES   # the strata are the reference cohort's site names


def test_an_aggregator_given_another_reference_cohort_does_not_start(world, published, tmp_path):
    # (after the round: booting a CVM takes long enough to eat the round's deadline, whatever the test order)
    other = tmp_path / "other-reference.parquet"
    write_parquet(generate_site("CH", 1_000, seed=8), other)
    parent = tmp_path / "parent.f32"
    parent.write_bytes(np.zeros(NUM_PARAMETERS, "<f4").tobytes())
    with pytest.raises(ServiceStartError, match=f"not the {world.reference.sha256} the round contract names"):
        start_round_aggregator(world.stack, world.compose_path, parent, tmp_path, name="round-1-other-reference",
                               evaluation=other)


def test_the_epsilon_in_the_record_is_the_accountants_and_the_on_chain_spend(world, published):
    envelope = published["attestation"]["envelope"]
    record, state = envelope["payload"]["record"], AccountantState.model_validate(envelope["payload"]["accountant_state"])
    assert record["privacy"]["epsilon_spent_total"] == pytest.approx(epsilon_spent(state, 1e-5), rel=1e-12)
    assert record["privacy"]["epsilon_round"] == record["privacy"]["epsilon_spent_total"]   # first round
    budget = world.app.budget()
    assert budget.spent_micro == to_micro_epsilon(record["privacy"]["epsilon_round"])
    # charged once per round recipe: release id = sha256(b"sealroom-round/v1:" ‖ app_id ‖ compose_hash)
    round_id = hashlib.sha256(b"sealroom-round/v1:" + world.app.app_id + hashlib.sha256(world.compose).digest())
    assert envelope["release"]["release_id"] == round_id.hexdigest()
    assert envelope["epsilon_spent"] == pytest.approx(budget.spent_micro / 1e6)


def test_a_late_update_is_refused_once_the_round_is_closed(world, published):
    attested = world.attest(SITES[2])
    with httpx.Client(base_url=world.url, timeout=30.0) as http, pytest.raises(RoundNotPublished, match="HTTP 409"):
        send_update(http, attested, _update(world, SITES[2], np.zeros(NUM_PARAMETERS, dtype="<f4")))


@pytest.mark.parametrize("tamper, reason", [
    (lambda att: att["envelope"]["payload"]["record"].update(dropped=["0x" + "1" * 40]), "quote does not verify"),
    (lambda att: att.update(app_compose=att["app_compose"] + " "), "not the measured one"),
    (lambda att: att["envelope"].update(epsilon_spent=0.0), "quote does not verify"),
])
def test_a_tampered_round_record_does_not_verify(world, published, tamper, reason):
    attestation = json.loads(json.dumps(published["attestation"]))
    tamper(attestation)
    with pytest.raises(RoundRecordInvalid, match=reason):
        verify_round_attestation(attestation, app_id=world.app.app_id, now=int(time.time()), allow_simulated=True,
                                 simulated_root_der=world.root_path.read_bytes())


def test_a_record_from_another_app_does_not_verify(world, published):
    with pytest.raises(RoundRecordInvalid, match="another app"):
        verify_round_attestation(published["attestation"], app_id=b"\x01" * 20, now=int(time.time()),
                                 allow_simulated=True, simulated_root_der=world.root_path.read_bytes())


# ---------------------------------------------------------------------------------- accept / reject


def test_a_rejected_candidate_leaves_the_site_on_its_champion(world, published):
    b = SITES[1]
    state = SiteState(world.state_dir, world.accounts[b].address)
    state.set_champion(np.zeros(NUM_PARAMETERS, dtype="<f4"), 0)   # the parent, as after training (accept may have run)
    champion = state.load()["champion"]
    assert champion == {"digest": world.contract.parent_digest, "round": 0}
    result = world.seal("site", "reject", "--round", "1", "--data", str(world.data[b]), "--owner", b,
                        *world.simulated())
    assert result.exit_code == 0, result.output
    assert "stays on its champion (rollback)" in result.output
    assert state.load()["champion"] == champion
    assert vector_digest(state.champion()) == world.contract.parent_digest


def test_accept_adopts_the_candidate_unless_it_is_worse_here(world, published):
    b = SITES[1]
    state = SiteState(world.state_dir, world.accounts[b].address)
    result = world.seal("site", "accept", "--round", "1", "--data", str(world.data[b]), "--owner", b,
                        "--tolerance", "1.0", *world.simulated())   # any AUC loss tolerated: it must adopt
    assert result.exit_code == 0, result.output
    assert "adopted the global candidate" in result.output
    assert state.load()["champion"] == {"digest": vector_digest(np.frombuffer(bytes.fromhex(published["weights"]),
                                                                              "<f4")), "round": 1}


def test_a_champion_that_does_not_match_its_digest_is_refused(world, published):
    b = SITES[1]
    state = SiteState(world.state_dir, world.accounts[b].address)
    path = state.folder / "champion.f32"
    original = path.read_bytes()
    path.write_bytes(bytes([original[0] ^ 0x01]) + original[1:])     # a change even when the champion is all zeros
    try:
        result = world.seal("site", "reject", "--round", "1", "--data", str(world.data[b]), "--owner", b,
                            *world.simulated())
        assert result.exit_code == 1 and "does not match the champion digest" in result.output
    finally:
        path.write_bytes(original)


def test_a_revoked_round_gets_nothing(world, published):
    """On its own round compose and aggregator: revoking the shared one would starve the other tests. (After the
    round, because booting another aggregator takes long enough to eat the round's deadline.)"""
    contract = world.contract.model_copy(update={"min_participants": 3, "deadline": int(time.time()) + 600})
    compose = build_round_compose("fed-test-revoked", contract, {s: world.accounts[s].address for s in SITES},
                                  image_digest=IMAGE_DIGEST)
    compose_path = world.state_dir / "round-1-revoked.app-compose.json"
    compose_path.write_bytes(compose)
    compose_hash = hashlib.sha256(compose).digest()
    world.app.propose(compose_hash, compose_path.as_uri(), world.accounts[SITES[0]])
    for site in SITES:
        world.app.approve(compose_hash, world.accounts[site])
    process, url = start_round_aggregator(world.stack, compose_path, world.state_dir / "parent.f32",
                                          world.state_dir / "rounds-revoked", name="round-1-revoked",
                                          evaluation=world.state_dir / "reference.parquet")
    try:
        own = dataclasses.replace(world, compose=compose, url=url)
        assert own.attest(SITES[0]).compose_hash == compose_hash        # trusted while it stands
        world.app.revoke(compose_hash, world.accounts[SITES[2]])
        with pytest.raises(AggregatorNotTrusted, match="revoked"):
            own.attest(SITES[0])
    finally:
        process.stop()
