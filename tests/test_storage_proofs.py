"""Receipts outlive the stack (issue 10, part 5): a receipt carries the DstackApp state link 4 relies on as
storage proofs at the recorded block, and `seal verify` checks them against one trusted block hash.

The proof verifier (auditor/state_proof.py) on hand-made tries, both sides; the slot layout against solc's; then
one real SIMULATED study run: link 4 holds from its proofs with no chain node and the right block hash, and fails,
naming the proof, on one changed proof byte, another trusted block hash, a proof of another slot or compose."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import rlp
from eth_utils import keccak
from trie import HexaryTrie
from typer.testing import CliRunner

from auditor.links import on_chain
from auditor.links.base import Broken, Recipe
from auditor.receipt import parse_receipt
from auditor.state_proof import ProofError, check_account, check_header, check_storage
from auditor.verify import LinkStatus, verify_receipt
from contracts.chain import Chain, load_artifact
from contracts.storage import CodeMismatch, DstackAppSlots, fetch_state_proof, immutables, word
from sealing_cli.main import app
from tests.study_world import StudyWorld, build_study_world, start_study_stack

runner = CliRunner()


# ---- the verifier on hand-made tries ----------------------------------------------------------------------------


def storage_trie(values: dict[int, int]) -> HexaryTrie:
    """A storage trie as the EVM keeps one: keccak(slot) -> RLP of the value (zero values absent)."""
    built = HexaryTrie({})
    for slot, value in values.items():
        built.set(keccak(word(slot)), rlp.encode(value))
    return built


def proof_of(built: HexaryTrie, key: bytes) -> list[bytes]:
    """What eth_getProof gives: the nodes on the path to keccak(key), each as RLP."""
    return [rlp.encode(node) for node in built.get_proof(keccak(key))]


def flipped(raw: bytes, position: int | None = None) -> bytes:
    """One bit changed, in the middle by default (inside a hash, so that the node stays RLP)."""
    changed = bytearray(raw)
    changed[len(raw) // 2 if position is None else position] ^= 0x01
    return bytes(changed)


VALUES = {slot: slot * 1_000 + 7 for slot in range(1, 40)}


def test_a_storage_proof_gives_the_value_present_or_absent():
    built = storage_trie(VALUES)
    assert check_storage(built.root_hash, 5, proof_of(built, word(5)), "slot 5") == 5_007
    assert check_storage(built.root_hash, 10**6, proof_of(built, word(10**6)), "slot 10**6") == 0  # shown absent
    empty = HexaryTrie({})
    assert check_storage(empty.root_hash, 0, [b"\x80"], "slot 0") == 0   # eth_getProof's proof in an empty trie


def test_a_changed_node_another_root_or_another_slots_proof_does_not_verify():
    built = storage_trie(VALUES)
    proof = proof_of(built, word(5))
    for index in range(len(proof)):
        with pytest.raises(ProofError, match=r"^slot 5 does not verify against root 0x[0-9a-f]{64}: it lacks the node"):
            check_storage(built.root_hash, 5, [*proof[:index], flipped(proof[index]), *proof[index + 1:]], "slot 5")
    with pytest.raises(ProofError, match="lacks the node"):
        check_storage(storage_trie({**VALUES, 5: 1}).root_hash, 5, proof, "slot 5")   # another trie's root
    others = [slot for slot in VALUES if proof_of(built, word(slot))[1] != proof[1]]
    with pytest.raises(ProofError, match="^slot 5 does not verify"):
        check_storage(built.root_hash, 5, proof_of(built, word(others[0])), "slot 5")  # another slot's path
    with pytest.raises(ProofError, match="^slot 5 does not verify against root 0x[0-9a-f]{64}: a node is not RLP"):
        check_storage(built.root_hash, 5, [b"\xf9\xff", *proof[1:]], "slot 5")


def test_header_and_account_proof_lead_to_the_storage_root_and_code_hash():
    storage = storage_trie(VALUES)
    address, code_hash = bytes.fromhex("5fbdb2315678afecb367f032d93f642f64180aa3"), keccak(b"code")
    state = HexaryTrie({})
    state.set(keccak(address), rlp.encode([1, 0, storage.root_hash, code_hash]))
    for n in range(1, 30):   # other accounts, so that the path has branches
        state.set(keccak(n.to_bytes(20, "big")), rlp.encode([n, n, storage.root_hash, code_hash]))
    fields = [b"\x11" * 32, b"\x22" * 32, b"\x33" * 20, state.root_hash, b"\x44" * 32, b"\x55" * 32, bytes(256),
              b"", (42).to_bytes(1, "big"), b"\x01\xc9\xc3\x80", b"", (1_800_000_000).to_bytes(4, "big"), b"",
              bytes(32), bytes(8), b"\x07"]
    block_hash = keccak(rlp.encode(fields))
    header = check_header(fields, block_hash)
    assert (header.number, header.state_root, header.timestamp) == (42, state.root_hash, 1_800_000_000)
    account = check_account(header.state_root, address, proof_of(state, address))
    assert (account.nonce, account.storage_root, account.code_hash) == (1, storage.root_hash, code_hash)

    with pytest.raises(ProofError, match=f"the block header hashes to 0x{block_hash.hex()}, not the trusted"):
        check_header(fields, keccak(b"another block"))
    with pytest.raises(ProofError, match="hashes to"):
        check_header([*fields[:11], (1_800_000_001).to_bytes(4, "big"), *fields[12:]], block_hash)
    with pytest.raises(ProofError, match="has 14 fields"):
        check_header(fields[:14], block_hash)
    with pytest.raises(ProofError, match=f"^the account proof of 0x{address.hex()} does not verify"):
        check_account(state.root_hash, address, [flipped(node) for node in proof_of(state, address)])
    stranger = b"\x99" * 20
    with pytest.raises(ProofError, match="shows no account at that address"):
        check_account(state.root_hash, stranger, proof_of(state, stranger))


def test_the_slot_layout_is_solcs():
    """The layout `forge inspect DstackApp storageLayout` prints, as the artifact carries it, and the slots."""
    layout = load_artifact("DstackApp")["storageLayout"]
    assert {name: item["slot"] for name, item in layout["storage"].items()} == {
        "epsilonSpent": 0, "_owners": 1, "isOwner": 2, "_composeHashes": 3, "_approved": 4, "_releases": 5,
        "_releaseRecorded": 6}
    assert {name: (item["slot"], item["offset"]) for name, item in layout["structs"]["ComposeHashRecord"].items()} \
        == {"proposed": (0, 0), "revoked": (0, 1), "uri": (1, 0), "approvers": (2, 0)}
    assert {name: item["slot"] for name, item in layout["structs"]["Release"].items()} == {
        "releaseId": 0, "composeHash": 1, "owners": 2, "epsilon": 3, "blockNumber": 4}
    slots, h = DstackAppSlots(), bytes(range(32))
    record = int.from_bytes(keccak(h + word(3)), "big")
    releases = int.from_bytes(keccak(word(5)), "big")
    assert slots.epsilon_spent().number == 0
    assert slots.compose_flags(h) == (slots.compose_flags(h)[0], 0, 1) and slots.compose_flags(h)[0].number == record
    assert slots.approvers_length(h).number == record + 2
    assert slots.approver(h, 1).number == int.from_bytes(keccak(word(record + 2)), "big") + 1
    assert slots.release_field(2, "epsilon").number == releases + 5 * 2 + 3
    assert slots.release_owner(2, 1).number == int.from_bytes(keccak(word(releases + 5 * 2 + 2)), "big") + 1


def test_immutables_are_read_from_the_code_and_other_code_is_refused():
    compiled = load_artifact("DstackApp")
    code = bytearray.fromhex(compiled["deployedBytecode"][2:])
    values = {"threshold": 2, "epsilonBudget": 2_000_000, "kmsSigner": 0xAB, "requireTcbUpToDate": 1}
    for name, ranges in compiled["immutableReferences"].items():
        for start, length in ranges:
            code[start:start + length] = values[name].to_bytes(length, "big")
    assert immutables(bytes(code)) == values
    with pytest.raises(CodeMismatch, match="differs from the DstackApp runtime code at byte 0"):
        immutables(flipped(bytes(code), 0))
    start, length = compiled["immutableReferences"]["threshold"][0]
    twice = bytearray(code)
    twice[start + length - 1] = 3
    with pytest.raises(CodeMismatch, match="several values for the immutable threshold"):
        immutables(bytes(twice))
    with pytest.raises(CodeMismatch, match="bytes long"):
        immutables(bytes(code) + b"\0")


# ---- a real run's receipt -----------------------------------------------------------------------------------------


@dataclass
class Run:
    world: StudyWorld
    chain: Chain
    receipt: dict
    block_hash: bytes
    recipe: Recipe

    def link4(self, receipt: dict | None = None, *, chain: Chain | None = None, block_hash: bytes | None = None,
              recipe: Recipe | None = None):
        return on_chain.check(parse_receipt(receipt or self.receipt), recipe or self.recipe, chain,
                              block_hash if block_hash is not None or chain is not None else self.block_hash)

    def broken(self, receipt: dict | None = None, **options) -> str:
        with pytest.raises(Broken) as caught:
            self.link4(receipt, **options)
        return caught.value.reason

    def slot_index(self, slot: int) -> int:
        return next(i for i, item in enumerate(self.receipt["chain"]["state_proof"]["storage_proofs"])
                    if int(item["slot"], 16) == slot)

    def with_proof(self, change) -> dict:
        receipt = copy.deepcopy(self.receipt)
        change(receipt["chain"]["state_proof"])
        return receipt


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    with start_study_stack(tmp_path_factory.mktemp("storage-proofs")) as stack:
        world = build_study_world(stack)
        with Chain(stack.description.rpc_url) as chain:
            receipt = world.receipt
            block_hash = bytes(chain.w3.eth.get_block(receipt["chain"]["block"])["hash"])
            yield Run(world, chain, receipt, block_hash, Recipe(world.study.app_id, world.compose_hash, True))


def hex_flipped(text: str) -> str:
    return "0x" + flipped(bytes.fromhex(text[2:])).hex()


def test_the_receipt_carries_the_proofs_and_link_4_holds_from_them_without_a_node(run):
    proof = run.receipt["chain"]["state_proof"]
    assert set(proof) == {"block_header", "account_proof", "code", "release_index", "storage_proofs"}
    assert keccak(rlp.encode([bytes.fromhex(f[2:]) for f in proof["block_header"]])) == run.block_hash
    held = run.link4()
    facts = held.facts
    assert held.summary.startswith(f"from storage proofs against block hash 0x{run.block_hash.hex()} "
                                   "(trusted: given with --block-hash): allowed at block")
    assert facts["at_recorded_block"] == {"proposed": True, "allowed": True, "revoked": False, "approvals": 2,
                                          "threshold": 2}
    assert set(facts["approvers"]) == {o.address for o in run.world.owners.values()}
    assert facts["budget"]["at_recorded_block"] == {"epsilon_spent": 1.0, "epsilon_remaining": 1.0}
    assert facts["budget"]["now"] is None and facts["revocations"] is None and "no chain node" in facts["not_checked"]
    assert held.proven.release.epsilon_micro == 1_000_000 and held.proven.budget_micro == 2_000_000
    assert held.proven.release.remaining_micro == 1_000_000
    assert set(held.proven.release.owners) == set(facts["approvers"])
    assert facts["state_proof"]["slots"] == len(proof["storage_proofs"])

    report = verify_receipt(run.receipt, now=int(time.time()), chain=None, block_hash="0x" + run.block_hash.hex(),
                            allow_simulated=True, simulated_root_der=run.world.simulated_root_der)
    assert report.link("on-chain").status is LinkStatus.OK
    assert [link.number for link in report.links if not link.holds] == [5]   # DstackKms needs a node


def test_with_a_node_and_no_block_hash_the_proofs_are_checked_against_the_nodes_hash(run):
    held = run.link4(chain=run.chain)
    assert f"block hash 0x{run.block_hash.hex()} (trusted: from RPC)" in held.summary
    assert held.facts["budget"]["now"] is not None and held.facts["revocations"] == []
    tampered = run.with_proof(lambda p: p["storage_proofs"][0]["proof"].__setitem__(
        -1, hex_flipped(p["storage_proofs"][0]["proof"][-1])))
    assert "(trusted: from RPC): the storage proof of slot" in run.broken(tampered, chain=run.chain)
    other = run.broken(chain=run.chain, block_hash=keccak(b"another block"))
    assert "not the given" in other and "hashes to" in other


@pytest.mark.parametrize("part", ["storage", "account", "header", "code"])
def test_one_changed_proof_byte_breaks_link_4_naming_the_proof(run, part):
    slots = DstackAppSlots()
    spent = slots.epsilon_spent().number

    def change(proof):
        if part == "storage":
            nodes = proof["storage_proofs"][run.slot_index(spent)]["proof"]
            nodes[1] = hex_flipped(nodes[1])
        elif part == "account":
            proof["account_proof"][-1] = hex_flipped(proof["account_proof"][-1])
        elif part == "header":
            proof["block_header"][3] = hex_flipped(proof["block_header"][3])   # the state root
        else:
            proof["code"] = hex_flipped(proof["code"])

    reason = run.broken(run.with_proof(change))
    assert reason.startswith(f"the storage proofs do not hold against block hash 0x{run.block_hash.hex()} "
                             "(trusted: given with --block-hash): ")
    expected = {
        "storage": f"the storage proof of slot 0x{spent:064x} (epsilonSpent) does not verify against root",
        "account": f"the account proof of {run.receipt['chain']['dstack_app'].lower()} does not verify",
        "header": "the block header hashes to 0x",
        "code": "the code carried hashes to 0x",
    }[part]
    assert expected in reason


def test_another_trusted_block_hash_breaks_link_4(run):
    earlier = bytes(run.chain.w3.eth.get_block(run.receipt["chain"]["block"] - 1)["hash"])
    reason = run.broken(block_hash=earlier)
    assert f"the block header hashes to 0x{run.block_hash.hex()}, not the trusted block hash 0x{earlier.hex()}" \
        in reason


def test_a_proof_of_another_slot_substituted_breaks_link_4(run):
    slots = DstackAppSlots()
    flags, spent = slots.compose_flags(run.world.compose_hash)[0].number, slots.epsilon_spent().number

    def swap(proof):
        items = proof["storage_proofs"]
        a, b = items[run.slot_index(flags)], items[run.slot_index(spent)]
        a["proof"], b["proof"] = b["proof"], a["proof"]

    reason = run.broken(run.with_proof(swap))
    assert f"the storage proof of slot 0x{flags:064x} (_composeHashes[0x{run.world.compose_hash.hex()}]" \
           ".proposed/revoked) does not verify against root" in reason


def test_a_proof_for_another_compose_hash_breaks_link_4(run):
    other = keccak(b"another recipe")
    slots = DstackAppSlots()
    flags, other_flags = slots.compose_flags(run.world.compose_hash)[0], slots.compose_flags(other)[0]
    # The chain's own (exclusion) proof of the other compose hash's slot, at the same block, put in this one's place.
    answer = run.chain.w3.provider.make_request("eth_getProof", [
        run.receipt["chain"]["dstack_app"], ["0x" + other_flags.key.hex()], hex(run.receipt["chain"]["block"])])
    substituted = answer["result"]["storageProof"][0]["proof"]
    receipt = run.with_proof(lambda p: p["storage_proofs"][run.slot_index(flags.number)].__setitem__(
        "proof", substituted))
    assert f"the storage proof of slot 0x{flags.number:064x} (_composeHashes[0x{run.world.compose_hash.hex()}]" \
           ".proposed/revoked) does not verify" in run.broken(receipt)
    # And a recipe of another compose hash finds no proof of its slots in this receipt.
    reason = run.broken(recipe=Recipe(run.world.study.app_id, other, True))
    assert (f"the receipt carries no storage proof of slot 0x{other_flags.number:064x} "
            f"(_composeHashes[0x{other.hex()}].proposed/revoked)") in reason


def test_what_the_receipt_cannot_slip_in(run):
    # A proof the check does not read, a release index that is not the run's, a header of another block.
    owners = run.chain.w3.provider.make_request("eth_getProof", [
        run.receipt["chain"]["dstack_app"], ["0x" + word(1).hex()], hex(run.receipt["chain"]["block"])])
    extra = run.with_proof(lambda p: p["storage_proofs"].append(
        {"slot": "0x" + word(1).hex(), "proof": owners["result"]["storageProof"][0]["proof"]}))
    assert f"storage proofs this check does not read: slot 0x{1:064x}" in run.broken(extra)
    other_index = run.with_proof(lambda p: p.__setitem__("release_index", 1))
    assert "no storage proof of slot" in run.broken(other_index)
    moved = {**run.receipt, "chain": {**run.receipt["chain"], "block": run.receipt["chain"]["block"] - 1},
             "envelope": {**run.receipt["envelope"], "block": run.receipt["chain"]["block"] - 1}}
    assert "hashes to" in run.broken(moved, chain=run.chain)   # the node's hash of that block is another


def test_fresh_proofs_at_a_later_block_after_a_revocation_show_it_revoked(run):
    world, chain = run.world, run.chain
    snapshot = chain.w3.provider.make_request("evm_snapshot", [])["result"]
    try:
        world.study.revoke(world.compose_hash, world.owners["B"])
        later = chain.w3.eth.block_number
        release_id = run.receipt["envelope"]["release"]["release_id"]
        proof = fetch_state_proof(chain, run.receipt["chain"]["dstack_app"], block=later,
                                  compose_hash=world.compose_hash, release_id=release_id)
        later_hash = bytes(chain.w3.eth.get_block(later)["hash"])
    finally:
        assert chain.w3.provider.make_request("evm_revert", [snapshot])["result"] is True
    moved = {**run.receipt, "chain": {**run.receipt["chain"], "block": later, "state_proof": proof},
             "envelope": {**run.receipt["envelope"], "block": later}}
    with pytest.raises(Broken) as caught:
        run.link4(moved, block_hash=later_hash)
    assert caught.value.reason == f"at the recorded block {later} the compose hash was REVOKED"
    assert caught.value.summary.startswith(f"from storage proofs against block hash 0x{later_hash.hex()} "
                                           f"(trusted: given with --block-hash): at block {later} (")


def test_cli_verifies_link_4_with_no_rpc_and_a_block_hash(run):
    path = Path(run.world.receipt_path)
    args = ["verify", str(path), "--allow-simulated", "--state-dir", str(run.world.stack.state_dir)]
    result = runner.invoke(app, [*args, "--no-rpc", "--block-hash", "0x" + run.block_hash.hex(), "--json"])
    report = json.loads(result.stdout)
    link4 = next(link for link in report["links"] if link["link"] == 4)
    assert link4["status"] == "ok" and "(trusted: given with --block-hash)" in link4["summary"]
    assert result.exit_code == 3 and report["first_failure"]["link"] == 5   # DstackKms needs a node
    text = runner.invoke(app, [*args, "--no-rpc", "--block-hash", "0x" + run.block_hash.hex()])
    assert any("✔ ok" in line and "4 on-chain" in line for line in text.stdout.splitlines())
    wrong = runner.invoke(app, [*args, "--no-rpc", "--block-hash", "0x" + keccak(b"x").hex()])
    assert wrong.exit_code == 1 and "error: link 4 (on-chain) is broken: the storage proofs do not hold" in wrong.stderr
    assert runner.invoke(app, [*args, "--no-rpc"]).exit_code == 2
    assert runner.invoke(app, [*args, "--block-hash", "0x12"]).exit_code == 2
