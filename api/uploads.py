"""POST /v1/files: a multipart upload streamed into the file service, constant memory.

FastAPI's `UploadFile` would spool the whole upload (to memory, then to a temp
file) before the handler runs. Instead, the request body is pushed through
python-multipart's incremental parser as it arrives, and the bytes of the `file`
part go through a small bounded pipe into `FileService.create`, which runs in a
worker thread and streams them to object storage. At most `PIPE_SLOTS` network
chunks (~64 KiB each with uvicorn) are in flight, whatever the file size.

Clients order the fields differently (curl sends them as given on its command
line, `-F purpose=batch -F file=@x` puts purpose first; other clients send the
file first), so `purpose` is checked wherever it arrives: before the file, a bad
purpose stops anything from being stored; after it, the stored file is deleted.
"""

from __future__ import annotations

import asyncio
import logging
import queue
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import Request
from vbatch.api import metrics
from vbatch.api.services import Services
from vbatch.core.errors import InvalidRequest, PayloadTooLarge, VBatchError, clip
from vbatch.core.expiry import parse_expires_after
from vbatch.core.schemas import FileObject, FilePurpose

log = logging.getLogger("vbatch.api.uploads")

PIPE_SLOTS = 16
# Room for the multipart framing and the small fields around the file bytes.
MULTIPART_SLACK = 1024 * 1024
# Non-file fields (purpose, expires_after[...]) are tiny; cap what we buffer of them.
MAX_FIELD_BYTES = 4096
ACCEPTED_PURPOSES = (FilePurpose.BATCH.value,)

UPLOAD_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "The JSONL input file."},
                        "purpose": {"type": "string", "enum": list(ACCEPTED_PURPOSES)},
                        "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                        "expires_after[seconds]": {"type": "integer", "minimum": 1, "maximum": 2592000},
                    },
                }
            }
        },
    }
}

_EOF = object()
_ABORT = object()


class UploadAborted(Exception):
    """The request ended before the file part did (client gone, bad multipart)."""


class _Pipe:
    """Bounded hand-off of byte chunks from the event loop to one consumer thread.

    The producer awaits a credit before each chunk (never blocking the loop);
    the consumer returns the credit when it takes the chunk. Once the consumer is
    done (finished or failed, e.g. over the size limit) `closed` is set and the
    producer stops sending.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._credits = asyncio.Semaphore(PIPE_SLOTS)
        self.closed = False

    async def put(self, chunk: bytes) -> None:
        await self._credits.acquire()
        if not self.closed:
            self._items.put(chunk)

    def finish(self) -> None:
        self._items.put(_EOF)

    def abort(self) -> None:
        self._items.put(_ABORT)

    def chunks(self) -> Iterator[bytes]:  # consumer thread
        while True:
            item = self._items.get()
            if item is _EOF:
                return
            if item is _ABORT:
                raise UploadAborted("upload interrupted")
            self._loop.call_soon_threadsafe(self._credits.release)
            assert isinstance(item, bytes)
            yield item

    def consumer_done(self) -> None:  # consumer thread, always called once
        self._loop.call_soon_threadsafe(self._mark_closed)

    def _mark_closed(self) -> None:
        self.closed = True
        self._credits.release()  # wake a producer waiting for a credit


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    header_name: bytes = b""
    header_value: bytes = b""
    disposition: bytes = b""


@dataclass
class _Events:
    """Parser callbacks only record what happened; the async loop acts on it."""

    items: list[tuple[str, Any]] = field(default_factory=list)
    part: _Part = field(default_factory=_Part)

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def on_part_begin(self) -> None:
        self.part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.part.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.part.header_value += data[start:end]

    def on_header_end(self) -> None:
        if self.part.header_name.strip().lower() == b"content-disposition":
            self.part.disposition = self.part.header_value
        self.part.header_name = self.part.header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.part.disposition)
        self.part.name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in options:
            self.part.filename = options[b"filename"].decode("utf-8", "replace")
        self.items.append(("start", self.part))

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.items.append(("data", data[start:end]))

    def on_part_end(self) -> None:
        self.items.append(("end", self.part))


def _invalid_purpose(purpose: str) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid purpose {clip(purpose)!r}: files uploaded here must have purpose 'batch'.",
        code="invalid_purpose",
        param="purpose",
    )


def _boundary(request: Request) -> bytes:
    ctype, options = parse_options_header(request.headers.get("content-type"))
    if ctype != b"multipart/form-data" or not options.get(b"boundary"):
        raise InvalidRequest(
            "Uploads must be sent as multipart/form-data with a 'file' and a 'purpose' field.",
            code="invalid_content_type",
        )
    return options[b"boundary"]


class _Upload:
    """One upload in flight: parses the body, feeds the file part, collects errors."""

    def __init__(self, request: Request, project: str, services: Services, executor: Executor | None = None) -> None:
        self.request = request
        # The uploads' own threads (vbatch.api.limits.UploadCapacity); None: asyncio's default.
        self.executor = executor
        self.project = project
        self.services = services
        self.max_bytes = services.settings.limits.max_file_bytes
        self.loop = asyncio.get_running_loop()
        self.events = _Events()
        self.purpose: str | None = None
        self.field: tuple[str, bytearray] | None = None  # the non-file part being read
        self.in_file = False
        self.file_seen = False
        self.pipe: _Pipe | None = None
        self.job: asyncio.Future[FileObject] | None = None
        # The first client error; the rest of the body is then read and dropped so
        # the client, still sending, gets to read the answer.
        self.error: VBatchError | None = None
        # expires_after[anchor] / expires_after[seconds], as sent (see _expiry_seconds).
        self.expiry: dict[str, str] = {}
        self.expiry_at_start: int | None = None  # what the file was stored with

    def _expiry_seconds(self) -> int | None:
        """OpenAI's expires_after form fields -> seconds (400 when invalid)."""
        if not self.expiry:
            return None
        return parse_expires_after(
            dict(self.expiry), param="expires_after", min_seconds=self.services.settings.file_expiry_min_seconds
        )

    def _start_file(self, filename: str | None) -> None:
        pipe = _Pipe(self.loop)
        files, project, max_bytes = self.services.files, self.project, self.max_bytes
        # Both fields before the file: stored with them; otherwise set once all arrived.
        expires = self.expiry_at_start = self._expiry_seconds() if len(self.expiry) >= 2 else None

        def store() -> FileObject:
            try:
                # Only 'batch' is accepted; a purpose arriving later that is not
                # 'batch' deletes this file again.
                return files.create(
                    project, pipe.chunks(), filename=filename, purpose=FilePurpose.BATCH, max_bytes=max_bytes,
                    expires_after_seconds=expires,
                )
            finally:
                pipe.consumer_done()

        self.pipe = pipe
        self.job = asyncio.ensure_future(self.loop.run_in_executor(self.executor, store))

    async def _handle(self, kind: str, value: Any) -> None:
        if kind == "start":
            part: _Part = value
            if part.name == "file":
                if self.file_seen:
                    raise InvalidRequest("Send exactly one 'file' part.", code="multiple_files", param="file")
                if self.purpose is not None and self.purpose not in ACCEPTED_PURPOSES:
                    raise _invalid_purpose(self.purpose)
                self.file_seen = self.in_file = True
                self._start_file(part.filename)
            else:
                self.field = (part.name, bytearray())
        elif kind == "data":
            if self.in_file:
                assert self.pipe is not None
                if not self.pipe.closed:
                    metrics.UPLOAD_BYTES.inc(len(value))
                    await self.pipe.put(value)
            elif self.field is not None:
                name, buf = self.field
                buf.extend(value[: MAX_FIELD_BYTES + 1 - len(buf)])
                if len(buf) > MAX_FIELD_BYTES:
                    raise InvalidRequest(f"Field {clip(name)!r} is too long.", code="field_too_large", param=clip(name))
        elif kind == "end":
            if self.in_file:
                assert self.pipe is not None
                self.in_file = False
                self.pipe.finish()
            elif self.field is not None:
                name, buf = self.field
                self.field = None
                if name == "purpose":
                    self.purpose = buf.decode("utf-8", "replace").strip()
                    if not self.file_seen and self.purpose not in ACCEPTED_PURPOSES:
                        raise _invalid_purpose(self.purpose)
                elif name.startswith("expires_after[") and name.endswith("]"):
                    self.expiry[name[len("expires_after[") : -1]] = buf.decode("utf-8", "replace").strip()
                    if not self.file_seen and len(self.expiry) >= 2:
                        self._expiry_seconds()  # refuse a bad value before storing anything
                # Other fields are accepted and ignored.

    async def _read_body(self, parser: MultipartParser) -> None:
        received = 0
        async for chunk in self.request.stream():
            received += len(chunk)
            if received > self.max_bytes + MULTIPART_SLACK:
                # Over any legal size and still sending: stop reading (the
                # connection closes after the answer) rather than drain forever.
                self.error = self.error or PayloadTooLarge(
                    f"File is larger than the limit of {self.max_bytes} bytes.", param="file"
                )
                return
            if self.error is not None:
                continue  # draining
            unparsable = False
            try:
                parser.write(chunk)
            except FormParserError:
                unparsable = True
            try:
                # What the parser saw before a syntax error comes first, so the answer
                # does not depend on where the network cut the body (found by fuzzing).
                for kind, value in self.events.items:
                    await self._handle(kind, value)
            except VBatchError as exc:
                self.error = exc
            finally:
                self.events.items.clear()
            if unparsable and self.error is None:
                self.error = InvalidRequest("The multipart body could not be parsed.", code="invalid_multipart")
        if self.error is None:
            try:
                parser.finalize()
            except FormParserError:
                self.error = InvalidRequest("The multipart body could not be parsed.", code="invalid_multipart")
            else:
                if parser.state != MultipartState.END:  # python-multipart's finalize does not check
                    self.error = InvalidRequest("The multipart body ended before its closing boundary.",
                                                code="invalid_multipart")

    async def run(self) -> FileObject:
        length = self.request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.max_bytes + MULTIPART_SLACK:
            raise PayloadTooLarge(f"File is larger than the limit of {self.max_bytes} bytes.", param="file")
        parser = MultipartParser(_boundary(self.request), self.events.callbacks())
        try:
            await self._read_body(parser)
        except BaseException:
            # Client gone or we are cancelled: make the storage thread drop what it has.
            await self._abandon()
            raise

        if self.in_file or self.error is not None:
            await self._abandon()  # incomplete file part, or an error mid-way
            raise self.error or InvalidRequest(
                "The multipart body ended inside the file part.", code="invalid_multipart"
            )
        if not self.file_seen:
            raise InvalidRequest("Missing required parameter: 'file'.", code="missing_required_parameter", param="file")
        assert self.job is not None
        stored = await self.job  # PayloadTooLarge / StorageError propagate as they are
        if self.purpose is None or self.purpose not in ACCEPTED_PURPOSES:
            await self.loop.run_in_executor(self.executor, self.services.files.discard, self.project, stored.id)
            if self.purpose is None:
                raise InvalidRequest(
                    "Missing required parameter: 'purpose'.", code="missing_required_parameter", param="purpose"
                )
            raise _invalid_purpose(self.purpose)
        try:
            expires = self._expiry_seconds()
        except VBatchError:
            # Refused: leave nothing (no deleted-file record, no expiry entry).
            await self.loop.run_in_executor(self.executor, self.services.files.discard, self.project, stored.id)
            raise
        if expires is not None and expires != self.expiry_at_start:  # the fields came after the file
            stored = await self.loop.run_in_executor(
                self.executor, self.services.files.set_expiry, self.project, stored.id, expires)
        metrics.FILES_UPLOADED.inc()
        return stored

    async def _abandon(self) -> None:
        """Leave nothing stored: stop the storage thread, delete what it finished."""
        if self.job is None:
            return
        if self.in_file:
            assert self.pipe is not None
            self.pipe.abort()  # the thread may be waiting for the next chunk
        try:
            stored = await self.job
        except (UploadAborted, VBatchError):
            return  # nothing was left behind (put_stream cleans up on errors)
        except Exception:
            log.exception("storing an abandoned upload failed")
            return
        # The file part had completed before the request went wrong.
        await self.loop.run_in_executor(self.executor, self.services.files.discard, self.project, stored.id)


async def receive_upload(request: Request, project: str, services: Services) -> FileObject:
    """Store one upload, if this project and the gateway have an upload slot free
    (429 / 503 with Retry-After otherwise: refused at once, never queued)."""
    capacity = getattr(request.app.state, "upload_capacity", None)
    if capacity is None:
        return await _Upload(request, project, services).run()
    with capacity.slot(project):
        return await _Upload(request, project, services, capacity.executor).run()
