"""`seal verify`: walk a run's receipt (attestation.json) link by link, from raw evidence (DESIGN.md, "The chain
of trust" and §6 step 7; issue 6).

:func:`verify_receipt` re-derives seven links and reports every one of them — ``ok``, ``warning`` (holds, with a
caveat printed loudly) or ``failed`` (with the reason) — without stopping at the first failure:

1. ``quote``: the TDX quote verifies (real: Intel DCAP with collateral at time ``now``; SIMULATED: only when
   allowed, against the pinned simulated root); its TCB status; not a debug TD; the receipt's ``simulated`` flag
   says what the quote is.
2. ``event-log``: the event log replays to the quote's RTMR3 (and RTMR0-2); app_id and compose_hash are read
   from that replay.
3. ``compose``: ``sha256(app-compose.json as shipped)`` is that compose hash; the study manifest inside it.
4. ``on-chain``: on the DstackApp whose address is the app_id, at the recorded block: the hash was allowed, who
   approved and when (block timestamps), the release that spent the budget; and now: revoked since? (a WARNING,
   not a failure: the run happened before), budget spent and left.
5. ``signature-chain``: the signature over the envelope digest recovers, through the app key, to a KMS root that
   is the pinned one, the one DstackKms registered at the recorded block, the one the receipt names and the one
   the CVM measured as its key provider; DstackKms registered the app and allowed the OS image the CVM booted.
6. ``envelope``: the envelope hashes to the signed digest, which the quote's report_data binds; the payload
   matches its digest; the envelope names the attested recipe, this chain and contracts, and the quote's kind.
7. ``output``: output type, ε (spent by the release and by the analysis), δ and inputs match the manifest.

Each link checks relations between pieces of raw evidence, so a tampered field breaks the link that reads it.
Where a link needs a value that an earlier link failed to prove (the recipe when the event log does not replay,
RTMR3 when the quote does not verify), it uses the receipt's unproven claim and says so in its facts: the report
then shows whether everything else holds. The chain is read through the caller's connection and nothing in the
receipt is trusted because the receipt says so; what the auditor pins is the simulated root (for SIMULATED
quotes), Intel's root (in :mod:`cvm.attest.verify`) and the KMS root address. The block the run saw is signed in the
envelope (``envelope.block``); ``chain.block`` must repeat it, and the chain bounds it too (not before the release,
not after the head).

Errors::

    ReceiptError
    └── NotAReceipt(reason)   the document is not a sealroom-attestation/v1 receipt: nothing to verify

Every other problem with a receipt is a failed link in the report, not an exception. Caller mistakes (a
non-integer ``now``, ``allow_simulated`` without a pinned root) raise TypeError/ValueError.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import hmac
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import requests
from eth_abi.exceptions import DecodingError
from eth_keys import keys as eth_keys
from eth_keys.exceptions import ValidationError as EthKeysValidationError
from eth_utils import is_address, to_checksum_address
from rich.markup import escape
from web3.exceptions import Web3Exception

from compose.app_compose import (
    InvalidAppCompose,
    compose_hash,
    manifest_from_app_compose,
    normalized_json_bytes,
)
from compose.manifest import StudyManifest
from contracts.chain import (
    EPSILON_SCALE,
    Chain,
    ChainError,
    ChainUnreachable,
    DstackApp,
    DstackKms,
    to_micro_epsilon,
)
from cvm.attest.eventlog import (
    RTMR3_INDEX,
    BootEvents,
    parse_event_log,
    replay_event_log,
    replay_rtmr,
)
from cvm.attest.tdx_quote import TdxQuote, parse_quote_unverified
from cvm.attest.verify import (
    AttestationError,
    QuoteClaims,
    SimulatedQuoteNotAllowed,
    verify_attestation,
    verify_quote,
)
from cvm.labels import INPUTS_EVENT
from cvm.receipt import (
    ATTESTATION_FORMAT,
    RESULT_FORMAT,
    SIGN_ALGORITHM,
    SIGN_PURPOSE,
    envelope_digest,
)
from kms_client.signature_chain import SignatureChainMismatch, recover_signature_chain

__all__ = [
    "LINKS",
    "LinkResult",
    "LinkStatus",
    "NotAReceipt",
    "ReceiptError",
    "VerificationReport",
    "load_receipt",
    "render_checklist",
    "verify_receipt",
]

# (number, name, what the link checks) — the seven links, in order.
LINKS = (
    (1, "quote", "the TDX quote verifies to a pinned root; TCB status; not a debug TD"),
    (2, "event-log", "the event log replays to the quote's RTMR3; app_id and compose_hash come from it"),
    (3, "compose", "sha256(app-compose.json as shipped) is the measured compose hash; the manifest inside"),
    (4, "on-chain", "the compose hash was allowed at the recorded block; approvals, release, revocations, budget"),
    (5, "signature-chain", "the envelope's signature chain recovers to the pinned KMS root registered in DstackKms"),
    (6, "envelope", "the quote's report_data binds this envelope's digest; the payload matches its digest"),
    (7, "output", "the output type, ε, δ and inputs match the manifest"),
)
_UP_TO_DATE = "UpToDate"


class ReceiptError(Exception):
    """Base of this module's outcomes."""


class NotAReceipt(ReceiptError):
    """The document is not a ``sealroom-attestation/v1`` receipt (not JSON, not an object, another format)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LinkStatus(enum.StrEnum):
    OK = "ok"
    WARNING = "warning"  # the link holds, with a caveat the auditor must read
    FAILED = "failed"


@dataclass(frozen=True)
class LinkResult:
    """One link of the chain of trust: what it checks, whether it holds, why not, and what was found."""

    number: int
    name: str
    check: str
    status: LinkStatus
    summary: str  # what was found, in one line
    reason: str | None = None  # why it failed, or the warning
    facts: dict[str, Any] = field(default_factory=dict)
    unreachable: bool = False  # failed because the chain could not be reached

    @property
    def holds(self) -> bool:
        return self.status is not LinkStatus.FAILED

    def to_json(self) -> dict[str, Any]:
        return {"link": self.number, "name": self.name, "check": self.check, "status": str(self.status),
                "summary": self.summary, "reason": self.reason, "unreachable": self.unreachable, "facts": self.facts}


@dataclass(frozen=True)
class VerificationReport:
    """Every link's result. ``simulated`` is True for a SIMULATED quote, None when the quote's kind is unknown."""

    links: tuple[LinkResult, ...]
    simulated: bool | None
    verified_at: int

    @property
    def ok(self) -> bool:
        return all(link.holds for link in self.links)

    @property
    def first_failure(self) -> LinkResult | None:
        return next((link for link in self.links if not link.holds), None)

    @property
    def warnings(self) -> list[LinkResult]:
        return [link for link in self.links if link.status is LinkStatus.WARNING]

    @property
    def verdict(self) -> str:
        kind = " — SIMULATED TEE: proves nothing about hardware" if self.simulated else ""
        if not self.ok:
            first = self.first_failure
            return f"FAILED at link {first.number} ({first.name}){kind}"
        return f"VERIFIED{kind}"

    def link(self, name: str) -> LinkResult:
        return next(link for link in self.links if link.name == name)

    def to_json(self) -> dict[str, Any]:
        first = self.first_failure
        return {
            "format": "sealroom-verification/v1",
            "verdict": self.verdict,
            "ok": self.ok,
            "simulated": self.simulated,
            "verified_at": self.verified_at,
            "first_failure": None if first is None else {"link": first.number, "name": first.name,
                                                         "reason": first.reason},
            "warnings": [{"link": w.number, "name": w.name, "warning": w.reason} for w in self.warnings],
            "links": [link.to_json() for link in self.links],
        }


def load_receipt(text: str | bytes) -> dict[str, Any]:
    """Parse attestation.json strictly (no NaN/Infinity, no repeated keys); raise :class:`NotAReceipt`."""

    def refuse_constant(name: str) -> None:
        raise NotAReceipt(f"the receipt holds {name}, which is not JSON")

    def refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        if len(set(keys)) != len(keys):
            raise NotAReceipt("the receipt repeats a JSON key")
        return dict(pairs)

    try:
        receipt = json.loads(text, parse_constant=refuse_constant, object_pairs_hook=refuse_duplicates)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NotAReceipt(f"the receipt is not JSON: {exc}") from None
    _check_format(receipt)
    return receipt


def _check_format(receipt: Any) -> None:
    if not isinstance(receipt, dict):
        raise NotAReceipt("the receipt is not a JSON object")
    if receipt.get("format") != ATTESTATION_FORMAT:
        raise NotAReceipt(f"the receipt's format is {receipt.get('format')!r}, not {ATTESTATION_FORMAT!r}")


def verify_receipt(
    receipt: Mapping[str, Any],
    *,
    now: int,
    chain: Chain | None,
    kms_root: str | None = None,
    collateral: str | None = None,
    allow_simulated: bool = False,
    simulated_root_der: bytes | None = None,
) -> VerificationReport:
    """Check every link of a receipt (see the module docstring) and report each; never stops at a failure.

    ``now`` (unix seconds) is the time certificates and DCAP collateral are judged at. ``chain`` is a connection
    to the chain the study lives on (None when it cannot be reached: the links that read it then fail as
    unreachable). ``kms_root`` pins the KMS root address (0x, checksum or not); without it the root
    registered in DstackKms is used, with a warning. ``collateral`` (DCAP collateral JSON) overrides the one
    the receipt carries. SIMULATED quotes pass link 1 only with ``allow_simulated`` and the pinned
    ``simulated_root_der``. Raises :class:`NotAReceipt` if there is no v1 receipt to check.
    """
    if not isinstance(now, int) or isinstance(now, bool):
        raise TypeError("now must be an int (unix seconds)")
    if kms_root is not None and not (isinstance(kms_root, str) and kms_root.startswith("0x") and is_address(kms_root)):
        raise ValueError("kms_root must be a 0x-prefixed 20-byte address")
    if allow_simulated and not isinstance(simulated_root_der, bytes):
        raise ValueError("allow_simulated needs simulated_root_der (the pinned simulated root, DER)")
    _check_format(receipt)
    return _Walk(receipt, now=now, chain=chain, kms_root=kms_root, collateral=collateral,
                 allow_simulated=allow_simulated, simulated_root_der=simulated_root_der).run()


# ---- the walk --------------------------------------------------------------------------------------------------


class _Broken(Exception):
    """Inside a link: it does not hold. Never leaves this module."""

    def __init__(self, reason: str, *, unreachable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unreachable = unreachable


@dataclass
class _Record:
    """What one link found while it ran."""

    facts: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # failures that do not stop the link's other checks


@dataclass(frozen=True)
class _Release:
    """The DstackApp's BudgetSpent record of the run's key release."""

    owners: tuple[str, ...]
    epsilon_micro: int
    remaining_micro: int
    block: int


class _Walk:
    """One verification: the links in order, each leaving what it proved for the later ones."""

    def __init__(self, receipt: Mapping[str, Any], *, now: int, chain: Chain | None, kms_root: str | None,
                 collateral: str | None, allow_simulated: bool, simulated_root_der: bytes | None) -> None:
        self.receipt = receipt
        self.now = now
        self.chain = chain
        self.kms_root = None if kms_root is None else to_checksum_address(kms_root)
        self.collateral = collateral
        self.allow_simulated = allow_simulated
        self.simulated_root_der = simulated_root_der
        # Filled in by the links, for the later ones.
        self.quote: bytes | None = None
        self.parsed: TdxQuote | None = None
        self.claims: QuoteClaims | None = None
        self.simulated: bool | None = None
        self.boot: BootEvents | None = None
        self.app_id: bytes | None = None
        self.compose_hash: bytes | None = None
        self.recipe_attested = False
        self.manifest: StudyManifest | None = None
        self.recorded_block: int | None = None
        self.budget_micro: int | None = None
        self.release: _Release | None = None
        self.verified_collateral: str | None = None

    def run(self) -> VerificationReport:
        checks = (self._quote_link, self._event_log_link, self._compose_link, self._on_chain_link,
                  self._signature_link, self._envelope_link, self._output_link)
        results = tuple(self._run_link(number, name, check, method)
                        for (number, name, check), method in zip(LINKS, checks))
        return VerificationReport(links=results, simulated=self.simulated, verified_at=self.now)

    @staticmethod
    def _run_link(number: int, name: str, check: str, method: Any) -> LinkResult:
        record = _Record()
        try:
            method(record)
        except _Broken as broken:
            reason = "; ".join([*record.problems, broken.reason])
            return LinkResult(number, name, check, LinkStatus.FAILED, record.summary or "not established",
                              reason, record.facts, unreachable=broken.unreachable)
        if record.problems:
            return LinkResult(number, name, check, LinkStatus.FAILED, record.summary, "; ".join(record.problems),
                              record.facts)
        status = LinkStatus.WARNING if record.warnings else LinkStatus.OK
        return LinkResult(number, name, check, status, record.summary, "; ".join(record.warnings) or None,
                          record.facts)

    # ---- link 1 ---------------------------------------------------------------------------------------------

    def _quote_link(self, record: _Record) -> None:
        self.quote = _hex(_field(self.receipt, "quote", str), "quote")
        try:
            self.parsed = parse_quote_unverified(self.quote)
        except AttestationError as exc:
            raise _Broken(str(exc)) from None
        collateral = self._collateral(record)
        try:
            claims = verify_quote(self.quote, **self._quote_kwargs(collateral))
        except SimulatedQuoteNotAllowed as exc:
            self.simulated = True
            record.facts["kind"] = "SIMULATED TDX"
            record.summary = "a SIMULATED TDX quote, which proves nothing about hardware: not accepted"
            self._check_simulated_flag(record)
            raise _Broken(exc.reason) from None
        except AttestationError as exc:
            raise _Broken(str(exc)) from None
        self.claims, self.simulated = claims, claims.simulated
        self.verified_collateral = collateral
        if claims.simulated and collateral is not None:
            record.problems.append("the receipt carries DCAP collateral for a SIMULATED quote")
        kind = "SIMULATED TDX" if claims.simulated else "Intel TDX"
        record.facts.update(kind=kind, tcb_status=claims.tcb_status, advisory_ids=list(claims.advisory_ids),
                            debug=claims.debug, fmspc=claims.fmspc, mrtd=claims.mrtd.hex(), rtmr3=claims.rtmr3.hex(),
                            report_data=claims.report_data.hex())
        if claims.simulated:
            record.facts["simulated_root_sha256"] = hashlib.sha256(self.simulated_root_der).hexdigest()
        self._check_simulated_flag(record)
        root = "the pinned SIMULATED root" if claims.simulated else "Intel's SGX root (DCAP)"
        record.summary = f"{kind} quote verified to {root}; TCB {claims.tcb_status}; not a debug TD"
        if claims.tcb_status != _UP_TO_DATE:
            advisories = ", ".join(claims.advisory_ids) or "none listed"
            record.warnings.append(f"the platform's TCB status is {claims.tcb_status} (advisories: {advisories})")

    def _collateral(self, record: _Record) -> str | None:
        carried = _field(self.receipt, "collateral", (dict, str, type(None)))
        if self.collateral is not None:
            record.facts["collateral"] = "given by the auditor"
            return self.collateral
        record.facts["collateral"] = "none" if carried is None else "carried by the receipt"
        return json.dumps(carried) if isinstance(carried, dict) else carried

    def _quote_kwargs(self, collateral: str | None) -> dict[str, Any]:
        return {"collateral": collateral, "now": self.now, "allow_simulated": self.allow_simulated,
                "simulated_root_der": self.simulated_root_der}

    def _check_simulated_flag(self, record: _Record) -> None:
        flag = self.receipt.get("simulated")
        if not isinstance(flag, bool):
            record.problems.append("the receipt has no true/false simulated flag")
        elif flag != self.simulated:
            record.problems.append(f"the receipt says its quote is {'SIMULATED' if flag else 'real'}, but it is "
                                   f"{'SIMULATED' if self.simulated else 'real'}")

    # ---- link 2 ---------------------------------------------------------------------------------------------

    def _event_log_link(self, record: _Record) -> None:
        self._recipe_from_envelope()
        if self.parsed is None:
            raise _Broken("cannot be checked: the quote does not parse (link 1)")
        event_log = _field(self.receipt, "event_log", (str, list))
        try:
            if self.claims is not None:
                boot = verify_attestation(self.quote, event_log, **self._quote_kwargs(self.verified_collateral))
                events = boot.events
            else:
                record.facts["rtmr3_from"] = "the unverified quote (link 1 failed)"
                events = replay_event_log(event_log, self.parsed.body.rtmr3)
        except AttestationError as exc:
            raise _Broken(str(exc)) from None
        self._check_boot_rtmrs(record, event_log)
        self.boot = events
        self.app_id, self.compose_hash, self.recipe_attested = events.app_id, events.compose_hash, True
        record.facts.update(
            app_id="0x" + events.app_id.hex(), compose_hash=events.compose_hash.hex(),
            instance_id=events.instance_id.hex() if events.instance_id else None,
            os_image_hash=events.os_image_hash.hex() if events.os_image_hash else None,
            key_provider=events.key_provider, rtmr3_events=len(events.events),
            app_events=[event.name for event in events.app_events],
        )
        record.summary = (f"{len(events.events)} RTMR3 events replay; app_id 0x{events.app_id.hex()}, "
                          f"compose hash {events.compose_hash.hex()}")

    def _check_boot_rtmrs(self, record: _Record, event_log: str | list) -> None:
        # RTMR3 was replayed above; the firmware/OS entries (RTMR0-2) must replay to the quote's registers too,
        # as dstack's verifier replays all four, so that no entry of the log is unaccounted for. Only their
        # digests are bound: their names and types are labels (dstack strips their payloads).
        entries = parse_event_log(event_log)
        for index in range(RTMR3_INDEX):
            replayed = replay_rtmr(entry.digest for entry in entries if entry.imr == index)
            if not hmac.compare_digest(replayed, getattr(self.parsed.body, f"rtmr{index}")):
                record.problems.append(f"the event log's RTMR{index} entries do not replay to the quote's RTMR{index}")

    def _recipe_from_envelope(self) -> None:
        """The envelope's unproven claim of the recipe, for later links should the event log not prove it."""
        envelope = self.receipt.get("envelope")
        if not isinstance(envelope, dict):
            return
        try:
            self.app_id = _hex(_field(envelope, "app_id", str), "envelope.app_id", size=20)
            self.compose_hash = _hex(_field(envelope, "compose_hash", str), "envelope.compose_hash", size=32)
        except _Broken:
            self.app_id = self.compose_hash = None

    def _recipe_note(self, record: _Record) -> None:
        if not self.recipe_attested:
            record.facts["recipe_from"] = "the envelope's claim (not attested: link 2 failed)"

    def _need_recipe(self) -> tuple[bytes, bytes]:
        if self.app_id is None or self.compose_hash is None:
            raise _Broken("cannot be checked: neither the event log nor the envelope names the recipe")
        return self.app_id, self.compose_hash

    # ---- link 3 ---------------------------------------------------------------------------------------------

    def _compose_link(self, record: _Record) -> None:
        text = _field(self.receipt, "app_compose", str)
        try:
            body = text.encode("utf-8")
        except UnicodeEncodeError:
            raise _Broken("app_compose is not valid Unicode text") from None
        shipped = compose_hash(body)
        record.facts["sha256"] = shipped.hex()
        _app_id, measured = self._need_recipe()
        self._recipe_note(record)
        if not hmac.compare_digest(shipped, measured):
            raise _Broken(f"sha256(app-compose.json) is {shipped.hex()}, but the CVM was measured as "
                          f"{measured.hex()}: this is not the compose that ran")
        try:
            manifest = manifest_from_app_compose(body)
        except InvalidAppCompose as exc:
            raise _Broken(f"the compose carries no valid study manifest: {exc.reason}") from None
        self.manifest = manifest
        record.facts["manifest"] = manifest.model_dump(mode="json")
        inputs = ", ".join(f"{item.name} ({item.owner})" for item in manifest.inputs)
        record.summary = (f"study {manifest.study!r}: {manifest.analysis.kind} on {inputs}; "
                          f"ε={manifest.epsilon:g}, δ={manifest.delta:g}; output {manifest.output_type}")

    # ---- link 4 ---------------------------------------------------------------------------------------------

    def _on_chain_link(self, record: _Record) -> None:
        app_id, h = self._need_recipe()
        self._recipe_note(record)
        recorded = _field(self.receipt, "chain", dict)
        chain = self._need_chain()
        chain_id = _field(recorded, "chain_id", int, "chain.chain_id")
        if chain_id != chain.chain_id:
            raise _Broken(f"the receipt is for chain {chain_id}, but {chain.rpc_url} serves chain {chain.chain_id}")
        address = to_checksum_address(app_id)
        named = _field(recorded, "dstack_app", str, "chain.dstack_app")
        if named != address:
            raise _Broken(f"chain.dstack_app is {named}, but the CVM was measured with app_id {address} "
                          "(the DstackApp's address is the app_id)")
        block = _field(recorded, "block", int, "chain.block")
        signed_block = _field(_field(self.receipt, "envelope", dict), "block", int, "envelope.block")
        if block != signed_block:
            raise _Broken(f"chain.block {block} is not the block {signed_block} the CVM signed into the envelope")
        app = DstackApp(chain, address)
        with _chain_errors(chain, "DstackApp", address):
            latest = chain.w3.eth.block_number
            if not 0 <= block <= latest:
                raise _Broken(f"the recorded block {block} is not on this chain (latest is {latest})")
            self.recorded_block = block
            then = _ComposeState.read(chain, app, h, block)
            approvals = app.approval_events(h, to_block=block)
            release = self._release(app, h)
            self.budget_micro = chain.view(app.ARTIFACT, app.contract, "epsilonBudget", block=block)
            spent_then = chain.view(app.ARTIFACT, app.contract, "epsilonSpent", block=block)
            spent_now = chain.view(app.ARTIFACT, app.contract, "epsilonSpent")
            revocations = app.contract.events.ComposeHashRevoked().get_logs(
                argument_filters={"composeHash": h}, from_block=0, to_block=latest)
            times = {n: _block_time(chain, n) for n in {block, release.block, *(a["block"] for a in approvals),
                                                         *(log["blockNumber"] for log in revocations)}}
        record.facts.update(
            dstack_app=address, recorded_block=block, recorded_block_time=times[block],
            at_recorded_block=then.to_json(),
            approvals=[{"owner": a["owner"], "block": a["block"], "time": times[a["block"]], "tx": a["tx"]}
                       for a in approvals],
            release={"owners": list(release.owners), "epsilon": release.epsilon_micro / EPSILON_SCALE,
                     "block": release.block, "time": times[release.block]},
            budget={"epsilon_budget": self.budget_micro / EPSILON_SCALE,
                    "at_recorded_block": _budget_json(self.budget_micro, spent_then),
                    "now": _budget_json(self.budget_micro, spent_now)},
            revocations=[{"owner": log["args"]["owner"], "block": log["blockNumber"],
                          "time": times[log["blockNumber"]]} for log in revocations],
        )
        if not then.allowed:
            raise _Broken(f"at the recorded block {block} the compose hash was {then.describe()}")
        if not _same_json(_field(recorded, "approvals", list, "chain.approvals"), approvals):
            record.problems.append("chain.approvals in the receipt differ from the chain's ComposeHashApproved "
                                   f"events up to block {block}")
        if release.block > block:
            record.problems.append(f"the release was recorded at block {release.block}, after the recorded block")
        not_consenting = sorted(set(release.owners) - {approval["owner"] for approval in approvals})
        if not_consenting:
            record.problems.append(f"the release names owners who had not approved: {', '.join(not_consenting)}")
        self.release = release
        approvers = ", ".join(f"{a['owner']} (block {a['block']}, {times[a['block']]})" for a in approvals)
        record.summary = (f"allowed at block {block} ({times[block]}) with {then.approvals}/{then.threshold} "
                          f"approvals: {approvers}; release at block {release.block} spent "
                          f"ε={release.epsilon_micro / EPSILON_SCALE:g}; budget ε {spent_now / EPSILON_SCALE:g} "
                          f"of {self.budget_micro / EPSILON_SCALE:g} spent now")
        for log in revocations:
            record.warnings.append(
                f"REVOKED AFTER THE RUN: {log['args']['owner']} revoked this compose hash at block "
                f"{log['blockNumber']} ({times[log['blockNumber']]}); the run (block {block}) came before, so its "
                "result stands, but this recipe can never run again")

    def _release(self, app: DstackApp, h: bytes) -> _Release:
        envelope = _field(self.receipt, "envelope", dict)
        named = _field(envelope, "release", dict, "envelope.release")
        release_id = _hex(_field(named, "release_id", str, "envelope.release.release_id"), "release_id", size=32)
        tx = _hex(_field(named, "tx", str, "envelope.release.tx"), "envelope.release.tx", size=32)
        logs = app.contract.events.BudgetSpent().get_logs(argument_filters={"releaseId": release_id}, from_block=0)
        if len(logs) != 1:
            raise _Broken(f"release {release_id.hex()} is not recorded on the DstackApp {app.address}")
        log = logs[0]
        if bytes(log["transactionHash"]) != tx:
            raise _Broken(f"release {release_id.hex()} was recorded in another transaction than the envelope names")
        if bytes(log["args"]["composeHash"]) != h:
            raise _Broken(f"release {release_id.hex()} spent the budget of another compose hash")
        return _Release(owners=tuple(to_checksum_address(o) for o in log["args"]["owners"]),
                        epsilon_micro=log["args"]["epsilon"], remaining_micro=log["args"]["remaining"],
                        block=log["blockNumber"])

    def _need_chain(self) -> Chain:
        if self.chain is None:
            raise _Broken("cannot be checked: the chain could not be reached", unreachable=True)
        return self.chain

    # ---- link 5 ---------------------------------------------------------------------------------------------

    def _signature_link(self, record: _Record) -> None:
        app_id, _h = self._need_recipe()
        self._recipe_note(record)
        signature = _field(self.receipt, "signature", dict)
        algorithm = _field(signature, "algorithm", str, "signature.algorithm")
        purpose = _field(signature, "purpose", str, "signature.purpose")
        if (algorithm, purpose) != (SIGN_ALGORITHM, SIGN_PURPOSE):
            raise _Broken(f"the signature is {algorithm!r} with purpose {purpose!r}; {RESULT_FORMAT} envelopes "
                          f"are signed {SIGN_ALGORITHM!r} with purpose {SIGN_PURPOSE!r} (dstack's Sign)")
        digest = _hex(_field(self.receipt, "envelope_digest", str), "envelope_digest", size=32)
        signatures = _field(signature, "signature_chain", list, "signature.signature_chain")
        # dstack's Sign returns the message signature twice: alone and first in the chain. Both must agree.
        if not signatures or _field(signature, "signature", str, "signature.signature") != signatures[0]:
            raise _Broken("signature.signature is not the first signature of signature.signature_chain")
        try:
            roots = recover_signature_chain(
                digest, signatures,
                message_pubkey=_field(signature, "public_key", str, "signature.public_key"),
                app_id=app_id, purpose=purpose, algorithm=algorithm)
        except SignatureChainMismatch as exc:
            raise _Broken(f"the signature chain breaks at its {exc.link} link: {exc.reason}") from None
        root = roots.kms_root_address
        record.facts.update(message_pubkey=roots.message_pubkey.hex(), app_pubkey=roots.app_pubkey.hex(),
                            recovered_kms_root=root, pinned_kms_root=self.kms_root)
        record.summary = f"signed by an app key of 0x{app_id.hex()} that KMS root {root} issued"
        if self.kms_root is None:
            record.warnings.append(f"no KMS root pinned (--kms-root): the chain leads to {root}, which is only "
                                   "compared with what DstackKms registers")
        elif self.kms_root != root:
            record.problems.append(f"the chain ends at {root}, not the pinned KMS root {self.kms_root}")
        recorded = _field(self.receipt, "chain", dict)
        named = _field(recorded, "kms_root_address", str, "chain.kms_root_address")
        if named != root:
            record.problems.append(f"the receipt names KMS root {named}, but the chain ends at {root}")
        self._check_key_provider(record, roots.kms_root_pubkey)
        self._check_registry(record, recorded, app_id, root)

    def _check_key_provider(self, record: _Record, root_pubkey: bytes) -> None:
        # dstack measures {"name":"kms","id":<hex>} at boot; Sealroom's id is the KMS root's k256 key. A real
        # dstack guest measures its KMS's CA key instead, which cannot be compared with a k256 root.
        provider = self.boot.key_provider if self.boot is not None else None
        measured = provider.get("id") if isinstance(provider, dict) else None
        try:
            measured_key = bytes.fromhex(measured) if isinstance(measured, str) else b""
        except ValueError:
            measured_key = b""
        if len(measured_key) != 33:
            record.facts["measured_key_provider"] = "not a k256 KMS root; not compared"
            return
        record.facts["measured_key_provider"] = measured_key.hex()
        if not hmac.compare_digest(measured_key, root_pubkey):
            record.problems.append("the CVM measured another KMS as its key provider than the one the chain leads to")

    def _check_registry(self, record: _Record, recorded: dict, app_id: bytes, root: str) -> None:
        """DstackKms at the recorded block: registered this root, this app and the OS image the CVM booted."""
        chain = self._need_chain()
        named = _field(recorded, "dstack_kms", str, "chain.dstack_kms")
        if not is_address(named):
            raise _Broken(f"chain.dstack_kms {named!r} is not an address")
        registry = DstackKms(chain, named)
        at = self.recorded_block if self.recorded_block is not None else "latest"
        with _chain_errors(chain, "DstackKms", registry.address):
            then = _root_address(chain.view(registry.ARTIFACT, registry.contract, "kmsInfo", block=at)[0])
            now = _root_address(registry.kms_root_pubkey())
            registered_app = chain.view(registry.ARTIFACT, registry.contract, "registeredApps",
                                        to_checksum_address(app_id), block=at)
            os_image = self.boot.os_image_hash if self.boot is not None else None
            os_image_allowed = os_image is not None and chain.view(registry.ARTIFACT, registry.contract,
                                                                   "allowedOsImages", os_image, block=at)
        record.facts.update(dstack_kms=registry.address, registered_kms_root=then, registered_kms_root_now=now,
                            registered_at=at, app_registered=registered_app, os_image_allowed=os_image_allowed)
        if then != root:
            registered = "no KMS root" if then is None else f"KMS root {then}"
            record.problems.append(f"DstackKms {registry.address} registered {registered} at block {at}, not {root}")
        elif now != then:
            record.warnings.append(f"DstackKms has registered another KMS root since the run: {now}")
        if not registered_app:
            record.problems.append(f"the app 0x{app_id.hex()} is not registered in DstackKms {registry.address}")
        if self.boot is None:
            record.problems.append("the OS image cannot be checked: it is measured in the event log (link 2)")
        elif not os_image_allowed:
            measured = "no OS image" if os_image is None else f"OS image {os_image.hex()}"
            record.problems.append(f"the CVM booted {measured}, which DstackKms {registry.address} does not allow")

    # ---- link 6 ---------------------------------------------------------------------------------------------

    def _envelope_link(self, record: _Record) -> None:
        envelope = _field(self.receipt, "envelope", dict)
        stated = _hex(_field(self.receipt, "envelope_digest", str), "envelope_digest", size=32)
        if _field(envelope, "format", str, "envelope.format") != RESULT_FORMAT:
            raise _Broken(f"the envelope is not {RESULT_FORMAT}")
        recomputed = envelope_digest(envelope)
        record.facts.update(envelope_digest=recomputed.hex())
        if not hmac.compare_digest(recomputed, stated):
            record.problems.append(f"the envelope hashes to {recomputed.hex()}, not the signed digest "
                                   f"{stated.hex()}: it was changed after signing")
        if self.parsed is None:
            record.problems.append("the quote does not parse, so its report_data cannot be compared (link 1)")
        elif not hmac.compare_digest(self.parsed.body.report_data, stated.ljust(64, b"\0")):
            record.problems.append("the quote's report_data binds another envelope, not this one: it is another "
                                   "run's quote")
        payload = _field(envelope, "payload", dict, "envelope.payload")
        payload_digest = hashlib.sha256(normalized_json_bytes(payload)).hexdigest()
        if _field(envelope, "payload_sha256", str, "envelope.payload_sha256") != payload_digest:
            record.problems.append("the payload does not match envelope.payload_sha256")
        self._check_envelope_names(record, envelope)
        record.summary = f"envelope digest {recomputed.hex()}, payload sha256 {payload_digest}"

    def _check_envelope_names(self, record: _Record, envelope: dict) -> None:
        """The envelope's own statements agree with the attested recipe, the receipt's chain and the quote."""
        app_id, h = self._need_recipe()
        recorded = _field(self.receipt, "chain", dict)
        expected = {
            "app_id": "0x" + app_id.hex(),
            "compose_hash": h.hex(),
            "chain_id": _field(recorded, "chain_id", int, "chain.chain_id"),
            "dstack_app": _field(recorded, "dstack_app", str, "chain.dstack_app"),
            "dstack_kms": _field(recorded, "dstack_kms", str, "chain.dstack_kms"),
        }
        if self.simulated is not None:
            expected["simulated"] = self.simulated
        wrong = sorted(key for key, value in expected.items() if not _same_json(envelope.get(key), value))
        if wrong:
            record.problems.append(f"the envelope's {', '.join(wrong)} differ from the attested recipe, the "
                                   "receipt's chain section or the quote")

    # ---- link 7 ---------------------------------------------------------------------------------------------

    def _output_link(self, record: _Record) -> None:
        if self.manifest is None:
            raise _Broken("cannot be checked: no measured manifest (link 3)")
        manifest = self.manifest
        envelope = _field(self.receipt, "envelope", dict)
        payload = _field(envelope, "payload", dict, "envelope.payload")
        output_types = {_field(envelope, "output_type", str, "envelope.output_type"),
                        _field(payload, "output_type", str, "envelope.payload.output_type")}
        if output_types != {manifest.output_type}:
            record.problems.append(f"the output is {' / '.join(sorted(output_types))}, the manifest allows only "
                                   f"{manifest.output_type}")
        spent = _field(payload, "spent", dict, "envelope.payload.spent")
        epsilon = _number(_field(spent, "epsilon", (int, float), "payload.spent.epsilon"), "payload.spent.epsilon")
        delta = _field(spent, "delta", (int, float), "payload.spent.delta")
        if epsilon > to_micro_epsilon(manifest.epsilon) or delta > manifest.delta:
            record.problems.append(f"the analysis spent (ε={epsilon / EPSILON_SCALE:g}, δ={delta:g}), more than "
                                   f"the manifest's (ε={manifest.epsilon:g}, δ={manifest.delta:g})")
        record.facts.update(output_type=manifest.output_type, analysis_spent={"epsilon": epsilon / EPSILON_SCALE,
                                                                                "delta": delta})
        self._check_inputs(record, envelope)
        self._check_release_epsilon(record, envelope)
        record.summary = (f"{' / '.join(sorted(output_types))}; analysis spent ε={epsilon / EPSILON_SCALE:g} of "
                          f"{manifest.epsilon:g}, δ={delta:g} of {manifest.delta:g}")

    def _check_inputs(self, record: _Record, envelope: dict) -> None:
        inputs = _field(envelope, "inputs", dict, "envelope.inputs")
        by_name = {item.name: item for item in self.manifest.inputs}
        if set(inputs) != set(by_name):
            raise _Broken(f"the envelope's inputs {sorted(inputs)} are not the manifest's {sorted(by_name)}")
        digests = {}
        for name, item in by_name.items():
            entry = _field(inputs, name, dict, f"envelope.inputs.{name}")
            digests[name] = _field(entry, "ciphertext_sha256", str, f"envelope.inputs.{name}.ciphertext_sha256")
            if _field(entry, "owner", str, f"envelope.inputs.{name}.owner") != item.owner:
                record.problems.append(f"input {name!r} names another owner than the manifest")
            if item.ciphertext_sha256 is not None and digests[name] != item.ciphertext_sha256:
                record.problems.append(f"input {name!r} is not the ciphertext the manifest names")
        record.facts["inputs"] = digests
        measured = self._measured_inputs()
        if not _same_json(measured, digests):
            record.problems.append(f"the envelope's input digests are not the ones the CVM measured "
                                   f"({INPUTS_EVENT!r} event)")

    def _measured_inputs(self) -> Any:
        if self.boot is None:
            raise _Broken("cannot be checked: the inputs the CVM opened are measured in the event log (link 2)")
        events = [event for event in self.boot.app_events if event.name == INPUTS_EVENT]
        if len(events) != 1:
            raise _Broken(f"the event log holds {len(events)} {INPUTS_EVENT!r} events, not one")
        try:
            return json.loads(events[0].payload)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _Broken(f"the {INPUTS_EVENT!r} event is not JSON") from None

    def _check_release_epsilon(self, record: _Record, envelope: dict) -> None:
        if self.release is None or self.budget_micro is None:
            raise _Broken("cannot be checked: ε is spent on-chain and the release was not found (link 4)")
        release = self.release
        if release.epsilon_micro != to_micro_epsilon(self.manifest.epsilon):
            record.problems.append(f"the release spent ε={release.epsilon_micro / EPSILON_SCALE:g} on-chain, "
                                   f"not the manifest's {self.manifest.epsilon:g}")
        if set(release.owners) != {item.owner for item in self.manifest.inputs}:
            record.problems.append("the release's owners are not the manifest's input owners")
        remaining = _number(_field(envelope, "epsilon_remaining", (int, float)), "envelope.epsilon_remaining")
        spent = _number(_field(envelope, "epsilon_spent", (int, float)), "envelope.epsilon_spent")
        if (spent, remaining) != (self.budget_micro - release.remaining_micro, release.remaining_micro):
            record.problems.append("the envelope's ε spent/remaining differ from the chain's record of the release")


# ---- helpers -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ComposeState:
    proposed: bool
    allowed: bool
    revoked: bool
    approvals: int
    threshold: int

    @classmethod
    def read(cls, chain: Chain, app: DstackApp, h: bytes, block: int) -> _ComposeState:
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


@contextmanager
def _chain_errors(chain: Chain, contract: str, address: str) -> Iterator[None]:
    """The chain's and web3's errors, as a link that does not hold (dependency errors stop here)."""
    try:
        yield
    except ChainUnreachable as exc:
        raise _Broken(str(exc), unreachable=True) from None
    except requests.RequestException as exc:
        raise _Broken(f"chain unreachable at {chain.rpc_url}: {type(exc).__name__}", unreachable=True) from None
    except DecodingError:
        raise _Broken(f"no {contract} contract answers at {address} (at the block asked)") from None
    except (ChainError, Web3Exception) as exc:
        raise _Broken(f"the {contract} at {address} could not be read: {exc}") from None


def _same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values, kinds included (in Python, True == 1 and 1 == 1.0; in a receipt they differ)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _block_time(chain: Chain, number: int) -> str:
    timestamp = chain.w3.eth.get_block(number)["timestamp"]
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _budget_json(budget_micro: int, spent_micro: int) -> dict[str, float]:
    return {"epsilon_spent": spent_micro / EPSILON_SCALE,
            "epsilon_remaining": (budget_micro - spent_micro) / EPSILON_SCALE}


def _root_address(pubkey: bytes) -> str | None:
    try:
        return eth_keys.PublicKey.from_compressed_bytes(bytes(pubkey)).to_checksum_address()
    except (EthKeysValidationError, ValueError):
        return None  # no (valid) root registered


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object",
               list: "a list", type(None): "null"}


def _field(container: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str | None = None) -> Any:
    """``container[key]`` if it is of ``kind`` (bool is never an int here); else the link does not hold."""
    where = where or key
    if key not in container:
        raise _Broken(f"the receipt has no {where}")
    value = container[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = "a number" if float in kinds else " or ".join(_KIND_NAMES[k] for k in kinds)
        raise _Broken(f"{where} is not {names}")
    return value


def _hex(text: str, where: str, *, size: int | None = None) -> bytes:
    try:
        raw = bytes.fromhex(text.removeprefix("0x"))
    except ValueError:
        raise _Broken(f"{where} is not hex") from None
    if size is not None and len(raw) != size:
        raise _Broken(f"{where} is {len(raw)} bytes, not {size}")
    return raw


def _number(value: float, where: str) -> int:
    """A JSON ε as micro-epsilon (the contract's fixed point)."""
    try:
        return to_micro_epsilon(value)
    except ValueError:
        raise _Broken(f"{where} is not a non-negative number") from None


# ---- the checklist ---------------------------------------------------------------------------------------------

_MARKS = {LinkStatus.OK: "[green]✔ ok     [/]", LinkStatus.WARNING: "[bold yellow]! WARNING[/]",
          LinkStatus.FAILED: "[bold red]✘ FAILED [/]"}


def render_checklist(report: VerificationReport) -> str:
    """The report as a checklist (rich markup; text from the receipt is escaped): one line per link, its finding,
    and failures/warnings in full."""
    lines = []
    if report.simulated:
        lines.append("[bold reverse red] SIMULATED [/] [bold red]this receipt comes from a SIMULATED TDX platform: "
                     "it proves nothing about hardware[/]")
    for link in report.links:
        lines.append(f"{_MARKS[link.status]} {link.number} {link.name:<16} {escape(link.check)}")
        lines.append(f"            {escape(link.summary)}")
        if link.reason:
            style = "bold red" if link.status is LinkStatus.FAILED else "bold yellow"
            lines.append(f"            [{style}]{escape(link.reason)}[/]")
    style = "bold green" if report.ok and not report.simulated else ("bold red" if not report.ok else "bold yellow")
    lines.append(f"[{style}]verdict: {escape(report.verdict)}[/]")
    first = report.first_failure
    if first is not None:
        lines.append(f"[bold red]first broken link: {first.number} ({first.name}): {escape(first.reason or '')}[/]")
    return "\n".join(lines)
