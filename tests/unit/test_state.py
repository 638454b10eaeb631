"""The batch state machine: only the contract's transitions, timestamps stamped,
and next_action leading every batch to a terminal status."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vbatch.core import state
from vbatch.core.errors import Conflict
from vbatch.core.schemas import BatchStatus as S
from vbatch.core.state import Action, Observation, next_action

CONTRACT_EDGES = {
    (S.VALIDATING, S.IN_PROGRESS),
    (S.VALIDATING, S.FAILED),
    (S.VALIDATING, S.CANCELLING),
    (S.IN_PROGRESS, S.FINALIZING),
    (S.IN_PROGRESS, S.CANCELLING),
    (S.IN_PROGRESS, S.EXPIRED),
    (S.FINALIZING, S.COMPLETED),
    (S.FINALIZING, S.FAILED),
    (S.CANCELLING, S.CANCELLED),
}


def make(status: S = S.IN_PROGRESS, **kw):
    record = state.new_unvalidated_batch(
        project="p", input_file_id="file-" + "a" * 24, endpoint="/v1/chat/completions",
        completion_window="24h", metadata=None, window_seconds=100, now=1000,
    )
    return record.model_copy(update={"status": status, **kw})


def test_allowed_transitions_are_exactly_the_contract():
    edges = {(a, b) for a, targets in state.ALLOWED.items() for b in targets}
    assert edges == CONTRACT_EDGES


@pytest.mark.parametrize("start", list(S))
@pytest.mark.parametrize("to", list(S))
def test_transition_stamps_or_refuses(start, to):
    record = make(start)
    if (start, to) in CONTRACT_EDGES:
        moved = state.transition(record, to, 1234)
        assert moved.status == to
        assert getattr(moved, state.TIMESTAMP_FIELD[to]) == 1234
        assert record.status == start  # the input is not mutated
    else:
        with pytest.raises(state.InvalidTransition):
            state.transition(record, to, 1234)


def test_new_batch_starts_in_progress_with_counts_and_expiry():
    record = state.new_batch(
        project="p", input_file_id="file-" + "b" * 24, endpoint="/v1/chat/completions", completion_window="24h",
        metadata={"k": "v"}, total=3, model="m", window_seconds=86400, now=50,
    )
    assert record.status == S.IN_PROGRESS
    assert record.id.startswith("batch_")
    assert (record.created_at, record.in_progress_at, record.expires_at) == (50, 50, 50 + 86400)
    assert record.request_counts.total == 3 and record.model == "m"


def test_cancel_rules():
    assert state.request_cancel(make(S.IN_PROGRESS), 5).status == S.CANCELLING
    assert state.request_cancel(make(S.VALIDATING), 5).cancelling_at == 5
    cancelling = make(S.CANCELLING, cancelling_at=3)
    assert state.request_cancel(cancelling, 9).cancelling_at == 3  # idempotent
    for terminal in (S.COMPLETED, S.FAILED, S.EXPIRED, S.CANCELLED, S.FINALIZING):
        with pytest.raises(Conflict) as err:
            state.request_cancel(make(terminal), 5)
        assert err.value.status_code == 409


def test_next_action_table():
    fresh = make(S.IN_PROGRESS)
    assert next_action(make(S.VALIDATING), Observation(now=1000)) == Action.VALIDATE
    assert next_action(fresh, Observation(now=1000)) == Action.LAUNCH
    assert next_action(fresh.model_copy(update={"shard_count": 2}), Observation(now=1000, shards_total=2, shards_succeeded=1)) == Action.WAIT
    assert next_action(fresh, Observation(now=1000, shards_total=2, shards_succeeded=1, shards_failed=1)) == Action.FINALIZE
    assert next_action(fresh, Observation(now=1100, shards_total=2)) == Action.EXPIRE
    # finishing wins over expiring when every shard is already done
    assert next_action(fresh, Observation(now=1100, shards_total=1, shards_succeeded=1)) == Action.FINALIZE
    assert next_action(make(S.CANCELLING), Observation(now=1000)) == Action.CANCEL
    assert next_action(make(S.FINALIZING), Observation(now=1000)) == Action.FINALIZE
    for terminal in (S.COMPLETED, S.FAILED, S.EXPIRED, S.CANCELLED):
        assert next_action(make(terminal), Observation(now=1000)) == Action.NONE


def test_outcome_status():
    assert state.outcome_status(3, 0) == S.COMPLETED
    assert state.outcome_status(3, 2) == S.COMPLETED  # partial failures are error lines
    assert state.outcome_status(3, 3) == S.FAILED


EVENTS = st.lists(st.sampled_from(["tick", "shard_ok", "shard_fail", "cancel", "late"]), max_size=30)


@settings(max_examples=300, deadline=None)
@given(shards=st.integers(1, 4), events=EVENTS)
def test_simulated_driver_always_ends_terminal_through_legal_steps(shards, events):
    """Drive a batch the way a driver does, with random shard outcomes, cancels and
    clock jumps: every step is a legal transition and it always ends terminal."""
    record = make(S.VALIDATING)
    now, ok, failed = 1000, 0, 0
    launched = False
    for event in events + ["tick"] * 20:
        if event == "cancel" and record.status in (S.VALIDATING, S.IN_PROGRESS):
            record = state.request_cancel(record, now)
        elif event == "late":
            now += 200
        elif launched and event == "shard_ok" and ok + failed < shards:
            ok += 1
        elif launched and event == "shard_fail" and ok + failed < shards:
            failed += 1
        seen = Observation(now=now, shards_total=shards if launched else None, shards_succeeded=ok, shards_failed=failed)
        action = next_action(record, seen)
        before = record.status
        if action == Action.VALIDATE:
            record = state.validated(record, total=shards, model="m", now=now)
        elif action == Action.LAUNCH:
            launched = True
        elif action == Action.WAIT:
            ok += 1  # time passes: work gets done
        elif action == Action.FINALIZE:
            if record.status == S.IN_PROGRESS:
                record = state.transition(record, S.FINALIZING, now)
            record = state.transition(record, state.outcome_status(shards, failed), now)
        elif action == Action.CANCEL:
            if record.status != S.CANCELLING:
                record = state.transition(record, S.CANCELLING, now)
            record = state.transition(record, S.CANCELLED, now)
        elif action == Action.EXPIRE:
            record = state.transition(record, S.EXPIRED, now)
        assert record.status == before or record.status in state.ALLOWED[before] or action == Action.FINALIZE
        if record.status.is_terminal:
            break
    assert record.status.is_terminal
    assert record.created_at <= (record.completed_at or record.failed_at or record.cancelled_at or record.expired_at)


def test_transition_returns_an_independent_copy():
    """Drivers update the moved record's nested parts (counts, metadata) in place;
    the record they started from must not change with it."""
    record = make(S.IN_PROGRESS, metadata={"k": "v"})
    moved = state.transition(record, S.FINALIZING, 5)
    moved.metadata["k"] = "changed"
    moved.request_counts.completed = 9
    assert record.metadata == {"k": "v"}
    assert record.request_counts.completed == 0


def test_a_cancel_is_recorded_as_requested_and_refusals_say_why():
    moved = state.request_cancel(make(S.IN_PROGRESS), 5)
    assert moved.cancel_requested is True  # what the Batch resource's spec.cancelRequested carries
    with pytest.raises(Conflict) as err:
        state.request_cancel(make(S.COMPLETED), 5)
    assert err.value.envelope()["error"]["code"] == "batch_not_cancellable"
    assert "completed" in err.value.envelope()["error"]["message"]


def test_a_cancel_flag_acts_only_before_finalizing():
    """spec.cancelRequested (set with kubectl, say) cancels a validating or running
    batch; one that is already merging its results finishes instead."""
    flagged = {"cancel_requested": True}
    assert next_action(make(S.VALIDATING, **flagged), Observation(now=1000)) == Action.CANCEL
    assert next_action(make(S.IN_PROGRESS, **flagged), Observation(now=1000, shards_total=1)) == Action.CANCEL
    assert next_action(make(S.FINALIZING, **flagged), Observation(now=1000, shards_total=1)) == Action.FINALIZE
    assert next_action(make(S.COMPLETED, **flagged), Observation(now=1000)) == Action.NONE


def test_a_launched_batch_waits_until_every_shard_reports():
    launched = make(S.IN_PROGRESS, shard_count=1)
    assert next_action(launched, Observation(now=1000, shards_total=1)) == Action.WAIT
    assert next_action(launched, Observation(now=1000, shards_total=1, shards_failed=1)) == Action.FINALIZE
    assert not Observation(now=0).all_shards_ended  # not launched: nothing has ended
    # the window ends exactly at expires_at (created 1000 + 100 s)
    assert next_action(launched, Observation(now=1099, shards_total=1)) == Action.WAIT
    assert next_action(launched, Observation(now=1100, shards_total=1)) == Action.EXPIRE
