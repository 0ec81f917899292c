"""What the envelope records about the input file: its format, Arrow schema and row count.

Cheap on purpose, so that sealing runs at AES-GCM speed: Parquet schema and rows come from the
footer metadata; a CSV's schema comes from pyarrow's inference on the first 1 MiB block (a full
``pyarrow.csv.read_csv`` may widen a type, e.g. int64 → double, if a later row needs it) and its rows
are counted while the bytes stream through the encryptor (``CsvRowCounter``). On the sealing side
pyarrow is imported only here, and only when a file is inspected.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import pyarrow as pa

SourceFormat = Literal["csv", "parquet"]

_PARQUET_MAGIC = b"PAR1"  # a Parquet file starts and ends with these 4 bytes (Parquet file format spec)
_CSV_INFERENCE_BLOCK = 1 << 20


@dataclass(frozen=True)
class SchemaField:
    """One column of the recorded schema: its name and its Arrow type as ``str(pyarrow.DataType)``."""

    name: str
    type: str


@dataclass(frozen=True)
class SourceInfo:
    """The input's format, schema and size, and its row count where the footer gives it (Parquet)."""

    source_format: SourceFormat
    schema: tuple[SchemaField, ...]
    plaintext_bytes: int
    known_rows: int | None

    def row_counter(self) -> CsvRowCounter | KnownRows:
        """What to feed the plaintext chunks to; its ``rows`` is the count once all chunks were fed."""
        return CsvRowCounter() if self.known_rows is None else KnownRows(self.known_rows)


def inspect_source(path: str | os.PathLike[str]) -> SourceInfo:
    """Identify ``path`` as Parquet (magic at both ends) or else CSV, and read its schema cheaply.

    Raises ``ValueError`` when the file is neither a readable Parquet file nor a CSV file that
    pyarrow can infer a schema for (an empty file included). The message never quotes the data.
    """
    import pyarrow as pa

    size = os.path.getsize(path)
    with open(path, "rb") as probe:
        head = probe.read(len(_PARQUET_MAGIC))
        probe.seek(max(0, size - len(_PARQUET_MAGIC)))
        tail = probe.read(len(_PARQUET_MAGIC))
    is_parquet = size >= 2 * len(_PARQUET_MAGIC) and head == tail == _PARQUET_MAGIC
    try:
        if is_parquet:
            import pyarrow.parquet as pq

            with pq.ParquetFile(path) as parquet:
                return SourceInfo("parquet", _schema_fields(parquet.schema_arrow), size, parquet.metadata.num_rows)
        import pyarrow.csv as pcsv

        options = pcsv.ReadOptions(use_threads=False, block_size=_CSV_INFERENCE_BLOCK)
        with pcsv.open_csv(path, read_options=options) as reader:
            return SourceInfo("csv", _schema_fields(reader.schema), size, None)
    except pa.ArrowException as exc:
        # pyarrow's message may quote a line of the data, so only its type is kept.
        kind = "Parquet" if is_parquet else "CSV"
        raise ValueError(f"input is not a {kind} file pyarrow can read ({type(exc).__name__})") from None


def _schema_fields(schema: pa.Schema) -> tuple[SchemaField, ...]:
    return tuple(SchemaField(field.name, str(field.type)) for field in schema)


class KnownRows:
    """The row count of a format that records it (Parquet footer): feeding chunks changes nothing."""

    def __init__(self, rows: int) -> None:
        self.rows = rows

    def feed(self, chunk: bytearray) -> None:
        """Nothing to count."""


class CsvRowCounter:
    """Counts the data rows of a CSV file fed to it chunk by chunk (RFC 4180 quoting).

    Exactly what it counts: records end at an LF byte outside a double-quoted field; a final record
    without a trailing LF counts too; the header line is subtracted. Quotes are tracked by parity, so
    escaped quotes (``""``) and quoted fields spanning lines or chunk boundaries are handled. CRLF files
    count correctly; files with bare-CR line endings, blank lines (pyarrow skips them) or a quote
    character other than ``"`` may count differently from pyarrow.

    Cost: ``bytearray.count`` speed for chunks without quotes; chunks with quotes pay a
    ``translate`` pass (~0.5 GB/s) to keep only quotes and LFs, and a short loop only where quoted
    fields span lines.
    """

    _DROP_ALL_BUT_QUOTE_AND_LF = bytes(b for b in range(256) if b not in b'"\n')

    def __init__(self) -> None:
        self._record_ends = 0
        self._in_quotes = False
        self._last_byte: int | None = None

    def feed(self, chunk: bytearray) -> None:
        """Account for the next chunk of the file."""
        if not chunk:
            return
        self._last_byte = chunk[-1]
        if not self._in_quotes and chunk.find(b'"') < 0:
            self._record_ends += chunk.count(b"\n")
            return
        # Keep only quotes and LFs, then drop quote pairs with no LF between them: they cannot change
        # whether any LF is inside a quoted field. What is left is LFs and isolated quotes.
        marks = chunk.translate(None, self._DROP_ALL_BUT_QUOTE_AND_LF).replace(b'""', b"")
        pieces = marks.split(b'"')
        # pieces alternate outside/inside a quoted field, starting from the current state.
        first_outside = 1 if self._in_quotes else 0
        self._record_ends += sum(len(piece) for piece in pieces[first_outside::2])
        if len(pieces) % 2 == 0:
            self._in_quotes = not self._in_quotes

    @property
    def rows(self) -> int:
        """Data rows seen so far: records minus the header line."""
        unterminated_last_record = self._last_byte is not None and self._last_byte != ord("\n")
        return max(0, self._record_ends + unterminated_last_record - 1)
