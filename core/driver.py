"""The one driver of batches, for both ways of running (no kopf, no FastAPI, no vLLM).

For one batch, one round: read the record, ask the shard runtime what its shards did,
decide with `state.next_action`, carry the action out with `lifecycle`, save through
the batch store (SQLite, or Batch resources) and tell `BatchEvents` about every save.
What differs between single node and cluster is the `ShardRuntime`; *when* a batch is
looked at is decided by the caller (the single-node loop, kopf's handlers).

Nothing lives only in this process: a fresh driver resumes from what the store, the
runtime and the object store show. Two markers make that true across crashes:
`finalizing` is saved before merging, and `cleanup_pending` (status.jobName on a Batch
resource) is saved with the shard plan and with every terminal status, and cleared only
after the working data is gone.

A step that raises is classified (`errors.classify`): transient failures are retried
with exponential backoff and jitter, within a per-batch budget of attempts and seconds;
permanent ones, or a spent budget, end the batch (failed, or cancelled/expired if it was
cancelling/expiring) keeping every finished result and naming the cause. The failure
is on the record (`step_failure`: attempts, last error) while it lasts.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

from vbatch.core import lifecycle, state
from vbatch.core.batch_store import BatchStore, StaleRecord
from vbatch.core.config import Settings
from vbatch.core.errors import StepError, classify
from vbatch.core.events import BatchEvents
from vbatch.core.files import FileService
from vbatch.core.runtime import ShardRuntime, ShardsSeen
from vbatch.core.schemas import BatchErrorItem, BatchRecord, BatchStatus, StepFailure
from vbatch.core.state import Action, Observation
from vbatch.core.storage.base import ObjectStore

log = logging.getLogger("vbatch.driver")

# Steps in one drive() call, e.g. validate -> launch, finalize -> clean up, or a re-read after a conflict.
MAX_STEPS = 6
CLEAN_UP = "clean_up"


@dataclass
class _Round:
    """The latest saved version of the batch during one step."""

    record: BatchRecord
    action: str = "decide"


class Driver:
    def __init__(
        self,
        *,
        settings: Settings,
        store: ObjectStore,
        files: FileService,
        batches: BatchStore,
        runtime: ShardRuntime,
        served_models: Collection[str] | None,
        events: BatchEvents | None = None,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.store = store
        self.files = files
        self.batches = batches
        self.runtime = runtime
        self.served_models = served_models
        self.events = events or BatchEvents()
        self.clock = clock
        self.jitter = jitter
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # Clean-up retries of finished batches: in memory only (the batch has ended).
        self._cleanup_retry: dict[str, tuple[int, float]] = {}

    def _lock(self, batch_id: str) -> threading.Lock:
        # kopf runs a timer and event handlers of one object concurrently: one step at a time.
        with self._locks_guard:
            return self._locks.setdefault(batch_id, threading.Lock())

    # --- entry points ----------------------------------------------------------------

    def drive(self, project: str, batch_id: str) -> None:
        """Take every step of this batch that is due now."""
        record: BatchRecord | None = None
        with self._lock(batch_id):
            for _ in range(MAX_STEPS):
                record = self.batches.get(project, batch_id)
                if record is None:
                    break
                try:
                    if not self._step(record):
                        break
                except StaleRecord:
                    continue  # changed meanwhile (a cancel): decide again on a fresh read
        if record is None or (record.status.is_terminal and not record.cleanup_pending):
            with self._locks_guard:
                self._locks.pop(batch_id, None)

    def discard(self, record: BatchRecord) -> bool:
        """The batch itself is being deleted: stop its shards and remove its working data
        (its result files are File objects and stay). True once done; call again if not."""
        with self._lock(record.id):
            if not (self.runtime.stop(record) and self.runtime.release(record)):
                return False  # a stopping worker could still write a part
            lifecycle.remove_working_data(self.store, record)
        with self._locks_guard:
            self._locks.pop(record.id, None)
        return True

    # --- one step --------------------------------------------------------------------

    def _step(self, record: BatchRecord) -> bool:
        """Carry out the next action; True when another step is due at once."""
        now = self.clock()
        if record.status.is_terminal:
            return self._clean_up(record, now) if record.cleanup_pending else False
        failure = record.step_failure
        cancelling = record.status == BatchStatus.CANCELLING or record.cancel_requested
        if failure is not None and now < failure.retry_at and not (cancelling and failure.action != Action.CANCEL):
            return False  # backing off after a failed step (a new cancel is tried at once)
        step = _Round(record)
        try:
            seen = self.runtime.observe(record) if record.shard_count is not None else ShardsSeen()
            action = state.next_action(record, _observation(record, seen, now))
            step.action = action.value
            again = self._carry_out(step, action, seen, int(now))
        except StaleRecord:
            raise
        except Exception as exc:
            self._failed(step, exc, now)
            return False
        if step.record.step_failure is not None:  # the step went through this time
            log.info("batch %s: %s succeeded after %d failed attempt(s)", record.id, step.action,
                     step.record.step_failure.attempts)
            self._save(step, step.record.model_copy(update={"step_failure": None}))
        return again

    def _carry_out(self, step: _Round, action: Action, seen: ShardsSeen, now: int) -> bool:
        record = step.record
        if action == Action.VALIDATE:
            validated = lifecycle.validate(self.files, record, served_models=self.served_models,
                                           limits=self.settings.limits, now=now)
            self._save(step, validated)
            return validated.status == BatchStatus.IN_PROGRESS
        if action == Action.LAUNCH:
            # Shards first, then the record says how many: a crash in between only
            # rewrites the same shard objects on the next attempt.
            launched = lifecycle.launch(self.store, self.files, record, self.settings,
                                        requested=record.requested_shards)
            launched.cleanup_pending = True
            self._save(step, launched)
            if not launched.status.is_terminal:
                self.runtime.run(step.record)
            return launched.status.is_terminal
        if action == Action.WAIT:
            self.runtime.run(record)
            updated = lifecycle.with_progress(record, lifecycle.read_progress(self.store, record))
            if updated.request_counts != record.request_counts or updated.usage != record.usage:
                self._save(step, updated)
            return False
        if action == Action.FINALIZE:
            if record.status == BatchStatus.IN_PROGRESS:
                # Visible while the merge runs; a restart resumes from here (FINALIZE again).
                self._save(step, state.transition(record, BatchStatus.FINALIZING, now))
            failed = frozenset(range(record.shard_count or 0)) - seen.succeeded
            done = lifecycle.finish(self.store, self.files, step.record, missing_code="shard_failed",
                                    failed_shards=failed, to=BatchStatus.COMPLETED, now=now)
            return self._save_end(step, done)
        if action == Action.CANCEL:
            if record.status != BatchStatus.CANCELLING:
                # A cancel applied with kubectl sets only spec.cancelRequested.
                self._save(step, state.request_cancel(record, now))
            return self._stop_then_finish(step, BatchStatus.CANCELLED, "batch_cancelled", now)
        if action == Action.EXPIRE:
            return self._stop_then_finish(step, BatchStatus.EXPIRED, "batch_expired", now)
        return False

    def _stop_then_finish(self, step: _Round, to: BatchStatus, missing_code: str, now: int) -> bool:
        # Only once no worker of it runs is every part that will ever exist written.
        if step.record.shard_count is not None and not self.runtime.stop(step.record):
            return False  # the next round looks again
        done = lifecycle.finish(self.store, self.files, step.record, missing_code=missing_code, to=to, now=now)
        return self._save_end(step, done)

    def _save_end(self, step: _Round, done: BatchRecord) -> bool:
        done.cleanup_pending = True
        done.step_failure = None
        self._save(step, done)
        return True  # clean up at once

    def _clean_up(self, record: BatchRecord, now: float) -> bool:
        """A finished batch keeps its result files only: the runtime's hold on it and the
        working objects go; the marker is cleared last, so a crash before brings this back."""
        attempts, not_before = self._cleanup_retry.get(record.id, (0, 0.0))
        if now < not_before:
            return False
        try:
            if not self.runtime.release(record):
                return False
            lifecycle.remove_working_data(self.store, record)
            self._save(_Round(record, CLEAN_UP), record.model_copy(update={"cleanup_pending": False}))
        except StaleRecord:
            raise
        except Exception as exc:
            attempts += 1
            self._cleanup_retry[record.id] = (attempts, now + self._backoff(attempts))
            log.warning("batch %s: clean-up failed (attempt %d; retrying): %s", record.id, attempts, classify(exc).message)
            return False
        self._cleanup_retry.pop(record.id, None)
        return False

    # --- failures --------------------------------------------------------------------

    def _backoff(self, attempts: int) -> float:
        """Exponential, capped, with "equal" jitter: half fixed, half random, so peers that
        failed together spread out but never retry at once."""
        base = self.settings.step_retry_base_seconds * 2 ** (attempts - 1)
        capped = min(base, self.settings.step_retry_max_seconds)
        return capped * (0.5 + 0.5 * self.jitter())

    def _failed(self, step: _Round, exc: BaseException, now: float) -> None:
        error = classify(exc)
        record = step.record
        previous = record.step_failure
        attempts = (previous.attempts if previous else 0) + 1
        first_at = previous.first_at if previous else now
        failure = StepFailure(action=step.action, kind=error.kind, code=error.code, message=error.message[:1000],
                              attempts=attempts, first_at=first_at, last_at=now, retry_at=now + self._backoff(attempts))
        settings = self.settings
        budget = settings.step_max_attempts if error.transient else min(settings.step_permanent_attempts,
                                                                         settings.step_max_attempts)
        spent = attempts >= budget or now - first_at >= settings.step_max_seconds
        log_error = log.error if spent else log.warning
        log_error("batch %s: %s failed (%s %s, attempt %d of %d): %s%s", record.id, step.action, error.kind,
                  error.code, attempts, budget, error.message,
                  "; ending the batch" if spent else f"; retrying in {failure.retry_at - now:.1f} s",
                  exc_info=error.code == "internal_error")
        failing = record.model_copy(update={"step_failure": failure})
        try:
            if spent:
                self._give_up(step, failing, error, int(now))
            else:
                self._save(step, failing)
        except StaleRecord:
            pass  # changed meanwhile: the next round decides again
        except Exception as again:
            log.error("batch %s: could not record the failure (%s); retrying next round", record.id, again)

    def _give_up(self, step: _Round, record: BatchRecord, error: StepError, now: int) -> None:
        """The budget is spent: end the batch, keeping every finished result line."""
        if record.status == BatchStatus.CANCELLING:
            to, code = BatchStatus.CANCELLED, "batch_cancelled"
        elif record.status == BatchStatus.IN_PROGRESS and record.expires_at is not None and now >= record.expires_at:
            to, code = BatchStatus.EXPIRED, "batch_expired"
        else:
            to, code = BatchStatus.FAILED, error.code
        failure = record.step_failure
        tries = f" after {failure.attempts} attempt(s)" if failure and failure.attempts > 1 else ""
        item = BatchErrorItem(code=error.code, message=f"The batch's {step.action} step failed{tries}: {error.message}")
        if record.status == BatchStatus.VALIDATING:
            done = lifecycle.end_unmerged(record, to, [item], now)  # nothing ran: no lines to write
        else:
            if record.shard_count is not None:
                try:
                    self.runtime.stop(record)  # best effort: what is still in flight becomes error lines
                except Exception as exc:
                    log.warning("batch %s: could not stop its shards (%s)", record.id, classify(exc).message)
            try:
                done = lifecycle.finish(self.store, self.files, record, missing_code=code, to=to, errors=[item], now=now,
                                        missing_message=f"The batch ended before this request ran: {error.message}")
            except Exception as exc:
                reason = classify(exc)
                log.error("batch %s: results could not be merged (%s); ending without result files", record.id, reason.message)
                merge_item = BatchErrorItem(code=reason.code, message=f"The results could not be merged: {reason.message}")
                done = lifecycle.end_unmerged(record, to, [item, merge_item], now)
        done.cleanup_pending = True
        self._save(step, done)

    # --- saving ----------------------------------------------------------------------

    def _save(self, step: _Round, record: BatchRecord) -> BatchRecord:
        before = step.record
        self.batches.save(record)  # sets record.revision; StaleRecord on a conflict
        step.record = record
        if record.status != before.status:
            counts = record.request_counts
            log.info("batch %s %s: %d completed, %d failed of %d", record.id, record.status.value,
                     counts.completed, counts.failed, counts.total)
        self.events.saved(before, record)
        return record


def _observation(record: BatchRecord, seen: ShardsSeen, now: float) -> Observation:
    if record.shard_count is None:
        return Observation(now=int(now))
    shards = range(record.shard_count)
    succeeded = {i for i in seen.succeeded if i in shards}
    failed = {i for i in seen.failed if i in shards} - succeeded
    return Observation(now=int(now), shards_total=record.shard_count, shards_succeeded=len(succeeded),
                       shards_failed=len(failed))
