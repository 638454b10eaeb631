"""Worker processes for single-node mode.

Each slot (one per GPU; one on a CPU machine) keeps a long-lived `vbatch worker
--serve-stdin` process with its engine loaded, and hands it shard tasks one at a
time, so consecutive shards of the same model do not reload the model. A process
that dies mid-task is restarted and the shard retried: the worker resumes from
the parts the dead one finished.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from vbatch.core import metrics

log = logging.getLogger("vbatch.executor")

PR_SET_PDEATHSIG = 1


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
    crashed: bool  # the process died (counts as a failed attempt)


class WorkerSlot(threading.Thread):
    def __init__(
        self,
        index: int,
        tasks: "queue.Queue[ShardTask | None]",
        on_result: Callable[[TaskResult], None],
        wanted: Callable[[ShardTask], bool],
        *,
        engine: str,
        env: dict[str, str],
    ) -> None:
        super().__init__(name=f"vbatch-worker-slot-{index}", daemon=True)
        self.tasks = tasks
        self.on_result = on_result
        self.wanted = wanted
        self.engine = engine
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.model: str | None = None
        self.current: ShardTask | None = None
        self._lock = threading.Lock()

    def _ensure_process(self, model: str) -> subprocess.Popen[bytes]:
        if self.process is not None and self.process.poll() is None and self.model == model:
            return self.process
        self._close_process()
        command = [sys.executable, "-m", "vbatch.worker", "--serve-stdin", "--engine", self.engine, "--model", model]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, **self.env}, preexec_fn=_die_with_parent
        )
        self.model = model
        metrics.engine_loaded(model)  # a new worker process loads its engine
        return self.process

    def _close_process(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            try:
                process.stdin.close()  # EOF: the worker exits between tasks
                process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                process.kill()
                process.wait()

    def run(self) -> None:
        while True:
            task = self.tasks.get()
            if task is None:
                self._close_process()
                return
            if not self.wanted(task):  # its batch was cancelled or expired meanwhile
                continue
            with self._lock:
                self.current = task
            try:
                self.on_result(self._run_task(task))
            except Exception:  # never let one task kill the slot
                log.exception("shard %s/%d: worker slot error", task.batch_id, task.shard)
                self.on_result(TaskResult(task, finished=False, crashed=True))
            finally:
                with self._lock:
                    self.current = None

    def _run_task(self, task: ShardTask) -> TaskResult:
        process = self._ensure_process(task.model)
        message = {"project": task.project, "batch_id": task.batch_id, "shard": task.shard}
        try:
            process.stdin.write(orjson.dumps(message) + b"\n")
            process.stdin.flush()
            reply = process.stdout.readline()
        except OSError:
            reply = b""
        if not reply:  # the process died (crash, kill -9, SIGTERM from a cancel)
            process.wait()
            log.warning("shard %s/%d: worker exited with %s", task.batch_id, task.shard, process.returncode)
            self.process = None
            return TaskResult(task, finished=False, crashed=True)
        outcome = orjson.loads(reply)
        return TaskResult(task, finished=bool(outcome.get("finished")), crashed=False)

    def interrupt(self, batch_id: str) -> bool:
        """SIGTERM the worker if it is running a shard of this batch (it flushes, then exits)."""
        with self._lock:
            if self.current is None or self.current.batch_id != batch_id or self.process is None:
                return False
            self.process.send_signal(signal.SIGTERM)
            return True

    def busy_with(self, batch_id: str) -> bool:
        with self._lock:
            return self.current is not None and self.current.batch_id == batch_id
