"""Property-based fuzzing of every parser that reads bytes from outside (issue 11, part 2).

For each parser the property is the same: on arbitrary input it either parses or raises exactly its documented
error type(s); anything else (IndexError, KeyError, struct.error, UnicodeError, RecursionError, OverflowError…)
is a crash and fails the test. Inputs are random bytes and text, mutated valid documents (bit flips, byte
overwrites, insertions, deletions, truncation, appended data, rewritten length fields), structure-aware
mutations (a field replaced by any JSON value, re-encoded and, where the format is signed, re-signed so the
parser's deeper checks run), deep nesting and oversized numbers.

| parser                                            | documented errors                                      |
| ------------------------------------------------- | ------------------------------------------------------ |
| ``cvm.sealed`` read_envelope / verify_payload / open_sealed | ``SealedFileError`` and its subclasses         |
| ``cvm.attest.tdx_quote.parse_quote_unverified``   | ``QuoteFormatError``                                   |
| ``cvm.attest.eventlog`` parse_event_log / replay_event_log | ``EventLogMismatch``                            |
| ``compose.app_compose.manifest_from_app_compose`` | ``InvalidAppCompose``                                  |
| ``compose.manifest.StudyManifest`` / validate_manifest | ``pydantic.ValidationError`` / ``ManifestInvalid`` |
| ``auditor.verify`` load_receipt / verify_receipt (``chain=None``) | ``NotAReceipt`` (all else is a failed link) |
| ``cvm.aggregator.update_from_bytes`` (+ validate_updates) | ``UpdateUnreadable`` (a bad update is a Rejection) |
| ``kms_client.box`` open_bytes / open_answer       | ``BoxOpenFailed``                                      |

The budget is fixed for CI: ``max_examples`` per test, no deadline, derandomized and no example database, so a
run repeats exactly (for a given ``--randomly-seed``: the shuffled order can shift a few cases). A failure prints
its falsifying input. ``tests/fuzz_report.py`` prints one line per parser at the end of the run.

Every Sealroom entry point puts the interpreter's recursion limit back to CPython's default
(``compose.safe_parse.restore_recursion_limit``: py_ecc raises it to 100 000, where a deeply nested document
overflows the C stack). This module does the same for its own tests, so deep nesting shows up as a
``RecursionError`` crash instead of taking the test process down.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import struct
import sys
import tempfile
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from eth_keys import keys
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import cvm.analyses.params  # noqa: F401  (see below)
from auditor.verify import NotAReceipt, load_receipt, verify_receipt
from compose.app_compose import (
    InvalidAppCompose,
    build_app_compose,
    manifest_from_app_compose,
    normalized_json_bytes,
)
from compose.manifest import ManifestInvalid, StudyManifest, validate_manifest
from cvm.aggregator import UpdateUnreadable, update_from_bytes, update_to_bytes
from cvm.attest.eventlog import (
    EventLogMismatch,
    RuntimeEvent,
    event_log_json,
    parse_event_log,
    replay_event_log,
    replay_rtmr,
    runtime_event_digest,
)
from cvm.attest.simulated import SIMULATED_BOOT_EVENTS, SIMULATED_OS_IMAGE_HASH, SimulatedTdx, mr_config_id_v1
from cvm.attest.tdx_quote import QuoteFormatError, parse_quote_unverified
from cvm.federated import RoundContract, sign_update
from cvm.federated.validation import validate_updates
from cvm.receipt import envelope_digest
from cvm.sealed import envelope as sealed_envelope
from cvm.sealed.dataset import SealedFileError, open_sealed, read_envelope, seal_file, verify_payload
from cvm.sealed.stream import payload_length
from kms_client.box import BoxOpenFailed, SealedAnswer, open_answer, open_bytes, raw_public, seal_to_bytes

pytest_plugins = ["tests.fuzz_report"]  # the per-parser counts at the end of the run

# Every module the parsers import lazily is imported above (cvm.analyses.params: by validate_manifest): hypothesis
# draws constants from the project modules loaded when a test runs, so with all of them loaded at collection, the
# cases do not depend on the test order (pytest-randomly).

# ----------------------------------------------------------------------------------------------- budget

_COMMON: dict[str, Any] = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
}
SMALL = settings(max_examples=150, **_COMMON)
MEDIUM = settings(max_examples=200, **_COMMON)
LARGE = settings(max_examples=300, **_COMMON)

_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tdx"


def case(parser: str, *documented: type[BaseException]):
    """One fuzz case, counted for the summary (``tests.fuzz_report.case``; imported once pytest has loaded the
    plugin, so that it is not imported before pytest can rewrite it)."""
    from tests.fuzz_report import case as counted

    return counted(parser, *documented)


@pytest.fixture(scope="module", autouse=True)
def _default_recursion_limit():
    """What every entry point does first (``compose.safe_parse.restore_recursion_limit``), undone afterwards."""
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    yield
    sys.setrecursionlimit(previous)


# ------------------------------------------------------------------------------------- shared strategies

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["", "0x", "00" * 32, "0x" + "11" * 20, "sealroom", "\ud800", "é", "kms", "csv"])
)
json_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)


def _deep(depth: int, kind: str) -> str:
    if kind == "array":
        return "[" * depth + "]" * depth
    if kind == "object":
        return '{"a":' * depth + "1" + "}" * depth
    if kind == "open":
        return "[" * depth
    return '[{"a":' * (depth // 2) + "0" + "}]" * (depth // 2)


deep_json = st.builds(_deep, st.integers(min_value=60, max_value=4000),
                      st.sampled_from(["array", "object", "open", "mixed"]))
huge_number = st.builds(lambda digits, form: form.format("7" * digits),
                        st.integers(min_value=300, max_value=6000),
                        st.sampled_from(["{}", "-{}", "[{}]", '{{"a":{}}}', "{}.5", "1e{}", "0.{}"]))


def _dumps_any(value: Any) -> str:
    """JSON text of ``value``; lone surrogates (not UTF-8 encodable) are escaped instead of refused."""
    try:
        json.dumps(value, ensure_ascii=False).encode()
        return json.dumps(value, ensure_ascii=False)
    except UnicodeEncodeError:
        return json.dumps(value)


def _normalized(value: Any) -> bytes:
    """dstack's normalised JSON of ``value`` when it has one; else the same layout with ASCII escapes (a lone
    surrogate, which UTF-8 cannot carry, or a document that is not an object)."""
    try:
        return normalized_json_bytes(value)
    except (TypeError, ValueError):
        return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


json_texts = st.one_of(
    st.builds(_dumps_any, json_values),
    st.text(max_size=200),
    deep_json,
    huge_number,
    st.sampled_from(["", "NaN", "[Infinity]", '{"a":1,"a":2}', '"\\ud800"', "\ufeff{}", "{", "[1,]", "null"]),
)


def _pick(draw: st.DrawFn, choices: Any) -> Any:
    """One of ``choices`` (a sequence built per draw: an index is cheaper to draw than a new sampled_from)."""
    return choices[draw(st.integers(min_value=0, max_value=len(choices) - 1))]


_MUTATIONS = ("flip", "byte", "u16", "u32", "insert", "delete", "duplicate", "truncate", "append")


@st.composite
def mutated(draw: st.DrawFn, base: bytes, *, max_ops: int = 4) -> bytes:
    """``base`` after a few random edits: flip a bit, overwrite a byte or a 16/32-bit length-like field,
    insert, delete or duplicate a slice, truncate, append."""
    data = bytearray(base)
    for _ in range(draw(st.integers(min_value=1, max_value=max_ops))):
        size = len(data)
        op = _pick(draw, _MUTATIONS)
        at = draw(st.integers(min_value=0, max_value=max(size - 1, 0)))
        if op == "flip" and size:
            data[at] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        elif op == "byte" and size:
            data[at] = draw(st.integers(min_value=0, max_value=255))
        elif op in ("u16", "u32") and size:
            width = 2 if op == "u16" else 4
            top = 2 ** (8 * width) - 1
            value = _pick(draw, (0, 1, 2, 3, 4, 5, 6, 0x81, 0xFF, size - at, top, None))
            if value is None:
                value = draw(st.integers(min_value=0, max_value=top))
            data[at:at + width] = (value & top).to_bytes(width, _pick(draw, ("little", "big")))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and size:
            del data[at:at + draw(st.integers(min_value=1, max_value=64))]
        elif op == "duplicate" and size:
            data[at:at] = data[at:at + draw(st.integers(min_value=1, max_value=256))]
        elif op == "truncate":
            del data[at:]
        elif op == "append":
            data += draw(st.binary(min_size=1, max_size=32))
    return bytes(data)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside nested dicts and lists (the root included)."""
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += _paths(child, (*prefix, index))
    return found


def _replace(value: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[path[0]] = _replace(copy[path[0]], path[1:], new)
    return copy


@st.composite
def field_replaced(draw: st.DrawFn, document: Any, values: st.SearchStrategy = json_values) -> Any:
    """``document`` with one nested value replaced by an arbitrary JSON value, deleted, or given a new sibling."""
    path = _pick(draw, _paths(document))
    action = _pick(draw, ("replace", "replace", "delete", "add", "edit"))
    if action == "edit":  # a small change to a string or number that keeps its type
        target = _get(document, path)
        if isinstance(target, str):
            edits = (target + "\ud800", "\udfff" + target, target + "\0", target.upper(), target * 2, "",
                     target[:-1], " " + target, target.replace("0", "O"))
            return _replace(document, path, _pick(draw, edits))
        if isinstance(target, (int, float)) and not isinstance(target, bool):
            edits = (-target, target + 1, target - 1, target * 2**64, 0, float(target), float("nan"), 10**30)
            return _replace(document, path, _pick(draw, edits))
    if action == "delete" and path:
        parent = _get(document, path[:-1])
        if isinstance(parent, dict):
            return _replace(document, path[:-1], {k: v for k, v in parent.items() if k != path[-1]})
        return _replace(document, path[:-1], parent[:path[-1]] + parent[path[-1] + 1:])
    if action == "add":
        target = _get(document, path)
        if isinstance(target, dict):
            return _replace(document, path, {**target, draw(st.text(max_size=10)): draw(values)})
        if isinstance(target, list):
            return _replace(document, path, [*target, draw(values)])
    return _replace(document, path, draw(values))


def _get(value: Any, path: tuple) -> Any:
    for part in path:
        value = value[part]
    return value


# ------------------------------------------------------------------------------------ sealed dataset file

SEALED_APP_ID = bytes.fromhex("f022" * 10)
SEALED_COMPOSE_HASH = hashlib.sha256(b"fuzzed recipe").digest()
SEALED_OWNER = keys.PrivateKey(hashlib.sha256(b"fuzz owner").digest())
SEALED_SEAL_KEY = X25519PrivateKey.from_private_bytes(hashlib.sha256(b"fuzz owner sealing").digest())
SEALED_PLAINTEXT = b"id,value\n" + b"".join(b"%d,%d\n" % (i, 3 * i) for i in range(12))
SEALED_ERRORS = (SealedFileError,)


@cache
def sealed_sample() -> bytes:
    """One well-formed sealed file: 4 chunks of 32 bytes, the last one short."""
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder, "cohort.csv")
        source.write_bytes(SEALED_PLAINTEXT)
        summary = seal_file(source, Path(folder, "cohort.sealed"), app_id=SEALED_APP_ID,
                            compose_hash=SEALED_COMPOSE_HASH, owner_key=SEALED_OWNER,
                            owner_seal_pubkey=SEALED_SEAL_KEY.public_key(),
                            kms_root_address="0x8ba1f109551bD432803012645Ac136ddd64DBA72", chunk_size=32,
                            now=datetime(2026, 5, 1, 12, tzinfo=UTC))
        return summary.out_path.read_bytes()


def _sealed_parts(data: bytes) -> tuple[dict, bytes, dict]:
    """(head JSON, payload, tail JSON) of a well-formed file."""
    envelope = sealed_envelope.read_envelope_unverified(io.BytesIO(data))
    payload_end = envelope.payload_offset + payload_length(envelope.header.plaintext_bytes, envelope.header.chunk_size)
    head = data[len(sealed_envelope.MAGIC_LINE) + 4:envelope.payload_offset]
    return json.loads(head), data[envelope.payload_offset:payload_end], json.loads(data[payload_end + 4:])


def _block(value: Any, canonical: bool) -> bytes:
    if canonical:
        try:
            return sealed_envelope.canonical_json(value)
        except (UnicodeEncodeError, ValueError):  # a lone surrogate, NaN: write it the only way JSON can
            pass
    return _dumps_any(value).encode()


def _assemble(head: bytes, payload: bytes, tail: bytes) -> bytes:
    return (sealed_envelope.MAGIC_LINE + struct.pack(">I", len(head)) + head + payload
            + struct.pack(">I", len(tail)) + tail)


def _try_all_sealed_readers(data: bytes) -> bytes | None:
    """Every sealed-file reader on ``data``; the plaintext when it opens."""
    with case("sealed-file", *SEALED_ERRORS):
        read_envelope(io.BytesIO(data))
    with case("sealed-file", *SEALED_ERRORS):
        verify_payload(io.BytesIO(data))
    opened = None
    with case("sealed-file", *SEALED_ERRORS):
        opened = bytes(open_sealed(io.BytesIO(data), SEALED_SEAL_KEY, expected_app_id=SEALED_APP_ID,
                                   expected_compose_hash=SEALED_COMPOSE_HASH).plaintext)
    return opened


@MEDIUM
@given(st.one_of(st.binary(max_size=400), st.binary(max_size=200).map(lambda b: sealed_envelope.MAGIC_LINE + b),
                 st.sampled_from([b"sealroom.sealed/v2\n", b"sealroom.sealed/v01\n", b"sealroom.sealed/v\n",
                                  b"sealroom.sealed/v99999999999\n", b"sealroom.sealed/v1"])))
def test_sealed_file_random_bytes(data: bytes) -> None:
    assert _try_all_sealed_readers(data) is None


@MEDIUM
@given(st.data())
def test_sealed_file_mutations_never_open_to_other_plaintext(data: st.DataObject) -> None:
    original = sealed_sample()
    changed = data.draw(mutated(original))
    opened = _try_all_sealed_readers(changed)
    assert opened is None or (changed == original and opened == SEALED_PLAINTEXT)


@MEDIUM
@given(st.data())
def test_sealed_file_truncations(data: st.DataObject) -> None:
    original = sealed_sample()
    cut = data.draw(st.integers(min_value=0, max_value=len(original) - 1))
    assert _try_all_sealed_readers(original[:cut]) is None


@LARGE
@given(st.data())
def test_sealed_file_head_and_tail_fields_re_signed(data: st.DataObject) -> None:
    """A head or tail field replaced by any JSON value, the block re-encoded (canonically when it can be) and,
    when the layout still parses, the envelope re-signed by its owner, so the signature check passes and
    open_sealed reaches the key unwrap and the payload."""
    head, payload, tail = _sealed_parts(sealed_sample())
    target = data.draw(st.sampled_from(["head", "head", "tail"]))
    if target == "head":
        head = data.draw(field_replaced(head))
    else:
        tail = data.draw(field_replaced(tail))
    canonical = data.draw(st.sampled_from([True, True, True, False]))  # mostly canonical: deeper paths
    head_bytes, tail_bytes = _block(head, canonical), _block(tail, canonical)
    file = _assemble(head_bytes, payload, tail_bytes)
    envelope = None
    with case("sealed-file", *SEALED_ERRORS):
        envelope = sealed_envelope.read_envelope_unverified(io.BytesIO(file))
    if envelope is None:
        with case("sealed-file", *SEALED_ERRORS):  # refused: the public reader must refuse it too
            read_envelope(io.BytesIO(file))
        return
    header = envelope.header
    wanted = payload_length(header.plaintext_bytes, header.chunk_size)
    if wanted <= 1 << 16:  # make the payload as long as the changed header says, so the length check passes
        payload = (payload + bytes(wanted))[:wanted]
    signed = sealed_envelope.sign_envelope(header, envelope.wrapped_key, envelope.rows, envelope.ciphertext_sha256,
                                           SEALED_OWNER)
    file = sealed_envelope.encode_head(header, envelope.wrapped_key) + payload + sealed_envelope.encode_tail(signed)
    _try_all_sealed_readers(file)


@SMALL
@given(json_texts, st.sampled_from(["head", "tail"]))
def test_sealed_file_blocks_of_arbitrary_json_text(text: str, which: str) -> None:
    head, payload, tail = _sealed_parts(sealed_sample())
    raw = text.encode("utf-8", "surrogatepass")
    head_bytes, tail_bytes = sealed_envelope.canonical_json(head), sealed_envelope.canonical_json(tail)
    file = _assemble(raw, payload, tail_bytes) if which == "head" else _assemble(head_bytes, payload, raw)
    assert _try_all_sealed_readers(file) is None


# ------------------------------------------------------------------------------------------------- TDX quote

QUOTE_ERRORS = (QuoteFormatError,)


@cache
def real_quotes() -> tuple[bytes, ...]:
    v4 = (_FIXTURES / "tdx_quote").read_bytes()
    v5 = (_FIXTURES / "tdx_quote_outdated").read_bytes()
    tappd = bytes.fromhex((_FIXTURES / "quote-from-tappd.hex").read_text().strip())
    # The same v4 quote without its zero padding, and re-framed as v5 with a TD report 1.0 body.
    unpadded = v4[:len(v4) - parse_quote_unverified(v4).trailing_zero_padding]
    v5_td10 = struct.pack("<H", 5) + v4[2:48] + struct.pack("<HI", 2, 584) + v4[48:]
    return v4, v5, tappd, unpadded, v5_td10


def _parse_quote(raw: bytes) -> None:
    with case("tdx-quote", *QUOTE_ERRORS):
        quote = parse_quote_unverified(raw)
        _ = (quote.debug, quote.report_data, quote.qe_report.raw)


@LARGE
@given(st.one_of(
    st.binary(max_size=2000),
    # a valid v4/v5 header, then anything: gets past the header checks
    st.tuples(st.sampled_from([4, 5]), st.binary(max_size=1500)).map(
        lambda t: struct.pack("<HHIHH", t[0], 2, 0x81, 0, 0) + bytes(36) + t[1]),
))
def test_tdx_quote_random_bytes(raw: bytes) -> None:
    _parse_quote(raw)


@LARGE
@given(st.data())
def test_tdx_quote_mutated_real_quotes(data: st.DataObject) -> None:
    base = data.draw(st.sampled_from(real_quotes()))
    _parse_quote(data.draw(mutated(base, max_ops=3)))


@SMALL
@given(st.data())
def test_tdx_quote_length_fields_rewritten(data: st.DataObject) -> None:
    """Every length field of the layout (signature data, certification data, QE auth data, v5 body size)
    set to an arbitrary value, with the rest of the real quote intact."""
    base = data.draw(st.sampled_from(real_quotes()))
    quote = parse_quote_unverified(base)
    body_end = len(quote.signed_region)
    auth_at = body_end + 4 + 128 + 6 + 384 + 64
    offsets = [(body_end, 4), (body_end + 4 + 128 + 2, 4), (auth_at, 2), (auth_at + 2 + len(quote.qe_auth_data) + 2, 4)]
    if quote.header.version == 5:
        offsets += [(48, 2), (50, 4)]
    at, width = data.draw(st.sampled_from(offsets))
    value = data.draw(st.integers(min_value=0, max_value=2 ** (8 * width) - 1)
                      | st.integers(min_value=0, max_value=8000))
    changed = bytearray(base)
    changed[at:at + width] = value.to_bytes(width, "little")
    cut = data.draw(st.none() | st.integers(min_value=0, max_value=len(base)))
    _parse_quote(bytes(changed[:cut]))


# ------------------------------------------------------------------------------------------------- event log

EVENTLOG_ERRORS = (EventLogMismatch,)
_BOOT_NAMES = ["system-preparing", "app-id", "compose-hash", "instance-id", "boot-mr-done", "os-image-hash",
               "key-provider", "system-ready", "sealroom-inputs"]
_PAYLOAD_LENGTHS = {"app-id": 20, "compose-hash": 32, "instance-id": 20, "os-image-hash": 32}

event_names = st.one_of(st.sampled_from(_BOOT_NAMES), st.text(max_size=12),
                        st.sampled_from(["", "\ud800", "app-id\0", "système"]))


_entry_fields = st.fixed_dictionaries({
    "imr": st.sampled_from([0, 1, 2, 3, 3, 3]) | st.integers(min_value=-5, max_value=2**70),
    "event_type": st.sampled_from([0x08000001, 0x08000001, 1, 0]),
    "digest": st.binary(min_size=48, max_size=48).map(bytes.hex) | st.binary(max_size=60).map(bytes.hex),
    "event": event_names,
    "event_payload": st.binary(max_size=40).map(bytes.hex),
})


@st.composite
def event_entries(draw: st.DrawFn) -> Any:
    """One event-log entry: mostly well-shaped, with any field possibly of any JSON type or missing."""
    entry = draw(_entry_fields)
    if draw(st.booleans()):
        entry = draw(field_replaced(entry))
    return entry


_BOOT_SEQUENCE = (("system-preparing", b""), ("app-id", bytes(20)), ("compose-hash", bytes(32)),
                  ("instance-id", bytes(20)), ("boot-mr-done", b""), ("os-image-hash", bytes(32)),
                  ("key-provider", b'{"name":"kms","id":"00"}'), ("system-ready", b""))


@st.composite
def _event(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(event_names)
    if name == "key-provider" or (name == "sealroom-inputs" and draw(st.booleans())):
        payload = draw(json_texts).encode("utf-8", "surrogatepass")
    elif name in _PAYLOAD_LENGTHS and draw(st.integers(0, 3)):
        payload = draw(st.binary(min_size=_PAYLOAD_LENGTHS[name], max_size=_PAYLOAD_LENGTHS[name]))
    else:
        payload = draw(st.binary(max_size=40))
    return name, payload


@st.composite
def consistent_logs(draw: st.DrawFn) -> tuple[list[dict], bytes]:
    """dstack's boot sequence with events inserted, dropped or rewritten, every RTMR3 digest computed from its
    payload, and the RTMR3 that replays to: the replay check passes, so the boot values (lengths, duplicates,
    the key-provider JSON, app events) are what is parsed."""
    sequence = list(_BOOT_SEQUENCE) + draw(st.lists(_event(), max_size=2))  # app events after system-ready
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        at = draw(st.integers(min_value=0, max_value=len(sequence)))
        edit = draw(st.sampled_from(["insert", "drop", "rewrite"]))
        if edit == "insert" or at == len(sequence):
            sequence.insert(at, draw(_event()))
        elif edit == "drop":
            del sequence[at]
        else:
            name, payload = draw(_event())
            sequence[at] = (sequence[at][0] if draw(st.booleans()) else name, payload)
    events = []
    for name, payload in sequence:
        try:
            digest = runtime_event_digest(name, payload)
        except (ValueError, UnicodeEncodeError):  # an empty name or a lone surrogate: give it any digest
            digest = draw(st.binary(min_size=48, max_size=48))
        events.append(RuntimeEvent(name=name, payload=payload, digest=digest,
                                   imr=draw(st.sampled_from([3, 3, 3, 3, 3, 0]))))
    rtmr3 = replay_rtmr(event.digest for event in events if event.imr == 3)
    return [event.to_entry() for event in events], rtmr3


@LARGE
@given(st.one_of(json_texts, json_texts.map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=100)))
def test_event_log_random_text(text: str | bytes) -> None:
    with case("event-log", *EVENTLOG_ERRORS):
        parse_event_log(text)
    with case("event-log", *EVENTLOG_ERRORS):
        replay_event_log(text, bytes(48))


@LARGE
@given(st.lists(event_entries(), max_size=6) | json_values, st.booleans())
def test_event_log_arbitrary_entries(entries: Any, as_text: bool) -> None:
    log = _dumps_any(entries) if as_text else entries
    with case("event-log", *EVENTLOG_ERRORS):
        parse_event_log(log)
    with case("event-log", *EVENTLOG_ERRORS):
        replay_event_log(log, hashlib.sha384(b"some quote").digest())


@LARGE
@given(consistent_logs(), st.booleans())
def test_event_log_replays_that_match_their_quote(log: tuple[list[dict], bytes], as_text: bool) -> None:
    entries, rtmr3 = log
    with case("event-log", *EVENTLOG_ERRORS):
        replay_event_log(_dumps_any(entries) if as_text else entries, rtmr3)


@SMALL
@given(st.data())
def test_event_log_mutated_real_log_text(data: st.DataObject) -> None:
    events = [RuntimeEvent.measure(name, payload) for name, payload in _BOOT_SEQUENCE]
    text = event_log_json(events).encode()
    rtmr3 = replay_rtmr(event.digest for event in events)
    changed = data.draw(mutated(text))
    with case("event-log", *EVENTLOG_ERRORS):
        replay_event_log(changed, rtmr3)


# ---------------------------------------------------------------------------- app-compose and study manifest

COMPOSE_ERRORS = (InvalidAppCompose,)
DOCKER_COMPOSE = "services:\n  study:\n    image: ghcr.io/sealroom/study@sha256:" + "0" * 64 + "\n"


def _manifest_dict() -> dict[str, Any]:
    return {
        "version": "sealroom-study/v1",
        "study": "fuzzed cohorts",
        "inputs": [{"owner": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8", "name": "a", "ciphertext_sha256": None},
                   {"owner": "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC", "name": "b",
                    "ciphertext_sha256": "ab" * 32}],
        "analysis": {"kind": "dp_stats", "params": {"max_rows": 1000, "queries": [
            {"kind": "count", "name": "n"},
            {"kind": "mean", "name": "age", "column": "age", "bounds": [0, 120]},
            {"kind": "histogram", "name": "sex", "column": "sex", "categories": ["f", "m"]},
            {"kind": "quantile", "name": "bmi", "column": "bmi", "bounds": [10.0, 60.0], "alpha": 0.5}]}},
        "epsilon": 1.0,
        "delta": 1e-6,
        "output_type": "aggregate_stats",
    }


def _manifest_variants() -> list[dict[str, Any]]:
    sgd = _manifest_dict() | {"output_type": "model_weights", "analysis": {"kind": "dp_sgd", "params": {
        "features": {"age": [0, 120], "bmi": [10, 60]}, "label": "outcome", "model": "mlp", "hidden_units": 8}}}
    fed = _manifest_dict() | {"output_type": "round_record", "analysis": {"kind": "fed_round", "params": {
        "round": 1, "parent_digest": "cd" * 32, "eligible_sites": ["0x70997970C51812dc3A010C7d01b50e0d17dc79C8"],
        "local_epochs": 1, "local_batch_size": 32, "clip_norm": 1.0, "noise_multiplier": 1.0,
        "aggregator": "fedavg", "min_participants": 1, "deadline": 2000000000, "epsilon_per_round": 0.5,
        "epsilon_total": 2.0, "delta": 1e-5}}}
    return [_manifest_dict(), sgd, fed]


@cache
def app_compose_sample() -> dict[str, Any]:
    manifest = StudyManifest.model_validate(_manifest_dict())
    return build_app_compose("fuzzed-study", DOCKER_COMPOSE, manifest)


@cache
def _app_compose_layers() -> tuple[dict[str, Any], dict[str, Any]]:
    """The sample's docker-compose document and the manifest inside it (copy before changing them)."""
    document = yaml.safe_load(app_compose_sample()["docker_compose_file"])
    return document, json.loads(document["configs"]["sealroom_study"]["content"])


def _read_compose(raw: bytes) -> None:
    with case("app-compose", *COMPOSE_ERRORS):
        manifest_from_app_compose(raw)


def _with_yaml(document: Any) -> bytes:
    compose = dict(app_compose_sample())
    try:
        compose["docker_compose_file"] = yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=2**30)
    except yaml.YAMLError:
        compose["docker_compose_file"] = str(document)
    return _normalized(compose)


yaml_texts = st.one_of(
    st.text(max_size=200),
    st.integers(min_value=60, max_value=200).map(lambda n: "[" * n + "]" * n),  # PyYAML scans ~1 KB ahead: slow
    st.integers(min_value=60, max_value=150).map(lambda n: "".join(f"{' ' * i}k{i}:\n" for i in range(n)) + " " * n + "v"),
    st.sampled_from([
        "a: &a [1, 2]\nb: &b [*a, *a, *a]\nc: &c [*b, *b, *b]\nd: [*c, *c, *c]\n",  # aliases, not expanded
        "services: !!python/object:os.system {}\n", "services: {study: {configs: 1}}\n", "? [a, b]\n: c\n",
        "--- a\n--- b\n", "configs: {sealroom_study: {content: 7}}\nservices: []\n", "\t", "%YAML 9.9\n---\n",
        "a: !!binary AAAA\n", "a: 2001-12-14t21:59:43.10-05:00\n", "a: 1e999\n", "a: .nan\n", "x: [" * 30,
    ]),
)


@LARGE
@given(st.one_of(st.binary(max_size=300), json_texts.map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_app_compose_random_documents(raw: bytes) -> None:
    _read_compose(raw)


@MEDIUM
@given(st.data())
def test_app_compose_mutated_bytes(data: st.DataObject) -> None:
    _read_compose(data.draw(mutated(normalized_json_bytes(app_compose_sample()))))


@LARGE
@given(st.data())
def test_app_compose_fields_replaced(data: st.DataObject) -> None:
    """Any field of app-compose.json, of its docker-compose YAML, or of the manifest inside it replaced by any
    value, re-embedded the way the builder writes it (so the outer layers still parse)."""
    layer = data.draw(st.sampled_from(["compose", "yaml", "yaml-text", "manifest", "manifest-text"]))
    compose = dict(app_compose_sample())
    document, manifest = copy.deepcopy(_app_compose_layers())
    if layer == "compose":
        compose = data.draw(field_replaced(compose))
        raw = _normalized(compose)
    elif layer == "yaml":
        raw = _with_yaml(data.draw(field_replaced(document)))
    elif layer == "yaml-text":
        compose["docker_compose_file"] = data.draw(yaml_texts)
        raw = _normalized(compose)
    else:
        if layer == "manifest":
            manifest = data.draw(field_replaced(data.draw(st.sampled_from(_manifest_variants() + [manifest]))))
            content = _normalized(manifest).decode()
        else:
            content = data.draw(json_texts)
        document["configs"]["sealroom_study"]["content"] = content
        raw = _with_yaml(document)
    _read_compose(raw)


MANIFEST_ERRORS = (ValidationError,)


def _validate(value: Any) -> None:
    parsed = None
    with case("study-manifest", *MANIFEST_ERRORS):
        parsed = StudyManifest.model_validate(value)
    if parsed is not None:
        with case("study-manifest", ManifestInvalid):
            validate_manifest(parsed)


@LARGE
@given(st.data())
def test_study_manifest_fields_replaced(data: st.DataObject) -> None:
    manifest = data.draw(st.sampled_from(_manifest_variants()))
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        manifest = data.draw(field_replaced(manifest))
    _validate(manifest)


@MEDIUM
@given(st.one_of(json_texts, st.builds(lambda d: json.dumps(d), st.sampled_from(_manifest_variants()))))
def test_study_manifest_json_text(text: str) -> None:
    with case("study-manifest", *MANIFEST_ERRORS):
        StudyManifest.model_validate_json(text.encode("utf-8", "surrogatepass"))


@SMALL
@given(st.integers(min_value=60, max_value=3000), st.sampled_from(["list", "dict"]))
def test_study_manifest_deeply_nested_params(depth: int, kind: str) -> None:
    value: Any = 1
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    manifest = _manifest_dict()
    manifest["analysis"]["params"] = {"max_rows": 10, "queries": [{"kind": "count", "name": "n"}], "x": value}
    _validate(manifest)
    manifest["analysis"]["params"] = {"max_rows": 10, "queries": [{"kind": value, "name": "n"}]}
    _validate(manifest)


# --------------------------------------------------------------------------------------------------- receipt


RECEIPT_NOW = 1_750_003_600  # an hour after the simulated platform's certificates begin


@cache
def simulated_platform() -> SimulatedTdx:
    with tempfile.TemporaryDirectory() as folder:
        return SimulatedTdx.load_or_create(folder, now=RECEIPT_NOW - 3600)


def _receipt(inputs_payload: bytes = b'{"a":"' + b"22" * 32 + b'","b":"' + b"ab" * 32 + b'"}',
             key_provider: bytes = b'{"name":"kms","id":"00"}', *, log_as_list: bool = False) -> dict[str, Any]:
    """A receipt whose pieces agree where no chain is needed: the SIMULATED quote carries the event log's RTMR3,
    MRCONFIGID names the compose hash, report_data binds the envelope digest; so every link parses its evidence
    (links 4 and 5 then fail as unreachable: there is no chain)."""
    app_compose = _normalized(app_compose_sample())
    compose_hash = hashlib.sha256(app_compose).digest()
    app_id = bytes.fromhex("f022" * 10)
    events = [RuntimeEvent.measure(name, payload) for name, payload in (
        ("system-preparing", b""), ("app-id", app_id), ("compose-hash", compose_hash), ("instance-id", bytes(20)),
        ("boot-mr-done", b""), ("os-image-hash", SIMULATED_OS_IMAGE_HASH), ("key-provider", key_provider),
        ("system-ready", b""), ("sealroom-inputs", inputs_payload))]
    payload = {"output_type": "aggregate_stats", "spent": {"epsilon": 1.0, "delta": 1e-6}, "result": {}}
    envelope = {
        "format": "sealroom-result/v1", "simulated": True, "output_type": "aggregate_stats", "payload": payload,
        "payload_sha256": hashlib.sha256(normalized_json_bytes(payload)).hexdigest(), "app_id": "0x" + app_id.hex(),
        "compose_hash": compose_hash.hex(), "chain_id": 31337, "block": 12, "dstack_app": "0x" + app_id.hex(),
        "dstack_kms": "0x" + "11" * 20, "epsilon_spent": 1.0, "epsilon_remaining": 1.0,
        "inputs": {"a": {"ciphertext_sha256": "22" * 32, "owner": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"},
                   "b": {"ciphertext_sha256": "ab" * 32, "owner": "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC"}},
        "release": {"release_id": "44" * 32, "tx": "55" * 32},
    }
    digest = envelope_digest(envelope)
    quote = simulated_platform().make_quote(digest.ljust(64, b"\0"), rtmr3=replay_rtmr(e.digest for e in events),
                                            mr_config_id=mr_config_id_v1(compose_hash))
    events = [*SIMULATED_BOOT_EVENTS, *events]  # RTMR0-2 entries: they replay to the quote's RTMR0-2
    return {
        "format": "sealroom-attestation/v1", "simulated": True, "envelope": envelope, "envelope_digest": digest.hex(),
        "signature": {"algorithm": "secp256k1", "purpose": "signing", "signature": "77" * 65,
                      "public_key": "88" * 33, "signature_chain": ["99" * 65, "aa" * 65]},
        "quote": quote.hex(),
        "event_log": [e.to_entry() for e in events] if log_as_list else event_log_json(events),
        "app_compose": app_compose.decode("utf-8", "surrogatepass"),
        "chain": {"chain_id": 31337, "dstack_app": "0x" + app_id.hex(), "dstack_kms": "0x" + "11" * 20,
                  "kms_root_address": "0x" + "bb" * 20, "block": 12, "approvals": []},
        "collateral": None,
    }


@cache
def receipt_sample(log_as_list: bool) -> dict[str, Any]:
    return _receipt(log_as_list=log_as_list)


def _verify_receipt_text(text: str | bytes, allow_simulated: bool = True) -> None:
    loaded = None
    with case("receipt", NotAReceipt):
        loaded = load_receipt(text)
    if loaded is not None:
        with case("receipt", NotAReceipt):  # parses the receipt, then runs every link
            verify_receipt(loaded, now=RECEIPT_NOW, chain=None, allow_simulated=allow_simulated,
                           simulated_root_der=simulated_platform().root_der)


@LARGE
@given(st.one_of(json_texts, json_texts.map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=80)))
def test_receipt_load_random_text(text: str | bytes) -> None:
    with case("receipt", NotAReceipt):
        load_receipt(text)


@MEDIUM
@given(st.data())
def test_receipt_fields_replaced(data: st.DataObject) -> None:
    """A receipt with any fields replaced: loading refuses only what is not a v1 receipt (NotAReceipt); every
    other problem is a failed link in the report, never an exception."""
    receipt = receipt_sample(data.draw(st.booleans()))
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        receipt = data.draw(field_replaced(receipt))
    _verify_receipt_text(_dumps_any(receipt), data.draw(st.booleans()))


@SMALL
@given(json_texts.map(lambda t: t.encode("utf-8", "surrogatepass")) | st.binary(max_size=40), st.booleans())
def test_receipt_measured_payloads(payload: bytes, which: bool) -> None:
    """The measured inputs (an app event) or the key-provider payload replaced by anything, in a log that still
    replays to the quote's RTMR3: the links that read them parse them."""
    receipt = _receipt(inputs_payload=payload) if which else _receipt(key_provider=payload)
    _verify_receipt_text(json.dumps(receipt))


# --------------------------------------------------------------------------------- federated update frame

UPDATE_SITE_KEY = hashlib.sha256(b"fuzz site").digest()
UPDATE_PARENT = "cd" * 32


@cache
def update_sample() -> tuple[bytes, Any]:
    update = sign_update(UPDATE_SITE_KEY, round_number=1, parent_digest=UPDATE_PARENT, num_examples=40,
                         vector=np.linspace(-0.1, 0.1, 8, dtype=np.float32))
    contract = RoundContract.model_validate({
        "round": 1, "parent_digest": UPDATE_PARENT, "eligible_sites": [update.site], "local_epochs": 1,
        "local_batch_size": 8, "clip_norm": 1.0, "noise_multiplier": 1.0, "aggregator": "fedavg",
        "min_participants": 1, "deadline": 2_000_000_000, "epsilon_per_round": 0.5, "epsilon_total": 1.0,
        "delta": 1e-5})
    return update_to_bytes(update), contract


def _read_update(frame: bytes) -> None:
    update = None
    with case("fed-update-frame", UpdateUnreadable):
        update = update_from_bytes(frame)
    if update is not None:
        _, contract = update_sample()
        with case("fed-update-frame"):  # a bad update is a Rejection in the record, never an exception
            validate_updates(contract, [update], num_parameters=8)


def _frame(header: bytes, vector: bytes) -> bytes:
    return len(header).to_bytes(4, "big") + header + vector


@LARGE
@given(st.one_of(st.binary(max_size=300), st.tuples(json_texts, st.binary(max_size=40)).map(
    lambda t: _frame(t[0].encode("utf-8", "surrogatepass"), t[1]))))
def test_fed_update_random_frames(frame: bytes) -> None:
    _read_update(frame)


@MEDIUM
@given(st.data())
def test_fed_update_mutated_frames(data: st.DataObject) -> None:
    frame, _ = update_sample()
    _read_update(data.draw(mutated(frame)))


@LARGE
@given(st.data())
def test_fed_update_header_fields_replaced(data: st.DataObject) -> None:
    frame, _ = update_sample()
    size = int.from_bytes(frame[:4], "big")
    header, vector = json.loads(frame[4:4 + size]), frame[4 + size:]
    header = data.draw(field_replaced(header))
    raw = data.draw(st.one_of(st.just(_dumps_any(header)), huge_number.map(
        lambda n: _dumps_any(header)[:-1] + ',"claimed_norm":' + n[:3000] + "}")))
    _read_update(_frame(raw.encode("utf-8", "surrogatepass"), vector))


# ---------------------------------------------------------------------------------------------- KMS box

BOX_NONCE = b"sealroom-fed-update-box/v1:" + bytes(32)
BOX_KEY = X25519PrivateKey.from_private_bytes(hashlib.sha256(b"fuzz cvm ephemeral").digest())
BOX_PLAINTEXT = b'{"k256_key":"00"}'


@cache
def box_sample() -> bytes:
    counter = iter(range(1, 1000))
    return bytes(seal_to_bytes(BOX_PLAINTEXT, nonce=BOX_NONCE, cvm_pub=raw_public(BOX_KEY),
                               rng=lambda n: bytes([next(counter)]) * n))


@LARGE
@given(st.one_of(st.binary(max_size=200), st.deferred(lambda: mutated(box_sample()))))
def test_kms_box_bytes(box: bytes) -> None:
    opened = None
    with case("kms-box", BoxOpenFailed):
        opened = open_bytes(box, nonce=BOX_NONCE, cvm_key=BOX_KEY)
    assert opened is None or (box == box_sample() and opened == BOX_PLAINTEXT)


@MEDIUM
@given(st.binary(max_size=64), st.binary(max_size=40), st.binary(max_size=80), st.binary(max_size=40))
def test_kms_box_answer_parts(kms_pub: bytes, iv: bytes, ciphertext: bytes, nonce: bytes) -> None:
    with case("kms-box", BoxOpenFailed):
        open_answer(SealedAnswer(kms_pub, iv, ciphertext), nonce=nonce, cvm_key=BOX_KEY)
