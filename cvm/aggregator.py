"""The federated aggregator: one round, served from inside its (SIMULATED) CVM (DESIGN.md §7).

    python -m cvm.aggregator --port P --kms-url URL --rpc-url URL --dstack-kms ADDR --parent model.f32 \\
        --out-dir DIR [--evaluation reference.parquet] \\
        [--previous round-1.attestation.json --allow-simulated --simulated-root root.der]

Each round is its own recipe: the round contract (``cvm.federated.RoundContract``) sits in the measured
app-compose.json as a ``fed_round`` study manifest whose inputs are the sites (the DstackApp owners), so the
sites approve every round on-chain before this CVM can boot (the KMS gives it no app key otherwise). The
service talks to the guest agent only through dstack-sdk (``DstackClient``), like ``cvm.run``.

HTTP on loopback (the wire models below are shared with the site side, ``sealing_cli.site``):

- ``GET /attestation?nonce=HEX``: a fresh quote whose report_data is
  ``sha512(b"sealroom-fed-aggregator/v1:" ‖ nonce ‖ X25519 public key)`` (the key lives only in this process),
  with the event log and app-compose.json verbatim. Sites verify it before they send anything.
- ``GET /parent``: the parent model (canonical float32 bytes, hex); sites check it against the contract.
- ``POST /update``: a signed update (``cvm.federated.SignedUpdate``, framed by :func:`update_to_bytes`) sealed
  to that key with ``kms_client.box`` (context ``b"sealroom-fed-update-box/v1:" ‖ contract digest``); the body
  is the box's bytes (``kms_client.box.seal_to_bytes``), ``application/octet-stream``, and a larger body than
  this model's update is refused unread (413). The TEE is the secure aggregation: updates are only ever
  decrypted in here. Updates received after the contract's deadline are refused (409).
- ``POST /close``: ask the round to close now; it closes only when ``run_round`` allows it (every eligible
  site heard from, or the deadline passed). The service also closes by itself on both conditions.
- ``GET /result``: the round's outcome; once published, the candidate model and the signed round record.

Closing: ``run_round`` (budget, validation with named rejections, anomaly flags, robust aggregate, DP noise,
then the parent and the candidate scored on the public reference cohort the contract names by digest, given
with ``--evaluation``: the record's metrics) → the KMS records the round's ε on-chain
(``KmsClient.record_round_spend``) BEFORE anything is released → the record is signed and attested in the
study's Sign-RPC envelope (``cvm.receipt``; payload ``output_type`` ``round_record``) and published with the
weights. A refusal anywhere releases nothing.

Accountant across rounds: the payload carries the accountant state after the round. Round R > 1 needs the
previous round's signed record (``--previous``); it is verified (:func:`verify_round_attestation`: quote,
report_data = envelope digest, same DstackApp, lineage to this round's parent) and its state is the start of
this round's accounting. The DstackApp's on-chain ε budget caps the sum of the rounds' spends in any case.

Exceptions::

    AggregatorError
    ├── RecipeNotARound        the measured compose is not a federated round recipe
    ├── RoundRecordInvalid     a signed round record does not verify (``.reason`` says which check)
    ├── UpdateUnreadable       an update could not be opened or parsed (HTTP 400); nothing recorded
    └── RoundClosed            the round takes no more updates (HTTP 409)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from dstack_sdk import DstackClient
from eth_utils import to_checksum_address
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import (
    Request,  # module level: FastAPI resolves the endpoints' annotations here
)

from compose.app_compose import (
    ComposeError,
    build_app_compose,
    manifest_from_app_compose,
    normalized_json_bytes,
)
from compose.manifest import StudyManifest
from contracts.chain import Chain, ChainError
from cvm.attest.measured import MeasuredRecipeMismatch, measured_recipe
from cvm.attest.verify import AttestationError, verify_attestation
from cvm.federated import (
    AccountantState,
    FederatedError,
    RoundContract,
    RoundRecord,
    RoundStillOpen,
    SignedUpdate,
    epsilon_spent,
    run_round,
    vector_digest,
)
from cvm.federated.dp import GaussianNoise
from cvm.labels import AGGREGATOR_REPORT_LABEL, UPDATE_BOX_LABEL
from cvm.receipt import (
    build_envelope,
    chain_evidence,
    envelope_digest,
    sign_and_attest,
    write_attestation,
)
from kms_client.box import BOX_OVERHEAD, BoxOpenFailed, open_bytes, raw_public
from kms_client.client import KmsClient, KmsError

if TYPE_CHECKING:   # torch: loaded only by rounds that evaluate centrally
    from cvm.federated.task import ReferenceCohort

UPDATE_FORMAT = "sealroom-fed-update/v2"
_UPDATE_HEADER_MAX = 4096     # bytes of the JSON header in front of the vector
ROUND_PAYLOAD_TYPE = "round_record"


class AggregatorError(Exception):
    """Base of everything this module raises about a round (see the module docstring)."""


class RecipeNotARound(AggregatorError):
    pass


class RoundRecordInvalid(AggregatorError):
    def __init__(self, reason: str):
        super().__init__(f"round record rejected: {reason}")
        self.reason = reason


class UpdateUnreadable(AggregatorError):
    pass


class RoundClosed(AggregatorError):
    pass


# ---- the round recipe --------------------------------------------------------------------------------------------

ROUND_YAML = ("services:\n  aggregator:\n    image: sealroom/fed-aggregator@sha256:" + "0" * 64 + "\n"
              "    command: [python, -m, cvm.aggregator]\n")


def build_round_compose(study: str, contract: RoundContract, sites: Mapping[str, str]) -> bytes:
    """The app-compose.json bytes of one round: a ``fed_round`` manifest whose params are the contract.

    ``sites`` maps each site's name to its address; they are the manifest's inputs (so each must approve the
    round on-chain before the KMS records its spend) and must be exactly the contract's eligible sites.
    """
    if {to_checksum_address(a) for a in sites.values()} != set(contract.eligible_sites):
        raise ValueError("the round's sites must be exactly the contract's eligible sites")
    manifest = StudyManifest.model_validate({
        "study": study,
        "inputs": [{"owner": address, "name": name} for name, address in sites.items()],
        "analysis": {"kind": "fed_round", "params": contract.to_params()},
        "epsilon": contract.epsilon_per_round, "delta": contract.delta, "output_type": ROUND_PAYLOAD_TYPE,
    })
    return normalized_json_bytes(build_app_compose(f"{study}-round-{contract.round}", ROUND_YAML, manifest))


def round_contract_of(app_compose: bytes) -> tuple[StudyManifest, RoundContract]:
    """The manifest and round contract measured in ``app_compose``, or :class:`RecipeNotARound`."""
    try:
        manifest = manifest_from_app_compose(app_compose)
    except ComposeError as exc:
        raise RecipeNotARound(f"not a valid Sealroom compose: {exc}") from None
    if manifest.analysis.kind != "fed_round" or manifest.output_type != ROUND_PAYLOAD_TYPE:
        raise RecipeNotARound(f"the recipe runs {manifest.analysis.kind!r}, not a federated round")
    try:
        return manifest, RoundContract.from_params(manifest.analysis.params)
    except ValueError as exc:
        raise RecipeNotARound(f"the recipe's round contract is invalid: {exc}") from None


# ---- wire ---------------------------------------------------------------------------------------------------------

class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AggregatorAttestation(_Wire):
    """GET /attestation: the quote binding the aggregator's update key to the site's nonce."""

    format: Literal["sealroom-fed-aggregator-attestation/v1"] = "sealroom-fed-aggregator-attestation/v1"
    quote: str
    event_log: str
    app_compose: str
    public_key: str
    simulated: bool


class UpdateReceived(_Wire):
    received: bool
    update_sha256: str


class RoundStatus(_Wire):
    """GET /result. ``state``: open, published or failed (``error`` says why; nothing was released)."""

    state: Literal["open", "published", "failed"]
    round: int
    received: int
    error: str | None = None
    attestation: dict[str, Any] | None = None
    weights: str | None = None


def aggregator_report_data(nonce: bytes, public_key: bytes) -> bytes:
    """The 64 report_data bytes of GET /attestation (label and layout in the module docstring)."""
    if not 16 <= len(nonce) <= 64 or len(public_key) != 32:
        raise ValueError("nonce must be 16-64 bytes and public_key a 32-byte X25519 key")
    return hashlib.sha512(AGGREGATOR_REPORT_LABEL + nonce + public_key).digest()


def update_box_context(contract: RoundContract) -> bytes:
    """The box ``nonce`` (HKDF info and AAD) for updates of this round: a box opens only for this contract."""
    return UPDATE_BOX_LABEL + bytes.fromhex(contract.digest())


def update_to_bytes(update: SignedUpdate) -> bytes:
    """A signed update as the bytes the site seals: ``u32_be(n) ‖ n bytes of JSON header ‖ the vector``.

    The header holds every field but the vector, plus its length in parameters; the vector follows as its
    canonical float32 little-endian bytes. Binary because the vector is nearly all of it: as hex inside JSON,
    1M parameters cost about 100 ms to encode and 30 ms to parse, more than everything else a round does.
    """
    vector = np.ascontiguousarray(update.vector, "<f4")
    header = json.dumps({
        "format": UPDATE_FORMAT, "round": update.round, "site": update.site, "parent_digest": update.parent_digest,
        "num_examples": update.num_examples, "claimed_norm": update.claimed_norm, "signature": update.signature.hex(),
        "parameters": vector.size,
    }, sort_keys=True, separators=(",", ":")).encode()
    return b"".join((len(header).to_bytes(4, "big"), header, vector.data))


def update_from_bytes(data: bytes) -> SignedUpdate:
    """Parse :func:`update_to_bytes`; UpdateUnreadable on any deviation. Nothing is checked but the shape:
    the signature, eligibility, round, parent and norm are ``validate_updates``'s (named in the record)."""
    try:
        if len(data) < 4:
            raise ValueError("too short for a header length")
        size = int.from_bytes(data[:4], "big")
        if size > _UPDATE_HEADER_MAX or len(data) < 4 + size:
            raise ValueError("the header length is out of range")
        raw = json.loads(data[4:4 + size])
        if not isinstance(raw, dict) or raw.get("format") != UPDATE_FORMAT:
            raise ValueError("unknown update format")
        parameters, vector_bytes = raw["parameters"], memoryview(data)[4 + size:]
        if not isinstance(parameters, int) or isinstance(parameters, bool) or len(vector_bytes) != 4 * parameters:
            raise ValueError("the vector is not the declared number of float32 values")
        return SignedUpdate(
            round=raw["round"], site=raw["site"], parent_digest=raw["parent_digest"],
            num_examples=raw["num_examples"], vector=np.frombuffer(vector_bytes, "<f4"),   # read-only view
            claimed_norm=float(raw["claimed_norm"]), signature=bytes.fromhex(raw["signature"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UpdateUnreadable(f"malformed update: {exc}") from None


def weights_from_hex(text: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(text), "<f4").copy()


# ---- verifying a published round -----------------------------------------------------------------------------

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


# ---- the round ----------------------------------------------------------------------------------------------------

def check_reference(contract: RoundContract, sha256: str | None) -> None:
    """The reference cohort given (by its file's sha256) is the one the measured contract names, or ValueError."""
    expected = contract.evaluation_sha256
    if expected is None and sha256 is not None:
        raise ValueError("the round contract names no reference cohort; an evaluation file would not be measured")
    if expected is not None and sha256 is None:
        raise ValueError(f"the round contract evaluates on the reference cohort with sha256 {expected}; "
                         "pass that file with --evaluation")
    if expected != sha256:
        raise ValueError(f"the evaluation file has sha256 {sha256}, not the {expected} the round contract names")


@dataclass
class _Outcome:
    state: Literal["open", "published", "failed"] = "open"
    error: str | None = None
    attestation: dict[str, Any] | None = None
    weights: np.ndarray | None = None


@dataclass
class RoundAggregator:
    """One round's state machine; transport-free (the FastAPI app below is a thin shell over it).

    ``chain`` reads the contracts for the receipt; ``kms`` records the spend; ``clock`` gives unix seconds.
    ``reference`` is the public reference cohort the contract names by digest (None when it names none).
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
        return BOX_OVERHEAD + 4 + _UPDATE_HEADER_MAX + 4 * self.parent.size

    def receive(self, sealed: bytes) -> UpdateReceived:
        """Open one sealed update and queue it for the round; the checks that name rejections run at close."""
        try:
            plaintext = open_bytes(sealed, nonce=update_box_context(self.contract), cvm_key=self._key)
        except BoxOpenFailed:
            raise UpdateUnreadable("the update is not sealed to this round's attested key") from None
        update = update_from_bytes(plaintext)
        with self._lock:
            if self._outcome.state != "open" or self.clock() > self.contract.deadline:
                raise RoundClosed(f"round {self.contract.round} takes no more updates")
            self._updates.append(update)
        return UpdateReceived(received=True, update_sha256=hashlib.sha256(plaintext).hexdigest())

    def status(self, *, with_result: bool = True) -> RoundStatus:
        outcome = self._outcome
        published = with_result and outcome.state == "published"
        return RoundStatus(state=outcome.state, round=self.contract.round, received=len(self._updates),
                           error=outcome.error, attestation=outcome.attestation if published else None,
                           weights=outcome.weights.tobytes().hex() if published else None)

    def try_close(self) -> RoundStatus:
        """Close the round if ``run_round`` allows it now; return the status (still open otherwise)."""
        with self._lock:
            if self._outcome.state == "open":
                try:
                    self._close()
                except RoundStillOpen:
                    pass
                except (FederatedError, KmsError, ChainError) as exc:
                    self._outcome = _Outcome("failed", f"{type(exc).__name__}: {exc}")
        return self.status(with_result=False)

    def _close(self) -> None:
        weights, record, state = run_round(self.contract, self.parent, list(self._updates), now=self.clock(),
                                           accountant_state=self.accountant_state, noise=self.noise,
                                           evaluate=None if self.reference is None else self.reference.evaluate)

        def attest(report_data: bytes) -> tuple[bytes, str]:
            quote = self.dstack.get_quote(report_data)
            return bytes.fromhex(quote.quote), quote.event_log

        # The ε goes on-chain before anything leaves: a refusal here (budget, revoked recipe) releases nothing.
        spend = self.kms.record_round_spend(attest, self.app_compose, record.privacy.epsilon_round)
        evidence = chain_evidence(self.chain, app_id=self.app_id, dstack_kms=self.dstack_kms,
                                  compose_hash=self.compose_hash)
        payload = {"output_type": ROUND_PAYLOAD_TYPE, "record": record.model_dump(mode="json"),
                   "accountant_state": state.model_dump(mode="json")}
        envelope = build_envelope(
            payload=payload, app_id=self.app_id, compose_hash=self.compose_hash, chain=evidence,
            epsilon_spent=spend.epsilon_spent, epsilon_remaining=spend.epsilon_remaining,
            inputs={i.name: {"owner": i.owner} for i in self.manifest.inputs},
            release={"release_id": spend.release_id, "tx": spend.release_tx}, simulated=spend.simulated or record.simulated,
        )
        attestation = sign_and_attest(envelope, dstack=self.dstack, app_compose=self.app_compose, chain=evidence)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_attestation(attestation, self.out_dir / f"round-{self.contract.round}.attestation.json")
        (self.out_dir / f"round-{self.contract.round}.model.f32").write_bytes(weights.tobytes())
        self._outcome = _Outcome("published", attestation=attestation, weights=weights)

    def run_closer(self, stop: threading.Event) -> None:
        """Close at the deadline, or earlier when woken after an update and ``run_round`` allows it."""
        while not stop.is_set() and self._outcome.state == "open":
            stop.wait(timeout=min(1.0, max(0.05, self.contract.deadline - self.clock())))
            self.try_close()


def make_app(aggregator: RoundAggregator):
    """The FastAPI shell over a :class:`RoundAggregator` (loopback only; see the module docstring)."""
    from fastapi import FastAPI, HTTPException, Query
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="Sealroom federated aggregator (SIMULATED CVM)")

    @app.get("/attestation")
    def attestation(nonce: str = Query(pattern="^[0-9a-f]{32,128}$")) -> AggregatorAttestation:
        return aggregator.attestation(bytes.fromhex(nonce))

    @app.get("/parent")
    def parent() -> dict[str, str]:
        return {"digest": vector_digest(aggregator.parent), "weights": aggregator.parent.tobytes().hex()}

    @app.post("/update")
    async def update(request: Request) -> UpdateReceived:
        declared = request.headers.get("content-length", "")
        if not declared.isdigit():
            raise HTTPException(411, "a sealed update needs a Content-Length")
        if int(declared) > aggregator.max_body_bytes():
            raise HTTPException(413, f"a sealed update for this round is at most {aggregator.max_body_bytes()} bytes")
        sealed = await request.body()
        try:
            received = await run_in_threadpool(aggregator.receive, sealed)
        except UpdateUnreadable as exc:
            raise HTTPException(400, str(exc)) from None
        except RoundClosed as exc:
            raise HTTPException(409, str(exc)) from None
        await run_in_threadpool(aggregator.try_close)
        return received

    @app.post("/close")
    def close() -> RoundStatus:
        return aggregator.try_close()

    @app.get("/result")
    def result() -> RoundStatus:
        return aggregator.status()

    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cvm.aggregator", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--kms-url", required=True)
    parser.add_argument("--rpc-url", required=True)
    parser.add_argument("--dstack-kms", required=True)
    parser.add_argument("--parent", type=Path, required=True, help="parent model: canonical float32 bytes")
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--previous", type=Path, help="the previous round's attestation.json (round > 1)")
    parser.add_argument("--allow-simulated", action="store_true", help="accept a SIMULATED previous record")
    parser.add_argument("--simulated-root", type=Path, help="the pinned simulated TDX root (DER)")
    parser.add_argument("--evaluation", type=Path, help="the public reference cohort the round contract names")
    args = parser.parse_args(argv)
    import uvicorn

    dstack = DstackClient()
    try:
        with KmsClient(args.kms_url) as kms, Chain(args.rpc_url) as chain:
            state = AccountantState()
            if args.previous is not None:
                previous = verify_round_attestation(
                    json.loads(args.previous.read_text()), app_id=measured_recipe(dstack)[0], now=int(time.time()),
                    allow_simulated=args.allow_simulated,
                    simulated_root_der=args.simulated_root.read_bytes() if args.simulated_root else None)
                state = previous.accountant_state
                parent_digest = vector_digest(np.frombuffer(args.parent.read_bytes(), "<f4").copy())
                if previous.record.lineage.child != parent_digest:
                    raise RoundRecordInvalid("the previous round did not produce this round's parent model")
            reference = None
            if args.evaluation is not None:
                from cvm.federated.task import ReferenceCohort

                reference = ReferenceCohort.load(args.evaluation)
            aggregator = RoundAggregator(dstack=dstack, kms=kms, chain=chain, dstack_kms=args.dstack_kms,
                                         parent=np.frombuffer(args.parent.read_bytes(), "<f4").copy(),
                                         accountant_state=state, out_dir=args.out_dir, reference=reference)
            stop = threading.Event()
            closer = threading.Thread(target=aggregator.run_closer, args=(stop,), daemon=True)
            closer.start()
            print(f"SIMULATED CVM aggregator for round {aggregator.contract.round} on 127.0.0.1:{args.port}",
                  flush=True)
            uvicorn.run(make_app(aggregator), host="127.0.0.1", port=args.port, log_level="warning")
            stop.set()
    except (AggregatorError, MeasuredRecipeMismatch, KmsError, ChainError, OSError, ValueError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
