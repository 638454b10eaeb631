"""The single-node driver's coalescing queue: each batch once, one thread per batch,
events before the sweep, nothing asked for mid-drive is lost."""

from __future__ import annotations

import threading
import time

from vbatch.operator.drive_queue import DriveQueue

A, B, C = ("p", "a"), ("p", "b"), ("q", "c")


def test_a_batch_asked_for_many_times_is_queued_once():
    queue = DriveQueue()
    for _ in range(100):
        queue.add(A)
        queue.add(A, urgent=False)
    assert len(queue) == 1
    assert queue.take(timeout=0) == A
    assert queue.take(timeout=0) is None


def test_events_go_before_the_sweep():
    queue = DriveQueue()
    queue.add(A, urgent=False)
    queue.add(B, urgent=False)
    queue.add(C)  # a batch just created
    queue.add(B)  # a shard of B ended: B moves to the event lane
    assert [queue.take(timeout=0) for _ in range(3)] == [C, B, A]


def test_a_batch_being_driven_is_not_handed_to_a_second_thread():
    queue = DriveQueue()
    queue.add(A)
    assert queue.take(timeout=0) == A
    queue.add(A)  # e.g. its shard ended while this thread drives it
    assert queue.take(timeout=0) is None  # not twice at once
    queue.done(A)
    assert queue.take(timeout=0) == A  # but driven again afterwards: the event is not lost
    queue.done(A)
    assert queue.take(timeout=0) is None


def test_done_without_a_new_request_does_not_requeue():
    queue = DriveQueue()
    queue.add(A)
    key = queue.take(timeout=0)
    queue.done(key)
    assert len(queue) == 0


def test_take_waits_for_an_add_and_close_releases_waiters():
    queue = DriveQueue()
    got: list = []
    taker = threading.Thread(target=lambda: got.append(queue.take(timeout=5)))
    taker.start()
    time.sleep(0.05)
    queue.add(B)
    taker.join(timeout=5)
    assert got == [B]
    waiter = threading.Thread(target=lambda: got.append(queue.take(timeout=30)))
    waiter.start()
    queue.close()
    waiter.join(timeout=5)
    assert not waiter.is_alive() and got[-1] is None


def test_concurrent_threads_never_drive_one_batch_twice_at_once():
    queue = DriveQueue()
    keys = [("p", f"b{i}") for i in range(8)]
    active: set = set()
    overlaps: list = []
    drives = {k: 0 for k in keys}
    guard = threading.Lock()
    stop = threading.Event()

    def work() -> None:
        while not stop.is_set():
            key = queue.take(timeout=0.05)
            if key is None:
                continue
            with guard:
                if key in active:
                    overlaps.append(key)
                active.add(key)
                drives[key] += 1
            time.sleep(0.001)
            with guard:
                active.discard(key)
            queue.done(key)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(200):
        for key in keys:
            queue.add(key, urgent=bool(hash(key) % 2))
    deadline = time.monotonic() + 10
    while len(queue) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(timeout=5)
    assert overlaps == []
    assert all(drives[k] >= 1 for k in keys)
    assert len(queue) == 0
