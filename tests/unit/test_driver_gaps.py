"""Behaviour of the driver that mutation testing found unchecked: deleting a batch,
a clean-up that fails, how many steps one drive takes, when a save happens, the
backoff's jitter, and what a batch that ran out of attempts says."""

from __future__ import annotations

import pytest
from driver_world import P, World
from vbatch.core.batch_store import StaleRecord
from vbatch.core.errors import StorageError
from vbatch.core.layout import ShardProgress, part_key, progress_key
from vbatch.core.schemas import BatchStatus

S = BatchStatus


@pytest.fixture
def world(tmp_path) -> World:
    return World(tmp_path)


# --- deleting a batch -------------------------------------------------------------------


def test_discard_stops_releases_and_removes_the_working_data(world):
    record = world.drive(world.submit(6))
    world.runtime.answer(record, [0])
    assert world.working_data(record)
    world.runtime.stop_rounds = 1  # a worker is still stopping: not yet
    assert world.driver.discard(record) is False
    assert world.working_data(record) and record.id not in world.runtime.released
    assert world.driver.discard(record) is True
    assert world.working_data(record) == [] and record.id in world.runtime.released
    assert record.id not in world.driver._locks  # nothing kept for a deleted batch


def test_discard_waits_for_the_runtime_to_let_go(world):
    record = world.drive(world.submit(2))
    world.runtime.release = lambda r: False
    assert world.driver.discard(record) is False
    assert world.working_data(record)  # a stopping worker could still write a part


# --- clean-up -----------------------------------------------------------------------------


def test_a_failing_clean_up_is_retried_with_backoff_until_it_goes_through(world):
    record = world.drive(world.submit(2))
    world.runtime.answer(record)
    world.runtime.raise_in["release"] = StorageError("storage unreachable")
    done = world.drive(record)
    assert done.status == S.COMPLETED and done.cleanup_pending  # ended, its clean-up still due
    assert world.working_data(done)
    del world.runtime.raise_in["release"]
    assert world.drive(record).cleanup_pending  # inside the backoff (1 s): not tried yet
    world.clock.advance(1.0)
    cleaned = world.drive(record)
    assert not cleaned.cleanup_pending and world.working_data(cleaned) == []
    assert record.id not in world.driver._cleanup_retry
    world.drive(record)
    assert record.id not in world.driver._locks  # a finished, cleaned-up batch holds nothing


def test_clean_up_backoff_grows_with_each_failure(world):
    record = world.drive(world.submit(2))
    world.runtime.answer(record)
    world.runtime.raise_in["release"] = StorageError("storage unreachable")
    world.drive(record)
    assert world.driver._cleanup_retry[record.id] == (1, world.clock() + 1.0)
    world.clock.advance(1.0)
    world.drive(record)
    assert world.driver._cleanup_retry[record.id] == (2, world.clock() + 2.0)
    world.clock.advance(1.5)  # before the second backoff ends
    world.drive(record)
    assert world.driver._cleanup_retry[record.id][0] == 2


def test_a_runtime_still_holding_the_batch_keeps_the_clean_up_due(world):
    record = world.drive(world.submit(2))
    world.runtime.answer(record)
    asked = []
    world.runtime.release = lambda r: asked.append(r.id) and False
    world.drive(record)
    assert len(asked) == 1  # asked once per round, not in a loop
    done = world.drive(record, rounds=2)
    assert done.status == S.COMPLETED and done.cleanup_pending and world.working_data(done)
    assert record.id not in world.driver._cleanup_retry  # not a failure: just not yet


# --- how far one drive goes ----------------------------------------------------------------


def test_one_drive_validates_and_launches(world):
    record = world.submit(5, validated=False)
    launched = world.drive(record)
    assert launched.status == S.IN_PROGRESS and launched.shard_count == 2
    assert world.runtime.started[record.id] == {0, 1}


def test_one_drive_that_fails_validation_ends_and_stops_there(world):
    record = world.submit(2, validated=False)
    world.user_files.delete(P, record.input_file_id)
    failed = world.drive(record)
    assert failed.status == S.FAILED and failed.shard_count is None
    assert record.id not in world.runtime.started


def test_an_input_gone_before_launch_ends_and_cleans_up_in_one_drive(world):
    record = world.old_batch(world.submit(3))  # no copy of the input
    world.user_files.delete(P, record.input_file_id)
    done = world.drive(record)
    assert done.status == S.FAILED and not done.cleanup_pending
    assert record.id not in world.runtime.started


def test_the_requested_shard_count_is_what_runs(world):
    record = world.submit(6)
    world.batches.save(record.model_copy(update={"requested_shards": 3}))
    launched = world.drive(record)
    assert launched.shard_count == 3 and world.runtime.started[record.id] == {0, 1, 2}


def test_waiting_saves_only_when_progress_moved(world):
    record = world.drive(world.submit(8), rounds=2)
    saves = world.batches.saves
    world.drive(record, rounds=3)
    assert world.batches.saves == saves  # nothing changed: nothing written
    world.runtime.answer(record, [0])
    moved = world.drive(record)
    assert world.batches.saves == saves + 1 and moved.request_counts.completed == 4


def test_failed_requests_alone_move_the_counts(world):
    """Progress with failures only (no tokens used) is still saved."""
    record = world.drive(world.submit(8), rounds=2)
    progress = ShardProgress(shard=1, total=4, failed=2)
    world.raw.put_bytes(progress_key(P, record.id, 1), progress.model_dump_json().encode())
    moved = world.drive(record)
    assert moved.request_counts.model_dump() == {"total": 8, "completed": 0, "failed": 2}


def test_a_shard_that_never_succeeded_gets_shard_failed_lines(world):
    record = world.drive(world.submit(8))
    world.runtime.answer(record, [1])
    world.runtime.failed[record.id] = {0}
    lost, answered = world.runtime.shard_ids(record, 0), world.runtime.shard_ids(record, 1)
    done = world.drive(record)
    assert done.status == S.COMPLETED
    codes = world.codes(done)
    assert {codes[c] for c in lost} == {"shard_failed"} and {codes[c] for c in answered} == {None}


def test_a_stale_save_is_decided_again_on_a_fresh_read(world):
    record = world.drive(world.submit(4))
    world.runtime.answer(record)
    real_save, raised = world.batches._inner.save, []

    def save_once_stale(r):
        if not raised:
            raised.append(r.status)
            raise StaleRecord("changed meanwhile")
        return real_save(r)

    world.batches._inner.save = save_once_stale
    done = world.drive(record)
    assert raised == [S.FINALIZING] and done.status == S.COMPLETED and not done.cleanup_pending


def test_a_cancel_while_stopping_waits_for_the_workers(world):
    record = world.drive(world.submit(4))
    world.cancel(record)
    world.runtime.stop_rounds = 2
    assert world.drive(record).status == S.CANCELLING
    assert world.drive(record).status == S.CANCELLING
    assert world.drive(record).status == S.CANCELLED


def test_a_cancel_before_launch_needs_no_stop(world):
    record = world.submit(3)
    world.cancel(record)
    world.runtime.raise_in["stop"] = AssertionError("nothing runs: nothing to stop")
    assert world.drive(record).status == S.CANCELLED


# --- failures ----------------------------------------------------------------------------


def test_the_backoff_is_half_fixed_half_random(world):
    record = world.drive(world.submit(4))
    world.driver.jitter = lambda: 0.0
    world.runtime.raise_in["observe"] = TimeoutError("slow")
    failure = world.drive(record).step_failure
    assert failure.retry_at - failure.last_at == pytest.approx(0.5)  # base 1 s, no jitter: half
    world.driver.jitter = lambda: 0.5
    world.clock.advance(1.0)
    failure = world.drive(record).step_failure
    assert failure.retry_at - failure.last_at == pytest.approx(2.0 * 0.75)


def test_a_backing_off_batch_is_not_touched_until_the_retry_time(world):
    record = world.drive(world.submit(4))
    world.runtime.raise_in["observe"] = TimeoutError("slow")
    first = world.drive(record).step_failure
    calls = []
    world.runtime.observe = lambda r: calls.append(r) or None
    world.clock.advance(0.5)
    assert world.drive(record).step_failure == first and calls == []


def test_a_long_error_message_is_cut_on_the_record(world):
    record = world.drive(world.submit(2))
    world.runtime.raise_in["observe"] = TimeoutError("x" * 5000)
    failure = world.drive(record).step_failure
    assert failure.message == "x" * 1000


def test_the_budget_in_seconds_ends_exactly_at_the_limit(tmp_path):
    world = World(tmp_path, step_max_attempts=100, step_max_seconds=300.0)
    record = world.drive(world.submit(2))
    world.runtime.raise_in["observe"] = StorageError("storage unreachable")
    world.drive(record)
    world.clock.advance(300)
    assert world.drive(record).status == S.FAILED


def test_a_batch_ending_on_its_first_failure_says_so_without_a_count(tmp_path):
    world = World(tmp_path, step_max_attempts=1)
    record = world.drive(world.submit(4))
    world.runtime.raise_in["observe"] = StorageError("storage unreachable")
    done = world.drive(record)
    assert done.status == S.FAILED and done.cleanup_pending is True  # cleaned up on the next round
    assert world.drive(record).cleanup_pending is False
    message = done.errors.data[0].message
    assert message.startswith("The batch's decide step failed: ") and "attempt" not in message
    assert record.id in world.runtime.stopping  # its workers were told to stop


def test_a_batch_that_fails_exactly_at_its_expiry_ends_expired(tmp_path):
    world = World(tmp_path, step_max_attempts=1)
    record = world.drive(world.submit(4, window=600))
    world.runtime.raise_in["observe"] = StorageError("storage unreachable")
    world.clock.now = float(record.expires_at)
    assert world.drive(record).status == S.EXPIRED


def test_giving_up_when_the_shards_cannot_even_be_stopped_still_ends(tmp_path):
    world = World(tmp_path, step_max_attempts=1)
    record = world.drive(world.submit(4))
    world.runtime.raise_in["observe"] = StorageError("storage unreachable")
    world.runtime.raise_in["stop"] = StorageError("storage unreachable")
    done = world.drive(record)
    assert done.status == S.FAILED and set(world.codes(done)) == {f"r{i}" for i in range(4)}


def test_a_failure_that_cannot_be_recorded_is_retried_next_round(world):
    record = world.drive(world.submit(2))
    world.runtime.raise_in["observe"] = TimeoutError("slow")
    real_save = world.batches._inner.save
    world.batches._inner.save = lambda r: (_ for _ in ()).throw(StorageError("db locked"))
    assert world.drive(record).step_failure is None  # could not be written: nothing recorded
    world.batches._inner.save = real_save
    assert world.drive(record).step_failure.attempts == 1


def test_two_failed_attempts_are_named_when_the_batch_ends(tmp_path):
    world = World(tmp_path, step_max_attempts=2)
    record = world.drive(world.submit(2))
    world.runtime.raise_in["observe"] = StorageError("storage unreachable")
    world.drive(record)
    world.clock.advance(61)
    done = world.drive(record)
    assert done.status == S.FAILED and "decide step failed after 2 attempt(s): " in done.errors.data[0].message


def test_one_drive_of_a_waiting_batch_looks_once(world):
    record = world.drive(world.submit(8), rounds=2)
    looks = []
    observe = world.runtime.observe
    world.runtime.observe = lambda r: looks.append(1) or observe(r)
    world.drive(record)
    assert len(looks) == 1  # nothing is due: no busy loop against the cluster


def test_a_cancel_flag_alone_does_not_wait_for_the_backoff(world):
    record = world.drive(world.submit(4))
    world.runtime.raise_in["observe"] = TimeoutError("slow")
    failing = world.drive(record)
    assert failing.step_failure.attempts == 1
    del world.runtime.raise_in["observe"]
    world.batches.save(failing.model_copy(update={"cancel_requested": True}))  # kubectl sets only the flag
    assert world.drive(record).status == S.CANCELLED  # no clock advance: inside the backoff


def test_driving_a_batch_that_is_gone_keeps_nothing(world):
    world.driver.drive(P, "batch_01J0000000000000000000000Z")
    assert world.driver._locks == {}


def test_a_succeeded_shard_missing_some_results_gives_those_shard_failed_lines(world):
    record = world.drive(world.submit(4))
    world.runtime.answer(record)
    first, *rest = world.runtime.shard_ids(record, 0)
    kept = [line for line in world.raw.get_bytes(part_key(P, record.id, 0, 0)).splitlines() if first.encode() in line]
    world.raw.put_bytes(part_key(P, record.id, 0, 0), b"\n".join(kept) + b"\n")
    codes = world.codes(world.drive(record))
    assert codes[first] is None and {codes[c] for c in rest} == {"shard_failed"}


def test_a_running_batch_reports_usage_from_its_first_wait(world):
    """Once running, the batch shows usage (zeros until tokens are used), not null."""
    launched = world.drive(world.submit(4))
    assert launched.usage is None
    waiting = world.drive(launched)
    assert waiting.usage is not None and waiting.usage.total_tokens == 0
