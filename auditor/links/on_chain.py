"""Link 4, ``on-chain``: on the DstackApp whose address is the app_id, at the recorded block, the compose hash
had its k-of-n approvals and was not revoked; who approved and when; the release (BudgetSpent) named in the
envelope spent ε for this hash, at or before that block, for owners who had each approved; the budget spent and
left then and now. A revocation after the run is a WARNING, not a failure: the run happened before.

The recorded block (``chain.block``) must repeat the block signed into the envelope, and the chain bounds it:
not before the release, not after the head.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from eth_utils import to_checksum_address

from auditor.links.base import (
    Broken,
    Held,
    Notes,
    Recipe,
    chain_errors,
    need_chain,
    need_recipe,
    recipe_note,
    same_json,
)
from auditor.receipt import Receipt
from contracts.chain import EPSILON_SCALE, Chain, DstackApp

__all__ = ["CHECK", "NAME", "NUMBER", "ComposeState", "OnChainProof", "Release", "check"]

NUMBER, NAME = 4, "on-chain"
CHECK = "the compose hash was allowed at the recorded block; approvals, release, revocations, budget"


@dataclass(frozen=True)
class Release:
    """The DstackApp's BudgetSpent record of the run's key release."""

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


def check(receipt: Receipt, recipe: Recipe | None, chain: Chain | None) -> Held[OnChainProof]:
    """``recipe``: the app_id (the DstackApp's address) and compose hash to look up; ``chain``: the auditor's
    connection (None when it cannot be reached)."""
    notes = Notes()
    with notes.breaking():
        proof = _check(notes, receipt, recipe, chain)
    return notes.held(proof)


def _check(notes: Notes, receipt: Receipt, recipe: Recipe | None, chain: Chain | None) -> OnChainProof:
    recipe = need_recipe(recipe)
    h = recipe.compose_hash
    recipe_note(notes, recipe)
    recorded = receipt.chain.get()
    chain = need_chain(chain)
    chain_id = recorded.chain_id.get()
    if chain_id != chain.chain_id:
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
    app = DstackApp(chain, address)
    with chain_errors(chain, "DstackApp", address):
        latest = chain.w3.eth.block_number
        if not 0 <= block <= latest:
            raise Broken(f"the recorded block {block} is not on this chain (latest is {latest})")
        notes.proven = OnChainProof(recorded_block=block)
        then = ComposeState.read(chain, app, h, block)
        approvals = app.approval_events(h, to_block=block)
        release = _release(receipt, app, h)
        budget_micro = chain.view(app.ARTIFACT, app.contract, "epsilonBudget", block=block)
        spent_then = chain.view(app.ARTIFACT, app.contract, "epsilonSpent", block=block)
        spent_now = chain.view(app.ARTIFACT, app.contract, "epsilonSpent")
        revocations = app.contract.events.ComposeHashRevoked().get_logs(
            argument_filters={"composeHash": h}, from_block=0, to_block=latest)
        times = {n: _block_time(chain, n) for n in {block, release.block, *(a["block"] for a in approvals),
                                                     *(log["blockNumber"] for log in revocations)}}
    notes.facts.update(
        dstack_app=address, recorded_block=block, recorded_block_time=times[block],
        at_recorded_block=then.to_json(),
        approvals=[{"owner": a["owner"], "block": a["block"], "time": times[a["block"]], "tx": a["tx"]}
                   for a in approvals],
        release={"owners": list(release.owners), "epsilon": release.epsilon_micro / EPSILON_SCALE,
                 "block": release.block, "time": times[release.block]},
        budget={"epsilon_budget": budget_micro / EPSILON_SCALE,
                "at_recorded_block": _budget_json(budget_micro, spent_then),
                "now": _budget_json(budget_micro, spent_now)},
        revocations=[{"owner": log["args"]["owner"], "block": log["blockNumber"],
                      "time": times[log["blockNumber"]]} for log in revocations],
    )
    if not then.allowed:
        raise Broken(f"at the recorded block {block} the compose hash was {then.describe()}")
    if not same_json(recorded.approvals.get(), approvals):
        notes.problems.append("chain.approvals in the receipt differ from the chain's ComposeHashApproved "
                              f"events up to block {block}")
    if release.block > block:
        notes.problems.append(f"the release was recorded at block {release.block}, after the recorded block")
    not_consenting = sorted(set(release.owners) - {approval["owner"] for approval in approvals})
    if not_consenting:
        notes.problems.append(f"the release names owners who had not approved: {', '.join(not_consenting)}")
    approvers = ", ".join(f"{a['owner']} (block {a['block']}, {times[a['block']]})" for a in approvals)
    notes.summary = (f"allowed at block {block} ({times[block]}) with {then.approvals}/{then.threshold} "
                     f"approvals: {approvers}; release at block {release.block} spent "
                     f"ε={release.epsilon_micro / EPSILON_SCALE:g}; budget ε {spent_now / EPSILON_SCALE:g} "
                     f"of {budget_micro / EPSILON_SCALE:g} spent now")
    for log in revocations:
        notes.warnings.append(
            f"REVOKED AFTER THE RUN: {log['args']['owner']} revoked this compose hash at block "
            f"{log['blockNumber']} ({times[log['blockNumber']]}); the run (block {block}) came before, so its "
            "result stands, but this recipe can never run again")
    return OnChainProof(recorded_block=block, release=release, budget_micro=budget_micro)


def _release(receipt: Receipt, app: DstackApp, h: bytes) -> Release:
    named = receipt.envelope.get().release.get()
    release_id = named.release_id.get()
    tx = named.tx.get()
    logs = app.contract.events.BudgetSpent().get_logs(argument_filters={"releaseId": release_id}, from_block=0)
    if len(logs) != 1:
        raise Broken(f"release {release_id.hex()} is not recorded on the DstackApp {app.address}")
    log = logs[0]
    if bytes(log["transactionHash"]) != tx:
        raise Broken(f"release {release_id.hex()} was recorded in another transaction than the envelope names")
    if bytes(log["args"]["composeHash"]) != h:
        raise Broken(f"release {release_id.hex()} spent the budget of another compose hash")
    return Release(owners=tuple(to_checksum_address(o) for o in log["args"]["owners"]),
                   epsilon_micro=log["args"]["epsilon"], remaining_micro=log["args"]["remaining"],
                   block=log["blockNumber"])


@dataclass(frozen=True)
class ComposeState:
    """DstackApp.composeHashState at a block, with the (immutable) threshold."""

    proposed: bool
    allowed: bool
    revoked: bool
    approvals: int
    threshold: int

    @classmethod
    def read(cls, chain: Chain, app: DstackApp, h: bytes, block: int) -> ComposeState:
        proposed, allowed, revoked, approvals, _uri = chain.view(app.ARTIFACT, app.contract, "composeHashState", h,
                                                                 block=block)
        threshold = chain.view(app.ARTIFACT, app.contract, "threshold")  # immutable: the same at every block
        return cls(proposed, allowed, revoked, approvals, threshold)

    def describe(self) -> str:
        if not self.proposed:
            return "never proposed"
        if self.revoked:
            return "REVOKED"
        return f"not allowed ({self.approvals} of {self.threshold} approvals)"

    def to_json(self) -> dict[str, Any]:
        return {"proposed": self.proposed, "allowed": self.allowed, "revoked": self.revoked,
                "approvals": self.approvals, "threshold": self.threshold}


def _block_time(chain: Chain, number: int) -> str:
    timestamp = chain.w3.eth.get_block(number)["timestamp"]
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _budget_json(budget_micro: int, spent_micro: int) -> dict[str, float]:
    return {"epsilon_spent": spent_micro / EPSILON_SCALE,
            "epsilon_remaining": (budget_micro - spent_micro) / EPSILON_SCALE}
