"""Running it as a service, through `vbatch serve --engine echo` (a subprocess):
the metrics of the work agree with the batches' own counts, webhooks reach a
receiver that was down (also across a gateway restart), files expire (404, then
swept) while batches that used them still read, and /v1/models lists the models.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx
import openai
import pytest
from api_server import chat_line, jsonl
from prometheus_client.parser import text_string_to_metric_families
from s3server import free_port
from webhook_receiver import WebhookReceiver

TERMINAL = {"completed", "failed", "expired", "cancelled"}


def vbatch(*args: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-m", "vbatch.cli", *args], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


class Node:
    """`vbatch serve` on a data dir; restartable."""

    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        self.data_dir, self.env = data_dir, env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Node:
        self.log = open(self.data_dir.parent / f"serve-{self.port}.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vbatch.cli", "serve", "--data-dir", str(self.data_dir), "--port", str(self.port),
             "--engine", "echo"], env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log_text()
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError("vbatch serve did not start:\n" + self.log_text())

    def log_text(self) -> str:
        self.log.flush()
        return (self.data_dir.parent / f"serve-{self.port}.log").read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.log.close()

    def sdk(self, key: str, project: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, default_headers={"x-project-id": project},
                             max_retries=0)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("VBATCH_")}
    return base | {
        "VBATCH_DATA_DIR": str(tmp_path / "data"),
        "VBATCH_SHARD_TARGET_REQUESTS": "3",
        "VBATCH_PART_MAX_RESULTS": "2",
        "VBATCH_PART_MAX_SECONDS": "0.2",
        "VBATCH_FILE_EXPIRY_MIN_SECONDS": "1",
        "VBATCH_EXPIRY_SWEEP_SECONDS": "0.5",
        "VBATCH_WEBHOOK_ALLOW_PRIVATE": "true",
        "VBATCH_WEBHOOK_BACKOFF_SECONDS": "0.3",
        "VBATCH_WEBHOOK_POLL_SECONDS": "0.2",
    }


def _wait_terminal(sdk: openai.OpenAI, batch_id: str, seconds: float = 90):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        batch = sdk.batches.retrieve(batch_id)
        if batch.status in TERMINAL:
            return batch
        time.sleep(0.2)
    raise AssertionError(f"batch {batch_id} did not end: {batch}")


def _run(sdk: openai.OpenAI, n: int, model: str, *, cancel: bool = False, **create):
    lines = [chat_line(f"r{i}", "word " * (i + 1), model=model) for i in range(n)]
    f = sdk.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    batch = sdk.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h", **create)
    if cancel:
        sdk.batches.cancel(batch.id)
    return f, _wait_terminal(sdk, batch.id)


def _samples(url: str) -> dict[str, list]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found: dict[str, list] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name].append((sample.labels, sample.value))
    return found


def _sum(samples, name: str, **labels) -> float:
    return sum(v for got, v in samples.get(name, []) if all(got.get(k) == want for k, want in labels.items()))


def test_metrics_of_the_work_agree_with_the_batches(tmp_path: Path, env: dict[str, str]) -> None:
    keys = {p: vbatch("keys", "create", "--project", p, env=env) for p in ("team-a", "team-b")}
    node = Node(tmp_path / "data", env | {"VBATCH_ECHO_DELAY_PER_TOKEN": "0.01"}).start()
    try:
        batches = []
        a = node.sdk(keys["team-a"], "team-a")
        batches += [_run(a, 7, "model-x")[1], _run(a, 2, "model-y")[1]]
        b = node.sdk(keys["team-b"], "team-b")
        batches += [_run(b, 4, "model-x")[1], _run(b, 6, "model-x", cancel=True)[1]]
        assert {x.status for x in batches} == {"completed", "cancelled"}
        samples = _samples(node.url)
    finally:
        node.stop()

    for batch, project in zip(batches, ["team-a", "team-a", "team-b", "team-b"], strict=True):
        batch.project = project
    for model in ("model-x", "model-y"):
        for project in ("team-a", "team-b"):
            mine = [x for x in batches if x.model == model and x.project == project]
            for outcome in ("completed", "failed"):
                expected = sum(getattr(x.request_counts, outcome) for x in mine)
                got = _sum(samples, "vbatch_batch_requests_total", model=model, project=project, outcome=outcome)
                assert got == expected, (model, project, outcome)
            assert _sum(samples, "vbatch_batch_tokens_total", model=model, project=project, kind="input") == sum(
                x.usage.input_tokens for x in mine if x.usage)
            assert _sum(samples, "vbatch_batch_tokens_total", model=model, project=project, kind="output") == sum(
                x.usage.output_tokens for x in mine if x.usage)
    assert _sum(samples, "vbatch_batch_tokens_total", kind="output") > 0
    # The gauge is read from the store: every batch, by status and model.
    assert _sum(samples, "vbatch_batches", status="completed", model="model-x") == 2
    assert _sum(samples, "vbatch_batches", status="completed", model="model-y") == 1
    assert _sum(samples, "vbatch_batches", status="cancelled") == 1
    assert _sum(samples, "vbatch_batches", status="in_progress") == 0
    assert _sum(samples, "vbatch_batch_duration_seconds_count") == 4
    assert _sum(samples, "vbatch_batch_duration_seconds_count", status="cancelled") == 1
    completed = [x for x in batches if x.status == "completed"]
    # Queue time is observed for every batch that got a result written.
    assert _sum(samples, "vbatch_batch_queue_seconds_count") >= len(completed)
    # 7 lines at 3 per shard: 3 shards; 2 lines: 1; 4 lines: 2 (the cancelled one may add some).
    assert _sum(samples, "vbatch_shard_attempts_total", outcome="succeeded") >= 6
    assert _sum(samples, "vbatch_engine_loads_total") >= 1
    assert _sum(samples, "vbatch_gpu_seconds_total", project="team-a") > 0
    assert _sum(samples, "vbatch_gpu_seconds_total", project="team-b", model="model-x") > 0


def test_webhooks_reach_a_receiver_that_was_down_across_a_restart(tmp_path: Path, env: dict[str, str]) -> None:
    key = vbatch("keys", "create", "--project", "hooked", env=env)
    receiver = WebhookReceiver(free_port())
    secret = vbatch("webhooks", "add", "--project", "hooked", "--url", receiver.url, env=env)
    assert secret.startswith("whsec_")
    node = Node(tmp_path / "data", env).start()
    try:
        _, done = _run(node.sdk(key, "hooked"), 2, "m")
        _, cancelled = _run(node.sdk(key, "hooked"), 3, "m", cancel=True)
        time.sleep(1.5)  # a few attempts fail: nobody listens
    finally:
        node.stop()
    node = Node(tmp_path / "data", env).start()  # the deliverer restarts
    receiver.start()
    try:
        deadline = time.monotonic() + 60
        while len(receiver.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        node.stop()
        receiver.stop()
    client = openai.OpenAI(api_key="unused")
    events = {}
    for headers, body in receiver.received:
        event = client.webhooks.unwrap(body, headers, secret=secret)
        events[event.data.id] = event.type
    assert events == {done.id: "batch.completed", cancelled.id: f"batch.{cancelled.status}"}


def test_files_expire_and_batches_that_used_them_still_read(tmp_path: Path, env: dict[str, str]) -> None:
    key = vbatch("keys", "create", "--project", "exp", env=env)
    node = Node(tmp_path / "data", env).start()
    try:
        sdk = node.sdk(key, "exp")
        keep = sdk.files.create(file=("k.jsonl", io.BytesIO(b"{}\n")), purpose="batch")
        lines = jsonl([chat_line("a", model="m"), chat_line("b", model="m")])
        short = sdk.files.create(file=("in.jsonl", io.BytesIO(lines)), purpose="batch",
                                 expires_after={"anchor": "created_at", "seconds": 4})
        assert short.expires_at == short.created_at + 4 and keep.expires_at == keep.created_at + 30 * 86400
        batch = sdk.batches.create(input_file_id=short.id, endpoint="/v1/chat/completions", completion_window="24h",
                                   extra_body={"output_expires_after": {"anchor": "created_at", "seconds": 3}})
        batch = _wait_terminal(sdk, batch.id)
        assert batch.status == "completed"
        output = sdk.files.retrieve(batch.output_file_id)
        assert output.expires_at == output.created_at + 3
        with pytest.raises(openai.BadRequestError) as bad:
            sdk.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="batch",
                             expires_after={"anchor": "created_at", "seconds": 10**8})
        assert bad.value.body["param"] == "expires_after.seconds"

        time.sleep(max(short.expires_at, output.expires_at) - time.time() + 1.5)  # expired, and swept
        for file_id in (short.id, output.id):
            for call in (sdk.files.retrieve, sdk.files.content, sdk.files.delete):
                with pytest.raises(openai.NotFoundError) as missing:
                    call(file_id)
                assert missing.value.body["code"] == "file_not_found"
        assert [f.id for f in sdk.files.list()] == [keep.id]
        again = sdk.batches.retrieve(batch.id)  # the batch still reads, with the same fields
        assert again.status == "completed" and again.output_file_id == batch.output_file_id
        assert again.request_counts == batch.request_counts
        stored = list((tmp_path / "data" / "storage" / "projects" / "exp" / "files").iterdir())
        assert sorted(p.name for p in stored) == sorted([keep.id, keep.id + ".json"])  # swept: bytes and metadata
    finally:
        node.stop()


def test_models_are_listed_in_openais_shape_behind_auth(tmp_path: Path, env: dict[str, str]) -> None:
    key = vbatch("keys", "create", "--project", "m", env=env)
    node = Node(tmp_path / "data", env).start()
    try:
        models = node.sdk(key, "m").models.list()
        assert [m.id for m in models.data] == ["smollm2-135m-instruct"]
        assert all(m.object == "model" and m.owned_by and m.created > 0 for m in models.data)
        assert node.sdk(key, "m").models.retrieve("smollm2-135m-instruct").id == "smollm2-135m-instruct"
        assert httpx.get(f"{node.url}/v1/models", timeout=5).status_code == 401
        assert httpx.get(f"{node.url}/v1/models", headers={"x-api-key": "nope", "x-project-id": "m"}).status_code == 403
    finally:
        node.stop()
