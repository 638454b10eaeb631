"""Failures that end: a failing step is retried with backoff within its budget, is
visible on the batch and in the log meanwhile, and then ends the batch keeping every
answered line; a crash between any two writes is resumed by a fresh driver."""

from __future__ import annotations

import logging

import pytest
from driver_world import P, Crash, FakeRuntime, World
from vbatch.core.errors import StorageError, classify
from vbatch.core.schemas import BatchStatus

S = BatchStatus


@pytest.fixture
def world(tmp_path) -> World:
    return World(tmp_path)


def test_errors_are_classified():
    class ApiException(Exception):
        def __init__(self, status):
            super().__init__(f"({status})")
            self.status, self.reason = status, "Reason"

    for transient in (StorageError("down"), TimeoutError("slow"), ConnectionRefusedError("no"),
                      ApiException(409), ApiException(503), ApiException(429)):
        assert classify(transient).transient, transient
    for permanent, code in ((ApiException(403), "api_error"), (ValueError("bad json"), "unreadable_data"),
                            (RuntimeError("a bug"), "internal_error"), (KeyError("x"), "internal_error")):
        error = classify(permanent)
        assert not error.transient and error.code == code, permanent


def test_a_transient_failure_is_retried_with_backoff_then_clears(world, caplog):
    record = world.drive(world.submit(4))
    world.runtime.raise_in["observe"] = TimeoutError("API server slow")
    with caplog.at_level(logging.WARNING, "vbatch.driver"):
        failing = world.drive(record)
    failure = failing.step_failure
    assert failing.status == S.IN_PROGRESS and failure.kind == "transient" and failure.attempts == 1
    assert failure.code == "timeout" and "API server slow" in failure.message
    assert failure.retry_at - failure.last_at == pytest.approx(1.0)
    assert any(record.id in r.getMessage() and "attempt 1 of 5" in r.getMessage() for r in caplog.records)
    assert world.drive(record).step_failure.attempts == 1  # backing off: not tried again yet
    world.clock.advance(1.0)
    second = world.drive(record).step_failure
    assert second.attempts == 2 and second.retry_at - second.last_at == pytest.approx(2.0)  # doubled
    del world.runtime.raise_in["observe"]
    world.clock.advance(2.0)
    recovered = world.drive(record)
    assert recovered.step_failure is None and recovered.status == S.IN_PROGRESS
    world.runtime.answer(recovered)
    assert world.settle(record).status == S.COMPLETED


@pytest.mark.parametrize("status", ["in_progress", "cancelling", "expiring", "validating"])
def test_a_step_that_always_fails_ends_the_batch_within_the_budget(world, status, caplog):
    record = world.submit(10, validated=status != "validating", window=600)
    answered: list[str] = []
    if status != "validating":
        record = world.drive(record)
        answered = world.runtime.answer(record, [0])
    if status == "cancelling":
        world.cancel(record)
    if status == "expiring":
        world.clock.advance(601)
    method = "observe" if status != "validating" else None
    if method:
        world.runtime.raise_in[method] = ConnectionResetError("connection reset by peer")
        world.runtime.raise_in["stop"] = ConnectionResetError("connection reset by peer")
    else:
        world.files.open = _raise(StorageError("storage unreachable"))  # validation cannot read the input
    with caplog.at_level(logging.WARNING, "vbatch.driver"):
        rounds = 0
        while world.get(record).status not in (S.COMPLETED, S.FAILED, S.CANCELLED, S.EXPIRED):
            rounds += 1
            assert rounds <= 5 * 10, "the budget does not end the batch"
            world.drive(record)
            world.clock.advance(61)
    done = world.get(record)
    expected = {"in_progress": S.FAILED, "cancelling": S.CANCELLED, "expiring": S.EXPIRED, "validating": S.FAILED}
    assert done.status == expected[status]
    assert done.step_failure.attempts == 5  # step_max_attempts
    code = "storage_unavailable" if status == "validating" else "unreachable"
    assert done.errors.data[0].code == code and "after 5 attempt(s)" in done.errors.data[0].message
    assert any(record.id in r.getMessage() and "ending the batch" in r.getMessage() for r in caplog.records)
    if status != "validating":
        codes = world.codes(done)
        assert set(codes) == {f"r{i}" for i in range(10)}
        assert {c for c, v in codes.items() if v is None} == set(answered)
        cause = {"in_progress": "unreachable", "cancelling": "batch_cancelled", "expiring": "batch_expired"}[status]
        assert {v for v in codes.values() if v} == {cause}
    world.runtime.raise_in.clear()
    assert world.settle(record).cleanup_pending is False


def test_a_cancel_does_not_wait_for_the_backoff_of_a_failing_step(world):
    record = world.drive(world.submit(8))
    world.runtime.answer(record, [0])
    world.runtime.raise_in["run"] = TimeoutError("slow")
    assert world.drive(record).step_failure.attempts == 1
    world.cancel(record)
    done = world.drive(record)  # no clock advance: still inside the backoff
    assert done.status == S.CANCELLED and done.step_failure is None
    assert {v for v in world.codes(done).values() if v} == {"batch_cancelled"}


def _raise(exc):
    def fail(*args, **kwargs):
        raise exc
    return fail


def test_the_budget_in_seconds_ends_a_slowly_failing_step(tmp_path):
    world = World(tmp_path, step_max_attempts=100, step_max_seconds=300.0)
    record = world.drive(world.submit(4))
    world.runtime.raise_in["observe"] = StorageError("storage unreachable")
    world.drive(record)
    world.clock.advance(299)
    assert world.drive(record).status == S.IN_PROGRESS
    world.clock.advance(2)
    done = world.drive(record)
    assert done.status == S.FAILED and done.step_failure.attempts == 3


def test_a_bug_ends_the_batch_after_the_permanent_budget_naming_it(world):
    record = world.drive(world.submit(8))
    world.runtime.answer(record, [0])
    world.runtime.raise_in["run"] = RuntimeError("unexpected None")
    for attempt in (1, 2):
        assert world.drive(record).step_failure.attempts == attempt
        world.clock.advance(61)
    done = world.drive(record)
    assert done.status == S.FAILED and done.step_failure.kind == "permanent" and done.step_failure.attempts == 3
    assert done.errors.data[0].code == "internal_error" and "unexpected None" in done.errors.data[0].message
    codes = world.codes(done)
    assert sum(v is None for v in codes.values()) == 4 and {v for v in codes.values() if v} == {"internal_error"}


def test_when_even_the_merge_fails_the_batch_still_ends(world):
    record = world.drive(world.submit(4))
    world.runtime.raise_in["observe"] = RuntimeError("bug in observe")
    world.files.create = _raise(StorageError("disk full"))
    done = world.settle(record)
    assert done.status == S.FAILED and done.output_file_id is None and done.error_file_id is None
    assert [e.code for e in done.errors.data] == ["internal_error", "storage_unavailable"]


# --- crash between any two writes ------------------------------------------------------


def _run_to_end(world: World, record, *, cancel_after_launch: bool):
    world.runtime.auto_answer = not cancel_after_launch
    for _ in range(30):
        current = world.drive(record)
        if cancel_after_launch and current.status == S.IN_PROGRESS and current.shard_count:
            world.runtime.answer(current, [0])
            world.cancel(record)
        if current.status.is_terminal and not current.cleanup_pending:
            return current
        world.clock.advance(61)
    raise AssertionError(f"never ended: {current.status}")


def _writes_of_a_clean_run(tmp_path, **kw) -> int:
    world = World(tmp_path / "count")
    _run_to_end(world, world.submit(6, validated=False), **kw)
    return world.writes.count


@pytest.mark.parametrize("cancel", [False, True], ids=["completes", "cancelled"])
@pytest.mark.parametrize("mode", ["before", "after"])
def test_a_crash_between_any_two_writes_is_resumed(tmp_path, mode, cancel):
    total = _writes_of_a_clean_run(tmp_path, cancel_after_launch=cancel)
    assert total >= 8
    for n in range(total):
        world = World(tmp_path / f"{mode}-{n}")
        record = world.submit(6, validated=False)
        world.writes.crash_at, world.writes.mode = n, mode
        with pytest.raises(Crash):
            _run_to_end(world, record, cancel_after_launch=cancel)
        world.writes.crash_at = None
        world.new_driver(FakeRuntime(world.raw))  # the process restarted: nothing in memory survives
        done = _run_to_end(world, record, cancel_after_launch=cancel)
        assert done.status == (S.CANCELLED if cancel else S.COMPLETED), n
        assert len(world.batches.terminal_saves) == 1, (n, world.batches.terminal_saves)  # ended once
        codes = world.codes(done)
        assert set(codes) == {f"r{i}" for i in range(6)}, n  # every line, exactly once
        assert done.request_counts.completed + done.request_counts.failed == 6
        assert world.working_data(done) == [], n
        # a finalize redone after a crash overwrote its own result files, never added more
        kept = {key.split("/")[-1].removesuffix(".json") for key in world.raw.list(f"projects/{P}/files/")}
        assert kept == {record.input_file_id, done.output_file_id, done.error_file_id} - {None}, n
