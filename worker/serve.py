"""`vbatch worker --serve-stdin`: one loaded engine, many shards of many batches at once.

The single-node worker pool (vbatch.operator.worker_pool) keeps one such process per
slot. Every shard it was handed runs concurrently; their requests reach the engine
together through one fair `Admission` (up to the engine's in-flight budget), so the
engine's scheduler batches across batches.

Protocol, one JSON object per line:
  stdin  {"project", "batch_id", "shard"}     run this shard (tasks arrive while others run)
         {"op": "abort", "batch_id"}          abort that batch's shards: in-flight requests
                                              are cancelled inside the engine, finished
                                              results flushed; the engine stays loaded
  stdout {"event": "engine_loaded", "engine", "model", "seconds"}   once, after loading
         {"project", "batch_id", "shard", "finished", "completed", "failed", "aborted"}
                                              one per task when it ends (+ "error")
At EOF the process finishes the shards it holds, then exits 0; SIGTERM/SIGINT stop
them after flushing (each still gets its reply), then it exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import orjson
from vbatch.core.errors import StorageError
from vbatch.core.storage import ObjectNotFound
from vbatch.worker.admission import Admission

log = logging.getLogger("vbatch.worker")

# Shards held at once each read a reorder window of their input. They share this
# many bytes (vbatch.worker.admission.WindowShare): up to 8 MiB each when few are
# held, down to 1 MiB each when hundreds are (then the sum may reach held x 1 MiB).
SERVE_WINDOWS_TOTAL_BYTES = 256 * 1024 * 1024
SERVE_WINDOW_BYTES_RANGE = (1024 * 1024, 8 * 1024 * 1024)

RunShard = Callable[..., Awaitable[dict[str, Any]]]


@dataclass
class _Held:
    project: str
    batch_id: str
    shard: int
    abort: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


def stdin_lines(loop: asyncio.AbstractEventLoop) -> asyncio.Queue[str | None]:
    """stdin lines fed from a daemon thread: a thread blocked in readline must never
    keep the process alive once a signal asked it to exit."""
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def pump() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(queue.put_nowait, line)
        loop.call_soon_threadsafe(queue.put_nowait, None)

    threading.Thread(target=pump, name="stdin", daemon=True).start()
    return queue


def parse_message(line: str) -> dict[str, Any]:
    """A task or an abort, validated; ValueError names what is wrong."""
    message = orjson.loads(line)
    if not isinstance(message, dict):
        raise ValueError("a task must be a JSON object")
    op = message.get("op", "run")
    batch_id = message.get("batch_id")
    if op == "abort":
        if not isinstance(batch_id, str):
            raise ValueError("an abort needs a string 'batch_id'")
        return {"op": "abort", "batch_id": batch_id}
    if op != "run":
        raise ValueError(f"unknown op {op!r} (expected 'run' or 'abort')")
    project, shard = message.get("project"), message.get("shard")
    if not isinstance(project, str) or not isinstance(batch_id, str):
        raise ValueError("a task needs string 'project' and 'batch_id'")
    if not isinstance(shard, int) or isinstance(shard, bool) or shard < 0:
        raise ValueError("a task needs a non-negative integer 'shard'")
    return {"op": "run", "project": project, "batch_id": batch_id, "shard": shard}


def describe(exc: BaseException) -> str:
    if isinstance(exc, ObjectNotFound):
        return f"object not found in storage: {exc.args[0] if exc.args else exc}"
    return str(exc) or type(exc).__name__


class ShardServer:
    """Holds the running shards of one worker process and answers for each."""

    def __init__(self, run_shard: RunShard, admission: Admission, stop: asyncio.Event, out: TextIO) -> None:
        self.run_shard = run_shard
        self.admission = admission
        self.stop = stop
        self.out = out
        self.held: dict[tuple[str, int], _Held] = {}

    def reply(self, data: dict[str, Any]) -> None:
        self.out.write(orjson.dumps(data).decode() + "\n")
        self.out.flush()

    def handle(self, line: str) -> None:
        try:
            message = parse_message(line)
        except ValueError as exc:
            self.reply({"error": f"bad task: {exc}", "finished": False})
            return
        if message["op"] == "abort":
            aborted = [h for h in self.held.values() if h.batch_id == message["batch_id"]]
            for held in aborted:
                held.abort.set()
            log.info("batch %s: aborting %d shard(s); the engine stays loaded", message["batch_id"], len(aborted))
            return
        key = (message["batch_id"], message["shard"])
        if key in self.held:
            log.warning("shard %s of %s is already running here; duplicate task ignored", key[1], key[0])
            return
        held = _Held(message["project"], message["batch_id"], message["shard"])
        held.task = asyncio.create_task(self._run(held), name=f"shard-{held.batch_id}-{held.shard}")
        self.held[key] = held

    async def _run(self, held: _Held) -> None:
        base = {"project": held.project, "batch_id": held.batch_id, "shard": held.shard}
        try:
            result = await self.run_shard(held.project, held.batch_id, held.shard,
                                          admission=self.admission, abort=held.abort, stop=self.stop)
            reply = base | result | {"aborted": held.abort.is_set()}
        except (StorageError, ObjectNotFound) as exc:
            # The pool sees finished=false and decides; the loaded engine stays
            # useful for the other shards.
            log.error("shard %s of %s: %s", held.shard, held.batch_id, describe(exc))
            reply = base | {"finished": False, "completed": 0, "failed": 0,
                            "aborted": held.abort.is_set(), "error": describe(exc)}
        except Exception as exc:  # one shard's bug must not take the others down
            log.exception("shard %s of %s failed", held.shard, held.batch_id)
            reply = base | {"finished": False, "completed": 0, "failed": 0,
                            "aborted": held.abort.is_set(), "error": f"{type(exc).__name__}: {exc}"}
        finally:
            self.held.pop((held.batch_id, held.shard), None)
        self.reply(reply)

    async def serve(self, lines: asyncio.Queue[str | None]) -> None:
        stopped = asyncio.ensure_future(self.stop.wait())
        try:
            while not self.stop.is_set():
                next_line = asyncio.ensure_future(lines.get())
                await asyncio.wait({next_line, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if not next_line.done():
                    next_line.cancel()
                    break
                line = next_line.result()
                if line is None:
                    break  # EOF: no more work; finish what is held
                if line.strip():
                    self.handle(line)
        finally:
            stopped.cancel()
        running = [h.task for h in self.held.values() if h.task is not None]
        if running:
            await asyncio.gather(*running, return_exceptions=True)


def loaded_event(engine_name: str, model: str | None, started: float) -> dict[str, Any]:
    return {"event": "engine_loaded", "engine": engine_name, "model": model,
            "seconds": round(time.monotonic() - started, 3)}
