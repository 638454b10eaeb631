"""Warm per-model pools in the emulated cluster: the PoolRuntime driven the way the
one driver drives a ShardRuntime (run/observe every round, stop on cancel, release
at the end), the job runner playing the Job controller with real worker processes."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
from kube.fixtures import KubeCluster
from kube.job_runner import JobRunner
from vbatch.core import layout, state
from vbatch.core.config import Settings
from vbatch.core.ids import batch_object_name
from vbatch.core.schemas import BatchRecord
from vbatch.core.storage.local import LocalObjectStore
from vbatch.operator import builders
from vbatch.operator.config import WorkerPodConfig
from vbatch.operator.kube import Kube, api_client
from vbatch.operator.pool_runtime import PoolRuntime

MODEL = "demo-model"


class PoolEnv:
    def __init__(self, cluster: KubeCluster, tmp: Path, monkeypatch, *, max_replicas: int = 2,
                 idle: float = 30.0, delay: float = 0.01, lease: float = 60.0) -> None:
        monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
        data = tmp / "data"
        worker_env = {"VBATCH_DATA_DIR": str(data), "VBATCH_STORAGE": "local", "VBATCH_ENGINE": "echo",
                      "VBATCH_ECHO_DELAY_PER_TOKEN": str(delay), "VBATCH_ECHO_MAX_IN_FLIGHT": "8",
                      "VBATCH_PART_MAX_RESULTS": "5", "VBATCH_PART_MAX_SECONDS": "0.2"}
        self.settings = Settings(data_dir=data, engine="echo", pool_idle_seconds=idle, pool_poll_seconds=0.2,
                                 pool_lease_seconds=lease,
                                 pool_target_shards=4)
        self.store = LocalObjectStore(self.settings.storage_dir)
        self.cluster = cluster
        self.kube = Kube(api_client("operator"), cluster.namespace)
        worker = WorkerPodConfig(image="vbatch:test", gpus=0, env=worker_env)
        self.runtime = PoolRuntime(kube=self.kube, store=self.store, settings=self.settings, worker=worker,
                                   max_replicas=lambda model: max_replicas)
        self.runner = JobRunner(cluster, tmp / "pods")

    def batch(self, n: int, project: str = "proj", shards: int = 1) -> BatchRecord:
        record = state.new_batch(project=project, input_file_id="file-x", endpoint="/v1/chat/completions",
                                 completion_window="24h", metadata=None, total=n * shards, model=MODEL,
                                 window_seconds=3600, now=int(time.time()))
        record = record.model_copy(update={"shard_count": shards})
        for shard in range(shards):
            lines = [{"custom_id": f"{record.id}-{shard}-{i}", "method": "POST", "url": "/v1/chat/completions",
                      "body": {"model": MODEL, "messages": [{"role": "user", "content": "a b c d"}]}}
                     for i in range(n)]
            self.store.put_bytes(layout.shard_key(project, record.id, shard),
                                 b"".join(orjson.dumps(x) + b"\n" for x in lines))
        return record

    def drive(self, records: list[BatchRecord], until, timeout: float = 90) -> None:
        """What the driver does each round, until `until()` holds."""
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, {r.id: self.runtime.observe(r) for r in records}
            for record in records:
                seen = self.runtime.observe(record)
                if len(seen.succeeded | seen.failed) < (record.shard_count or 0):
                    self.runtime.run(record)
            time.sleep(0.2)

    def done(self, record: BatchRecord) -> bool:
        seen = self.runtime.observe(record)
        return len(seen.succeeded) == record.shard_count

    def results(self, record: BatchRecord, shard: int = 0) -> Counter:
        ids: Counter = Counter()
        for key in self.store.list(layout.results_prefix(record.project, record.id, shard)):
            for raw in self.store.get_bytes(key).splitlines():
                ids[orjson.loads(raw)["custom_id"]] += 1
        return ids

    def pool_jobs_ever(self) -> int:
        uids = set()
        for job in self.runner.launched:
            uids.add(job[0])
        return len(uids)

    def engine_loads_in_logs(self) -> int:
        return sum(p.read_text(errors="replace").count("engine echo loaded") for p in (self.runner.logs).glob("*.log"))


@pytest.fixture
def pool_env(kube_cluster, tmp_path, monkeypatch):
    envs: list[PoolEnv] = []

    def make(**kwargs) -> PoolEnv:
        envs.append(PoolEnv(kube_cluster, tmp_path, monkeypatch, **kwargs))
        envs[-1].runner.__enter__()
        return envs[-1]

    yield make
    for env in envs:
        env.runner.__exit__(None, None, None)


@pytest.mark.timeout(180)
def test_twenty_small_batches_share_at_most_max_replicas_warm_pods(pool_env):
    env = pool_env(max_replicas=2, idle=2.0)
    records = [env.batch(6, project=f"proj-{i % 3}") for i in range(20)]
    env.drive(records, lambda: all(env.done(r) for r in records))

    for record in records:
        assert env.results(record) == Counter(f"{record.id}-0-{i}" for i in range(6))
    assert env.runtime.engine_loads == {MODEL: env.pool_jobs_ever()}
    # 20 shards at 4 per member: the pool grew to its maximum, and no further.
    assert env.pool_jobs_ever() == 2
    assert env.engine_loads_in_logs() <= 2
    # Idle members leave by themselves (scale to zero), and the runtime forgets them.
    env.runner.wait_idle(timeout=30)
    deadline = time.monotonic() + 30
    while any(env.runtime.members.values()):
        assert time.monotonic() < deadline, env.runtime.members
        env.runtime.observe(records[0])
        time.sleep(0.2)
    for record in records:
        assert env.runtime.release(record)


@pytest.mark.timeout(180)
def test_a_pool_pod_killed_mid_shard_is_resumed_by_another_exactly_once(pool_env):
    env = pool_env(max_replicas=1, delay=0.03)
    record = env.batch(120)
    env.runtime.run(record)
    deadline = time.monotonic() + 60
    while not list(env.store.list(layout.results_prefix(record.project, record.id, 0))):
        assert time.monotonic() < deadline, "no part written"
        env.runtime.run(record)
        time.sleep(0.1)
    (first,) = list(env.runner.procs)
    env.runner.procs[first].kill()  # kill -9 of the only pool pod

    env.drive([record], lambda: env.done(record))
    assert env.results(record) == Counter(f"{record.id}-0-{i}" for i in range(120))
    pods = list(env.runner.procs)
    assert len(pods) == 2 and pods[0] == first
    seen = env.runtime.observe(record)
    assert seen.holders[0] != first.rsplit("-", 2)[0] and seen.attempts == {0: 1}


@pytest.mark.timeout(180)
def test_cancelling_one_batch_stops_only_its_shards_on_the_shared_pod(pool_env, kube_cluster):
    env = pool_env(max_replicas=1, delay=0.03)
    doomed, kept = env.batch(200), env.batch(60)
    for record in (doomed, kept):
        kube_cluster.create(builders.build_batch_resource(record, kube_cluster.namespace))
        env.runtime.run(record)
    deadline = time.monotonic() + 60
    while not list(env.store.list(layout.results_prefix(doomed.project, doomed.id, 0))):
        assert time.monotonic() < deadline, "no part written"
        env.runtime.run(kept)
        time.sleep(0.1)

    while not env.runtime.stop(doomed):
        assert time.monotonic() < deadline + 30
        time.sleep(0.1)
    partial = env.results(doomed)
    assert 0 < len(partial) < 200 and set(partial.values()) == {1}
    env.drive([kept], lambda: env.done(kept))
    assert env.results(kept) == Counter(f"{kept.id}-0-{i}" for i in range(60))
    assert len(env.runner.procs) == 1  # the same pod served both, and still serves
    assert all(p.poll() is None for p in env.runner.procs.values())
    # Like the driver's clean-up, ask again until the pod's heartbeat confirms it let
    # both go (one call right after the last result may come before that heartbeat).
    deadline = time.monotonic() + 30
    while not (env.runtime.release(doomed) and env.runtime.release(kept)):
        assert time.monotonic() < deadline, "the pool never confirmed it let go of both batches"
        time.sleep(0.1)
    # `kubectl describe batch` lists which pool pod ran its shards.
    events = [e for e in kube_cluster.list("v1", "Event") if e["involvedObject"]["name"] == batch_object_name(kept.id)]
    (member,) = env.runtime.members[next(iter(env.runtime.members))]
    assert any(e["reason"] == "Assigned" and member in e["message"] for e in events)


@pytest.mark.timeout(180)
def test_a_hung_pool_pod_loses_its_lease_and_another_resumes_its_shard(pool_env):
    env = pool_env(max_replicas=1, delay=0.03, lease=2.0)
    record = env.batch(120)
    deadline = time.monotonic() + 60
    while not list(env.store.list(layout.results_prefix(record.project, record.id, 0))):
        assert time.monotonic() < deadline, "no part written"
        env.runtime.run(record)
        time.sleep(0.1)
    (hung,) = list(env.runner.procs)
    os.kill(env.runner.procs[hung].pid, signal.SIGSTOP)  # alive, but silent: no heartbeat
    try:
        env.drive([record], lambda: env.done(record))
        assert env.results(record) == Counter(f"{record.id}-0-{i}" for i in range(120))
        # Its Job was deleted (fenced) and a new member took the shard over.
        assert len(env.runner.procs) == 2
        jobs = {j["metadata"]["name"] for j in env.cluster.list("batch/v1", "Job")
                if not j["metadata"].get("deletionTimestamp")}
        assert hung.rsplit("-", 2)[0] not in jobs
    finally:
        os.kill(env.runner.procs[hung].pid, signal.SIGKILL)
