"""Link 1, ``quote``: the TDX quote verifies to a pinned root; its TCB status; not a debug TD; the receipt's
``simulated`` flag says what the quote is.

A real quote goes through Intel DCAP with the collateral (the auditor's, else the receipt's) at the pinned time;
a SIMULATED one passes only when the auditor allows it, against the pinned simulated root. A TCB status other
than ``UpToDate`` is a warning (``Revoked`` is refused by the verifier).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from auditor.links.base import Broken, Held, Notes, Pins
from auditor.receipt import Receipt
from cvm.attest.verify import AttestationError, QuoteClaims, SimulatedQuoteNotAllowed, verify_quote

__all__ = ["CHECK", "NAME", "NUMBER", "QuoteProof", "check"]

NUMBER, NAME = 1, "quote"
CHECK = "the TDX quote verifies to a pinned root; TCB status; not a debug TD"
UP_TO_DATE = "UpToDate"


@dataclass(frozen=True)
class QuoteProof:
    """What the quote link established. ``claims`` is None when the quote did not verify (a SIMULATED quote that
    is not accepted: then ``simulated`` is still True); ``collateral`` is the DCAP collateral it verified with."""

    claims: QuoteClaims | None
    simulated: bool | None
    collateral: str | None


def check(receipt: Receipt, pins: Pins) -> Held[QuoteProof]:
    notes = Notes()
    with notes.breaking():
        proof = _check(notes, receipt, pins)
    return notes.held(proof)


def _check(notes: Notes, receipt: Receipt, pins: Pins) -> QuoteProof:
    quote = receipt.quote.get()
    receipt.tdx_quote.get()
    collateral = _collateral(notes, receipt, pins)
    try:
        claims = verify_quote(quote, **pins.quote_kwargs(collateral))
    except SimulatedQuoteNotAllowed as exc:
        notes.facts["kind"] = "SIMULATED TDX"
        notes.summary = "a SIMULATED TDX quote, which proves nothing about hardware: not accepted"
        _check_simulated_flag(notes, receipt, simulated=True)
        raise Broken(exc.reason, proven=QuoteProof(claims=None, simulated=True, collateral=None)) from None
    except AttestationError as exc:
        raise Broken(str(exc)) from None
    if claims.simulated and collateral is not None:
        notes.problems.append("the receipt carries DCAP collateral for a SIMULATED quote")
    kind = "SIMULATED TDX" if claims.simulated else "Intel TDX"
    notes.facts.update(kind=kind, tcb_status=claims.tcb_status, advisory_ids=list(claims.advisory_ids),
                       debug=claims.debug, fmspc=claims.fmspc, mrtd=claims.mrtd.hex(), rtmr3=claims.rtmr3.hex(),
                       report_data=claims.report_data.hex())
    if claims.simulated:
        notes.facts["simulated_root_sha256"] = hashlib.sha256(pins.simulated_root_der).hexdigest()
    _check_simulated_flag(notes, receipt, simulated=claims.simulated)
    root = "the pinned SIMULATED root" if claims.simulated else "Intel's SGX root (DCAP)"
    notes.summary = f"{kind} quote verified to {root}; TCB {claims.tcb_status}; not a debug TD"
    if claims.tcb_status != UP_TO_DATE:
        advisories = ", ".join(claims.advisory_ids) or "none listed"
        notes.warnings.append(f"the platform's TCB status is {claims.tcb_status} (advisories: {advisories})")
    return QuoteProof(claims=claims, simulated=claims.simulated, collateral=collateral)


def _collateral(notes: Notes, receipt: Receipt, pins: Pins) -> str | None:
    carried = receipt.collateral.get()
    if pins.collateral is not None:
        notes.facts["collateral"] = "given by the auditor"
        return pins.collateral
    notes.facts["collateral"] = "none" if carried is None else "carried by the receipt"
    return carried


def _check_simulated_flag(notes: Notes, receipt: Receipt, *, simulated: bool) -> None:
    flag = receipt.simulated
    if flag is None:
        notes.problems.append("the receipt has no true/false simulated flag")
    elif flag != simulated:
        notes.problems.append(f"the receipt says its quote is {'SIMULATED' if flag else 'real'}, but it is "
                              f"{'SIMULATED' if simulated else 'real'}")
