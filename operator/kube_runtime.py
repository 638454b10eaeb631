"""The Kubernetes shard runtime: a batch's shards run as ONE Indexed Job, pod i on
shard i, each index retried `shard_max_attempts - 1` times (backoffLimitPerIndex).

Stateless: every call reads the Job (and the Batch, to own the Job) from the API
server, so an operator restarted at any point, or its peer, carries on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vbatch.core import lifecycle
from vbatch.core.config import Settings
from vbatch.core.ids import batch_object_name
from vbatch.core.runtime import ShardsSeen
from vbatch.core.schemas import BatchRecord
from vbatch.core.storage.base import ObjectStore
from vbatch.operator import builders
from vbatch.operator.config import WorkerPodConfig
from vbatch.operator.kube import Kube
from vbatch.operator.observe import completed_indexes, failed_indexes


class KubeRuntime:
    def __init__(self, *, kube: Kube, store: ObjectStore, settings: Settings, worker: WorkerPodConfig,
                 model_gpus: Mapping[str, int] | None = None) -> None:
        self.kube = kube
        self.store = store
        self.settings = settings
        self.worker = worker
        self.model_gpus = dict(model_gpus or {})

    def observe(self, record: BatchRecord) -> ShardsSeen:
        job = self.kube.get_job(self._job_name(record))
        if job is None:
            # The Job is gone (deleted by hand, or not created yet): shards whose progress
            # says finished are done; `run` (re)creates the Job for the others.
            progress = lifecycle.read_progress(self.store, record)
            return ShardsSeen(succeeded=frozenset(i for i, p in enumerate(progress) if p is not None and p.finished))
        return ShardsSeen(succeeded=completed_indexes(job), failed=failed_indexes(job))

    def run(self, record: BatchRecord) -> None:
        name = batch_object_name(record.id)
        if self.kube.get_job(self._job_name(record)) is not None:
            return
        obj = self.kube.get_batch(name)
        if obj is None:
            return
        body = self._job(obj, record)
        _, created = self.kube.create_job(body)  # an existing Job is adopted, never doubled
        if created:
            self.kube.post_event(obj, "Launched", f"job {body['metadata']['name']}: {record.shard_count} shard(s)")

    def stop(self, record: BatchRecord) -> bool:
        # Deleting the Job deletes its pods; each worker gets SIGTERM and flushes what it
        # finished. Only once no pod remains is every part that will ever exist written.
        if self.kube.delete_job(self._job_name(record)):
            return False
        return self.kube.count_pods(batch_object_name(record.id)) == 0

    def release(self, record: BatchRecord) -> bool:
        return self.stop(record)

    def _job_name(self, record: BatchRecord) -> str:
        return builders.job_name(batch_object_name(record.id))

    def _job(self, obj: dict[str, Any], record: BatchRecord) -> dict[str, Any]:
        shards = record.shard_count or 1
        gpus = self.model_gpus.get(record.model or "")
        worker = self.worker if gpus is None else self.worker.model_copy(update={"gpus": gpus})
        return builders.build_shard_job(
            batch_name=obj["metadata"]["name"], batch_uid=obj["metadata"]["uid"], namespace=self.kube.namespace,
            project=record.project, batch_id=record.id, model=record.model or "", shard_count=shards,
            parallelism=(obj.get("spec") or {}).get("parallelism") or shards, worker=worker,
            max_attempts=self.settings.shard_max_attempts,
        )
