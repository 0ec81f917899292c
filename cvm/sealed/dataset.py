"""Sealed datasets (DESIGN.md §4): seal a CSV/Parquet file for one recipe; open it inside the CVM.

Safe recipes — the only names this module exports:

* ``seal_file(input, out, …)`` — the owner side: encrypt a CSV or Parquet file, byte for byte, under a
  fresh random data key, wrap that key to the KMS-issued owner sealing key of (app_id, compose_hash,
  owner), sign the envelope with the owner's secp256k1 key, and write one ``*.sealed`` file.
* ``read_envelope(path)`` — the public, signature-checked description of a sealed file.
* ``verify_payload(path)`` — the same, and the payload re-hashed against the signed ``ciphertext_sha256``
  (streamed, no key): run it before anything is spent on opening the file.
* ``open_sealed(path, owner_seal_private_key, …)`` — the CVM side: check signature and recipe binding,
  unwrap, and decrypt into memory only (``OpenedDataset.to_arrow()/.to_numpy()/.to_torch()``).

The file layout, canonical JSON, digests and the exact bytes signed are documented in ``cvm.sealed.envelope``;
chunking and nonces in ``cvm.sealed.stream``; the data-key wrap in ``cvm.sealed.keywrap``. Those modules are the raw tier.

Errors (defined in ``cvm.sealed.errors``)::

    SealedFileError
    ├── MalformedSealedFile          not well-formed sealroom.sealed/v1 (magic, lengths, JSON, fields,
    │                                truncated, trailing data)
    ├── UnsupportedFormatVersion     another sealroom.sealed version
    ├── EnvelopeSignatureInvalid     bad owner signature, or signed by someone other than the owner
    ├── SealedForAnotherRecipe       bound to another app_id / compose hash than expected
    ├── PayloadDigestMismatch        the payload does not hash to the signed ciphertext_sha256
    ├── DecryptionFailed             wrong key or altered payload; opaque, no partial plaintext
    └── InputChangedWhileSealing     the input changed size while being sealed; nothing written

Caller mistakes raise ``TypeError`` / ``ValueError``; OS failures propagate as ``OSError``.
"""

from __future__ import annotations

import contextlib
import hmac
import mmap
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from eth_keys import keys
from eth_utils import is_checksum_address, is_hex_address

from .envelope import (
    MAX_CHUNK_SIZE,
    Envelope,
    EnvelopeHeader,
    encode_head,
    encode_tail,
    read_envelope_unverified,
    sign_envelope,
    verify_envelope_signature,
)
from .errors import (
    DecryptionFailed,
    EnvelopeSignatureInvalid,
    InputChangedWhileSealing,
    MalformedSealedFile,
    PayloadDigestMismatch,
    SealedFileError,
    SealedForAnotherRecipe,
    UnsupportedFormatVersion,
)
from .keywrap import (
    DATA_KEY_BYTES,
    WRAP_NONCE_BYTES,
    WrapContext,
    unwrap_data_key,
    wrap_data_key,
)
from .source import inspect_source
from .stream import (
    chunk_count,
    decrypt_stream,
    encrypt_stream,
    hash_stream,
    payload_length,
)

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa
    import torch

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DecryptionFailed",
    "Envelope",
    "EnvelopeHeader",
    "EnvelopeSignatureInvalid",
    "InputChangedWhileSealing",
    "MalformedSealedFile",
    "OpenedDataset",
    "SealSummary",
    "SealedFileError",
    "SealedForAnotherRecipe",
    "UnsupportedFormatVersion",
    "open_sealed",
    "read_envelope",
    "seal_file",
]
# Also public, and to join __all__ (and cvm.sealed's re-exports) once tests/test_sealed_file.py and
# tests/test_public_api.py pin them: verify_payload, PayloadDigestMismatch.

DEFAULT_CHUNK_SIZE = 4 << 20
SealedSource = str | os.PathLike[str] | BinaryIO


@dataclass(frozen=True)
class SealSummary:
    """What ``seal_file`` wrote: where, how many rows and plaintext bytes, and the two public digests."""

    out_path: Path
    rows: int
    plaintext_bytes: int
    ciphertext_sha256: bytes
    envelope_digest: bytes


def seal_file(
    input_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    app_id: bytes,
    compose_hash: bytes,
    owner_key: keys.PrivateKey,
    owner_seal_pubkey: X25519PublicKey,
    kms_root_address: str,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Callable[[int], None] | None = None,
    rng: Callable[[int], bytes] = os.urandom,
    now: datetime | None = None,
) -> SealSummary:
    """Seal a CSV or Parquet file for one recipe (DESIGN.md §4) into ``out_path``.

    ``app_id`` is the 20-byte DstackApp address, ``compose_hash`` the 32-byte sha256 of app-compose.json,
    ``owner_key`` the owner's ``eth_keys`` secp256k1 private key (it signs the envelope, and its address
    is the envelope's owner), ``owner_seal_pubkey`` the KMS-issued owner sealing key for (app_id,
    compose_hash, owner) — verify the KMS signature on it first —, ``kms_root_address`` the pinned KMS
    root (0x address). The input is encrypted exactly as given (format detected: Parquet magic, else
    CSV), in ``chunk_size`` chunks, with constant memory. ``progress`` is called with the size of each
    plaintext chunk as it is sealed; ``rng(n)`` supplies randomness (data key, ephemeral key, wrap nonce);
    ``now`` (timezone-aware) is the recorded creation time, UTC now by default.

    Writes nothing but ``out_path`` (mode 0600): a temporary file beside it is fsynced and atomically
    renamed over ``out_path`` (replacing any existing file), and removed if anything fails. Raises
    ``ValueError`` / ``TypeError`` for bad arguments or an input that is neither CSV nor Parquet, and
    ``InputChangedWhileSealing`` if the input changes size meanwhile.
    """
    _check_bytes("app_id", app_id, 20)
    _check_bytes("compose_hash", compose_hash, 32)
    if not isinstance(owner_key, keys.PrivateKey):
        raise TypeError("owner_key must be an eth_keys.keys.PrivateKey")
    if not isinstance(owner_seal_pubkey, X25519PublicKey):
        raise TypeError("owner_seal_pubkey must be a cryptography X25519PublicKey")
    kms_root = _parse_address("kms_root_address", kms_root_address)
    if type(chunk_size) is not int or not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be an int in [1, {MAX_CHUNK_SIZE}]")
    created_at = _created_at(now)
    input_path, out_path = Path(input_path), Path(out_path)
    if out_path.exists() and out_path.samefile(input_path):
        raise ValueError("out_path must not be the input file")

    source = inspect_source(input_path)
    header = EnvelopeHeader(
        app_id=app_id,
        compose_hash=compose_hash,
        owner=owner_key.public_key.to_canonical_address(),
        kms_root=kms_root,
        source_format=source.source_format,
        schema=source.schema,
        plaintext_bytes=source.plaintext_bytes,
        chunk_size=chunk_size,
        chunk_count=chunk_count(source.plaintext_bytes, chunk_size),
        created_at=created_at,
    )
    data_key = _random(rng, DATA_KEY_BYTES)
    wrapped_key = wrap_data_key(
        data_key,
        owner_seal_pubkey,
        WrapContext(header.app_id, header.compose_hash, header.owner),
        header.digest,
        ephemeral_private_bytes=_random(rng, 32),
        nonce=_random(rng, WRAP_NONCE_BYTES),
    )
    rows = source.row_counter()

    def observe(chunk: bytearray) -> None:
        rows.feed(chunk)
        if progress is not None:
            progress(len(chunk))

    fd, temp_name = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".partial")
    try:
        with open(fd, "wb") as sink, open(input_path, "rb", buffering=0) as plaintext:
            sink.write(encode_head(header, wrapped_key))
            ciphertext_sha256 = encrypt_stream(
                plaintext,
                sink,
                data_key=data_key,
                aad=header.digest,
                plaintext_bytes=source.plaintext_bytes,
                chunk_size=chunk_size,
                observe=observe,
            )
            envelope = sign_envelope(header, wrapped_key, rows.rows, ciphertext_sha256, owner_key)
            sink.write(encode_tail(envelope))
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(temp_name, out_path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(out_path.parent)
    return SealSummary(out_path, envelope.rows, source.plaintext_bytes, ciphertext_sha256, envelope.digest)


def read_envelope(source: SealedSource) -> Envelope:
    """Parse a sealed file's envelope and verify the owner signature (signer recovered == envelope owner).

    ``source`` is a path or a seekable binary file object. Raises ``MalformedSealedFile``,
    ``UnsupportedFormatVersion`` or ``EnvelopeSignatureInvalid``. It reads only the head and tail, so it
    does not check the payload against ``ciphertext_sha256``: ``verify_payload`` and ``open_sealed`` do.
    """
    with _binary_stream(source) as stream:
        envelope = read_envelope_unverified(stream)
    verify_envelope_signature(envelope)
    return envelope


def verify_payload(source: SealedSource) -> Envelope:
    """``read_envelope``, then re-hash the payload and check it against the owner-signed ``ciphertext_sha256``.

    Needs no key and decrypts nothing: the payload streams through two fixed buffers and is hashed on a second
    thread (``cvm.sealed.stream.hash_stream``), so memory does not grow with the file. Returns the envelope;
    raises what ``read_envelope`` raises, and ``PayloadDigestMismatch`` when the payload is not the one the
    owner signed (damaged or altered after sealing). ``open_sealed`` checks the same digest while it decrypts;
    this is the check to run first, before a key is asked for and budget is spent.
    """
    with _binary_stream(source) as stream:
        envelope = read_envelope_unverified(stream)
        verify_envelope_signature(envelope)
        header = envelope.header
        stream.seek(envelope.payload_offset)
        digest = hash_stream(stream, payload_length(header.plaintext_bytes, header.chunk_size))
    if not hmac.compare_digest(digest, envelope.ciphertext_sha256):
        raise PayloadDigestMismatch(
            f"the payload does not hash to the ciphertext_sha256 its owner signed (signed "
            f"{envelope.ciphertext_sha256.hex()}, found {digest.hex()}): the file was damaged or altered after sealing"
        )
    return envelope


def open_sealed(
    source: SealedSource,
    owner_seal_private_key: X25519PrivateKey,
    *,
    expected_app_id: bytes,
    expected_compose_hash: bytes,
) -> OpenedDataset:
    """Open a sealed file inside the CVM: verify, unwrap, decrypt into memory (DESIGN.md §6 step 4).

    In order: layout and owner signature (``read_envelope``); the file must be sealed for
    ``expected_app_id`` and ``expected_compose_hash`` — the recipe this CVM measured — else
    ``SealedForAnotherRecipe``; the data key is unwrapped with ``owner_seal_private_key`` (released by
    the KMS); the chunks are decrypted into one preallocated in-memory buffer, nothing on disk, and the
    ciphertext must hash to the signed ``ciphertext_sha256``. Any key or payload failure raises
    ``DecryptionFailed`` with the buffer zeroed. Checking that the owner belongs to the study is the
    caller's job (``envelope.header.owner``).
    """
    if not isinstance(owner_seal_private_key, X25519PrivateKey):
        raise TypeError("owner_seal_private_key must be a cryptography X25519PrivateKey")
    _check_bytes("expected_app_id", expected_app_id, 20)
    _check_bytes("expected_compose_hash", expected_compose_hash, 32)
    with _binary_stream(source) as stream:
        envelope = read_envelope_unverified(stream)
        verify_envelope_signature(envelope)
        header = envelope.header
        if header.app_id != expected_app_id or header.compose_hash != expected_compose_hash:
            raise SealedForAnotherRecipe(
                f"sealed for app {header.app_id.hex()} / compose hash {header.compose_hash.hex()}, "
                f"not for app {expected_app_id.hex()} / compose hash {expected_compose_hash.hex()}"
            )
        data_key = unwrap_data_key(
            envelope.wrapped_key,
            owner_seal_private_key,
            WrapContext(header.app_id, header.compose_hash, header.owner),
            header.digest,
        )
        plaintext = _plaintext_buffer(header.plaintext_bytes)
        stream.seek(envelope.payload_offset)
        decrypt_stream(
            stream,
            memoryview(plaintext),
            data_key=data_key,
            aad=header.digest,
            chunk_size=header.chunk_size,
            expected_ciphertext_sha256=envelope.ciphertext_sha256,
        )
    return OpenedDataset(envelope, plaintext)


class OpenedDataset:
    """The authenticated plaintext of one sealed file, held in memory only."""

    def __init__(self, envelope: Envelope, plaintext: mmap.mmap | bytearray) -> None:
        self.envelope = envelope
        self._plaintext = plaintext

    @property
    def plaintext(self) -> memoryview:
        """The source file's bytes, exactly as sealed (read-only view, no copy)."""
        return memoryview(self._plaintext).toreadonly()

    def to_arrow(self, columns: Sequence[str] | None = None) -> pa.Table:
        """Parse the in-memory bytes with pyarrow (Parquet or CSV, as recorded), optionally only ``columns``."""
        import pyarrow as pa

        data = pa.BufferReader(pa.py_buffer(self._plaintext))
        if self.envelope.header.source_format == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(data, columns=None if columns is None else list(columns))
        import pyarrow.csv as pcsv

        include = pcsv.ConvertOptions(include_columns=[] if columns is None else list(columns))
        return pcsv.read_csv(data, convert_options=include)

    def to_numpy(self, columns: Sequence[str] | None = None) -> np.ndarray:
        """The numeric ``columns`` (all by default) as one rows × columns array (see ``cvm.sealed.tabular``)."""
        from .tabular import table_to_numpy

        return table_to_numpy(self.to_arrow(columns))

    def to_torch(self, columns: Sequence[str] | None = None) -> torch.Tensor:
        """``to_numpy(columns)`` as a torch tensor sharing its memory (torch is imported only here)."""
        import torch

        return torch.from_numpy(self.to_numpy(columns))


def _plaintext_buffer(size: int) -> mmap.mmap | bytearray:
    """Memory for the whole plaintext: private anonymous memory, never backed by a file.

    An anonymous mapping rather than ``bytearray(size)``: the kernel zero-fills its pages on first
    write, inside the decrypt loop where that overlaps with hashing, while a bytearray is memset in
    full before decryption starts (about 0.5 s per GiB on the benchmark machine). An empty mapping
    is not allowed, hence the bytearray for size 0.
    """
    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE) if size else bytearray()


def _check_bytes(name: str, value: object, length: int) -> None:
    if not isinstance(value, bytes):
        raise TypeError(f"{name} must be bytes, not {type(value).__name__}")
    if len(value) != length:
        raise ValueError(f"{name} must be {length} bytes, got {len(value)}")


def _parse_address(name: str, value: object) -> bytes:
    """A 0x hex address; mixed case must be a valid EIP-55 checksum (all-lower/upper carries none)."""
    if not (isinstance(value, str) and value.startswith("0x") and is_hex_address(value)):
        raise ValueError(f"{name} must be a 0x-prefixed 20-byte hex address")
    digits = value[2:]
    if digits not in (digits.lower(), digits.upper()) and not is_checksum_address(value):
        raise ValueError(f"{name} has mixed case but an invalid EIP-55 checksum")
    return bytes.fromhex(digits)


def _random(rng: Callable[[int], bytes], length: int) -> bytes:
    value = rng(length)
    if not isinstance(value, bytes) or len(value) != length:
        raise ValueError(f"rng({length}) must return {length} bytes")
    return value


def _created_at(now: datetime | None) -> datetime:
    if now is None:
        now = datetime.now(UTC)
    elif not isinstance(now, datetime) or now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    return now.astimezone(UTC).replace(microsecond=0)


@contextlib.contextmanager
def _binary_stream(source: SealedSource) -> Iterator[BinaryIO]:
    """Open a path (closing it afterwards) or lend a caller's seekable binary file object as is."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb", buffering=0) as stream:
            yield stream
        return
    if not (hasattr(source, "readinto") and hasattr(source, "seekable")):
        raise TypeError("source must be a path or a binary file object")
    if not source.seekable():
        raise ValueError("source file object must be seekable (the envelope tail follows the payload)")
    yield source


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable: fsync the directory entry (POSIX)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
