"""The site side of federated rounds (DESIGN.md §7): `seal site train | accept | reject`.

A site is a DstackApp owner. For one round it:

1. attests the aggregator BEFORE sending anything (:func:`attest_aggregator`): the quote verifies (SIMULATED
   ones only with ``--allow-simulated`` and the pinned simulated root); report_data binds the site's fresh nonce
   and the aggregator's update key; the event log's compose hash equals sha256 of the app-compose.json it serves,
   which is byte for byte the round compose the site was given; the event log names this study's DstackApp;
   that compose hash is allowed on-chain and not revoked; the round contract in it names this site as eligible;
2. trains locally from the parent (logistic regression, the contract's local epochs and batch size);
3. runs a local gate: the trained model's log-loss on the site's own validation split may be at most
   ``gate_tolerance`` above the parent's, else it sends nothing (a broken local run or broken data should not
   reach the aggregate; the gate says nothing about other sites, poisoning is the aggregator's filters' job);
4. clips the delta to the contract's norm, signs it with the owner key, seals it to the attested key, sends it.

After the round, ``accept`` verifies the signed round record and the candidate model (its digest is the
record's), scores it and the site's champion on local validation, and keeps the candidate unless it is worse
by more than the tolerance (``cvm.federated.accept_or_rollback``); ``reject`` stays on the champion. The site's
state (champion weights + digest, what it did each round) lives in ``<state-dir>/sites/<address>/``; the
champion is re-checked against its digest whenever it is used, so a rollback is verified by digest.

The task (model and quality) is ``cvm.federated.task``: a logistic risk model on the cohort features.

Exceptions::

    SiteError
    ├── AggregatorNotTrusted(reason)   the aggregator failed a check above; nothing was sent
    ├── AggregatorUnreachable          no answer from the aggregator
    ├── LocalGateRefused               the local update makes local validation worse; nothing was sent
    ├── RoundNotPublished              the round has no published result (still open, or failed: why)
    └── SiteStateError                 the site's state is missing or does not match its digest
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from eth_utils import to_checksum_address
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from contracts.chain import ChainError, DstackApp
from cvm.aggregator import (
    AggregatorAttestation,
    PublishedRound,
    RecipeNotARound,
    RoundRecordInvalid,
    RoundStatus,
    UpdateReceived,
    aggregator_report_data,
    round_contract_of,
    update_box_context,
    update_to_bytes,
    verify_round_attestation,
    weights_from_hex,
)
from cvm.analyses.dpsgd import Features, prepare_features
from cvm.attest.verify import AttestationError, verify_attestation
from cvm.federated import (
    RoundContract,
    SignedUpdate,
    SiteDecision,
    accept_or_rollback,
    clip,
    sign_update,
    vector_digest,
)
from cvm.federated.task import TASK, Quality, as_module, as_vector, quality
from kms_client.box import seal_to_bytes
from sealing_cli.common import DEFAULT_ACCEPT_TOLERANCE, DEFAULT_GATE_TOLERANCE

VALIDATION_FRACTION = 0.2
LEARNING_RATE = 0.5


class SiteError(Exception):
    """Base of everything the site side raises (see the module docstring)."""


class AggregatorNotTrusted(SiteError):
    def __init__(self, reason: str):
        super().__init__(f"aggregator not trusted, nothing sent: {reason}")
        self.reason = reason


class AggregatorUnreachable(SiteError):
    pass


class LocalGateRefused(SiteError):
    pass


class RoundNotPublished(SiteError):
    pass


class SiteDataInvalid(SiteError):
    """The site's --data file is not a Parquet table with the task's columns."""


class SiteStateError(SiteError):
    pass


# ---- local data and model ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SiteData:
    train: Features
    valid: Features


def load_site_data(path: Path) -> SiteData:
    """The site's table, standardised on the public bounds, split into train and a fixed validation part.

    The split is a fixed permutation (seed 0): it must be the same in ``train`` and ``accept`` so that the
    candidate is judged on rows the site never trained on.
    """
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise SiteDataInvalid(f"{path}: not a Parquet table ({exc})") from None
    try:
        data = prepare_features(table, TASK)
    except (TypeError, ValueError) as exc:
        raise SiteDataInvalid(f"{path}: {exc}") from None
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    cut = len(data) - max(1, int(round(VALIDATION_FRACTION * len(data))))
    pick = lambda rows: Features(data.x[rows], data.y[rows])  # noqa: E731
    return SiteData(train=pick(order[:cut]), valid=pick(order[cut:]))


def train_locally(parent: np.ndarray, train: Features, contract: RoundContract, *,
                  generator: torch.Generator | None = None) -> np.ndarray:
    """Plain SGD from ``parent`` for the contract's local epochs and batch size; returns the trained weights.

    No local DP: the round's DP is the aggregator's noise on the clipped updates (DP-FedAvg).
    """
    module = as_module(parent)
    optimizer = torch.optim.SGD(module.parameters(), lr=LEARNING_RATE)
    loader = DataLoader(TensorDataset(train.x, train.y), batch_size=contract.local_batch_size, shuffle=True,
                        generator=generator)
    for _ in range(contract.local_epochs):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.binary_cross_entropy_with_logits(module(x).squeeze(1), y).backward()
            optimizer.step()
    return as_vector(module)


# ---- talking to the aggregator ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttestedAggregator:
    """An aggregator that passed :func:`attest_aggregator`, with the key to seal updates to."""

    url: str
    public_key: bytes
    contract: RoundContract
    compose_hash: bytes
    simulated: bool


def _get(http: httpx.Client, path: str, **params: str) -> dict[str, Any]:
    try:
        reply = http.get(path, params=params)
    except httpx.TransportError as exc:
        raise AggregatorUnreachable(f"aggregator unreachable at {http.base_url}: {type(exc).__name__}") from None
    if reply.status_code != 200:
        raise AggregatorNotTrusted(f"GET {path} answered HTTP {reply.status_code}")
    try:
        return reply.json()
    except ValueError:
        raise AggregatorNotTrusted(f"GET {path} did not answer JSON") from None


def attest_aggregator(http: httpx.Client, *, app_compose: bytes, app: DstackApp, site: str, now: int,
                      allow_simulated: bool = False, simulated_root_der: bytes | None = None,
                      rng: Callable[[int], bytes] = os.urandom) -> AttestedAggregator:
    """Every check of step 1 in the module docstring, or :class:`AggregatorNotTrusted` naming the first failure."""
    nonce = rng(32)
    try:
        answer = AggregatorAttestation.model_validate(_get(http, "/attestation", nonce=nonce.hex()))
        public_key = bytes.fromhex(answer.public_key)
        boot = verify_attestation(bytes.fromhex(answer.quote), answer.event_log,
                                  expected_report_data=aggregator_report_data(nonce, public_key), now=now,
                                  allow_simulated=allow_simulated, simulated_root_der=simulated_root_der)
    except AttestationError as exc:
        raise AggregatorNotTrusted(str(exc)) from None
    except ValueError as exc:   # pydantic's ValidationError and bad hex are ValueErrors
        raise AggregatorNotTrusted(f"malformed attestation: {exc}") from None
    served = answer.app_compose.encode()
    expected = hashlib.sha256(app_compose).digest()
    if boot.compose_hash != hashlib.sha256(served).digest():
        raise AggregatorNotTrusted("the app-compose.json it serves is not the one measured in its quote")
    if boot.compose_hash != expected:
        raise AggregatorNotTrusted(f"it runs compose 0x{boot.compose_hash.hex()}, not the round compose given "
                                   f"(0x{expected.hex()})")
    if boot.app_id != app.app_id:
        raise AggregatorNotTrusted(f"it belongs to app 0x{boot.app_id.hex()}, not this study's {app.address}")
    try:
        status = app.status(boot.compose_hash)
    except ChainError as exc:
        raise AggregatorNotTrusted(f"cannot read its approval on-chain: {exc}") from None
    if status.revoked:
        raise AggregatorNotTrusted("its round compose was revoked on-chain")
    if not status.allowed:
        raise AggregatorNotTrusted(f"its round compose is not approved on-chain ({status.approvals}/"
                                   f"{status.threshold} approvals)")
    try:
        _, contract = round_contract_of(served)
    except RecipeNotARound as exc:
        raise AggregatorNotTrusted(str(exc)) from None
    if to_checksum_address(site) not in contract.eligible_sites:
        raise AggregatorNotTrusted(f"the round contract does not name this site ({site}) as eligible")
    return AttestedAggregator(str(http.base_url), public_key, contract, boot.compose_hash, boot.simulated)


def fetch_parent(http: httpx.Client, aggregator: AttestedAggregator) -> np.ndarray:
    """The round's parent model, checked against the attested contract's parent digest."""
    weights = weights_from_hex(_get(http, "/parent")["weights"])
    if vector_digest(weights) != aggregator.contract.parent_digest:
        raise AggregatorNotTrusted("the parent model it serves is not the round contract's parent")
    return weights


def send_update(http: httpx.Client, aggregator: AttestedAggregator, update: SignedUpdate, *,
                rng: Callable[[int], bytes] = os.urandom) -> UpdateReceived:
    """Seal ``update`` to the attested key (for this round's contract only) and POST it."""
    box = seal_to_bytes(update_to_bytes(update), nonce=update_box_context(aggregator.contract),
                        cvm_pub=aggregator.public_key, rng=rng)
    try:
        # bytes(): httpx sends bytes with a Content-Length (the aggregator requires one), not a bytearray.
        reply = http.post("/update", content=bytes(box), headers={"content-type": "application/octet-stream"})
    except httpx.TransportError as exc:
        raise AggregatorUnreachable(f"aggregator unreachable at {http.base_url}: {type(exc).__name__}") from None
    if reply.status_code != 200:
        raise RoundNotPublished(f"the aggregator refused the update (HTTP {reply.status_code}): {reply.text[:200]}")
    return UpdateReceived.model_validate(reply.json())


def fetch_result(http: httpx.Client, *, app_id: bytes, compose_hash: bytes, now: int, allow_simulated: bool,
                 simulated_root_der: bytes | None) -> tuple[PublishedRound, np.ndarray]:
    """The published round: its verified record and the candidate model whose digest the record names."""
    status = RoundStatus.model_validate(_get(http, "/result"))
    if status.state != "published" or status.attestation is None or status.weights is None:
        raise RoundNotPublished(f"round {status.round} is {status.state}" + (f": {status.error}" if status.error else ""))
    published = verify_round_attestation(status.attestation, app_id=app_id, now=now, allow_simulated=allow_simulated,
                                         simulated_root_der=simulated_root_der, expected_compose_hash=compose_hash)
    weights = weights_from_hex(status.weights)
    if vector_digest(weights) != published.record.aggregate_digest:
        raise RoundRecordInvalid("the candidate model is not the one the signed record names")
    return published, weights


# ---- the site's state --------------------------------------------------------------------------------------------

class SiteState:
    """``<state-dir>/sites/<address>/``: ``site.json`` (champion digest and round, per-round log) and
    ``champion.f32`` (the champion's canonical float32 bytes). Holds model weights, never data."""

    def __init__(self, state_dir: Path, site: str):
        self.folder = state_dir / "sites" / to_checksum_address(site)
        self._file = self.folder / "site.json"

    def load(self) -> dict[str, Any]:
        if not self._file.exists():
            return {"champion": None, "rounds": {}}
        return json.loads(self._file.read_text())

    def save(self, state: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self._file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
        tmp.replace(self._file)

    def champion(self) -> np.ndarray:
        """The champion weights, after checking them against the stored digest."""
        champion = self.load()["champion"]
        path = self.folder / "champion.f32"
        if champion is None or not path.exists():
            raise SiteStateError(f"no champion model in {self.folder}: take part in a round first (`seal site train`)")
        weights = np.frombuffer(path.read_bytes(), "<f4").copy()
        if vector_digest(weights) != champion["digest"]:
            raise SiteStateError(f"{path} does not match the champion digest {champion['digest']}: refusing to use it")
        return weights

    def set_champion(self, weights: np.ndarray, round_number: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / "champion.tmp"
        tmp.write_bytes(np.ascontiguousarray(weights, "<f4").tobytes())
        tmp.replace(self.folder / "champion.f32")
        state = self.load()
        state["champion"] = {"digest": vector_digest(weights), "round": round_number}
        self.save(state)

    def log_round(self, round_number: int, **entries: Any) -> None:
        state = self.load()
        state["rounds"].setdefault(str(round_number), {}).update(entries)
        self.save(state)

    def round(self, round_number: int) -> dict[str, Any]:
        entry = self.load()["rounds"].get(str(round_number))
        if entry is None or "compose_hash" not in entry:
            raise SiteStateError(f"this site did not take part in round {round_number} (no `seal site train`)")
        return entry


# ---- the recipes the commands run ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainOutcome:
    round: int
    parent: Quality
    trained: Quality
    raw_norm: float
    sent_norm: float
    update_sha256: str


def train_round(*, aggregator_url: str, app_compose: bytes, app: DstackApp, account: Any, data: SiteData,
                state: SiteState, now: int, allow_simulated: bool, simulated_root_der: bytes | None,
                gate_tolerance: float = DEFAULT_GATE_TOLERANCE) -> TrainOutcome:
    """Steps 1-4 of the module docstring for ``account`` (an eth-account LocalAccount, the site's owner key)."""
    with httpx.Client(base_url=aggregator_url, timeout=30.0) as http:
        attested = attest_aggregator(http, app_compose=app_compose, app=app, site=account.address, now=now,
                                     allow_simulated=allow_simulated, simulated_root_der=simulated_root_der)
        contract = attested.contract
        parent = fetch_parent(http, attested)
        if state.load()["champion"] is None:
            state.set_champion(parent, contract.round - 1)
        trained = train_locally(parent, data.train, contract)
        before, after = quality(parent, data.valid), quality(trained, data.valid)
        if after.loss > before.loss + gate_tolerance:
            raise LocalGateRefused(f"the local update raises local validation log-loss from {before.loss:.4f} to "
                                   f"{after.loss:.4f} (tolerance {gate_tolerance:g}); nothing was sent")
        delta = (trained - parent).astype("<f4")
        clipped = clip(delta, contract.clip_norm)
        update = sign_update(bytes(account.key), round_number=contract.round, parent_digest=contract.parent_digest,
                             num_examples=len(data.train), vector=clipped)
        received = send_update(http, attested, update)
    state.log_round(contract.round, compose_hash=attested.compose_hash.hex(), aggregator=aggregator_url,
                    parent_digest=contract.parent_digest, update_digest=vector_digest(clipped),
                    local_before={"loss": before.loss, "auc": before.auc},
                    local_after={"loss": after.loss, "auc": after.auc})
    return TrainOutcome(contract.round, before, after, float(np.linalg.norm(delta)), update.claimed_norm,
                        received.update_sha256)


@dataclass(frozen=True)
class RoundDecision:
    decision: SiteDecision
    published: PublishedRound


def decide_round(*, round_number: int, keep_candidate_if_good: bool, app: DstackApp, data: SiteData,
                 state: SiteState, now: int, allow_simulated: bool, simulated_root_der: bytes | None,
                 aggregator_url: str | None = None,
                 tolerance: float = DEFAULT_ACCEPT_TOLERANCE) -> RoundDecision:
    """``accept`` (``keep_candidate_if_good``) or ``reject``: verify the round, score both models, keep one."""
    entry = state.round(round_number)
    with httpx.Client(base_url=aggregator_url or entry["aggregator"], timeout=30.0) as http:
        published, candidate = fetch_result(http, app_id=app.app_id, compose_hash=bytes.fromhex(entry["compose_hash"]),
                                            now=now, allow_simulated=allow_simulated,
                                            simulated_root_der=simulated_root_der)
    if published.record.round != round_number:
        raise RoundRecordInvalid(f"the record is for round {published.record.round}, not {round_number}")
    champion = state.champion()
    auc = lambda weights: quality(weights, data.valid).auc  # noqa: E731
    if keep_candidate_if_good:
        decision = accept_or_rollback(champion, candidate, auc, tolerance)
    else:
        decision = SiteDecision("champion", vector_digest(champion), auc(champion), auc(candidate))
    if decision.keep == "candidate":
        state.set_champion(candidate, round_number)
    state.log_round(round_number, decision={"keep": decision.keep, "kept_digest": decision.kept_digest,
                                            "champion_auc": decision.champion_quality,
                                            "candidate_auc": decision.candidate_quality,
                                            "requested": "accept" if keep_candidate_if_good else "reject"})
    return RoundDecision(decision, published)
