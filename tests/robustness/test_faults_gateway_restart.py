"""kill -9 the whole `vbatch serve` process mid-batch, start it again on the same data dir.

Its worker must die with it (PR_SET_PDEATHSIG), the restarted gateway resumes the
batch from the parts already written, and every custom_id ends in exactly one
result file. Files and batches listed before the crash are still listed after.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from api_server import chat_line, jsonl
from s3server import free_port

N = 60
TERMINAL = {"completed", "failed", "expired", "cancelled"}


def vbatch_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VBATCH_")}
    env.update(
        VBATCH_ECHO_DELAY_PER_TOKEN="0.03",
        VBATCH_SHARD_TARGET_REQUESTS="20",
        VBATCH_PART_MAX_RESULTS="4",
        VBATCH_PART_MAX_SECONDS="0.2",
        **extra,
    )
    return env


def vbatch(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from vbatch.cli import main; sys.exit(main())", *args]


class Gateway:
    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        self.data_dir, self.env = data_dir, env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(data_dir.parent / f"serve-{self.port}.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            vbatch("serve", "--data-dir", str(data_dir), "--port", str(self.port), "--engine", "echo",
                   "--host", "127.0.0.1"),
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_text()
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError("vbatch serve did not start:\n" + self.log_text())

    def log_text(self) -> str:
        self.log.flush()
        return (self.data_dir.parent / f"serve-{self.port}.log").read_text(errors="replace")[-3000:]

    def children(self) -> list[int]:
        pids = []
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            pids += [int(p) for p in (task / "children").read_text().split()]
        return pids

    def kill9(self) -> None:
        self.process.kill()
        self.process.wait(10)
        self.log.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        if not self.log.closed:
            self.log.close()


def create_key(data_dir: Path, project: str, env: dict[str, str]) -> str:
    out = subprocess.run(vbatch("keys", "create", "--project", project, "--data-dir", str(data_dir)),
                         env=env, capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip().splitlines()[-1]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def wait_terminal(c: httpx.Client, batch_id: str, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = c.get(f"/v1/batches/{batch_id}").json()
        if batch["status"] in TERMINAL:
            return batch
        time.sleep(0.2)
    raise AssertionError(f"not finished: {batch}")


def result_ids(c: httpx.Client, batch: dict) -> Counter:
    ids: Counter = Counter()
    for key in ("output_file_id", "error_file_id"):
        if batch[key]:
            raw = c.get(f"/v1/files/{batch[key]}/content").content
            assert raw.endswith(b"\n")
            ids.update(json.loads(line)["custom_id"] for line in raw.splitlines())
    return ids


@pytest.mark.timeout(180)
def test_gateway_killed_mid_batch_resumes_after_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = vbatch_env()
    key = create_key(data, "crash", env)
    headers = {"x-api-key": key, "x-project-id": "crash"}
    first = Gateway(data, env)
    try:
        with httpx.Client(base_url=first.url, headers=headers, timeout=30) as c:
            content = jsonl([chat_line(f"c{i}", " ".join(["word"] * (i % 6 + 1))) for i in range(N)])
            f = c.post("/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"}).json()
            done_batch = c.post("/v1/batches", json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions",
                                                     "completion_window": "24h"}).json()
            done_batch = wait_terminal(c, done_batch["id"])  # a finished batch, before the crash
            batch = c.post("/v1/batches", json={"input_file_id": f["id"], "endpoint": "/v1/chat/completions",
                                                "completion_window": "24h", "metadata": {"k": "v"}}).json()
            deadline = time.monotonic() + 60
            while c.get(f"/v1/batches/{batch['id']}").json()["request_counts"]["completed"] < 5:
                assert time.monotonic() < deadline, first.log_text()
                time.sleep(0.05)
            files_before = {x["id"] for x in c.get("/v1/files").json()["data"]}
            batches_before = {x["id"] for x in c.get("/v1/batches").json()["data"]}
            workers = first.children()
        assert workers, "no worker subprocess was running"
        first.kill9()
    finally:
        first.stop()

    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(pid) for pid in workers), "a worker outlived its killed gateway"

    second = Gateway(data, env)
    try:
        with httpx.Client(base_url=second.url, headers=headers, timeout=30) as c:
            assert {x["id"] for x in c.get("/v1/files").json()["data"]} >= files_before
            assert {x["id"] for x in c.get("/v1/batches").json()["data"]} == batches_before
            assert c.get(f"/v1/files/{f['id']}/content").content == content
            final = wait_terminal(c, batch["id"])
            assert final["status"] == "completed", final
            assert final["metadata"] == {"k": "v"}
            assert final["request_counts"] == {"total": N, "completed": N, "failed": 0}
            assert result_ids(c, final) == Counter(f"c{i}" for i in range(N))
            assert final["usage"]["output_tokens"] == sum(i % 6 + 1 for i in range(N))
            # The batch finished before the crash is untouched.
            again = c.get(f"/v1/batches/{done_batch['id']}").json()
            assert again["status"] == "completed" and again["output_file_id"] == done_batch["output_file_id"]
            assert result_ids(c, again) == Counter(f"c{i}" for i in range(N))
    finally:
        second.stop()
