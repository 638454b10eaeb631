"""One shard of a batch: read it, skip what earlier attempts finished, run the engine,
write result parts and the progress record. Safe to kill at any instant.

Exactly once: a request's only home is a result part of its shard. Parts are whole
objects (an atomic put), so a part that exists is finished; a run first reads every
existing part and skips those custom_ids, and numbers its own parts after the
highest one. Results still in memory when the process dies were never written, so
the next run does them again. The progress record is derived from the parts and
may lag them; it is never the source of truth.

The engine must already be started (`await engine.start()`): the long-lived worker
keeps one loaded engine across many shards, and runs many shards at once; their
requests share the engine's in-flight budget through one fair `Admission`.

Two ways to end early: `stop` (SIGTERM, shutdown) lets in-flight requests finish for
a grace period; `abort` (cancel or expiry of this batch) cancels them at once, which
aborts them inside the engine (vLLM aborts a request whose task is cancelled). Either
way what finished is flushed to parts; a request cut short is never written.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from vbatch.core import layout
from vbatch.core.ids import new_batch_request_id, new_request_id
from vbatch.core.layout import ShardProgress
from vbatch.core.schemas import LineError, ResponseEnvelope, ResultLine
from vbatch.core.storage.base import ObjectNotFound, ObjectStore, iter_lines
from vbatch.worker.admission import Admission
from vbatch.worker.engines.base import Engine
from vbatch.worker.shard_io import _storage, prefix_key

log = logging.getLogger("vbatch.worker.shard")

# A reorder window never holds more than this many bytes of input lines, whatever
# its line count (lines may be up to 1 MB each).
WINDOW_MAX_BYTES = 32 * 1024 * 1024


@dataclass(slots=True)
class _Request:
    custom_id: str
    body: Any
    problem: str | None  # why the body cannot go to the engine, if it cannot


class _ShardRun:
    def __init__(
        self, store: ObjectStore, engine: Engine, *, project: str, batch_id: str, shard: int,
        part_max_results: int, part_max_seconds: float, stop: asyncio.Event,
        stop_grace_seconds: float, window_lines: int, admission: Admission,
        abort: asyncio.Event, window_max_bytes: Callable[[], int],
    ) -> None:
        self.store = store
        self.engine = engine
        self.project, self.batch_id, self.shard = project, batch_id, shard
        self.part_max_results = max(1, part_max_results)
        self.part_max_seconds = part_max_seconds
        self.stop = stop
        self.stop_grace_seconds = stop_grace_seconds
        self.window_lines = window_lines
        self.window_max_bytes = window_max_bytes
        self.admission = admission
        self.abort = abort
        # Set before in-flight requests are cancelled: a cancelled vLLM request still
        # returns (an error reply, "Client disconnected"), which must not become a result.
        self.discarding = False
        self.progress = ShardProgress(shard=shard)
        self.done: set[str] = set()  # custom_ids with a result in a written part
        self.seen: set[str] = set()  # custom_ids of the shard read so far
        self.read_all = False  # the whole shard was read (and submitted)
        self.next_part = 0
        self.buffer: list[ResultLine] = []
        self.buffer_since = 0.0  # loop time of the oldest buffered result
        self.closing = False
        self.written_final = False  # the progress record on storage is the run's last state
        self.wake = asyncio.Event()
        self.started = time.monotonic()  # this attempt's worker time starts now
        self.earlier_seconds = 0.0

    # --- what earlier attempts left ------------------------------------------------

    def _account(self, line: ResultLine) -> None:
        self.done.add(line.custom_id)
        if line.succeeded:
            self.progress.completed += 1
            usage = line.response.body.get("usage") if line.response else None
            if isinstance(usage, dict):
                self._add_usage(usage)
        else:
            self.progress.failed += 1

    def _add_usage(self, usage: dict[str, Any]) -> None:
        prompt = usage.get("prompt_tokens") or 0
        completion = usage.get("completion_tokens") or 0
        if isinstance(prompt, int) and isinstance(completion, int):
            self.progress.usage.add(prompt, completion)
        details = usage.get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        if isinstance(cached, int):
            self.progress.usage.input_tokens_details.cached_tokens += cached

    def _load_parts(self) -> None:
        """Blocking: read every finished part of this shard (runs in a thread)."""
        prefix = layout.results_prefix(self.project, self.batch_id, self.shard)
        highest = -1
        for key in self.store.list(prefix):
            number = layout.part_number(key)
            if number is None:  # a store's temporary or a stray object: not a part
                continue
            highest = max(highest, number)
            self.progress.parts += 1
            for raw in iter_lines(self.store.get_stream(key)):
                if not raw.strip():
                    continue
                try:
                    line = ResultLine.model_validate_json(raw)
                except ValueError:
                    log.error("unreadable line in %s skipped", key)
                    continue
                # Two pods of one index may both have written a custom_id; the merge
                # keeps the first, so only the first counts here too.
                if line.custom_id not in self.done:
                    self._account(line)
        self.next_part = highest + 1

    def _count_lines(self) -> int:
        key = layout.shard_key(self.project, self.batch_id, self.shard)
        return sum(1 for raw in iter_lines(self.store.get_stream(key)) if raw.strip())

    # --- reading the shard in reordered windows -------------------------------------

    def _open_shard(self) -> Iterator[bytes]:
        key = layout.shard_key(self.project, self.batch_id, self.shard)
        return iter_lines(self.store.get_stream(key))

    def _read_window(self, lines: Iterator[bytes], seen: set[str]) -> list[_Request]:
        """Blocking: the next window of requests still to do, prefix-sorted."""
        window: list[_Request] = []
        max_bytes = max(1, self.window_max_bytes())
        size = 0
        for raw in lines:
            if not raw.strip():
                continue
            request = self._parse(raw)
            if request is None or request.custom_id in seen:
                continue
            seen.add(request.custom_id)
            if request.custom_id in self.done:
                continue
            window.append(request)
            size += len(raw)
            if len(window) >= self.window_lines or size >= max_bytes:
                break
        window.sort(key=lambda r: prefix_key(r.body))  # stable: file order within a group
        return window

    @staticmethod
    def _parse(raw: bytes) -> _Request | None:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            # orjson refuses some JSON the stdlib accepts (integers over 64 bits);
            # a line that passed validation must still get its result.
            try:
                data = json.loads(raw)
            except ValueError:
                data = None
        custom_id = data.get("custom_id") if isinstance(data, dict) else None
        if not isinstance(custom_id, str):
            # Shards are validated at create time; without a custom_id there is
            # nothing a result line could be joined on.
            log.error("shard line without a custom_id skipped")
            return None
        body = data.get("body")
        problem = None if isinstance(body, dict) else "the request body must be a JSON object"
        return _Request(custom_id, body, problem)

    # --- running requests -------------------------------------------------------------

    async def _run_one(self, request: _Request) -> None:
        try:
            line = await self._result_for(request)
            if not self.discarding:
                self._collect(line)
        finally:
            self.admission.release()

    async def _result_for(self, request: _Request) -> ResultLine:
        line_id = new_batch_request_id()
        if request.problem is not None:
            error = LineError(code="invalid_request", message=request.problem)
            return ResultLine(id=line_id, custom_id=request.custom_id, error=error)
        request_id = new_request_id()
        try:
            reply = await self.engine.chat_completion(request.body, request_id)
            # Non-200 replies keep their status and `{"error": ...}` body, as OpenAI does.
            response = ResponseEnvelope(
                status_code=reply.status_code, request_id=request_id, body=reply.body
            )
        except Exception as exc:  # one bad request (or reply) must never take the shard down
            log.exception("engine failed on custom_id %s", request.custom_id)
            error = LineError(code="engine_error", message=f"{type(exc).__name__}: {exc}")
            return ResultLine(id=line_id, custom_id=request.custom_id, error=error)
        return ResultLine(id=line_id, custom_id=request.custom_id, response=response)

    def _collect(self, line: ResultLine) -> None:
        if not self.buffer:
            self.buffer_since = asyncio.get_running_loop().time()
            self.wake.set()  # the flusher starts timing this part
        self.buffer.append(line)
        if len(self.buffer) >= self.part_max_results:
            self.wake.set()

    def _halted(self) -> bool:
        return self.stop.is_set() or self.abort.is_set()

    async def _acquire(self) -> bool:
        """Wait for an engine slot (fair across batches); False when stop or abort came first."""
        if self._halted():
            return False
        acquire = asyncio.ensure_future(self.admission.acquire(self.project, self.batch_id))
        stopped = asyncio.ensure_future(self.stop.wait())
        aborted = asyncio.ensure_future(self.abort.wait())
        await asyncio.wait({acquire, stopped, aborted}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        aborted.cancel()
        if not acquire.done():
            acquire.cancel()
        try:
            await acquire
        except asyncio.CancelledError:
            return False
        if self._halted():
            self.admission.release()
            return False
        return True

    # --- writing parts and progress -------------------------------------------------

    async def _flusher(self) -> None:
        """The only writer of parts and progress, so numbering needs no lock."""
        loop = asyncio.get_running_loop()
        while True:
            timeout = None
            if self.buffer:
                timeout = max(0.0, self.buffer_since + self.part_max_seconds - loop.time())
            try:
                await asyncio.wait_for(self.wake.wait(), timeout)
            except TimeoutError:
                pass
            self.wake.clear()
            while len(self.buffer) >= self.part_max_results:
                await self._write_part(self.part_max_results)
            overdue = self.buffer and loop.time() - self.buffer_since >= self.part_max_seconds
            if self.buffer and (overdue or self.closing):
                await self._write_part(len(self.buffer))
            if self.closing and not self.buffer:
                return

    async def _write_part(self, count: int) -> None:
        lines = self.buffer[:count]
        del self.buffer[:count]
        if self.buffer:
            self.buffer_since = asyncio.get_running_loop().time()
        data = b"".join(line.model_dump_json().encode() + b"\n" for line in lines)
        key = layout.part_key(self.project, self.batch_id, self.shard, self.next_part)
        # Another pod of the same index may have written this number meanwhile;
        # never overwrite a finished part (that would lose its results).
        while await _storage(self.store.exists, key):
            self.next_part += 1
            key = layout.part_key(self.project, self.batch_id, self.shard, self.next_part)
        await _storage(self.store.put_bytes, key, data)
        self.next_part += 1
        self.progress.parts += 1
        if self.progress.first_result_at is None:
            self.progress.first_result_at = time.time()
        for line in lines:
            if line.custom_id not in self.done:
                self._account(line)
        if self.closing and not self.buffer:
            # The last part: its progress record can already say whether the shard is
            # done, which saves the run a second durable write of the same record.
            self.progress.finished = self._finished()
        await self._write_progress()

    def _load_figures(self) -> None:
        """Blocking: carry the metrics figures of earlier attempts (first result time,
        worker seconds) over from the progress record they left."""
        try:
            earlier = ShardProgress.model_validate_json(
                self.store.get_bytes(layout.progress_key(self.project, self.batch_id, self.shard)))
        except (ObjectNotFound, ValueError):
            return
        self.earlier_seconds = earlier.gpu_seconds
        self.progress.first_result_at = earlier.first_result_at

    async def _write_progress(self) -> None:
        self.progress.updated_at = time.time()
        self.progress.gpu_seconds = self.earlier_seconds + (time.monotonic() - self.started)
        key = layout.progress_key(self.project, self.batch_id, self.shard)
        final = self.closing and not self.buffer  # nothing can change the record after this one
        await _storage(self.store.put_bytes, key, self.progress.model_dump_json().encode())
        self.written_final = final

    # --- the whole run ---------------------------------------------------------------

    async def run(self) -> ShardProgress:
        # Counted first, so the progress record shows the shard's size from the start.
        self.progress.total = await _storage(self._count_lines)
        await _storage(self._load_figures)
        await _storage(self._load_parts)
        if self.done:
            log.info("shard %s: resuming, %d of %d done", self.shard, len(self.done), self.progress.total)
        await self._write_progress()

        flusher = asyncio.create_task(self._flusher(), name=f"shard-{self.shard}-flusher")
        tasks: set[asyncio.Task[None]] = set()
        try:
            await self._submit_all(tasks, flusher)
            await self._drain(tasks)
        finally:
            self.discarding = True
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            self.closing = True
            self.wake.set()
            await flusher  # flushes what is done; re-raises a storage failure
        finished = self._finished()
        if not (self.written_final and self.progress.finished == finished):
            self.progress.finished = finished
            await self._write_progress()
        return self.progress

    def _finished(self) -> bool:
        return self.read_all and self.seen <= self.done

    async def _drain(self, tasks: set[asyncio.Task[None]]) -> None:
        """Wait for in-flight requests; once stop is set, only for the grace period;
        once abort is set, not at all. Those still running then are abandoned: never
        written, so a later run redoes them (or the merge marks them cancelled)."""
        loop = asyncio.get_running_loop()
        stopped = asyncio.ensure_future(self.stop.wait())
        aborted = asyncio.ensure_future(self.abort.wait())
        try:
            while tasks and not self._halted():
                await asyncio.wait(tasks | {stopped, aborted}, return_when=asyncio.FIRST_COMPLETED)
            deadline = loop.time() + self.stop_grace_seconds
            while tasks and not self.abort.is_set() and loop.time() < deadline:
                await asyncio.wait(tasks | {aborted}, timeout=deadline - loop.time(),
                                   return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            aborted.cancel()

    async def _submit_all(self, tasks: set[asyncio.Task[None]], flusher: asyncio.Task[None]) -> None:
        """Submit every remaining request, or until stop is set."""
        lines = await _storage(self._open_shard)
        while True:
            window = await asyncio.to_thread(self._read_window, lines, self.seen)
            if not window:
                self.read_all = True
                return
            for request in window:
                if flusher.done():
                    flusher.result()  # a failed flush is fatal: raise it here
                if not await self._acquire():
                    return
                task = asyncio.create_task(self._run_one(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)


async def run_shard(
    store: ObjectStore,
    engine: Engine,
    *,
    project: str,
    batch_id: str,
    shard: int,
    part_max_results: int = 64,
    part_max_seconds: float = 2.0,
    stop: asyncio.Event | None = None,
    stop_grace_seconds: float = 10.0,
    window_lines: int | None = None,
    admission: Admission | None = None,
    abort: asyncio.Event | None = None,
    window_max_bytes: int | Callable[[], int] = WINDOW_MAX_BYTES,
) -> ShardProgress:
    """Run one shard to the end (or until `stop` is set) and return its progress.

    `finished` is True only when every request of the shard has a result in a part.
    Storage failing past its retries raises `StorageError` (results not yet in a part
    are lost and redone by the next run); a missing shard raises `ObjectNotFound`.
    `window_lines` bounds the prefix-reordering window (default 4 x max_in_flight,
    at least 1024 lines). `admission` is shared by every shard on the same engine
    (default: one of this run's own, sized to the engine's in-flight budget); `abort`
    ends the run at once, cancelling its in-flight requests inside the engine.
    `window_max_bytes` may be a callable, read at every window (a shared budget).
    """
    if window_lines is None:
        window_lines = max(4 * engine.max_in_flight, 1024)
    run = _ShardRun(
        store, engine, project=project, batch_id=batch_id, shard=shard,
        part_max_results=part_max_results, part_max_seconds=part_max_seconds,
        stop=stop if stop is not None else asyncio.Event(),
        stop_grace_seconds=stop_grace_seconds, window_lines=max(1, window_lines),
        admission=admission if admission is not None else Admission(engine.max_in_flight),
        abort=abort if abort is not None else asyncio.Event(),
        window_max_bytes=window_max_bytes if callable(window_max_bytes) else (lambda: window_max_bytes),
    )
    return await run.run()
