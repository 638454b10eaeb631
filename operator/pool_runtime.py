"""Cluster runtime with warm per-model pools: a ShardRuntime (vbatch.core.runtime).

Instead of one Indexed Job per batch, each model has a pool of up to its catalog
`max_replicas` member pods (one batch/v1 Job each, see pool_builders) that load the
model once and run shards of ANY batch of that model, many at once.

Who runs which shard is an assignment the operator makes and writes to object
storage (vbatch.core.pool_layout); members read it and report in their heartbeat.
Why assignments and not leases: the operator already sees the pods (Kubernetes
tells it when a member's Job failed or vanished), it is the only writer of every
assignment, and a lease taken by workers would need a compare-and-swap that object
storage does not offer — and Kubernetes leases would give every worker API rights.
A member whose Job ended holding shards, or whose heartbeat is older than the lease
(`pool_lease_seconds`; its Job is then deleted, fencing it), loses them: they are
assigned again (a new epoch) and the next member resumes each from its parts. If
two members ever run one shard, the merge keeps the first result per custom_id.

Fair share: shards waiting for a member are handed out round-robin across
projects, then batches (vbatch.core.fair); inside a member the engine admits
requests the same way. Growth: a new member is created when every live member
holds `pool_target_shards` shards and the pool is below max_replicas; members leave
by themselves after `pool_idle_seconds` without work (scale to zero).

Everything here is rebuilt from object storage after an operator restart, except
the retry counts (a restart grants a shard its retries again).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vbatch.core import lifecycle
from vbatch.core.config import Settings
from vbatch.core.fair import FairQueue
from vbatch.core.ids import batch_object_name
from vbatch.core.pool_layout import (
    Assignments,
    Heartbeat,
    ShardRef,
    assignments_key,
    heartbeat_key,
    member_prefix,
    members_prefix,
)
from vbatch.core.runtime import ShardsSeen
from vbatch.core.schemas import BatchRecord
from vbatch.core.storage.base import ObjectNotFound, ObjectStore
from vbatch.operator import pool_builders
from vbatch.operator.config import WorkerPodConfig

try:  # vbatch_engine_loads_total (core/metrics.py, helper "ops")
    from vbatch.core import metrics
except ImportError:  # pragma: no cover - until that module lands
    metrics = None  # type: ignore[assignment]

log = logging.getLogger("vbatch.operator.pool")

REFRESH_SECONDS = 0.5  # at most this often per pool: read member Jobs and heartbeats


@dataclass
class Member:
    name: str
    pool: str
    model: str
    assignments: Assignments
    beat: Heartbeat | None = None
    ended: bool = False
    # When (operator's monotonic clock) the heartbeat last changed: the lease is judged
    # on this clock alone, so skew between the pod's and the operator's clocks is harmless.
    beat_changed: float = 0.0

    def refs_of(self, batch_id: str) -> list[ShardRef]:
        return [r for r in self.assignments.shards if r.batch_id == batch_id]


@dataclass
class Book:
    """One batch, as far as pools are concerned."""

    record: BatchRecord
    succeeded: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)
    attempts: dict[int, int] = field(default_factory=dict)
    epochs: dict[int, int] = field(default_factory=dict)
    holders: dict[int, str] = field(default_factory=dict)
    announced: set[tuple[int, str]] = field(default_factory=set)
    stopping: bool = False
    stop_versions: dict[str, int] = field(default_factory=dict)  # member -> assignments version


class PoolRuntime:
    def __init__(self, *, kube: Any, store: ObjectStore, settings: Settings, worker: WorkerPodConfig,
                 max_replicas: Callable[[str], int], model_gpus: dict[str, int] | None = None) -> None:
        self.kube = kube
        self.store = store
        self.settings = settings
        self.worker = worker
        self.max_replicas = max_replicas
        self.model_gpus = model_gpus or {}
        self.max_attempts = settings.shard_max_attempts
        self.members: dict[str, dict[str, Member]] = {}  # pool -> name -> member
        self.waiting: dict[str, FairQueue[ShardRef]] = {}
        self.models: dict[str, str] = {}  # pool -> model id
        self.books: dict[str, Book] = {}
        self.engine_loads: dict[str, int] = {}  # model -> members created (each loads it once)
        self._refreshed: dict[str, float] = {}
        self._lock = threading.RLock()

    # --- ShardRuntime --------------------------------------------------------------

    def run(self, record: BatchRecord) -> None:
        with self._lock:
            pool, book = self._pool(record), self._book(record)
            if book.stopping:
                return
            self._refresh(pool)
            self._take_progress(book)
            assigned = {r.shard for m in self.members[pool].values() if not m.ended for r in m.refs_of(record.id)}
            queued = {r.shard for r in self.waiting[pool] if r.batch_id == record.id}
            for shard in range(record.shard_count or 0):
                if shard not in book.succeeded | book.failed | assigned | queued:
                    self.waiting[pool].push(record.project, record.id, self._ref(book, shard))
            self._schedule(pool, record.model or "")

    def observe(self, record: BatchRecord) -> ShardsSeen:
        with self._lock:
            pool, book = self._pool(record), self._book(record)
            self._refresh(pool)
            self._take_progress(book)
            return ShardsSeen(succeeded=frozenset(book.succeeded), failed=frozenset(book.failed - book.succeeded),
                              holders=dict(book.holders), attempts=dict(book.attempts))

    def stop(self, record: BatchRecord) -> bool:
        with self._lock:
            pool, book = self._pool(record), self._book(record)
            book.stopping = True
            self.waiting[pool].remove_batch(record.id)
            for member in self.members[pool].values():
                refs = member.refs_of(record.id)
                if refs and not member.ended:
                    member.assignments.shards = [r for r in member.assignments.shards if r.batch_id != record.id]
                    if record.id not in member.assignments.aborted:
                        member.assignments.aborted.append(record.id)
                    self._write(member)
                    book.stop_versions[member.name] = member.assignments.version
            self._refresh(pool, force=True)
            return all(self._stopped_on(self.members[pool].get(name), record.id, version)
                       for name, version in book.stop_versions.items())

    def release(self, record: BatchRecord) -> bool:
        with self._lock:
            if not self.stop(record):
                return False
            for member in self.members[self._pool(record)].values():
                if record.id in member.assignments.aborted and not member.ended:
                    member.assignments.aborted.remove(record.id)
                    self._write(member)
            self.books.pop(record.id, None)
            return True

    # --- bookkeeping -------------------------------------------------------------------

    def _pool(self, record: BatchRecord) -> str:
        pool = pool_builders.pool_name(record.model or "")
        if pool not in self.members:
            self.members[pool] = self._load_members(pool, record.model or "")
            self.waiting[pool] = FairQueue()
            self.models[pool] = record.model or ""
        return pool

    def _load_members(self, pool: str, model: str) -> dict[str, Member]:
        """After a restart: the members (and their assignments) the store remembers."""
        members: dict[str, Member] = {}
        for key in self.store.list(members_prefix(pool)):
            if not key.endswith("/assignments.json"):
                continue
            name = key[len(members_prefix(pool)):].split("/", 1)[0]
            try:
                assignments = Assignments.model_validate_json(self.store.get_bytes(key))
            except (ObjectNotFound, ValueError):
                continue
            members[name] = Member(name, pool, model, assignments)
        return members

    def _book(self, record: BatchRecord) -> Book:
        book = self.books.get(record.id)
        if book is None:
            book = self.books[record.id] = Book(record)
            for member in self.members.get(self._pool(record), {}).values():
                for ref in member.refs_of(record.id):  # a restart: adopt what is assigned
                    book.epochs[ref.shard] = max(book.epochs.get(ref.shard, 0), ref.epoch)
                    book.holders[ref.shard] = member.name
        book.record = record
        return book

    def _ref(self, book: Book, shard: int) -> ShardRef:
        epoch = book.epochs[shard] = book.epochs.get(shard, -1) + 1
        return ShardRef(project=book.record.project, batch_id=book.record.id, shard=shard, epoch=epoch)

    def _take_progress(self, book: Book) -> None:
        for shard, progress in enumerate(lifecycle.read_progress(self.store, book.record)):
            if progress is not None and progress.finished:
                book.succeeded.add(shard)

    def _write(self, member: Member) -> None:
        member.assignments.version += 1
        self.store.put_bytes(assignments_key(member.pool, member.name), member.assignments.model_dump_json().encode())

    def _stopped_on(self, member: Member | None, batch_id: str, version: int) -> bool:
        if member is None or member.ended or member.beat is None:
            return True  # gone, or never started (its first read sees the removal)
        beat = member.beat
        return beat.applied_version >= version and not any(k.startswith(batch_id + ":") for k in beat.running)

    # --- members -------------------------------------------------------------------------

    def _refresh(self, pool: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._refreshed.get(pool, 0.0) < REFRESH_SECONDS:
            return
        self._refreshed[pool] = now
        for member in list(self.members[pool].values()):
            job = self.kube.get_job(member.name)
            ended, failed = pool_builders.job_ended(job)
            beat = self._read_beat(member)
            if beat is not None and (member.beat is None or beat.at != member.beat.at):
                member.beat_changed = now
            member.beat = beat
            silent = now - member.beat_changed
            if not ended and beat is not None and not beat.exiting and silent > self.settings.pool_lease_seconds:
                log.warning("pool member %s: no heartbeat for %.0fs; its shards move", member.name, silent)
                self.kube.delete_job(member.name)  # fence it: a hung pod must not keep writing
                ended, failed = True, True
            self._take_reports(member, ended, failed)
            if ended:
                self._retire(member, failed, job is not None)
        self._schedule(pool, self.models[pool])

    def _read_beat(self, member: Member) -> Heartbeat | None:
        try:
            return Heartbeat.model_validate_json(self.store.get_bytes(heartbeat_key(member.pool, member.name)))
        except (ObjectNotFound, ValueError):
            return None

    def _take_reports(self, member: Member, ended: bool, failed: bool) -> None:
        """Shards the member reported on leave its assignments; failures are retried."""
        done = member.beat.done if member.beat is not None else {}
        kept: list[ShardRef] = []
        for ref in member.assignments.shards:
            report = done.get(ref.key)
            if report is None and not ended:
                kept.append(ref)
                continue
            book = self.books.get(ref.batch_id)
            if book is None or book.stopping:
                continue
            if report is not None and report.finished:
                book.succeeded.add(ref.shard)
            elif report is not None and report.aborted:
                continue
            else:
                # An error report, or the member ended holding it.
                # (A member that left cleanly — idle, deleted — costs no attempt.)
                if report is not None or failed:
                    book.attempts[ref.shard] = book.attempts.get(ref.shard, 0) + 1
                if book.attempts.get(ref.shard, 0) >= self.max_attempts:
                    log.error("batch %s shard %d failed %d times; giving up", ref.batch_id, ref.shard,
                              self.max_attempts)
                    book.failed.add(ref.shard)
                else:
                    self.waiting[member.pool].push(ref.project, ref.batch_id, self._ref(book, ref.shard))
        if len(kept) != len(member.assignments.shards) and not ended:
            member.assignments.shards = kept
            self._write(member)

    def _retire(self, member: Member, failed: bool, job_exists: bool) -> None:
        log.info("pool member %s left (%s)", member.name, "failed" if failed else "done")
        if job_exists:
            self.kube.delete_job(member.name)
        self.store.delete_prefix(member_prefix(member.pool, member.name))
        del self.members[member.pool][member.name]
        member.ended = True

    def _schedule(self, pool: str, model: str) -> None:
        waiting = self.waiting[pool]
        live = [m for m in self.members[pool].values() if not m.ended and not (m.beat and m.beat.exiting)]
        dirty: dict[str, Member] = {}
        while waiting:
            ref = waiting.peek()
            book = self.books.get(ref.batch_id)
            if book is None or book.stopping or ref.shard in book.succeeded:
                waiting.pop()
                continue
            live.sort(key=lambda m: len(m.assignments.shards))
            target = live[0] if live and len(live[0].assignments.shards) < self.settings.pool_target_shards else None
            if target is None and len(self.members[pool]) < self.max_replicas(model):
                target = self._grow(pool, model)
                live.append(target)
            if target is None and live and len(live[0].assignments.shards) < self.settings.worker_max_shards:
                target = live[0]
            if target is None:
                return  # every member is full: the shard waits (fairly) for room
            waiting.pop()
            target.assignments.shards.append(ref)
            dirty[target.name] = target
            self._announce(book, ref.shard, target.name)
        for member in dirty.values():
            self._write(member)

    def _grow(self, pool: str, model: str) -> Member:
        name = pool_builders.new_member_name(pool)
        member = Member(name, pool, model, Assignments())
        self._write(member)  # first: a restarted operator must know every member it made
        worker = self.worker
        if model in self.model_gpus:
            worker = worker.model_copy(update={"gpus": self.model_gpus[model]})
        self.kube.create_job(pool_builders.build_pool_job(
            pool=pool, member=name, model=model, namespace=self.kube.namespace, worker=worker,
            idle_seconds=self.settings.pool_idle_seconds, poll_seconds=self.settings.pool_poll_seconds))
        self.members[pool][name] = member
        self.engine_loads[model] = self.engine_loads.get(model, 0) + 1
        if metrics is not None:
            metrics.engine_loaded(model)  # each member loads the model once
        log.info("pool %s grows: member %s (engine load #%d of model %s)", pool, name,
                 self.engine_loads[model], model)
        return member

    def _announce(self, book: Book, shard: int, member: str) -> None:
        book.holders[shard] = member
        if (shard, member) in book.announced:
            return
        book.announced.add((shard, member))
        try:
            obj = self.kube.get_batch(batch_object_name(book.record.id))
            if obj is not None:
                self.kube.post_event(obj, "Assigned", f"shard {shard} runs on pool pod of Job {member}")
        except Exception as exc:  # best effort, like every event
            log.warning("event for batch %s: %s", book.record.id, exc)
