"""A single-node setup in a temp dir (SQLite store, local object store, echo worker
processes) shared by the driver's integration and fault tests."""

from __future__ import annotations

import time

import orjson
from vbatch.core import lifecycle, state
from vbatch.core.config import Settings
from vbatch.core.files import FileService
from vbatch.core.schemas import FilePurpose
from vbatch.core.sqlite_store import SqliteBatchStore
from vbatch.core.storage.local import LocalObjectStore
from vbatch.operator.local_executor import LocalExecutor

P = "proj"


def lines(n: int, words: int | None = 4) -> bytes:
    """n requests; words=None varies the reply length (1..8 words) so they finish at different times."""
    out = []
    for i in range(n):
        count = words if words is not None else i % 8 + 1
        body = {"model": "m", "messages": [{"role": "user", "content": " ".join(f"w{i}" for _ in range(count))}]}
        out.append(orjson.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}))
    return b"\n".join(out) + b"\n"


class Node:
    """A single-node setup in a temp dir; `executor()` starts a (new) driver."""

    def __init__(self, tmp_path, **overrides):
        options = {"engine": "echo", "shard_target_requests": 10, "part_max_results": 5, "part_max_seconds": 0.2}
        self.settings = Settings(data_dir=tmp_path, **(options | overrides))
        self.store = LocalObjectStore(self.settings.storage_dir)
        self.files = FileService(self.store)
        self.batches = SqliteBatchStore(tmp_path / "batches.sqlite3")
        self.running: list[LocalExecutor] = []

    def executor(self, poll_seconds: float = 0.1) -> LocalExecutor:
        ex = LocalExecutor(settings=self.settings, store=self.store, files=self.files, batches=self.batches,
                           served_models=None, engine="echo", poll_seconds=poll_seconds, retry_backoff=0.2)
        ex.start()
        self.running.append(ex)
        return ex

    def submit(self, n: int, window: int = 3600, words: int | None = 4):
        f = self.files.create(P, iter([lines(n, words)]), filename="in.jsonl", purpose=FilePurpose.BATCH)
        record = state.new_batch(project=P, input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h",
                                 metadata=None, total=n, model="m", window_seconds=window, now=int(time.time()))
        lifecycle.keep_input(self.files, record)  # as the gateway does, before creating
        self.batches.create(record)
        return record

    def wait(self, batch_id, statuses, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            record = self.batches.get(P, batch_id)
            if record.status in statuses:
                return record
            time.sleep(0.1)
        raise AssertionError(f"batch stuck in {record.status}: {record.request_counts}")

    def results(self, record):
        out = {}
        for file_id in (record.output_file_id, record.error_file_id):
            if file_id:
                _, chunks = self.files.open(P, file_id)
                for line in b"".join(chunks).splitlines():
                    item = orjson.loads(line)
                    assert item["custom_id"] not in out, "a custom_id appears twice"
                    out[item["custom_id"]] = item
        return out
