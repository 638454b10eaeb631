"""The one driver against a fake shard runtime: every state a batch can be cancelled,
expired or lose its input in ends once, with every line in exactly one result file."""

from __future__ import annotations

import pytest
from driver_world import Crash, P, World
from vbatch.core import state
from vbatch.core.errors import Conflict
from vbatch.core.layout import part_key
from vbatch.core.schemas import BatchStatus

S = BatchStatus


@pytest.fixture
def world(tmp_path) -> World:
    return World(tmp_path)


def ids(n: int) -> set[str]:
    return {f"r{i}" for i in range(n)}


def test_a_batch_runs_through_finalizing_and_cleans_up(world):
    record = world.submit(10)
    launched = world.drive(record)
    assert launched.status == S.IN_PROGRESS and launched.shard_count == 3 and launched.cleanup_pending
    assert world.runtime.started[record.id] == {0, 1, 2}
    world.runtime.answer(launched, [0])
    assert world.drive(launched).request_counts.completed == 4  # counts move while in progress
    world.runtime.answer(launched)
    done = world.drive(launched)
    assert done.status == S.COMPLETED and done.request_counts.model_dump() == {"total": 10, "completed": 10, "failed": 0}
    assert set(world.results(done)) == ids(10) and done.error_file_id is None
    # finalizing was saved before the merge; every save reached the events hub
    statuses = [after.status for _, after in world.saved]
    assert S.FINALIZING in statuses and statuses.index(S.FINALIZING) < statuses.index(S.COMPLETED)
    assert not done.cleanup_pending and world.working_data(done) == [] and record.id in world.runtime.released
    assert done.step_failure is None


def test_every_save_is_announced_with_before_and_after(world):
    record = world.submit(3)
    world.runtime.auto_answer = True
    world.settle(record)
    assert len(world.saved) == world.batches.saves > 0
    for before, after in world.saved:
        assert before is not None and before.id == after.id
    changes = [(b.status, a.status) for b, a in world.saved if b.status != a.status]
    assert changes == [(S.IN_PROGRESS, S.FINALIZING), (S.FINALIZING, S.COMPLETED)]


# --- cancel at every state ----------------------------------------------------------


@pytest.mark.parametrize("when", ["validating", "before_launch", "running", "all_answered", "stop_takes_rounds"])
def test_cancel_at_every_state_ends_cancelled_with_every_line_once(world, when):
    record = world.submit(10, validated=when != "validating")
    answered: list[str] = []
    if when in ("running", "all_answered", "stop_takes_rounds"):
        record = world.drive(record)
        answered = world.runtime.answer(record, [0, 1]) if when != "all_answered" else world.runtime.answer(record)
        if when != "all_answered":
            world.runtime.answer(record, [2], limit=1, finished=False)
            answered.append(world.runtime.shard_ids(record, 2)[0])
    if when == "stop_takes_rounds":
        world.runtime.stop_rounds = 2
    assert world.cancel(record).status == S.CANCELLING
    done = world.settle(record)
    assert done.status == S.CANCELLED and done.cancelled_at is not None
    codes = world.codes(done)
    total = 0 if when == "validating" else 10
    assert set(codes) == (set() if when == "validating" else ids(10))
    assert {c for c, code in codes.items() if code is None} == set(answered)
    assert {code for code in codes.values() if code} <= {"batch_cancelled"}
    assert done.request_counts.total == total
    assert done.request_counts.completed == len(answered) and done.request_counts.failed == total - len(answered)
    assert world.working_data(done) == [] and world.batches.terminal_saves == [(record.id, S.CANCELLED)]


def test_a_cancel_applied_as_a_flag_only_is_carried_out(world):
    """A Batch resource cancelled with kubectl has only spec.cancelRequested set."""
    record = world.drive(world.submit(5))
    flagged = world.get(record).model_copy(update={"cancel_requested": True})
    world.batches.save(flagged)
    done = world.settle(record)
    assert done.status == S.CANCELLED and set(world.codes(done).values()) == {"batch_cancelled"}


def test_a_finalizing_batch_cannot_be_cancelled_and_completes(world):
    record = world.drive(world.submit(4))
    world.runtime.answer(record)
    world.batches.save(state.transition(world.get(record), S.FINALIZING, int(world.clock())))  # a merge under way
    with pytest.raises(Conflict):
        world.cancel(record)
    done = world.settle(record)
    assert done.status == S.COMPLETED and set(world.codes(done).values()) == {None}


# --- expiry -------------------------------------------------------------------------


@pytest.mark.parametrize("launched", [False, True])
def test_expiry_keeps_answered_lines(world, launched):
    record = world.submit(8, window=60)
    answered: list[str] = []
    if launched:
        record = world.drive(record)
        answered = world.runtime.answer(record, [0])
    world.clock.advance(61)
    done = world.settle(record)
    assert done.status == S.EXPIRED and done.expired_at is not None
    codes = world.codes(done)
    assert set(codes) == ids(8)
    assert {c for c, code in codes.items() if code is None} == set(answered)
    assert {code for code in codes.values() if code} == {"batch_expired"}


# --- input deleted at every state ----------------------------------------------------------


def test_input_deleted_while_validating_fails_naming_the_file(world):
    record = world.submit(3, validated=False)
    world.user_files.delete(P, record.input_file_id)
    done = world.settle(record)
    assert done.status == S.FAILED and done.errors.data[0].code == "file_not_found"


def test_input_deleted_before_launch_still_runs_from_the_batchs_copy(world):
    """As at OpenAI: a created batch owns its requests; deleting the input file is harmless."""
    record = world.submit(6)
    world.user_files.delete(P, record.input_file_id)
    launched = world.drive(record)
    assert launched.status == S.IN_PROGRESS and launched.shard_count == 2
    world.runtime.answer(launched)
    done = world.settle(record)
    assert done.status == S.COMPLETED and done.errors is None
    assert world.codes(done) == dict.fromkeys(ids(6))
    assert world.working_data(done) == []  # the copy goes with the rest of the working data


def test_a_batch_without_a_copy_whose_input_was_deleted_before_launch_fails(world):
    record = world.old_batch(world.submit(3))
    world.user_files.delete(P, record.input_file_id)
    done = world.settle(record)
    assert done.status == S.FAILED and done.errors.data[0].code == "input_file_not_found"
    assert done.finalizing_at is not None and world.runtime.started == {}


def test_input_deleted_after_launch_does_not_matter(world):
    record = world.drive(world.submit(6))
    world.user_files.delete(P, record.input_file_id)
    world.runtime.answer(record)
    done = world.settle(record)
    assert done.status == S.COMPLETED and set(world.codes(done)) == ids(6)


def validated_by_the_driver(world: World, n: int, **kw):
    """A Batch applied with kubectl, validated by the driver, which then died before launch."""
    record = world.submit(n, validated=False, **kw)
    world.writes.crash_at = world.writes.count + 2  # the copy, the in_progress save, then the first shard
    with pytest.raises(Crash):
        world.drive(record)
    world.writes.crash_at = None
    world.new_driver()
    assert world.get(record).status == S.IN_PROGRESS and world.get(record).shard_count is None
    return record


def test_input_deleted_after_the_driver_validated_it_still_runs(world):
    record = validated_by_the_driver(world, 5)
    world.user_files.delete(P, record.input_file_id)
    world.runtime.auto_answer = True
    done = world.settle(record)
    assert done.status == S.COMPLETED and world.codes(done) == dict.fromkeys(ids(5))


@pytest.mark.parametrize("end", ["cancel", "expire"])
@pytest.mark.parametrize("validated_by", ["gateway", "driver"])
def test_input_deleted_before_launch_then_cancelled_or_expired_lists_every_line(world, end, validated_by):
    """The once-stuck case: nothing was launched and the input is gone; the batch's copy
    still names every request, so each gets its error line."""
    if validated_by == "gateway":
        record = world.submit(7, window=60)
    else:
        record = validated_by_the_driver(world, 7, window=60)
    world.user_files.delete(P, record.input_file_id)
    if end == "cancel":
        world.cancel(record)
    else:
        world.clock.advance(61)
    done = world.drive(record)
    code = "batch_cancelled" if end == "cancel" else "batch_expired"
    assert done.status == (S.CANCELLED if end == "cancel" else S.EXPIRED)
    assert done.request_counts.model_dump() == {"total": 7, "completed": 0, "failed": 7}
    assert world.codes(done) == dict.fromkeys(ids(7), code)
    assert done.errors is None and done.output_file_id is None and done.step_failure is None
    assert world.runtime.started == {} and world.working_data(done) == []


@pytest.mark.parametrize("end", ["cancel", "expire"])
def test_without_a_copy_or_its_input_a_batch_ends_saying_why(world, end):
    """A batch from before copies were kept: no line can be named. It ends at once; the
    counts and the errors entry say what happened."""
    record = world.old_batch(world.submit(7, window=60))
    world.user_files.delete(P, record.input_file_id)
    if end == "cancel":
        world.cancel(record)
    else:
        world.clock.advance(61)
    done = world.drive(record)
    assert done.status == (S.CANCELLED if end == "cancel" else S.EXPIRED)
    assert done.request_counts.model_dump() == {"total": 7, "completed": 0, "failed": 7}
    assert done.errors.data[-1].code == "input_file_not_found" and "7 request(s)" in done.errors.data[-1].message
    assert done.error_file_id is None and done.step_failure is None


# --- shards failing -------------------------------------------------------------------


def test_a_shard_failing_past_its_budget_gets_error_lines(world):
    record = world.drive(world.submit(10))
    world.runtime.answer(record, [0, 2])
    world.runtime.failed[record.id] = {1}
    lost = set(world.runtime.shard_ids(record, 1))
    done = world.settle(record)
    assert done.status == S.COMPLETED and done.errors.data[0].code == "shard_failed"
    codes = world.codes(done)
    assert set(codes) == ids(10)
    assert {c for c, code in codes.items() if code == "shard_failed"} == lost
    assert all(code is None for c, code in codes.items() if c not in lost)


def test_every_shard_failing_fails_the_batch(world):
    record = world.drive(world.submit(8))
    world.runtime.failed[record.id] = {0, 1}
    done = world.settle(record)
    assert done.status == S.FAILED and done.request_counts.model_dump() == {"total": 8, "completed": 0, "failed": 8}


def test_a_corrupt_result_part_is_skipped_and_counted_not_looped_on(world):
    record = world.drive(world.submit(8))
    world.runtime.answer(record)
    world.raw.put_bytes(part_key(P, record.id, 1, 1), b'{"custom_id": "r1", "response": \xff garbage\n')
    world.raw.delete(part_key(P, record.id, 1, 0))  # shard 1's real answers are lost
    done = world.drive(record)
    assert done.status == S.COMPLETED
    codes = world.codes(done)
    assert set(codes) == ids(8)
    lost = {c for c, code in codes.items() if code == "result_unreadable"}
    assert len(lost) == 4 and all(code is None for c, code in codes.items() if c not in lost)
    assert any(e.code == "result_unreadable" and "1 result part" in e.message for e in done.errors.data)


# --- the SQLite store keeps the clean-up marker -----------------------------------------


def test_sqlite_lists_finished_batches_whose_clean_up_is_pending(tmp_path):
    import sqlite3

    from vbatch.core.sqlite_store import SqliteBatchStore

    path = tmp_path / "old.sqlite3"
    old = sqlite3.connect(path)  # a store written before the marker existed
    old.executescript("CREATE TABLE batches (id TEXT PRIMARY KEY, project TEXT NOT NULL, status TEXT NOT NULL,"
                      " revision INTEGER NOT NULL, data TEXT NOT NULL);")
    old.close()
    store = SqliteBatchStore(path)
    world = World(tmp_path / "w")
    record = world.submit(2)
    store.create(record)
    ended = state.transition(state.transition(record, S.FINALIZING, 1), S.COMPLETED, 2)
    ended.cleanup_pending = True
    store.save(ended)
    assert [r.id for r in store.unfinished()] == [record.id]
    ended.cleanup_pending = False
    store.save(ended)
    assert list(store.unfinished()) == []
