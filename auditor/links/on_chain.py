"""Link 4, ``on-chain``: on the DstackApp whose address is the app_id, at the recorded block, the compose hash
had its k-of-n approvals and was not revoked; who approved (and, with a chain node, when); the release named in
the envelope spent ε for this hash, at or before that block, for owners who had each approved; the budget spent
and left then (and, with a node, now). A revocation after the run is a WARNING, not a failure: the run happened
before.

What held at the recorded block is read from the receipt's storage proofs (``chain.state_proof``, see
:mod:`contracts.storage`), never from a node's word: the block header must hash to a block hash the auditor
trusts — given (``seal verify --block-hash``), or else the chain node's hash of the recorded block — and its state
root leads, through the account proof, to the DstackApp's storage root and code hash. The code must be the
DstackApp the artifact holds (its immutables — threshold, budget — are read from it), and each storage proof gives
one slot. With the block hash given, this link holds with no chain node at all.

A node, when there is one, adds what one block's state cannot show: when each approval was made (its events and
block times), the release's transaction, revocations since the run and the budget now.

The recorded block (``chain.block``) must repeat the block signed into the envelope, and the header proved is that
block's: a receipt cannot be moved to another block.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from eth_utils import keccak, to_checksum_address

from auditor.links.base import (
    Broken,
    Held,
    Notes,
    Recipe,
    chain_errors,
    need_recipe,
    recipe_note,
    same_json,
    thaw,
)
from auditor.receipt import Receipt, StateProof
from auditor.state_proof import ProofError, check_account, check_header, check_storage
from contracts.chain import EPSILON_SCALE, Chain, DstackApp
from contracts.storage import MAX_ITEMS, CodeMismatch, DstackAppSlots, Slot, address_in, byte_at, immutables

__all__ = ["CHECK", "NAME", "NUMBER", "ComposeState", "OnChainProof", "ProvenState", "Release", "check",
           "read_state"]

NUMBER, NAME = 4, "on-chain"
CHECK = "the compose hash was allowed at the recorded block; approvals, release, revocations, budget"

GIVEN, FROM_RPC = "given with --block-hash", "from RPC"


@dataclass(frozen=True)
class Release:
    """The run's key release as the DstackApp recorded it: the owners whose keys it released, the ε it spent
    (micro-epsilon), the budget left right after it, and its block."""

    owners: tuple[str, ...]
    epsilon_micro: int
    remaining_micro: int
    block: int


@dataclass(frozen=True)
class OnChainProof:
    """The recorded block, once the chain bounds it (None before); the release the run spent its ε in and the
    study's ε budget (micro-epsilon), both None until the release is found."""

    recorded_block: int | None
    release: Release | None = None
    budget_micro: int | None = None


@dataclass(frozen=True)
class ComposeState:
    """The compose hash's record at a block, with the (immutable) threshold."""

    proposed: bool
    allowed: bool
    revoked: bool
    approvals: int
    threshold: int

    def describe(self) -> str:
        if self.allowed:
            return f"allowed ({self.approvals} of {self.threshold} approvals)"
        if not self.proposed:
            return "never proposed"
        if self.revoked:
            return "REVOKED"
        return f"not allowed ({self.approvals} of {self.threshold} approvals)"

    def to_json(self) -> dict[str, Any]:
        return {"proposed": self.proposed, "allowed": self.allowed, "revoked": self.revoked,
                "approvals": self.approvals, "threshold": self.threshold}


@dataclass(frozen=True)
class ProvenState:
    """What the storage proofs show at the recorded block (see :func:`read_state`)."""

    block_hash: bytes
    number: int
    timestamp: int
    state_root: bytes
    storage_root: bytes
    code_hash: bytes
    compose: ComposeState
    approvers: tuple[str, ...]
    release: Release
    release_compose_hash: bytes
    budget_micro: int
    spent_micro: int
    slots: int


def check(receipt: Receipt, recipe: Recipe | None, chain: Chain | None,
          block_hash: bytes | None = None) -> Held[OnChainProof]:
    """``recipe``: the app_id (the DstackApp's address) and compose hash to look up; ``chain``: the auditor's
    connection (None when there is none or it cannot be reached); ``block_hash``: the hash of the recorded block
    the auditor trusts (None: take the chain's)."""
    notes = Notes()
    with notes.breaking():
        proof = _check(notes, receipt, recipe, chain, block_hash)
    return notes.held(proof)


def _check(notes: Notes, receipt: Receipt, recipe: Recipe | None, chain: Chain | None,
           block_hash: bytes | None) -> OnChainProof:
    recipe = need_recipe(recipe)
    h = recipe.compose_hash
    recipe_note(notes, recipe)
    recorded = receipt.chain.get()
    chain_id = recorded.chain_id.get()
    if chain is not None and chain_id != chain.chain_id:
        raise Broken(f"the receipt is for chain {chain_id}, but {chain.rpc_url} serves chain {chain.chain_id}")
    address = to_checksum_address(recipe.app_id)
    named = recorded.dstack_app.get()
    if named != address:
        raise Broken(f"chain.dstack_app is {named}, but the CVM was measured with app_id {address} "
                     "(the DstackApp's address is the app_id)")
    block = recorded.block.get()
    signed_block = receipt.envelope.get().block.get()
    if block != signed_block:
        raise Broken(f"chain.block {block} is not the block {signed_block} the CVM signed into the envelope")
    named_release = receipt.envelope.get().release.get()
    release_id = named_release.release_id.get()
    trusted, source, node_hash = _trusted_hash(notes, chain, block, block_hash)
    notes.facts["state_proof"] = {"block_hash": "0x" + trusted.hex(), "trusted": source}
    prefix = f"from storage proofs against block hash 0x{trusted.hex()} (trusted: {source})"
    notes.summary = f"{prefix}: not established"
    try:
        state = read_state(recorded.state_proof.get(), address=recipe.app_id, compose_hash=h, block=block,
                           trusted_block_hash=trusted, release_id=release_id)
    except ProofError as exc:
        raise Broken(f"the storage proofs do not hold against block hash 0x{trusted.hex()} "
                     f"(trusted: {source}): {exc}") from None
    notes.proven = OnChainProof(recorded_block=block)
    then, release = state.compose, state.release
    when = _utc(state.timestamp)
    notes.summary = f"{prefix}: at block {block} ({when}) the compose hash was {then.describe()}"
    notes.facts.update(
        dstack_app=address, recorded_block=block, recorded_block_time=when, at_recorded_block=then.to_json(),
        approvers=list(state.approvers),
        release={"owners": list(release.owners), "epsilon": release.epsilon_micro / EPSILON_SCALE,
                 "block": release.block, "time": None},
        budget={"epsilon_budget": state.budget_micro / EPSILON_SCALE,
                "at_recorded_block": _budget_json(state.budget_micro, state.spent_micro), "now": None},
    )
    notes.facts["state_proof"].update(state_root="0x" + state.state_root.hex(),
                                      storage_root="0x" + state.storage_root.hex(),
                                      code_hash="0x" + state.code_hash.hex(), slots=state.slots)
    if not then.allowed:
        raise Broken(f"at the recorded block {block} the compose hash was {then.describe()}")
    if state.release_compose_hash != h:
        raise Broken(f"release {release_id.hex()} spent the budget of another compose hash")
    if release.block > block:
        notes.problems.append(f"the release was recorded at block {release.block}, after the recorded block")
    not_consenting = sorted(set(release.owners) - set(state.approvers))
    if not_consenting:
        notes.problems.append(f"the release names owners who had not approved: {', '.join(not_consenting)}")
    receipt_approvals = thaw(recorded.approvals.get())
    named_approvers = [a.get("owner") if isinstance(a, dict) else None for a in receipt_approvals]
    if named_approvers != list(state.approvers):
        notes.problems.append("chain.approvals in the receipt name other approvers than the proven storage")
    if chain is None or (node_hash is not None and node_hash != trusted):
        notes.facts.update(approvals=[{**a, "time": None} if isinstance(a, dict) else a for a in receipt_approvals],
                           revocations=None,
                           not_checked="no chain node: approval blocks, times and transactions are the receipt's "
                                       "word; the release's transaction, revocations since the run and the budget "
                                       "now are not checked")
        spent_now = None
    else:
        spent_now = _from_node(notes, chain, address, h, block, state, release_id, named_release.tx.get(),
                               receipt_approvals)
    approvers = ", ".join(_approver(a) for a in notes.facts["approvals"] if isinstance(a, dict))
    budget = f"ε {state.spent_micro / EPSILON_SCALE:g} of {state.budget_micro / EPSILON_SCALE:g} spent then"
    if spent_now is not None:
        budget += f", {spent_now / EPSILON_SCALE:g} now"
    notes.summary = (f"{prefix}: allowed at block {block} ({when}) with {then.approvals}/{then.threshold} "
                     f"approvals: {approvers}; release at block {release.block} spent "
                     f"ε={release.epsilon_micro / EPSILON_SCALE:g}; budget {budget}")
    if chain is None:
        notes.summary += " (no chain node: revocations since the run not checked)"
    return OnChainProof(recorded_block=block, release=release, budget_micro=state.budget_micro)


def _trusted_hash(notes: Notes, chain: Chain | None, block: int,
                  given: bytes | None) -> tuple[bytes, str, bytes | None]:
    """The block hash the proofs are checked against, where it comes from, and the node's hash of the block (None
    without a node). With a node, the block must be on its chain (that bounds it for the later links)."""
    if chain is None:
        if given is None:
            raise Broken("cannot be checked: the chain could not be reached and no block hash was given "
                         "(--block-hash)", unreachable=True)
        return given, GIVEN, None
    with chain_errors(chain, "DstackApp", "the recorded block"):
        latest = chain.w3.eth.block_number
        if not 0 <= block <= latest:
            raise Broken(f"the recorded block {block} is not on this chain (latest is {latest})")
        notes.proven = OnChainProof(recorded_block=block)
        node_hash = bytes(chain.w3.eth.get_block(block)["hash"])
    if given is None:
        return node_hash, FROM_RPC, node_hash
    if node_hash != given:
        notes.problems.append(f"{chain.rpc_url} has block {block} as 0x{node_hash.hex()}, not the given "
                              f"0x{given.hex()}: its events and times are not checked")
    return given, GIVEN, node_hash


def read_state(proof: StateProof, *, address: bytes, compose_hash: bytes, block: int, trusted_block_hash: bytes,
               release_id: bytes, slots: DstackAppSlots | None = None) -> ProvenState:
    """What the state proof shows about the DstackApp at ``address`` at ``block``, checked against the trusted
    block hash; :class:`ProofError` names the first part that does not verify. Explicit inputs only: no chain."""
    slots = slots or DstackAppSlots()
    header = check_header(proof.block_header, trusted_block_hash)
    if header.number != block:
        raise ProofError(f"the block header is block {header.number}, not the recorded block {block}")
    account = check_account(header.state_root, address, proof.account_proof)
    if keccak(proof.code) != account.code_hash:
        raise ProofError(f"the code carried hashes to 0x{keccak(proof.code).hex()}, not the DstackApp's code hash "
                         f"0x{account.code_hash.hex()}")
    try:
        fixed = immutables(proof.code, DstackApp.ARTIFACT)
    except CodeMismatch as exc:
        raise ProofError(f"the code at 0x{address.hex()} is not the DstackApp this auditor knows: {exc}") from None
    values: dict[int, int] = {}

    def read(slot: Slot) -> int:
        if slot.number not in values:
            nodes = proof.storage_proofs.get(slot.number)
            if nodes is None:
                raise ProofError(f"the receipt carries no storage proof of slot 0x{slot.number:064x} ({slot.label})")
            values[slot.number] = check_storage(account.storage_root, slot.number, nodes,
                                                f"the storage proof of slot 0x{slot.number:064x} ({slot.label})")
        return values[slot.number]

    def count(slot: Slot) -> int:
        value = read(slot)
        if value > MAX_ITEMS:
            raise ProofError(f"{slot.label} is {value}, more than this auditor reads ({MAX_ITEMS})")
        return value

    h = bytes(compose_hash)
    index = proof.release_index
    if index >= max(len(proof.storage_proofs), 1) or index >= MAX_ITEMS:
        raise ProofError(f"chain.state_proof.release_index {index} is beyond the releases it proves")
    if read(slots.release_field(index, "releaseId")).to_bytes(32, "big") != release_id:
        raise ProofError(f"release {release_id.hex()} is not recorded on the DstackApp as release #{index} "
                         "(chain.state_proof.release_index)")
    owners = tuple(address_in(read(slots.release_owner(index, i)))
                   for i in range(count(slots.release_field(index, "owners"))))
    spent_through_release = sum(read(slots.release_field(i, "epsilon")) for i in range(index + 1))
    budget = fixed["epsilonBudget"]
    release = Release(owners=owners, epsilon_micro=read(slots.release_field(index, "epsilon")),
                      remaining_micro=budget - spent_through_release,
                      block=read(slots.release_field(index, "blockNumber")))
    flags_slot, proposed_at, revoked_at = slots.compose_flags(h)
    flags = read(flags_slot)
    approvers = tuple(address_in(read(slots.approver(h, i))) for i in range(count(slots.approvers_length(h))))
    proposed, revoked = byte_at(flags, proposed_at) != 0, byte_at(flags, revoked_at) != 0
    threshold = fixed["threshold"]
    compose = ComposeState(proposed=proposed, allowed=proposed and not revoked and len(approvers) >= threshold,
                           revoked=revoked, approvals=len(approvers), threshold=threshold)
    spent = read(slots.epsilon_spent())
    release_compose_hash = read(slots.release_field(index, "composeHash")).to_bytes(32, "big")
    unused = sorted(set(proof.storage_proofs) - set(values))
    if unused:
        raise ProofError("the receipt carries storage proofs this check does not read: "
                         + ", ".join(f"slot 0x{slot:064x}" for slot in unused))
    return ProvenState(block_hash=header.hash, number=header.number, timestamp=header.timestamp,
                       state_root=header.state_root, storage_root=account.storage_root, code_hash=account.code_hash,
                       compose=compose, approvers=approvers, release=release,
                       release_compose_hash=release_compose_hash, budget_micro=budget, spent_micro=spent,
                       slots=len(values))


def _from_node(notes: Notes, chain: Chain, address: str, h: bytes, block: int, state: ProvenState,
               release_id: bytes, release_tx: bytes, receipt_approvals: list) -> int:
    """What the node adds: approval events and times, the release's transaction, revocations since, the budget
    now (returned). Problems where the node's events disagree with the receipt or the proven state."""
    app = DstackApp(chain, address)
    with chain_errors(chain, "DstackApp", address):
        latest = chain.w3.eth.block_number
        approvals = app.approval_events(h, to_block=block)
        logs = app.contract.events.BudgetSpent().get_logs(argument_filters={"releaseId": release_id}, from_block=0)
        spent_now = chain.view(app.ARTIFACT, app.contract, "epsilonSpent")
        revocations = app.contract.events.ComposeHashRevoked().get_logs(
            argument_filters={"composeHash": h}, from_block=0, to_block=latest)
        times = {n: _block_time(chain, n) for n in {state.release.block, *(a["block"] for a in approvals),
                                                     *(log["blockNumber"] for log in revocations)}}
    notes.facts.update(
        approvals=[{"owner": a["owner"], "block": a["block"], "time": times[a["block"]], "tx": a["tx"]}
                   for a in approvals],
        revocations=[{"owner": log["args"]["owner"], "block": log["blockNumber"],
                      "time": times[log["blockNumber"]]} for log in revocations],
    )
    notes.facts["release"]["time"] = times[state.release.block]
    notes.facts["budget"]["now"] = _budget_json(state.budget_micro, spent_now)
    if not same_json(receipt_approvals, approvals):
        notes.problems.append("chain.approvals in the receipt differ from the chain's ComposeHashApproved "
                              f"events up to block {block}")
    if len(logs) != 1 or logs[0]["blockNumber"] != state.release.block:
        notes.problems.append(f"the node's BudgetSpent events do not show release {release_id.hex()} at block "
                              f"{state.release.block}, where the proven storage has it")
    elif bytes(logs[0]["transactionHash"]) != release_tx:
        notes.problems.append(f"release {release_id.hex()} was recorded in another transaction than the envelope "
                              "names")
    for log in revocations:
        notes.warnings.append(
            f"REVOKED AFTER THE RUN: {log['args']['owner']} revoked this compose hash at block "
            f"{log['blockNumber']} ({times[log['blockNumber']]}); the run (block {block}) came before, so its "
            "result stands, but this recipe can never run again")
    return spent_now


def _approver(approval: dict) -> str:
    if approval.get("time") is None:
        return f"{approval.get('owner')} (block {approval.get('block')}, by the receipt)"
    return f"{approval['owner']} (block {approval['block']}, {approval['time']})"


def _utc(timestamp: int) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _block_time(chain: Chain, number: int) -> str:
    return _utc(chain.w3.eth.get_block(number)["timestamp"])


def _budget_json(budget_micro: int, spent_micro: int) -> dict[str, float]:
    return {"epsilon_spent": spent_micro / EPSILON_SCALE,
            "epsilon_remaining": (budget_micro - spent_micro) / EPSILON_SCALE}
