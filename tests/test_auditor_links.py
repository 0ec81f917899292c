"""Each link of the auditor's checklist on its own (auditor/links/): a good input holds, and each bad input breaks
it with a reason that names what is wrong. Inputs are one real SIMULATED study run's receipt (parsed), the proofs
the earlier links give on it, and variations of either; the quote link also runs on Intel's real sample quote.
One study run per module."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from types import MappingProxyType

import pytest
from eth_account import Account
from eth_keys import keys as eth_keys

import auditor.links.quote as quote_link
from auditor.links import compose, envelope, event_log, on_chain, output, quote, signature_chain
from auditor.links.base import Broken, Pins, Recipe
from auditor.links.compose import ComposeProof
from auditor.links.event_log import EventLogProof
from auditor.links.on_chain import OnChainProof
from auditor.links.quote import QuoteProof
from auditor.receipt import NotAReceipt, Receipt, parse_receipt
from auditor.verify import verify_receipt
from compose.app_compose import compose_hash, normalized_json_bytes
from contracts.chain import Chain
from contracts.storage import DstackAppSlots
from cvm.attest.eventlog import RuntimeEvent, parse_event_log, replay_rtmr
from cvm.attest.simulated import SIMULATED_OS_IMAGE, SimulatedTdx, mr_config_id_v1
from cvm.labels import INPUTS_EVENT
from tests.study_world import StudyWorld, build_study_world, make_recipe, start_study_stack
from tests.test_verify_mutations import flipped
from tests.test_verify_real_quote import COLLATERAL, PINNED_NOW, real_receipt
from tests.test_verify_receipt import chain_snapshot


@dataclass(frozen=True)
class World:
    """One study run's receipt, the auditor's pins, and what links 1-4 prove on it (the later links' inputs)."""

    study: StudyWorld
    chain: Chain
    raw: dict
    receipt: Receipt
    pins: Pins
    quote: QuoteProof
    event_log: EventLogProof
    recipe: Recipe
    compose: ComposeProof
    on_chain: OnChainProof

    def parsed(self, **changes) -> Receipt:
        """The receipt with top-level fields replaced."""
        return parse_receipt({**self.raw, **changes})

    def with_envelope(self, **changes) -> Receipt:
        return self.parsed(envelope={**self.raw["envelope"], **changes})

    def with_chain(self, **changes) -> Receipt:
        return self.parsed(chain={**self.raw["chain"], **changes})


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    with start_study_stack(tmp_path_factory.mktemp("auditor-links")) as stack:
        study = build_study_world(stack)
        d = stack.description
        with Chain(d.rpc_url) as chain:
            raw = study.receipt
            receipt = parse_receipt(raw)
            pins = Pins(now=int(time.time()), kms_root=d.services["kms"]["root_address"], allow_simulated=True,
                        simulated_root_der=study.simulated_root_der,
                        os_measurements=(SIMULATED_OS_IMAGE.measurement_record(),))
            proven_quote = quote.check(receipt, pins).proven
            proven_log = event_log.check(receipt, proven_quote, pins).proven
            recipe = event_log.recipe(proven_log, receipt)
            yield World(study, chain, raw, receipt, pins, proven_quote, proven_log, recipe,
                        compose.check(receipt, recipe).proven, on_chain.check(receipt, recipe, chain).proven)


def broken(check, *inputs) -> Broken:
    with pytest.raises(Broken) as caught:
        check(*inputs)
    return caught.value


def requote(w: World, *, measured: dict[str, bytes] | None = None, td_attributes: int = 0,
            report_data: bytes | None = None) -> dict:
    """The receipt with a fresh quote from the stack's (pinned) simulated platform, for a boot that measured other
    payloads for the named events, with these TD attributes, over this report_data (default: the envelope's)."""
    entries = json.loads(w.raw["event_log"])
    for name, payload in (measured or {}).items():
        index = next(i for i, entry in enumerate(entries) if entry["event"] == name)
        entries[index] = RuntimeEvent.measure(name, payload).to_entry()
    rtmr3 = replay_rtmr(event.digest for event in parse_event_log(entries) if event.imr == 3)
    platform = SimulatedTdx.load_or_create(w.study.stack.state_dir / "simulated-tdx")
    bound = report_data if report_data is not None else bytes.fromhex(w.raw["envelope_digest"])
    quote_bytes = platform.make_quote(bound.ljust(64, b"\0"), rtmr3=rtmr3,
                                      mr_config_id=mr_config_id_v1(w.study.compose_hash), td_attributes=td_attributes)
    return {**w.raw, "quote": quote_bytes.hex(), "event_log": json.dumps(entries)}


def boot_with(w: World, **changes) -> EventLogProof:
    """Link 2's proof with other boot values (as if the CVM had measured them)."""
    return EventLogProof(dataclasses.replace(w.event_log.boot, **changes))


def key_provider(key_id: object) -> dict:
    return {"name": "kms", "id": key_id}


# ---- the parsed receipt ---------------------------------------------------------------------------------------------


def test_the_parsed_receipt_is_immutable_and_holds_reasons_not_exceptions(w):
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.receipt.quote = None
    envelope_json = w.receipt.envelope.get().json
    assert isinstance(envelope_json, MappingProxyType)
    with pytest.raises(TypeError):
        envelope_json["block"] = 0
    assert isinstance(w.receipt.chain.get().approvals.get(), tuple)
    damaged = parse_receipt({**w.raw, "chain": [], "quote": "zz"})  # parsing itself never refuses
    assert damaged.chain.problem == "chain is not an object" and damaged.quote.problem == "quote is not hex"
    assert damaged.tdx_quote.problem == "quote is not hex"
    with pytest.raises(Broken, match="chain is not an object"):
        damaged.chain.get()
    assert w.receipt.claimed_recipe == dataclasses.replace(w.recipe, attested=False)
    with pytest.raises(NotAReceipt, match="format"):
        parse_receipt({**w.raw, "format": "sealroom-attestation/v2"})


# ---- link 1: quote -------------------------------------------------------------------------------------------------


def test_quote_holds_for_the_pinned_simulated_platform(w):
    held = quote.check(w.receipt, w.pins)
    assert held.proven.simulated is True and held.proven.claims.simulated and held.warnings == ()
    assert held.facts["kind"] == "SIMULATED TDX" and held.facts["collateral"] == "none"
    assert held.summary.startswith("SIMULATED TDX quote verified to the pinned SIMULATED root")


def test_quote_holds_for_intels_sample_at_the_pinned_time():
    receipt = parse_receipt(real_receipt(collateral=json.loads(COLLATERAL.read_text())))
    held = quote.check(receipt, Pins(now=PINNED_NOW))
    assert held.proven.simulated is False and held.facts["tcb_status"] == "UpToDate"
    assert held.proven.collateral == json.dumps(json.loads(COLLATERAL.read_text()))


def test_quote_out_of_date_tcb_holds_with_a_warning(w, monkeypatch):
    genuine = quote_link.verify_quote
    monkeypatch.setattr(quote_link, "verify_quote", lambda *a, **k: dataclasses.replace(
        genuine(*a, **k), tcb_status="OutOfDate", advisory_ids=("INTEL-SA-00837",)))
    held = quote.check(w.receipt, w.pins)
    assert held.warnings == ("the platform's TCB status is OutOfDate (advisories: INTEL-SA-00837)",)


def test_quote_refuses_a_simulated_quote_unless_allowed_but_still_says_simulated(w):
    refused = broken(quote.check, w.receipt, Pins(now=w.pins.now))
    assert "SIMULATED TDX quote and simulated quotes are not allowed" in refused.reason
    assert refused.proven == QuoteProof(claims=None, simulated=True, collateral=None)
    assert refused.summary.startswith("a SIMULATED TDX quote, which proves nothing about hardware")


def test_quote_refuses_another_simulated_root(w, tmp_path):
    pins = dataclasses.replace(w.pins, simulated_root_der=SimulatedTdx.load_or_create(tmp_path).root_der)
    refused = broken(quote.check, w.receipt, pins)
    assert "not the pinned simulated root" in refused.reason and refused.proven is None


@pytest.mark.parametrize("changes, reason", [
    ({"quote": None}, "quote is not a string"),
    ({"quote": "zz"}, "quote is not hex"),
    ({"simulated": False}, "the receipt says its quote is real, but it is SIMULATED"),
    ({"simulated": 1}, "the receipt has no true/false simulated flag"),
    ({"collateral": 7}, "collateral is not an object or a string or null"),
    ({"collateral": "{}"}, "the receipt carries DCAP collateral for a SIMULATED quote"),
], ids=["no-quote", "not-hex", "flag-real", "flag-not-bool", "collateral-kind", "collateral-for-simulated"])
def test_quote_breaks_on_a_bad_receipt_field(w, changes, reason):
    assert reason in broken(quote.check, w.parsed(**changes), w.pins).reason


def test_quote_breaks_on_a_truncated_or_tampered_quote(w):
    raw = bytes.fromhex(w.raw["quote"])
    assert broken(quote.check, w.parsed(quote=raw[:100].hex()), w.pins).reason.startswith("quote truncated")
    tampered = broken(quote.check, w.parsed(quote=flipped(w.raw["quote"], 700)), w.pins)
    assert tampered.reason == "quote rejected: the QE report does not bind the quote's attestation key"
    assert tampered.proven is None


def test_quote_breaks_on_a_debug_td(w):
    assert "debug mode" in broken(quote.check, parse_receipt(requote(w, td_attributes=1)), w.pins).reason


def test_quote_breaks_on_stale_collateral_for_a_real_quote():
    receipt = parse_receipt(real_receipt(collateral=COLLATERAL.read_text()))
    assert "stale collateral" in broken(quote.check, receipt, Pins(now=int(time.time()))).reason
    assert "no DCAP collateral" in broken(quote.check, parse_receipt(real_receipt(collateral=None)),
                                          Pins(now=PINNED_NOW)).reason


# ---- link 2: event-log -----------------------------------------------------------------------------------------------


def test_event_log_holds_and_attests_the_recipe(w):
    held = event_log.check(w.receipt, w.quote, w.pins)
    assert held.proven.recipe == Recipe(bytes.fromhex(w.raw["envelope"]["app_id"][2:]), w.study.compose_hash, True)
    assert held.facts["compose_hash"] == w.study.compose_hash.hex() and INPUTS_EVENT in held.facts["app_events"]
    assert "rtmr3_from" not in held.facts


def test_event_log_without_a_verified_quote_replays_to_the_unverified_one(w):
    held = event_log.check(w.receipt, None, w.pins)
    assert held.facts["rtmr3_from"] == "the unverified quote (link 1 failed)"
    assert held.proven == w.event_log


def test_event_log_recipe_falls_back_to_the_envelopes_claim(w):
    assert event_log.recipe(w.event_log, w.receipt).attested
    claimed = event_log.recipe(None, w.receipt)
    assert claimed == dataclasses.replace(w.recipe, attested=False)
    assert event_log.recipe(None, w.with_envelope(app_id="0x12")) is None


def test_event_log_breaks_without_a_parsable_quote(w):
    reason = broken(event_log.check, w.parsed(quote="00"), None, w.pins).reason
    assert reason == "cannot be checked: the quote does not parse (link 1)"


def test_event_log_breaks_on_an_rtmr3_entry_that_was_not_measured(w):
    entries = json.loads(w.raw["event_log"])
    index = next(i for i, entry in enumerate(entries) if entry["event"] == "compose-hash")
    entries[index] = RuntimeEvent.measure("compose-hash", bytes(32)).to_entry()
    reason = broken(event_log.check, w.parsed(event_log=json.dumps(entries)), w.quote, w.pins).reason
    assert "replaying the RTMR3 events does not give the quote's RTMR3" in reason
    entries = json.loads(w.raw["event_log"])
    entries[index]["event_payload"] = "00" * 32
    reason = broken(event_log.check, w.parsed(event_log=json.dumps(entries)), w.quote, w.pins).reason
    assert "the digest of event 'compose-hash' does not match its payload" in reason


def test_event_log_breaks_on_a_firmware_entry_but_still_hands_on_the_boot(w):
    entries = json.loads(w.raw["event_log"])
    index = next(i for i, entry in enumerate(entries) if entry["imr"] < 3)
    entries[index]["digest"] = flipped(entries[index]["digest"], 0)
    refused = broken(event_log.check, w.parsed(event_log=json.dumps(entries)), w.quote, w.pins)
    imr = entries[index]["imr"]
    assert refused.reason == f"the event log's RTMR{imr} entries do not replay to the quote's RTMR{imr}"
    assert refused.proven == w.event_log  # RTMR3 replayed: the boot values are proven


@pytest.mark.parametrize("event_log_value, reason", [
    (None, "event_log is not a string or a list"), ("[", "the event log is not valid JSON"),
    ("{}", "the event log is not a JSON list")])
def test_event_log_breaks_on_a_malformed_log(w, event_log_value, reason):
    assert reason in broken(event_log.check, w.parsed(event_log=event_log_value), w.quote, w.pins).reason


# ---- link 3: compose --------------------------------------------------------------------------------------------------


def test_compose_holds_and_gives_the_manifest(w):
    held = compose.check(w.receipt, w.recipe)
    assert held.proven.manifest.study == "run-test" and held.facts["sha256"] == w.study.compose_hash.hex()
    assert "recipe_from" not in held.facts


def test_compose_against_an_unattested_recipe_says_so(w):
    held = compose.check(w.receipt, dataclasses.replace(w.recipe, attested=False))
    assert held.facts["recipe_from"] == "the envelope's claim (not attested: link 2 failed)"


def test_compose_breaks_on_another_studys_compose(w):
    other = make_recipe(w.study.owners, study="another-study").decode()
    refused = broken(compose.check, w.parsed(app_compose=other), w.recipe)
    assert "but the CVM was measured as" in refused.reason and "this is not the compose that ran" in refused.reason
    assert refused.facts["sha256"] == compose_hash(other.encode()).hex()


def test_compose_breaks_without_a_recipe_or_a_manifest(w):
    assert "neither the event log nor the envelope names the recipe" in broken(compose.check, w.receipt, None).reason
    document = json.loads(w.raw["app_compose"])
    document["docker_compose_file"] = "services: {}\n"
    body = normalized_json_bytes(document)
    recipe = dataclasses.replace(w.recipe, compose_hash=compose_hash(body))
    reason = broken(compose.check, w.parsed(app_compose=body.decode()), recipe).reason
    assert reason.startswith("the compose carries no valid study manifest: no study manifest")
    assert broken(compose.check, w.parsed(app_compose="\ud800"), w.recipe).reason == \
        "app_compose is not valid Unicode text"


# ---- link 4: on-chain ---------------------------------------------------------------------------------------------------


def test_on_chain_holds_and_finds_the_release(w):
    held = on_chain.check(w.receipt, w.recipe, w.chain)
    assert held.proven.recorded_block == w.raw["chain"]["block"] == w.raw["envelope"]["block"]
    assert held.proven.release.epsilon_micro == 1_000_000 and held.proven.budget_micro == 2_000_000
    assert set(held.proven.release.owners) == {o.address for o in w.study.owners.values()}
    assert held.facts["at_recorded_block"]["allowed"] and held.warnings == ()


def test_on_chain_revocation_after_the_run_holds_with_a_warning(w):
    with chain_snapshot(w.chain):
        w.study.study.revoke(w.study.compose_hash, w.study.owners["B"])
        held = on_chain.check(w.receipt, w.recipe, w.chain)
    assert len(held.warnings) == 1 and held.warnings[0].startswith("REVOKED AFTER THE RUN")


def test_on_chain_breaks_as_unreachable_without_a_chain(w):
    refused = broken(on_chain.check, w.receipt, w.recipe, None)
    assert refused.unreachable and refused.reason == ("cannot be checked: the chain could not be reached and no "
                                                      "block hash was given (--block-hash)")


@pytest.mark.parametrize("changes, reason", [
    ({"chain_id": 5}, "the receipt is for chain 5, but"),
    ({"dstack_app": "0x" + "11" * 20}, "but the CVM was measured with app_id"),
    ({"block": 3}, "chain.block 3 is not the block"),
    ({"approvals": []}, "chain.approvals in the receipt differ from the chain's ComposeHashApproved events"),
], ids=["chain-id", "dstack-app", "block", "approvals"])
def test_on_chain_breaks_on_a_bad_chain_section(w, changes, reason):
    assert reason in broken(on_chain.check, w.with_chain(**changes), w.recipe, w.chain).reason


def test_on_chain_bounds_the_recorded_block(w):
    def at(block: int) -> Receipt:
        return parse_receipt({**w.raw, "chain": {**w.raw["chain"], "block": block},
                              "envelope": {**w.raw["envelope"], "block": block}})

    beyond = broken(on_chain.check, at(10**9), w.recipe, w.chain)
    assert "the recorded block 1000000000 is not on this chain" in beyond.reason and beyond.proven is None
    first_approval = w.raw["chain"]["approvals"][0]["block"]
    early = broken(on_chain.check, at(first_approval), w.recipe, w.chain)
    assert "the block header hashes to" in early.reason   # the proofs are of the run's block, not this one
    assert early.proven == OnChainProof(recorded_block=first_approval)  # the block is bounded; no release


def test_on_chain_breaks_on_a_release_that_is_not_this_runs(w):
    release = w.raw["envelope"]["release"]
    unknown = broken(on_chain.check, w.with_envelope(release={**release, "release_id": "00" * 32}), w.recipe,
                     w.chain)
    assert f"release {'00' * 32} is not recorded on the DstackApp" in unknown.reason
    other_tx = broken(on_chain.check, w.with_envelope(release={**release, "tx": "11" * 32}), w.recipe, w.chain)
    assert "was recorded in another transaction than the envelope names" in other_tx.reason
    other_hash = broken(on_chain.check, w.receipt, dataclasses.replace(w.recipe, compose_hash=bytes(32)), w.chain)
    assert f"no storage proof of slot 0x{DstackAppSlots().compose_flags(bytes(32))[0].number:064x}" in other_hash.reason


# ---- link 5: signature-chain ---------------------------------------------------------------------------------------------


def signature(w: World, **inputs):
    defaults = {"receipt": w.receipt, "recipe": w.recipe, "pins": w.pins, "event_log": w.event_log,
                "on_chain": w.on_chain, "chain": w.chain}
    return signature_chain.check(**(defaults | inputs))


def signature_broken(w: World, **inputs) -> Broken:
    with pytest.raises(Broken) as caught:
        signature(w, **inputs)
    return caught.value


def test_signature_chain_holds_to_the_pinned_root(w):
    held = signature(w)
    assert held.proven.kms_root == w.pins.kms_root == held.facts["registered_kms_root"]
    assert bytes.fromhex(held.facts["measured_key_provider"]) == bytes.fromhex(w.event_log.boot.key_provider["id"])
    assert held.facts["registered_at"] == w.on_chain.recorded_block and held.warnings == ()


def test_signature_chain_without_a_pin_or_a_recorded_block(w):
    held = signature(w, pins=dataclasses.replace(w.pins, kms_root=None), on_chain=None)
    assert held.warnings[0].startswith("no KMS root pinned") and held.facts["registered_at"] == "latest"


def test_signature_chain_breaks_on_another_pinned_root_or_named_root(w):
    stranger = Account.create().address
    assert f"not the pinned KMS root {stranger}" in signature_broken(
        w, pins=dataclasses.replace(w.pins, kms_root=stranger)).reason
    assert f"the receipt names KMS root {stranger}, but the chain ends at" in signature_broken(
        w, receipt=w.with_chain(kms_root_address=stranger)).reason


def test_signature_chain_breaks_on_a_bad_signature(w):
    sig = w.raw["signature"]
    message, app_key, kms = sig["signature_chain"]

    def reason(**changes) -> str:
        return signature_broken(w, receipt=w.parsed(signature={**sig, **changes})).reason

    assert reason(algorithm="ed25519").startswith("the signature is 'ed25519' with purpose 'signing'")
    assert reason(signature=flipped(message, 3)) == \
        "signature.signature is not the first signature of signature.signature_chain"
    changed = flipped(message, 3)
    assert "breaks at its message link" in reason(signature=changed, signature_chain=[changed, app_key, kms])
    assert "not the pinned KMS root" in reason(signature_chain=[message, app_key, flipped(kms, 40)])
    other_app = signature_broken(w, recipe=dataclasses.replace(w.recipe, app_id=bytes(20)))
    assert "the signature chain breaks" in other_app.reason or "not the pinned KMS root" in other_app.reason


def test_signature_chain_breaks_on_another_measured_kms(w):
    other_root = eth_keys.PrivateKey(b"\x07" * 32).public_key.to_compressed_bytes()
    refused = signature_broken(w, event_log=boot_with(w, key_provider=key_provider(other_root.hex())))
    assert refused.reason == "the CVM measured another KMS as its key provider than the one the chain leads to"


@pytest.mark.parametrize("provider, reason", [
    (key_provider("ab" * 48), "the CVM's measured key provider id is 48 bytes, not a 33-byte k256 KMS root key"),
    (key_provider("ab" * 32), "the CVM's measured key provider id is 32 bytes, not a 33-byte k256 KMS root key"),
    (key_provider(""), "the CVM's measured key provider id is 0 bytes, not a 33-byte k256 KMS root key"),
    (key_provider("not hex"), "the CVM's measured key provider id is not hex"),
    (key_provider(7), "the CVM's measured key provider names no KMS id"),
    ({"name": "kms"}, "the CVM's measured key provider names no KMS id"),
    (None, "the CVM measured no key provider"),
], ids=["48-bytes", "32-bytes", "empty", "not-hex", "not-a-string", "no-id", "not-measured"])
def test_signature_chain_refuses_a_key_provider_it_cannot_compare(w, provider, reason):
    # Once a silent pass ("not compared"): a key provider that is not a k256 KMS root key is a refusal.
    refused = signature_broken(w, event_log=boot_with(w, key_provider=provider))
    assert refused.reason == f"{reason}, so it cannot be compared with the KMS root the chain leads to"


def test_signature_chain_refuses_when_link_2_proved_no_key_provider(w):
    refused = signature_broken(w, event_log=None)
    assert "the key provider cannot be checked: it is measured in the event log (link 2)" in refused.reason
    assert "the OS image cannot be checked" in refused.reason


def test_a_receipt_whose_cvm_measured_a_non_k256_key_provider_fails_at_link_5(w):
    provider = json.dumps(key_provider("ab" * 48), separators=(",", ":")).encode()
    report = verify_receipt(requote(w, measured={"key-provider": provider}), now=w.pins.now, chain=w.chain,
                            kms_root=w.pins.kms_root, allow_simulated=True,
                            simulated_root_der=w.study.simulated_root_der)
    assert [link.number for link in report.links if not link.holds] == [5]
    assert "key provider id is 48 bytes, not a 33-byte k256 KMS root key" in report.first_failure.reason


def test_signature_chain_breaks_on_the_registry(w):
    refused = signature_broken(w, event_log=boot_with(w, os_image_hash=bytes(range(32))))
    assert f"the CVM booted OS image {bytes(range(32)).hex()}, which DstackKms" in refused.reason
    assert "is not an address" in signature_broken(w, receipt=w.with_chain(dstack_kms="nowhere")).reason
    unreachable = signature_broken(w, chain=None)
    assert unreachable.unreachable and "the chain could not be reached" in unreachable.reason


# ---- link 6: envelope -------------------------------------------------------------------------------------------------------


def test_envelope_holds_and_is_bound_by_the_quote(w):
    held = envelope.check(w.receipt, w.recipe, True)
    assert held.proven.digest.hex() == w.raw["envelope_digest"] == held.facts["envelope_digest"]
    assert held.proven.payload_sha256 == w.raw["envelope"]["payload_sha256"]


def test_envelope_breaks_when_changed_after_signing(w):
    payload = json.loads(json.dumps(w.raw["envelope"]["payload"]))
    payload["results"][0]["value"] += 1000
    reason = broken(envelope.check, w.with_envelope(payload=payload), w.recipe, True).reason
    assert "not the signed digest" in reason and "it was changed after signing" in reason
    assert "the payload does not match envelope.payload_sha256" in reason


def test_envelope_breaks_when_the_quote_binds_another_envelope(w):
    other = parse_receipt(requote(w, report_data=hashlib.sha256(b"another run").digest()))
    reason = broken(envelope.check, other, w.recipe, True).reason
    assert reason == "the quote's report_data binds another envelope, not this one: it is another run's quote"
    unparsable = broken(envelope.check, w.parsed(quote="00"), w.recipe, True).reason
    assert unparsable == "the quote does not parse, so its report_data cannot be compared (link 1)"


def test_envelope_breaks_when_it_names_another_recipe_chain_or_kind(w):
    names = "differ from the attested recipe, the receipt's chain section or the quote"
    assert f"the envelope's simulated {names}" in broken(envelope.check, w.receipt, w.recipe, False).reason
    other_app = dataclasses.replace(w.recipe, app_id=bytes(20))
    assert f"the envelope's app_id {names}" in broken(envelope.check, w.receipt, other_app, True).reason
    assert f"the envelope's chain_id {names}" in broken(envelope.check, w.with_chain(chain_id=5), w.recipe,
                                                        True).reason
    assert "neither the event log nor the envelope names the recipe" in broken(envelope.check, w.receipt, None,
                                                                               True).reason


def test_envelope_breaks_on_a_malformed_envelope(w):
    assert broken(envelope.check, w.with_envelope(format="x"), w.recipe, True).reason == \
        "the envelope is not sealroom-result/v1"
    assert broken(envelope.check, w.parsed(envelope_digest="00"), w.recipe, True).reason == \
        "envelope_digest is 1 bytes, not 32"
    assert broken(envelope.check, w.parsed(envelope=[]), w.recipe, True).reason == "envelope is not an object"


# ---- link 7: output -----------------------------------------------------------------------------------------------------------


def output_check(w: World, **inputs):
    defaults = {"receipt": w.receipt, "compose": w.compose, "event_log": w.event_log, "on_chain": w.on_chain}
    return output.check(**(defaults | inputs))


def output_broken(w: World, **inputs) -> Broken:
    with pytest.raises(Broken) as caught:
        output_check(w, **inputs)
    return caught.value


def manifest_with(w: World, **changes) -> ComposeProof:
    return ComposeProof(w.compose.manifest.model_copy(update=changes))


def test_output_holds_within_the_manifest(w):
    held = output_check(w)
    assert held.proven.output_type == "aggregate_stats" == held.facts["output_type"]
    assert dict(held.proven.inputs) == {name: entry["ciphertext_sha256"]
                                        for name, entry in w.raw["envelope"]["inputs"].items()}


def test_output_breaks_without_the_earlier_links_proofs(w):
    assert output_broken(w, compose=None).reason == "cannot be checked: no measured manifest (link 3)"
    assert output_broken(w, event_log=None).reason == \
        "cannot be checked: the inputs the CVM opened are measured in the event log (link 2)"
    assert output_broken(w, on_chain=None).reason == \
        "cannot be checked: ε is spent on-chain and the release was not found (link 4)"
    assert "the release was not found" in output_broken(w, on_chain=OnChainProof(recorded_block=1)).reason


def test_output_breaks_on_another_output_type_or_more_spent_than_allowed(w):
    assert "the manifest allows only dp_model" in output_broken(w, compose=manifest_with(w, output_type="dp_model")
                                                                ).reason
    overspent = output_broken(w, compose=manifest_with(w, epsilon=0.5)).reason
    assert "the analysis spent (ε=" in overspent and "more than the manifest's (ε=0.5" in overspent
    assert "the release spent ε=1 on-chain, not the manifest's 0.5" in overspent
    payload = json.loads(json.dumps(w.raw["envelope"]["payload"]))
    payload["spent"]["delta"] = 0.5
    assert "δ=0.5), more than the manifest's" in output_broken(w, receipt=w.with_envelope(payload=payload)).reason


def test_output_breaks_on_inputs_that_are_not_the_manifests_or_the_measured_ones(w):
    first = w.compose.manifest.inputs[0]
    stranger = Account.create().address
    other_owner = [first.model_copy(update={"owner": stranger}), *w.compose.manifest.inputs[1:]]
    reason = output_broken(w, compose=manifest_with(w, inputs=other_owner)).reason
    assert f"input {first.name!r} names another owner than the manifest" in reason
    assert "the release's owners are not the manifest's input owners" in reason
    pinned = [first.model_copy(update={"ciphertext_sha256": "0" * 64}), *w.compose.manifest.inputs[1:]]
    assert f"input {first.name!r} is not the ciphertext the manifest names" in output_broken(
        w, compose=manifest_with(w, inputs=pinned)).reason
    renamed = dict(w.raw["envelope"]["inputs"])
    renamed["elsewhere"] = renamed.pop(first.name)
    assert "are not the manifest's" in output_broken(w, receipt=w.with_envelope(inputs=renamed)).reason
    measured = [event for event in w.event_log.boot.app_events if event.name != INPUTS_EVENT]
    assert f"holds 0 {INPUTS_EVENT!r} events, not one" in output_broken(
        w, event_log=boot_with(w, app_events=tuple(measured))).reason
    other = RuntimeEvent.measure(INPUTS_EVENT, json.dumps({first.name: "0" * 64}).encode())
    assert "are not the ones the CVM measured" in output_broken(
        w, event_log=boot_with(w, app_events=(*measured, other))).reason


def test_output_breaks_when_the_envelope_and_the_release_disagree(w):
    release = w.on_chain.release
    spent_more = dataclasses.replace(w.on_chain, release=dataclasses.replace(release, epsilon_micro=2_000_000))
    assert "the release spent ε=2 on-chain, not the manifest's 1" in output_broken(w, on_chain=spent_more).reason
    others = dataclasses.replace(w.on_chain, release=dataclasses.replace(release, owners=release.owners[:1]))
    assert "the release's owners are not the manifest's input owners" in output_broken(w, on_chain=others).reason
    budget = dataclasses.replace(w.on_chain, budget_micro=w.on_chain.budget_micro + 1)
    assert "the envelope's ε spent/remaining differ from the chain's record" in output_broken(
        w, on_chain=budget).reason
    assert "envelope.epsilon_spent is not a non-negative number" in output_broken(
        w, receipt=w.with_envelope(epsilon_spent=-1)).reason
