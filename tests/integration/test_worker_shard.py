"""The worker's shard runtime: every request of a shard ends in exactly one result
line, parts and progress are written as the worker goes, and a rerun resumes."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import orjson
import pytest
from vbatch.core import layout
from vbatch.core.errors import StorageError
from vbatch.core.layout import ShardProgress
from vbatch.core.storage.local import LocalObjectStore
from vbatch.worker import shard_io
from vbatch.worker.engines.base import EngineReply
from vbatch.worker.engines.echo import EchoEngine
from vbatch.worker.shard import run_shard

P, B, S = "proj", "batch_01JABCDEFGHJKMNPQRSTVWXYZ0", 0


def request(custom_id: str, text: str, system: str | None = None, **extra: Any) -> dict:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": text})
    body = {"model": "m", "messages": messages, **extra}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def write_shard(store: LocalObjectStore, lines: list[dict]) -> None:
    data = b"".join(orjson.dumps(line) + b"\n" for line in lines)
    store.put_bytes(layout.shard_key(P, B, S), data)


def parts(store: LocalObjectStore) -> dict[str, list[dict]]:
    return {
        key: [orjson.loads(raw) for raw in store.get_bytes(key).splitlines() if raw.strip()]
        for key in store.list(layout.results_prefix(P, B, S))
    }


def results(store: LocalObjectStore) -> list[dict]:
    return [line for lines in parts(store).values() for line in lines]


def stored_progress(store: LocalObjectStore) -> ShardProgress:
    return ShardProgress.model_validate_json(store.get_bytes(layout.progress_key(P, B, S)))


def run(store, engine, **kw) -> ShardProgress:
    async def go() -> ShardProgress:
        await engine.start()
        return await run_shard(store, engine, project=P, batch_id=B, shard=S, **kw)

    return asyncio.run(go())


class Recording:
    """Wraps an engine: records call order and the peak number of concurrent calls."""

    def __init__(self, inner, *, max_in_flight: int | None = None, raise_on: str | None = None):
        self.inner = inner
        self.name = "recording"
        self._max = max_in_flight or inner.max_in_flight
        self.raise_on = raise_on
        self.seen: list[dict] = []
        self.active = 0
        self.peak = 0

    @property
    def max_in_flight(self) -> int:
        return self._max

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def chat_completion(self, body, request_id) -> EngineReply:
        self.seen.append(body)
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if self.raise_on and body["messages"][-1]["content"] == self.raise_on:
                raise RuntimeError("GPU on fire")
            return await self.inner.chat_completion(body, request_id)
        finally:
            self.active -= 1


@pytest.fixture
def store(tmp_path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "storage")


def test_every_line_gets_exactly_one_result_with_exact_counts(store):
    lines = [request(f"r{i}", " ".join(["w"] * (i % 5 + 1)), system="be brief") for i in range(150)]
    write_shard(store, lines)

    progress = run(store, EchoEngine(max_in_flight=8))

    out = results(store)
    assert Counter(r["custom_id"] for r in out) == Counter(f"r{i}" for i in range(150))
    for r in out:
        assert r["id"].startswith("batch_req_")
        assert r["error"] is None
        response = r["response"]
        assert response["status_code"] == 200 and response["request_id"].startswith("req_")
        assert response["body"]["object"] == "chat.completion"
    # prompt = "be brief" (2) + the user words; the echo answers the user words.
    words = sum(i % 5 + 1 for i in range(150))
    expected_usage = {"input_tokens": 2 * 150 + words, "output_tokens": words}
    assert progress.finished and progress.total == 150
    assert (progress.completed, progress.failed) == (150, 0)
    assert progress.usage.input_tokens == expected_usage["input_tokens"]
    assert progress.usage.output_tokens == expected_usage["output_tokens"]
    assert progress.usage.total_tokens == sum(expected_usage.values())
    assert stored_progress(store) == progress
    assert progress.parts == len(parts(store))


def test_parts_are_flushed_by_count(store):
    write_shard(store, [request(f"r{i}", "hi") for i in range(10)])

    progress = run(store, EchoEngine(), part_max_results=3, part_max_seconds=60)

    sizes = [len(lines) for lines in parts(store).values()]
    assert sizes == [3, 3, 3, 1]
    assert progress.parts == 4
    assert list(parts(store)) == [layout.part_key(P, B, S, k) for k in range(4)]


def test_parts_are_flushed_by_time_while_the_engine_is_slow(store):
    write_shard(store, [request(f"r{i}", "one two") for i in range(12)])
    # One request at a time, ~50 ms each: ~0.6 s of work, parts every 0.1 s.
    engine = EchoEngine(max_in_flight=1, delay_per_token=0.025)

    progress = run(store, engine, part_max_results=1000, part_max_seconds=0.1)

    sizes = [len(lines) for lines in parts(store).values()]
    assert sum(sizes) == 12
    assert len(sizes) >= 3 and max(sizes) < 12
    assert progress.finished and progress.parts == len(sizes)


def test_a_rerun_skips_finished_requests_and_counts_earlier_parts(store):
    write_shard(store, [request(f"r{i}", "a b c") for i in range(20)])
    # An earlier attempt finished r0..r4 (r4 as an engine error) in part 7.
    earlier = [
        {"id": f"batch_req_{i}", "custom_id": f"r{i}", "error": None,
         "response": {"status_code": 200, "request_id": f"req_{i}",
                      "body": {"usage": {"prompt_tokens": 10, "completion_tokens": 5}}}}
        for i in range(4)
    ] + [{"id": "batch_req_4", "custom_id": "r4", "response": None,
          "error": {"code": "engine_error", "message": "boom"}}]
    store.put_bytes(layout.part_key(P, B, S, 7),
                    b"".join(orjson.dumps(line) + b"\n" for line in earlier))
    engine = Recording(EchoEngine())

    progress = run(store, engine)

    asked = {body["messages"][-1]["content"] for body in engine.seen}
    assert len(engine.seen) == 15 and asked == {"a b c"}
    ids = Counter(r["custom_id"] for r in results(store))
    assert ids == Counter(f"r{i}" for i in range(20))
    assert min(layout.part_number(k) for k in parts(store) if k != layout.part_key(P, B, S, 7)) == 8
    assert (progress.total, progress.completed, progress.failed) == (20, 19, 1)
    assert progress.usage.input_tokens == 4 * 10 + 15 * 3
    assert progress.usage.output_tokens == 4 * 5 + 15 * 3
    assert progress.finished


def test_a_stopped_run_flushes_what_it_finished_and_a_rerun_completes(store):
    write_shard(store, [request(f"r{i}", "x y") for i in range(60)])
    stop = asyncio.Event()

    class StopAfter(Recording):
        async def chat_completion(self, body, request_id):
            if len(self.seen) == 20:
                stop.set()  # SIGTERM arrives while requests are in flight
            return await super().chat_completion(body, request_id)

    engine = StopAfter(EchoEngine(max_in_flight=4, delay_per_token=0.01))
    first = run(store, engine, stop=stop, part_max_results=7)

    assert not first.finished
    done_first = [r["custom_id"] for r in results(store)]
    assert 0 < len(done_first) < 60 and len(done_first) == len(set(done_first))
    assert first.completed == len(done_first)
    assert stored_progress(store).finished is False

    second = run(store, Recording(EchoEngine()))

    assert Counter(r["custom_id"] for r in results(store)) == Counter(f"r{i}" for i in range(60))
    assert second.finished and (second.completed, second.failed, second.total) == (60, 0, 60)


def test_requests_still_running_after_the_grace_period_are_abandoned_not_written(store):
    write_shard(store, [request(f"r{i}", "slow" if i % 2 else "fast") for i in range(10)])
    stop = asyncio.Event()

    class Hanging(Recording):
        async def chat_completion(self, body, request_id):
            if body["messages"][-1]["content"] == "slow":
                asyncio.get_running_loop().call_later(0.05, stop.set)
                await asyncio.sleep(3600)
            return await super().chat_completion(body, request_id)

    progress = run(store, Hanging(EchoEngine(max_in_flight=4)), stop=stop, stop_grace_seconds=0.2)

    written = {r["custom_id"] for r in results(store)}
    assert not progress.finished
    assert written and all(int(cid[1:]) % 2 == 0 for cid in written)  # only the fast ones

    final = run(store, EchoEngine())

    assert Counter(r["custom_id"] for r in results(store)) == Counter(f"r{i}" for i in range(10))
    assert final.finished and final.completed == 10


def test_a_stop_after_the_last_submission_still_bounds_the_wait(store):
    # Everything is submitted at once; one request never returns. Without the grace
    # period a SIGTERM here would wait until Kubernetes kills the pod, losing all.
    write_shard(store, [request(f"r{i}", "stuck" if i == 3 else "ok") for i in range(10)])
    stop = asyncio.Event()

    class OneStuck(Recording):
        async def chat_completion(self, body, request_id):
            if body["messages"][-1]["content"] == "stuck":
                asyncio.get_running_loop().call_later(0.1, stop.set)
                await asyncio.sleep(3600)
            return await super().chat_completion(body, request_id)

    progress = run(store, OneStuck(EchoEngine()), stop=stop, stop_grace_seconds=0.2)

    assert {r["custom_id"] for r in results(store)} == {f"r{i}" for i in range(10)} - {"r3"}
    assert not progress.finished and progress.completed == 9


def test_an_engine_400_becomes_an_error_line_and_the_rest_completes(store):
    bad = {"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions",
           "body": {"model": "m", "messages": "not a list"}}
    write_shard(store, [request("a", "hello"), bad, request("b", "world")])

    progress = run(store, EchoEngine())

    by_id = {r["custom_id"]: r for r in results(store)}
    assert by_id["bad"]["response"]["status_code"] == 400
    assert "error" in by_id["bad"]["response"]["body"]
    assert by_id["bad"]["error"] is None
    assert by_id["a"]["response"]["body"]["choices"][0]["message"]["content"] == "hello"
    assert (progress.completed, progress.failed, progress.finished) == (2, 1, True)


def test_an_engine_exception_becomes_an_engine_error_line(store):
    write_shard(store, [request("ok1", "fine"), request("boom", "explode"), request("ok2", "fine")])

    progress = run(store, Recording(EchoEngine(), raise_on="explode"))

    by_id = {r["custom_id"]: r for r in results(store)}
    assert by_id["boom"]["response"] is None
    assert by_id["boom"]["error"]["code"] == "engine_error"
    assert "GPU on fire" in by_id["boom"]["error"]["message"]
    assert by_id["ok1"]["response"]["status_code"] == 200
    assert (progress.completed, progress.failed, progress.finished) == (2, 1, True)


def test_requests_sharing_a_system_prompt_reach_the_engine_together(store):
    systems = ["You are a pirate.", "You are a lawyer.", "You are a poet."]
    # Interleaved in the file: pirate, lawyer, poet, pirate, ...
    write_shard(store, [request(f"r{i}", f"q{i}", system=systems[i % 3]) for i in range(30)])
    engine = Recording(EchoEngine(max_in_flight=2))

    run(store, engine)

    order = [body["messages"][0]["content"] for body in engine.seen]
    changes = sum(1 for a, b in zip(order, order[1:]) if a != b)
    assert changes == 2  # three contiguous groups
    # Within a group, file order is kept.
    pirates = [body["messages"][-1]["content"] for body in engine.seen if body["messages"][0]["content"] == systems[0]]
    assert pirates == [f"q{i}" for i in range(0, 30, 3)]


def test_the_reorder_window_is_bounded(store):
    systems = ["A", "B"]
    write_shard(store, [request(f"r{i}", f"q{i}", system=systems[i % 2]) for i in range(40)])
    engine = Recording(EchoEngine(max_in_flight=2))

    run(store, engine, window_lines=10)

    # Sorting happens per window of 10 lines only: 4 windows, each A-block then B-block.
    order = [body["messages"][0]["content"] for body in engine.seen]
    assert order == (["A"] * 5 + ["B"] * 5) * 4


def test_the_engine_never_sees_more_than_max_in_flight_concurrent_requests(store):
    write_shard(store, [request(f"r{i}", "a b c d") for i in range(100)])
    engine = Recording(EchoEngine(delay_per_token=0.001), max_in_flight=5)

    progress = run(store, engine)

    assert engine.peak == 5  # kept full, never over
    assert progress.completed == 100


def test_an_already_finished_shard_does_not_touch_the_engine(store):
    write_shard(store, [request(f"r{i}", "a") for i in range(5)])
    run(store, EchoEngine())
    before = parts(store)
    engine = Recording(EchoEngine())

    progress = run(store, engine)

    assert engine.seen == []
    assert parts(store) == before
    assert progress.finished and progress.completed == 5


def test_echo_engine_honours_max_tokens():
    engine = EchoEngine()
    body = {"model": "m", "max_tokens": 2,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "one two three"}]}]}

    reply = asyncio.run(engine.chat_completion(body, "req_1"))

    choice = reply.body["choices"][0]
    assert reply.status_code == 200
    assert (choice["message"]["content"], choice["finish_reason"]) == ("one two", "length")
    assert reply.body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert reply.body["id"].startswith("chatcmpl-") and reply.body["model"] == "m"


class Flaky:
    """A store whose part writes fail `failures` times before working."""

    def __init__(self, inner: LocalObjectStore, failures: int) -> None:
        self.inner, self.failures = inner, failures

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def put_bytes(self, key: str, data: bytes) -> None:
        if "/results/" in key and self.failures > 0:
            self.failures -= 1
            raise StorageError("connection reset by MinIO")
        self.inner.put_bytes(key, data)


def test_a_storage_hiccup_is_retried_without_losing_or_doubling_results(store, monkeypatch):
    monkeypatch.setattr(shard_io, "STORAGE_BACKOFF", 0.001)
    write_shard(store, [request(f"r{i}", "a") for i in range(20)])

    progress = run(Flaky(store, failures=3), EchoEngine(), part_max_results=4)

    assert Counter(r["custom_id"] for r in results(store)) == Counter(f"r{i}" for i in range(20))
    assert progress.finished and progress.completed == 20


def test_storage_down_for_good_fails_the_run_and_a_rerun_still_gives_exactly_once(store, monkeypatch):
    monkeypatch.setattr(shard_io, "STORAGE_BACKOFF", 0.001)
    write_shard(store, [request(f"r{i}", "a") for i in range(20)])
    flaky = Flaky(store, failures=0)
    original = flaky.put_bytes

    def dies_after_two_parts(key, data):
        if len(list(store.list(layout.results_prefix(P, B, S)))) >= 2 and "/results/" in key:
            raise StorageError("bucket gone")
        original(key, data)

    flaky.put_bytes = dies_after_two_parts

    with pytest.raises(StorageError, match="after 5 attempts"):
        run(flaky, EchoEngine(max_in_flight=2), part_max_results=4)
    assert sum(1 for _ in results(store)) == 8

    progress = run(store, EchoEngine())

    assert Counter(r["custom_id"] for r in results(store)) == Counter(f"r{i}" for i in range(20))
    assert progress.finished and progress.completed == 20


def test_run_and_resume_on_every_storage_backend(object_store):
    write_shard(object_store, [request(f"r{i}", "a b") for i in range(30)])
    stop = asyncio.Event()

    class StopAfter(Recording):
        async def chat_completion(self, body, request_id):
            if len(self.seen) == 10:
                stop.set()
            return await super().chat_completion(body, request_id)

    first = run(object_store, StopAfter(EchoEngine(max_in_flight=2)), stop=stop, part_max_results=4)
    second = run(object_store, EchoEngine(), part_max_results=4)

    assert not first.finished and 0 < first.completed < 30
    assert Counter(r["custom_id"] for r in results(object_store)) == Counter(f"r{i}" for i in range(30))
    assert second.finished and (second.completed, second.total) == (30, 30)
    assert stored_progress(object_store) == second
