"""Request-body streaming helpers for uploads: async body -> sync chunk iterator, multipart.

Why: ``ObjectStore.put_stream`` is a blocking call that consumes an iterator (boto3 and file
writes are synchronous), while Starlette delivers the body asynchronously. Running the store in
a worker thread that pulls each chunk from the event loop (``anyio.from_thread``) streams an
upload of any size with one chunk in memory, and the size limit and the sha256 are applied as
the bytes pass, so an oversized upload is refused without being stored first.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable, Iterator

import anyio.from_thread
from python_multipart.multipart import MultipartParser, parse_options_header


class UploadTooLarge(Exception):
    """The body passed the configured limit; the route answers 413."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"upload exceeds the limit of {limit} bytes")


class BadMultipart(Exception):
    """A multipart body without a file part (or malformed): the route answers 400."""


def pull_from_loop(body: AsyncIterator[bytes]) -> Iterator[bytes]:
    """A blocking iterator over an async body; only valid inside an anyio worker thread."""

    async def next_chunk() -> bytes | None:
        try:
            return await body.__anext__()
        except StopAsyncIteration:
            return None

    while True:
        chunk = anyio.from_thread.run(next_chunk)
        if chunk is None:
            return
        if chunk:
            yield chunk


class Meter:
    """Counts and hashes bytes as they pass; raises :class:`UploadTooLarge` over ``limit``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._digest = hashlib.sha256()

    def wrap(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.size += len(chunk)
            if self.size > self.limit:
                raise UploadTooLarge(self.limit)
            self._digest.update(chunk)
            yield chunk

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()


class MultipartFile:
    """Extracts the first file part of a ``multipart/form-data`` stream, plus small fields.

    Text fields (e.g. ``kind``) that precede the file are collected in ``fields`` (each capped
    at 1 KiB); the file's ``filename`` comes from its Content-Disposition.
    """

    FIELD_CAP = 1024

    def __init__(self, content_type: str) -> None:
        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary:
            raise BadMultipart("multipart body without a boundary")
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self._out: list[bytes] = []
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._part_name: str | None = None
        self._is_file = False
        self._file_done = False
        self._seen_file = False
        self._field_buf = bytearray()
        self._parser = MultipartParser(boundary, self._callbacks())  # type: ignore[arg-type]

    def _callbacks(self) -> dict[str, Callable[..., None]]:
        def on_part_begin() -> None:
            self._headers, self._is_file, self._field_buf = {}, False, bytearray()

        def on_header_field(data: bytes, start: int, end: int) -> None:
            self._header_name += data[start:end]

        def on_header_value(data: bytes, start: int, end: int) -> None:
            self._header_value += data[start:end]

        def on_header_end() -> None:
            self._headers[self._header_name.lower()] = self._header_value
            self._header_name, self._header_value = b"", b""

        def on_headers_finished() -> None:
            _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
            self._part_name = params.get(b"name", b"").decode("utf-8", "replace")
            filename = params.get(b"filename")
            self._is_file = filename is not None and not self._seen_file
            if self._is_file:
                self._seen_file = True
                self.filename = filename.decode("utf-8", "replace") if filename else None

        def on_part_data(data: bytes, start: int, end: int) -> None:
            if self._is_file:
                self._out.append(bytes(data[start:end]))
            elif len(self._field_buf) < self.FIELD_CAP:
                self._field_buf += data[start:end][: self.FIELD_CAP - len(self._field_buf)]

        def on_part_end() -> None:
            if self._is_file:
                self._file_done = True
            elif self._part_name:
                self.fields[self._part_name] = self._field_buf.decode("utf-8", "replace")

        return {name: fn for name, fn in locals().items() if name.startswith("on_")}

    def file_chunks(self, body: Iterator[bytes]) -> Iterator[bytes]:
        """The file part's bytes, as the body streams through the parser."""
        for chunk in body:
            self._parser.write(chunk)
            out, self._out = self._out, []
            yield from out
        self._parser.finalize()
        yield from self._out
        self._out = []
        if not self._seen_file:
            raise BadMultipart("multipart body has no file part")
