"""Per-owner key release: only to the attested recipe, only for owners who approved it, only within the budget."""

from __future__ import annotations

import pytest
from eth_account import Account

from compose.app_compose import build_app_compose, compose_hash, normalized_json_bytes
from compose.manifest import StudyManifest
from compose.stack_file import read_keystore
from contracts.chain import DstackApp, DstackKms
from kms_client.box import raw_public
from kms_client.client import KmsClient, KmsRefused
from sealing_cli.devchain import ANVIL_FUNDER_KEY
from sealing_cli.stack import LocalStack
from tests.simulated_cvm import SimulatedCvm

YAML = "services:\n  study:\n    image: sealroom/study@sha256:" + "1" * 64 + "\n"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with LocalStack(tmp_path_factory.mktemp("release"), owner_names=("A", "B", "C"), threshold=2) as s:
        yield s


@pytest.fixture(scope="module")
def owners(stack):
    d = stack.description
    return {o.name: read_keystore(o.keystore, d.dev_keystore_password) for o in d.owners}


@pytest.fixture
def study(stack, owners):
    """A fresh 2-of-3 study with an ε budget of 1.0, registered in the stack's DstackKms."""
    funder = Account.from_key(ANVIL_FUNDER_KEY)
    app = DstackApp.deploy(stack.chain, funder, owners=[o.address for o in owners.values()], threshold=2,
                           epsilon_budget=1.0, kms_signer=stack.description.kms_signer)
    DstackKms(stack.chain, stack.description.dstack_kms).register_app(app.address, funder)
    return app


def recipe(owners, names, epsilon=0.4, tag="v1"):
    manifest = StudyManifest.model_validate({
        "study": f"release-test-{tag}",
        "inputs": [{"owner": owners[n].address, "name": f"cohort-{n}"} for n in names],
        "analysis": {"kind": "dp_stats", "params": {}}, "epsilon": epsilon, "delta": 1e-6,
        "output_type": "aggregate_stats",
    })
    body = normalized_json_bytes(build_app_compose("release-test", YAML, manifest))
    return body, compose_hash(body)


def approve(study, owners, h, *names):
    study.propose(h, "", owners["A"])
    for name in names:
        study.approve(h, owners[name])


@pytest.fixture
def kms(stack):
    with KmsClient(stack.description.services["kms"]["url"]) as client:
        yield client


def test_release_gives_each_consenting_owner_key_and_spends_budget(stack, study, owners, kms):
    body, h = recipe(owners, ["A", "B"])
    approve(study, owners, h, "A", "B")
    machine = SimulatedCvm(stack.state_dir, study.app_id, body)
    release = kms.release_owner_keys(machine.attest, body)
    assert set(release.keys) == {owners["A"].address, owners["B"].address}
    assert release.simulated and release.epsilon_spent == pytest.approx(0.4)
    root = kms.meta().root_address
    for owner, private in release.keys.items():
        public = kms.owner_seal_key(study.address, h, owner, pinned_root_address=root)
        assert raw_public(private) == raw_public(public), "the released key is the one owners sealed to"
    assert study.budget().spent_micro == 400_000


def test_release_that_would_overspend_is_refused_and_spends_nothing(stack, study, owners, kms):
    body, h = recipe(owners, ["A", "B"], epsilon=0.4)
    approve(study, owners, h, "A", "B")
    machine = SimulatedCvm(stack.state_dir, study.app_id, body)
    kms.release_owner_keys(machine.attest, body)
    kms.release_owner_keys(machine.attest, body)
    with pytest.raises(KmsRefused, match="privacy budget exceeded") as refused:
        kms.release_owner_keys(machine.attest, body)
    assert refused.value.code == "budget_exhausted"
    assert study.budget().spent_micro == 800_000


def test_owner_who_did_not_approve_is_named_and_nothing_is_spent(stack, study, owners, kms):
    body, h = recipe(owners, ["A", "C"])
    approve(study, owners, h, "A", "B")  # threshold met by A and B; C never consented
    machine = SimulatedCvm(stack.state_dir, study.app_id, body)
    with pytest.raises(KmsRefused, match=owners["C"].address) as refused:
        kms.release_owner_keys(machine.attest, body)
    assert refused.value.code == "owner_not_consenting"
    assert study.budget().spent_micro == 0


def test_revoked_recipe_releases_nothing(stack, study, owners, kms):
    body, h = recipe(owners, ["A", "B"])
    approve(study, owners, h, "A", "B")
    study.revoke(h, owners["C"])
    machine = SimulatedCvm(stack.state_dir, study.app_id, body)
    with pytest.raises(KmsRefused, match="Compose hash revoked") as refused:
        kms.release_owner_keys(machine.attest, body)
    assert refused.value.code == "revoked"
    assert study.budget().spent_micro == 0


def test_app_compose_must_be_the_attested_one(stack, study, owners, kms):
    body, h = recipe(owners, ["A", "B"])
    other_body, _ = recipe(owners, ["A", "B"], epsilon=0.01, tag="cheaper")
    approve(study, owners, h, "A", "B")
    machine = SimulatedCvm(stack.state_dir, study.app_id, body)
    with pytest.raises(KmsRefused, match="does not hash to the attested compose hash"):
        kms.release_owner_keys(machine.attest, other_body)
    assert study.budget().spent_micro == 0


def round_recipe(owners, names, round_number=1):
    from cvm.federated import RoundContract

    contract = RoundContract(
        round=round_number, parent_digest="00" * 32, eligible_sites=tuple(owners[n].address for n in names),
        local_epochs=1, local_batch_size=64, clip_norm=1.0, noise_multiplier=1.0, aggregator="fedavg",
        min_participants=1, deadline=2_000_000_000, epsilon_per_round=0.3, epsilon_total=0.9, delta=1e-5)
    manifest = StudyManifest.model_validate({
        "study": "round-test", "inputs": [{"owner": owners[n].address, "name": f"site-{n}"} for n in names],
        "analysis": {"kind": "fed_round", "params": contract.to_params()}, "epsilon": 0.9, "delta": 1e-5,
        "output_type": "round_record"})
    body = normalized_json_bytes(build_app_compose("round-test", YAML, manifest))
    return body, compose_hash(body)


def test_round_spend_is_recorded_once_per_round_and_capped(stack, study, owners, kms):
    body, h = round_recipe(owners, ["A", "B"])
    approve(study, owners, h, "A", "B")
    machine = SimulatedCvm(stack.state_dir, study.app_id, body)
    with pytest.raises(KmsRefused, match="at most its contract's ε per round"):
        kms.record_round_spend(machine.attest, body, 0.31)
    spend = kms.record_round_spend(machine.attest, body, 0.25)
    assert spend.simulated and spend.epsilon_spent == pytest.approx(0.25)
    with pytest.raises(KmsRefused, match="already recorded"):
        kms.record_round_spend(machine.attest, body, 0.25)      # the same round cannot be charged twice
    with pytest.raises(KmsRefused, match="gets no owner keys"):
        kms.release_owner_keys(machine.attest, body)            # and a round never receives owners' keys
    assert study.budget().spent_micro == 250_000


def test_a_study_recipe_cannot_record_round_spends(stack, study, owners, kms):
    body, h = recipe(owners, ["A", "B"])
    approve(study, owners, h, "A", "B")
    machine = SimulatedCvm(stack.state_dir, study.app_id, body)
    with pytest.raises(KmsRefused, match="only a federated round recipe"):
        kms.record_round_spend(machine.attest, body, 0.1)
    assert study.budget().spent_micro == 0
