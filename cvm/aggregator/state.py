"""One round's state machine, transport-free (``cvm.aggregator.server`` is a thin HTTP shell over it).

Updates are opened as they arrive (:meth:`RoundAggregator.receive`) and queued; the checks that name rejections
run at close. Closing (:meth:`RoundAggregator.try_close`): ``run_round`` (budget, validation with named
rejections, anomaly flags, robust aggregate, DP noise, then the parent and the candidate scored on the public
reference cohort the contract names by digest: the record's metrics) → the KMS records the round's ε on-chain
(``KmsClient.record_round_spend``) BEFORE anything is released → the record is signed and attested in the study's
Sign-RPC envelope (``cvm.receipt``; payload ``output_type`` ``round_record``) and published with the weights.
A refusal anywhere releases nothing.

Locking. One lock guards the queue and the outcome, and it is held only for bookkeeping: never across
``run_round``, a KMS, chain, Sign or quote call, or a file write, so ``receive`` and ``status`` answer while a
close is under way. A close (1) claims the round and snapshots the queue under the lock (a concurrent second
close sees the claim and returns the status); (2) runs ``run_round`` on the snapshot without the lock; (3) under
the lock again: when updates arrived meanwhile it starts over with them, otherwise it seals the round (from then
on ``receive`` refuses); (4) releases (KMS, chain, Sign, quote, files) without the lock; (5) commits the outcome
under the lock.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from dstack_sdk import DstackClient

from contracts.chain import Chain, ChainError
from cvm.aggregator.errors import RecipeNotARound, RoundClosed, UpdateUnreadable
from cvm.aggregator.recipe import check_reference, round_contract_of
from cvm.aggregator.record import round_payload
from cvm.aggregator.wire import (
    AggregatorAttestation,
    RoundStatus,
    UpdateReceived,
    aggregator_report_data,
    max_sealed_update_bytes,
    update_box_context,
    update_from_bytes,
)
from cvm.attest.measured import MeasuredRecipeMismatch, measured_recipe
from cvm.federated import (
    AccountantState,
    FederatedError,
    RoundRecord,
    RoundStillOpen,
    SignedUpdate,
    run_round,
    vector_digest,
)
from cvm.federated.dp import GaussianNoise
from cvm.receipt import (
    build_envelope,
    chain_evidence,
    sign_and_attest,
    write_attestation,
)
from kms_client.box import BoxOpenFailed, open_bytes, raw_public
from kms_client.client import KmsClient, KmsError

if TYPE_CHECKING:   # torch: loaded only by rounds that evaluate centrally
    from cvm.federated.task import ReferenceCohort


@dataclass
class _Outcome:
    state: Literal["open", "published", "failed"] = "open"
    error: str | None = None
    attestation: dict | None = None
    weights: np.ndarray | None = None


@dataclass(frozen=True)
class _Candidate:
    """What ``run_round`` decided on one snapshot of the queue: ready to release, pending the KMS."""

    weights: np.ndarray
    record: RoundRecord
    state: AccountantState


def _failed(exc: BaseException) -> _Outcome:
    return _Outcome("failed", f"{type(exc).__name__}: {exc}")


@dataclass
class RoundAggregator:
    """One round's state machine (locking in the module docstring).

    ``chain`` reads the contracts for the receipt; ``kms`` records the spend; ``clock`` gives unix seconds.
    ``reference`` is the public reference cohort the contract names by digest (None when it names none).
    ``accountant_state`` is where this round's accounting starts (``cvm.aggregator.record.continue_from``).
    """

    dstack: DstackClient
    kms: KmsClient
    chain: Chain
    dstack_kms: str
    parent: np.ndarray
    accountant_state: AccountantState
    out_dir: Path
    clock: Callable[[], float] = time.time
    noise: GaussianNoise | None = None
    reference: ReferenceCohort | None = None
    _key: X25519PrivateKey = field(default_factory=X25519PrivateKey.generate, repr=False)
    _updates: list[SignedUpdate] = field(default_factory=list, repr=False)
    _outcome: _Outcome = field(default_factory=_Outcome)
    _closing: bool = False      # a close holds the claim (steps 1 to 5); no second one starts meanwhile
    _sealed: bool = False       # the round's updates are fixed (step 3 on); receive refuses
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        try:
            self.app_id, self.compose_hash, self.app_compose = measured_recipe(self.dstack)
        except MeasuredRecipeMismatch as exc:
            raise RecipeNotARound(str(exc)) from None
        self.manifest, self.contract = round_contract_of(self.app_compose)
        check_reference(self.contract, None if self.reference is None else self.reference.sha256)
        if vector_digest(self.parent) != self.contract.parent_digest:
            raise ValueError("the parent weights do not hash to the round contract's parent_digest")
        if self.accountant_state.last_round != self.contract.round - 1:
            raise ValueError(f"round {self.contract.round} needs the accountant state after round "
                             f"{self.contract.round - 1} (the previous signed record)")

    def attestation(self, nonce: bytes) -> AggregatorAttestation:
        public = raw_public(self._key)
        quote = self.dstack.get_quote(aggregator_report_data(nonce, public))
        # No real-TDX path exists yet: this service only runs in the SIMULATED CVM, and says so.
        return AggregatorAttestation(quote=quote.quote, event_log=quote.event_log,
                                     app_compose=self.app_compose.decode(), public_key=public.hex(), simulated=True)

    def max_body_bytes(self) -> int:
        """The largest sealed update an honest site sends for this model (larger bodies are refused unread)."""
        return max_sealed_update_bytes(self.parent.size)

    def receive(self, sealed: bytes) -> UpdateReceived:
        """Open one sealed update and queue it for the round; the checks that name rejections run at close."""
        try:
            plaintext = open_bytes(sealed, nonce=update_box_context(self.contract), cvm_key=self._key)
        except BoxOpenFailed:
            raise UpdateUnreadable("the update is not sealed to this round's attested key") from None
        update = update_from_bytes(plaintext)
        with self._lock:
            if self._sealed or self._outcome.state != "open" or self.clock() > self.contract.deadline:
                raise RoundClosed(f"round {self.contract.round} takes no more updates")
            self._updates.append(update)
        return UpdateReceived(received=True, update_sha256=hashlib.sha256(plaintext).hexdigest())

    def is_open(self) -> bool:
        with self._lock:
            return self._outcome.state == "open"

    def status(self, *, with_result: bool = True) -> RoundStatus:
        with self._lock:
            outcome, received = self._outcome, len(self._updates)
        published = with_result and outcome.state == "published"
        return RoundStatus(state=outcome.state, round=self.contract.round, received=received,
                           error=outcome.error, attestation=outcome.attestation if published else None,
                           weights=outcome.weights.tobytes().hex() if published else None)

    def try_close(self) -> RoundStatus:
        """Close the round if ``run_round`` allows it now; return the status (still open otherwise).

        Returns at once while another close holds the claim. Steps in the module docstring.
        """
        while True:
            with self._lock:                                                    # 1. claim, snapshot
                if self._closing or self._sealed or self._outcome.state != "open":
                    break
                self._closing = True
                updates, now = list(self._updates), self.clock()
            try:
                decided = self._decide(updates, now)                            # 2. run_round, no lock
            except BaseException:
                with self._lock:
                    self._closing = False
                raise
            with self._lock:                                                    # 3. start over, or seal
                if len(self._updates) != len(updates):
                    self._closing = False
                    continue
                if not isinstance(decided, _Candidate):
                    self._closing = False
                    if decided is not None:
                        self._outcome = decided
                    break
                self._sealed = True
            try:
                outcome = self._release(decided)                                # 4. KMS, chain, Sign: no lock
            except BaseException as exc:
                with self._lock:
                    self._outcome, self._closing = _failed(exc), False
                raise
            with self._lock:                                                    # 5. commit
                self._outcome, self._closing = outcome, False
            break
        return self.status(with_result=False)

    def _decide(self, updates: list[SignedUpdate], now: float) -> _Candidate | _Outcome | None:
        """``run_round`` on a snapshot: a candidate, a failed outcome, or None while the round stays open."""
        try:
            weights, record, state = run_round(self.contract, self.parent, updates, now=now,
                                               accountant_state=self.accountant_state, noise=self.noise,
                                               evaluate=None if self.reference is None else self.reference.evaluate)
        except RoundStillOpen:
            return None
        except FederatedError as exc:
            return _failed(exc)
        return _Candidate(weights, record, state)

    def _release(self, candidate: _Candidate) -> _Outcome:
        """Record the ε on-chain through the KMS, then sign, attest and write the round; the caller holds no lock."""
        def attest(report_data: bytes) -> tuple[bytes, str]:
            quote = self.dstack.get_quote(report_data)
            return bytes.fromhex(quote.quote), quote.event_log

        record = candidate.record
        try:
            # The ε goes on-chain before anything leaves: a refusal here (budget, revoked recipe) releases nothing.
            spend = self.kms.record_round_spend(attest, self.app_compose, record.privacy.epsilon_round)
            evidence = chain_evidence(self.chain, app_id=self.app_id, dstack_kms=self.dstack_kms,
                                      compose_hash=self.compose_hash, release_id=spend.release_id)
        except (KmsError, ChainError) as exc:
            return _failed(exc)
        envelope = build_envelope(
            payload=round_payload(record, candidate.state), app_id=self.app_id, compose_hash=self.compose_hash,
            chain=evidence, epsilon_spent=spend.epsilon_spent, epsilon_remaining=spend.epsilon_remaining,
            inputs={i.name: {"owner": i.owner} for i in self.manifest.inputs},
            release={"release_id": spend.release_id, "tx": spend.release_tx}, simulated=spend.simulated or record.simulated,
        )
        attestation = sign_and_attest(envelope, dstack=self.dstack, app_compose=self.app_compose, chain=evidence)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_attestation(attestation, self.out_dir / f"round-{self.contract.round}.attestation.json")
        (self.out_dir / f"round-{self.contract.round}.model.f32").write_bytes(candidate.weights.tobytes())
        return _Outcome("published", attestation=attestation, weights=candidate.weights)

    def run_closer(self, stop: threading.Event) -> None:
        """Close at the deadline, or earlier when woken after an update and ``run_round`` allows it."""
        while not stop.is_set() and self.is_open():
            stop.wait(timeout=min(1.0, max(0.05, self.contract.deadline - self.clock())))
            self.try_close()
