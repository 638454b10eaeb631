"""The worker as a real process: killed with SIGKILL at random points and restarted,
every custom_id still ends in exactly one result line; SIGTERM flushes and exits 0."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest
from vbatch.core import layout
from vbatch.core.layout import ShardProgress
from vbatch.core.storage.local import LocalObjectStore

P, B = "proj", "batch_01JABCDEFGHJKMNPQRSTVWXYZ0"
N = 200


def env_for(data_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(VBATCH_DATA_DIR=str(data_dir), VBATCH_STORAGE="local")
    env.pop("JOB_COMPLETION_INDEX", None)
    return env


def worker_cmd(shard: int = 0, delay: float = 0.02) -> list[str]:
    # 4 generated tokens x 20 ms x 200 requests / 8 in flight: ~2 s of "inference".
    return [sys.executable, "-m", "vbatch.worker", "--project", P, "--batch-id", B,
            "--shard", str(shard), "--engine", "echo", "--echo-delay-per-token", str(delay),
            "--echo-max-in-flight", "8", "--part-max-results", "5", "--part-max-seconds", "0.2"]


def seed_shard(store: LocalObjectStore, shard: int = 0, n: int = N) -> None:
    lines = [
        {"custom_id": f"s{shard}-r{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "m", "messages": [
             {"role": "system", "content": f"persona {i % 4}"},
             {"role": "user", "content": f"tell me {i} things"}]}}
        for i in range(n)
    ]
    store.put_bytes(layout.shard_key(P, B, shard), b"".join(orjson.dumps(x) + b"\n" for x in lines))


def result_ids(store: LocalObjectStore, shard: int = 0) -> Counter:
    ids: Counter = Counter()
    for key in store.list(layout.results_prefix(P, B, shard)):
        for raw in store.get_bytes(key).splitlines():
            ids[orjson.loads(raw)["custom_id"]] += 1
    return ids


def progress(store: LocalObjectStore, shard: int = 0) -> ShardProgress:
    return ShardProgress.model_validate_json(store.get_bytes(layout.progress_key(P, B, shard)))


def wait_for_parts(store: LocalObjectStore, proc: subprocess.Popen, count: int = 1,
                   timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(list(store.list(layout.results_prefix(P, B, 0)))) < count:
        if proc.poll() is not None:
            return  # finished (or died) already; the caller's assertions decide
        assert time.monotonic() < deadline, "no part written in time"
        time.sleep(0.01)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(data_dir) -> LocalObjectStore:
    return LocalObjectStore(data_dir / "storage")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_at_random_points_then_restart_gives_each_custom_id_exactly_once(data_dir, store, seed):
    seed_shard(store)
    rng = random.Random(seed)
    after_kills = []
    for attempt in range(3):
        parts_before = len(list(store.list(layout.results_prefix(P, B, 0))))
        proc = subprocess.Popen(worker_cmd(), env=env_for(data_dir),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Kill points: anywhere from startup (reading old parts) on, or - always on
        # the first attempt - a random moment after this run wrote its first part,
        # which keeps the test meaningful on a slow, loaded machine.
        if attempt == 0 or rng.random() < 0.5:
            wait_for_parts(store, proc, parts_before + 1)
        try:
            proc.wait(timeout=rng.uniform(0.0, 0.8))
        except subprocess.TimeoutExpired:
            proc.kill()  # SIGKILL: no flush, no cleanup
            proc.wait()
            partial = result_ids(store)
            assert all(count == 1 for count in partial.values())
            after_kills.append(sum(partial.values()))
    # The kills must have interrupted real work, or this test proves nothing.
    assert any(0 < done < N for done in after_kills), after_kills

    final = subprocess.run(worker_cmd(delay=0.0), env=env_for(data_dir),
                           capture_output=True, text=True, timeout=60)

    assert final.returncode == 0, final.stderr
    assert result_ids(store) == Counter(f"s0-r{i}" for i in range(N))
    done = progress(store)
    assert done.finished and (done.total, done.completed, done.failed) == (N, N, 0)
    assert done.parts == len(list(store.list(layout.results_prefix(P, B, 0))))
    # "tell me {i} things" echoes 4 tokens; the prompt adds 2 system tokens.
    assert (done.usage.input_tokens, done.usage.output_tokens) == (6 * N, 4 * N)




@pytest.mark.timeout(120)
def test_sigterm_flushes_finished_results_exits_75_and_a_rerun_completes(data_dir, store):
    seed_shard(store)
    proc = subprocess.Popen(worker_cmd(delay=0.05), env=env_for(data_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_parts(store, proc)

    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)

    assert proc.returncode == 75, stderr  # a Job retries the index; the rerun resumes
    assert "SIGTERM" in stderr and "stopped before the end" in stderr
    stopped = progress(store)
    ids = result_ids(store)
    assert not stopped.finished
    assert 0 < sum(ids.values()) < N and all(c == 1 for c in ids.values())
    assert stopped.completed == sum(ids.values())

    rerun = subprocess.run(worker_cmd(delay=0.0), env=env_for(data_dir),
                           capture_output=True, text=True, timeout=60)

    assert rerun.returncode == 0, rerun.stderr
    assert result_ids(store) == Counter(f"s0-r{i}" for i in range(N))
    assert progress(store).finished and progress(store).completed == N


@pytest.mark.timeout(60)
def test_a_missing_shard_is_a_clear_nonzero_exit(data_dir):
    proc = subprocess.run(worker_cmd(shard=5), env=env_for(data_dir),
                          capture_output=True, text=True, timeout=30)

    assert proc.returncode == 3
    assert "shards/5.jsonl" in proc.stderr and "not found" in proc.stderr


@pytest.mark.timeout(60)
def test_the_shard_index_defaults_to_the_indexed_job_completion_index(data_dir, store):
    seed_shard(store, shard=2, n=10)
    cmd = [a for a in worker_cmd(delay=0.0)]
    i = cmd.index("--shard")
    del cmd[i : i + 2]

    proc = subprocess.run(cmd, env={**env_for(data_dir), "JOB_COMPLETION_INDEX": "2"},
                          capture_output=True, text=True, timeout=30)

    assert proc.returncode == 0, proc.stderr
    assert result_ids(store, shard=2) == Counter(f"s2-r{i}" for i in range(10))


@pytest.mark.timeout(60)
def test_serve_stdin_runs_tasks_with_one_loaded_engine_and_exits_at_eof(data_dir, store):
    seed_shard(store, shard=0, n=12)
    seed_shard(store, shard=1, n=7)
    tasks = [{"project": P, "batch_id": B, "shard": 0}, "not json",
             {"project": P, "batch_id": B, "shard": 1}, {"project": P, "batch_id": B, "shard": 9}]
    stdin = "".join((t if isinstance(t, str) else orjson.dumps(t).decode()) + "\n" for t in tasks)
    cmd = [sys.executable, "-m", "vbatch.worker", "--serve-stdin", "--engine", "echo"]

    proc = subprocess.run(cmd, env=env_for(data_dir), input=stdin,
                          capture_output=True, text=True, timeout=30)

    assert proc.returncode == 0, proc.stderr
    loaded, *replies = [orjson.loads(line) for line in proc.stdout.splitlines()]
    assert loaded["event"] == "engine_loaded" and loaded["engine"] == "echo"
    # Tasks run at once, so replies come as each ends: match them by shard.
    assert len(replies) == 4
    (bad,) = [r for r in replies if "shard" not in r]
    by_shard = {r["shard"]: r for r in replies if "shard" in r}
    assert {k: by_shard[0][k] for k in ("shard", "finished", "completed", "failed")} == \
        {"shard": 0, "finished": True, "completed": 12, "failed": 0}
    assert "bad task" in bad["error"]
    assert (by_shard[1]["finished"], by_shard[1]["completed"]) == (True, 7)
    assert by_shard[9]["finished"] is False and "not found" in by_shard[9]["error"]
    assert result_ids(store, shard=1) == Counter(f"s1-r{i}" for i in range(7))


@pytest.mark.timeout(60)
def test_serve_stdin_sigterm_stops_the_running_task_after_flushing(data_dir, store):
    seed_shard(store)
    cmd = [sys.executable, "-m", "vbatch.worker", "--serve-stdin", "--engine", "echo",
           "--echo-delay-per-token", "0.05", "--echo-max-in-flight", "8",
           "--part-max-results", "5", "--part-max-seconds", "0.2"]
    proc = subprocess.Popen(cmd, env=env_for(data_dir), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdin.write(orjson.dumps({"project": P, "batch_id": B, "shard": 0}).decode() + "\n")
    proc.stdin.flush()  # stdin stays open: the worker would wait for more tasks
    wait_for_parts(store, proc)

    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=30)

    assert proc.returncode == 0, stderr
    loaded, reply = [orjson.loads(line) for line in stdout.splitlines()]
    assert loaded["event"] == "engine_loaded"
    assert reply["finished"] is False and reply["completed"] == sum(result_ids(store).values()) > 0


@pytest.mark.timeout(120)
def test_a_model_that_cannot_be_loaded_is_a_clear_nonzero_exit(data_dir, store):
    seed_shard(store, n=3)
    cmd = [sys.executable, "-m", "vbatch.worker", "--project", P, "--batch-id", B,
           "--shard", "0", "--engine", "vllm", "--model", "no-such-model"]

    proc = subprocess.run(cmd, env=env_for(data_dir), capture_output=True, text=True, timeout=100)

    assert proc.returncode == 4
    assert "no-such-model" in proc.stderr or "vllm engine is unavailable" in proc.stderr
    assert not list(store.list(layout.results_prefix(P, B, 0)))
