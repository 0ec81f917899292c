"""dstack runtime events: the RTMR3 digest, its replay, and dstack's event-log JSON.

Spec (docs/design.md, "dstack formats"; dstack ``cc-eventlog/src/runtime_events.rs`` and
``dstack-util/src/system_setup.rs``):

- a runtime event extends RTMR3 with ``sha384(u32_le(0x08000001) ‖ ":" ‖ name ‖ ":" ‖ payload)``
  (dstack's V1 digest);
- replay starts from 48 zero bytes and folds ``mr = sha384(mr ‖ digest)`` over the events;
- a CVM measures ``system-preparing``, ``app-id`` (20 bytes), ``compose-hash`` (32 bytes),
  ``instance-id`` (20 bytes), ``boot-mr-done``, ``os-image-hash`` (32 bytes), ``key-provider``
  (JSON ``{"name":"kms","id":"<hex>"}``) and ``system-ready``; whatever comes after ``system-ready``
  was emitted by the app (``EmitEvent``) and never counts as a boot value (dstack's ``find_event``
  stops at ``system-ready`` for the same reason).

``replay_event_log`` is the only way to get boot values out of a log: it recomputes every RTMR3
digest from its (name, payload), replays, compares with the quote's RTMR3 in constant time, and
returns values read from the replayed events only. It raises :class:`EventLogMismatch`, which
sits in the attestation error tree (see :mod:`cvm.attest.verify`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from compose import safe_parse
from cvm.attest.tdx_quote import AttestationError

__all__ = [
    "BOOT_DONE_EVENT",
    "DSTACK_RUNTIME_EVENT_TYPE",
    "MR_SIZE",
    "RTMR3_INDEX",
    "BootEvents",
    "EventLogMismatch",
    "RuntimeEvent",
    "event_log_json",
    "extend_rtmr",
    "parse_event_log",
    "replay_event_log",
    "replay_rtmr",
    "runtime_event_digest",
]

DSTACK_RUNTIME_EVENT_TYPE = 0x08000001
RTMR3_INDEX = 3
MR_SIZE = 48
BOOT_DONE_EVENT = "system-ready"

# Boot values and the exact payload length dstack measures for each (None: any length).
_BOOT_VALUE_LENGTHS: dict[str, int | None] = {
    "app-id": 20,
    "compose-hash": 32,
    "instance-id": 20,
    "os-image-hash": 32,
    "key-provider": None,
}
_REQUIRED_BOOT_VALUES = ("app-id", "compose-hash")


class EventLogMismatch(AttestationError):
    """The event log does not prove what the quote's RTMR3 says (or is malformed)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"event log refused: {reason}")
        self.reason = reason


def runtime_event_digest(name: str, payload: bytes) -> bytes:
    """dstack V1 runtime-event digest: ``sha384(u32_le(0x08000001) ‖ ":" ‖ name ‖ ":" ‖ payload)``."""
    if not isinstance(name, str) or not isinstance(payload, (bytes, bytearray)):
        raise TypeError("name must be str and payload bytes")
    if not name:
        raise ValueError("event name must not be empty")
    prefix = struct.pack("<I", DSTACK_RUNTIME_EVENT_TYPE)
    return hashlib.sha384(prefix + b":" + name.encode("utf-8") + b":" + bytes(payload)).digest()


def extend_rtmr(mr: bytes, digest: bytes) -> bytes:
    """One TDX RTMR extend: ``sha384(mr ‖ digest)``."""
    if len(mr) != MR_SIZE or len(digest) != MR_SIZE:
        raise ValueError(f"an RTMR and its digests are {MR_SIZE} bytes")
    return hashlib.sha384(mr + digest).digest()


def replay_rtmr(digests: Iterable[bytes]) -> bytes:
    """Fold :func:`extend_rtmr` over ``digests`` from 48 zero bytes."""
    mr = bytes(MR_SIZE)
    for digest in digests:
        mr = extend_rtmr(mr, digest)
    return mr


@dataclass(frozen=True)
class RuntimeEvent:
    """One event-log entry. For RTMR3 entries ``digest`` is dstack's V1 digest of (name, payload);
    entries for RTMR0-2 carry firmware/OS digests whose payloads dstack strips."""

    name: str
    payload: bytes
    digest: bytes
    imr: int = RTMR3_INDEX
    event_type: int = DSTACK_RUNTIME_EVENT_TYPE

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not isinstance(self.payload, bytes):
            raise TypeError("name must be str and payload bytes")
        if not isinstance(self.digest, bytes) or len(self.digest) != MR_SIZE:
            raise ValueError(f"digest must be {MR_SIZE} bytes")
        if self.imr not in range(4):
            raise ValueError(f"imr must be 0..3, got {self.imr!r}")

    @classmethod
    def measure(cls, name: str, payload: bytes) -> RuntimeEvent:
        """A new RTMR3 runtime event with its digest computed from (name, payload)."""
        return cls(name=name, payload=bytes(payload), digest=runtime_event_digest(name, payload))

    @property
    def digest_matches_payload(self) -> bool:
        """True when this is a dstack runtime event whose digest is the V1 digest of its payload."""
        if self.event_type != DSTACK_RUNTIME_EVENT_TYPE:
            return False
        try:
            expected = runtime_event_digest(self.name, self.payload)
        except ValueError:  # an empty name, or one UTF-8 cannot encode (a lone surrogate): no digest matches it
            return False
        return hmac.compare_digest(self.digest, expected)

    def to_entry(self) -> dict[str, Any]:
        """dstack's event-log entry: ``{imr, event_type, digest, event, event_payload}`` (hex)."""
        return {
            "imr": self.imr,
            "event_type": self.event_type,
            "digest": self.digest.hex(),
            "event": self.name,
            "event_payload": self.payload.hex(),
        }

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> RuntimeEvent:
        """Parse one dstack event-log entry (unknown keys such as ``version`` are ignored)."""
        if not isinstance(entry, Mapping):
            raise EventLogMismatch("an entry is not a JSON object")
        try:
            imr, event_type = entry["imr"], entry["event_type"]
            name, digest_hex, payload_hex = entry["event"], entry["digest"], entry.get("event_payload", "")
        except KeyError as missing:
            raise EventLogMismatch(f"an entry lacks the field {missing}") from None
        if not (_is_int(imr) and _is_int(event_type) and isinstance(name, str)):
            raise EventLogMismatch("an entry has a non-integer imr/event_type or a non-string event name")
        digest, payload = _hex_field(digest_hex, "digest"), _hex_field(payload_hex, "event_payload")
        try:
            return cls(name=name, payload=payload, digest=digest, imr=imr, event_type=event_type)
        except ValueError as bad:
            raise EventLogMismatch(f"entry {name!r}: {bad}") from None


def parse_event_log(event_log: str | bytes | Sequence[Mapping[str, Any]]) -> list[RuntimeEvent]:
    """Parse dstack's event log: the JSON string GetQuote returns, or the already-decoded list."""
    if isinstance(event_log, (str, bytes)):
        try:
            event_log = safe_parse.loads(event_log)
        except ValueError:  # JSONDecodeError (nested too deep is one), UnicodeDecodeError, an int over 4300 digits
            raise EventLogMismatch("the event log is not valid JSON") from None
    if not isinstance(event_log, Sequence) or isinstance(event_log, (str, bytes)):
        raise EventLogMismatch("the event log is not a JSON list")
    return [RuntimeEvent.from_entry(entry) for entry in event_log]


def event_log_json(events: Iterable[RuntimeEvent]) -> str:
    """Serialise events as the JSON string dstack's GetQuote/Info return."""
    return json.dumps([event.to_entry() for event in events], separators=(",", ":"))


@dataclass(frozen=True)
class BootEvents:
    """Boot values proven by a replayed RTMR3 log (read only from events before ``system-ready``)."""

    app_id: bytes
    compose_hash: bytes
    instance_id: bytes | None
    key_provider: dict[str, Any] | None
    key_provider_info: bytes
    os_image_hash: bytes | None
    rtmr3: bytes
    events: tuple[RuntimeEvent, ...]
    app_events: tuple[RuntimeEvent, ...]


def replay_event_log(
    entries: str | bytes | Sequence[Mapping[str, Any]], expected_rtmr3: bytes
) -> BootEvents:
    """Check an event log against a quote's RTMR3 and return the boot values it proves.

    Every RTMR3 entry's digest is recomputed from its (event, payload) — a digest that does not
    match its payload is refused, so a payload cannot be swapped under a genuine digest. The
    replay must equal ``expected_rtmr3`` (constant-time). ``app-id`` and ``compose-hash`` must
    each appear exactly once before ``system-ready``; other boot values at most once.
    """
    if not isinstance(expected_rtmr3, bytes) or len(expected_rtmr3) != MR_SIZE:
        raise ValueError(f"expected_rtmr3 must be {MR_SIZE} bytes")
    rtmr3_events = [event for event in parse_event_log(entries) if event.imr == RTMR3_INDEX]
    for event in rtmr3_events:
        if not event.digest_matches_payload:
            raise EventLogMismatch(f"the digest of event {event.name!r} does not match its payload")
    if not hmac.compare_digest(replay_rtmr(e.digest for e in rtmr3_events), expected_rtmr3):
        raise EventLogMismatch("replaying the RTMR3 events does not give the quote's RTMR3")

    boot_events, app_events = _split_at_boot_done(rtmr3_events)
    values = _boot_values(boot_events)
    key_provider_info = values.get("key-provider", b"")
    return BootEvents(
        app_id=values["app-id"],
        compose_hash=values["compose-hash"],
        instance_id=values.get("instance-id"),
        key_provider=_parse_key_provider(key_provider_info) if key_provider_info else None,
        key_provider_info=key_provider_info,
        os_image_hash=values.get("os-image-hash"),
        rtmr3=expected_rtmr3,
        events=tuple(rtmr3_events),
        app_events=tuple(app_events),
    )


def _split_at_boot_done(
    events: list[RuntimeEvent],
) -> tuple[list[RuntimeEvent], list[RuntimeEvent]]:
    for index, event in enumerate(events):
        if event.name == BOOT_DONE_EVENT:
            return events[: index + 1], events[index + 1 :]
    return events, []


def _boot_values(boot_events: list[RuntimeEvent]) -> dict[str, bytes]:
    values: dict[str, bytes] = {}
    for event in boot_events:
        if event.name not in _BOOT_VALUE_LENGTHS:
            continue
        if event.name in values:
            raise EventLogMismatch(f"the boot event {event.name!r} appears more than once")
        expected_length = _BOOT_VALUE_LENGTHS[event.name]
        if expected_length is not None and len(event.payload) != expected_length:
            raise EventLogMismatch(
                f"the {event.name!r} payload is {len(event.payload)} bytes, expected {expected_length}"
            )
        values[event.name] = event.payload
    for name in _REQUIRED_BOOT_VALUES:
        if name not in values:
            raise EventLogMismatch(f"the boot event {name!r} is missing")
    return values


def _parse_key_provider(payload: bytes) -> dict[str, Any]:
    try:
        parsed = safe_parse.loads(payload)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, an int over 4300 digits
        raise EventLogMismatch("the key-provider payload is not JSON") from None
    if not isinstance(parsed, dict):
        raise EventLogMismatch("the key-provider payload is not a JSON object")
    return parsed


def _hex_field(value: Any, field: str) -> bytes:
    if not isinstance(value, str):
        raise EventLogMismatch(f"an entry's {field} is not a hex string")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise EventLogMismatch(f"an entry's {field} is not valid hex") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
