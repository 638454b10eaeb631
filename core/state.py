"""The batch state machine: pure functions, the same in both ways of running.

Given a batch and what a driver observed (shards launched, finished, failed; the
clock), `next_action` says what happens next; `transition` moves a record to a
new status and stamps its timestamp. The one driver (`vbatch.core.driver`), in
both ways of running, only carries actions out.

    validating -> in_progress -> finalizing -> completed
    validating -> failed
    in_progress -> finalizing -> failed          (every shard failed)
    validating | in_progress -> cancelling -> cancelled
    in_progress -> expired
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from vbatch.core.errors import Conflict
from vbatch.core.ids import new_batch_id
from vbatch.core.schemas import BatchRecord, BatchStatus, RequestCounts

S = BatchStatus

ALLOWED: dict[BatchStatus, frozenset[BatchStatus]] = {
    S.VALIDATING: frozenset({S.IN_PROGRESS, S.FAILED, S.CANCELLING}),
    S.IN_PROGRESS: frozenset({S.FINALIZING, S.CANCELLING, S.EXPIRED}),
    S.FINALIZING: frozenset({S.COMPLETED, S.FAILED}),
    S.CANCELLING: frozenset({S.CANCELLED}),
    S.FAILED: frozenset(),
    S.COMPLETED: frozenset(),
    S.EXPIRED: frozenset(),
    S.CANCELLED: frozenset(),
}

TIMESTAMP_FIELD: dict[BatchStatus, str] = {
    S.IN_PROGRESS: "in_progress_at",
    S.FINALIZING: "finalizing_at",
    S.COMPLETED: "completed_at",
    S.FAILED: "failed_at",
    S.EXPIRED: "expired_at",
    S.CANCELLING: "cancelling_at",
    S.CANCELLED: "cancelled_at",
}


class InvalidTransition(ValueError):
    pass


def transition(record: BatchRecord, to: BatchStatus, now: int) -> BatchRecord:
    """A copy of record moved to `to`, with that status' timestamp set."""
    if to not in ALLOWED[record.status]:
        raise InvalidTransition(f"{record.id}: {record.status} -> {to} is not a batch transition")
    return record.model_copy(update={"status": to, TIMESTAMP_FIELD[to]: now}, deep=True)


def new_batch(
    *,
    project: str,
    input_file_id: str,
    endpoint: str,
    completion_window: str,
    metadata: dict[str, str] | None,
    total: int,
    model: str | None,
    window_seconds: int,
    now: int,
    batch_id: str | None = None,
) -> BatchRecord:
    """A batch whose input was validated at create time: it starts in_progress."""
    record = new_unvalidated_batch(
        project=project,
        input_file_id=input_file_id,
        endpoint=endpoint,
        completion_window=completion_window,
        metadata=metadata,
        window_seconds=window_seconds,
        now=now,
        batch_id=batch_id,
    )
    return validated(record, total=total, model=model, now=now)


def new_unvalidated_batch(
    *,
    project: str,
    input_file_id: str,
    endpoint: str,
    completion_window: str,
    metadata: dict[str, str] | None,
    window_seconds: int,
    now: int,
    batch_id: str | None = None,
) -> BatchRecord:
    """A batch still to be validated (e.g. a Batch resource applied with kubectl)."""
    return BatchRecord(
        id=batch_id or new_batch_id(),
        project=project,
        endpoint=endpoint,
        input_file_id=input_file_id,
        completion_window=completion_window,
        metadata=metadata,
        status=S.VALIDATING,
        created_at=now,
        expires_at=now + window_seconds,
    )


def validated(record: BatchRecord, *, total: int, model: str | None, now: int) -> BatchRecord:
    moved = transition(record, S.IN_PROGRESS, now)
    moved.request_counts = RequestCounts(total=total)
    moved.model = model
    return moved


def request_cancel(record: BatchRecord, now: int) -> BatchRecord:
    """The cancel call: validating/in_progress -> cancelling; idempotent while cancelling."""
    if record.status == S.CANCELLING:
        return record
    if record.status not in (S.VALIDATING, S.IN_PROGRESS):
        raise Conflict(
            f"Cannot cancel a batch that is {record.status.value}.",
            code="batch_not_cancellable",
        )
    moved = transition(record, S.CANCELLING, now)
    moved.cancel_requested = True
    return moved


class Action(StrEnum):
    NONE = "none"  # terminal: nothing to do
    VALIDATE = "validate"  # read the input, -> in_progress or failed
    LAUNCH = "launch"  # plan and write shards, start running them
    WAIT = "wait"  # shards running: refresh counts from progress
    FINALIZE = "finalize"  # every shard ended: merge, -> completed (or failed)
    CANCEL = "cancel"  # stop shards, merge with batch_cancelled, -> cancelled
    EXPIRE = "expire"  # window passed: stop shards, merge with batch_expired, -> expired


@dataclass(frozen=True)
class Observation:
    """What a driver saw of a batch's shards. `shards_total` None: not launched."""

    now: int
    shards_total: int | None = None
    shards_succeeded: int = 0
    shards_failed: int = 0

    @property
    def all_shards_ended(self) -> bool:
        return self.shards_total is not None and self.shards_succeeded + self.shards_failed >= self.shards_total


def next_action(record: BatchRecord, seen: Observation) -> Action:
    status = record.status
    if status.is_terminal:
        return Action.NONE
    if status == S.CANCELLING or (record.cancel_requested and status in (S.VALIDATING, S.IN_PROGRESS)):
        return Action.CANCEL
    if status == S.VALIDATING:
        return Action.VALIDATE
    if status == S.FINALIZING:
        return Action.FINALIZE  # resume a finalize that a restart interrupted
    # in_progress from here on
    if record.expires_at is not None and seen.now >= record.expires_at and not seen.all_shards_ended:
        return Action.EXPIRE
    if seen.shards_total is None:
        return Action.LAUNCH
    if seen.all_shards_ended:
        return Action.FINALIZE
    return Action.WAIT


def outcome_status(shards_total: int, shards_failed: int) -> BatchStatus:
    """Where a finalize ends: completed, unless no shard succeeded at all."""
    return S.FAILED if shards_total > 0 and shards_failed >= shards_total else S.COMPLETED
