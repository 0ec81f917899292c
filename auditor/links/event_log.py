"""Link 2, ``event-log``: the event log replays to the quote's RTMR3 (and its RTMR0-2 entries to RTMR0-2); the
app_id, compose hash, key provider, OS image and measured inputs are read from that replay; the quote's MRTD and
RTMR0-2 are the measurements the auditor pinned for that OS image (:mod:`cvm.attest.os_image`, the KMS's own gate).
Without a pinned record for the image the link holds with a WARNING: the OS was compared with nothing.

When the quote verified (link 1), the log is checked with the verifier's ``verify_attestation``; when it did not,
it is replayed against the unverified quote's RTMR3 and the facts say so. Only the digests of RTMR0-2 entries are
bound: their names and types are labels (dstack strips their payloads).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from auditor.links.base import Broken, Held, Notes, Pins, Recipe, thaw
from auditor.links.quote import QuoteProof
from auditor.receipt import Receipt
from cvm.attest.eventlog import RTMR3_INDEX, BootEvents, parse_event_log, replay_event_log, replay_rtmr
from cvm.attest.os_image import OsMeasurementMismatch, check_measurements
from cvm.attest.tdx_quote import TdxQuote
from cvm.attest.verify import AttestationError, verify_attestation

__all__ = ["CHECK", "NAME", "NUMBER", "EventLogProof", "check", "recipe"]

NUMBER, NAME = 2, "event-log"
CHECK = ("the event log replays to the quote's RTMR3; app_id and compose_hash come from it; MRTD and RTMR0-2 are "
         "the pinned OS image's")


@dataclass(frozen=True)
class EventLogProof:
    """The boot values RTMR3 holds, as the replayed event log gives them."""

    boot: BootEvents

    @property
    def recipe(self) -> Recipe:
        return Recipe(self.boot.app_id, self.boot.compose_hash, attested=True)


def check(receipt: Receipt, quote: QuoteProof | None, pins: Pins) -> Held[EventLogProof]:
    """``quote`` is what link 1 proved (None when it proved nothing): with its claims, the log is checked
    against the verified quote; without, against the unverified one."""
    notes = Notes()
    with notes.breaking():
        proof = _check(notes, receipt, quote, pins)
    return notes.held(proof)


def recipe(event_log: EventLogProof | None, receipt: Receipt) -> Recipe | None:
    """The recipe the later links check: the event log's (attested) when it replayed, else the envelope's claim
    (not attested), else None."""
    return event_log.recipe if event_log is not None else receipt.claimed_recipe


def _check(notes: Notes, receipt: Receipt, quote: QuoteProof | None, pins: Pins) -> EventLogProof:
    if not receipt.tdx_quote.usable:
        raise Broken("cannot be checked: the quote does not parse (link 1)")
    parsed = receipt.tdx_quote.value
    event_log = thaw(receipt.event_log.get())
    try:
        if quote is not None and quote.claims is not None:
            events = verify_attestation(receipt.quote.get(), event_log, **pins.quote_kwargs(quote.collateral)).events
        else:
            notes.facts["rtmr3_from"] = "the unverified quote (link 1 failed)"
            events = replay_event_log(event_log, parsed.body.rtmr3)
    except AttestationError as exc:
        raise Broken(str(exc)) from None
    _check_boot_rtmrs(notes, parsed, event_log)
    notes.facts.update(
        app_id="0x" + events.app_id.hex(), compose_hash=events.compose_hash.hex(),
        instance_id=events.instance_id.hex() if events.instance_id else None,
        os_image_hash=events.os_image_hash.hex() if events.os_image_hash else None,
        key_provider=events.key_provider, rtmr3_events=len(events.events),
        app_events=[event.name for event in events.app_events],
    )
    notes.summary = (f"{len(events.events)} RTMR3 events replay; app_id 0x{events.app_id.hex()}, "
                     f"compose hash {events.compose_hash.hex()}; {_check_os_image(notes, parsed, events, pins)}")
    return EventLogProof(events)


def _check_os_image(notes: Notes, parsed: TdxQuote, events: BootEvents, pins: Pins) -> str:
    """The quote's MRTD and RTMR0-2 against the pinned record of the OS image the CVM measured; returns the
    summary's words. (The same bytes link 1 verified: the verifier reads the TD report as this parser does.)"""
    image = events.os_image_hash
    record = None if image is None else pins.os_measurement(image)
    if record is None:
        what = "measured no os-image-hash" if image is None else f"booted OS image {image.hex()}"
        notes.facts["os_image_measurements"] = "none pinned: MRTD and RTMR0-2 not compared"
        notes.warnings.append(f"OS NOT CHECKED: the CVM {what}, and no measurement record is pinned for it, so its "
                              "MRTD and RTMR0-2 are compared with nothing (pin the image's record with "
                              "--os-measurements FILE)")
        return "OS image not checked (no measurement record pinned)"
    notes.facts["os_image_measurements"] = {"name": record.name, "version": record.version,
                                            "os_image_hash": record.os_image_hash.hex(), "source": record.source}
    try:
        check_measurements(record, parsed.body)
    except OsMeasurementMismatch as exc:
        notes.facts["os_image_measurements"]["differ"] = list(exc.registers)
        notes.problems.append(str(exc))
        return f"OS image {record.name} {record.version}: {', '.join(exc.registers)} differ"
    return f"OS image {record.name} {record.version}: MRTD and RTMR0-2 match its pinned measurements"


def _check_boot_rtmrs(notes: Notes, parsed: TdxQuote, event_log: str | list) -> None:
    # RTMR3 was replayed above; the firmware/OS entries (RTMR0-2) must replay to the quote's registers too,
    # as dstack's verifier replays all four, so that no entry of the log is unaccounted for.
    entries = parse_event_log(event_log)
    for index in range(RTMR3_INDEX):
        replayed = replay_rtmr(entry.digest for entry in entries if entry.imr == index)
        if not hmac.compare_digest(replayed, getattr(parsed.body, f"rtmr{index}")):
            notes.problems.append(f"the event log's RTMR{index} entries do not replay to the quote's RTMR{index}")
