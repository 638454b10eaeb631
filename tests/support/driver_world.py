"""A world for the driver's scenario tests: the real driver, the real SQLite store and
local object store, and a FAKE shard runtime whose "workers" answer shards on demand.

The fake runtime keeps what a cluster keeps (which shards failed past their budget,
whether stopping is done) and reads finished shards back from their progress records,
so a fresh driver (a restart) can carry on with it. A `Crash` (a BaseException, which
no driver catches) stands for the process dying.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import orjson
from vbatch.core import lifecycle, state
from vbatch.core.config import Settings
from vbatch.core.driver import Driver
from vbatch.core.events import BatchEvents
from vbatch.core.files import FileService
from vbatch.core.layout import ShardProgress, input_key, part_key, progress_key, shard_key
from vbatch.core.runtime import ShardsSeen
from vbatch.core.schemas import BatchRecord, BatchStatus, FilePurpose
from vbatch.core.sqlite_store import SqliteBatchStore
from vbatch.core.storage.local import LocalObjectStore

P = "proj"
TERMINAL = {BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.CANCELLED, BatchStatus.EXPIRED}


class Crash(BaseException):
    """The process died here."""


class Clock:
    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeRuntime:
    """Shards "run" only when the test says so (`answer`), so every state is reachable."""

    def __init__(self, store: LocalObjectStore) -> None:
        self.store = store
        self.failed: dict[str, set[int]] = {}
        self.started: dict[str, set[int]] = {}
        self.stopping: set[str] = set()
        self.stop_rounds = 0  # rounds a stop takes before no worker runs
        self.released: list[str] = []
        self.raise_in: dict[str, BaseException] = {}  # method name -> what it raises
        self.auto_answer = False

    def _maybe_raise(self, method: str) -> None:
        if method in self.raise_in:
            raise self.raise_in[method]

    def run(self, record: BatchRecord) -> None:
        self._maybe_raise("run")
        assert record.id not in self.stopping, "run() after stop()"
        self.started.setdefault(record.id, set()).update(range(record.shard_count or 0))
        if self.auto_answer:
            self.answer(record)

    def observe(self, record: BatchRecord) -> ShardsSeen:
        self._maybe_raise("observe")
        done = frozenset(i for i in range(record.shard_count or 0) if self._progress(record, i))
        return ShardsSeen(succeeded=done, failed=frozenset(self.failed.get(record.id, set())))

    def stop(self, record: BatchRecord) -> bool:
        self._maybe_raise("stop")
        self.stopping.add(record.id)
        if self.stop_rounds > 0:
            self.stop_rounds -= 1
            return False
        return True

    def release(self, record: BatchRecord) -> bool:
        self._maybe_raise("release")
        self.released.append(record.id)
        return True

    # --- the "workers" -----------------------------------------------------------------

    def _progress(self, record: BatchRecord, shard: int) -> bool:
        try:
            return ShardProgress.model_validate_json(self.store.get_bytes(progress_key(P, record.id, shard))).finished
        except KeyError:
            return False

    def shard_ids(self, record: BatchRecord, shard: int) -> list[str]:
        data = self.store.get_bytes(shard_key(P, record.id, shard))
        return [orjson.loads(line)["custom_id"] for line in data.splitlines() if line.strip()]

    def answer(self, record: BatchRecord, shards: Iterable[int] | None = None, *, limit: int | None = None,
               finished: bool = True) -> list[str]:
        """Answer the requests of these shards (the first `limit` of each) as a worker would."""
        answered = []
        for shard in shards if shards is not None else range(record.shard_count or 0):
            ids = self.shard_ids(record, shard)[:limit]
            lines = [orjson.dumps(_ok(c)) + b"\n" for c in ids]
            self.store.put_bytes(part_key(P, record.id, shard, 0), b"".join(lines))
            progress = ShardProgress(shard=shard, total=len(ids), completed=len(ids), parts=1,
                                     finished=finished and limit is None)
            self.store.put_bytes(progress_key(P, record.id, shard), progress.model_dump_json().encode())
            answered += ids
        return answered


def _ok(custom_id: str) -> dict:
    body = {"choices": [{"message": {"content": custom_id}}], "usage": {"prompt_tokens": 2, "completion_tokens": 1}}
    return {"id": f"batch_req_{custom_id}", "custom_id": custom_id, "error": None,
            "response": {"status_code": 200, "request_id": "req", "body": body}}


class Writes:
    """Counts every write (store saves, object puts and deletes); `crash_at` makes
    write number N (0-based) crash before it happens, or right after it ("after")."""

    def __init__(self) -> None:
        self.count = 0
        self.crash_at: int | None = None
        self.mode = "before"

    def write(self, do):
        n, self.count = self.count, self.count + 1
        if n == self.crash_at and self.mode == "before":
            raise Crash(f"crash before write {n}")
        result = do()
        if n == self.crash_at and self.mode == "after":
            raise Crash(f"crash after write {n}")
        return result


class CountingStore:
    """The object store the driver writes through (workers write to the raw one)."""

    def __init__(self, inner: LocalObjectStore, writes: Writes) -> None:
        self._inner, self._writes = inner, writes

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if name in ("put_stream", "put_bytes", "delete", "delete_prefix"):
            return lambda *a, **k: self._writes.write(lambda: attr(*a, **k))
        return attr


class CountingBatches:
    def __init__(self, inner: SqliteBatchStore, writes: Writes) -> None:
        self._inner, self._writes = inner, writes
        self.terminal_saves: list[tuple[str, BatchStatus]] = []
        self.saves = 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def save(self, record: BatchRecord) -> None:
        before = self._inner.get(record.project, record.id)

        def save() -> None:
            self._inner.save(record)
            self.saves += 1
            if record.status in TERMINAL and before is not None and before.status not in TERMINAL:
                self.terminal_saves.append((record.id, record.status))

        self._writes.write(save)


class World:
    def __init__(self, tmp: Path, **overrides) -> None:
        options = {"shard_target_requests": 4, "step_retry_base_seconds": 1.0, "step_retry_max_seconds": 60.0,
                   "step_max_attempts": 5, "step_max_seconds": 3600.0}
        self.settings = Settings(data_dir=tmp, **(options | overrides))
        self.raw = LocalObjectStore(tmp / "storage")
        self.writes = Writes()
        self.store = CountingStore(self.raw, self.writes)
        self.files = FileService(self.store)
        self.user_files = FileService(self.raw)  # what the gateway does (uploads, deletes)
        # In memory: the same SQL, without a disk sync per write (the store object outlives a "restart").
        self.batches = CountingBatches(SqliteBatchStore(Path(":memory:")), self.writes)
        self.clock = Clock()
        self.runtime = FakeRuntime(self.raw)
        self.saved: list[tuple[BatchRecord | None, BatchRecord]] = []
        self.driver = self.new_driver()

    def new_driver(self, runtime: FakeRuntime | None = None) -> Driver:
        """A fresh driver (as after a restart); `runtime` a fresh one too if given."""
        self.runtime = runtime or self.runtime
        events = BatchEvents()
        events.subscribe(lambda before, after: self.saved.append((before, after)))
        self.driver = Driver(settings=self.settings, store=self.store, files=self.files, batches=self.batches,
                             runtime=self.runtime, served_models=None, events=events, clock=self.clock,
                             jitter=lambda: 1.0)
        return self.driver

    # --- batches ---------------------------------------------------------------------

    def upload(self, n: int) -> str:
        lines = b"".join(orjson.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                       "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}) + b"\n"
                         for i in range(n))
        return self.user_files.create(P, iter([lines]), filename="in.jsonl", purpose=FilePurpose.BATCH).id

    def submit(self, n: int, *, validated: bool = True, window: int = 3600) -> BatchRecord:
        file_id = self.upload(n)
        now = int(self.clock())
        common = dict(project=P, input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h",
                      metadata=None, window_seconds=window, now=now)
        record = state.new_batch(total=n, model="m", **common) if validated else state.new_unvalidated_batch(**common)
        if validated:
            lifecycle.keep_input(self.user_files, record)  # as the gateway does, before creating
        self.batches.create(record)
        return record

    def old_batch(self, record: BatchRecord) -> BatchRecord:
        """As if created before batches kept a copy of their input."""
        self.raw.delete(input_key(P, record.id))
        return record

    def get(self, record: BatchRecord) -> BatchRecord:
        return self.batches.get(P, record.id)

    def drive(self, record: BatchRecord, rounds: int = 1) -> BatchRecord:
        for _ in range(rounds):
            self.driver.drive(P, record.id)
        return self.get(record)

    def cancel(self, record: BatchRecord) -> BatchRecord:
        return self.batches.request_cancel(P, record.id)

    def settle(self, record: BatchRecord, rounds: int = 50, step: float = 61.0) -> BatchRecord:
        """Drive (advancing the clock past any backoff) until ended and cleaned up."""
        for _ in range(rounds):
            current = self.drive(record)
            if current.status in TERMINAL and not current.cleanup_pending:
                return current
            self.clock.advance(step)
        raise AssertionError(f"batch never settled: {current.status} {current.step_failure}")

    def results(self, record: BatchRecord) -> dict[str, dict]:
        """custom_id -> its result line, asserting none appears twice."""
        out: dict[str, dict] = {}
        for file_id in (record.output_file_id, record.error_file_id):
            if file_id:
                _, chunks = self.user_files.open(P, file_id)
                for line in b"".join(chunks).splitlines():
                    item = orjson.loads(line)
                    assert item["custom_id"] not in out, f"{item['custom_id']} appears twice"
                    out[item["custom_id"]] = item
        return out

    def codes(self, record: BatchRecord) -> dict[str, str | None]:
        return {c: (r["error"] or {}).get("code") for c, r in self.results(record).items()}

    def working_data(self, record: BatchRecord) -> list[str]:
        return list(self.raw.list(f"projects/{P}/batches/{record.id}/"))
