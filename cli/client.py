"""`vbatch submit` and `vbatch status`: a small client of a running gateway."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

TERMINAL = {"completed", "failed", "expired", "cancelled"}


class Gateway:
    def __init__(self, args: argparse.Namespace) -> None:
        base = args.base_url or os.environ.get("VBATCH_BASE_URL", "http://127.0.0.1:8000")
        key = args.api_key or os.environ.get("VBATCH_API_KEY")
        project = args.project or os.environ.get("VBATCH_PROJECT")
        if not key or not project:
            raise SystemExit("set --api-key/--project (or VBATCH_API_KEY/VBATCH_PROJECT)")
        self.http = httpx.Client(base_url=base.rstrip("/"), headers={"x-api-key": key, "x-project-id": project}, timeout=120)

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                raise SystemExit(f"{response.status_code} {error.get('code') or error.get('type')}: {error['message']}")
            except (ValueError, KeyError):
                raise SystemExit(f"{response.status_code}: {response.text}") from None
        return response

    def batch(self, batch_id: str) -> dict[str, Any]:
        return self.call("GET", f"/v1/batches/{batch_id}").json()

    def download(self, file_id: str):
        with self.http.stream("GET", f"/v1/files/{file_id}/content") as response:
            response.raise_for_status()
            yield from response.iter_lines()


def _metadata(pairs: list[str]) -> dict[str, str] | None:
    if not pairs:
        return None
    return dict(pair.split("=", 1) for pair in pairs)


def submit(args: argparse.Namespace) -> int:
    gateway = Gateway(args)
    with args.input.open("rb") as handle:
        uploaded = gateway.call("POST", "/v1/files", data={"purpose": "batch"}, files={"file": (args.input.name, handle, "application/jsonl")}).json()
    batch = gateway.call(
        "POST", "/v1/batches",
        json={"input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h", "metadata": _metadata(args.metadata)},
    ).json()
    print(batch["id"])
    if not args.wait:
        return 0
    batch = wait(gateway, batch)
    if args.output:
        written = write_joined(gateway, batch, args.output)
        print(f"wrote {written} results to {args.output}", file=sys.stderr)
    return 0 if batch["status"] == "completed" else 1


def wait(gateway: Gateway, batch: dict[str, Any], interval: float = 1.0) -> dict[str, Any]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("failed {task.fields[failed]}"), TimeElapsedColumn())
    # Progress goes to stderr: stdout carries only the batch id, for scripts.
    with Progress(*columns, transient=False, console=Console(stderr=True)) as progress:
        task = progress.add_task(batch["status"], total=batch["request_counts"]["total"] or None, failed=0)
        while True:
            counts = batch["request_counts"]
            progress.update(task, description=batch["status"], total=counts["total"] or None,
                            completed=counts["completed"] + counts["failed"], failed=counts["failed"])
            if batch["status"] in TERMINAL:
                return batch
            time.sleep(interval)
            batch = gateway.batch(batch["id"])


def write_joined(gateway: Gateway, batch: dict[str, Any], path: Path) -> int:
    """Output and error lines streamed into one JSONL (clients join on custom_id)."""
    written = 0
    with path.open("w", encoding="utf-8") as out:
        for file_id in (batch.get("output_file_id"), batch.get("error_file_id")):
            for line in gateway.download(file_id) if file_id else ():
                if line.strip():
                    out.write(line + "\n")
                    written += 1
    return written


def status(args: argparse.Namespace) -> int:
    batch = Gateway(args).batch(args.batch_id)
    sys.stdout.write(orjson.dumps(batch, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0
