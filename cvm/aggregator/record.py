"""The signed round record: its payload, verifying a published one, and continuing the next round from it.

A round publishes its :class:`~cvm.federated.RoundRecord` and the accountant state after it as the payload
(:func:`round_payload`, ``output_type`` ``round_record``) of a ``sealroom-result/v1`` envelope, signed and quoted
(``cvm.receipt``). :func:`verify_round_attestation` checks one from its raw evidence.

Accountant across rounds: round R > 1 starts from round R − 1's signed record (``--previous``).
:func:`verify_previous_round` verifies it (same DstackApp, quote over the envelope digest) and
:func:`continue_from` checks that it continues into this round: it is round R − 1's record, and its result
(``lineage.child``) is this round's parent. Its accountant state is then where this round's accounting starts, so
the ε spent carries over. The DstackApp's on-chain ε budget caps the sum of the rounds' spends in any case.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from cvm.aggregator.errors import RecipeNotARound, RoundRecordInvalid
from cvm.aggregator.recipe import ROUND_PAYLOAD_TYPE, round_contract_of
from cvm.attest.verify import AttestationError, verify_attestation
from cvm.federated import AccountantState, RoundContract, RoundRecord, epsilon_spent
from cvm.receipt import envelope_digest


def round_payload(record: RoundRecord, state: AccountantState) -> dict[str, Any]:
    """The envelope payload of a round: the record and the accountant state after it."""
    return {"output_type": ROUND_PAYLOAD_TYPE, "record": record.model_dump(mode="json"),
            "accountant_state": state.model_dump(mode="json")}


@dataclass(frozen=True)
class PublishedRound:
    """A verified round record: the record, the accountant state after it, its contract and compose hash."""

    record: RoundRecord
    accountant_state: AccountantState
    contract: RoundContract
    compose_hash: bytes
    simulated: bool


def verify_round_attestation(attestation: Mapping[str, Any], *, app_id: bytes, now: int, allow_simulated: bool = False,
                             simulated_root_der: bytes | None = None,
                             expected_compose_hash: bytes | None = None) -> PublishedRound:
    """Verify a round's attestation.json and return what it proves, or raise :class:`RoundRecordInvalid`.

    Checks: the quote verifies (simulated ones only with ``allow_simulated`` and the pinned root); its
    report_data is the envelope digest (``cvm.receipt``, it covers the payload); the event log names ``app_id`` and
    the compose hash of the app-compose.json carried (and ``expected_compose_hash`` when given); the record is
    for that compose's round contract; the accountant state reproduces the record's total ε.
    The dstack signature chain is not re-checked here (``seal verify`` does); the quote binding suffices.
    """
    try:
        envelope = attestation["envelope"]
        digest = envelope_digest(envelope)
        app_compose = attestation["app_compose"].encode()
        quote = bytes.fromhex(attestation["quote"])
        boot = verify_attestation(quote, attestation["event_log"], expected_report_data=digest, now=now,
                                  allow_simulated=allow_simulated, simulated_root_der=simulated_root_der)
    except AttestationError as exc:
        raise RoundRecordInvalid(f"its quote does not verify: {exc}") from None
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise RoundRecordInvalid(f"not a round attestation: {type(exc).__name__}: {exc}") from None
    compose_hash = hashlib.sha256(app_compose).digest()
    if boot.app_id != app_id:
        raise RoundRecordInvalid("it was produced by another app (DstackApp)")
    if boot.compose_hash != compose_hash or envelope.get("compose_hash") != compose_hash.hex():
        raise RoundRecordInvalid("its app-compose.json is not the measured one")
    if expected_compose_hash is not None and compose_hash != expected_compose_hash:
        raise RoundRecordInvalid("it is for another round recipe than expected")
    payload = envelope.get("payload")   # bound by the envelope digest the quote carries
    if not isinstance(payload, dict) or payload.get("output_type") != ROUND_PAYLOAD_TYPE:
        raise RoundRecordInvalid("the payload is not a round record")
    try:
        _, contract = round_contract_of(app_compose)
        record = RoundRecord.model_validate(payload["record"])
        state = AccountantState.model_validate(payload["accountant_state"])
    except (RecipeNotARound, ValidationError, KeyError) as exc:
        raise RoundRecordInvalid(f"unreadable record: {exc}") from None
    if record.contract_digest != contract.digest() or not record.round == contract.round == state.last_round:
        raise RoundRecordInvalid("the record is not for the measured round contract")
    if not np.isclose(epsilon_spent(state, contract.delta), record.privacy.epsilon_spent_total, rtol=1e-9):
        raise RoundRecordInvalid("the accountant state does not give the record's ε")
    return PublishedRound(record, state, contract, compose_hash, boot.simulated)


def continue_from(previous: PublishedRound | None, contract: RoundContract) -> AccountantState:
    """The accountant state the round of ``contract`` starts from, given the previous round's verified record.

    Round 1 starts empty and takes no previous record. Round R > 1 needs round R − 1's record
    (ValueError when none is given), whose result must be this round's parent (lineage); otherwise
    :class:`RoundRecordInvalid` says which.
    """
    expected = contract.round - 1
    if previous is None:
        if expected == 0:
            return AccountantState()
        raise ValueError(f"round {contract.round} needs the accountant state after round {expected} "
                         "(the previous signed record, --previous)")
    if expected == 0:
        raise RoundRecordInvalid(f"round 1 starts the accounting; it continues from no record "
                                 f"(this is round {previous.record.round}'s)")
    if previous.record.round != expected or previous.accountant_state.last_round != expected:
        raise RoundRecordInvalid(f"it is round {previous.record.round}'s record; round {contract.round} continues "
                                 f"from round {expected}'s")
    if previous.record.lineage.child != contract.parent_digest:
        raise RoundRecordInvalid(f"lineage: the previous round produced {previous.record.lineage.child[:16]}…, "
                                 f"not this round's parent {contract.parent_digest[:16]}…")
    return previous.accountant_state


def verify_previous_round(attestation: Mapping[str, Any] | None, *, contract: RoundContract, app_id: bytes, now: int,
                          allow_simulated: bool = False, simulated_root_der: bytes | None = None) -> AccountantState:
    """Verify the previous round's attestation.json (None for round 1) and return the accountant state this
    round starts from: :func:`verify_round_attestation` for ``app_id``, then :func:`continue_from`."""
    previous = None if attestation is None else verify_round_attestation(
        attestation, app_id=app_id, now=now, allow_simulated=allow_simulated, simulated_root_der=simulated_root_der)
    return continue_from(previous, contract)
