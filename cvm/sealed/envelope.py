"""The sealroom.sealed/v1 file layout and its signed envelope (DESIGN.md §4). Low level: use ``cvm.sealed.dataset``.

Layout — one file, parsed front to back, nothing may follow the tail::

    b"sealroom.sealed/v1\\n"          magic line: format name and version (like age-encryption.org/v1)
    u32_be(H) ‖ head JSON (H bytes)    header fields + wrapped data key, written before the payload
    payload                            chunk_count AES-256-GCM chunks (``cvm.sealed.stream``), of a length fixed
                                       by the header: plaintext_bytes + 16 · chunk_count
    u32_be(T) ‖ tail JSON (T bytes)    rows, ciphertext_sha256, signature: known only after encryption

Putting the after-the-fact fields in a tail lets sealing write the file in one pass (no second copy
of a large payload) while a reader still finds everything from the header alone.

The **envelope** is the union of head and tail. Every JSON block is canonical (keys sorted,
separators ``,`` ``:``, UTF-8, no NaN) and a reader refuses any other encoding of the same values.
Byte encodings: app_id, owner and kms_root as 0x EIP-55 checksum addresses; other bytes as lowercase
hex without 0x; created_at as ``YYYY-MM-DDTHH:MM:SSZ`` (UTC).

Digests and signature (exact bytes):

* header digest = ``sha256(b"sealroom-header/v1:" ‖ canonical JSON of the header fields)`` — the
  header fields are everything the owner fixes before encrypting (version, app_id, compose_hash, owner,
  kms_root, source_format, schema, plaintext_bytes, chunk_size, chunk_count, created_at). It is the AAD
  of the data-key wrap and of every payload chunk.
* owner signature = recoverable secp256k1 (eth_keys) over
  ``keccak256(b"sealroom-envelope/v1:" ‖ canonical JSON of the envelope without "signature")``, stored
  as 65 bytes r ‖ s ‖ v with v in {0, 1} and low s; the signer recovered must be the envelope's owner.
* envelope digest = ``sha256`` of that same domain-tagged message: names the sealed dataset.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import Any, BinaryIO, get_args

from eth_keys import keys
from eth_keys.constants import SECPK1_N
from eth_keys.exceptions import BadSignature
from eth_utils import keccak, to_checksum_address

from compose import safe_parse

from .errors import (
    EnvelopeSignatureInvalid,
    MalformedSealedFile,
    UnsupportedFormatVersion,
)
from .keywrap import DATA_KEY_BYTES, WRAP_NONCE_BYTES, WrappedKey
from .source import SchemaField, SourceFormat
from .stream import TAG_BYTES, chunk_count, payload_length

FORMAT_VERSION = 1
_MAGIC_PREFIX = b"sealroom.sealed/v"
MAGIC_LINE = _MAGIC_PREFIX + b"%d\n" % FORMAT_VERSION
HEADER_DOMAIN = b"sealroom-header/v1:"
ENVELOPE_DOMAIN = b"sealroom-envelope/v1:"
MAX_CHUNK_SIZE = 64 << 20
_MAX_BLOCK_BYTES = 1 << 20  # head or tail JSON; a schema of thousands of columns still fits
_LENGTH = struct.Struct(">I")
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_MAX_UINT = 2**63 - 1

_HEADER_KEYS = frozenset(
    {"version", "app_id", "compose_hash", "owner", "kms_root", "source_format", "schema",
     "plaintext_bytes", "chunk_size", "chunk_count", "created_at"}
)  # fmt: skip
_HEAD_KEYS = _HEADER_KEYS | {"wrapped_key"}
_TAIL_KEYS = frozenset({"rows", "ciphertext_sha256", "signature"})


@dataclass(frozen=True)
class EnvelopeHeader:
    """The fields the owner fixes before encrypting; their digest is bound into every chunk.

    app_id: DstackApp address (20 bytes); compose_hash: sha256 of app-compose.json (32); owner: the
    signer's address (20); kms_root: address of the KMS root key the sealing key was checked against
    (20); schema: the input's Arrow schema; created_at: UTC, whole seconds.
    """

    app_id: bytes
    compose_hash: bytes
    owner: bytes
    kms_root: bytes
    source_format: SourceFormat
    schema: tuple[SchemaField, ...]
    plaintext_bytes: int
    chunk_size: int
    chunk_count: int
    created_at: datetime

    @property
    def digest(self) -> bytes:
        """sha256(b"sealroom-header/v1:" ‖ canonical header JSON): AAD of the key wrap and of each chunk."""
        return hashlib.sha256(HEADER_DOMAIN + canonical_json(self._json)).digest()

    @cached_property
    def _json(self) -> dict[str, Any]:
        # Cached: EIP-55 checksumming is slow and the header is encoded several times per open.
        return {
            "version": FORMAT_VERSION,
            "app_id": to_checksum_address(self.app_id),
            "compose_hash": self.compose_hash.hex(),
            "owner": to_checksum_address(self.owner),
            "kms_root": to_checksum_address(self.kms_root),
            "source_format": self.source_format,
            "schema": [{"name": field.name, "type": field.type} for field in self.schema],
            "plaintext_bytes": self.plaintext_bytes,
            "chunk_size": self.chunk_size,
            "chunk_count": self.chunk_count,
            "created_at": self.created_at.strftime(_TIME_FORMAT),
        }


@dataclass(frozen=True)
class Envelope:
    """The public, owner-signed description of a sealed file (module docstring).

    rows: data rows of the input (``cvm.sealed.source``); ciphertext_sha256: of the payload as stored;
    signature: 65 bytes r ‖ s ‖ v by ``header.owner``.
    """

    header: EnvelopeHeader
    wrapped_key: WrappedKey
    rows: int
    ciphertext_sha256: bytes
    signature: bytes

    @property
    def digest(self) -> bytes:
        """sha256(b"sealroom-envelope/v1:" ‖ canonical envelope JSON without the signature)."""
        return hashlib.sha256(self._signed_message()).digest()

    @property
    def payload_offset(self) -> int:
        """Where the payload starts in the file: after the magic line and the head block."""
        return len(MAGIC_LINE) + _LENGTH.size + len(_head_block(self.header, self.wrapped_key))

    def _signed_message(self) -> bytes:
        body = {
            **self.header._json,
            "wrapped_key": _wrapped_key_json(self.wrapped_key),
            "rows": self.rows,
            "ciphertext_sha256": self.ciphertext_sha256.hex(),
        }
        return ENVELOPE_DOMAIN + canonical_json(body)


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace, UTF-8 (not \\u-escaped), no NaN/Infinity."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def encode_head(header: EnvelopeHeader, wrapped_key: WrappedKey) -> bytes:
    """The bytes before the payload: magic line ‖ u32_be(H) ‖ head JSON."""
    head = _head_block(header, wrapped_key)
    return MAGIC_LINE + _LENGTH.pack(len(head)) + head


def encode_tail(envelope: Envelope) -> bytes:
    """The bytes after the payload: u32_be(T) ‖ tail JSON."""
    tail = _tail_block(envelope.rows, envelope.ciphertext_sha256, envelope.signature)
    return _LENGTH.pack(len(tail)) + tail


def sign_envelope(
    header: EnvelopeHeader, wrapped_key: WrappedKey, rows: int, ciphertext_sha256: bytes, owner_key: keys.PrivateKey
) -> Envelope:
    """Complete the envelope with the owner's recoverable signature (module docstring)."""
    unsigned = Envelope(header, wrapped_key, rows, ciphertext_sha256, signature=b"")
    signature = owner_key.sign_msg_hash(keccak(unsigned._signed_message())).to_bytes()
    return Envelope(header, wrapped_key, rows, ciphertext_sha256, signature)


def verify_envelope_signature(envelope: Envelope) -> None:
    """Return if the owner named in the envelope signed it; else raise ``EnvelopeSignatureInvalid``."""
    try:
        signature = keys.Signature(envelope.signature)
    except BadSignature:
        raise EnvelopeSignatureInvalid("envelope signature is not a valid secp256k1 signature") from None
    if signature.s > SECPK1_N // 2:
        raise EnvelopeSignatureInvalid("envelope signature is not in canonical low-s form")
    try:
        signer = signature.recover_public_key_from_msg_hash(keccak(envelope._signed_message()))
    except BadSignature:
        raise EnvelopeSignatureInvalid("no public key can be recovered from the envelope signature") from None
    if signer.to_canonical_address() != envelope.header.owner:
        raise EnvelopeSignatureInvalid(
            f"envelope is signed by {signer.to_checksum_address()}, "
            f"not by the owner it names ({envelope.header._json['owner']})"
        )


def _wrapped_key_json(wrapped_key: WrappedKey) -> dict[str, str]:
    return {
        "ephemeral_public_key": wrapped_key.ephemeral_public_key.hex(),
        "nonce": wrapped_key.nonce.hex(),
        "ciphertext": wrapped_key.ciphertext.hex(),
    }


def _head_block(header: EnvelopeHeader, wrapped_key: WrappedKey) -> bytes:
    return canonical_json({**header._json, "wrapped_key": _wrapped_key_json(wrapped_key)})


def _tail_block(rows: int, ciphertext_sha256: bytes, signature: bytes) -> bytes:
    return canonical_json({"rows": rows, "ciphertext_sha256": ciphertext_sha256.hex(), "signature": signature.hex()})


def read_envelope_unverified(stream: BinaryIO) -> Envelope:
    """Parse the layout and envelope of the sealed file in seekable ``stream`` WITHOUT checking the signature.

    Checks structure only: magic line, block lengths, field types and sizes, that each block is the
    canonical encoding of its values, and that the file is exactly as long as the header says (so
    truncation and trailing data are refused). Raises ``MalformedSealedFile`` or
    ``UnsupportedFormatVersion``.
    """
    size = stream.seek(0, 2)
    stream.seek(0)
    _read_magic_line(stream)
    header, wrapped_key = _decode_head(_read_block(stream, "head", size))
    tail_offset = stream.tell() + payload_length(header.plaintext_bytes, header.chunk_size)
    if tail_offset + _LENGTH.size > size:
        raise MalformedSealedFile("file is shorter than its header declares (truncated)")
    stream.seek(tail_offset)
    rows, ciphertext_sha256, signature = _decode_tail(_read_block(stream, "tail", size))
    if stream.tell() != size:
        raise MalformedSealedFile("unexpected data after the tail block")
    return Envelope(header, wrapped_key, rows, ciphertext_sha256, signature)


def _read_magic_line(stream: BinaryIO) -> None:
    start = stream.read(len(MAGIC_LINE) + 8)  # room for a longer future version number
    if start.startswith(MAGIC_LINE):
        stream.seek(len(MAGIC_LINE))
        return
    if start.startswith(_MAGIC_PREFIX):
        version, newline, _ = start[len(_MAGIC_PREFIX) :].partition(b"\n")
        if newline and version.isdigit() and not version.startswith(b"0"):
            raise UnsupportedFormatVersion(f"sealroom.sealed version {version.decode()} is not supported (only v1)")
    raise MalformedSealedFile("not a sealroom.sealed file (bad magic line)")


def _read_block(stream: BinaryIO, name: str, size: int) -> bytes:
    prefix = stream.read(_LENGTH.size)
    if len(prefix) != _LENGTH.size:
        raise MalformedSealedFile(f"{name} block length is missing (truncated)")
    (length,) = _LENGTH.unpack(prefix)
    if not 0 < length <= _MAX_BLOCK_BYTES or stream.tell() + length > size:
        raise MalformedSealedFile(f"{name} block length {length} is out of range")
    return stream.read(length)


def _decode_head(raw: bytes) -> tuple[EnvelopeHeader, WrappedKey]:
    head = _json_object(raw, "head", _HEAD_KEYS)
    if _uint(head, "version") != FORMAT_VERSION:
        raise MalformedSealedFile("head version does not match the magic line")
    if head["source_format"] not in get_args(SourceFormat):
        raise MalformedSealedFile("source_format must be 'csv' or 'parquet'")
    header = EnvelopeHeader(
        app_id=_address(head, "app_id"),
        compose_hash=_hex(head, "compose_hash", 32),
        owner=_address(head, "owner"),
        kms_root=_address(head, "kms_root"),
        source_format=head["source_format"],
        schema=_schema(head["schema"]),
        plaintext_bytes=_uint(head, "plaintext_bytes"),
        chunk_size=_uint(head, "chunk_size", minimum=1, maximum=MAX_CHUNK_SIZE),
        chunk_count=_uint(head, "chunk_count", minimum=1),
        created_at=_timestamp(head, "created_at"),
    )
    if header.chunk_count != chunk_count(header.plaintext_bytes, header.chunk_size):
        raise MalformedSealedFile("chunk_count does not match plaintext_bytes and chunk_size")
    wrapped = head["wrapped_key"]
    if not isinstance(wrapped, dict) or wrapped.keys() != {"ephemeral_public_key", "nonce", "ciphertext"}:
        raise MalformedSealedFile("wrapped_key must hold ephemeral_public_key, nonce and ciphertext")
    wrapped_key = WrappedKey(
        ephemeral_public_key=_hex(wrapped, "ephemeral_public_key", 32),
        nonce=_hex(wrapped, "nonce", WRAP_NONCE_BYTES),
        ciphertext=_hex(wrapped, "ciphertext", DATA_KEY_BYTES + TAG_BYTES),
    )
    # One comparison enforces every encoding rule at once: key order, no whitespace, lowercase hex,
    # EIP-55 case, the time format. A value has exactly one accepted byte string.
    try:
        canonical = _head_block(header, wrapped_key)
    except UnicodeEncodeError:  # a schema string with a lone surrogate (a \ud800 escape): UTF-8 cannot hold it
        raise MalformedSealedFile("head block holds text that is not valid Unicode") from None
    if canonical != raw:
        raise MalformedSealedFile("head block is not in canonical encoding")
    return header, wrapped_key


def _decode_tail(raw: bytes) -> tuple[int, bytes, bytes]:
    tail = _json_object(raw, "tail", _TAIL_KEYS)
    decoded = _uint(tail, "rows"), _hex(tail, "ciphertext_sha256", 32), _hex(tail, "signature", 65)
    if _tail_block(*decoded) != raw:
        raise MalformedSealedFile("tail block is not in canonical encoding")
    return decoded


def _json_object(raw: bytes, name: str, keys_expected: frozenset[str]) -> dict[str, Any]:
    try:
        value = safe_parse.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except safe_parse.TooDeeplyNested as deep:
        raise MalformedSealedFile(f"{name} block: {deep}") from None
    except (UnicodeDecodeError, ValueError):  # JSONDecodeError is a ValueError
        raise MalformedSealedFile(f"{name} block is not valid UTF-8 JSON") from None
    if not isinstance(value, dict) or value.keys() != keys_expected:
        raise MalformedSealedFile(f"{name} block must be a JSON object with the fields {sorted(keys_expected)}")
    return value


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _uint(obj: dict[str, Any], key: str, *, minimum: int = 0, maximum: int = _MAX_UINT) -> int:
    value = obj[key]
    if type(value) is not int or not minimum <= value <= maximum:  # type(): a JSON true is not an int
        raise MalformedSealedFile(f"{key} must be an integer in [{minimum}, {maximum}]")
    return value


def _hex(obj: dict[str, Any], key: str, length: int, *, prefix: str = "") -> bytes:
    value = obj[key]
    problem = f"{key} must be {length} bytes of hex" + (f" prefixed with {prefix}" if prefix else "")
    if not (isinstance(value, str) and value.startswith(prefix)):
        raise MalformedSealedFile(problem)
    try:
        raw = bytes.fromhex(value[len(prefix) :])
    except ValueError:
        raise MalformedSealedFile(problem) from None
    if len(raw) != length:
        raise MalformedSealedFile(problem)
    return raw


def _address(obj: dict[str, Any], key: str) -> bytes:
    return _hex(obj, key, 20, prefix="0x")


def _schema(value: Any) -> tuple[SchemaField, ...]:
    if not isinstance(value, list):
        raise MalformedSealedFile("schema must be a list")
    fields = []
    for item in value:
        if not (isinstance(item, dict) and item.keys() == {"name", "type"} and all(map(_is_str, item.values()))):
            raise MalformedSealedFile("each schema entry must be {name: str, type: str}")
        fields.append(SchemaField(item["name"], item["type"]))
    return tuple(fields)


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _timestamp(obj: dict[str, Any], key: str) -> datetime:
    try:
        return datetime.strptime(obj[key], _TIME_FORMAT).replace(tzinfo=UTC)
    except (TypeError, ValueError):
        raise MalformedSealedFile(f"{key} must be a UTC time YYYY-MM-DDTHH:MM:SSZ") from None
