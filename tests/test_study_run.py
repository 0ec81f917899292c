"""A whole study run inside a SIMULATED CVM: sealed inputs in, one signed DP aggregate and its receipt out."""

from __future__ import annotations

import pytest

from cvm.attest.verify import verify_attestation
from cvm.receipt import envelope_digest
from kms_client.signature_chain import verify_signature_chain
from tests.study_world import SITES, build_study_world, start_study_stack


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    with start_study_stack(tmp_path_factory.mktemp("study")) as stack:
        world = build_study_world(stack)
        yield stack, world.compose_hash, world.receipt


def test_the_receipt_holds_a_dp_aggregate_of_the_joined_cohorts(run):
    _stack, h, attestation = run
    envelope = attestation["envelope"]
    assert attestation["simulated"] and envelope["simulated"]
    assert envelope["compose_hash"] == h.hex() and envelope["output_type"] == "aggregate_stats"
    results = {r["name"]: r["value"] for r in envelope["payload"]["results"]}
    assert abs(results["patients"] - 4_000) < 400      # noisy, but a count of the two cohorts joined
    assert 30 < results["mean_age"] < 90
    assert envelope["epsilon_spent"] == pytest.approx(1.0) and envelope["epsilon_remaining"] == pytest.approx(1.0)
    assert set(envelope["inputs"]) == set(SITES.values())


def test_the_signature_chain_leads_to_the_kms_root_on_chain(run):
    stack, _h, attestation = run
    signature = attestation["signature"]
    verify_signature_chain(bytes.fromhex(attestation["envelope_digest"]), signature["signature_chain"],
                           message_pubkey=signature["public_key"], purpose=signature["purpose"],
                           app_id=bytes.fromhex(attestation["envelope"]["app_id"][2:]),
                           expected_kms_root=stack.description.services["kms"]["root_address"])
    assert attestation["envelope_digest"] == envelope_digest(attestation["envelope"]).hex()


def test_the_quote_binds_the_envelope_and_the_recipe(run):
    stack, h, attestation = run
    verified = verify_attestation(
        bytes.fromhex(attestation["quote"]), attestation["event_log"],
        expected_report_data=bytes.fromhex(attestation["envelope_digest"]), now=1_800_000_000,
        allow_simulated=True, simulated_root_der=(stack.state_dir / "simulated-tdx" / "root.der").read_bytes())
    assert verified.compose_hash == h and verified.simulated
    approvers = {a["owner"] for a in attestation["chain"]["approvals"]}
    assert approvers == {o.address for o in stack.description.owners}


def test_a_run_that_would_overspend_is_refused_before_any_key_is_released(run, tmp_path):
    stack, _h, attestation = run
    from contracts.chain import DstackApp
    from tests.study_world import run_cvm

    study = DstackApp(stack.chain, stack.description.dstack_app)
    compose = stack.state_dir / "app-compose.json"
    sealed = [str(stack.state_dir / f"{site}.sealed") for site in SITES.values()]
    second = run_cvm(stack, compose, sealed, tmp_path / "second.json", name="cvm-second")
    assert second.returncode == 0, second.stderr           # 1.0 + 1.0 = the whole budget of 2.0
    assert study.budget().remaining_micro == 0
    third = run_cvm(stack, compose, sealed, tmp_path / "third.json", name="cvm-third")
    assert third.returncode == 1 and "privacy budget exceeded" in third.stderr
    assert not (tmp_path / "third.json").exists()          # nothing released, nothing written
    assert study.budget().spent_micro == 2_000_000
