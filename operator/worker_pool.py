"""Worker processes for single-node mode: warm engines shared by every batch.

Each slot (one per GPU; one on a CPU machine) keeps a long-lived `vbatch worker
--serve-stdin` process with one model's engine loaded, and hands it MANY shards at
once — of any batch of that model — so the engine's scheduler batches requests
across batches (the worker admits them fairly, see vbatch.worker.admission).

The interface the single-node runtime uses (every method is thread-safe):
  submit(task)          queue a shard; it reaches a worker of its model in fair order
                        (round-robin across projects, then batches: vbatch.core.fair)
  abort(batch_id)       cancel/expiry: drop its queued shards, abort its running ones
                        inside the engine (the worker and its model stay); True while
                        some of its shards still run (they are flushing)
  busy_with(batch_id)   some shard of the batch is still on a worker
  holders(batch_id)     shard -> slot name, for logs and status
  on_result callback    exactly one TaskResult per submitted task
  close()               SIGTERM every worker (they flush), wait

Model switches (a slot holds one model at a time): a slot loads another model only
when it runs no shard, and either its own model has no queued work or another
model's work has waited `switch_after_seconds` with no slot serving that model —
then the slot stops taking new shards of its model (drains) and switches once idle,
so no model starves. Every process start is an engine load: logged and counted
(`engine_loads`, and the worker's `engine_loaded` reply).

A process that dies (kill -9, OOM) reports every shard it held as crashed; the
runtime resubmits them and the next worker resumes each from its parts.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson
from vbatch.core.fair import FairQueue

from vbatch.core import metrics

log = logging.getLogger("vbatch.executor")

PR_SET_PDEATHSIG = 1
# How many shards one worker process holds at once; more wait in the pool's queue
# (Settings.worker_max_shards, whose default this is).
DEFAULT_MAX_SHARDS_PER_WORKER = 256
DEFAULT_SWITCH_AFTER_SECONDS = 60.0


def _die_with_parent() -> None:
    # A worker must not outlive a killed gateway: a second, orphaned worker on the
    # same shard would race the restarted one. Linux only; harmless elsewhere.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


@dataclass(frozen=True)
class ShardTask:
    project: str
    batch_id: str
    shard: int
    model: str


@dataclass(frozen=True)
class TaskResult:
    task: ShardTask
    finished: bool  # the whole shard is done
    crashed: bool  # the process died holding it (counts as a failed attempt)
    aborted: bool = False  # its batch was aborted (cancel, expiry) before it ended


@dataclass
class WorkerSlot:
    index: int
    model: str | None = None
    process: subprocess.Popen[bytes] | None = None
    running: dict[tuple[str, int], ShardTask] = field(default_factory=dict)
    sent_to: dict[tuple[str, int], int] = field(default_factory=dict)  # shard -> pid holding it
    draining: bool = False  # takes no new shards: another model waits for this slot

    @property
    def name(self) -> str:
        return f"slot-{self.index}"

    @property
    def current(self) -> ShardTask | None:
        """One shard it runs (any), or None when idle."""
        return next(iter(self.running.values()), None)


class WorkerPool:
    def __init__(
        self,
        slots: int,
        *,
        engine: str,
        env: dict[str, str],
        on_result: Callable[[TaskResult], None],
        max_shards_per_worker: int = DEFAULT_MAX_SHARDS_PER_WORKER,
        switch_after_seconds: float = DEFAULT_SWITCH_AFTER_SECONDS,
    ) -> None:
        self.slots = [WorkerSlot(i) for i in range(max(1, slots))]
        self.engine = engine
        self.env = env
        self.on_result = on_result
        self.max_shards = max(1, max_shards_per_worker)
        self.switch_after = switch_after_seconds
        self.engine_loads: dict[str, int] = {}
        self._pending: dict[str, FairQueue[tuple[ShardTask, float]]] = {}  # model -> queue
        self._aborting: set[str] = set()
        self._lock = threading.Condition()
        self._closed = False
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="vbatch-worker-pool", daemon=True)

    # --- the interface -----------------------------------------------------------

    def start(self) -> None:
        self._dispatcher.start()

    def submit(self, task: ShardTask) -> None:
        with self._lock:
            self._aborting.discard(task.batch_id)  # a batch resubmitted after a restart
            queue = self._pending.setdefault(task.model, FairQueue())
            queue.push(task.project, task.batch_id, (task, time.monotonic()))
            self._lock.notify_all()

    def abort(self, batch_id: str) -> bool:
        with self._lock:
            self._aborting.add(batch_id)
            dropped = [t for q in self._pending.values() for t, _ in q.remove_batch(batch_id)]
            still = False
            for slot in self.slots:
                if any(t.batch_id == batch_id for t in slot.running.values()):
                    still = True
                    # Written under the lock: it must follow every task line of this batch.
                    self._write(slot, {"op": "abort", "batch_id": batch_id})
        for task in dropped:
            self.on_result(TaskResult(task, finished=False, crashed=False, aborted=True))
        return still

    interrupt = abort  # the name the drivers used for "stop this batch's shards"

    def busy_with(self, batch_id: str) -> bool:
        with self._lock:
            return any(t.batch_id == batch_id for s in self.slots for t in s.running.values())

    def holders(self, batch_id: str) -> dict[int, str]:
        with self._lock:
            return {t.shard: s.name for s in self.slots for t in s.running.values() if t.batch_id == batch_id}

    def close(self, timeout: float = 30.0) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
            processes = [s.process for s in self.slots if s.process is not None]
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)  # each shard flushes and replies
        for process in processes:
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._dispatcher.join(timeout=5)

    # --- dispatch ----------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                switches = self._assign()
                if not switches:
                    self._lock.wait(timeout=1.0)  # also re-checks starvation now and then
                    continue
            for slot, model in switches:
                self._switch(slot, model)

    def _assign(self) -> list[tuple[WorkerSlot, str]]:
        """Under the lock: hand queued shards to workers of their model; return the
        idle slots that should load another model."""
        now = time.monotonic()
        waited = {m: now - min(at for _, at in q) for m, q in self._pending.items() if q}
        served = {s.model for s in self.slots if s.model is not None}
        starving = sorted((m for m, w in waited.items() if w >= self.switch_after and m not in served),
                          key=lambda m: -waited[m])
        for slot in self.slots:
            slot.draining = False
            if slot.model is None and not slot.running:
                # A slot never loaded yet takes a waiting model at once, preferring one no
                # slot holds: at start-up every GPU gets work instead of one taking it all.
                candidates = [m for m, q in self._pending.items() if q]
                if candidates:
                    held = {s.model for s in self.slots}
                    unheld = [m for m in candidates if m not in held]
                    slot.model = (unheld or sorted(candidates, key=lambda m: -len(self._pending[m])))[0]
        for _ in starving:  # one slot per starving model stops taking its own model's shards
            candidates = [s for s in self.slots if not s.draining]
            if candidates:
                min(candidates, key=lambda s: len(s.running)).draining = True
        for model, queue in self._pending.items():
            while queue:
                eligible = [s for s in self.slots if s.model == model and not s.draining
                            and len(s.running) < self.max_shards]
                if not eligible:
                    break
                slot = min(eligible, key=lambda s: len(s.running))
                task, _ = queue.pop()
                self._send(slot, task)
        switches: list[tuple[WorkerSlot, str]] = []
        waiting = sorted((m for m, q in self._pending.items() if q), key=lambda m: -waited[m])
        for slot in self.slots:
            if slot.running or not waiting:
                continue
            own_waits = slot.model in waiting and not slot.draining
            if own_waits:
                continue
            model = waiting.pop(0)
            if model != slot.model:
                switches.append((slot, model))
        return switches

    def _send(self, slot: WorkerSlot, task: ShardTask) -> None:
        if slot.process is None or slot.process.poll() is not None:
            self._start(slot)
        slot.running[(task.batch_id, task.shard)] = task
        slot.sent_to[(task.batch_id, task.shard)] = slot.process.pid
        self._write(slot, {"project": task.project, "batch_id": task.batch_id, "shard": task.shard})

    def _write(self, slot: WorkerSlot, message: dict) -> None:
        process = slot.process
        try:
            process.stdin.write(orjson.dumps(message) + b"\n")
            process.stdin.flush()
        except (OSError, AttributeError, ValueError):
            pass  # the process died: its reader reports every shard it held

    def _start(self, slot: WorkerSlot) -> None:
        model = slot.model or ""
        command = [sys.executable, "-m", "vbatch.worker", "--serve-stdin", "--engine", self.engine, "--model", model]
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   env={**os.environ, **self.env}, preexec_fn=_die_with_parent)
        slot.process = process
        self.engine_loads[model] = self.engine_loads.get(model, 0) + 1
        metrics.engine_loaded(model)
        log.info("engine load #%d of model %s on %s (pid %d)", self.engine_loads[model], model, slot.name, process.pid)
        threading.Thread(target=self._read, args=(slot, process), name=f"vbatch-{slot.name}-replies",
                         daemon=True).start()

    def _switch(self, slot: WorkerSlot, model: str) -> None:
        """Outside the lock: the idle slot's process exits (EOF), the next send loads `model`."""
        with self._lock:
            if slot.running:
                return
            old, slot.process, slot.model = slot.process, None, model
        if old is not None and old.poll() is None:
            log.info("%s switches model to %s", slot.name, model)
            try:
                old.stdin.close()  # EOF: an idle worker exits at once
                old.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                old.kill()
                old.wait()

    def _forget_aborted(self) -> None:
        running = {t.batch_id for s in self.slots for t in s.running.values()}
        self._aborting &= running

    # --- replies -----------------------------------------------------------------

    def _read(self, slot: WorkerSlot, process: subprocess.Popen[bytes]) -> None:
        for raw in process.stdout:
            try:
                reply = orjson.loads(raw)
            except orjson.JSONDecodeError:
                log.error("%s: unreadable worker reply %r", slot.name, raw[:200])
                continue
            if not isinstance(reply, dict):
                continue
            if reply.get("event") == "engine_loaded":
                log.info("%s: engine %s ready for model %s in %ss", slot.name, reply.get("engine"),
                         reply.get("model"), reply.get("seconds"))
                continue
            key = (reply.get("batch_id"), reply.get("shard"))
            with self._lock:
                task = slot.running.pop(key, None)  # type: ignore[arg-type]
                slot.sent_to.pop(key, None)  # type: ignore[arg-type]
                self._forget_aborted()
                self._lock.notify_all()
            if task is None:
                log.error("%s: worker reply for no task it holds: %s", slot.name, reply)
                continue
            if reply.get("error"):
                log.warning("shard %s/%d: %s", task.batch_id, task.shard, reply["error"])
            result = TaskResult(task, finished=bool(reply.get("finished")), crashed=False,
                                aborted=bool(reply.get("aborted")))
            self._count(result)
            self.on_result(result)
        process.wait()
        with self._lock:
            lost = [t for k, t in slot.running.items() if slot.sent_to.get(k) == process.pid]
            for task in lost:
                slot.running.pop((task.batch_id, task.shard), None)
                slot.sent_to.pop((task.batch_id, task.shard), None)
            if slot.process is process:
                slot.process = None
            aborting = set(self._aborting)
            self._forget_aborted()
            self._lock.notify_all()
        if lost:
            log.warning("%s: worker (pid %d) exited with %s holding %d shard(s); they resume elsewhere",
                        slot.name, process.pid, process.returncode, len(lost))
        for task in lost:
            result = TaskResult(task, finished=False, crashed=True, aborted=task.batch_id in aborting)
            self._count(result)
            self.on_result(result)

    def _count(self, result: TaskResult) -> None:
        stopped = result.aborted or self._closed  # cancel/expiry, or shutdown
        outcome = "succeeded" if result.finished else "stopped" if stopped else "failed"
        metrics.shard_attempt(result.task.model, outcome)
