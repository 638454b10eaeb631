"""Stands in for the Job controller and the kubelet in the emulated cluster.

Polls the emulator's Jobs; for each Indexed Job it starts one local process per
index (the pod's container command, `vbatch ...` run as `python -m vbatch.cli ...`, with
the pod's env plus JOB_COMPLETION_INDEX), at most `parallelism` at once (and at most
`capacity` pods cluster-wide: a cluster with few GPUs), retries a failed index up to
backoffLimitPerIndex, and writes Job status through the status subresource the way
the real controller does (completedIndexes/failedIndexes interval strings,
succeeded/failed/active, Complete/Failed conditions).

Pods are real objects too, with a finalizer playing the kubelet: deleting a Pod
(directly, or through the Job's deletion) marks it terminating, its process gets
SIGTERM, and only after the process exited does the Pod disappear — so "no pods of
this Job remain" means what it means on a real cluster.

The Job controller's failure handling follows pkg/controller/job (Kubernetes 1.32):
- a failed pod of an index is matched against `podFailurePolicy` (onExitCodes,
  onPodConditions; Ignore / FailIndex / FailJob / Count), Ignore not counting;
- each index counts its own failures (the pods' `batch.kubernetes.io/job-index-failure-count`
  annotation); past `backoffLimitPerIndex` the index is in `failedIndexes`, else it is
  recreated after the per-index back-off, `base * 2^(failures-1)` capped at 10 min (the
  controller's base is 10 s; tests pass a shorter one);
- more failed indexes than `maxFailedIndexes`, or a FailJob rule, fail the Job at once
  (its running pods are terminated);
- terminal conditions arrive as in 1.31+: `SuccessCriteriaMet`/`FailureTarget` first,
  `Complete`/`Failed` once no pod of the Job runs any more.

With a `kubelet` (tests/support/kube/kubelet.py), pods run as containers from the image
their spec names instead of local processes: the image tests.

Fault injection: `fail(job, index, attempt) -> bool` decides that an attempt fails
(exit code 1) without running the worker; see `fail_once` / `fail_always`.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fixtures import KubeCluster
from .kubelet import Kubelet, PodSpecError
from .store import now_rfc3339

KUBELET_FINALIZER = "vbatch.test/kubelet"
JOB_API = ("batch/v1", "Job")
POD_API = ("v1", "Pod")
FailHook = Callable[[str, int, int], bool]


def fail_once(*indexes: int) -> FailHook:
    return lambda job, index, attempt: index in indexes and attempt == 0


def fail_always(*indexes: int) -> FailHook:
    return lambda job, index, attempt: index in indexes


def format_indexes(indexes: set[int]) -> str:
    """{0,1,2,5} -> "0-2,5" (the Job API's interval notation)."""
    out: list[str] = []
    for i in sorted(indexes):
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in out)  # type: ignore[misc]


MAX_POD_FAILURE_BACKOFF = 600.0  # the Job controller's MaxJobPodFailureBackOff
INDEX_FAILURE_COUNT = "batch.kubernetes.io/job-index-failure-count"
INDEX_IGNORED_FAILURE_COUNT = "batch.kubernetes.io/job-index-ignored-failure-count"


@dataclass
class JobState:
    name: str
    uid: str
    completions: int
    parallelism: int
    backoff: int
    pending: list[int]
    max_failed: int | None = None
    failure_policy: dict[str, Any] | None = None
    running: dict[int, str] = field(default_factory=dict)  # index -> pod name
    attempts: dict[int, int] = field(default_factory=dict)  # pods started per index
    failures: dict[int, int] = field(default_factory=dict)  # counted failures per index
    ignored: dict[int, int] = field(default_factory=dict)  # failures the policy ignored
    not_before: dict[int, float] = field(default_factory=dict)  # per-index back-off
    completed: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)
    failed_pods: int = 0
    # (reason, message) once the Job must fail as a whole (FailJob rule, too many failed indexes)
    failure_target: tuple[str, str] | None = None
    start_time: str | None = None
    written: dict[str, Any] | None = None


def failure_action(policy: dict[str, Any] | None, exit_code: int, conditions: list[dict[str, Any]]) -> str:
    """The podFailurePolicy action for a failed pod: the first rule that matches, else Count."""
    for rule in (policy or {}).get("rules") or []:
        codes = rule.get("onExitCodes")
        if codes is not None:
            inside = exit_code in (codes.get("values") or [])
            if (codes.get("operator") == "In") == inside and exit_code != 0:
                return rule["action"]
            continue
        for wanted in rule.get("onPodConditions") or []:
            if any(c.get("type") == wanted.get("type") and c.get("status") == wanted.get("status", "True")
                   for c in conditions):
                return rule["action"]
    return "Count"


def index_backoff(base: float, failures: int) -> float:
    """The delay before an index's next pod: base * 2^(failures-1), capped (job controller)."""
    if failures <= 0:
        return 0.0
    return min(base * 2 ** (failures - 1), MAX_POD_FAILURE_BACKOFF)


class JobRunner:
    def __init__(self, cluster: KubeCluster, logs: Path, *, fail: FailHook | None = None,
                 capacity: int = 8, poll: float = 0.1, backoff_base: float = 10.0,
                 kubelet: Kubelet | None = None) -> None:
        self.cluster = cluster
        self.backoff_base = backoff_base
        self.logs = logs
        self.fail = fail or (lambda job, index, attempt: False)
        self.capacity = capacity
        self.poll = poll
        self.kubelet = kubelet
        self.pod_errors: dict[str, str] = {}  # pod -> why its container could not be created
        self.jobs: dict[str, JobState] = {}  # by Job uid
        self.procs: dict[str, subprocess.Popen[bytes]] = {}  # by pod name
        self.terminated: set[str] = set()
        self.launched: list[tuple[str, int]] = []  # (job, index) per attempt, for assertions
        self.launched_at: list[float] = []  # time.monotonic() of each launch, same order
        self.failed_at: dict[tuple[str, int], list[float]] = {}  # when each index's pods failed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="job-runner", daemon=True)
        logs.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> JobRunner:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.kubelet is not None:  # the engine's client may go before its container
            for name in self.procs:
                self.kubelet.remove(name)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._round()
            except Exception as exc:  # the emulator stopping under us ends the test anyway
                print(f"job-runner: {type(exc).__name__}: {exc}", file=sys.stderr)
            self._stop.wait(self.poll)

    # --- one round -------------------------------------------------------------------

    def _round(self) -> None:
        live = {job["metadata"]["uid"]: job for job in self.cluster.list(*JOB_API)}
        for uid, job in live.items():
            if uid not in self.jobs and not job["metadata"].get("deletionTimestamp"):
                spec = job["spec"]
                self.jobs[uid] = JobState(
                    name=job["metadata"]["name"], uid=uid, completions=spec["completions"],
                    parallelism=spec.get("parallelism", 1), backoff=spec.get("backoffLimitPerIndex", 6),
                    pending=list(range(spec["completions"])), max_failed=spec.get("maxFailedIndexes"),
                    failure_policy=spec.get("podFailurePolicy"), start_time=now_rfc3339())
        for uid in [u for u in self.jobs if u not in live]:
            del self.jobs[uid]  # deleted: its pods are terminating through the pod path below
        self._kubelet(set(live))
        for uid, state in self.jobs.items():
            if live[uid]["spec"].get("suspend"):
                continue
            self._reap(state)
            self._start(state, live[uid])
            self._write_status(state)

    def _kubelet(self, live_jobs: set[str]) -> None:
        """Terminating pods: SIGTERM their process once; drop the finalizer once it exited."""
        for pod in self.cluster.list(*POD_API):
            meta = pod["metadata"]
            name = meta["name"]
            owners = {ref["uid"] for ref in meta.get("ownerReferences") or []}
            if owners and not owners & live_jobs and not meta.get("deletionTimestamp"):
                # Created in the instant its Job was deleted: the garbage collector's job.
                self.cluster.delete(*POD_API, name)
                continue
            if not meta.get("deletionTimestamp") or KUBELET_FINALIZER not in (meta.get("finalizers") or []):
                continue
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                if name not in self.terminated:
                    self.terminated.add(name)
                    proc.send_signal(signal.SIGTERM)
                continue
            kept = [f for f in meta["finalizers"] if f != KUBELET_FINALIZER]
            self.cluster.patch(*POD_API, name, {"metadata": {"finalizers": kept or None}})

    def _reap(self, state: JobState) -> None:
        for index, pod in list(state.running.items()):
            code = self.procs[pod].poll()
            if code is None:
                continue
            del state.running[index]
            phase = "Succeeded" if code == 0 else "Failed"
            conditions: list[dict[str, Any]] = []
            try:
                obj = self.cluster.get(*POD_API, pod)
                conditions = (obj.get("status") or {}).get("conditions") or []
                image = obj["spec"]["containers"][0].get("image", "")
                self.cluster.patch_status(*POD_API, pod, {"phase": phase, "containerStatuses": [
                    {"name": "worker", "image": image, "imageID": "", "ready": False, "restartCount": 0,
                     "state": {"terminated": {"exitCode": code}}}]})
            except Exception:
                pass  # the pod is already being deleted
            if code == 0:
                state.completed.add(index)
                continue
            self.failed_at.setdefault((state.name, index), []).append(time.monotonic())
            if state.failure_target is not None:
                continue  # the Job is failing: its pods are being terminated, nothing is retried
            action = failure_action(state.failure_policy, code, conditions)
            if action == "Ignore":
                state.ignored[index] = state.ignored.get(index, 0) + 1
                state.pending.append(index)  # replaced at once, no retry spent
                continue
            state.failed_pods += 1
            state.failures[index] = state.failures.get(index, 0) + 1
            if action == "FailJob":
                state.failure_target = ("PodFailurePolicy", f"Pod {pod} matched a FailJob rule")
            elif action == "FailIndex" or state.failures[index] > state.backoff:
                state.failed.add(index)
                if state.max_failed is not None and len(state.failed) > state.max_failed:
                    state.failure_target = ("MaxFailedIndexesExceeded", "Job has exceeded the specified "
                                            "maximal number of failed indexes")
            else:
                state.not_before[index] = time.monotonic() + index_backoff(self.backoff_base, state.failures[index])
                state.pending.append(index)
        if state.failure_target is not None:
            state.pending.clear()
            for pod in state.running.values():  # the controller deletes a failing Job's pods
                try:
                    self.cluster.delete(*POD_API, pod)
                except Exception:
                    pass

    def _running_total(self) -> int:
        return sum(len(s.running) for s in self.jobs.values())

    def _start(self, state: JobState, job: dict[str, Any]) -> None:
        now = time.monotonic()
        while len(state.running) < state.parallelism and self._running_total() < self.capacity:
            ready = [i for i in state.pending if state.not_before.get(i, 0.0) <= now]
            if not ready:
                return
            index = ready[0]
            state.pending.remove(index)
            attempt = state.attempts.get(index, 0)
            state.attempts[index] = attempt + 1
            template = job["spec"]["template"]
            container = template["spec"]["containers"][0]
            pod_name = f"{state.name}-{index}-{secrets.token_hex(3)}"
            labels = dict(template["metadata"].get("labels") or {})
            labels.update({"batch.kubernetes.io/job-name": state.name, "job-name": state.name,
                           "batch.kubernetes.io/job-completion-index": str(index)})
            self.cluster.create({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod_name, "labels": labels, "finalizers": [KUBELET_FINALIZER],
                             "annotations": {"batch.kubernetes.io/job-completion-index": str(index),
                                             INDEX_FAILURE_COUNT: str(state.failures.get(index, 0)),
                                             INDEX_IGNORED_FAILURE_COUNT: str(state.ignored.get(index, 0))},
                             "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": state.name,
                                                  "uid": state.uid, "controller": True,
                                                  "blockOwnerDeletion": True}]},
                "spec": template["spec"],
            }, status={"phase": "Running"})
            env = {**os.environ, **{e["name"]: e["value"] for e in container.get("env") or []},
                   "JOB_COMPLETION_INDEX": str(index)}
            if self.fail(state.name, index, attempt):
                command = [sys.executable, "-c", "raise SystemExit(1)"]
            else:
                command = list(container["command"]) + list(container.get("args") or [])
                if command[0] == "vbatch":
                    command = [sys.executable, "-m", "vbatch.cli", *command[1:]]
            if self.kubelet is not None and not self.fail(state.name, index, attempt):
                self.procs[pod_name] = self._container(pod_name, template["spec"], index)
            else:
                log = open(self.logs / f"{pod_name}.log", "wb")
                self.procs[pod_name] = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
                log.close()
            state.running[index] = pod_name
            self.launched.append((state.name, index))
            self.launched_at.append(time.monotonic())

    def _container(self, pod_name: str, pod_spec: dict[str, Any], index: int) -> subprocess.Popen[bytes]:
        assert self.kubelet is not None
        try:
            return self.kubelet.start(pod_name, pod_spec, log=self.logs / f"{pod_name}.log",
                                      extra_env={"JOB_COMPLETION_INDEX": str(index)})
        except PodSpecError as exc:  # the pod fails, and the test can say why
            self.pod_errors[pod_name] = str(exc)
            return subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])

    def _write_status(self, state: JobState) -> None:
        status: dict[str, Any] = {
            "startTime": state.start_time,
            "active": len(state.running),
            "succeeded": len(state.completed),
            "failed": state.failed_pods,
            "completedIndexes": format_indexes(state.completed) or None,
            "failedIndexes": format_indexes(state.failed) or None,
        }
        target = state.failure_target
        if target is None and len(state.completed) + len(state.failed) >= state.completions and not state.pending:
            target = ("FailedIndexes", "Job has failed indexes") if state.failed else None
            if target is None:
                status["conditions"] = [{"type": "SuccessCriteriaMet", "status": "True",
                                         "reason": "CompletionsReached", "message": "Reached expected number of succeeded pods"}]
                if not state.running:
                    status["conditions"].append({"type": "Complete", "status": "True", "reason": "CompletionsReached",
                                                 "message": "Reached expected number of succeeded pods"})
                    status["completionTime"] = (state.written or {}).get("completionTime") or now_rfc3339()
        if target is not None and (state.failure_target is not None or not state.running):
            reason, message = target
            status["conditions"] = [{"type": "FailureTarget", "status": "True", "reason": reason, "message": message}]
            if not state.running:  # 1.31+: Failed only once every pod has terminated
                status["conditions"].append({"type": "Failed", "status": "True", "reason": reason, "message": message})
        status = {k: v for k, v in status.items() if v is not None}
        if status == state.written:
            return
        try:
            self.cluster.patch_status(*JOB_API, state.name, status)
            state.written = status
        except Exception:
            pass  # deleted meanwhile

    def wait_idle(self, timeout: float = 30) -> None:
        """Until no worker process is running (e.g. after a cancel)."""
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in self.procs.values()):
            if time.monotonic() > deadline:
                raise AssertionError("worker processes still running")
            time.sleep(0.1)
