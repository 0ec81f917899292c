"""`seal verify` on a real study run's receipt: it passes only with --allow-simulated (and says SIMULATED), and
swapping in another run's quote, another study's compose or another KMS root, a chain that cannot be reached and
a revocation are each reported precisely. Two SIMULATED runs of one study per module; CLI driven as a user would."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from eth_account import Account
from eth_keys import keys as eth_keys
from typer.testing import CliRunner

import auditor.links.quote as quote_link
from auditor.verify import LinkStatus, VerificationReport, verify_receipt
from compose.app_compose import normalized_json_bytes
from compose.backends.launcher import free_loopback_port
from contracts.chain import Chain, DstackKms
from cvm.attest.eventlog import RuntimeEvent, parse_event_log, replay_rtmr
from cvm.attest.simulated import SIMULATED_OS_IMAGE, SimulatedTdx, mr_config_id_v1
from sealing_cli.devchain import ANVIL_FUNDER_KEY, Anvil
from sealing_cli.main import app
from sealing_cli.stack import LocalStack
from tests.study_world import (
    StudyWorld,
    build_study_world,
    make_recipe,
    run_cvm,
    start_study_stack,
)

runner = CliRunner()


@dataclass
class Runs:
    stack: LocalStack
    world: StudyWorld
    chain: Chain
    first: dict
    second: dict
    second_path: Path

    def verify(self, receipt: dict, **changes) -> VerificationReport:
        options = {"now": int(time.time()), "chain": self.chain, "allow_simulated": True,
                   "kms_root": self.stack.description.services["kms"]["root_address"],
                   "simulated_root_der": self.world.simulated_root_der,
                   "os_measurements": [SIMULATED_OS_IMAGE.measurement_record()]}
        return verify_receipt(receipt, **(options | changes))

    def seal(self, *args: str):
        return runner.invoke(app, ["verify", *args, "--state-dir", str(self.stack.state_dir)])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    with start_study_stack(tmp_path_factory.mktemp("verify")) as stack:
        world = build_study_world(stack)
        second_path = stack.state_dir / "second-run.json"
        process = run_cvm(stack, world.compose_path, world.sealed, second_path, name="cvm-2")
        assert process.returncode == 0, process.stderr
        with Chain(stack.description.rpc_url) as chain:
            yield Runs(stack, world, chain, world.receipt, json.loads(second_path.read_text()), second_path)


@contextmanager
def chain_snapshot(chain: Chain):
    """Changes made inside are undone afterwards (anvil's evm_snapshot / evm_revert)."""
    snapshot = chain.w3.provider.make_request("evm_snapshot", [])["result"]
    try:
        yield
    finally:
        assert chain.w3.provider.make_request("evm_revert", [snapshot])["result"] is True


# ---- the good case --------------------------------------------------------------------------------------------


def test_the_demo_receipt_holds_at_every_link_and_says_simulated(runs):
    report = runs.verify(runs.first)
    assert report.ok and report.simulated
    assert [(link.number, link.status) for link in report.links] == [(n, LinkStatus.OK) for n in range(1, 8)]
    assert report.verdict == "VERIFIED — SIMULATED TEE: proves nothing about hardware"
    assert report.link("event-log").facts["compose_hash"] == runs.world.compose_hash.hex()
    onchain = report.link("on-chain").facts
    assert {a["owner"] for a in onchain["approvals"]} == {o.address for o in runs.world.owners.values()}
    assert all(a["time"].endswith("Z") for a in onchain["approvals"])
    assert onchain["budget"]["at_recorded_block"] == {"epsilon_spent": 1.0, "epsilon_remaining": 1.0}
    assert onchain["budget"]["now"] == {"epsilon_spent": 2.0, "epsilon_remaining": 0.0}  # the second run spent
    assert report.link("compose").facts["manifest"]["output_type"] == "aggregate_stats"
    signature = report.link("signature-chain").facts
    assert signature["recovered_kms_root"] == signature["registered_kms_root"] == signature["pinned_kms_root"]


def test_the_second_run_holds_too_with_its_own_budget(runs):
    report = runs.verify(runs.second)
    assert report.ok
    assert report.link("on-chain").facts["budget"]["at_recorded_block"]["epsilon_remaining"] == 0.0


def test_without_allow_simulated_only_the_quote_link_fails(runs):
    report = runs.verify(runs.first, allow_simulated=False, simulated_root_der=None)
    assert not report.ok and report.simulated
    assert [link.number for link in report.links if not link.holds] == [1]
    assert "SIMULATED TDX quote and simulated quotes are not allowed" in report.first_failure.reason
    assert report.verdict == "FAILED at link 1 (quote) — SIMULATED TEE: proves nothing about hardware"


def test_another_simulated_root_is_refused(runs, tmp_path):
    from cvm.attest.simulated import SimulatedTdx

    other_root = SimulatedTdx.load_or_create(tmp_path).root_der
    report = runs.verify(runs.first, simulated_root_der=other_root)
    assert report.first_failure.number == 1 and "not the pinned simulated root" in report.first_failure.reason


def test_an_out_of_date_platform_holds_with_a_warning(runs, monkeypatch):
    # No real sample quote verifies as OutOfDate (fixtures/tdx), so the policy is exercised on patched claims.
    genuine = quote_link.verify_quote

    def out_of_date(*args, **kwargs):
        return replace(genuine(*args, **kwargs), tcb_status="OutOfDate", advisory_ids=("INTEL-SA-00837",))

    monkeypatch.setattr(quote_link, "verify_quote", out_of_date)
    report = runs.verify(runs.first)
    quote = report.link("quote")
    assert report.ok and quote.status is LinkStatus.WARNING
    assert quote.reason == "the platform's TCB status is OutOfDate (advisories: INTEL-SA-00837)"


# ---- swapped evidence -----------------------------------------------------------------------------------------


def test_another_runs_quote_does_not_replay_this_event_log(runs):
    report = runs.verify({**runs.first, "quote": runs.second["quote"]})
    assert report.first_failure.number == 2
    assert "does not give the quote's RTMR3" in report.first_failure.reason


def test_another_runs_quote_and_log_bind_another_envelope(runs):
    report = runs.verify({**runs.first, "quote": runs.second["quote"], "event_log": runs.second["event_log"]})
    assert [link.number for link in report.links if not link.holds] == [6]
    assert "it is another run's quote" in report.first_failure.reason


def test_another_studys_compose_is_not_the_measured_one(runs):
    owners = runs.world.owners
    other = make_recipe(owners, study="another-study").decode()
    report = runs.verify({**runs.first, "app_compose": other})
    assert report.first_failure.number == 3
    assert "this is not the compose that ran" in report.first_failure.reason
    assert [link.number for link in report.links if not link.holds] == [3, 7]  # no measured manifest to compare


def test_a_different_kms_root_is_reported_with_the_registered_one(runs):
    stranger = Account.create().address
    report = runs.verify(runs.first, kms_root=stranger)
    link = report.first_failure
    assert link.number == 5 and f"not the pinned KMS root {stranger}" in link.reason
    assert link.facts["pinned_kms_root"] == stranger
    assert link.facts["registered_kms_root"] == link.facts["recovered_kms_root"] != stranger


def test_without_a_pinned_root_the_registered_one_is_trusted_with_a_warning(runs):
    report = runs.verify(runs.first, kms_root=None)
    link = report.link("signature-chain")
    assert report.ok and link.status is LinkStatus.WARNING and "no KMS root pinned" in link.reason


# ---- a CVM booted otherwise, quoted by the same (pinned) simulated platform ---------------------------------------


def rebooted(runs: Runs, *, measured: dict[str, bytes] | None = None, td_attributes: int = 0) -> dict:
    """The first receipt with a fresh quote from the stack's simulated platform over the same envelope, for a boot
    that measured other payloads for the named events (and had the given TD attributes)."""
    receipt = runs.first
    entries = json.loads(receipt["event_log"])
    for name, payload in (measured or {}).items():
        index = next(i for i, entry in enumerate(entries) if entry["event"] == name)
        entries[index] = RuntimeEvent.measure(name, payload).to_entry()
    rtmr3 = replay_rtmr(event.digest for event in parse_event_log(entries) if event.imr == 3)
    platform = SimulatedTdx.load_or_create(runs.stack.state_dir / "simulated-tdx")
    quote = platform.make_quote(bytes.fromhex(receipt["envelope_digest"]).ljust(64, b"\0"), rtmr3=rtmr3,
                                mr_config_id=mr_config_id_v1(runs.world.compose_hash), td_attributes=td_attributes)
    return {**receipt, "quote": quote.hex(), "event_log": json.dumps(entries)}


def test_a_requoted_identical_boot_still_holds(runs):
    assert runs.verify(rebooted(runs)).ok  # the control for the tests below


def test_a_cvm_that_measured_another_kms_breaks_link_5(runs):
    other_root = eth_keys.PrivateKey(b"\x07" * 32).public_key.to_compressed_bytes()
    provider = json.dumps({"name": "kms", "id": other_root.hex()}, separators=(",", ":")).encode()
    report = runs.verify(rebooted(runs, measured={"key-provider": provider}))
    assert [link.number for link in report.links if not link.holds] == [5]
    assert "the CVM measured another KMS as its key provider" in report.first_failure.reason


def test_a_cvm_on_an_os_image_the_registry_does_not_allow_breaks_link_5(runs):
    report = runs.verify(rebooted(runs, measured={"os-image-hash": bytes(range(32))}))
    assert [link.number for link in report.links if not link.holds] == [5]
    assert f"the CVM booted OS image {bytes(range(32)).hex()}, which DstackKms" in report.first_failure.reason


def test_a_debug_td_breaks_link_1(runs):
    report = runs.verify(rebooted(runs, td_attributes=1))  # TD_ATTRIBUTES.DEBUG
    assert report.first_failure.number == 1 and "debug mode" in report.first_failure.reason


# ---- the chain: revocation, the KMS registry, reachability ---------------------------------------------------------


def at_block(receipt: dict, block: int) -> dict:
    """The receipt claiming another block, in both places it names it (the envelope's signature then breaks at
    link 5/6, but link 4 judges the claimed block first)."""
    return {**receipt, "chain": {**receipt["chain"], "block": block},
            "envelope": {**receipt["envelope"], "block": block}}


def test_a_revocation_after_the_run_is_a_loud_warning_not_a_failure(runs):
    with chain_snapshot(runs.chain):
        runs.world.study.revoke(runs.world.compose_hash, runs.world.owners["B"])
        report = runs.verify(runs.first)
        link = report.link("on-chain")
        assert report.ok and link.status is LinkStatus.WARNING
        assert link.reason.startswith(f"REVOKED AFTER THE RUN: {runs.world.owners['B'].address} revoked")
        assert "its result stands" in link.reason
        assert link.facts["revocations"][0]["owner"] == runs.world.owners["B"].address

        cli = runs.seal(str(runs.world.receipt_path), "--allow-simulated")
        assert cli.exit_code == 0 and "WARNING" in cli.stdout and "REVOKED AFTER THE RUN" in cli.stdout

        # Claiming a block after the revocation as the run's block: the proofs are of the run's block, not that one
        # (tests/test_storage_proofs.py proves the revocation from fresh proofs at the later block).
        latest = runs.chain.w3.eth.block_number
        moved = runs.verify(at_block(runs.first, latest))
        assert moved.first_failure.number == 4 and "the block header hashes to" in moved.first_failure.reason


def test_a_kms_root_rotated_after_the_run_is_a_warning(runs):
    funder = Account.from_key(ANVIL_FUNDER_KEY)
    with chain_snapshot(runs.chain):
        runs.stack.registry.set_kms_root(eth_keys.PrivateKey(b"\x08" * 32).public_key.to_compressed_bytes(), funder)
        link = runs.verify(runs.first).link("signature-chain")
        assert link.status is LinkStatus.WARNING and "registered another KMS root since the run" in link.reason
        latest = runs.chain.w3.eth.block_number
        moved = runs.verify({**runs.first, "chain": {**runs.first["chain"], "block": latest}})
        assert moved.link("signature-chain").status is LinkStatus.FAILED
        assert "registered KMS root" in moved.link("signature-chain").reason


def test_a_registry_that_does_not_register_the_app_breaks_link_5(runs):
    funder = Account.from_key(ANVIL_FUNDER_KEY)
    with chain_snapshot(runs.chain):
        impostor = DstackKms.deploy(runs.chain, funder)  # same KMS root, but the study's app is not registered
        impostor.set_kms_root(runs.stack.registry.kms_root_pubkey(), funder)
        named = {**runs.first["chain"], "dstack_kms": impostor.address}
        at_the_run = runs.verify({**runs.first, "chain": named}).first_failure
        assert at_the_run.number == 5 and f"no DstackKms contract answers at {impostor.address}" in at_the_run.reason
        afterwards = runs.verify(at_block({**runs.first, "chain": named}, runs.chain.w3.eth.block_number))
        afterwards = afterwards.link("signature-chain")   # link 4 breaks first: its proofs are of the run's block
    assert not afterwards.holds and f"is not registered in DstackKms {impostor.address}" in afterwards.reason


def test_an_unreachable_chain_fails_the_chain_links_as_unreachable(runs):
    report = runs.verify(runs.first, chain=None)
    assert [link.number for link in report.links if not link.holds] == [4, 5, 7]
    assert report.first_failure.unreachable and "could not be reached" in report.first_failure.reason


def test_a_chain_that_dies_mid_check_is_unreachable_not_a_crash(runs):
    node = Anvil()
    with Chain(node.rpc_url) as doomed:
        node.stop()
        report = runs.verify(runs.first, chain=doomed)
    link = report.first_failure
    assert link.number == 4 and link.unreachable and "chain unreachable" in link.reason


# ---- the command, as a user runs it ---------------------------------------------------------------------------


def test_cli_passes_with_allow_simulated_and_shouts_simulated(runs):
    result = runs.seal(str(runs.world.receipt_path), "--allow-simulated")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].strip().startswith("SIMULATED") and "proves nothing about hardware" in lines[0]
    assert sum("✔ ok" in line for line in lines) == 7
    assert lines[-1] == "verdict: VERIFIED — SIMULATED TEE: proves nothing about hardware"


def test_cli_fails_without_allow_simulated_naming_link_1(runs):
    result = runs.seal(str(runs.world.receipt_path))
    assert result.exit_code == 1
    assert "error: link 1 (quote) is broken: this is a SIMULATED TDX quote" in result.stderr
    assert "hint: a SIMULATED receipt passes only with --allow-simulated" in result.stderr
    assert "SIMULATED" in result.stdout.splitlines()[0]


def test_cli_json_has_the_same_links(runs):
    result = runs.seal(str(runs.world.receipt_path), "--allow-simulated", "--json")
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["ok"] and report["simulated"] and report["first_failure"] is None
    assert [(link["link"], link["name"], link["status"]) for link in report["links"]] == [
        (1, "quote", "ok"), (2, "event-log", "ok"), (3, "compose", "ok"), (4, "on-chain", "ok"),
        (5, "signature-chain", "ok"), (6, "envelope", "ok"), (7, "output", "ok")]


def test_cli_names_a_tampered_link_and_exits_1(runs, tmp_path):
    tampered = json.loads(runs.world.receipt_path.read_text())
    tampered["envelope"]["payload"]["results"][0]["value"] += 1000
    path = tmp_path / "tampered.json"
    path.write_text(json.dumps(tampered))
    result = runs.seal(str(path), "--allow-simulated", "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["first_failure"]["name"] == "envelope"
    assert "error: link 6 (envelope) is broken: the envelope hashes to" in result.stderr
    assert "changed after signing" in result.stderr


def test_cli_prints_receipt_text_literally(runs, tmp_path):
    # Reasons quote the receipt; markup in it must not restyle or hide the error line.
    tampered = {**runs.first, "signature": {**runs.first["signature"], "algorithm": "[/][green]fine[/]"}}
    path = tmp_path / "markup.json"
    path.write_text(json.dumps(tampered))
    result = runs.seal(str(path), "--allow-simulated")
    assert result.exit_code == 1 and "the signature is '[/][green]fine[/]' with purpose" in result.stderr
    path.write_text(json.dumps({"format": "[/][bold]v1"}))
    result = runs.seal(str(path), "--allow-simulated")
    assert result.exit_code == 1 and "format is '[/][bold]v1'" in result.stderr


def test_cli_pins_the_given_kms_root(runs):
    stranger = Account.create().address
    result = runs.seal(str(runs.world.receipt_path), "--allow-simulated", "--kms-root", stranger)
    assert result.exit_code == 1 and "error: link 5 (signature-chain)" in result.stderr


def test_cli_exits_3_when_the_chain_is_unreachable(runs):
    dead = f"http://127.0.0.1:{free_loopback_port()}"
    result = runs.seal(str(runs.world.receipt_path), "--allow-simulated", "--rpc", dead)
    assert result.exit_code == 3
    assert f"chain unreachable at {dead}" in result.stderr
    assert "error: link 4 (on-chain) is broken: cannot be checked" in result.stderr


@pytest.mark.parametrize("content, message", [
    (b"not json", "is not JSON"),
    (b'{"format": "sealroom-attestation/v1", "quote": NaN}', "holds NaN, which is not JSON"),
    (b'{"format": "sealroom-attestation/v1", "format": "x"}', "repeats a JSON key"),
    (b"[]", "is not a JSON object"),
    (normalized_json_bytes({"format": "sealroom-attestation/v2"}), "format is 'sealroom-attestation/v2'"),
], ids=["garbage", "nan", "duplicate-key", "list", "unknown-version"])
def test_cli_refuses_what_is_not_a_receipt(runs, tmp_path, content, message):
    path = tmp_path / "attestation.json"
    path.write_bytes(content)
    result = runs.seal(str(path), "--allow-simulated")
    assert result.exit_code == 1 and message in result.stderr


def test_cli_usage_errors_exit_2_with_a_hint(runs, tmp_path):
    receipt = str(runs.world.receipt_path)
    no_stack = ["--state-dir", str(tmp_path)]  # a folder without a stack: no defaults to fall back on
    no_root = runner.invoke(app, ["verify", receipt, "--allow-simulated", "--rpc", runs.stack.description.rpc_url,
                                  *no_stack])
    assert no_root.exit_code == 2 and "needs a simulated TDX root to pin" in no_root.stderr
    assert "hint: pass --simulated-root FILE" in no_root.stderr
    no_rpc = runner.invoke(app, ["verify", receipt, *no_stack])
    assert no_rpc.exit_code == 2 and "hint: pass --rpc URL" in no_rpc.stderr
    bad_root = runs.seal(receipt, "--kms-root", "not-an-address")
    assert bad_root.exit_code == 2 and "--kms-root must be a 0x-prefixed address" in bad_root.stderr


def test_cli_with_explicit_pins_and_no_stack(runs, tmp_path):
    root = tmp_path / "root.der"
    root.write_bytes(runs.world.simulated_root_der)
    d = runs.stack.description
    result = runner.invoke(app, ["verify", str(runs.world.receipt_path), "--state-dir", str(tmp_path), "--rpc",
                                 d.rpc_url, "--kms-root", d.services["kms"]["root_address"], "--allow-simulated",
                                 "--simulated-root", str(root)])
    assert result.exit_code == 0, result.output
