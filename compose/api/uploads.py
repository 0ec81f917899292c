"""Receive a run's sealed files: the multipart body is streamed straight into the run's folder as it arrives,
never held in memory or spooled elsewhere first, under a cap on the files' number and on their total size."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fastapi import HTTPException, Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool

__all__ = ["FIELD", "UPLOAD_OPENAPI", "TooManyFiles", "Upload", "receive_sealed_files"]

FIELD = "sealed"
_BATCH_BYTES = 1 << 20           # parse and write in batches of about this much, off the event loop

UPLOAD_OPENAPI = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": [FIELD],
    "properties": {FIELD: {"type": "array", "items": {"type": "string", "format": "binary"},
                           "description": "the sealed files, one per input of the manifest"}}}}}}}


@dataclass
class Upload:
    path: Path
    filename: str | None
    size: int = 0


class TooManyFiles(Exception):
    """More sealed files than the run takes; the upload was stopped at the first one too many."""


class _Receiver:
    """python-multipart callbacks: each ``sealed`` part goes to its own file, other parts are dropped."""

    def __init__(self, folder: Path, max_files: int) -> None:
        self.folder = folder
        self.max_files = max_files
        self.uploads: list[Upload] = []
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._out: BinaryIO | None = None

    def callbacks(self) -> dict:
        return {"on_part_begin": self.on_part_begin, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished, "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end}

    def on_part_begin(self) -> None:
        self._disposition = b""

    # python-multipart bounds each header's size ("Maximum header size exceeded": a parse error, so 422).
    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if options.get(b"name") != FIELD.encode():
            return  # not a sealed file: its data is dropped
        if len(self.uploads) == self.max_files:
            raise TooManyFiles
        # The analyst's file name is kept as a label only; only our own names touch the disk.
        filename = options.get(b"filename")
        upload = Upload(self.folder / f"input-{len(self.uploads)}.sealed",
                        filename.decode("utf-8", "replace") if filename is not None else None)
        self._out = upload.path.open("wb")
        self.uploads.append(upload)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._out is not None:
            self._out.write(data[start:end])
            self.uploads[-1].size += end - start

    def on_part_end(self) -> None:
        self.close()

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


async def receive_sealed_files(request: Request, folder: Path, *, max_files: int) -> list[Upload]:
    """Stream the request's multipart ``sealed`` parts into ``folder`` (created), as ``input-<i>.sealed``.

    The total size is capped by the app's request guard (413 as soon as the body passes it). Raises
    :class:`TooManyFiles` at the file after ``max_files``, ``HTTPException(422)`` for a body that is not
    multipart/form-data. The caller removes ``folder`` when anything fails.
    """
    kind, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise HTTPException(422, f"upload the sealed files as multipart/form-data, one {FIELD!r} part per file")
    folder.mkdir(parents=True)
    receiver = _Receiver(folder, max_files)
    parser = MultipartParser(boundary, receiver.callbacks())
    try:
        batch: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            batch.append(chunk)
            size += len(chunk)
            if size >= _BATCH_BYTES:
                await run_in_threadpool(parser.write, b"".join(batch))
                batch, size = [], 0
        await run_in_threadpool(parser.write, b"".join(batch))
        parser.finalize()
    except MultipartParseError:
        raise HTTPException(422, "the upload is not valid multipart/form-data") from None
    finally:
        receiver.close()
    return receiver.uploads
