"""Warm workers: one loaded engine runs many shards of many batches at once.

Real `vbatch worker --serve-stdin` processes driven by the single-node WorkerPool,
with the echo test engine slowed by a per-token delay (the engine is not the point:
admission, abort and model switching are)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

import orjson
import pytest
from vbatch.core import layout
from vbatch.core.config import Settings, settings_env
from vbatch.core.storage.local import LocalObjectStore
from vbatch.operator.worker_pool import ShardTask, TaskResult, WorkerPool

MODEL = "m"


def seed(store: LocalObjectStore, project: str, batch: str, n: int, shard: int = 0, words: int = 4) -> None:
    lines = [{"custom_id": f"{batch}-{shard}-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": MODEL, "messages": [{"role": "user", "content": " ".join(["w"] * words)}]}}
             for i in range(n)]
    store.put_bytes(layout.shard_key(project, batch, shard), b"".join(orjson.dumps(x) + b"\n" for x in lines))


def result_ids(store: LocalObjectStore, project: str, batch: str, shard: int = 0) -> Counter:
    ids: Counter = Counter()
    for key in store.list(layout.results_prefix(project, batch, shard)):
        for raw in store.get_bytes(key).splitlines():
            ids[orjson.loads(raw)["custom_id"]] += 1
    return ids


class Pool:
    """A WorkerPool on a temp data dir that records every result with its time."""

    def __init__(self, tmp_path, slots: int = 1, **settings):
        options = {"engine": "echo", "part_max_results": 5, "part_max_seconds": 0.2,
                   "echo_delay_per_token": 0.01, "echo_max_in_flight": 8} | settings
        self.settings = Settings(data_dir=tmp_path, **options)
        self.store = LocalObjectStore(self.settings.storage_dir)
        self.results: list[tuple[float, TaskResult]] = []
        self.changed = threading.Condition()
        self.pool = WorkerPool(slots, engine="echo", env=settings_env(self.settings), on_result=self._on_result,
                               switch_after_seconds=options.get("model_switch_after_seconds", 60.0))
        self.pool.start()

    def _on_result(self, result: TaskResult) -> None:
        with self.changed:
            self.results.append((time.monotonic(), result))
            self.changed.notify_all()

    def submit(self, project: str, batch: str, shard: int = 0, model: str = MODEL) -> None:
        self.pool.submit(ShardTask(project, batch, shard, model))

    def wait(self, count: int, timeout: float = 60) -> list[TaskResult]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.results) >= count, timeout), self.results
            return [r for _, r in self.results]

    def finished_at(self, batch: str) -> float:
        return next(t for t, r in self.results if r.task.batch_id == batch)

    def pid(self) -> int:
        return self.pool.slots[0].process.pid

    def wait_for_parts(self, project: str, batch: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not list(self.store.list(layout.results_prefix(project, batch, 0))):
            assert time.monotonic() < deadline, "no part written in time"
            time.sleep(0.01)


@pytest.fixture
def make_pool(tmp_path):
    pools: list[Pool] = []

    def make(**kwargs) -> Pool:
        pools.append(Pool(tmp_path, **kwargs))
        return pools[-1]

    yield make
    for p in pools:
        p.pool.close()


@pytest.mark.timeout(120)
def test_a_small_batch_of_another_project_finishes_long_before_a_big_running_one(make_pool):
    p = make_pool()
    # Project A: two batches, 600 requests each (8 in flight x 40 ms: ~6 s alone).
    for batch in ("batch_a1", "batch_a2"):
        seed(p.store, "proj-a", batch, 600)
        p.submit("proj-a", batch)
    p.wait_for_parts("proj-a", "batch_a1")
    seed(p.store, "proj-b", "batch_b", 10)
    p.submit("proj-b", "batch_b")

    p.wait(3)
    assert all(r.finished for _, r in p.results)
    b_done = p.finished_at("batch_b")
    a_done = min(p.finished_at("batch_a1"), p.finished_at("batch_a2"))
    assert b_done < a_done
    # B's 10 requests got every other engine slot: A had done only a small share meanwhile.
    assert p.results[0][1].task.batch_id == "batch_b"
    assert result_ids(p.store, "proj-b", "batch_b") == Counter(f"batch_b-0-{i}" for i in range(10))
    assert p.pool.engine_loads == {MODEL: 1}


@pytest.mark.timeout(120)
def test_aborting_one_batch_leaves_the_others_whole_and_the_worker_alive(make_pool):
    p = make_pool()
    sizes = {"batch_x": 300, "batch_y": 120, "batch_z": 80}
    for batch, n in sizes.items():
        seed(p.store, "proj", batch, n)
        p.submit("proj", batch)
    p.wait_for_parts("proj", "batch_x")
    pid = p.pid()

    assert p.pool.abort("batch_x") is True  # its shard still runs: it is flushing
    (aborted,) = [r for r in p.wait(1, timeout=30) if r.task.batch_id == "batch_x"]
    assert aborted.aborted and not aborted.finished and not aborted.crashed
    assert not p.pool.busy_with("batch_x")
    partial = result_ids(p.store, "proj", "batch_x")
    assert 0 < len(partial) < sizes["batch_x"] and set(partial.values()) == {1}

    results = {r.task.batch_id: r for r in p.wait(3)}
    for batch in ("batch_y", "batch_z"):
        assert results[batch].finished
        assert result_ids(p.store, "proj", batch) == Counter(f"{batch}-0-{i}" for i in range(sizes[batch]))
    # The same process, the model loaded once: an abort is not a restart.
    assert p.pid() == pid and p.pool.slots[0].process.poll() is None
    assert p.pool.engine_loads == {MODEL: 1}
    # ...and it takes new work at once.
    seed(p.store, "proj", "batch_w", 5)
    p.submit("proj", "batch_w")
    assert p.wait(4)[-1].finished and p.pid() == pid


@pytest.mark.timeout(120)
def test_a_killed_worker_reports_every_shard_it_held_and_a_new_one_resumes_them(make_pool):
    p = make_pool(echo_delay_per_token=0.02)
    batches = {("proj-a", "batch_k1"): 2, ("proj-a", "batch_k2"): 1, ("proj-b", "batch_k3"): 2}
    for (project, batch), shards in batches.items():
        for shard in range(shards):
            seed(p.store, project, batch, 80, shard=shard)
            p.submit(project, batch, shard)
    p.wait_for_parts("proj-a", "batch_k1")
    assert len(p.pool.slots[0].running) == 5
    os.kill(p.pid(), signal.SIGKILL)

    crashed = p.wait(5)
    assert all(r.crashed and not r.finished for r in crashed)
    for r in crashed:  # what a runtime does with a crashed shard
        p.pool.submit(r.task)
    assert all(r.finished for r in p.wait(10)[5:])
    for (project, batch), shards in batches.items():
        for shard in range(shards):
            assert result_ids(p.store, project, batch, shard) == Counter(f"{batch}-{shard}-{i}" for i in range(80))
    assert p.pool.engine_loads == {MODEL: 2}


@pytest.mark.timeout(120)
def test_a_slot_keeps_its_model_warm_while_its_work_waits(make_pool):
    p = make_pool(model_switch_after_seconds=1000)
    for batch, model in (("batch_m1a", "m1"), ("batch_m2", "m2"), ("batch_m1b", "m1")):
        seed(p.store, "proj", batch, 40)
        p.submit("proj", batch, model=model)
    order = [r.task.batch_id for r in p.wait(3)]
    # m1's second batch joined the loaded engine; m2 waited for the slot to go idle.
    assert order[-1] == "batch_m2"
    assert p.pool.engine_loads == {"m1": 1, "m2": 1}


@pytest.mark.timeout(120)
def test_another_models_waiting_work_is_not_starved(make_pool):
    p = make_pool(model_switch_after_seconds=0.3)
    seed(p.store, "proj", "batch_m1a", 80)
    p.submit("proj", "batch_m1a", model="m1")
    p.wait_for_parts("proj", "batch_m1a")
    seed(p.store, "proj", "batch_m2", 10)
    p.submit("proj", "batch_m2", model="m2")
    time.sleep(0.5)  # m2 has now waited past the bound: the slot drains m1
    seed(p.store, "proj", "batch_m1b", 10)
    p.submit("proj", "batch_m1b", model="m1")
    order = [r.task.batch_id for r in p.wait(3)]
    assert order == ["batch_m1a", "batch_m2", "batch_m1b"]
    assert p.pool.engine_loads == {"m1": 2, "m2": 1}
    assert all(r.finished for r in p.wait(3))


@pytest.mark.timeout(120)
def test_every_slot_gets_work_and_shards_spread_across_them(make_pool):
    p = make_pool(slots=2)
    for batch in ("batch_s1", "batch_s2", "batch_s3", "batch_s4"):
        seed(p.store, "proj", batch, 60)
        p.submit("proj", batch)
    deadline = time.monotonic() + 30
    while not all(slot.running for slot in p.pool.slots):
        assert time.monotonic() < deadline, [len(s.running) for s in p.pool.slots]
        time.sleep(0.01)
    assert all(r.finished for r in p.wait(4))
    assert p.pool.engine_loads == {MODEL: 2}  # one engine per slot, loaded once each


@pytest.mark.timeout(120)
def test_one_worker_holds_every_small_batch_at_once_not_in_waves(make_pool):
    # 60 one-request batches: with room for 128 requests in the engine, the worker must
    # run all 60 shards at once (a cap of 32 shards ran them as two waves, the engine
    # half empty in each).
    p = make_pool(echo_max_in_flight=128)
    batches = [f"batch_s{i:02d}" for i in range(60)]
    for batch in batches:
        seed(p.store, "proj", batch, 1, words=60)  # ~0.6 s per request
    for batch in batches:
        p.submit("proj", batch)
    deadline = time.monotonic() + 30
    held = 0
    while held < len(batches) and not p.results:
        assert time.monotonic() < deadline, f"only {held} shards ever held at once"
        held = max(held, len(p.pool.slots[0].running))
        time.sleep(0.005)
    assert held == len(batches), f"the worker held at most {held} shards at once"
    results = p.wait(len(batches))
    assert all(r.finished for r in results)
    for batch in batches:
        assert result_ids(p.store, "proj", batch) == Counter([f"{batch}-0-0"])
    assert p.pool.engine_loads == {MODEL: 1}
