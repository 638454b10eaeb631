"""The single-node driver end to end, without HTTP: real worker subprocesses with
the echo test engine, a SQLite store, a local object store."""

from __future__ import annotations

import os
import signal
import time

import pytest
from vbatch.core.schemas import BatchStatus

from local_node import P, Node


@pytest.fixture
def node(tmp_path):
    n = Node(tmp_path)
    yield n
    for ex in n.running:
        ex.stop()


def test_batch_completes_with_exact_counts_and_results(node):
    node.executor()
    record = node.submit(25)
    done = node.wait(record.id, {BatchStatus.COMPLETED})
    assert done.shard_count == 3 and done.finalizing_at is not None  # finalizing was saved
    assert done.request_counts.model_dump() == {"total": 25, "completed": 25, "failed": 0}
    results = node.results(done)
    assert sorted(results) == sorted(f"r{i}" for i in range(25))
    assert results["r7"]["response"]["body"]["choices"][0]["message"]["content"] == "w7 w7 w7 w7"
    assert done.usage.output_tokens == 25 * 4
    # working data is removed right after the terminal status is saved (in that order,
    # so a crash between the two never loses results)
    deadline = time.time() + 5
    while list(node.store.list(f"projects/{P}/batches/")):
        assert time.time() < deadline, "working data left behind"
        time.sleep(0.05)


def test_counts_move_while_in_progress_and_cancel_keeps_partial_results(tmp_path):
    # The worker runs all 6 shards at once: a small in-flight budget keeps it busy long
    # enough to cancel mid-way.
    node = Node(tmp_path, echo_delay_per_token=0.05, echo_max_in_flight=4)
    node.executor()
    record = node.submit(60)
    deadline = time.time() + 30
    while node.batches.get(P, record.id).request_counts.completed == 0:
        assert time.time() < deadline
        time.sleep(0.05)
    mid = node.batches.get(P, record.id)
    assert mid.status == BatchStatus.IN_PROGRESS and 0 < mid.request_counts.completed < 60
    assert node.batches.request_cancel(P, record.id).status == BatchStatus.CANCELLING
    done = node.wait(record.id, {BatchStatus.CANCELLED})
    results = node.results(done)
    assert len(results) == 60
    cancelled = [r for r in results.values() if r["error"] and r["error"]["code"] == "batch_cancelled"]
    assert cancelled and done.request_counts.completed == 60 - len(cancelled) > 0
    for ex in node.running:
        ex.stop()


def test_expiry_keeps_partial_results(tmp_path):
    # Each request takes 4 words x 1 s: the 2 s window ends first, and the worker's
    # short stop grace abandons what is still running.
    node = Node(tmp_path, echo_delay_per_token=1.0, stop_grace_seconds=0.5)
    node.executor()
    record = node.submit(40, window=2)
    done = node.wait(record.id, {BatchStatus.EXPIRED}, timeout=30)
    results = node.results(done)
    assert len(results) == 40 and done.expired_at is not None
    assert any(r["error"] and r["error"]["code"] == "batch_expired" for r in results.values())
    for ex in node.running:
        ex.stop()


def test_a_killed_worker_is_restarted_and_nothing_is_lost_or_doubled(tmp_path):
    node = Node(tmp_path, echo_delay_per_token=0.1, shard_target_requests=40)
    ex = node.executor()
    record = node.submit(40, words=None)  # one shard; replies take 0.1..0.8 s
    killed, done_at_kill = 0, -1
    deadline = time.time() + 60
    while killed < 2 and time.time() < deadline:
        slot = ex._slots[0]
        completed = node.batches.get(P, record.id).request_counts.completed
        if slot.process is not None and slot.current is not None and 0 < completed < 40 and completed > done_at_kill:
            os.kill(slot.process.pid, signal.SIGKILL)  # mid-shard, after some parts were written
            killed, done_at_kill = killed + 1, completed
        time.sleep(0.02)
    assert killed == 2
    done = node.wait(record.id, {BatchStatus.COMPLETED})
    assert done.request_counts.model_dump() == {"total": 40, "completed": 40, "failed": 0}
    assert len(node.results(done)) == 40
    assert done.usage.output_tokens == sum(i % 8 + 1 for i in range(40))
    for e in node.running:
        e.stop()


def test_a_restarted_executor_resumes_unfinished_batches(tmp_path):
    node = Node(tmp_path, echo_delay_per_token=0.02)
    first = node.executor()
    record = node.submit(30)
    node.wait(record.id, {BatchStatus.IN_PROGRESS})
    deadline = time.time() + 30
    while node.batches.get(P, record.id).request_counts.completed < 5:
        assert time.time() < deadline
        time.sleep(0.05)
    first.stop()
    node.running.remove(first)
    node.executor()
    done = node.wait(record.id, {BatchStatus.COMPLETED})
    assert done.request_counts.completed == 30 and len(node.results(done)) == 30
    for e in node.running:
        e.stop()


def test_one_loaded_worker_serves_every_shard_of_a_model(node):
    """The engine is loaded once per model, not once per shard: the slot's worker
    process runs all shards of consecutive batches of the same model."""
    ex = node.executor()
    first = node.submit(25)  # 3 shards
    pids = set()
    deadline = time.time() + 60
    while node.batches.get(P, first.id).status != BatchStatus.COMPLETED:
        assert time.time() < deadline
        if ex._slots[0].process is not None:
            pids.add(ex._slots[0].process.pid)
        time.sleep(0.01)
    second = node.submit(5)
    node.wait(second.id, {BatchStatus.COMPLETED})
    pids.add(ex._slots[0].process.pid)
    assert len(pids) == 1


def test_an_input_file_deleted_before_launch_does_not_stop_the_batch(tmp_path):
    """As at OpenAI: a created batch owns its requests (the gateway keeps a copy)."""
    node = Node(tmp_path)
    record = node.submit(5)  # no executor yet: the batch waits in_progress
    node.files.delete(P, record.input_file_id)
    node.executor()
    done = node.wait(record.id, {BatchStatus.FAILED, BatchStatus.COMPLETED})
    assert done.status == BatchStatus.COMPLETED and done.errors is None
    assert sorted(node.results(done)) == sorted(f"r{i}" for i in range(5))
    for ex in node.running:
        ex.stop()


def test_a_worker_killed_holding_shards_of_several_batches_completes_each_exactly_once(tmp_path):
    node = Node(tmp_path, echo_delay_per_token=0.05, echo_max_in_flight=6)
    ex = node.executor()
    records = [node.submit(n, words=None) for n in (30, 20, 15)]  # 3 + 2 + 2 shards
    slot = ex._slots[0]
    deadline = time.time() + 30
    while len({t.batch_id for t in list(slot.running.values())}) < 3 or slot.process is None:
        assert time.time() < deadline, "the worker never held shards of every batch"
        time.sleep(0.01)
    os.kill(slot.process.pid, signal.SIGKILL)
    for record in records:
        done = node.wait(record.id, {BatchStatus.COMPLETED})
        total = record.request_counts.total
        assert done.request_counts.model_dump() == {"total": total, "completed": total, "failed": 0}
        assert len(node.results(done)) == total
    assert ex.runtime.workers.engine_loads == {"m": 2}
    for e in node.running:
        e.stop()


def test_cancelled_before_launch_with_its_input_deleted_ends_cancelled(tmp_path):
    node = Node(tmp_path)
    record = node.submit(5)  # no executor yet: nothing is launched
    node.files.delete(P, record.input_file_id)
    node.batches.request_cancel(P, record.id)
    node.executor()
    done = node.wait(record.id, {BatchStatus.CANCELLED, BatchStatus.FAILED})
    assert done.status == BatchStatus.CANCELLED
    assert done.request_counts.model_dump() == {"total": 5, "completed": 0, "failed": 5}
    results = node.results(done)  # every request named, from the batch's copy of its input
    assert sorted(results) == sorted(f"r{i}" for i in range(5))
    assert {r["error"]["code"] for r in results.values()} == {"batch_cancelled"}
    assert done.errors is None and done.output_file_id is None
    for ex in node.running:
        ex.stop()


def test_a_clean_up_cut_short_by_a_crash_is_finished_after_restart(tmp_path):
    """The process died between saving the terminal status and removing the working data:
    the record's marker brings the clean-up back."""
    node = Node(tmp_path)
    first = node.executor()
    record = node.submit(5)
    node.wait(record.id, {BatchStatus.COMPLETED})
    deadline = time.time() + 10
    while node.batches.get(P, record.id).cleanup_pending:
        assert time.time() < deadline
        time.sleep(0.05)
    first.stop()
    node.running.remove(first)
    leftover = f"projects/{P}/batches/{record.id}/shards/0.jsonl"
    node.store.put_bytes(leftover, b"{}\n")  # as if the removal had not happened
    done = node.batches.get(P, record.id)
    node.batches.save(done.model_copy(update={"cleanup_pending": True}))
    node.executor()
    deadline = time.time() + 10
    while node.batches.get(P, record.id).cleanup_pending or node.store.exists(leftover):
        assert time.time() < deadline, "the clean-up never came back"
        time.sleep(0.05)
    assert node.batches.get(P, record.id).status == BatchStatus.COMPLETED
    for ex in node.running:
        ex.stop()


def test_events_alone_carry_many_batches_from_create_to_completed(tmp_path):
    """No sweep (poll once an hour): a batch is driven when it is created and when its
    shards end, so many small batches created at once all complete, each exactly once."""
    node = Node(tmp_path, driver_threads=3)
    try:
        ex = node.executor(poll_seconds=3600)
        time.sleep(0.2)  # the start-up sweep has run: from now on only events drive batches
        records = [node.submit(n) for n in (1, 4, 4, 7, 12, 3, 4, 25)]
        for record in records:
            ex.submitted(record)
        for record in records:
            done = node.wait(record.id, {BatchStatus.COMPLETED}, timeout=120)
            n = record.request_counts.total
            assert (done.request_counts.completed, done.request_counts.failed) == (n, 0)
            assert sorted(node.results(done)) == sorted(f"r{i}" for i in range(n))
        assert ex.runtime.workers.engine_loads == {"m": 1}
    finally:
        for ex in node.running:
            ex.stop()
