"""`vbatch worker --pool P --member M`: a warm pool pod of the cluster.

It loads its model once, then runs whatever shards (of any batch of that model) the
operator assigned to it — many at once, their requests admitted fairly into the one
engine — and reports through its heartbeat (vbatch.core.pool_layout). No Kubernetes
credentials: assignments and heartbeats live in object storage.

- A shard that leaves the assignments is aborted (its batch was cancelled or expired,
  or the operator moved it): in-flight requests are cancelled inside the engine and
  what finished is flushed; the pod keeps serving the other shards.
- Idle (nothing assigned, nothing running) for `idle_seconds`: it says so in its
  heartbeat and exits 0, so the pool scales to zero.
- SIGTERM (eviction, preemption): every shard flushes, the final heartbeat is written,
  exit 0; the operator re-assigns what was unfinished and the next member resumes it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from vbatch.core.pool_layout import Assignments, Heartbeat, ShardRef, ShardReport, assignments_key, heartbeat_key
from vbatch.core.storage import ObjectNotFound, ObjectStore
from vbatch.worker.admission import Admission

log = logging.getLogger("vbatch.worker.pool")

RunShard = Callable[..., Awaitable[dict[str, Any]]]


@dataclass
class _Run:
    ref: ShardRef
    abort: asyncio.Event
    task: asyncio.Task[None]


class PoolMember:
    def __init__(self, store: ObjectStore, run_shard: RunShard, admission: Admission, *, pool: str, member: str,
                 stop: asyncio.Event, poll_seconds: float, idle_seconds: float) -> None:
        self.store = store
        self.run_shard = run_shard
        self.admission = admission
        self.pool, self.member = pool, member
        self.stop = stop
        self.poll_seconds = poll_seconds
        self.idle_seconds = idle_seconds
        self.runs: dict[str, _Run] = {}
        self.done: dict[str, ShardReport] = {}
        self.applied = -1
        self.exiting = False
        self.wake = asyncio.Event()

    def _read_assignments(self) -> Assignments:
        try:
            return Assignments.model_validate_json(self.store.get_bytes(assignments_key(self.pool, self.member)))
        except ObjectNotFound:
            return Assignments(version=-1)

    async def _heartbeat(self) -> None:
        beat = Heartbeat(member=self.member, at=time.time(), loaded=True, applied_version=self.applied,
                         running=sorted(self.runs), done=dict(self.done), exiting=self.exiting)
        await asyncio.to_thread(self.store.put_bytes, heartbeat_key(self.pool, self.member),
                                beat.model_dump_json().encode())

    async def _run(self, ref: ShardRef, abort: asyncio.Event) -> None:
        try:
            result = await self.run_shard(ref.project, ref.batch_id, ref.shard, admission=self.admission,
                                          abort=abort, stop=self.stop)
            report = ShardReport(finished=bool(result["finished"]), aborted=abort.is_set(),
                                 completed=result.get("completed", 0), failed=result.get("failed", 0))
        except Exception as exc:  # storage down, shard missing: the operator decides
            log.error("shard %s of %s: %s", ref.shard, ref.batch_id, exc)
            report = ShardReport(finished=False, aborted=abort.is_set(), error=f"{type(exc).__name__}: {exc}")
        self.done[ref.key] = report
        self.runs.pop(ref.key, None)
        self.wake.set()

    def _apply(self, assignments: Assignments) -> None:
        aborted = set(assignments.aborted)
        wanted = {ref.key: ref for ref in assignments.shards if ref.batch_id not in aborted}
        for key, run in self.runs.items():
            if key not in wanted and not run.abort.is_set():
                log.info("shard %s of %s left this member's assignments: aborting it", run.ref.shard, run.ref.batch_id)
                run.abort.set()
        if not self.exiting:
            for key, ref in wanted.items():
                if key not in self.runs and key not in self.done:
                    abort = asyncio.Event()
                    task = asyncio.create_task(self._run(ref, abort), name=f"shard-{key}")
                    self.runs[key] = _Run(ref, abort, task)
        # Reports the operator has taken in (the shard left the assignments) are dropped.
        listed = {ref.key for ref in assignments.shards}
        self.done = {k: v for k, v in self.done.items() if k in listed}
        self.applied = assignments.version

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        idle_since = loop.time()
        await self._heartbeat()
        while not self.stop.is_set():
            assignments = await asyncio.to_thread(self._read_assignments)
            self._apply(assignments)
            # Shards already reported on do not keep it busy: the operator may simply
            # not have taken the report in yet.
            if self.runs or any(ref.key not in self.done for ref in assignments.shards):
                idle_since = loop.time()
            elif loop.time() - idle_since >= self.idle_seconds:
                self.exiting = True
                log.info("idle for %.0fs: leaving the pool", self.idle_seconds)
            await self._heartbeat()
            if self.exiting:
                # One last look: an assignment made just before our heartbeat said
                # "exiting" would otherwise wait for the operator to notice we left.
                last = await asyncio.to_thread(self._read_assignments)
                if all(ref.key in self.done for ref in last.shards):
                    break
                self.exiting = False
                continue
            self.wake.clear()
            waits = {asyncio.ensure_future(self.stop.wait()), asyncio.ensure_future(self.wake.wait())}
            await asyncio.wait(waits, timeout=self.poll_seconds, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
        if self.runs:  # SIGTERM: every shard flushes (stop is shared), then report
            await asyncio.gather(*(r.task for r in list(self.runs.values())), return_exceptions=True)
        self.exiting = True
        await self._heartbeat()
