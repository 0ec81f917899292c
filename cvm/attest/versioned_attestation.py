"""dstack's versioned attestation, the answer of the guest agent's ``Attest`` call (dstack ≥ 0.5.6,
``dstack-attest/src/attestation.rs``), in its first wire format: ``VersionedAttestation::V0``, SCALE-encoded.

Exact bytes (SCALE: integers little-endian, ``Vec``/``String`` prefixed with their compact length, enums with a
one-byte variant index, fields in declaration order)::

    VersionedAttestation::V0           0x00
      Attestation
        quote: AttestationQuote        0x00 = DstackTdx, then TdxQuote:
          quote: Vec<u8>                 the TDX quote
          event_log: Vec<TdxEvent>       each: imr u32, event_type u32, digest Vec<u8>, event String,
                                         event_payload Vec<u8>
        runtime_events: Vec<RuntimeEvent>  each: event String, payload Vec<u8> (empty on TDX: the events are
                                         in the TDX event log)
        report_data: [u8; 64]
        config: String                 the VM configuration (the agent's ``vm_config``)
        report: ()                     nothing

dstack's later agents also accept and verify this V0 form (``VersionedAttestation::from_bytes``: a leading 0x00).
The newer V1 (msgpack) form is not produced here.

:func:`decode` is strict: a wrong variant, a length past the end, a non-canonical compact length, text that is
not UTF-8 or bytes left over raise :class:`AttestationFormatError` (a ValueError).
"""

from __future__ import annotations

from dataclasses import dataclass

from cvm.attest.eventlog import RuntimeEvent

__all__ = [
    "MAX_ATTESTATION_BYTES",
    "AttestationFormatError",
    "VersionedAttestationV0",
    "decode",
    "encode",
]

# dstack refuses to decode more than this (10 MiB): a bound on untrusted input.
MAX_ATTESTATION_BYTES = 10 * 1024 * 1024
_V0 = 0
_DSTACK_TDX = 0


class AttestationFormatError(ValueError):
    """The bytes are not a well-formed ``VersionedAttestation::V0`` with a TDX quote."""


@dataclass(frozen=True)
class VersionedAttestationV0:
    """One V0 attestation: a TDX quote, its event log, the report_data it was asked for and the VM config."""

    quote: bytes
    event_log: tuple[RuntimeEvent, ...]
    report_data: bytes
    config: str
    runtime_events: tuple[tuple[str, bytes], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.quote, bytes) or not isinstance(self.report_data, bytes):
            raise TypeError("quote and report_data must be bytes")
        if len(self.report_data) != 64:
            raise ValueError(f"report_data must be 64 bytes, got {len(self.report_data)}")


def encode(attestation: VersionedAttestationV0) -> bytes:
    """The SCALE bytes of ``attestation`` (see the module docstring)."""
    out = bytearray([_V0, _DSTACK_TDX])
    out += _bytes(attestation.quote)
    out += _compact(len(attestation.event_log))
    for event in attestation.event_log:
        out += event.imr.to_bytes(4, "little") + event.event_type.to_bytes(4, "little")
        out += _bytes(event.digest) + _text(event.name) + _bytes(event.payload)
    out += _compact(len(attestation.runtime_events))
    for name, payload in attestation.runtime_events:
        out += _text(name) + _bytes(payload)
    out += attestation.report_data
    out += _text(attestation.config)
    return bytes(out)


def decode(data: bytes) -> VersionedAttestationV0:
    """Parse V0 SCALE bytes; :class:`AttestationFormatError` unless they are exactly one well-formed attestation."""
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError("data must be bytes")
    if len(data) > MAX_ATTESTATION_BYTES:
        raise AttestationFormatError(f"attestation bytes too large: {len(data)} > {MAX_ATTESTATION_BYTES}")
    reader = _Reader(bytes(data))
    if reader.byte() != _V0:
        raise AttestationFormatError("not a VersionedAttestation::V0 (the first byte must be 0x00)")
    if reader.byte() != _DSTACK_TDX:
        raise AttestationFormatError("the attestation does not carry a dstack TDX quote")
    quote = reader.vec()
    events = []
    for _ in range(reader.count()):
        imr, event_type = reader.u32(), reader.u32()
        digest, name, payload = reader.vec(), reader.text(), reader.vec()
        try:
            events.append(RuntimeEvent(name=name, payload=payload, digest=digest, imr=imr, event_type=event_type))
        except ValueError as bad:
            raise AttestationFormatError(f"event {name!r}: {bad}") from None
    runtime_events = tuple((reader.text(), reader.vec()) for _ in range(reader.count()))
    report_data = reader.take(64)
    config = reader.text()
    if not reader.done:
        raise AttestationFormatError(f"{len(data) - reader.position} bytes left after the attestation")
    return VersionedAttestationV0(quote=quote, event_log=tuple(events), report_data=report_data, config=config,
                                  runtime_events=runtime_events)


def _compact(n: int) -> bytes:
    """SCALE's compact encoding of a non-negative integer."""
    if n < 0:
        raise ValueError("compact integers are non-negative")
    if n < 1 << 6:
        return bytes([n << 2])
    if n < 1 << 14:
        return ((n << 2) | 0b01).to_bytes(2, "little")
    if n < 1 << 30:
        return ((n << 2) | 0b10).to_bytes(4, "little")
    body = n.to_bytes((n.bit_length() + 7) // 8, "little")
    return bytes([((len(body) - 4) << 2) | 0b11]) + body


def _bytes(value: bytes) -> bytes:
    return _compact(len(value)) + value


def _text(value: str) -> bytes:
    return _bytes(value.encode("utf-8"))


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.position = 0

    @property
    def done(self) -> bool:
        return self.position == len(self.data)

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.position:
            raise AttestationFormatError("the attestation ends early")
        chunk = self.data[self.position:self.position + n]
        self.position += n
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "little")

    def count(self) -> int:
        first = self.byte()
        mode = first & 0b11
        if mode == 0b00:
            return first >> 2
        if mode == 0b01:
            value, floor = int.from_bytes(bytes([first]) + self.take(1), "little") >> 2, 1 << 6
        elif mode == 0b10:
            value, floor = int.from_bytes(bytes([first]) + self.take(3), "little") >> 2, 1 << 14
        else:
            size = (first >> 2) + 4
            value, floor = int.from_bytes(self.take(size), "little"), 1 << 30
            if size > 4 and value >> (8 * (size - 1)) == 0:
                raise AttestationFormatError("a compact length is not in its shortest form")
        if value < floor:
            raise AttestationFormatError("a compact length is not in its shortest form")
        if value > len(self.data):   # no element is smaller than a byte: a longer count cannot be honest
            raise AttestationFormatError("a length runs past the end of the attestation")
        return value

    def vec(self) -> bytes:
        return self.take(self.count())

    def text(self) -> str:
        try:
            return self.vec().decode("utf-8")
        except UnicodeDecodeError:
            raise AttestationFormatError("a string is not UTF-8") from None
