"""The auditor's mutation suite: a tampered copy of a real receipt fails at the link that reads the tampered part.

Every field of attestation.json (tweaked and removed), every field of every event-log entry, every region of the
quote and every byte of the signatures. One SIMULATED study run per module; each copy is verified in-process.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from auditor.verify import NotAReceipt, VerificationReport, verify_receipt
from contracts.chain import Chain
from cvm.attest.eventlog import RuntimeEvent
from cvm.attest.tdx_quote import parse_quote_unverified
from cvm.labels import INPUTS_EVENT
from tests.study_world import build_study_world, start_study_stack

FieldPath = tuple[Any, ...]

# Where a tamper must first break the chain, by the field's path (the longest matching prefix wins). The envelope
# is covered by the signed and quoted digest (link 6), except the release it names, which link 4 looks up first.
FIRST_BROKEN: dict[FieldPath, int] = {
    ("simulated",): 1, ("collateral",): 1, ("quote",): 1,
    ("event_log",): 2,
    ("app_compose",): 3,
    ("chain",): 4, ("envelope", "release"): 4, ("envelope", "block"): 4,
    ("chain", "dstack_kms"): 5, ("chain", "kms_root_address"): 5, ("envelope_digest",): 5, ("signature",): 5,
    ("envelope",): 6,
}


def expected_link(path: FieldPath) -> int:
    if path == ("envelope",):
        return 4  # without an envelope there is no release to find on-chain, and link 4 reads it first
    return FIRST_BROKEN[max((p for p in FIRST_BROKEN if path[: len(p)] == p), key=len)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    with start_study_stack(tmp_path_factory.mktemp("verify-mutations")) as stack:
        world = build_study_world(stack)
        d = stack.description
        with Chain(d.rpc_url) as chain:
            options = {"now": int(time.time()), "chain": chain, "kms_root": d.services["kms"]["root_address"],
                       "allow_simulated": True, "simulated_root_der": world.simulated_root_der}

            def verify(receipt: dict, *, offline: bool = False) -> VerificationReport:
                return verify_receipt(receipt, **(options | {"chain": None} if offline else options))

            yield world.receipt, verify, chain


def tweak(value: Any) -> Any:
    """Another value, of the same JSON kind where there is one (hex text stays hex of the same length)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if value is None:
        return {}
    digits = value.removeprefix("0x")
    if digits and all(c in "0123456789abcdefABCDEF" for c in digits):
        return value[:-1] + ("1" if value[-1] == "0" else "0")
    return value + "x"


def leaves(node: Any, path: FieldPath = ()) -> Iterator[FieldPath]:
    if isinstance(node, dict):
        for key, child in node.items():
            yield from leaves(child, path + (key,))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from leaves(child, path + (index,))
    else:
        yield path


def keys(node: Any, path: FieldPath = ()) -> Iterator[FieldPath]:
    """Every key of every object (and every list item), outermost first."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield path + (key,)
        yield from keys(child, path + (key,))


def value_at(node: Any, path: FieldPath) -> Any:
    for step in path:
        node = node[step]
    return node


def mutated(receipt: dict, path: FieldPath, change: Callable[[Any, Any], None]) -> dict:
    copied = copy.deepcopy(receipt)
    parent = copied
    for step in path[:-1]:
        parent = parent[step]
    change(parent, path[-1])
    return copied


def set_tweaked(parent: Any, key: Any) -> None:
    parent[key] = tweak(parent[key])


def delete(parent: Any, key: Any) -> None:
    del parent[key]


def outcome(verify, receipt: dict) -> int | str:
    """The number of the first broken link, "passed", or "not a receipt"."""
    try:
        first = verify(receipt).first_failure
    except NotAReceipt:
        return "not a receipt"
    return "passed" if first is None else first.number


def check_all(verify, cases: list[tuple[str, dict, int | str]]) -> None:
    wrong = [f"{label}: expected {expected}, got {got}" for label, receipt, expected in cases
             if (got := outcome(verify, receipt)) != expected]
    assert not wrong, "\n".join(wrong)


def check_all_offline(verify, cases: list[tuple[str, dict, int]]) -> None:
    """For links before the chain's (1-3): with no chain, links 4-5 fail as unreachable, yet the first
    broken link must still be the expected one."""
    assert all(expected < 4 for _label, _receipt, expected in cases)
    wrong = [f"{label}: expected {expected}, got {got}" for label, receipt, expected in cases
             if (got := outcome(lambda r: verify(r, offline=True), receipt)) != expected]
    assert not wrong, "\n".join(wrong)


def test_the_untampered_receipt_passes(run):
    receipt, verify, _chain = run
    assert verify(receipt).ok


def test_every_field_tweaked_breaks_its_link(run):
    receipt, verify, _chain = run
    paths = [p for p in leaves(receipt) if p != ("chain", "block")]  # the recorded block: see the test below
    assert len(paths) > 50
    cases = [(".".join(map(str, p)), mutated(receipt, p, set_tweaked),
              "not a receipt" if p == ("format",) else expected_link(p)) for p in paths]
    check_all(verify, cases)


def test_every_number_of_another_json_kind_breaks_its_link(run):
    # Python holds True == 1 == 1.0; a receipt does not: 1 -> 1.0, and 0/1 -> false/true, are tampers too.
    receipt, verify, _chain = run
    numbers = [p for p in leaves(receipt) if type(value_at(receipt, p)) is int]
    cases = []
    for path in numbers:
        value = value_at(receipt, path)
        others = [float(value)] + ([bool(value)] if value in (0, 1) else [])
        for other in others:
            cases.append((f"{'.'.join(map(str, path))} = {other!r}",
                          mutated(receipt, path, lambda parent, key, other=other: parent.__setitem__(key, other)),
                          expected_link(path)))
    assert any(case[0].startswith("chain.approvals.0.approvals = True") for case in cases)
    check_all(verify, cases)


def test_every_field_removed_breaks_its_link(run):
    receipt, verify, _chain = run
    paths = list(keys(receipt))
    cases = [("-" + ".".join(map(str, p)), mutated(receipt, p, delete),
              "not a receipt" if p == ("format",) else expected_link(p)) for p in paths]
    check_all(verify, cases)


def test_every_event_log_entry_field_breaks_link_2(run):
    receipt, verify, _chain = run
    entries = json.loads(receipt["event_log"])

    def with_entries(changed: list) -> dict:
        return {**receipt, "event_log": json.dumps(changed)}

    cases = []
    for index, entry in enumerate(entries):
        # An RTMR0-2 entry binds only its digest (and its register): its name, type and payload are labels that
        # dstack strips or never hashes, so changing one changes nothing a check relies on. RTMR3 binds them all.
        fields = ["imr", "digest"] if entry["imr"] < 3 else list(entry)
        for name in fields:
            changed = copy.deepcopy(entries)
            changed[index][name] = tweak(entry[name]) if entry[name] != "" else "00"
            cases.append((f"event_log[{index}].{name}", with_entries(changed), 2))
        without = entries[:index] + entries[index + 1:]
        cases.append((f"event_log without entry {index}", with_entries(without), 2))
    swapped = copy.deepcopy(entries)
    swapped[4], swapped[5] = swapped[5], swapped[4]  # app-id and compose-hash, in the wrong order
    cases.append(("app-id and compose-hash swapped", with_entries(swapped), 2))
    extra = entries + [RuntimeEvent.measure(INPUTS_EVENT, b"{}").to_entry()]
    cases.append(("a well-formed app event that was never measured", with_entries(extra), 2))
    check_all(verify, cases)


def test_firmware_entry_labels_are_not_bound(run):
    # The limit stated above, asserted so that it is known: label-only changes to an RTMR0-2 entry pass.
    receipt, verify, _chain = run
    entries = json.loads(receipt["event_log"])
    entries[0].update(event="relabelled", event_type=entries[0]["event_type"] + 1, event_payload="00")
    assert verify({**receipt, "event_log": json.dumps(entries)}).ok


def test_the_recorded_block_is_bounded_by_the_chain(run):
    receipt, verify, chain = run
    approvals = receipt["chain"]["approvals"]
    release_block = verify(receipt).link("on-chain").facts["release"]["block"]

    def at(block: int) -> VerificationReport:
        # Both places that name the block (the envelope's copy is signed: link 6 breaks too, later).
        return verify({**receipt, "chain": {**receipt["chain"], "block": block},
                       "envelope": {**receipt["envelope"], "block": block}})

    # The receipt's state proofs are of its block: at any other block, the header is not that block's.
    before_threshold = at(approvals[0]["block"]).link("on-chain")
    assert before_threshold.status == "failed" and "the block header hashes to" in before_threshold.reason
    before_release = at(release_block - 1).link("on-chain")
    assert before_release.status == "failed" and "the block header hashes to" in before_release.reason
    beyond = at(10**9).link("on-chain")
    assert beyond.status == "failed" and "is not on this chain" in beyond.reason
    # The block is signed into the envelope: chain.block alone cannot be moved, and moving both to a block where
    # the chain says the same thing breaks link 4 (the header) and the digest the quote binds (link 6).
    chain.w3.provider.make_request("evm_mine", [])
    later = receipt["chain"]["block"] + 1
    alone = verify({**receipt, "chain": {**receipt["chain"], "block": later}}).first_failure
    assert alone.number == 4 and "the CVM signed into the envelope" in alone.reason
    both = at(later)
    assert "the block header hashes to" in both.link("on-chain").reason and not both.link("envelope").holds


def quote_positions(quote: bytes) -> list[int]:
    """Both edges and the middle of every region of the quote, plus a stride through all of it."""
    parsed = parse_quote_unverified(quote)
    regions = [parsed.quote_signature, parsed.attestation_key, parsed.qe_report.raw, parsed.qe_report_signature,
               parsed.qe_auth_data, parsed.pck_cert_chain_pem]
    edges = {0, 47, 48, 631, 632, 635, len(quote) - 1}  # header, TD report body, signature-data length
    for region in filter(None, regions):
        start = quote.index(region)
        edges |= {start - 1, start, start + len(region) // 2, start + len(region) - 1}
    return sorted(edges | set(range(0, len(quote), 41)))


def test_every_region_of_the_quote_breaks_link_1(run):
    receipt, verify, _chain = run
    quote = bytes.fromhex(receipt["quote"])
    cases = []
    for position in quote_positions(quote):
        tampered = bytearray(quote)
        tampered[position] ^= 0x01
        cases.append((f"quote byte {position}", {**receipt, "quote": tampered.hex()}, 1))
    assert len(cases) > 90
    check_all_offline(verify, cases)


def flipped(hex_text: str, position: int) -> str:
    raw = bytearray(bytes.fromhex(hex_text))
    raw[position] ^= 0x01
    return raw.hex()


def test_every_byte_of_the_signatures_breaks_link_5(run):
    receipt, verify, _chain = run
    signature = receipt["signature"]
    cases = []

    def case(label: str, **changes: Any) -> None:
        cases.append((label, {**receipt, "signature": {**signature, **changes}}, 5))

    message, app_key, kms = signature["signature_chain"]
    for position in range(len(message) // 2):  # the message signature sits twice in dstack's Sign result
        changed = flipped(message, position)
        case(f"message signature byte {position}", signature=changed, signature_chain=[changed, app_key, kms])
    for position in range(len(app_key) // 2):
        case(f"app-key signature byte {position}", signature_chain=[message, flipped(app_key, position), kms])
    for position in range(len(kms) // 2):
        case(f"KMS signature byte {position}", signature_chain=[message, app_key, flipped(kms, position)])
    for position in range(len(signature["public_key"]) // 2):
        case(f"public key byte {position}", public_key=flipped(signature["public_key"], position))
    assert len(cases) == 64 + 65 + 65 + 33
    check_all(verify, cases)


def test_a_broken_signature_is_named_by_its_link(run):
    receipt, verify, _chain = run
    signature = receipt["signature"]
    message, app_key, kms = signature["signature_chain"]

    def reason(**changes: Any) -> str:
        return verify({**receipt, "signature": {**signature, **changes}}).link("signature-chain").reason

    changed = flipped(message, 10)
    assert "breaks at its message link" in reason(signature=changed, signature_chain=[changed, app_key, kms])
    assert "not the first signature" in reason(signature=changed)
    # A changed s still recovers a key (a changed r may not): someone else's, so the root is not the pinned one.
    assert "not the pinned KMS root" in reason(signature_chain=[message, flipped(app_key, 40), kms])
    assert "not the pinned KMS root" in reason(signature_chain=[message, app_key, flipped(kms, 40)])
