"""Load on loopback: 200 concurrent clients each upload a file, create a batch and poll it.

Bounded in count (200 flows, at most 50 in flight) and in time (a global timeout);
no timing assertions. Every request either succeeds or gets a clean 429/503
envelope (then it is retried, a bounded number of times); nothing is corrupted:
every uploaded file downloads byte-identical, every created batch is retrievable
and listed, and no 5xx other than 503 is ever seen.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from collections import Counter
from pathlib import Path

import httpx
import pytest
from api_server import chat_line, jsonl, start_api_server

FLOWS = 200
IN_FLIGHT = 50
RETRIES = 5
POLLS = 3


class Flow:
    def __init__(self, index: int, rng: random.Random) -> None:
        self.index = index
        # Distinct content and sizes (a few bytes .. ~200 KB), so a mix-up would show.
        lines = [chat_line(f"f{index}-r{i}", f"{index}:{i}:" + rng.randbytes(8).hex() * rng.randint(1, 40))
                 for i in range(rng.randint(1, 60))]
        self.requests = len(lines)
        self.content = jsonl(lines)
        self.file_id: str | None = None
        self.batch_id: str | None = None


async def call(client: httpx.AsyncClient, statuses: Counter, method: str, url: str, **kwargs) -> httpx.Response:
    """One request; 429/503 are clean refusals and are retried a bounded number of times."""
    for attempt in range(RETRIES):
        r = await client.request(method, url, **kwargs)
        statuses[r.status_code] += 1
        if r.status_code >= 400:
            error = r.json()["error"]  # always the envelope
            assert set(error) >= {"message", "type", "param", "code"}
        if r.status_code not in (429, 503):
            return r
        await asyncio.sleep(0.05 * 2**attempt)
    return r


async def run_flow(client: httpx.AsyncClient, gate: asyncio.Semaphore, statuses: Counter, flow: Flow) -> None:
    async with gate:
        r = await call(client, statuses, "POST", "/v1/files",
                       files={"file": (f"load-{flow.index}.jsonl", flow.content)}, data={"purpose": "batch"})
        assert r.status_code == 200, r.text
        assert r.json()["bytes"] == len(flow.content)
        flow.file_id = r.json()["id"]
        r = await call(client, statuses, "POST", "/v1/batches", json={
            "input_file_id": flow.file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h",
            "metadata": {"flow": str(flow.index)}})
        assert r.status_code == 200, r.text
        flow.batch_id = r.json()["id"]
        assert r.json()["request_counts"]["total"] == flow.requests
        for _ in range(POLLS):
            r = await call(client, statuses, "GET", f"/v1/batches/{flow.batch_id}")
            assert r.status_code == 200 and r.json()["metadata"] == {"flow": str(flow.index)}
        r = await call(client, statuses, "GET", "/v1/batches", params={"limit": 5})
        assert r.status_code == 200


async def verify(client: httpx.AsyncClient, gate: asyncio.Semaphore, statuses: Counter, flow: Flow) -> None:
    async with gate:
        r = await call(client, statuses, "GET", f"/v1/files/{flow.file_id}/content")
        assert r.status_code == 200
        assert hashlib.sha256(r.content).digest() == hashlib.sha256(flow.content).digest(), flow.index
        meta = (await call(client, statuses, "GET", f"/v1/files/{flow.file_id}")).json()
        assert meta["bytes"] == len(flow.content) and meta["filename"] == f"load-{flow.index}.jsonl"
        batch = (await call(client, statuses, "GET", f"/v1/batches/{flow.batch_id}")).json()
        assert batch["input_file_id"] == flow.file_id and batch["request_counts"]["total"] == flow.requests


async def all_pages(client: httpx.AsyncClient, path: str, limit: int) -> list[dict]:
    items, after = [], None
    for _ in range(FLOWS // limit + 3):  # bounded pagination
        params = {"limit": limit} | ({"after": after} if after else {})
        page = (await client.get(path, params=params)).json()
        items += page["data"]
        if not page["has_more"]:
            return items
        after = page["last_id"]
    raise AssertionError(f"{path} pagination did not end")


async def load(url: str, headers: dict[str, str]) -> Counter:
    rng = random.Random(2024)
    flows = [Flow(i, rng) for i in range(FLOWS)]
    statuses: Counter = Counter()
    gate = asyncio.Semaphore(IN_FLIGHT)
    limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as client:
        await asyncio.gather(*(run_flow(client, gate, statuses, f) for f in flows))
        await asyncio.gather(*(verify(client, gate, statuses, f) for f in flows))

        files = await all_pages(client, "/v1/files", 10_000)
        assert Counter(f["id"] for f in files) == Counter(f.file_id for f in flows)
        batches = await all_pages(client, "/v1/batches", 37)
        assert Counter(b["id"] for b in batches) == Counter(f.batch_id for f in flows)
        assert [b["id"] for b in batches] == sorted((b["id"] for b in batches), reverse=True)  # newest first
    return statuses


@pytest.mark.timeout(240)
def test_200_concurrent_upload_create_poll_flows(tmp_path: Path) -> None:
    with start_api_server(tmp_path) as server:
        tenant = server.new_tenant()
        statuses = asyncio.run(asyncio.wait_for(load(server.url, tenant.headers), timeout=200))
        assert set(statuses) <= {200, 429, 503}, statuses
        assert statuses[200] >= FLOWS * (2 + POLLS + 1 + 3)
        # Nothing half-written is left in storage: only files and their metadata.
        root = server.services.settings.storage_dir / "projects" / tenant.project
        leftovers = [p for p in root.rglob("*") if p.is_file() and ".vbatch-tmp-" in p.name]
        assert leftovers == []
        assert len(list((root / "files").iterdir())) == 2 * FLOWS
        json.dumps(dict(statuses))  # for the log on failure
