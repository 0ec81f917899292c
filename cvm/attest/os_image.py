"""The OS image gate: which MRTD and RTMR0-2 an OS image boots to, and the check both the KMS and the auditor run.

A CVM measures ``os-image-hash`` into RTMR3 itself, so that event alone proves nothing about the OS: a host that
boots any firmware, kernel or initrd can claim an allowed hash. dstack ties the hash to the measured boot: an OS
release ships ``sha256sum.txt`` (the digests of its files: firmware, kernel, initrd, metadata with the kernel
command line, rootfs) and ``os_image_hash = sha256(sha256sum.txt)``; its published measurements give MRTD
(firmware), RTMR0 (firmware configuration), RTMR1 (kernel) and RTMR2 (command line and initrd) for that image.
A quote is of that OS only when its MRTD and RTMR0-2 are those measurements.

**Measurement record** (format ``sealroom-os-measurement/v1``), one JSON object, closed (unknown fields refused)::

    {"format": "sealroom-os-measurement/v1",
     "name": "dstack", "version": "0.5.3",              # what the image is, for people
     "os_image_hash": "<64 hex>",                        # = sha256(sha256sum.txt)
     "sha256sum": "<the sha256sum.txt text>",            # and/or
     "sha256sum_sha256": "<64 hex>",                     # its digest, when the text is not at hand
     "mrtd": "<96 hex>", "rtmr0": "<96 hex>", "rtmr1": "<96 hex>", "rtmr2": "<96 hex>",
     "source": "where the measurements come from"}

``os_image_hash`` must equal ``sha256(sha256sum)`` (the text's UTF-8 bytes, verbatim) and ``sha256sum_sha256``
when given; at least one of the two is required. Hex is case-insensitive, with or without ``0x``.

**Registry**: a folder of records, one file ``<os_image_hash>.json`` each (the KMS keeps its own in
``<kms state>/os-images/``). A record, once registered, is never replaced by a different one for the same hash.

**Gate** (:func:`check_measurements`, :meth:`OsImageRegistry.gate`): the record for the measured
``os-image-hash`` must exist, and the quote's MRTD, RTMR0, RTMR1 and RTMR2 must equal it. A dict lookup and four
comparisons. Errors::

    OsImageError
     ├── OsRecordInvalid           a record that is not a valid sealroom-os-measurement/v1 (or a file that is not one)
     ├── OsRecordConflict          another record is already registered for that os_image_hash
     ├── UnknownOsImage            no record for the OS image the CVM measured
     └── OsMeasurementMismatch     the quote's MRTD/RTMR0-2 are not the record's (``mismatches`` names each register)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from compose import safe_parse

__all__ = [
    "MEASURED_REGISTERS",
    "OS_IMAGES_DIR",
    "OS_MEASUREMENT_FORMAT",
    "BootMeasurements",
    "OsImageError",
    "OsImageRegistry",
    "OsMeasurement",
    "OsMeasurementMismatch",
    "OsRecordConflict",
    "OsRecordInvalid",
    "UnknownOsImage",
    "check_measurements",
    "load_record",
    "parse_record",
]

OS_MEASUREMENT_FORMAT = "sealroom-os-measurement/v1"
OS_IMAGES_DIR = "os-images"   # inside the KMS's state folder
# (field, register name as people write it), in the order a quote holds them.
MEASURED_REGISTERS = (("mrtd", "MRTD"), ("rtmr0", "RTMR0"), ("rtmr1", "RTMR1"), ("rtmr2", "RTMR2"))
_MR_SIZE = 48
_HASH_SIZE = 32
_MAX_RECORD_BYTES = 64 * 1024
_RACY_NS = 1_000_000_000
_FIELDS = frozenset({"format", "name", "version", "os_image_hash", "sha256sum", "sha256sum_sha256", "mrtd", "rtmr0",
                     "rtmr1", "rtmr2", "source"})


class OsImageError(Exception):
    """Root of the OS image gate's errors (see the module docstring)."""


class OsRecordInvalid(OsImageError):
    """Not a valid ``sealroom-os-measurement/v1`` record."""


class OsRecordConflict(OsImageError):
    """A different record is already registered for this os_image_hash."""


class UnknownOsImage(OsImageError):
    """No measurement record is registered for the OS image the CVM measured."""

    def __init__(self, os_image_hash: bytes | None) -> None:
        if os_image_hash is None:
            message = "the CVM measured no os-image-hash, so its MRTD and RTMR0-2 cannot be checked against an OS image"
        else:
            message = (f"no measurement record is registered for OS image {os_image_hash.hex()}: its MRTD and "
                       "RTMR0-2 cannot be checked, so the boot is not accepted")
        super().__init__(message)
        self.os_image_hash = os_image_hash


class OsMeasurementMismatch(OsImageError):
    """The quote's boot registers differ from the OS image's record. ``mismatches``: (register, quote's value,
    record's value) for each register that differs, in quote order."""

    def __init__(self, record: OsMeasurement, mismatches: tuple[tuple[str, bytes, bytes], ...]) -> None:
        super().__init__("; ".join(f"{register} of the quote is {got.hex()} but OS image {record.label} expects "
                                   f"{expected.hex()}" for register, got, expected in mismatches))
        self.record = record
        self.mismatches = mismatches

    @property
    def registers(self) -> tuple[str, ...]:
        return tuple(register for register, _, _ in self.mismatches)


class BootMeasurements(Protocol):
    """What a quote says about the boot: :class:`cvm.attest.verify.QuoteClaims` and a parsed TD report both fit."""

    mrtd: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes


@dataclass(frozen=True)
class OsMeasurement:
    """One OS image's measurement record (see the module docstring). Build with :func:`parse_record`."""

    name: str
    version: str
    os_image_hash: bytes
    mrtd: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    source: str
    sha256sum: str | None = None
    sha256sum_sha256: bytes | None = None

    @property
    def label(self) -> str:
        """How refusals name the image: ``name version (os_image_hash …)``."""
        return f"{self.name} {self.version} (os_image_hash {self.os_image_hash.hex()})"

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"format": OS_MEASUREMENT_FORMAT, "name": self.name, "version": self.version,
                                  "os_image_hash": self.os_image_hash.hex()}
        if self.sha256sum is not None:
            record["sha256sum"] = self.sha256sum
        if self.sha256sum_sha256 is not None:
            record["sha256sum_sha256"] = self.sha256sum_sha256.hex()
        record.update({field: getattr(self, field).hex() for field, _ in MEASURED_REGISTERS})
        record["source"] = self.source
        return record

    def to_bytes(self) -> bytes:
        """The record as it is stored: JSON, two-space indent, one trailing newline."""
        return (json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n").encode()


def parse_record(value: str | bytes | Mapping[str, Any]) -> OsMeasurement:
    """A measurement record from its JSON (text, bytes or the decoded object), every check applied."""
    if isinstance(value, (str, bytes)):
        if len(value) > _MAX_RECORD_BYTES:
            raise OsRecordInvalid(f"a measurement record is at most {_MAX_RECORD_BYTES} bytes")
        try:
            value = safe_parse.loads(value)
        except ValueError:   # JSONDecodeError (nested too deep is one), UnicodeDecodeError
            raise OsRecordInvalid("the measurement record is not JSON") from None
    if not isinstance(value, Mapping):
        raise OsRecordInvalid("the measurement record is not a JSON object")
    unknown = sorted(set(value) - _FIELDS)
    if unknown:
        raise OsRecordInvalid(f"unknown field(s) in the measurement record: {', '.join(map(str, unknown))}")
    if value.get("format") != OS_MEASUREMENT_FORMAT:
        raise OsRecordInvalid(f"format must be {OS_MEASUREMENT_FORMAT!r}")
    name, version, source = (_text(value, field) for field in ("name", "version", "source"))
    os_image_hash = _hex(value, "os_image_hash", _HASH_SIZE)
    registers = {field: _hex(value, field, _MR_SIZE) for field, _ in MEASURED_REGISTERS}
    sha256sum = value.get("sha256sum")
    if sha256sum is not None and not isinstance(sha256sum, str):
        raise OsRecordInvalid("sha256sum must be the text of sha256sum.txt")
    digest = _hex(value, "sha256sum_sha256", _HASH_SIZE) if value.get("sha256sum_sha256") is not None else None
    if sha256sum is None and digest is None:
        raise OsRecordInvalid("the record needs sha256sum (the text of sha256sum.txt) or sha256sum_sha256, from "
                              "which os_image_hash is recomputed")
    if sha256sum is not None:
        recomputed = hashlib.sha256(sha256sum.encode("utf-8", "surrogatepass")).digest()
        if recomputed != os_image_hash:
            raise OsRecordInvalid(f"os_image_hash is {os_image_hash.hex()}, but sha256(sha256sum) is "
                                  f"{recomputed.hex()}")
    if digest is not None and digest != os_image_hash:
        raise OsRecordInvalid(f"os_image_hash is {os_image_hash.hex()}, but sha256sum_sha256 is {digest.hex()}")
    return OsMeasurement(name=name, version=version, os_image_hash=os_image_hash, source=source, sha256sum=sha256sum,
                         sha256sum_sha256=digest, **registers)


def load_record(path: str | os.PathLike[str]) -> OsMeasurement:
    """A measurement record from a file (:class:`OsRecordInvalid` names the file)."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_RECORD_BYTES + 1)
    except OSError as exc:
        raise OsRecordInvalid(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    try:
        return parse_record(data)
    except OsRecordInvalid as exc:
        raise OsRecordInvalid(f"{path}: {exc}") from None


def check_measurements(record: OsMeasurement, quote: BootMeasurements) -> None:
    """The quote's MRTD and RTMR0-2 must be the record's; :class:`OsMeasurementMismatch` names each that is not."""
    mismatches = tuple((register, getattr(quote, field), getattr(record, field))
                       for field, register in MEASURED_REGISTERS
                       if not hmac.compare_digest(getattr(quote, field), getattr(record, field)))
    if mismatches:
        raise OsMeasurementMismatch(record, mismatches)


class OsImageRegistry:
    """Measurement records by os_image_hash: fixed (``records``), or kept in ``folder`` as ``<hash>.json`` files.

    A folder-backed registry reads the folder again when its modification time changes, and on a miss (a record
    registered while the KMS runs counts from the next request), so a lookup costs one ``stat``, a dict lookup
    and, in :meth:`gate`, four comparisons. A file in the folder that is not a valid record, or whose name is not its
    os_image_hash, makes every lookup fail (:class:`OsRecordInvalid`): the gate fails closed.
    """

    def __init__(self, folder: str | os.PathLike[str] | None = None, records: Iterable[OsMeasurement] = ()) -> None:
        self.folder = Path(folder) if folder is not None else None
        self._fixed = {record.os_image_hash: record for record in records}
        self._records: Mapping[bytes, OsMeasurement] = dict(self._fixed)
        self._stamp: int | None = None
        self._error: OsRecordInvalid | None = None
        self._lock = threading.Lock()

    def get(self, os_image_hash: bytes) -> OsMeasurement | None:
        record = self._current().get(os_image_hash)
        if record is None and self.folder is not None:
            record = self._current(force=True).get(os_image_hash)   # a miss is rare (a refusal): read again
        return record

    def records(self) -> list[OsMeasurement]:
        return list(self._current().values())

    def gate(self, os_image_hash: bytes | None, quote: BootMeasurements) -> OsMeasurement:
        """The record for ``os_image_hash`` (the CVM's measured ``os-image-hash``), once the quote's MRTD and
        RTMR0-2 are checked against it; :class:`UnknownOsImage` or :class:`OsMeasurementMismatch` otherwise."""
        record = None if os_image_hash is None else self.get(os_image_hash)
        if record is None:
            raise UnknownOsImage(os_image_hash)
        check_measurements(record, quote)
        return record

    def register(self, record: OsMeasurement) -> bool:
        """Keep ``record`` in the folder; True when it is new, False when the same record was already there.
        A different record for the same os_image_hash is refused (:class:`OsRecordConflict`)."""
        if self.folder is None:
            raise ValueError("this registry has no folder to register into")
        existing = self.get(record.os_image_hash)
        if existing is not None:
            if existing == record:
                return False
            raise OsRecordConflict(f"OS image {record.os_image_hash.hex()} is already registered as "
                                   f"{existing.name} {existing.version} with other measurements or provenance; a "
                                   "record is never replaced")
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        final = self.folder / f"{record.os_image_hash.hex()}.json"
        temporary = self.folder / f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(record.to_bytes())
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(temporary, final)    # never replaces a file that is already there
            except FileExistsError:
                if load_record(final) != record:
                    raise OsRecordConflict(f"OS image {record.os_image_hash.hex()} was registered with another "
                                           "record meanwhile; a record is never replaced") from None
                return False
        finally:
            temporary.unlink(missing_ok=True)
        return True

    def _current(self, *, force: bool = False) -> Mapping[bytes, OsMeasurement]:
        if self.folder is None:
            return self._records
        try:
            stamp = self.folder.stat().st_mtime_ns
        except FileNotFoundError:
            stamp = -1
        with self._lock:
            if force or stamp != self._stamp:
                self._reload(stamp)
            if self._error is not None:
                raise self._error
            return self._records

    def _reload(self, stamp: int) -> None:
        records, error = dict(self._fixed), None
        try:
            paths = sorted(self.folder.glob("*.json")) if stamp != -1 else []
            for path in paths:
                record = load_record(path)
                if path.name != f"{record.os_image_hash.hex()}.json":
                    raise OsRecordInvalid(f"{path}: the file of OS image {record.os_image_hash.hex()} must be named "
                                          f"{record.os_image_hash.hex()}.json")
                records[record.os_image_hash] = record
        except OsRecordInvalid as exc:
            error = exc
        # A folder changed within the last second may change again without its (coarse) mtime moving: read it
        # again next time, until its mtime is old enough to be trusted.
        racy = stamp != -1 and time.time_ns() - stamp < _RACY_NS
        self._records, self._error, self._stamp = records, error, (None if racy else stamp)


def _text(value: Mapping[str, Any], field: str) -> str:
    text = value.get(field)
    if not isinstance(text, str) or not text.strip():
        raise OsRecordInvalid(f"{field} must be a non-empty string")
    return text


def _hex(value: Mapping[str, Any], field: str, size: int) -> bytes:
    text = value.get(field)
    if not isinstance(text, str):
        raise OsRecordInvalid(f"{field} must be a hex string of {size} bytes")
    digits = text[2:] if text[:2] in ("0x", "0X") else text
    if len(digits) != 2 * size or not all(c in "0123456789abcdefABCDEF" for c in digits):
        raise OsRecordInvalid(f"{field} must be {size} bytes of hex ({2 * size} digits)")
    return bytes.fromhex(digits)
